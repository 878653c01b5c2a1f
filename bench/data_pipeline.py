"""Throughput of each transform and of the whole pipelines on synthetic rooms.

    python bench/data_pipeline.py [--sizes 50000 200000] [--repeats 3]

Prints points/s (best of ``--repeats``) per transform at each scene size, and for grid
sampling and elastic distortion also the reference implementation (Pointcept: ``np.unique``
over coordinate rows; dense noise grid blurred with ``ndimage.convolve`` + SciPy's
``RegularGridInterpolator``) and the speed-up. Single process, single thread of numpy work.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data import transforms as T  # noqa: E402
from ppt.data.grid import GridSample, TestFragments  # noqa: E402
from ppt.data.synthetic import make_scene  # noqa: E402


def reference_grid_sample(sample: dict, voxel_size: float, rng: np.random.Generator) -> dict:
    """Pointcept-style: unique voxel rows, one random point per voxel, inverse index."""
    grid = np.floor(sample["coord"] / voxel_size).astype(np.int64)
    grid -= grid.min(0)
    _, inverse, count = np.unique(grid, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    select = np.cumsum(np.insert(count, 0, 0)[:-1]) + rng.integers(0, count.max(), len(count)) % count
    pick = order[select]
    out = T.index_points(dict(sample), pick)
    out["grid_coord"], out["inverse"] = grid[pick], inverse
    return out


def reference_elastic(sample: dict, params, rng: np.random.Generator) -> dict:
    """Pointcept's ElasticDistortion: (3,1,1,1) box kernels via ndimage.convolve, twice."""
    coords = sample["coord"]
    blurx = np.ones((3, 1, 1, 1), np.float32) / 3
    blury, blurz = np.ones((1, 3, 1, 1), np.float32) / 3, np.ones((1, 1, 3, 1), np.float32) / 3
    for granularity, magnitude in params:
        lo = coords.min(0)
        dim = ((coords - lo).max(0) // granularity).astype(int) + 3
        noise = rng.standard_normal((*dim, 3)).astype(np.float32)
        for _ in range(2):
            for kernel in (blurx, blury, blurz):
                noise = ndimage.convolve(noise, kernel, mode="constant", cval=0)
        axes = [np.linspace(a - granularity, a + granularity * (d - 2), d) for a, d in zip(lo, dim)]
        interp = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0)
        coords = coords + interp(coords) * magnitude
    sample["coord"] = coords
    return sample


def best_time(fn, sample: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        s = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}
        start = time.perf_counter()
        fn(s)
        times.append(time.perf_counter() - start)
    return min(times)


def scene(num_points: int) -> dict:
    arrays = make_scene("scannet", np.random.default_rng([0, num_points]), num_points=int(num_points / 0.9))
    return {"coord": T.CenterShift()({"coord": arrays["coord"]})["coord"],
            "color": arrays["color"].astype(np.float32), "normal": arrays["normal"],
            "segment": arrays["segment20"].astype(np.int64), "dataset": "scannet", "name": "bench"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    elastic = ((0.2, 0.4), (0.8, 1.6))
    rows = [
        ("CenterShift", T.CenterShift(), None),
        ("RandomDropout", T.RandomDropout(0.2, p=1.0), None),
        ("RandomRotate z", T.RandomRotate(p=1.0), None),
        ("RandomScale", T.RandomScale(), None),
        ("RandomFlip", T.RandomFlip(p=1.0), None),
        ("RandomJitter", T.RandomJitter(), None),
        ("ElasticDistortion", T.ElasticDistortion(elastic, p=1.0), lambda s: reference_elastic(s, elastic, rng)),
        ("ChromaticAutoContrast", T.ChromaticAutoContrast(p=1.0), None),
        ("ChromaticTranslation", T.ChromaticTranslation(p=1.0), None),
        ("ChromaticJitter", T.ChromaticJitter(p=1.0), None),
        ("GridSample (train)", GridSample(0.02), lambda s: reference_grid_sample(s, 0.02, rng)),
        ("GridSample (+inverse)", GridSample(0.02, return_inverse=True), lambda s: reference_grid_sample(s, 0.02, rng)),
        ("SphereCrop 60%", T.SphereCrop(ratio=0.6), None),
        ("NormalizeColor", T.NormalizeColor(), None),
        ("ShufflePoints", T.ShufflePoints(), None),
        ("TestFragments", TestFragments(0.02), None),
        ("train pipeline (scannet)", T.build_transforms("scannet", "train"), None),
        ("val pipeline", T.build_transforms("scannet", "val"), None),
    ]
    scenes = {n: scene(n) for n in args.sizes}
    print("points per second (millions), best of", args.repeats)
    header = f"| {'transform':26s} |" + "".join(
        f" {f'{n // 1000}k ours':>9s} | {f'{n // 1000}k ref':>8s} | {'speed-up':>8s} |" for n in args.sizes)
    print(header)
    print("|" + "---|" * (1 + 3 * len(args.sizes)))
    for name, ours, ref in rows:
        line = f"| {name:26s} |"
        for n, s in scenes.items():
            pts = len(s["coord"])
            t_ours = best_time(ours, s, args.repeats)
            cell = f" {pts / t_ours / 1e6:9.2f} |"
            if ref is not None:
                t_ref = best_time(ref, s, args.repeats)
                cell += f" {pts / t_ref / 1e6:8.2f} | {t_ref / t_ours:7.1f}x |"
            else:
                cell += f" {'':8s} | {'':8s} |"
            line += cell
        print(line, flush=True)
    print("scene sizes:", {n: len(s["coord"]) for n, s in scenes.items()})


if __name__ == "__main__":
    main()
