"""Which `#pragma omp simd` loops of the C++ kernels GCC vectorises, per instruction-set clone.

The kernel files are compiled once per clone (csrc/common/isa.h: baseline, AVX2+FMA,
AVX-512), and a loop that vectorises in one clone can stay scalar in another: the standalone
affine coupling's sigmoid loops did in the AVX2 and baseline clones (GCC's PRE gave them a
second exit), which made the op 4x slower there than vectorised and slower than eager
PyTorch on an AVX2 CPU. This compiles each kernel source with the extension's flags and GCC's
vectoriser dump (-fdump-tree-vect-optimized-missed; nothing is linked or installed), and
prints, for every `#pragma omp simd` loop, the vector size it got in each clone's float32 and
float64 instances, or "scalar" with GCC's reason; loops in code outside the clone namespaces
(compiled once, with the baseline flags) are in the column "once".

    python scripts/vec_report.py                 # all kernel sources (about 1 minute on 2 cores)
    python scripts/vec_report.py csrc/flows/glow_cpu.cpp --dtype float
    python scripts/vec_report.py --check         # exit 1 if a float32 loop stays scalar in a clone

float64 loops that call libm (exp, log1p, tanh) stay scalar by design: double is the checking
dtype (csrc/flows/vec_math.inc). A loop with "vec_report: scalar" in a comment in the four
lines above its pragma is scalar on purpose (measured) and does not fail --check.
"""
from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLONES = ("base", "avx2", "avx512")
# code outside the per-clone namespaces, compiled once with the extension's baseline flags
ONCE = "once"


