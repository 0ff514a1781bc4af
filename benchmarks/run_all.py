"""Run the benchmark matrix, write JSON, render tables and a plot (``elogitnorm-fast bench``).

Usage: ``python benchmarks/run_all.py [--quick] [--device cpu|cuda] [--out FOLDER]``, or the same
options after ``elogitnorm-fast bench`` in a source checkout. CPU: every
``benchmarks/bench_*.py`` through pytest-benchmark, one JSON per file. CUDA: every
``benchmarks/gpu_*.py`` script. Then :mod:`report` renders the Markdown tables and the PNG:
full-size runs into ``docs/performance.md``, ``--quick`` runs (and runs with ``--out``) beside
their own JSON, so that quick results never replace full-size ones.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from elogitnorm_fast.progress import progress_bar

from report import write_report

DESCRIPTION = (
    "Run the benchmark matrix from a source checkout and render its tables and plot. CPU: every "
    "benchmarks/bench_*.py through pytest-benchmark, one JSON per file; CUDA: every "
    "benchmarks/gpu_*.py script. A full-size run writes benchmarks/results/ and renders "
    "docs/performance.md; --quick (or --out) writes and renders elsewhere, so it never replaces "
    "full-size results."
)
BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent


def _run(command: list[str], env: dict, log) -> int:
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return done.returncode


def destinations(quick: bool, out: str | None) -> tuple[Path, Path]:
    """The JSON folder and the report file of a run: only a full-size run into the committed
    results renders ``docs/performance.md``; any other run reports beside its own JSON."""
    if out:
        return Path(out), Path(out) / "performance.md"
    if quick:
        folder = BENCHMARKS / "results" / "quick"
        return folder, folder / "performance.md"
    return BENCHMARKS / "results", ROOT / "docs" / "performance.md"


def run(args: argparse.Namespace) -> int:
    """Run every benchmark of ``args.device`` and render the report; returns the exit status."""
    out, report = destinations(args.quick, args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ELOGITNORM_BENCH_SIZE="quick" if args.quick else "full",
               PYTHONUNBUFFERED="1")
    failures = []
    log_path = out / f"bench_{args.device}.log"
    with open(log_path, "w") as log:
        if args.device == "cpu":
            files = sorted(BENCHMARKS.glob("bench_*.py"))
            for path in progress_bar(files, show=None, large=True, desc="benchmarks (cpu)"):
                json_path = out / f"{path.stem.removeprefix('bench_')}_cpu.json"
                code = _run([sys.executable, "-m", "pytest", str(path), "-q", "-p",
                             "no:cacheprovider", f"--benchmark-json={json_path}"], env, log)
                if code != 0:
                    failures.append(f"{path.name} (exit {code})")
        else:
            scripts = sorted(BENCHMARKS.glob("gpu_*.py"))
            scripts = [s for s in scripts if s.name != "gpu_summary.py"]
            for path in progress_bar(scripts, show=None, large=True, desc="benchmarks (cuda)"):
                command = [sys.executable, str(path), "--out", str(out)]
                code = _run(command + (["--quick"] if args.quick else []), env, log)
                if code != 0:
                    failures.append(f"{path.name} (exit {code})")
    written = write_report(out, report)
    print("wrote " + ", ".join(str(p) for p in written) + f"; log {log_path}")
    if failures:
        print("FAILED: " + ", ".join(failures) + f" (see {log_path})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, and return the exit status."""
    parser = argparse.ArgumentParser(prog="elogitnorm-fast bench", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows for scorer / metric benchmarks (< 10 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="results folder (default benchmarks/results, or "
                        "benchmarks/results/quick with --quick)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
