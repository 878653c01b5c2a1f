"""Voxel hashing, grid sampling with an inverse index, test-time views, fragments and the
fast protocol's weighted votes.

Voxels are found by packing the three integer voxel indices into one int64 key and sorting
the keys once (no ``np.unique`` over coordinate rows, which sorts void views and is several
times slower; see ``bench/data_pipeline.py``). The sort is torch's stable one: 4x numpy's
stable argsort of 200k int64 keys on one core (3.2 vs 14 ms, measured), same order.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from ppt.data import sample_ops as ops
from ppt.data.sample_ops import RandomTransform, index_points

# Test-time augmentation (SPEC §7): z-rotations x scales, plus one flipped view.
TTA_ANGLES = (0.0, 0.5 * math.pi, math.pi, 1.5 * math.pi)
TTA_SCALES = (0.95, 1.0, 1.05)


def voxelize(coord: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer voxel coordinates and packed voxel keys.

    Args:
        coord: float (N, 3) points.
        voxel_size: voxel edge in metres.

    Returns:
        ``grid_coord`` int32 (N, 3) = floor(coord / voxel_size) - per-axis min (so >= 0), and
        ``key`` int64 (N,), equal for two points exactly when they share a voxel.
    """
    if voxel_size <= 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    coord = np.asarray(coord)
    # Column by column (contiguous (N,) work; an (N, 3).min(0) is ~20x slower), in float64 as
    # the reference divides.
    cols = [np.floor(coord[:, i].astype(np.float64) / voxel_size).astype(np.int64) for i in range(3)]
    dims = []
    for col in cols:
        col -= col.min() if len(col) else 0
        dims.append(int(col.max()) + 1 if len(col) else 1)
    if float(dims[0]) * float(dims[1]) * float(dims[2]) >= 2.0 ** 62:
        raise ValueError(f"scene spans {dims} voxels of {voxel_size} m: too large to hash")
    key = (cols[0] * dims[1] + cols[1]) * dims[2] + cols[2]
    return np.stack(cols, axis=1).astype(np.int32), key


