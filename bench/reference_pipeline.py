"""The reference's ScanNet training pipeline, re-expressed for timing only.

Same algorithms as Pointcept's ``pointcept/datasets/transform.py`` (read at its HEAD): row
reductions over (N, 3), ``np.random.choice`` dropout, ``np.dot`` rotations about the box centre,
float64 jitter, elastic distortion through ``ndimage.convolve`` with 4-D box kernels and
``RegularGridInterpolator``, grid sampling by FNV-1a hash + ``argsort`` + ``np.unique``, sphere
crop by a full ``argsort`` of distances, fancy indexing of every key. Written here from those
facts (not copied); randomness from one ``np.random.Generator`` so runs repeat. Nothing in the
project imports this file.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

KEYS = ("coord", "color", "normal", "segment", "grid_coord")


def take_rows(s: dict, idx: np.ndarray) -> dict:
    for k in KEYS:
        if k in s:
            s[k] = s[k][idx]
    return s


def centre(s: dict, apply_z: bool) -> dict:
    lo, hi = s["coord"].min(0), s["coord"].max(0)
    s["coord"] = s["coord"] - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] if apply_z else 0])
    return s


def rotate(s: dict, rng, axis: str, limit: float) -> dict:
    if rng.random() > 0.5:
        return s
    a = rng.uniform(-limit, limit) * math.pi
    c, si = math.cos(a), math.sin(a)
    rot = {"x": [[1, 0, 0], [0, c, -si], [0, si, c]], "y": [[c, 0, si], [0, 1, 0], [-si, 0, c]],
           "z": [[c, -si, 0], [si, c, 0], [0, 0, 1]]}[axis]
    rot = np.array(rot)
    lo, hi = s["coord"].min(0), s["coord"].max(0)
    mid = (lo + hi) / 2
    s["coord"] = np.dot(s["coord"] - mid, rot.T) + mid
    s["normal"] = np.dot(s["normal"], rot.T)
    return s


def elastic(coords: np.ndarray, granularity: float, magnitude: float, rng) -> np.ndarray:
    blur = [np.ones(shape, np.float32) / 3 for shape in ((3, 1, 1, 1), (1, 3, 1, 1), (1, 1, 3, 1))]
    lo = coords.min(0)
    dims = ((coords - lo).max(0) // granularity).astype(int) + 3
    noise = rng.standard_normal((*dims, 3)).astype(np.float32)
    for _ in range(2):
        for kernel in blur:
            noise = ndimage.convolve(noise, kernel, mode="constant", cval=0)
    axes = [np.linspace(a - granularity, a + granularity * (d - 2), d) for a, d in zip(lo, dims)]
    interp = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0)
    return coords + interp(coords) * magnitude


def fnv_hash(grid: np.ndarray) -> np.ndarray:
    grid = grid.astype(np.uint64)
    key = np.uint64(14695981039346656037) * np.ones(len(grid), np.uint64)
    for j in range(3):
        key *= np.uint64(1099511628211)
        key = np.bitwise_xor(key, grid[:, j])
    return key


def grid_sample(s: dict, voxel: float, rng) -> dict:
    grid = np.floor(s["coord"] / np.array(voxel)).astype(int)
    grid -= grid.min(0)
    key = fnv_hash(grid)
    order = np.argsort(key)
    _, _, count = np.unique(key[order], return_inverse=True, return_counts=True)
    pick = order[np.cumsum(np.insert(count, 0, 0)[:-1]) + rng.integers(0, count.max(), count.size) % count]
    s = take_rows(s, pick)
    s["grid_coord"] = grid[pick]
    return s


def build(point_max: int = 100_000, voxel: float = 0.02):
    """The ScanNet train pipeline as one ``(sample, rng) -> sample`` list of named steps."""
    def dropout(s, rng):
        if rng.random() < 0.2:
            n = len(s["coord"])
            s = take_rows(s, rng.choice(n, int(n * 0.8), replace=False))
        return s

    def scale(s, rng):
        s["coord"] = s["coord"] * rng.uniform(0.9, 1.1, 1)
        return s

    def flip(s, rng):
        for axis in (0, 1):
            if rng.random() < 0.5:
                s["coord"][:, axis] = -s["coord"][:, axis]
                s["normal"][:, axis] = -s["normal"][:, axis]
        return s

    def jitter(s, rng):
        s["coord"] = s["coord"] + np.clip(0.005 * rng.standard_normal((len(s["coord"]), 3)), -0.02, 0.02)
        return s

    def distort(s, rng):
        if rng.random() < 0.95:
            for g, m in ((0.2, 0.4), (0.8, 1.6)):
                s["coord"] = elastic(s["coord"], g, m, rng)
        return s

    def auto_contrast(s, rng):
        if rng.random() < 0.2:
            lo, hi = s["color"].min(0, keepdims=True), s["color"].max(0, keepdims=True)
            contrast = (s["color"] - lo) * (255 / np.maximum(hi - lo, 1e-3))
            b = rng.random()
            s["color"] = (1 - b) * s["color"] + b * contrast
        return s

    def translate(s, rng):
        if rng.random() < 0.95:
            s["color"] = np.clip(s["color"] + (rng.random((1, 3)) - 0.5) * 255 * 2 * 0.05, 0, 255)
        return s

    def colour_jitter(s, rng):
        if rng.random() < 0.95:
            s["color"] = np.clip(s["color"] + rng.standard_normal((len(s["color"]), 3)) * 0.05 * 255, 0, 255)
        return s

    def sphere_crop(s, rng):
        if len(s["coord"]) > point_max:
            c = s["coord"][rng.integers(len(s["coord"]))]
            s = take_rows(s, np.argsort(np.sum(np.square(s["coord"] - c), 1))[:point_max])
        return s

    def shuffle(s, rng):
        return take_rows(s, rng.permutation(len(s["coord"])))

    def normalise(s, rng):
        s["color"] = s["color"] / 255
        return s

    def collect(s, rng):
        return {"coord": s["coord"].astype(np.float32), "grid_coord": s["grid_coord"],
                "feat": np.concatenate([s["color"], s["normal"]], 1).astype(np.float32),
                "segment": s["segment"]}

    return [("CenterShift", lambda s, r: centre(s, True)), ("RandomDropout", dropout),
            ("RandomRotate z", lambda s, r: rotate(s, r, "z", 1.0)),
            ("RandomRotate x", lambda s, r: rotate(s, r, "x", 1 / 64)),
            ("RandomRotate y", lambda s, r: rotate(s, r, "y", 1 / 64)),
            ("RandomScale", scale), ("RandomFlip", flip), ("RandomJitter", jitter),
            ("ElasticDistortion", distort), ("ChromaticAutoContrast", auto_contrast),
            ("ChromaticTranslation", translate), ("ChromaticJitter", colour_jitter),
            ("GridSample", lambda s, r: grid_sample(s, voxel, r)), ("SphereCrop", sphere_crop),
            ("CenterShift", lambda s, r: centre(s, False)), ("NormalizeColor", normalise),
            ("ShufflePoints", shuffle), ("Collect", collect)]