def _setup_flags() -> tuple[str, ...]:
    """The literal list of setup.py's extra_compile_args (its debug-info flag added to it aside)."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extra_compile_args":
            value = node.value.left if isinstance(node.value, ast.BinOp) else node.value
            return tuple(ast.literal_eval(value))
    raise RuntimeError("setup.py has no extra_compile_args")


FLAGS = _setup_flags()
# the kernel sources compiled once per clone (the files that open an LF_TARGET_AVX2 region)
SOURCES = tuple(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*.cpp"))
                if "LF_TARGET_AVX2" in p.read_text())


ACCEPTED = "vec_report: scalar"  # in a comment just above the pragma: scalar on purpose, measured


def simd_loops(root: pathlib.Path = ROOT) -> list[tuple[str, int]]:
    """(path relative to root, line) of each loop right after a `#pragma omp simd` in csrc/."""
    return [loc for loc, _ in _simd_loops(root)]


def _simd_loops(root: pathlib.Path) -> list[tuple[tuple[str, int], bool]]:
    loops = []
    for path in sorted((root / "csrc").rglob("*")):
        if path.suffix not in (".inc", ".cpp", ".h"):
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            # with or without clauses (reduction(...)) and a trailing comment
            if re.match(r"#pragma omp simd\b", line.strip()) and lines[i + 1].lstrip().startswith("for"):
                above = " ".join(lines[max(0, i - 4):i])
                loops.append(((str(path.relative_to(root)), i + 2), ACCEPTED in above))
    return loops


def _compile(source: str, out_dir: str) -> str:
    import torch.utils.cpp_extension as ext

    cmd = ["g++", "-std=c++17", *FLAGS, "-fPIC", "-w", f"-I{ROOT / 'csrc'}",
           *(f"-I{p}" for p in ext.include_paths()), f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_C", "-c", str(ROOT / source), "-o", os.path.join(out_dir, "k.o"),
           "-fdump-tree-vect-optimized-missed", "-dumpdir", out_dir + "/"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    dumps = sorted(pathlib.Path(out_dir).glob("*.vect"))
    if not dumps:
        raise RuntimeError(f"g++ wrote no vectoriser dump for {source} in {out_dir}")
    return dumps[0].read_text(errors="replace")


def parse(dump: str) -> dict:
    """{(file, line): {(clone, dtype): ('vector', bytes) | ('scalar', reason)}} for the loops
    of csrc/ reported in functions of a per-clone namespace (..._base::, ..._avx2::,
    ..._avx512::) and, as clone ONCE, in latentfast's functions outside them."""
    out: dict = collections.defaultdict(dict)
    clone = dtype = None
    msg = re.compile(r"^(\S+?):(\d+):\d+: (optimized|missed): +(.*)$")
    for line in dump.splitlines():
        if line.startswith(";; Function "):
            name = line[len(";; Function "):].split(" (")[0]
            m = re.search(r"_(base|avx2|avx512)::", name)
            clone = m.group(1) if m else (ONCE if "latentfast::" in name else None)
            dtype = "float" if "<float" in name else ("double" if "<double" in name else "-")
            continue
        m = msg.match(line)
        if not m or clone is None:
            continue
        path = pathlib.Path(m.group(1))
        if path.is_absolute():
            if ROOT not in path.resolve().parents:
                continue  # a system or torch header
            path = path.resolve().relative_to(ROOT)
        loc = (path.as_posix(), int(m.group(2)))
        key, text = (clone, dtype), m.group(4)
        got = out[loc].get(key)
        v = re.match(r"loop vectorized using (\d+) byte vectors", text)
        if v:
            size = int(v.group(1))
            if not got or got[0] != "vector" or size > got[1]:
                out[loc][key] = ("vector", size)
        elif (not got or (got[0] == "scalar" and got[1] == "")) and text.startswith("not vectorized"):
            out[loc][key] = ("scalar", text[len("not vectorized: "):].strip(". "))
        elif not got and text.startswith("couldn't vectorize loop"):
            out[loc][key] = ("scalar", "")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="*", default=list(SOURCES))
    ap.add_argument("--dtype", choices=("float", "double", "both"), default="both")
    ap.add_argument("--check", action="store_true", help="exit 1 if a float32 omp-simd loop is scalar in a clone")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compilers run at once, one source each (default: the CPU count)")
    args = ap.parse_args(argv)
    loops = _simd_loops(ROOT)

    def report(src: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"compiling {src} ...", file=sys.stderr, flush=True)
            return parse(_compile(src, tmp))

    results: dict = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for parsed in pool.map(report, args.sources):  # in the sources' order
            for loc, per in parsed.items():
                results.setdefault(loc, {}).update(per)
    dtypes = ("float", "double") if args.dtype == "both" else (args.dtype,)
    bad = []
    columns = (*CLONES, ONCE)
    print(f"{'loop (after #pragma omp simd)':44s} " + " ".join(f"{c + ' ' + d:>14s}" for d in dtypes for c in columns)
          + f"   ({ONCE}: outside the per-clone namespaces, built with the baseline flags)")
    for loc, accepted in loops:
        # GCC names a loop by its header or by the first statement of its body
        per = {}
        for line in range(loc[1] + 3, loc[1] - 1, -1):
            per.update(results.get((loc[0], line), {}))
        if not per:
            continue  # not in the sources compiled (or inlined away)
        cells = []
        for d in dtypes:
            for c in columns:
                # a function outside the clones that is no template (an AT_DISPATCH lambda
                # inlined into it) names no dtype: its float and double instances share a cell
                r = per.get((c, d)) or (per.get((c, "-")) if c == ONCE else None)
                cells.append("-" if r is None else (f"{r[1]} B" if r[0] == "vector" else "scalar"))
                if r is not None and r[0] == "scalar" and d == "float" and not accepted:
                    bad.append((loc, c, r[1]))
        print(f"{loc[0] + ':' + str(loc[1]):44s} " + " ".join(f"{x:>14s}" for x in cells)
              + ("  (scalar on purpose)" if accepted else ""))
    for (f, line), c, why in bad:
        print(f"float32 loop {f}:{line} is scalar in the {c} clone: {why or 'see the dump'}")
    if args.check and bad:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
