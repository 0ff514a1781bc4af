"""Run the demo: train each loss over several seeds, score ID vs OOD, print the table."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from sklearn.metrics import roc_auc_score

from .data import load_splits
from .train import LOSSES, Recipe, train_model


@dataclass
class DemoConfig:
    epochs: int = 60
    seeds: tuple[int, ...] = (0, 1, 2)
    backend: str = "auto"
    device: str = "cpu"
    losses: tuple[str, ...] = LOSSES
    progress: bool = True
    results: dict = field(default_factory=dict)


def _msp(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=1).max(dim=1).values


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    labels = [1] * len(id_scores) + [0] * len(ood_scores)
    scores = torch.cat([id_scores, ood_scores]).double().cpu().numpy()
    return float(roc_auc_score(labels, scores))


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):6.2f} +- {100 * spread:4.2f}"


def run_demo(config: DemoConfig) -> dict[str, dict[str, list[float]]]:
    """Train every loss for every seed; return {loss: {metric: [value per seed]}}."""
    splits = load_splits()
    recipe = Recipe(epochs=config.epochs)
    results: dict[str, dict[str, list[float]]] = {}
    start = time.perf_counter()
    for loss_name in config.losses:
        per_seed: dict[str, list[float]] = {"accuracy": [], "msp_auroc_near": [],
                                            "msp_auroc_far": []}
        for seed in config.seeds:
            model = train_model(
                loss_name, splits.train_x, splits.train_y, splits.num_classes, seed=seed,
                recipe=recipe, backend=config.backend, device=config.device,
                progress=config.progress,
            )
            with torch.no_grad():
                id_logits = model(splits.test_x.to(config.device))
                near = _msp(model(splits.near_ood.to(config.device)))
                far = _msp(model(torch.cat(list(splits.far_ood.values())).to(config.device)))
            id_msp = _msp(id_logits)
            accuracy = (id_logits.argmax(1).cpu() == splits.test_y).float().mean().item()
            per_seed["accuracy"].append(accuracy)
            per_seed["msp_auroc_near"].append(_auroc(id_msp, near))
            per_seed["msp_auroc_far"].append(_auroc(id_msp, far))
        results[loss_name] = per_seed
    elapsed = time.perf_counter() - start
    print(f"\nDigits 0-5 as ID; near-OOD digits 6-9; far-OOD photo patches + noise. "
          f"{len(config.seeds)} seed(s), {config.epochs} epochs, {elapsed:.1f} s.")
    print(f"{'loss':<14} {'ID acc %':>15} {'MSP AUROC near %':>18} {'MSP AUROC far %':>17}")
    for loss_name, per_seed in results.items():
        print(f"{loss_name:<14} {_mean_std(per_seed['accuracy']):>15} "
              f"{_mean_std(per_seed['msp_auroc_near']):>18} "
              f"{_mean_std(per_seed['msp_auroc_far']):>17}")
    return results
