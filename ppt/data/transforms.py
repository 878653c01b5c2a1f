"""Per-sample augmentations and normalisation: small ``dict -> dict`` callables.

Randomness design (one rule for every transform): a random transform draws ONLY from its
``self.rng`` (an ``np.random.Generator``), given at construction (default: seeded with 0) and
replaceable with ``set_rng``. ``Compose.set_rng`` hands one generator to all its children;
loaders call it with a generator seeded per sample, so results do not depend on worker count.

Sample keys (numpy): ``coord`` f32 (N, 3), ``color`` f32 (N, 3) in 0..255 (0..1 after
``NormalizeColor``), ``normal`` f32 (N, 3), ``segment`` i64 (N,), ``instance`` i64 (N,),
``grid_coord`` i32 (N, 3), ``feat`` f32 (N, C), ``dataset`` str, ``name`` str; validation adds
``inverse`` i64 (M,) and ``origin_segment`` i64 (M,) over the M original points.
"""
from __future__ import annotations

import math

import numpy as np

from ppt.data.elastic import ElasticDistortion
from ppt.data.grid import GridSample
# The shared pieces live in sample_ops (below this module, grid and elastic: no import circle);
# they are re-exported here, where users of the pipeline look for them.
from ppt.data.sample_ops import (FEATURES, POINT_KEYS, CenterShift, Collect, Compose, NormalizeColor,  # noqa: F401
                                 RandomTransform, column_bounds, index_points, rotation_matrix,
                                 standard_normal)


class RandomDropout(RandomTransform):
    """With probability ``p`` keep a random ``1 - ratio`` share of the points (all point keys)."""

    def __init__(self, ratio: float = 0.2, p: float = 0.2, rng=None):
        super().__init__(rng)
        self.ratio, self.p = ratio, p

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() < self.p:
            n = len(sample["coord"])
            keep = self.rng.choice(n, int(n * (1 - self.ratio)), replace=False)
            index_points(sample, np.sort(keep))
        return sample


class RandomRotate(RandomTransform):
    """With probability ``p`` rotate ``coord`` (about the origin) and ``normal`` around ``axis``.

    The reference rotates about the bounding-box centre; the two differ by a translation of
    the whole cloud, which the pipeline's later centring removes (up to where the voxel grid
    falls), so the samples are the same in distribution.

    Args:
        angle: (low, high) range in radians; the angle is uniform in it.
        axis: "x", "y" or "z".
        p: probability of rotating.
    """

    def __init__(self, angle: tuple[float, float] = (-math.pi, math.pi), axis: str = "z",
                 p: float = 0.5, rng=None):
        super().__init__(rng)
        if axis not in ("x", "y", "z"):
            raise ValueError(f"axis must be x, y or z, got {axis!r}")
        self.angle, self.axis, self.p = angle, axis, p

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() < self.p:
            rot = rotation_matrix(self.axis, self.rng.uniform(*self.angle))
            sample["coord"] = sample["coord"] @ rot.T
            if "normal" in sample:
                sample["normal"] = sample["normal"] @ rot.T
        return sample


class RandomScale(RandomTransform):
    """Multiply ``coord`` by a factor uniform in ``scale`` (one per axis if ``anisotropic``)."""

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), anisotropic: bool = False, rng=None):
        super().__init__(rng)
        self.scale, self.anisotropic = scale, anisotropic

    def __call__(self, sample: dict) -> dict:
        factor = self.rng.uniform(*self.scale, size=3 if self.anisotropic else 1)
        sample["coord"] = sample["coord"] * factor.astype(np.float32)
        return sample


class RandomFlip(RandomTransform):
    """Negate x, then independently y, of ``coord`` and ``normal``, each with probability ``p``."""

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__(rng)
        self.p = p

    def __call__(self, sample: dict) -> dict:
        for axis in (0, 1):
            if self.rng.random() < self.p:
                for key in ("coord", "normal"):
                    if key in sample:
                        sample[key] = sample[key].copy()
                        sample[key][:, axis] *= -1
        return sample


class RandomJitter(RandomTransform):
    """Add Gaussian noise (std ``sigma``, clipped to +-``clip``) to ``coord``."""

    def __init__(self, sigma: float = 0.005, clip: float = 0.02, rng=None):
        super().__init__(rng)
        self.sigma, self.clip = sigma, clip

    def __call__(self, sample: dict) -> dict:
        noise = standard_normal(self.rng, sample["coord"].shape)
        noise *= np.float32(self.sigma)
        np.clip(noise, -self.clip, self.clip, out=noise)
        sample["coord"] = sample["coord"] + noise
        return sample