def group_voxels(key: np.ndarray, with_voxel: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Group points by voxel key.

    Returns:
        ``order`` (N,) point ids sorted by key (stable: ties keep point order), ``start`` (V,)
        first position of each voxel in ``order``, ``count`` (V,) points per voxel, and
        ``voxel`` (N,) voxel id of each ORIGINAL point (voxel ids follow the key order; None
        unless ``with_voxel``: training does not need it and the scatter costs ~1 ms / 200k).
    """
    n = len(key)
    sorted_t, order_t = torch.sort(torch.from_numpy(np.ascontiguousarray(key, np.int64)), stable=True)
    order, sorted_key = order_t.numpy(), sorted_t.numpy()
    first = np.empty(n, bool)
    first[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    start = np.flatnonzero(first)
    count = np.diff(np.append(start, n))
    if not with_voxel:
        return order, start, count, None
    voxel = np.empty(n, np.int64)
    voxel[order] = np.cumsum(first) - 1
    return order, start, count, voxel


class GridSample(RandomTransform):
    """Keep one random point per occupied voxel.

    Reads ``coord``; writes every per-point key (``coord``, ``color``, ``normal``,
    ``segment``, ``instance``) subsampled to one row per voxel and adds ``grid_coord`` int32
    (M, 3) >= 0. With ``return_inverse`` (validation) it also adds ``inverse`` int64 (N,):
    original point -> row of its voxel, and ``origin_segment`` = the full ``segment``.

    Args:
        voxel_size: voxel edge in metres.
        return_inverse: add ``inverse`` and ``origin_segment``.
        rng: source of randomness for picking the kept point (``set_rng`` replaces it).
    """

    def __init__(self, voxel_size: float = 0.02, return_inverse: bool = False,
                 rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.voxel_size = voxel_size
        self.return_inverse = return_inverse

    def __call__(self, sample: dict) -> dict:
        grid, key = voxelize(sample["coord"], self.voxel_size)
        order, start, count, voxel = group_voxels(key, with_voxel=self.return_inverse)
        # floor(u * count) is uniform over 0..count-1.
        pick = order[start + (self.rng.random(len(start)) * count).astype(np.int64)]
        if self.return_inverse:
            if "segment" in sample:
                sample["origin_segment"] = sample["segment"].copy()
            sample["inverse"] = voxel
        sample = index_points(sample, pick)
        sample["grid_coord"] = np.take(grid, pick, axis=0)
        return sample


class TestFragments:
    """Split a scene into voxel fragments that together cover every point (test mode).

    Fragment ``i`` takes, in each voxel, the point of rank ``i mod count`` (points ranked by
    original id inside the voxel), so there are ``max count`` fragments, each with exactly one
    point per occupied voxel. Every point appears in at least one fragment and is OWNED by
    exactly one: the fragment whose index equals its rank (``owned`` marks those rows);
    extra appearances are repeats that fill voxels with fewer points.

    Reads ``coord`` and every per-point key; returns a LIST of samples (``iter`` yields them one
    at a time, so only one fragment is alive beyond the caller's), each with the per-point keys
    subsampled, ``grid_coord`` int32 (M, 3), ``index`` int64 (M,) original point ids and
    ``owned`` bool (M,). Deterministic (no randomness).

    Args:
        voxel_size: voxel edge in metres.
    """

    __test__ = False                       # not a pytest class, despite the name

    def __init__(self, voxel_size: float = 0.02):
        self.voxel_size = voxel_size

    def iter(self, sample: dict) -> Iterator[dict]:
        grid, key = voxelize(sample["coord"], self.voxel_size)
        order, start, count, _ = group_voxels(key, with_voxel=False)
        for i in range(int(count.max())):
            rank = i % count
            ids = order[start + rank]
            part = index_points(dict(sample), ids)
            part["grid_coord"] = np.take(grid, ids, axis=0)
            part["index"] = ids.astype(np.int64)
            part["owned"] = rank == i
            yield part

    def __call__(self, sample: dict) -> list[dict]:
        return list(self.iter(sample))


# Fast test-time votes (``TestGrid``): rows of a point's own voxel and of its 6 face neighbours
# (column order), and the feature-distance scale and floor of their weights. Measured on the demo
# model (bench/RESULTS.md §2b): weighting the own voxel's vote alone brings fast TTA within 1 mIoU
# of the fragment protocol; the neighbours and the shifted grids put it 3-6 above; sigma 0.1-0.3
# gave the same mIoU.
VOTE_OFFSETS = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
VOTE_SIGMA = 0.2
VOTE_FLOOR = 1e-3
VOTE_KEYS = ("vote_rows", "vote_weights")
_LEAST_EXPONENT = np.float32(-80.0)  # exp(-80) = 1.8e-35, the least weight kept (float32 normal)


def neighbour_rows(grid: np.ndarray, offsets: np.ndarray = VOTE_OFFSETS) -> np.ndarray:
    """Row of the voxel at ``grid[r] + offsets[j]`` for every row ``r``, or -1 where none.

    Args:
        grid: int (M, 3) distinct voxel coordinates, one row per voxel, in lexicographic order
            (the voxel-key order ``group_voxels`` gives).
        offsets: int (J, 3) voxel offsets.

    Returns:
        int64 (M, J).
    """
    offsets = np.asarray(offsets, np.int64)
    if len(grid) == 0:
        return np.empty((0, len(offsets)), np.int64)
    g = grid.astype(np.int64) + 1                 # padded by one voxel: an offset never wraps
    _, hi = ops.column_bounds(g)
    d1, d2 = int(hi[1]) + 2, int(hi[2]) + 2
    key = (g[:, 0] * d1 + g[:, 1]) * d2 + g[:, 2]  # increasing along the rows
    if not (key[1:] > key[:-1]).all():
        raise ValueError("neighbour_rows needs distinct voxels in lexicographic order")
    out = np.empty((len(g), len(offsets)), np.int64)
    for j, (a, b, c) in enumerate(offsets):
        if a == b == c == 0:
            out[:, j] = np.arange(len(key))
            continue
        query = key + (a * d1 + b) * d2 + c
        pos = np.minimum(np.searchsorted(key, query), len(key) - 1)
        out[:, j] = np.where(key[pos] == query, pos, -1)
    return out


def vote_weights(feat: np.ndarray, row_feat: np.ndarray, rows: np.ndarray, sigma: float = VOTE_SIGMA,
                 floor: float = VOTE_FLOOR) -> np.ndarray:
    """Weight of each candidate vote of each point: how much the point looks like the point whose
    prediction the vote carries.

    ``w[p, j] = exp(-|feat[p] - row_feat[rows[p, j]]|^2 / sigma^2)``; column 0 (the point's own
    voxel) is at least ``floor``, so a point unlike every candidate still takes its own voxel's
    vote; ``rows[p, j] = -1`` (no voxel there) weighs 0.

    Args:
        feat: f32 (N, C) the model's input features of every point (``data.features``).
        row_feat: f32 (M, C) the features of each row's point (the kept point of each voxel).
        rows: int (N, J) candidate rows of each point, -1 = none.
        sigma: feature distance at which a weight falls to 1/e.
        floor: least weight of column 0.

    Returns:
        f32 (N, J).
    """
    feat = np.asarray(feat, np.float32)
    table = np.full((len(row_feat) + 1, feat.shape[1]), np.inf, np.float32)  # row -1: infinitely far
    table[:-1] = row_feat
    w = np.empty(rows.shape[::-1], np.float32)
    scale = np.float32(-1.0 / sigma ** 2)
    for j, col in enumerate(np.ascontiguousarray(rows.T)):  # (N, C) temporaries, not (N, J, C)
        diff = np.take(table, col, axis=0)
        diff -= feat
        d2 = np.einsum("nc,nc->n", diff, diff)
        d2 *= scale
        np.putmask(d2, d2 < _LEAST_EXPONENT, -np.inf)  # exp would be subnormal: 10x slower; 0
        w[j] = np.exp(d2, out=d2)
    np.maximum(w[0], floor, out=w[0])
    return np.ascontiguousarray(w.T)


class TestGrid(RandomTransform):
    """One point per voxel, and per original point weighted votes from nearby voxels: the
    single sample of a fast test-time view.

    The view is voxelised on a grid whose origin is shifted by a random fraction of a voxel
    (``shift``: views differ in where voxel borders fall, not only by rotation and scale), and
    one random point of each voxel is kept, as training and validation grid sampling do. Not
    the voxel's first point: files list points object by object, so the first point favours
    whatever was written first (walls before the picture on them; 2-3 mIoU on the demo model).

    A voxel's prediction is that of its kept point. Each original point then takes the votes of
    its own voxel and of the 6 face neighbours (``VOTE_OFFSETS``), each weighted by how much the
    point looks like that voxel's kept point in the model's input features (``vote_weights``):
    a picture point in a voxel whose kept point is wall takes the vote of the next voxel whose
    kept point is picture. This gives every point a vote of its own, as the fragment protocol
    does, from one forward per view (bench/RESULTS.md §2b).

    Reads ``coord`` and every per-point key; writes them subsampled to one row per voxel (M,
    in voxel-key order) and adds ``grid_coord`` int32 (M, 3), ``inverse`` int64 (N,): original
    point -> row of its voxel, and (``sigma`` given) ``vote_rows`` int32 (N, 7): candidate rows
    (column 0 = ``inverse``) and ``vote_weights`` f32 (N, 7): their weights (0 = no voxel).

    Args:
        voxel_size: voxel edge in metres.
        rng: picks the kept points and the grid shift (``set_rng`` replaces it; seed it for
            repeatable views).
        features: keys whose concatenation the weights compare (the model's ``data.features``).
        sigma: feature distance scale of the weights; None = no weights: every point takes its
            own voxel's prediction (``inverse`` only).
        neighbours: also take the 6 face neighbours' votes (else the own voxel only).
        shift: shift the grid origin by a random fraction of a voxel per axis.
    """

    __test__ = False

    def __init__(self, voxel_size: float = 0.02, rng: np.random.Generator | None = None,
                 features: tuple[str, ...] = ops.FEATURES, sigma: float | None = VOTE_SIGMA,
                 neighbours: bool = True, shift: bool = True):
        super().__init__(rng)
        self.voxel_size, self.features = voxel_size, tuple(features)
        self.sigma, self.neighbours, self.shift = sigma, neighbours, shift

    def __call__(self, sample: dict) -> dict:
        coord = sample["coord"]
        if self.shift:
            coord = coord + (self.rng.random(3) * self.voxel_size).astype(np.float32)
        grid, key = voxelize(coord, self.voxel_size)
        order, start, count, voxel = group_voxels(key)
        ids = order[start + (self.rng.random(len(start)) * count).astype(np.int64)]
        votes = self._votes(sample, grid, ids, voxel) if self.sigma is not None else {}
        sample = index_points(sample, ids)
        sample["grid_coord"] = np.take(grid, ids, axis=0)
        sample["inverse"] = voxel
        sample.update(votes)
        return sample

    def _votes(self, sample: dict, grid: np.ndarray, ids: np.ndarray, voxel: np.ndarray) -> dict:
        missing = [k for k in self.features if k not in sample]
        if missing:
            raise KeyError(f"sample {sample.get('name', '?')!r} lacks feature keys {missing}")
        around = neighbour_rows(np.take(grid, ids, axis=0)) if self.neighbours else np.arange(len(ids))[:, None]
        rows = np.take(around.astype(np.int32), voxel, axis=0)  # (N, J), column 0 = voxel
        feat = np.concatenate([sample[k] for k in self.features], 1).astype(np.float32)
        weights = vote_weights(feat, np.take(feat, ids, axis=0), rows, self.sigma)
        return {"vote_rows": np.maximum(rows, 0), "vote_weights": weights}  # no voxel: row 0, weight 0


TTA_PROTOCOLS = ("fast", "fragments")


def tta_views(angles=TTA_ANGLES, scales=TTA_SCALES, flip: bool = True) -> list[tuple[float, float, bool]]:
    """(z-angle, scale, x-flip) of the test-time views: ``angles`` x ``scales`` (+ one flip)."""
    return [(a, s, False) for a in angles for s in scales] + ([(0.0, 1.0, True)] if flip else [])


def iter_test_views(sample: dict, voxel_size: float = 0.02, protocol: str = "fragments",
                    angles=TTA_ANGLES, scales=TTA_SCALES, flip: bool = True, seed: int = 0,
                    features: tuple[str, ...] = ops.FEATURES, fast_options: dict | None = None
                    ) -> Iterator[dict]:
    """Test-time views of one raw scene, made lazily, one model sample at a time.

    Views: each z-rotation in ``angles`` x each scale in ``scales`` (12 by default), plus one
    view flipped in x (13). Each view is centred, voxelised, re-centred in x/y and given
    ``feat``. ``protocol`` decides what a view becomes:

    - ``"fragments"`` (reference, SPEC §7): ``TestFragments`` split (fragment ``i`` takes the
      ``i``-th point of every voxel; each point is ``owned`` by exactly one fragment per view),
      samples carry ``index`` i64 (M,) original point ids and ``owned`` bool (M,).
    - ``"fast"``: one sample per view (``TestGrid``: a grid shifted by a random fraction of a
      voxel and a random point of each voxel, drawn from ``seed`` and the view number) with
      ``inverse`` i64 (N,) original point -> row and ``vote_rows`` i32 (N, 7) /
      ``vote_weights`` f32 (N, 7): each point's weighted votes from its own voxel and the 6 face
      neighbours, so one forward per view gives every point a vote of its own.

    Samples are yielded as they are made: a consumer that frees them keeps one view's base
    arrays plus one fragment alive, whatever the fragment count. Deterministic for a given ``seed``.

    Args:
        sample: a loaded scene (``coord``, ``color`` 0..255, ``normal``, optional ``segment``).
        voxel_size: voxel edge in metres.
        protocol: "fast" or "fragments".
        features: the keys ``feat`` concatenates (and the fast votes compare).
        fast_options: ``TestGrid`` keyword arguments (``sigma``, ``neighbours``, ``shift``) for
            ablations (``bench/inference.py --variants``); None = the default fast protocol.

    Yields:
        samples with ``coord``, ``grid_coord``, ``feat``, ``segment``, ``view`` int, ``dataset``,
        ``name`` (when the scene has them) and ``index``/``owned`` or ``inverse`` (and
        ``vote_rows``/``vote_weights``).
    """
    if protocol not in TTA_PROTOCOLS:
        raise ValueError(f"unknown TTA protocol {protocol!r}; valid: {', '.join(TTA_PROTOCOLS)}")
    base = ops.NormalizeColor()(ops.CenterShift(apply_z=True)(dict(sample)))
    recentre, collect = ops.CenterShift(apply_z=False), ops.Collect(features)
    fragmenter = TestFragments(voxel_size)
    grid = TestGrid(voxel_size, features=features, **(fast_options or {}))
    for v, (angle, scale, flipped) in enumerate(tta_views(angles, scales, flip)):
        view = dict(base)
        rot = ops.rotation_matrix("z", angle)
        view["coord"] = (base["coord"] @ rot.T) * np.float32(scale)
        if "normal" in base:
            view["normal"] = base["normal"] @ rot.T
        if flipped:
            view = _flip_x(view)
        if protocol == "fragments":
            parts = fragmenter.iter(view)
        else:
            grid.set_rng(np.random.default_rng([seed, v]))
            parts = iter([grid(view)])
        for part in parts:
            votes = {k: part.pop(k) for k in VOTE_KEYS if k in part}  # per original point: not
            part = collect(recentre(part))                           # rows, not collected
            part.update(votes, view=v)
            yield part


def build_test_views(sample: dict, voxel_size: float = 0.02, angles=TTA_ANGLES,
                     scales=TTA_SCALES, flip: bool = True) -> list[dict]:
    """All fragments of all test-time views of one scene, as a list (``iter_test_views`` with
    the reference ``"fragments"`` protocol; evaluation streams them instead). Summing softmax
    scores over all fragments at ``index`` gives per-point predictions."""
    return list(iter_test_views(sample, voxel_size, "fragments", angles, scales, flip))


def _flip_x(sample: dict) -> dict:
    for key in ("coord", "normal"):
        if key in sample:
            sample[key] = sample[key].copy()
            sample[key][:, 0] *= -1
    return sample
