"""The benchmark runner's timer: interleaved rounds with a rotating order, medians per callable.

A fake clock stands in for time.perf_counter, so nothing here depends on how fast the
machine is."""
from __future__ import annotations

import json
import re

import pytest
import torch

from latentfast.bench import runner
from tests.conftest import interpreting


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaved_rounds_rotate_and_give_medians(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)
    calls: list[str] = []
    # each callable advances the fake clock by its own cost; "b" has one slow outlier call
    costs = {"a": 0.002, "b": 0.005, "c": 0.001}
    n_calls = {"a": 0, "b": 0, "c": 0}

    def make(name):
        def fn():
            calls.append(name)
            n_calls[name] += 1
            clock.now += 1.0 if (name == "b" and n_calls[name] == 6) else costs[name]
        return fn

    med = runner.time_interleaved_ms({k: make(k) for k in "abc"}, torch.device("cpu"), min_reps=7, budget_s=0.0)
    timed = calls[9:]  # after 3 warm-up calls of each
    assert len(timed) == 7 * 3
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c", "a"]  # the order rotates
    assert med == pytest.approx({"a": 2.0, "b": 5.0, "c": 1.0})  # medians: the outlier drops out


def test_interleaved_rounds_stop_at_the_budget(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)

    def fn():
        clock.now += 0.125  # exact in binary, so the clock sums without rounding

    med = runner.time_interleaved_ms({"x": fn, "y": fn}, torch.device("cpu"), min_reps=2, budget_s=1.0)
    assert med == pytest.approx({"x": 125.0, "y": 125.0})
    # warm-up 6 calls, then 2 callables x 1.0 s of budget at 0.25 s a round: 8 rounds
    assert clock.now == 6 * 0.125 + 8 * 0.25


def test_alternate_rounds_rotate_pair_the_calls_and_leave_before_untimed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)
    log: list[str] = []
    n = {"calls": 0}

    def make(name, cost_ms):
        def fn():
            rnd = n["calls"] // 2  # the machine slows down round by round; "b" costs half of "a"
            n["calls"] += 1
            log.append(name)
            clock.now += cost_ms * (1 + rnd) / 1e3
        return fn

    def before(name):
        log.append(f"before {name}")
        clock.now += 1.0  # not counted

    times = runner.alternate_ms({"a": make("a", 4.0), "b": make("b", 2.0)}, rounds=5, warmup=2, before=before)
    assert log[:4] == ["before a", "a", "before b", "b"] and log[4:8] == ["before b", "b", "before a", "a"]
    assert len(log) == 2 * 2 * 7
    assert times["a"] == pytest.approx([4.0 * r for r in range(3, 8)])  # the 2 warm-up rounds left out
    assert times["b"] == pytest.approx([2.0 * r for r in range(3, 8)])
    assert runner.median_ratio(times, "a", "b") == pytest.approx(2.0)
    with pytest.raises(ValueError):
        runner.median_ratio({"a": [1.0], "b": [1.0, 2.0]}, "a", "b")


def test_merge_rows_replaces_matching_rows_and_keeps_the_rest(tmp_path):
    from latentfast.bench.runner import merge_rows

    def row(op, case, pas, ms):
        return {"op": op, "case": case, "pass": pas, "latentfast_ms": ms}

    path = tmp_path / "cpu.json"
    old = {"device": "cpu: x", "time": "T0", "note": "kept",
           "rows": [row("a", "a1", "fwd", 1.0), row("a", "a1", "fwd+bwd", 2.0), row("b", "b1", "fwd", 3.0)]}
    path.write_text(json.dumps(old))
    env = {"device": "cpu: x", "time": "T1", "cpu_model": "M"}
    replaced, added = merge_rows(str(path), [row("a", "a1", "fwd+bwd", 20.0), row("c", "c1", "fwd", 5.0)], env)
    data = json.loads(path.read_text())
    assert (replaced, added) == (1, 1)
    assert data["note"] == "kept" and data["time"] == "T0"
    assert [(r["op"], r["pass"], r["latentfast_ms"]) for r in data["rows"]] == [
        ("a", "fwd", 1.0), ("a", "fwd+bwd", 20.0), ("b", "fwd", 3.0), ("c", "fwd", 5.0)]
    assert data["rows"][1]["measured"] == "T1" and data["rows"][1]["cpu_model"] == "M"
    assert "measured" not in data["rows"][0]
    with pytest.raises(ValueError, match="results for"):
        merge_rows(str(path), [row("a", "a1", "fwd", 0.5)], {**env, "device": "cuda: y"})