class ChromaticAutoContrast(RandomTransform):
    """With probability ``p`` stretch ``color`` (0..255) to full range, blended randomly."""

    def __init__(self, p: float = 0.2, blend_factor: float | None = None, rng=None):
        super().__init__(rng)
        self.p, self.blend_factor = p, blend_factor

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() < self.p:
            color = sample["color"]
            lo, hi = column_bounds(color)
            contrast = (color - lo) * (255.0 / np.maximum(hi - lo, 1e-3))
            blend = self.rng.random() if self.blend_factor is None else self.blend_factor
            sample["color"] = ((1 - blend) * color + blend * contrast).astype(np.float32)
        return sample


class ChromaticTranslation(RandomTransform):
    """With probability ``p`` shift ``color`` by one random RGB offset (+-ratio * 255), clipped."""

    def __init__(self, p: float = 0.95, ratio: float = 0.05, rng=None):
        super().__init__(rng)
        self.p, self.ratio = p, ratio

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() < self.p:
            shift = ((self.rng.random(3) - 0.5) * 255 * 2 * self.ratio).astype(np.float32)
            color = sample["color"] + shift
            sample["color"] = np.clip(color, 0, 255, out=color)
        return sample


class ChromaticJitter(RandomTransform):
    """With probability ``p`` add per-point Gaussian noise (std ``std * 255``) to ``color``."""

    def __init__(self, p: float = 0.95, std: float = 0.05, rng=None):
        super().__init__(rng)
        self.p, self.std = p, std

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() < self.p:
            noise = standard_normal(self.rng, sample["color"].shape)
            noise *= np.float32(self.std * 255)
            noise += sample["color"]
            sample["color"] = np.clip(noise, 0, 255, out=noise)
        return sample


class SphereCrop(RandomTransform):
    """Keep the points nearest to a random point's position: at most ``point_max`` of them and
    at most ``ratio`` of the points (the smaller; either may be None). All per-point keys;
    refuses samples with an ``inverse``.

    The reference's SphereCrop takes one or the other (a ``sample_rate`` replaces
    ``point_max``); with only one given, the two agree.

    Args:
        point_max: maximum points kept; None or 0 = no cap.
        ratio: share of the points kept; None = all.
    """

    def __init__(self, point_max: int | None = 100_000, ratio: float | None = None, rng=None):
        super().__init__(rng)
        self.point_max, self.ratio = point_max, ratio

    def __call__(self, sample: dict) -> dict:
        if "inverse" in sample:
            raise ValueError("SphereCrop would invalidate 'inverse': crop before "
                             "GridSample(return_inverse=True)")
        n = len(sample["coord"])
        limit = int(self.ratio * n) if self.ratio is not None else n
        if self.point_max:
            limit = min(limit, self.point_max)
        if n > limit:
            coord = sample["coord"]
            centre = coord[self.rng.integers(n)]
            # Column by column: summing (N, 3) rows along axis 1 is several times slower.
            dist = (coord[:, 0] - centre[0]) ** 2
            dist += (coord[:, 1] - centre[1]) ** 2
            dist += (coord[:, 2] - centre[2]) ** 2
            # Sorted through a mask: O(N), where np.sort of the kept ids was most of the cost.
            mask = np.zeros(n, bool)
            mask[np.argpartition(dist, limit - 1)[:limit]] = True
            index_points(sample, np.flatnonzero(mask))
        return sample


# The colour a dropped sample gets, in 0..255 (so also 0 after NormalizeColor's /255): the
# reference's RandomDropColor ``drop_value``. ``ppt.engine.predict`` fills clouds that have no
# colour with this same value for models trained with colour dropout.
DROPPED_COLOR = 0.0


class RandomColorDrop(RandomTransform):
    """With probability ``p`` set EVERY point's ``color`` to ``DROPPED_COLOR``: the model also
    learns to label clouds that have no colour (geometry and normals alone).

    Pointcept's ``RandomDropColor(drop_ratio=1.0, drop_application_ratio=p)`` (the Sonata /
    Concerto recipes, p 0.2): same value (0 of 0..255, black), whole sample at once. It runs
    after the chromatic augmentations here (the reference drops before its colour jitter), so a
    dropped sample holds exactly the value inference fills in, not a jittered copy of it.
    Reads and writes ``color`` (N, 3), 0..255.

    Args:
        p: probability of dropping a sample's colour (``data.color_drop``).
    """

    def __init__(self, p: float = 0.2, rng=None):
        super().__init__(rng)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"colour drop probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: dict) -> dict:
        if self.rng.random() < self.p:
            sample["color"] = np.full_like(sample["color"], DROPPED_COLOR, dtype=np.float32)
        return sample


