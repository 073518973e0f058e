"""Turns what scripts/gpu_check.sh brought back (gpu_check.tgz, or the folder it unpacks to)
into benchmarks/results/<gpu>.json: the bench rows of every group merged into that file by
op, case and pass (latentfast.bench.runner.merge_rows; the file is made on the first run),
the ceilings measured in the same call (scripts/gpu_ceilings.py) at its top, and on each row
that counts bytes or flops its share of those ceilings: achieved_gbps over the copy
bandwidth (read + write) and achieved_gflops over the fp32 and tf32 matrix-product rates;
the fused Glow step's timings (scripts/glow_gpu_bandwidth.py) as "glow_step_bandwidth".
Prints a table of the merged rows and names the groups cut off at their time limit.

    python scripts/gpu_results.py gpu_check.tgz [--out-dir benchmarks/results]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latentfast.bench.runner import merge_rows  # noqa: E402


def results_name(device: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = re.sub(r"^nvidia\s+", "", device.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def with_shares(row: dict, ceilings: dict) -> dict:
    row = dict(row)
    if row.get("achieved_gbps") is not None and ceilings.get("copy_gbps"):
        row["share_of_copy_bw"] = round(row["achieved_gbps"] / ceilings["copy_gbps"], 4)
    for kind in ("fp32", "tf32"):
        rate = ceilings.get(f"matmul_{kind}_tflops")
        if row.get("achieved_gflops") is not None and rate:
            row[f"share_of_{kind}_matmul"] = round(row["achieved_gflops"] / (rate * 1e3), 4)
    return row


def collect(folder: str, out_dir: str) -> tuple[str, list[dict], list[str]]:
    """Merge folder's bench_*.json into out_dir/<gpu>.json. Returns (path, rows, cut-off groups)."""
    ceilings = {}
    if os.path.exists(os.path.join(folder, "ceilings.json")):
        with open(os.path.join(folder, "ceilings.json")) as f:
            ceilings = json.load(f)
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "bench_*.json"))):
        with open(path) as f:
            runs.append((os.path.basename(path)[6:-5], json.load(f)))
    if not runs:
        raise SystemExit(f"no bench_*.json in {folder}")
    devices = {data["device"] for _, data in runs}
    if len(devices) != 1 or next(iter(devices)).startswith("cpu"):
        raise SystemExit(f"expected the runs of one CUDA device, got {sorted(devices)}")
    device = devices.pop()
    out = os.path.join(out_dir, results_name(device) + ".json")
    first = runs[0][1]
    if not os.path.exists(out):
        head = {k: first.get(k) for k in ("device", "torch", "triton", "python", "time", "cpu_model")}
        with open(out, "w") as f:
            json.dump({**head, "rows": []}, f, indent=1)
    cut_off, merged = [], []
    for group, data in runs:
        if data.get("complete") is False:
            cut_off.append(group)
        rows = [with_shares(r, ceilings) for r in data["rows"]]
        env = {"device": device, "time": data.get("time"), "cpu_model": data.get("cpu_model")}
        merge_rows(out, rows, env)
        merged.extend(rows)
    extra_path = os.path.join(folder, "glow_bandwidth.json")
    if ceilings or os.path.exists(extra_path):
        with open(out) as f:
            data = json.load(f)
        if ceilings:
            data["ceilings"] = {**ceilings, "measured": first.get("time")}
        if os.path.exists(extra_path):  # scripts/glow_gpu_bandwidth.py: per call, back to back, CUDA graph
            with open(extra_path) as f:
                data["glow_step_bandwidth"] = {**json.load(f), "measured": first.get("time")}
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
    return out, merged, cut_off


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="gpu_check.tgz or the folder it unpacks to")
    parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.source
        if os.path.isfile(folder):
            with tarfile.open(folder) as tar:
                tar.extractall(tmp, filter="data")
            folder = tmp
        out, rows, cut_off = collect(folder, args.out_dir)
    print(f"merged {len(rows)} rows into {out}")
    for r in rows:
        share = r.get("share_of_copy_bw")
        print(f"{r['case'][:48]:<48} {r['pass']:<8} {r['latentfast_ms']:>10.4f} ms  "
              f"x eager {r['speedup_vs_eager']:>7.2f}  x compile "
              f"{'-' if r.get('speedup_vs_compile') is None else format(r['speedup_vs_compile'], '.2f'):>6}"
              + ("" if share is None else f"  {100 * share:.0f}% of copy bw"))
    if cut_off:
        print(f"cut off at their time limit (rows kept so far): {', '.join(cut_off)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
