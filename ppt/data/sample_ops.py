"""The pieces every per-sample step shares: point-key indexing, the random-transform base,
``Compose`` and the deterministic steps that training, validation and test-time views all run
(centring, colour normalisation, feature collection).

This module sits below ``transforms`` (augmentations, ``build_transforms``), ``grid`` (grid
sampling, test-time views) and ``elastic``: they import it, it imports none of them, so
importing any of the three first works and no import waits inside a function.
See ``ppt.data.transforms`` for the sample keys and the randomness rule.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Keys holding one row per point: transforms that drop or reorder points apply to all of them.
POINT_KEYS = ("coord", "color", "normal", "segment", "instance", "grid_coord", "feat", "index",
              "owned")


def index_points(sample: dict, idx: np.ndarray) -> dict:
    """Apply a point selection / permutation ``idx`` to every per-point key, in place."""
    for key in POINT_KEYS:
        if key in sample:
            # take() rather than [idx]: ~3x faster for (N, 3) rows (bench/data_pipeline.py).
            sample[key] = np.take(sample[key], idx, axis=0)
    return sample


def column_bounds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min and max of an (N, C) array, as two (C,) arrays of its dtype.

    Column by column: numpy reduces a C-contiguous ``(N, 3).min(0)`` ~20x slower.
    """
    lo = np.array([x[:, i].min() for i in range(x.shape[1])], x.dtype)
    hi = np.array([x[:, i].max() for i in range(x.shape[1])], x.dtype)
    return lo, hi


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normal numbers of ``shape``, drawn by torch's vectorised sampler
    (2.5x numpy's for a (200k, 3) array) from a seed that ``rng`` supplies, so the result is
    still a function of ``rng`` alone."""
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 63)))
    return torch.randn(shape, generator=gen, dtype=torch.float32).numpy()


class RandomTransform:
    """Base of random transforms: holds ``self.rng``.

    Args:
        rng: generator to draw from; None means ``np.random.default_rng(0)``.
    """

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def set_rng(self, rng: np.random.Generator) -> None:
        self.rng = rng


class Compose(RandomTransform):
    """Apply transforms in order. ``set_rng`` forwards one generator to every child."""

    def __init__(self, transforms: list):
        super().__init__(None)
        self.transforms = list(transforms)

    def set_rng(self, rng: np.random.Generator) -> None:
        self.rng = rng
        for t in self.transforms:
            if hasattr(t, "set_rng"):
                t.set_rng(rng)

    def __call__(self, sample: dict):
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t.__class__.__name__}\n" for t in self.transforms) + ")"


class CenterShift:
    """Move ``coord`` so x/y are centred on the bounding box (and min z is 0 if ``apply_z``)."""

    def __init__(self, apply_z: bool = True):
        self.apply_z = apply_z

    def __call__(self, sample: dict) -> dict:
        lo, hi = column_bounds(sample["coord"])
        shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] if self.apply_z else 0],
                         np.float32)
        sample["coord"] = sample["coord"] - shift
        return sample


def rotation_matrix(axis: str, angle: float) -> np.ndarray:
    """(3, 3) float32 rotation by ``angle`` radians about axis "x", "y" or "z" (right-handed)."""
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float32)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float32)


class NormalizeColor:
    """``color`` from 0..255 to 0..1."""

    def __call__(self, sample: dict) -> dict:
        sample["color"] = (sample["color"] / 255.0).astype(np.float32)
        return sample


FEATURES = ("color", "normal")  # what ``feat`` holds by default (6 channels); data.features
FEATURE_KEYS = ("coord", "color", "normal")  # what it may hold (3 channels each)


class Collect:
    """Build ``feat`` f32 (N, C) = concatenation of ``feat_keys`` and keep only batch keys.

    Output keys: ``coord``, ``grid_coord``, ``feat``, ``segment`` (filled with -1 when
    absent), ``dataset``, ``name`` and, if present, ``inverse``, ``origin_segment``, ``index``,
    ``owned``.
    """

    KEEP = ("coord", "grid_coord", "feat", "segment", "dataset", "name", "inverse",
            "origin_segment", "index", "owned")

    def __init__(self, feat_keys: tuple[str, ...] = FEATURES):
        self.feat_keys = tuple(feat_keys)

    def __call__(self, sample: dict) -> dict:
        missing = [k for k in self.feat_keys if k not in sample]
        if missing:
            raise KeyError(f"sample {sample.get('name', '?')!r} lacks feature keys {missing}")
        sample["feat"] = np.concatenate([sample[k] for k in self.feat_keys], 1).astype(np.float32)
        if "segment" not in sample:
            sample["segment"] = np.full(len(sample["coord"]), -1, np.int64)
        out = {k: sample[k] for k in self.KEEP if k in sample}
        out["coord"] = out["coord"].astype(np.float32)
        out["segment"] = out["segment"].astype(np.int64)
        return out