class ShufflePoints(RandomTransform):
    """Randomly permute the points (all per-point keys; ``inverse`` is remapped to match)."""

    def __call__(self, sample: dict) -> dict:
        perm = self.rng.permutation(len(sample["coord"]))
        index_points(sample, perm)
        if "inverse" in sample:
            new_row = np.empty_like(perm)
            new_row[perm] = np.arange(len(perm))
            sample["inverse"] = new_row[sample["inverse"]]
        return sample


# Sphere-crop sizes of the reference configs (SPEC §2): a cap on the points for ScanNet (0 = no
# cap), a share of the points for S3DIS and Structured3D. ``data.crop_points`` (ppt/config.py)
# sets the caps per dataset; its default repeats these (tested).
CROP_POINTS = {"scannet": 100_000, "s3dis": 0, "structured3d": 0}
CROP_RATIO = {"s3dis": 0.6, "structured3d": 0.8}


def build_transforms(dataset_name: str, split: str, voxel_size: float = 0.02, augment: bool = True,
                     rng: np.random.Generator | None = None, elastic: bool = True,
                     color_drop: float = 0.0, crop_points: int | None = None,
                     features: tuple[str, ...] = FEATURES) -> Compose:
    """The reference per-sample pipeline (SPEC §2) for one dataset.

    Args:
        dataset_name: picks the sphere crop's ratio (``CROP_RATIO``) and default cap.
        split: "train" gives the augmenting pipeline; anything else the validation pipeline
            (centre, grid sample with ``inverse``/``origin_segment``, normalise, features).
            Test-time views: ``ppt.data.grid.build_test_views``.
        voxel_size: grid sampling voxel in metres.
        augment: for "train", False keeps only the deterministic steps plus grid sampling.
        elastic: with ``augment``, include elastic distortion (the reference's default; off
            is the lighter pipeline for short runs, ``data.elastic``).
        color_drop: for "train", probability of dropping a sample's whole colour
            (``RandomColorDrop``, ``data.color_drop``); 0 leaves the step out. Independent of
            ``augment``: it decides which inputs the model can label, not how varied they are.
        crop_points: for "train", most points the sphere crop keeps after grid sampling (0 =
            no cap; ``data.crop_points``); None = the reference's ``CROP_POINTS`` (unknown
            names: ScanNet's). S3DIS and Structured3D also keep only their ``CROP_RATIO``.
        features: the keys ``feat`` concatenates, in order (``data.features``): colour and
            normal by default, ``("coord", "color", "normal")`` for Sonata / Concerto encoders.
        rng: generator for all random steps (``Compose.set_rng`` replaces it per sample).
    """
    features = tuple(features)
    if split != "train":
        steps = [CenterShift(apply_z=True), GridSample(voxel_size, return_inverse=True),
                 CenterShift(apply_z=False), NormalizeColor(), Collect(features)]
    else:
        steps = [CenterShift(apply_z=True)]
        if augment:
            steps += [
                RandomDropout(0.2, p=0.2),
                RandomRotate((-math.pi, math.pi), "z", p=0.5),
                RandomRotate((-math.pi / 64, math.pi / 64), "x", p=0.5),
                RandomRotate((-math.pi / 64, math.pi / 64), "y", p=0.5),
                RandomScale((0.9, 1.1)),
                RandomFlip(p=0.5),
                RandomJitter(0.005, 0.02),
                *([ElasticDistortion(((0.2, 0.4), (0.8, 1.6)), p=0.95)] if elastic else []),
                ChromaticAutoContrast(p=0.2),
            ]
        if crop_points is None:
            crop_points = CROP_POINTS.get(dataset_name, CROP_POINTS["scannet"])
        steps += [GridSample(voxel_size), SphereCrop(crop_points, CROP_RATIO.get(dataset_name))]
        if augment:
            # The reference runs these two before grid sampling. Both act on each point alone
            # and which points grid sampling and the crop keep does not depend on colour, so
            # running them on the kept points gives the same distribution of samples, on
            # ~2x fewer points. (Auto-contrast reads the whole cloud's colour range: it stays.)
            steps += [ChromaticTranslation(p=0.95, ratio=0.05), ChromaticJitter(p=0.95, std=0.05)]
        if color_drop > 0:
            steps.append(RandomColorDrop(p=color_drop))
        steps += [CenterShift(apply_z=False), NormalizeColor()]
        if augment:
            steps.append(ShufflePoints())
        steps.append(Collect(features))
    pipeline = Compose(steps)
    pipeline.set_rng(rng if rng is not None else np.random.default_rng(0))
    return pipeline