def test_suite_json_keeps_the_finished_cases_when_a_run_is_cut_off(tmp_path, monkeypatch):
    # the GPU check runs each group under a time limit: rows already timed must survive a
    # run that is killed (here: a case that raises) before the table is printed
    from types import SimpleNamespace

    cases = [SimpleNamespace(op="op", name=f"case{i}") for i in range(3)]
    monkeypatch.setattr(runner, "make_cases", lambda dev, quick: cases)

    def fake_run_case(case, dev, quick, budget_s=None):
        if case.name == "case2":
            raise KeyboardInterrupt  # what a SIGINT from `timeout -s INT` looks like in Python
        return [{"op": case.op, "case": case.name, "pass": "fwd", "eager_ms": 2.0, "compile_ms": None,
                 "latentfast_ms": 1.0, "speedup_vs_eager": 2.0, "speedup_vs_compile": None, "max_rel_err": 0.0}]

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    path = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        runner.run_suite(["op"], "cpu", quick=True, json_path=str(path))
    data = json.loads(path.read_text())
    assert data["complete"] is False
    assert [r["case"] for r in data["rows"]] == ["case0", "case1"]
    assert data["device"].startswith("cpu")

    monkeypatch.setattr(runner, "make_cases", lambda dev, quick: cases[:2])
    runner.run_suite(["op"], "cpu", quick=True, json_path=str(path))
    data = json.loads(path.read_text())
    assert data["complete"] is True and len(data["rows"]) == 2


def test_bench_budget_reaches_the_timer(monkeypatch):
    from latentfast.__main__ import main
    from latentfast.bench.cases import Case

    seen: list[float] = []

    def fake_timer(fns, device, min_reps, budget_s, max_rounds=200):
        seen.append(budget_s)
        return {name: 1.0 for name in fns}

    monkeypatch.setattr(runner, "time_interleaved_ms", fake_timer)
    x = torch.randn(3)
    case = Case("op", "c", (x,), lambda t: (t * 2,), lambda t: (t + t,), (0,), 24, 3, compile=False)
    monkeypatch.setattr(runner, "make_cases", lambda dev, quick: [case])
    runner.run_suite(["op"], "cpu", quick=False)
    runner.run_suite(["op"], "cpu", quick=True)
    main(["bench", "--device", "cpu", "--ops", "op", "--budget", "0.25"])
    assert seen == [3.0, 3.0, 0.5, 0.5, 0.25, 0.25]  # fwd and fwd+bwd per run
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu", "--ops", "op", "--budget", "-1"])


