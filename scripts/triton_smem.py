"""Compile every Triton kernel the benchmark suite launches for a Hopper GPU (sm_90), without a
GPU, and report the shared memory (and registers) each needs against the hardware limit.

A kernel whose tiles need more shared memory than a block may have (227 KB on H100 / H200)
compiles under TRITON_INTERPRET=1 and passes every CPU test, but its launch on the GPU raises
OutOfResources. This script runs the suite's cases (full size, plus the widest sizes the ops
document) through the Triton backend under the interpreter with the kernel launches recorded
and skipped (no kernel runs: the outputs stay NaN, the glue around them does not care), then
compiles each distinct (kernel, argument types, constexprs, num_warps, num_stages) with
triton.compile for the target, and reads each cubin's registers and stack (spill) bytes per
thread with cuobjdump. Triton's bundled ptxas and cuobjdump do the work; nothing else is
needed.

    python scripts/triton_smem.py [--ops NAME ...] [--arch 90] [--json PATH] [--num-warps N]

Exit status 1 when a configuration exceeds the limit (a launch that would raise on the GPU;
the vector-flow wrappers catch it and fall back to the reference, other kernels would fail).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = 232448  # bytes of shared memory a block may opt in to on sm_90 (H100, H200)

_seen: dict[tuple, dict] = {}


def _record(self, *args, grid, warmup, **kwargs):
    """InterpretedFunction.run, recording the launch instead of interpreting it."""
    import torch

    if warmup:
        return None
    fn = self.fn
    params = inspect.signature(fn).parameters
    names = list(params)
    bound = dict(zip(names, args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound.update(kwargs)
    sig, consts = {}, {}
    for name in names:
        value = bound.get(name, params[name].default)
        if "constexpr" in str(params[name].annotation):
            sig[name], consts[name] = "constexpr", value
        elif value is None:
            sig[name], consts[name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
                               torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8",
                               torch.uint8: "u8", torch.bool: "i1"}[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    key = (fn.__module__, fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in consts.items())),
           tuple(sorted(options.items())))
    _seen.setdefault(key, dict(module=fn.__module__, kernel=fn.__name__, signature=sig, constexprs=consts,
                               options=options))
    return None


def _run_cases(ops: list[str] | None) -> None:
    import torch

    from latentfast.bench.cases import make_cases

    cases = make_cases(torch.device("cpu"), quick=False)
    for case in cases:
        if ops and case.op not in ops:
            continue
        try:
            inputs = [t.detach().clone().requires_grad_(i in case.grad_inputs) if isinstance(t, torch.Tensor)
                      and t.is_floating_point() else t for i, t in enumerate(case.inputs)]
            outs = case.fast(*inputs)
            if "fwd+bwd" in case.passes:
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
                if isinstance(loss, torch.Tensor):
                    loss.backward()
        except Exception as e:  # the glue after a skipped launch may trip on NaN: the launches before it count
            print(f"  ({case.op} {case.name}: stopped after its recorded launches: {type(e).__name__}: "
                  f"{str(e)[:120]})", file=sys.stderr)


def _run_widest(ops: list[str] | None) -> None:
    """The widest sizes the ops document, beyond the bench shapes (float32 and float64, forward
    and backward): GRU / LSTM hidden 512, Glow ops at 192 channels, vector flows d = 512 / H =
    1024 (and their inverse)."""
    import torch

    from latentfast.flows import vector as vf
    from latentfast.ops import flows as fops
    from latentfast.ops import rnn as rops
    from latentfast.ops import vector_flows as vops

    gen = torch.Generator().manual_seed(0)
    if not ops or {"gru_sequence", "lstm_sequence"} & set(ops):
        for dtype in (torch.float32, torch.float64):
            for lstm in (False, True):
                h, b, t, i = 512, 64, 4, 32
                gates = 4 if lstm else 3
                x, h0 = torch.randn(t, b, i, generator=gen).to(dtype), torch.randn(b, h, generator=gen).to(dtype)
                w = [(torch.randn(gates * h, i, generator=gen) * 0.05).to(dtype),
                     (torch.randn(gates * h, h, generator=gen) * 0.05).to(dtype),
                     torch.zeros(gates * h, dtype=dtype), torch.zeros(gates * h, dtype=dtype)]
                leaves = [x, h0, *w]
                for a in leaves:
                    a.requires_grad_()
                try:
                    if lstm:
                        out, _ = rops.lstm_sequence(x, (h0, torch.zeros_like(h0)), *w)
                    else:
                        out, _ = rops.gru_sequence(x, h0, *w)
                    out.sum().backward()
                except Exception as e:
                    print(f"  (widest {'lstm' if lstm else 'gru'} {dtype}: {type(e).__name__}: {str(e)[:120]})",
                          file=sys.stderr)
    if not ops or {"actnorm_invconv_coupling", "actnorm_invconv", "affine_coupling"} & set(ops):
        for dtype in (torch.float32, torch.float64):
            n, c, s = 2, 192, 8  # a deep multi-scale level's channels
            x, hh = torch.randn(n, c, s, s, generator=gen).to(dtype), torch.randn(n, c, s, s, generator=gen).to(dtype)
            weight = torch.linalg.qr(torch.randn(c, c, generator=gen))[0].to(dtype)
            bias = torch.zeros(c, dtype=dtype)
            for t_ in (x, hh, weight, bias):
                t_.requires_grad_()
            try:
                y, ld = fops.actnorm_invconv_coupling(x, weight, bias, hh)
                (y.sum() + ld.sum()).backward()
                fops.actnorm_invconv(x, weight, bias).sum().backward()
                yb, ldb = fops.affine_coupling(x[:, : c // 2], hh)
                (yb.sum() + ldb.sum()).backward()
            except Exception as e:
                print(f"  (widest glow {dtype}: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
    if not ops or {"vector_flow_stack", "made_flow_step", "vector_flow_stack_inverse"} & set(ops):
        for dtype in (torch.float32, torch.float64):
            d, h, b = 512, 1024, 32
            m1, m2 = vf.made_masks(*vf.made_degrees(d, h, torch.arange(d)), 2)  # MADE: the inverse's plan applies
            w1 = (torch.randn(1, h, d, generator=gen) * 0.03 * m1).to(dtype)
            w2 = (torch.randn(1, 2 * d, h, generator=gen) * 0.03 * m2).to(dtype)
            b1, b2 = torch.zeros(1, h, dtype=dtype), torch.zeros(1, 2 * d, dtype=dtype)
            x = torch.randn(b, d, generator=gen).to(dtype)
            params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
            try:
                y, ld = vops.vector_flow_stack(x, *params)
                (y.sum() + ld.sum()).backward()
                with torch.no_grad():
                    vops.vector_flow_stack_inverse(x, *params)
            except Exception as e:
                print(f"  (widest vector flow {dtype}: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)


def _record_launches(ops: list[str] | None) -> list[dict]:
    """Under the interpreter (this process only): run the cases with launches recorded. The
    kernel modules are told they are not interpreting, so they pick their GPU block sizes."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LATENTFAST_BACKEND"] = "triton"
    from triton.runtime.interpreter import InterpretedFunction

    import latentfast.kernels as kpkg

    for info in __import__("pkgutil").iter_modules(kpkg.__path__):
        mod = importlib.import_module(f"latentfast.kernels.{info.name}")
        if hasattr(mod, "triton_interpret"):
            mod.triton_interpret = lambda: False
    InterpretedFunction.run = _record
    _run_cases(ops)
    _run_widest(ops)
    return list(_seen.values())


