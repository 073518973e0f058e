"""The fused Glow step forward (actnorm + 1x1 conv + affine coupling) against the memory
bandwidth of a CUDA device: issue 2 asks for 70% of the measured copy bandwidth.

At the bench shape ([32, 48, 32, 32] float32: x and h read, y written, 18.9 MB) an H200 moves
the bytes in about 5 us, less than what the host spends on one call, so the bench's per-call
timing (host sync after every call) measures the host. This script times each variant three
ways: `sync` (one call, then synchronize: the bench's method), `stream` (50 calls back to
back between two CUDA events: throughput, launch gaps included) and `graph` (the 50 calls
captured in a CUDA graph and replayed: device time, the host out of the way), at the bench
shape and a large one ([256, 48, 64, 64], 604 MB), and gives GB/s (x, h and y once each) and
the share of a large device-to-device copy's rate (read + write) measured in the same run.
Variants: `copy` (torch.add(x, h, out=y): the same bytes, no arithmetic), `kernel` (the
Triton fused forward with its log-det partial sums), `op` (the public
actnorm_invconv_coupling), `step` (ActNorm folded into W, then the op: the bench's
latentfast), `eager`, `compile` (torch.compile of eager). Also checks the op against the
float64 eager step (relative error of y and of the log-det).

    python scripts/glow_gpu_bandwidth.py [--json PATH]
    TRITON_INTERPRET=1 LATENTFAST_BACKEND=triton python scripts/glow_gpu_bandwidth.py --device cpu --small
        (a dry run of the script on a CPU: host timings, no graphs)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import latentfast.ops.flows as ops
from latentfast import backend
from latentfast.bench.cases import _eager_glow_step, _fast_glow_step
from latentfast.bench.runner import capture_cuda_graph, copy_bandwidth, cuda_events_ms, median_ms
from latentfast.reference import flows as ref

CALLS = 50


def _graph_ms(fn, calls: int) -> float | str:
    try:
        graph, _ = capture_cuda_graph(lambda: [fn() for _ in range(calls)], warmup=1)
        graph.replay()
        return cuda_events_ms(graph.replay, 5) / calls
    except Exception as e:  # report it, keep the other timings
        return f"no graph: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def run_shape(shape: tuple[int, int, int, int], device: torch.device, use_compile: bool) -> list[dict]:
    n, c, s, _ = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, s, s, generator=gen).to(device)
    h = torch.randn(n, c, s, s, generator=gen).to(device)
    logs, bias = (0.1 * torch.randn(c, generator=gen)).to(device), (0.1 * torch.randn(c, generator=gen)).to(device)
    weight = torch.linalg.qr(torch.randn(c, c, generator=gen))[0].to(device)
    a, b = ref.fold_actnorm_into_conv(logs, bias, weight)
    y = torch.empty_like(x)
    nbytes = 3 * x.numel() * x.element_size()
    with torch.no_grad():
        want_y, want_ld = _eager_glow_step(*(t.double() for t in (x, logs, bias, weight, h)))
        got_y, got_ld = ops.actnorm_invconv_coupling(x, a, b, h)
        err_y = float((got_y.double() - want_y).norm() / want_y.norm())
        err_ld = float((got_ld.double() - want_ld).norm() / want_ld.norm())
    variants = {"copy": lambda: torch.add(x, h, out=y)}
    if backend.select(device) == "triton":
        from latentfast.kernels import flows as kernels

        variants["kernel"] = lambda: kernels.actnorm_invconv_fwd(x, a, b, h, 2)
    variants["op"] = lambda: ops.actnorm_invconv_coupling(x, a, b, h)
    variants["step"] = lambda: _fast_glow_step(x, logs, bias, weight, h)
    variants["eager"] = lambda: _eager_glow_step(x, logs, bias, weight, h)
    if use_compile:
        compiled = torch.compile(_eager_glow_step)
        variants["compile"] = lambda: compiled(x, logs, bias, weight, h)
    rows = []
    with torch.no_grad():
        for name, fn in variants.items():
            try:
                for _ in range(3):  # compilation and allocator growth stay out
                    fn()
            except Exception as e:  # report it, time the other variants
                rows.append({"shape": list(shape), "variant": name, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            row = {"shape": list(shape), "variant": name, "bytes": nbytes,
                   "sync_ms": median_ms(fn, 31, warmup=0, device=device)}
            if device.type == "cuda":
                row["stream_ms"] = cuda_events_ms(fn, 5, calls=CALLS)
                graph = _graph_ms(fn, CALLS)
                row["graph_ms" if isinstance(graph, float) else "graph_error"] = graph
            for mode in ("sync", "stream", "graph"):
                if isinstance(row.get(f"{mode}_ms"), float):
                    row[f"{mode}_gbps"] = nbytes / (row[f"{mode}_ms"] * 1e-3) / 1e9
            if name == "op":
                row["rel_err_y"], row["rel_err_logdet"] = err_y, err_ld
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--small", action="store_true", help="small shapes only (a dry run under the interpreter)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    shapes = [(2, 8, 5, 5)] if args.small else [(32, 48, 32, 32), (256, 48, 64, 64)]
    ceiling = copy_bandwidth(device)[1] if device.type == "cuda" else None
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "backend": backend.select(device), "copy_gbps": ceiling, "rows": []}
    if ceiling:
        print(f"device-to-device copy, 1 GiB: {ceiling:.0f} GB/s (read + write)")
    print(f"{'shape':<18} {'variant':<8} {'sync ms':>9} {'stream ms':>10} {'graph ms':>9} "
          f"{'graph GB/s':>10} {'of copy':>8}")
    for shape in shapes:
        for row in run_shape(shape, device, not args.no_compile):
            out["rows"].append(row)
            if "error" in row:
                print(f"{str(shape):<18} {row['variant']:<8} {row['error']}")
                continue
            best = row.get("graph_gbps")
            share = f"{100 * best / ceiling:.0f}%" if best and ceiling else "-"
            fmt = lambda k: f"{row[k]:.4f}" if isinstance(row.get(k), float) else "-"  # noqa: E731
            print(f"{str(shape):<18} {row['variant']:<8} {fmt('sync_ms'):>9} {fmt('stream_ms'):>10} "
                  f"{fmt('graph_ms'):>9} {(f'{best:.0f}' if best else '-'):>10} {share:>8}"
                  + (f"  rel err y {row['rel_err_y']:.1e}, logdet {row['rel_err_logdet']:.1e}"
                     if "rel_err_y" in row else "")
                  + (f"  ({row['graph_error']})" if "graph_error" in row else ""))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
