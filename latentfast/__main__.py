"""Command line: ``python -m latentfast info | bench | demo``."""
from __future__ import annotations

import argparse
import os
import sys

import torch


def info() -> None:
    """Versions, devices, whether the C++ extension is built, and each op's backend."""
    from latentfast import _ext, backend

    ok, tv = backend.triton_status()
    print(f"torch {torch.__version__}   triton {tv if ok else 'not available: ' + tv}")
    print(f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"latentfast._C (C++ CPU kernels): "
          f"{'built' if _ext.has_cpp() else 'not loaded: ' + str(_ext.load_error)}")
    if _ext.has_cpp():
        try:
            isa = torch.ops.latentfast_cpp.cpu_isa()
        except RuntimeError as exc:  # e.g. a bad LATENTFAST_CPU_ISA
            isa = f"error: {exc}"
        print(f"C++ kernel build in use (Glow, vector flows, geometry, RNN): {isa}")
    print(f"TRITON_INTERPRET: {'on' if backend.triton_interpret() else 'off'}   "
          f"LATENTFAST_BACKEND: {backend.requested()}")
    from latentfast.bench.runner import allocator_settings, format_allocator
    defaults = "the C library defaults (freed large blocks go back to the OS: see the README, Environment variables)"
    print(f"CPU allocator: {format_allocator(allocator_settings(), defaults)}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op in ("actnorm_invconv", "actnorm_invconv_coupling", "affine_coupling", "lu_weight",
               "pullback_metric", "curve_energy", "gru_sequence", "lstm_sequence", "rnn_lyapunov",
               "lorenz_lyapunov", "vector_flow_stack", "vector_flow_stack_inverse"):
        chosen = []
        for d in devices:
            try:
                chosen.append(f"{d.type}: {backend.select(d)}")
            except RuntimeError as exc:
                chosen.append(f"{d.type}: unavailable ({exc})")
        print(f"  latentfast::{op:<26} " + ", ".join(chosen))
    import latentfast.ops.vector_flows  # noqa: F401  (registers the vector-flow ops too)
    from latentfast.ops._autograd import ROUTED, registered_ops
    registered = registered_ops()
    print(f"direct op calls under forward-mode AD / torch.func (ops/_autograd.py): route installed for "
          f"{sum(n in ROUTED for n in registered)} of {len(registered)} ops")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentfast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, extension and backend status")
    b = sub.add_parser("bench", help="run the benchmark suite and print its table")
    b.add_argument("--ops", nargs="*", help="op or case names to run (default: all)")
    b.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    b.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    b.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="timing budget per implementation and pass (default 3, 0.5 with --quick); at least "
                        "15 interleaved rounds (5 with --quick) are timed whatever the budget")
    b.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    b.add_argument("--merge-into", dest="merge_path",
                   help="also merge the rows into this results file (e.g. benchmarks/results/cpu.json): rows "
                        "with the same op, case and pass are replaced and stamped with the run's time")
    dm = sub.add_parser("demo", help="run a demo that writes PNGs")
    dm.add_argument("name", choices=["geodesics", "dynamics", "betavae"],
                    help="geodesics: VAE latent geometry on the digits; dynamics: latent sequence model "
                         "of a pendulum; betavae: beta sweep and disentanglement scores on sprites")
    dm.add_argument("--out", default="demo_out", help="folder for the PNGs (default: demo_out)")
    dm.add_argument("--epochs", type=int, default=None,
                    help="training epochs (default: 150 geodesics/dynamics, 40 betavae)")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        info()
    elif args.cmd == "bench":
        from latentfast.bench import run_suite
        from latentfast.bench.runner import UnknownCase

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        if args.budget is not None and args.budget < 0:
            parser.error("--budget must be >= 0")
        try:
            run_suite(args.ops, device, args.quick, args.json_path, args.merge_path, budget_s=args.budget)
        except UnknownCase as err:
            parser.error(str(err))
    elif args.cmd == "demo":
        if args.epochs is not None and args.epochs < 1:
            parser.error(f"--epochs must be >= 1, got {args.epochs}")
        kw = {} if args.epochs is None else {"epochs": args.epochs}
        if args.name == "geodesics":
            from latentfast.demos import geodesics

            geodesics.run(args.out, **kw)
        elif args.name == "dynamics":
            from latentfast.demos import dynamics

            dynamics.run(args.out, **kw)
        else:
            from latentfast.demos import betavae

            betavae.run(args.out, **kw)
    sys.stdout.flush()  # here, so that a reader gone away is met inside main
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (python -m latentfast, or the latentfast script). A reader of the
    output that stops early (`python -m latentfast info | head -3`) ends it quietly with
    status 1, as Python's documentation recommends, not with a BrokenPipeError traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # what is still buffered goes nowhere, so the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
