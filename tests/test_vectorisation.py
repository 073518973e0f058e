"""The C++ kernels' `#pragma omp simd` loops vectorise in every instruction-set clone.

A float32 loop that GCC leaves scalar in one clone runs several times slower there with no
error and no wrong number: the standalone affine coupling's sigmoid loops were scalar in the
AVX2 and baseline clones (the op then ran slower than eager PyTorch on an AVX2 CPU), the
vector-flow inverse sweep in the baseline one. scripts/vec_report.py compiles a kernel source
with the extension's flags and reads GCC's vectoriser dump; these tests run it on every kernel
source built per clone (about 2 minutes of compiles in all, run side by side), loops outside
the clone namespaces included (the column "once"). scripts/test.sh runs those compiles in the
background during its first pass and passes their report in (LATENTFAST_VEC_REPORT_DIR).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import interpreting

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import vec_report  # noqa: E402

SOURCES = list(vec_report.SOURCES)


def _background_report(wait_s: float = 900.0) -> tuple[int, str] | None:
    """(exit status, output) of `vec_report.py --dtype float --check` on every source, as
    scripts/test.sh runs it in the background: it writes the output to report.txt and then
    its exit status to rc in LATENTFAST_VEC_REPORT_DIR. None when that variable is unset.
    Waits for rc up to wait_s."""
    folder = os.environ.get("LATENTFAST_VEC_REPORT_DIR")
    if not folder:
        return None
    rc = Path(folder) / "rc"
    deadline = time.monotonic() + wait_s
    while not rc.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"no vec_report result in {folder} after {wait_s:.0f} s")
        time.sleep(1.0)
    return int(rc.read_text()), (Path(folder) / "report.txt").read_text()


def _gcc() -> bool:
    if shutil.which("g++") is None:
        return False
    out = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in out  # GCC, not clang behind the name


def test_report_compiles_with_the_extensions_flags_and_knows_every_clone():
    """vec_report's flags are setup.py's compile flags (read there: checked here by a second
    reading of the file), its sources the kernel files built per clone, and its clone names
    common/isa.h's namespaces' suffixes."""
    setup = (ROOT / "setup.py").read_text()
    args = re.search(r"extra_compile_args=\[([^\]]*)\]", setup).group(1)
    assert set(re.findall(r'"([^"]+)"', args)) == set(vec_report.FLAGS)
    assert "-O3" in vec_report.FLAGS and "-fopenmp" in vec_report.FLAGS
    assert {"csrc/flows/glow_cpu.cpp", "csrc/flows/vector_flow_cpu.cpp", "csrc/geometry/geometry_cpu.cpp",
            "csrc/flows/lu_weight_cpu.cpp", "csrc/rnn/rnn_cpu.cpp"} <= set(SOURCES)
    for src in vec_report.SOURCES:
        text = (ROOT / src).read_text()
        assert "LF_TARGET_AVX2" in text and "LF_TARGET_AVX512" in text, src
    isa = (ROOT / "csrc" / "common" / "isa.h").read_text()
    assert '"base"' in isa and '"avx2"' in isa and '"avx512"' in isa
    assert vec_report.CLONES == ("base", "avx2", "avx512")
    loops = vec_report.simd_loops()
    assert any(f.endswith("glow_kernels.inc") for f, _ in loops)


@pytest.mark.slow
@pytest.mark.skipif(interpreting(), reason="a compiler check; the normal pass runs it")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _gcc(),
                    reason="the per-ISA clones are built on x86-64 with GCC")
def test_float_simd_loops_vectorise_in_every_clone(capsys):
    background = _background_report()
    if background is None:
        # every source at once, one compiler per core (one after another, the first pass spent
        # over 2 minutes here)
        assert vec_report.main([*SOURCES, "--dtype", "float", "--check"]) == 0, capsys.readouterr().out
        report = capsys.readouterr().out
    else:
        rc, report = background
        assert rc == 0, report
    rows = [line for line in report.splitlines() if line.startswith("csrc/")]
    for src in ("glow_kernels.inc", "lu_weight_kernels.inc", "vector_flow_kernels.inc", "geometry_kernels.inc",
                "lyapunov_kernels.inc", "rnn_cpu.cpp"):
        assert any(row.split(":")[0].endswith(src) for row in rows), (src, report)  # each file's loops found
    for row in rows:  # float columns: base, avx2, avx512, once ("-": no instance of the loop there)
        if row.endswith("(scalar on purpose)"):
            continue  # marked "vec_report: scalar" in the source: measured, see the comment there
        assert "scalar" not in row and " B" in row, row


def test_report_checks_loops_outside_the_clone_namespaces(monkeypatch, capsys):
    """A loop in a function outside the per-clone namespaces (compiled once; a non-template
    function names no dtype) is reported in the column "once" and fails --check when scalar.
    GCC's dump is stood in for, so this runs without a compiler."""
    f, line = next(loc for loc in vec_report.simd_loops() if loc[0] == "csrc/rnn/rnn_cpu.cpp")
    head = ";; Function latentfast::{anonymous}::gru_sequence_bwd(const at::Tensor&) (_ZN10latentfast)\n"
    scalar = (f"{ROOT / f}:{line}:46: missed: couldn't vectorize loop\n"
              f"{ROOT / f}:{line}:46: missed:   not vectorized: complicated access pattern.\n")
    monkeypatch.setattr(vec_report, "_compile", lambda src, tmp: head + scalar)
    assert vec_report.main([f, "--dtype", "float", "--check"]) == 1
    out = capsys.readouterr().out
    assert f"float32 loop {f}:{line} is scalar in the once clone: complicated access pattern" in out
    vectorised = f"{ROOT / f}:{line}:46: optimized: loop vectorized using 16 byte vectors\n"
    monkeypatch.setattr(vec_report, "_compile", lambda src, tmp: head + scalar + vectorised)
    assert vec_report.main([f, "--dtype", "float", "--check"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith(f"{f}:{line} "))
    assert row.split()[1:] == ["-", "-", "-", "16", "B"]


def test_report_from_the_background_run(tmp_path, monkeypatch):
    """The report scripts/test.sh's background run leaves: none without
    LATENTFAST_VEC_REPORT_DIR; its output and exit status once rc is written (a failed run's
    status reaches the check); a run that never finishes fails the test rather than hang."""
    monkeypatch.delenv("LATENTFAST_VEC_REPORT_DIR", raising=False)
    assert _background_report() is None
    monkeypatch.setenv("LATENTFAST_VEC_REPORT_DIR", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="no vec_report result"):
        _background_report(wait_s=0.1)
    (tmp_path / "report.txt").write_text("csrc/flows/glow_kernels.inc:10 scalar\n")
    (tmp_path / "rc").write_text("1\n")
    assert _background_report() == (1, "csrc/flows/glow_kernels.inc:10 scalar\n")
