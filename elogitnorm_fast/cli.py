"""Command line: ``elogitnorm-fast demo | score | info | bench``.

:func:`main` returns the exit status: 0 on success, 2 for a user error (printed as one line
``error: ...`` naming the argument and the value, no traceback), 130 when interrupted (Ctrl-C).
``bench`` is developer tooling: it runs ``benchmarks/run_all.py`` of the source checkout the
package is imported from, with the options that follow it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from .cli_support import UsageError, resolve_progress

DESCRIPTION = """\
LogitNorm / ELogitNorm losses and post-hoc OOD scoring.
Run 'elogitnorm-fast COMMAND --help' for a command's options.

Exit status: 0 success, 2 a user error (one line on stderr), 130 interrupted (Ctrl-C).
"""
#: The folder holding the package's source: a checkout has ``benchmarks/`` there too.
CHECKOUT = Path(__file__).resolve().parent.parent


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (one line, exit status 2)
    instead of a usage block printed by argparse itself."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """``text`` as an integer >= 1 (an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    from .demo.run import check_config

    config = DemoConfig(epochs=args.epochs, seeds=tuple(range(args.seeds)), backend=args.backend,
                        device=args.device, out=args.out,
                        progress=resolve_progress(args.progress))
    check_config(config, option_prefix="--")
    run_demo(config)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import collect, render

    print(render(collect()))
    return 0


def run_bench(options: list[str], checkout: Path = CHECKOUT) -> int:
    """``elogitnorm-fast bench OPTIONS``: run ``checkout/benchmarks/run_all.py OPTIONS`` and
    return its exit status (its ``--help`` lists the options)."""
    script = checkout / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise UsageError(f"bench runs from a source checkout: {script} not found (an installed "
                         "package ships no benchmarks)")
    return subprocess.run([sys.executable, str(script), *options]).returncode


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = _Parser(prog="elogitnorm-fast", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="train CE, LogitNorm, ELogitNorm on digits; score OOD",
                               description="Train cross-entropy, LogitNorm and ELogitNorm on "
                               "scikit-learn's digits over several seeds, score near- and far-OOD "
                               "data with eight post-hoc scorers, print the table and write "
                               "results.csv, results.json and demo.png (all or nothing).")
    demo.add_argument("--epochs", type=positive_int, default=60,
                      help="training epochs (default 60)")
    demo.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (default 3)")
    demo.add_argument("--backend", default="auto", help="loss backend (default auto)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--out", default="demo_output",
                      help="folder for results.csv, results.json, demo.png (default demo_output)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: only when stderr is a terminal)")
    demo.set_defaults(handler=_demo)
    info = commands.add_parser("info", help="versions, available backends and why others are not",
                               description="Print versions, devices, and which loss backends "
                               "run here (and why the others do not).")
    info.set_defaults(handler=_info)
    from .score_cli import add_parser as add_score_parser

    add_score_parser(commands)
    # Options after ``bench`` go to benchmarks/run_all.py unparsed, its --help included.
    commands.add_parser("bench", add_help=False,
                        help="run the benchmarks, render tables and plot (source checkout only; "
                        "'bench --help' lists its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.command == "bench":
            return run_bench(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.handler(args)
    except UsageError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are all or nothing, so nothing to report
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
