"""Run the demo: train each loss over several seeds, score ID vs OOD, print and save the table."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cli_support import UsageError, check_device, check_output_dir, write_files
from .data import ID_CLASSES, load_splits
from .evaluate import SCORERS, evaluate
from .train import LOSSES, Recipe, train_model

COLUMNS = ("near/auroc", "near/fpr95", "far/auroc", "far/fpr95")
OUTPUTS = ("results.csv", "results.json", "demo.png")


@dataclass
class DemoConfig:
    """Options of ``elogitnorm-fast demo`` (defaults: the documented experiment)."""

    epochs: int = 60
    seeds: tuple[int, ...] = (0, 1, 2)
    backend: str = "auto"
    device: str = "cpu"
    losses: tuple[str, ...] = LOSSES
    out: str = "demo_output"
    progress: bool = True
    figure: bool = True


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_config(config: DemoConfig, option_prefix: str = "") -> None:
    """Raise :class:`~elogitnorm_fast.cli_support.UsageError` (a ``ValueError``) naming the
    first unusable field of ``config`` (prefixed by ``option_prefix``, e.g. ``"--"`` for the
    command line) and its value; run before any training so that no run fails at its end."""
    def name(field: str) -> str:
        return option_prefix + field

    if not _is_int(config.epochs) or config.epochs < 1:
        raise UsageError(f"{name('epochs')}: must be an integer >= 1, got {config.epochs!r}")
    seeds = tuple(config.seeds) if isinstance(config.seeds, tuple | list) else None
    if not seeds or not all(_is_int(seed) and seed >= 0 for seed in seeds):
        raise UsageError(f"{name('seeds')}: must be a non-empty sequence of integers >= 0, got "
                         f"{config.seeds!r}")
    losses = tuple(config.losses) if isinstance(config.losses, tuple | list) else ()
    if not losses or any(loss not in LOSSES for loss in losses):
        raise UsageError(f"{name('losses')}: must be a non-empty subset of {LOSSES}, got "
                         f"{config.losses!r}")
    device = check_device(config.device, name("device"))
    from ..backends import BACKENDS, unavailable_reason

    if config.backend != "auto":
        if config.backend not in BACKENDS:
            raise UsageError(f"{name('backend')}: {config.backend!r} is not a backend; choose "
                             f"from auto, {', '.join(BACKENDS)}")
        reason = unavailable_reason(config.backend, device)
        if reason is not None:
            raise UsageError(f"{name('backend')}: {config.backend!r} cannot run on {device}: "
                             f"{reason}")
    check_output_dir(config.out, name("out"), OUTPUTS if config.figure else OUTPUTS[:2])
    if config.figure and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{name('figure')}: demo.png needs matplotlib (pip install matplotlib)")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(per_seed: dict[str, dict[str, list[float]]]) -> dict:
    return {loss: {name: _stats(values) for name, values in metrics.items()}
            for loss, metrics in per_seed.items()}


def _fmt(pair: tuple[float, float]) -> str:
    return f"{100 * pair[0]:5.1f}±{100 * pair[1]:3.1f}"


def render_table(summary: dict) -> str:
    """The paper-style table: rows scorer x loss; AUROC / FPR@95 in %, mean±std over seeds."""
    header = f"| {'scorer':<8} | {'loss':<13} | " + " | ".join(f"{c:>10}" for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (2 + len(COLUMNS))]
    for scorer in SCORERS:
        for loss, metrics in summary.items():
            cells = " | ".join(f"{_fmt(metrics[f'{scorer}/{c}']):>10}" for c in COLUMNS)
            lines.append(f"| {scorer:<8} | {loss:<13} | {cells} |")
    lines.append("")
    lines.append(f"| {'loss':<13} | {'ID acc':>10} | {'ECE':>10} | {'ECE (z/s)':>10} |")
    lines.append("|---|---|---|---|")
    for loss, metrics in summary.items():
        lines.append(f"| {loss:<13} | {_fmt(metrics['accuracy']):>10} | "
                     f"{_fmt(metrics['ece']):>10} | {_fmt(metrics['ece_scaled']):>10} |")
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """One measured sentence: did ELogitNorm beat CE and LogitNorm on mean AUROC over scorers?"""
    if not {"elogitnorm", "cross_entropy", "logitnorm"} <= set(summary):
        return ""
    parts = []
    for split in ("near", "far"):
        mean = {loss: statistics.fmean(summary[loss][f"{s}/{split}/auroc"][0] for s in SCORERS)
                for loss in summary}
        others = {loss: value for loss, value in mean.items() if loss != "elogitnorm"}
        beat = all(mean["elogitnorm"] > value for value in others.values())
        parts.append(
            f"{split}-OOD mean AUROC over {len(SCORERS)} scorers: ELogitNorm "
            f"{100 * mean['elogitnorm']:.2f} vs "
            + ", ".join(f"{loss} {100 * value:.2f}" for loss, value in others.items())
            + (" -> ELogitNorm best" if beat else " -> ELogitNorm NOT best")
        )
    return "; ".join(parts)


def _write_files(config: DemoConfig, per_seed: dict, summary: dict, scores: dict) -> list[str]:
    """results.csv, results.json (and demo.png) in ``config.out``, all or nothing."""
    def write_csv(handle) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(["loss", "metric", "mean", "std", "per_seed"])
        for loss, metrics in summary.items():
            for name, (mean, std) in metrics.items():
                values = " ".join(f"{v:.6f}" for v in per_seed[loss][name])
                writer.writerow([loss, name, f"{mean:.6f}", f"{std:.6f}", values])
        text.flush()
        text.detach()  # write_files syncs and closes the binary file

    payload = json.dumps(
        {"config": asdict(config), "id_classes": list(ID_CLASSES), "per_seed": per_seed,
         "summary": {loss: {k: {"mean": m, "std": s} for k, (m, s) in metrics.items()}
                     for loss, metrics in summary.items()}}, indent=1).encode("utf-8")
    writers = {"results.csv": write_csv, "results.json": lambda handle: handle.write(payload)}
    if config.figure:
        from .figure import save_figure

        writers["demo.png"] = lambda handle: save_figure(summary, scores, handle)
    return write_files(config.out, writers)


def run_demo(config: DemoConfig) -> dict:
    """Train every loss for every seed, evaluate, print the table, write CSV / JSON / PNG.

    ``config`` is checked first (:func:`check_config`: ``ValueError`` naming the field); the
    files are written only when everything succeeded, replacing those of an earlier run.
    """
    check_config(config)
    splits = load_splits()
    recipe = Recipe(epochs=config.epochs)
    per_seed: dict[str, dict[str, list[float]]] = {}
    first_seed_scores: dict[str, dict] = {}
    start = time.perf_counter()
    runs = [(loss, seed) for loss in config.losses for seed in config.seeds]
    for loss_name, seed in tqdm(runs, desc="train + score", disable=not config.progress):
        model = train_model(
            loss_name, splits.train_x, splits.train_y, splits.num_classes, seed=seed,
            recipe=recipe, backend=config.backend, device=config.device,
            progress=config.progress,
        )
        result = evaluate(model, splits, config.device)
        for name, value in result["metrics"].items():
            per_seed.setdefault(loss_name, {}).setdefault(name, []).append(value)
        first_seed_scores.setdefault(loss_name, result["scores"])
    elapsed = time.perf_counter() - start
    summary = _summarise(per_seed)
    print(f"\nID: digits {ID_CLASSES[0]}-{ID_CLASSES[-1]}; near-OOD: the other digits; far-OOD: "
          f"photo patches + noise. {len(config.seeds)} seed(s) x {config.epochs} epochs, "
          f"{elapsed:.1f} s, torch {torch.__version__}, device {config.device}.")
    print("AUROC / FPR@95TPR in %, mean±std over seeds (higher AUROC, lower FPR are better)\n")
    print(render_table(summary))
    message = verdict(summary)
    if message:
        print("\n" + message)
    written = _write_files(config, per_seed, summary, first_seed_scores)
    print("wrote " + ", ".join(written))
    return {"per_seed": per_seed, "summary": summary, "files": written, "seconds": elapsed}
