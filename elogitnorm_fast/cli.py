"""Command line: ``elogitnorm-fast demo`` (also ``python -m elogitnorm_fast demo``)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(epochs=args.epochs, seeds=tuple(range(args.seeds)), backend=args.backend,
                        device=args.device, progress=not args.no_progress))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elogitnorm-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train CE / LogitNorm / ELogitNorm on digits, score OOD")
    demo.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    demo.add_argument("--backend", default="auto", help="loss backend (default auto)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
