"""Call one C++ op in a loop, single-threaded, for instruction counts under valgrind (the
kernels' cost without the VM's timing noise; valgrind runs the AVX2 clone):

    valgrind --tool=cachegrind --cache-sim=no python scripts/op_loop.py lstm64 20
    cg_annotate cachegrind.out.<pid> | grep -E "rnn_|geom_|sgemm"

Run it from two trees (PYTHONPATH) to compare a change. Cases: gru64, gru256, lstm64,
lstm256 (T = 100, B = 64, I = 32, the bench's RNN shapes) and metric (pullback_metric,
2-256-256-784 tanh, N = 2048).
"""
from __future__ import annotations

import argparse

import torch

import latentfast
from latentfast.ops import geometry as geo_ops
from latentfast.ops import rnn as rnn_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["gru64", "gru256", "lstm64", "lstm256", "metric"])
    parser.add_argument("calls", type=int, nargs="?", default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.case == "metric":
        z = torch.randn(2048, 2)
        ws = [torch.randn(256, 2), 0.1 * torch.randn(256, 256), 0.1 * torch.randn(784, 256)]
        bs = [torch.zeros(256), torch.zeros(256), torch.zeros(784)]

        def call():
            return geo_ops.pullback_metric(z, ws, bs, [1, 1, 0])
    else:
        cell = "lstm" if args.case.startswith("lstm") else "gru"
        h = int(args.case[len(cell):])
        gates = 4 if cell == "lstm" else 3
        x = torch.randn(100, 64, 32)
        w = [0.2 * torch.randn(gates * h, 32), 0.2 * torch.randn(gates * h, h), 0.1 * torch.randn(gates * h),
             0.1 * torch.randn(gates * h)]

        def call():
            if cell == "lstm":
                return rnn_ops.lstm_sequence(x, None, *w)
            return rnn_ops.gru_sequence(x, None, *w)
    with latentfast.use_backend("cpp"), torch.no_grad():
        for _ in range(args.calls):
            call()


if __name__ == "__main__":
    main()
