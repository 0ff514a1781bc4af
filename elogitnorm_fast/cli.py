"""Command line: ``elogitnorm-fast demo | score | info | bench``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(epochs=args.epochs, seeds=tuple(range(args.seeds)), backend=args.backend,
                        device=args.device, out=args.out, progress=not args.no_progress))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import collect, render

    print(render(collect()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elogitnorm-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train CE, LogitNorm, ELogitNorm on digits; score OOD")
    demo.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    demo.add_argument("--backend", default="auto", help="loss backend (default auto)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--out", default="demo_output",
                      help="folder for results.csv, results.json, demo.png (default demo_output)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_demo)
    info = commands.add_parser("info", help="versions, available backends and why others are not")
    info.set_defaults(handler=_info)
    from .score_cli import add_parser as add_score_parser

    add_score_parser(commands)
    from .bench_cli import add_parser as add_bench_parser

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
