"""Fixed, documented splits built from data bundled with scikit-learn.

* ID: digits 0-5 of ``sklearn.datasets.load_digits`` (8 x 8 grey images, 64 features scaled to
  [0, 1]), split 70 / 30 into train and test with a fixed seed.
* near-OOD: digits 6-9 (same sensor, unseen classes).
* far-OOD: 8 x 8 grey patches cut on a regular grid from ``load_sample_images`` (two photographs),
  rescaled to the digits' intensity range; and uniform noise of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ID_CLASSES = (0, 1, 2, 3, 4, 5)
SPLIT_SEED = 0


@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    near_ood: torch.Tensor
    far_ood: dict[str, torch.Tensor]

    @property
    def num_classes(self) -> int:
        return len(ID_CLASSES)


def _photo_patches(count: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    patches = []
    for image in load_sample_images().images:
        grey = image.astype(np.float32).mean(axis=2) / 255.0
        # Downsample 4x so an 8x8 patch covers 32x32 pixels: texture at the digits' scale.
        h, w = (grey.shape[0] // 4) * 4, (grey.shape[1] // 4) * 4
        small = grey[:h, :w].reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
        for top in range(0, small.shape[0] - 8, 4):
            for left in range(0, small.shape[1] - 8, 4):
                patches.append(small[top : top + 8, left : left + 8].reshape(64))
    patches = np.stack(patches)
    chosen = rng.choice(len(patches), size=min(count, len(patches)), replace=False)
    return patches[chosen]


def load_splits(far_ood_size: int = 500) -> Splits:
    """The demo's fixed splits (deterministic: same tensors on every call)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    is_id = np.isin(y, ID_CLASSES)
    id_index = rng.permutation(np.flatnonzero(is_id))
    cut = int(0.7 * len(id_index))
    train, test = id_index[:cut], id_index[cut:]
    noise = rng.random((far_ood_size, 64), dtype=np.float32)
    return Splits(
        train_x=torch.from_numpy(x[train]),
        train_y=torch.from_numpy(y[train]),
        test_x=torch.from_numpy(x[test]),
        test_y=torch.from_numpy(y[test]),
        near_ood=torch.from_numpy(x[~is_id]),
        far_ood={
            "photos": torch.from_numpy(_photo_patches(far_ood_size, rng)),
            "noise": torch.from_numpy(noise),
        },
    )