def _resources(compiled) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread: spills and local arrays) of a compiled
    kernel, from the cubin by the cuobjdump that ships with Triton; (None, None) if unavailable."""
    import re

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    if not cubin or not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _compile(launches: list[dict], arch: int, num_warps: int | None = None) -> list[dict]:
    """In a process without TRITON_INTERPRET (jit kernels, not interpreted ones): compile each
    (with num_warps overriding every launch's, when given: a what-if for tuning)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    rows = []
    for ln in sorted(launches, key=lambda r: (r["kernel"], json.dumps(r["constexprs"], sort_keys=True))):
        kernel = getattr(importlib.import_module(ln["module"]), ln["kernel"])
        if num_warps:
            ln = dict(ln, options=dict(ln["options"], num_warps=num_warps))
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=ln["signature"], constexprs=ln["constexprs"]),
                                      target=target, options=dict(ln["options"]))
            shared = int(compiled.metadata.shared)
            status = "fits" if shared <= SMEM_LIMIT else "TOO BIG"
            regs, stack = _resources(compiled)
        except Exception as e:
            shared, regs, stack, status = -1, None, None, f"compile error: {type(e).__name__}: {str(e)[:160]}"
        types = sorted({t for t in ln["signature"].values() if t.startswith("*")})
        shown = {k: v for k, v in ln["constexprs"].items() if v is not None}
        rows.append(dict(kernel=ln["kernel"], constexprs=shown, pointer_types=types, options=ln["options"],
                         shared=shared, registers=regs, stack=stack, status=status,
                         seconds=round(time.perf_counter() - t0, 1)))
        print(f"{status:8} {shared:8d} B  regs {regs} stack {stack}  {ln['kernel']}  {shown}  {ln['options']}  {types}",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="*", default=None, help="bench ops to run (default: all)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for")
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    parser.add_argument("--num-warps", type=int, default=None,
                        help="compile every launch with this many warps instead of its own (a what-if)")
    parser.add_argument("--compile-from", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.compile_from:
        with open(args.compile_from) as f:
            launches = json.load(f)
        rows = _compile(launches, args.arch, args.num_warps)
        with open(args.compile_from + ".out", "w") as f:
            json.dump(rows, f)
        return 0
    launches = _record_launches(args.ops)
    print(f"{len(launches)} distinct launches; compiling for sm_{args.arch} (shared-memory limit {SMEM_LIMIT} bytes)",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        with open(path, "w") as f:
            json.dump(launches, f)
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LATENTFAST_BACKEND")}
        child = [sys.executable, __file__, "--compile-from", path, "--arch", str(args.arch)]
        if args.num_warps:
            child += ["--num-warps", str(args.num_warps)]
        subprocess.run(child, env=env, check=True)
        with open(path + ".out") as f:
            rows = json.load(f)
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, limit=SMEM_LIMIT, triton=triton.__version__, rows=rows), f, indent=1)
    bad = [r for r in rows if r["status"] != "fits"]
    worst = max((r["shared"] for r in rows), default=0)
    print(f"{len(rows) - len(bad)} of {len(rows)} fit; largest {worst} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
