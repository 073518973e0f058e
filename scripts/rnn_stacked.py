"""Stacked and bidirectional latentfast.rnn.GRU / LSTM against torch.nn.GRU / nn.LSTM with the
same weights, on this machine's CPU (or --device cuda).

Each module runs one fused sequence call per layer and direction; torch.nn runs its own
(oneDNN / native on CPU, cuDNN on GPU). For T=64, B=64, I=32, H=128 and (num_layers,
bidirectional) in (1, False), (2, False), (2, True): forward (no grad) and forward+backward
(the sum of the output), medians of --reps calls, the two modules alternating in --rounds
rounds; prints each round's ratio nn / latentfast (above 1: latentfast faster).

    python scripts/rnn_stacked.py [--rounds 3] [--reps 15] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from latentfast.bench.runner import median_ms
from latentfast.rnn import GRU, LSTM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = dev if dev.type == "cuda" else None
    t, b, n_in, hs = 64, 64, 32, 128
    print(f"T={t} B={b} I={n_in} H={hs} float32 on {dev}; ms are medians of {args.reps} calls")
    for cls in (GRU, LSTM):
        for layers, bi in ((1, False), (2, False), (2, True)):
            torch.manual_seed(0)
            ours = cls(n_in, hs, num_layers=layers, bidirectional=bi).to(dev)
            ref = getattr(nn, cls.__name__)(n_in, hs, num_layers=layers, bidirectional=bi).to(dev)
            ref.load_state_dict(ours.state_dict())
            x = torch.randn(t, b, n_in, device=dev)

            def fwd(m):
                with torch.no_grad():
                    return m(x)

            def fwd_bwd(m):
                m(x)[0].sum().backward()

            rows = {"fwd": [], "fwd+bwd": []}
            for _ in range(args.rounds):
                for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    mine = median_ms(lambda: fn(ours), args.reps, device=sync)
                    theirs = median_ms(lambda: fn(ref), args.reps, device=sync)
                    rows[name].append((mine, theirs))
            label = f"{cls.__name__} num_layers={layers} bidirectional={bi}"
            for name, pairs in rows.items():
                text = ", ".join(f"{m:.2f} / {r:.2f} ms ({r / m:.2f}x)" for m, r in pairs)
                print(f"{label:38s} {name:8s} latentfast / torch.nn: {text}")


if __name__ == "__main__":
    main()
