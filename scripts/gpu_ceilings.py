"""The two ceilings of a CUDA device, measured as the benchmark rows are read against them:
device-to-device copy bandwidth (bytes read + written) and matrix-product rates (fp32 with
TF32 off, TF32, bf16), medians of CUDA-event timings after a warm-up, on random data.
Prints one line per ceiling; writes them as JSON to the path given (optional).

    python scripts/gpu_ceilings.py [out.json]
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latentfast.bench.runner import copy_bandwidth, cuda_events_ms  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_ceilings: no CUDA device; nothing measured")
        return 0
    dev = torch.device("cuda")
    out: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ms, out["copy_gbps"] = copy_bandwidth(dev)
    print(f"device-to-device copy, 1 GiB: {ms:.3f} ms, {out['copy_gbps']:.0f} GB/s (read + write)")
    n = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
        ms = cuda_events_ms(lambda: a @ b, 10, warmup=3)
        out[f"matmul_{name}_tflops"] = 2 * n ** 3 / ms / 1e9
        print(f"matmul {n}^3 {name}: {ms:.3f} ms, {out[f'matmul_{name}_tflops']:.0f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
