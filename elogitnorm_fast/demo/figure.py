"""The demo's figure: per-scorer AUROC bars for each loss, and ID vs OOD score histograms."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np


def save_figure(summary: dict, scores: dict, path: str | BinaryIO) -> None:
    """Top: near/far AUROC per scorer, one bar per loss (mean, std as error bar). Bottom: the
    first seed's energy scores of ID, near- and far-OOD test data for each loss. ``path``: a
    file name or a binary file; PNG either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import SCORERS

    losses = list(summary)
    fig = plt.figure(figsize=(13, 8), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1)
    bar_axes = top.subplots(1, 2)
    hist_axes = np.atleast_1d(bottom.subplots(1, len(losses)))
    width = 0.8 / len(losses)
    positions = np.arange(len(SCORERS))
    for column, split in enumerate(("near", "far")):
        axis = bar_axes[column]
        for index, loss in enumerate(losses):
            means = [100 * summary[loss][f"{s}/{split}/auroc"][0] for s in SCORERS]
            stds = [100 * summary[loss][f"{s}/{split}/auroc"][1] for s in SCORERS]
            axis.bar(positions + index * width, means, width, yerr=stds, label=loss, capsize=2)
        axis.set_xticks(positions + width * (len(losses) - 1) / 2, SCORERS, rotation=30)
        low = min(100 * summary[loss][f"{s}/{split}/auroc"][0] for loss in losses for s in SCORERS)
        axis.set_ylim(max(0, low - 5), 100)
        axis.set_ylabel("AUROC %")
        axis.set_title(f"{split}-OOD AUROC per scorer")
        axis.legend(fontsize=8)
    for index, loss in enumerate(losses):
        axis = hist_axes[index]
        energy = scores[loss]["Energy"]
        bins = np.histogram_bin_edges(
            np.concatenate([energy[p].numpy() for p in ("id", "near", "far")]), bins=40
        )
        for part, label in (("id", "ID test"), ("near", "near-OOD"), ("far", "far-OOD")):
            axis.hist(energy[part].numpy(), bins=bins, alpha=0.5, density=True, label=label)
        axis.set_title(f"{loss}: energy score (seed 0)")
        axis.legend(fontsize=8)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
