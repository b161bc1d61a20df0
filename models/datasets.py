"""Data sets of the shipped models, generated or loaded by our own code, with a fixed train/test split.

digits: scikit-learn's bundled 8x8 digits (1797 images, values 0..16), scaled to [-1, 1].
toy2d:  two moons from sklearn.datasets.make_moons with a fixed seed, standardised.
The split is a seeded permutation, so 'test' is the same held-out set for training, NLL and FID.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.models.errors import ConfigError

SPLIT_SEED = 0
TEST_FRACTION = 0.2
DIGITS_LEVELS = 17
TOY2D_N, TOY2D_NOISE, TOY2D_SEED = 10000, 0.05, 0
# Fixed standardisation of make_moons (roughly zero mean, unit std per axis), so the data need no stored stats.
TOY2D_SHIFT, TOY2D_SCALE = np.array([0.5, 0.25]), np.array([0.87, 0.5])


def _split(n: int, split: str, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of `split` among n items: the first round(test_fraction n) of a permutation drawn with
    numpy's default_rng(seed) are the test set (shared with a user model's real data, models/user_data.py)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    if split == "test":
        return np.sort(perm[:n_test])
    if split == "train":
        return np.sort(perm[n_test:])
    if split == "all":
        return np.arange(n)
    raise ConfigError(f"Unknown data split '{split}'. Valid splits are: train, test, all.")


def digits(split: str = "train", with_labels: bool = False):
    """Digits in model space: tensor (n, 1, 8, 8) with values in [-1, 1] on 17 levels (and labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = _split(len(d.images), split)
    x = torch.tensor(d.images[idx], dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target[idx], dtype=torch.long)
    return (x, y) if with_labels else x


def toy2d(split: str = "train"):
    """Two moons in model space: tensor (n, 2), standardised by a fixed affine map."""
    from sklearn.datasets import make_moons

    pts, _ = make_moons(TOY2D_N, noise=TOY2D_NOISE, random_state=TOY2D_SEED)
    pts = (pts - TOY2D_SHIFT) / TOY2D_SCALE
    return torch.tensor(pts[_split(len(pts), split)], dtype=torch.float32)


DATASETS = {"digits": digits, "toy2d": toy2d}
