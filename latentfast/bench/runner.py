"""Runs the benchmark cases and prints / writes the table."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from latentfast import backend
from latentfast.bench.cases import Case, make_cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 3, device: torch.device | None = None) -> float:
    """The median wall time of `reps` calls of fn in ms (the upper middle one for even reps)
    after `warmup` calls; for standalone timing scripts. With a CUDA `device`, the device is
    synchronised after each call, inside its time (else nothing is synchronised)."""
    for _ in range(warmup):
        fn()
    if device is not None:
        _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device is not None:
            _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def cuda_events_ms(fn: Callable[[], object], rounds: int, calls: int = 1, warmup: int = 0) -> float:
    """Device time per call in ms, by CUDA events: the median over `rounds` rounds of `calls`
    back-to-back calls of fn between two events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> tuple[float, float]:
    """(ms, GB/s) of a 1 GiB float32 device-to-device copy, counting the bytes read and
    written: the bandwidth ceiling rows are read against (CUDA events, 20 rounds)."""
    src = torch.randn(1 << 28, device=device)
    dst = torch.empty_like(src)
    ms = cuda_events_ms(lambda: dst.copy_(src), 20, warmup=3)
    return ms, 2 * src.numel() * src.element_size() / ms / 1e6


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn captured in a CUDA graph after `warmup` calls on a side stream (compilation and
    allocations kept out of the capture, as torch.cuda.graph asks). Returns the graph and what
    the captured call returned: tensors in the graph's memory that each replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, min_reps: int,
                        budget_s: float, max_rounds: int = 200) -> dict[str, float]:
    """Median wall time in ms of each callable, timed in interleaved rounds.

    Each round runs every callable once, in an order that rotates from round to round, so a
    slow phase of a shared or throttled machine hits all of them alike and the ratios between
    them stay meaningful (timing one callable for seconds, then the next, lets such a phase
    land on one of them only). Runs at least `min_reps` rounds and goes on while the
    time spent stays under `budget_s` per callable, up to `max_rounds`.
    """
    for name in fns:  # warm-up (compilation and allocator growth stay out)
        for _ in range(3):
            fns[name]()
    _sync(device)
    times = alternate_ms(fns, min_reps, warmup=0, device=device, budget_s=budget_s, max_rounds=max_rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def alternate_ms(fns: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1,
                 before: Callable[[str], object] | None = None, device: torch.device | None = None,
                 budget_s: float = 0.0, max_rounds: int = 0) -> dict[str, list[float]]:
    """Wall time in ms of every call of each callable, over `rounds` rounds after `warmup`
    untimed ones: each round calls every callable once, in an order that rotates from round to
    round, so entry i of each list comes from the same round (see median_ratio). Goes on past
    `rounds` while the timed rounds have taken under `budget_s` per callable, up to
    `max_rounds`. before(name), untimed, runs before each call, e.g. to set an environment
    variable the call reads or to run another computation in between. time_interleaved_ms (the
    bench) and the A/B scripts under scripts/ time with this."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}

    def one_round(r: int, timed: bool) -> None:
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            fns[name]()
            if device is not None:
                _sync(device)
            if timed:
                times[name].append((time.perf_counter() - t0) * 1e3)

    for r in range(warmup):
        one_round(r, False)
    start = time.perf_counter()
    n = 0
    while n < rounds or (time.perf_counter() - start < budget_s * len(names) and n < max_rounds):
        one_round(warmup + n, True)
        n += 1
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of times[a] / times[b] (from alternate_ms): how many times faster
    b ran than a, each round's pair timed side by side."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def _fwd(fn, inputs):
    return lambda: fn(*inputs)


def pass_callable(case: Case, pass_name: str, fn: Callable[..., object]) -> Callable[[], object]:
    """One timed call of `fn` (case.fast, case.eager or a compiled eager) as run_case makes it:
    "fwd" runs fn on the case's inputs (run_case calls it under torch.no_grad()); "fwd+bwd"
    also backpropagates the sum of the outputs' means into the case's grad inputs and clears
    their gradients."""
    if pass_name == "fwd":
        return _fwd(fn, case.inputs)
    return _fwd_bwd(fn, case.inputs, case.grad_inputs)


@contextlib.contextmanager
def restored_env(*names: str) -> Iterator[None]:
    """Restores the environment variables `names` on exit (for scripts that switch a kernel
    option per call, e.g. LATENTFAST_STREAM_STORES)."""
    saved = {n: os.environ.get(n) for n in names}
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _fwd_bwd(fn, inputs, grad_idx):
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]

    def run():
        outs = fn(*leaves)
        loss = sum(o.float().mean() for o in outs)
        loss.backward()
        for t in leaves:
            t.grad = None
    return run


def _max_rel_err(fast, eager) -> float:
    err = 0.0
    for a, b in zip(fast, eager):
        denom = b.double().abs().max().item() or 1.0
        err = max(err, (a.double() - b.double()).abs().max().item() / denom)
    return err


def _peak_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None  # no allocator statistics for CPU tensors
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(case: Case, device: torch.device, quick: bool, budget_s: float | None = None) -> list[dict]:
    """The rows of one case (one per pass). budget_s: seconds of timing per implementation
    and pass after the minimum number of rounds (default 3, or 0.5 when quick)."""
    compiled = torch.compile(case.eager) if case.compile else None
    with torch.no_grad():
        err = _max_rel_err(case.fast(*case.inputs), case.eager(*case.inputs))
    reps, budget = (5, 0.5) if quick else (15, 3.0)
    if budget_s is not None:
        budget = budget_s
    rows = []
    for pass_name in case.passes:
        make = lambda fn: pass_callable(case, pass_name, fn)  # noqa: E731
        fns = {"eager": make(case.eager), "latentfast": make(case.fast)}
        if compiled is not None:
            fns["compile"] = make(compiled)
        fns.update({f"extra:{name}": make(fn) for name, fn in case.extras.items()})
        med = time_interleaved_ms(fns, device, reps, budget)
        t_eager, t_fast, t_compile = med["eager"], med["latentfast"], med.get("compile")
        row = {
            "op": case.op, "case": case.name, "pass": pass_name,
            "backend": backend.select(device),
            "eager_ms": round(t_eager, 4), "compile_ms": None if t_compile is None else round(t_compile, 4),
            "latentfast_ms": round(t_fast, 4),
            "speedup_vs_eager": round(t_eager / t_fast, 3),
            "speedup_vs_compile": None if t_compile is None else round(t_compile / t_fast, 3),
            "max_rel_err": float(f"{err:.3e}"),
            "timing": "interleaved rounds",
            "peak_mem_mb_eager": _peak_mb(make(case.eager), device),
            "peak_mem_mb_latentfast": _peak_mb(make(case.fast), device),
        }
        for name in case.extras:
            t_extra = med[f"extra:{name}"]
            row[f"{name}_ms"] = round(t_extra, 4)
            row[f"speedup_vs_{name}"] = round(t_extra / t_fast, 3)
        if pass_name == "fwd":
            row["min_bytes"] = case.bytes_moved
            row["achieved_gbps"] = round(case.bytes_moved / (t_fast * 1e-3) / 1e9, 2)
            row["achieved_gflops"] = round(case.flops / (t_fast * 1e-3) / 1e9, 2)
        rows.append(row)
    return rows


# Settings of the process's memory allocator that change CPU timings: glibc's malloc hands
# large blocks back to the OS when they are freed (mmap threshold, heap trimming), so every
# step of a loop that allocates big tensors first-touches fresh pages (minor page faults);
# these variables (or a preloaded jemalloc / tcmalloc) make it keep them. See
# docs/PERFORMANCE.md "The allocator and page faults".
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                 "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def allocator_settings() -> dict[str, str]:
    """The allocator settings of ALLOCATOR_ENV set in this process's environment (empty: the
    C library's defaults)."""
    return {k: os.environ[k] for k in ALLOCATOR_ENV if os.environ.get(k)}


def format_allocator(settings: dict[str, str], default: str) -> str:
    """allocator_settings() as one line of NAME=value, or `default` when none is set."""
    return " ".join(f"{k}={v}" for k, v in settings.items()) or default


def environment(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    ok, ver = backend.triton_status()
    info["triton"] = ver if ok else None
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        info["cpu_model"] = None
    info["allocator"] = allocator_settings()
    return info


def format_table(rows: list[dict]) -> str:
    # the case column as wide as the longest case name (40 to 56 characters; longer ones cut)
    cw = min(56, max([40] + [len(r["case"]) for r in rows]))
    head = f"{'case':<{cw}} {'pass':<8} {'eager ms':>9} {'compile ms':>10} {'latentfast ms':>13} " \
           f"{'x eager':>8} {'x compile':>9} {'max rel err':>11}"
    lines = [head, "-" * len(head)]
    num = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for r in rows:
        lines.append(f"{r['case'][:cw]:<{cw}} {r['pass']:<8} {num(r['eager_ms'], 9, 3)} "
                     f"{num(r['compile_ms'], 10, 3)} {r['latentfast_ms']:>13.3f} "
                     f"{num(r['speedup_vs_eager'], 8, 2)} {num(r['speedup_vs_compile'], 9, 2)} "
                     f"{r['max_rel_err']:>11.1e}")
        for key in r:
            if key.endswith("_ms") and key not in ("eager_ms", "compile_ms", "latentfast_ms"):
                name = key[:-3]
                lines.append(f"{'':<{cw}} {'':<8} {name}: {r[key]:.3f} ms, latentfast is "
                             f"{r['speedup_vs_' + name]:.2f}x faster")
        if "note" in r:
            lines.append(f"{'':<{cw}} {'':<8} {r['note']}")
    return "\n".join(lines)


def merge_rows(path: str, rows: list[dict], env: dict) -> tuple[int, int]:
    """Put `rows` into the results file at `path` (which keeps its top-level fields): a row
    with the same op, case and pass as a new one is replaced, the others are kept, new ones
    are appended. Merged rows carry 'measured' (this run's time) and 'cpu_model', since a
    results file gathers runs of different days. Returns (replaced, added)."""
    with open(path) as f:
        data = json.load(f)
    if data.get("device") != env["device"]:
        raise ValueError(f"{path} holds results for {data.get('device')!r}, this run is on {env['device']!r}")
    index = {(r["op"], r["case"], r["pass"]): i for i, r in enumerate(data["rows"])}
    replaced = added = 0
    for row in rows:
        row = {**row, "measured": env["time"], "cpu_model": env["cpu_model"]}
        key = (row["op"], row["case"], row["pass"])
        if key in index:
            data["rows"][index[key]] = row
            replaced += 1
        else:
            index[key] = len(data["rows"])
            data["rows"].append(row)
            added += 1
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return replaced, added


class UnknownCase(ValueError):
    """A name given to run_suite matches no benchmark op or case."""


def run_suite(ops: list[str] | None = None, device: str = "cpu", quick: bool = False,
              json_path: str | None = None, merge_path: str | None = None,
              budget_s: float | None = None) -> list[dict]:
    """Run every case (or those whose op or case name is in `ops`) and print the table; write
    the rows to `json_path` (a new file) and/or merge them into `merge_path` (see merge_rows)."""
    dev = torch.device(device)
    every = make_cases(dev, quick)
    geodesic_names = {"geodesic", "geodesics_1000"}
    if ops:
        known = {c.op for c in every} | {c.name for c in every} | geodesic_names
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise UnknownCase(f"no benchmark case matches {unknown}; op names: "
                              f"{', '.join(sorted({c.op for c in every} | {'geodesic'}))} (or a case name)")
    cases = [c for c in every if not ops or c.op in ops or c.name in ops]
    want_geodesics = not ops or bool(geodesic_names & set(ops))
    env = environment(dev)
    rows: list[dict] = []

    def write_json(complete: bool) -> None:
        # rewritten after every case, so a run cut off by a time limit keeps the rows it
        # finished ("complete": false until the last case is in)
        if json_path:
            tmp = f"{json_path}.part"
            with open(tmp, "w") as f:
                json.dump({**env, "quick": quick, "complete": complete, "rows": rows}, f, indent=1)
            os.replace(tmp, json_path)  # a kill mid-write leaves the previous file whole

    for case in tqdm(cases, desc=f"bench ({device})", unit="case"):
        rows.extend(run_case(case, dev, quick, budget_s))
        write_json(False)
    if want_geodesics:
        from latentfast.bench.geodesics import run_geodesics

        rows.append(run_geodesics(quick=quick, device=dev))
    alloc = format_allocator(env["allocator"], "defaults")
    print(f"device: {env['device']}  cpu: {env['cpu_model']}  torch {env['torch']}  triton {env['triton']}  "
          f"allocator: {alloc}")
    print(format_table(rows))
    if json_path:
        write_json(True)
        print(f"wrote {json_path}")
    if merge_path:
        if quick:
            raise ValueError("--merge-into takes full runs only (not --quick)")
        replaced, added = merge_rows(merge_path, rows, env)
        print(f"merged into {merge_path}: {replaced} rows replaced, {added} added")
    return rows
