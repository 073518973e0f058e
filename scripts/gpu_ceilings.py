"""The two ceilings of a CUDA device, measured as the benchmark rows are read against them:
device-to-device copy bandwidth (bytes read + written) and matrix-product rates (fp32 with
TF32 off, TF32, bf16), medians of CUDA-event timings after a warm-up, on random data.
Prints one line per ceiling; writes them as JSON to the path given (optional).

    python scripts/gpu_ceilings.py [out.json]
"""
from __future__ import annotations

import json
import statistics
import sys

import torch


def _time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_ceilings: no CUDA device; nothing measured")
        return 0
    dev = torch.device("cuda")
    out: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    src = torch.randn(1 << 28, device=dev)  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    print(f"device-to-device copy, 1 GiB: {ms:.3f} ms, {out['copy_gbps']:.0f} GB/s (read + write)")
    n = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
        ms = _time_ms(lambda: a @ b, reps=10)
        out[f"matmul_{name}_tflops"] = 2 * n ** 3 / ms / 1e9
        print(f"matmul {n}^3 {name}: {ms:.3f} ms, {out[f'matmul_{name}_tflops']:.0f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