def test_bench_unknown_names_are_refused_with_the_known_ones(monkeypatch, capsys):
    """A misspelt name in --ops is an argparse error listing the op names, also next to a
    known one (which alone would have run, silently dropping the other)."""
    from latentfast.__main__ import main
    from latentfast.bench.cases import Case

    x = torch.randn(3)
    case = Case("op", "c", (x,), lambda t: (t * 2,), lambda t: (t + t,), (0,), 24, 3, compile=False)
    monkeypatch.setattr(runner, "make_cases", lambda dev, quick: [case])
    monkeypatch.setattr(runner, "time_interleaved_ms", lambda fns, *a, **k: {name: 1.0 for name in fns})
    for ops in (["nope"], ["op", "nope"]):
        with pytest.raises(runner.UnknownCase, match=r"\['nope'\]; op names: geodesic, op"):
            runner.run_suite(ops, "cpu", quick=True)
        with pytest.raises(SystemExit):
            main(["bench", "--device", "cpu", "--ops", *ops])
        assert "no benchmark case matches ['nope']" in capsys.readouterr().err
    assert runner.run_suite(["c"], "cpu", quick=True)  # a case name is known too


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_results_merge_the_groups_with_their_shares_of_the_ceilings(tmp_path, capsys):
    import tarfile

    mod = _script("gpu_results")
    assert mod.results_name("NVIDIA H200") == "h200"
    assert mod.results_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    src = tmp_path / "src"
    src.mkdir()
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12", "time": "T1",
           "cpu_model": "X"}

    def row(case, pas, ms, gbps=None, gflops=None):
        r = {"op": "op", "case": case, "pass": pas, "latentfast_ms": ms, "speedup_vs_eager": 2.0,
             "speedup_vs_compile": None}
        if gbps is not None:
            r.update(achieved_gbps=gbps, achieved_gflops=gflops)
        return r

    (src / "ceilings.json").write_text(json.dumps({"copy_gbps": 4000.0, "matmul_fp32_tflops": 50.0,
                                                   "matmul_tf32_tflops": 400.0}))
    (src / "bench_glow.json").write_text(json.dumps({**env, "complete": True, "rows": [
        row("a", "fwd", 1.0, 3000.0, 1000.0), row("a", "fwd+bwd", 2.0)]}))
    (src / "bench_rnn.json").write_text(json.dumps({**env, "complete": False, "rows": [row("b", "fwd", 3.0)]}))
    (src / "glow_bandwidth.json").write_text(json.dumps({"device": "NVIDIA H200", "copy_gbps": 4000.0,
                                                        "rows": [{"variant": "kernel", "graph_gbps": 3000.0}]}))
    tgz = tmp_path / "gpu_check.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for p in src.iterdir():
            tar.add(p, arcname=p.name)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    assert mod.main([str(tgz), "--out-dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "merged 3 rows" in text and "cut off at their time limit (rows kept so far): rnn" in text
    data = json.loads((out_dir / "h200.json").read_text())
    assert data["device"] == "NVIDIA H200" and data["ceilings"]["copy_gbps"] == 4000.0
    assert data["glow_step_bandwidth"]["rows"] == [{"variant": "kernel", "graph_gbps": 3000.0}]
    fwd = data["rows"][0]
    assert (fwd["case"], fwd["pass"]) == ("a", "fwd")
    assert fwd["share_of_copy_bw"] == pytest.approx(0.75)
    assert fwd["share_of_fp32_matmul"] == pytest.approx(0.02) and fwd["share_of_tf32_matmul"] == pytest.approx(0.0025)
    assert "share_of_copy_bw" not in data["rows"][1]
    # a second call (a rerun of one group) replaces its rows and keeps the others
    (src / "bench_glow.json").unlink()
    (src / "bench_rnn.json").write_text(json.dumps({**env, "time": "T2", "complete": True,
                                                   "rows": [row("b", "fwd", 2.5)]}))
    mod.main([str(src), "--out-dir", str(out_dir)])
    data = json.loads((out_dir / "h200.json").read_text())
    assert [(r["case"], r["latentfast_ms"], r["measured"]) for r in data["rows"]] == [
        ("a", 1.0, "T1"), ("a", 2.0, "T1"), ("b", 2.5, "T2")]
    # CPU rows are refused (they belong in cpu.json, through --merge-into)
    (src / "bench_rnn.json").write_text(json.dumps({**env, "device": "cpu: x86_64 (2 threads)", "rows": []}))
    with pytest.raises(SystemExit, match="CUDA device"):
        mod.main([str(src), "--out-dir", str(out_dir)])


def test_glow_bandwidth_script_dry_run(tmp_path, backend):
    """scripts/glow_gpu_bandwidth.py on the CPU (its dry run): every variant timed, the op
    checked against the float64 eager step, the kernel variant only where Triton runs."""
    mod = _script("glow_gpu_bandwidth")
    out = tmp_path / "glow.json"
    assert mod.main(["--device", "cpu", "--small", "--no-compile", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == backend and data["copy_gbps"] is None
    variants = [r["variant"] for r in data["rows"]]
    assert variants == ["copy"] + (["kernel"] if backend == "triton" else []) + ["op", "step", "eager"]
    for r in data["rows"]:
        assert "error" not in r and r["sync_ms"] > 0 and r["bytes"] == 3 * 2 * 8 * 5 * 5 * 4
    op = next(r for r in data["rows"] if r["variant"] == "op")
    assert op["rel_err_y"] < 1e-5 and op["rel_err_logdet"] < 1e-5


@pytest.mark.skipif(interpreting(), reason="times whole models; the interpreted kernels are checked elsewhere")
def test_glow_channels_last_script_times_the_four_variants(capsys):
    """scripts/glow_channels_last.py on the bench's --quick Glow: the four variants (layout x
    backend) timed and the ratios printed."""
    mod = _script("glow_channels_last")
    assert mod.main(["--quick", "--rounds", "2", "--fwd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("glow_model 3x8x8 L=2 K=2 hidden=16 N=2, fwd, 2 rounds, cpu, allocator: ")
    for name in ("reference", "reference channels_last", "latentfast", "latentfast channels_last"):
        assert re.search(rf"^  {name} +\d+\.\d ms$", out, re.M), (name, out)
    assert re.search(r"channels_last over contiguous: reference \d\.\d{3}x, latentfast \d\.\d{3}x", out)
    with pytest.raises(SystemExit):
        mod.main(["--rounds", "0"])


def test_demo_refuses_epochs_below_one(capsys):
    from latentfast.__main__ import main

    for name in ("geodesics", "dynamics", "betavae"):
        with pytest.raises(SystemExit):
            main(["demo", name, "--epochs", "0"])
        assert "--epochs must be >= 1" in capsys.readouterr().err


def test_command_line_output_to_a_closed_pipe_ends_quietly():
    """`python -m latentfast info | head -1`: a reader gone away ends the command with status 1
    and nothing on stderr (it printed a BrokenPipeError traceback). The pipe's read end is
    closed before the command starts, so its first flush meets the closed pipe."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "latentfast", "info"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr


def test_environment_records_the_allocator_settings(monkeypatch):
    # glibc's malloc settings change CPU timings (page faults on fresh blocks), so a results
    # file says which were in effect: only those set, none for the C library's defaults
    for k in runner.ALLOCATOR_ENV:
        monkeypatch.delenv(k, raising=False)
    assert runner.environment(torch.device("cpu"))["allocator"] == {}
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "")  # empty: not a setting
    assert runner.environment(torch.device("cpu"))["allocator"] == {
        "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def test_page_faults_script_counts_first_touched_pages():
    import mmap

    mod = _script("page_faults")
    pages = 64
    kept = bytearray(pages * 4096)

    def fresh():  # a new anonymous mapping per call: every page touched is a minor fault
        m = mmap.mmap(-1, pages * 4096)
        for i in range(pages):
            m[i * 4096] = 1
        m.close()

    def reused():  # pages mapped and touched before the timed calls: no faults
        for i in range(pages):
            kept[i * 4096] = 1

    faults, ms = mod.faults_per_call(fresh, 5)
    assert faults >= pages and ms > 0
    assert mod.faults_per_call(reused, 5)[0] < pages / 4


def test_info_prints_the_allocator_settings(monkeypatch, capsys):
    from latentfast.__main__ import info

    for k in runner.ALLOCATOR_ENV:
        monkeypatch.delenv(k, raising=False)
    info()
    assert "CPU allocator: the C library defaults" in capsys.readouterr().out
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    info()
    assert "CPU allocator: MALLOC_TRIM_THRESHOLD_=1073741824\n" in capsys.readouterr().out


def test_model_cases_compare_the_reference_backend_with_the_kernels():
    """The end-to-end cases (a Glow, an IAF-posterior VAE): eager runs every latentfast op in
    plain PyTorch (the reference backend), latentfast the same model with its kernels, both
    draw the same noise and give the same loss."""
    from torch.profiler import profile

    from latentfast import backend
    from latentfast.bench.cases import model_cases

    if backend.select(torch.device("cpu")) != "cpp":
        pytest.skip("checks the C++ kernels' op names (the cpp backend)")
    cases = model_cases(torch.device("cpu"), quick=True)
    assert [c.op for c in cases] == ["glow_model", "glow_model", "flow_vae_model"]
    # the second Glow is the first with its parameters in channels_last: the same loss
    assert cases[1].name == cases[0].name + " channels_last"
    weights = [m.weight for m in cases[1].model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)  # (a 1 x 1 convolution's weight is both)
    torch.testing.assert_close(cases[1].eager(*cases[1].inputs)[0], cases[0].eager(*cases[0].inputs)[0])
    kernel = {"glow_model": "latentfast_cpp::actnorm_invconv_fwd", "flow_vae_model": "latentfast_cpp::vector_flow"}
    for case in cases:
        used = {}
        for name, fn in (("eager", case.eager), ("fast", case.fast)):
            with torch.no_grad(), profile() as prof:
                out, = fn(*case.inputs)
            used[name] = {e.key for e in prof.key_averages() if e.key.startswith("latentfast")}
            torch.testing.assert_close(out, case.eager(*case.inputs)[0], rtol=1e-5, atol=1e-5)
        assert used["eager"] == set(), (case.op, used["eager"])
        assert any(k.startswith(kernel[case.op]) for k in used["fast"]), (case.op, used["fast"])
        assert case.flops > 0 and case.compile is False
        # the loss with noise: two calls of one implementation agree (the noise is reseeded)
        torch.testing.assert_close(case.fast(*case.inputs)[0], case.fast(*case.inputs)[0], rtol=0, atol=0)


def test_format_table_fits_the_case_names():
    def row(case):
        return {"case": case, "pass": "fwd", "eager_ms": 2.0, "compile_ms": None, "latentfast_ms": 1.0,
                "speedup_vs_eager": 2.0, "speedup_vs_compile": None, "max_rel_err": 0.0}

    name = "glow_model 3x32x32 L=3 K=8 hidden=128 N=16"  # 42 characters: whole
    lines = runner.format_table([row("short"), row(name)]).splitlines()
    assert lines[3].startswith(name + " fwd")
    assert len({len(line) for line in lines}) == 1  # one width for the header, rule and rows
    long = "x" * 70  # cut at 56
    assert runner.format_table([row(long)]).splitlines()[2].startswith("x" * 56 + " fwd")
