"""Invariants of every transform, the voxel grid, fragments and the built pipelines."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator
from scipy.spatial.distance import cdist, pdist

from ppt.data import transforms as T
from ppt.data.elastic import ElasticDistortion, smooth_noise, trilinear
from ppt.data.grid import GridSample, TestFragments, build_test_views, group_voxels, voxelize
from ppt.data.transforms import build_transforms


def copy(sample):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}


def test_voxelize_keys_match_voxels(toy_sample):
    grid, key = voxelize(toy_sample["coord"], 0.3)
    assert grid.dtype == np.int32 and grid.min() == 0
    expected = np.floor(toy_sample["coord"].astype(np.float64) / 0.3).astype(np.int64)
    assert np.array_equal(grid, expected - expected.min(0))
    _, by_rows = np.unique(grid, axis=0, return_inverse=True)
    _, by_key = np.unique(key, return_inverse=True)
    # Same partition of the points: equal keys exactly when equal voxel rows.
    assert np.array_equal(by_rows.ravel(), by_key.ravel())


@pytest.mark.parametrize("return_inverse", [False, True])
def test_grid_sample_one_point_per_voxel(toy_sample, return_inverse):
    s = copy(toy_sample)
    orig_grid, orig_key = voxelize(s["coord"], 0.25)
    out = GridSample(0.25, return_inverse, rng=np.random.default_rng(0))(copy(s))
    grid, key = voxelize(out["coord"], 0.25)
    # One row per occupied voxel, and every occupied voxel present.
    assert len(out["coord"]) == len(np.unique(orig_key))
    sampled_rows = np.unique(out["grid_coord"], axis=0)
    assert len(sampled_rows) == len(out["coord"])
    assert set(map(tuple, sampled_rows)) == set(map(tuple, orig_grid))
    assert out["grid_coord"].dtype == np.int32 and out["grid_coord"].min() == 0
    # Per-point keys stay aligned: each kept row is an original point.
    ids = np.flatnonzero((toy_sample["coord"][:, None] == out["coord"][None]).all(2).any(1))
    assert len(ids) == len(out["coord"])
    if return_inverse:
        inv = out["inverse"]
        assert inv.shape == (len(s["coord"]),) and inv.dtype == np.int64
        assert np.array_equal(out["grid_coord"][inv], orig_grid)
        assert np.array_equal(out["origin_segment"], s["segment"])


def test_grid_sample_randomness_is_seeded(toy_sample):
    a = GridSample(0.5, rng=np.random.default_rng(1))(copy(toy_sample))
    b = GridSample(0.5, rng=np.random.default_rng(1))(copy(toy_sample))
    c = GridSample(0.5, rng=np.random.default_rng(2))(copy(toy_sample))
    assert np.array_equal(a["coord"], b["coord"])
    assert not np.array_equal(a["coord"], c["coord"])


def test_voxel_groups_keep_point_order_inside_a_voxel():
    # Few voxels, many points each: an unstable sort would shuffle points within a voxel,
    # and fragment i would no longer take each voxel's i-th point by original id.
    key = np.random.default_rng(0).integers(0, 5, 5000)
    order, start, count, voxel = group_voxels(key)
    assert np.array_equal(key[order], np.sort(key)) and count.sum() == 5000
    for s, c in zip(start, count):
        assert (np.diff(order[s:s + c]) > 0).all()
    assert np.array_equal(voxel, np.unique(key, return_inverse=True)[1].ravel())
    assert group_voxels(key, with_voxel=False)[3] is None


def test_fragments_cover_every_point_once_as_owner(toy_sample):
    frags = TestFragments(0.4)(copy(toy_sample))
    n = len(toy_sample["coord"])
    _, key = voxelize(toy_sample["coord"], 0.4)
    counts = np.bincount(np.unique(key, return_inverse=True)[1].ravel())
    assert len(frags) == counts.max() > 1
    owner_hits = np.zeros(n, int)
    seen = np.zeros(n, bool)
    for f in frags:
        # One point per voxel in every fragment.
        assert len(f["index"]) == len(counts)
        assert len(np.unique(f["grid_coord"], axis=0)) == len(counts)
        assert np.array_equal(f["coord"], toy_sample["coord"][f["index"]])
        owner_hits[f["index"][f["owned"]]] += 1
        seen[f["index"]] = True
    assert seen.all()
    assert (owner_hits == 1).all()


def test_rotation_preserves_distances_and_normals(toy_sample):
    s = copy(toy_sample)
    s["coord"] = s["coord"][:300]
    s["normal"] = s["normal"][:300]
    out = T.RandomRotate((0.3, 0.3), "z", p=1.0)(copy(s))
    assert np.allclose(pdist(out["coord"]), pdist(s["coord"]), atol=1e-3)
    assert np.allclose(np.linalg.norm(out["normal"], axis=1), 1, atol=1e-5)
    assert np.allclose(out["coord"][:, 2], s["coord"][:, 2])
    assert not np.allclose(out["coord"][:, :2], s["coord"][:, :2])
    x = T.RandomRotate((0.2, 0.2), "x", p=1.0)(copy(s))
    assert np.allclose(x["coord"][:, 0], s["coord"][:, 0])
    with pytest.raises(ValueError):
        T.RandomRotate(axis="w")


def test_flip_and_scale(toy_sample):
    out = T.RandomFlip(p=1.0)(copy(toy_sample))
    assert np.allclose(out["coord"][:, :2], -toy_sample["coord"][:, :2])
    assert np.allclose(out["coord"][:, 2], toy_sample["coord"][:, 2])
    assert np.allclose(out["normal"][:, :2], -toy_sample["normal"][:, :2])
    none = T.RandomFlip(p=0.0)(copy(toy_sample))
    assert np.array_equal(none["coord"], toy_sample["coord"])
    scaled = T.RandomScale((1.5, 1.5))(copy(toy_sample))
    assert np.allclose(scaled["coord"], toy_sample["coord"] * 1.5)
    ratio = T.RandomScale((0.9, 1.1), rng=np.random.default_rng(3))(copy(toy_sample))["coord"] / toy_sample["coord"]
    assert np.allclose(ratio, ratio[0, 0], rtol=1e-5) and 0.9 <= ratio[0, 0] <= 1.1


def test_center_shift(toy_sample):
    out = T.CenterShift(apply_z=True)(copy(toy_sample))
    lo, hi = out["coord"].min(0), out["coord"].max(0)
    assert np.allclose((lo[:2] + hi[:2]) / 2, 0, atol=1e-5) and abs(lo[2]) < 1e-5
    keep_z = T.CenterShift(apply_z=False)(copy(toy_sample))
    assert np.allclose(keep_z["coord"][:, 2], toy_sample["coord"][:, 2])


def test_dropout_sizes(toy_sample):
    n = len(toy_sample["coord"])
    out = T.RandomDropout(0.2, p=1.0)(copy(toy_sample))
    assert len(out["coord"]) == len(out["segment"]) == len(out["normal"]) == int(n * 0.8)
    assert len(T.RandomDropout(0.2, p=0.0)(copy(toy_sample))["coord"]) == n


class FixedCentre:
    """Stand-in generator: SphereCrop's draw of the centre point returns ``index``."""

    def __init__(self, index: int):
        self.index = index

    def integers(self, n):
        return self.index


def original_rows(sample, out):
    """Row of the original sample that each output point is (coordinates are unique)."""
    row = {tuple(p): i for i, p in enumerate(sample["coord"])}
    return np.array([row[tuple(p)] for p in out["coord"]])


@pytest.mark.parametrize("kwargs, kept", [(dict(point_max=500), 500), (dict(ratio=0.6), 1200),
                                          (dict(point_max=500, ratio=0.6), 500),
                                          (dict(point_max=1500, ratio=0.6), 1200)])
def test_sphere_crop_keeps_exactly_the_nearest_points_of_the_centre(toy_sample, kwargs, kept):
    coord = toy_sample["coord"]
    # a corner point: a box, a 2-D (xy) ball or a crop around the scene centre would differ
    centre = int(np.argmin(coord.sum(1)))
    out = T.SphereCrop(**kwargs, rng=FixedCentre(centre))(copy(toy_sample))
    rows = original_rows(toy_sample, out)
    dist = np.linalg.norm(coord.astype(np.float64) - coord[centre], axis=1)
    assert np.array_equal(np.sort(rows), np.sort(np.argsort(dist)[:kept]))
    assert (np.diff(rows) > 0).all()  # kept points stay in their original order
    for key in ("color", "normal", "segment", "instance"):  # every per-point key follows
        assert np.array_equal(out[key], toy_sample[key][rows]), key
    # with a real generator: the nearest points of SOME point, and another one per seed
    crops = [original_rows(toy_sample, T.SphereCrop(**kwargs, rng=np.random.default_rng(seed))(copy(toy_sample)))
             for seed in (0, 1)]
    for rows in crops:
        inside = np.zeros(len(coord), bool)
        inside[rows] = True
        dist = cdist(coord[rows], coord)  # the centre is among the kept points
        assert len(rows) == kept and (dist[:, inside].max(1) < dist[:, ~inside].min(1)).any()
    assert set(crops[0]) != set(crops[1])
    with pytest.raises(ValueError, match="inverse"):
        T.SphereCrop(10)({**copy(toy_sample), "inverse": np.zeros(len(coord), np.int64)})


def test_jitter_and_colour_ranges(toy_sample):
    out = T.RandomJitter(0.01, 0.02)(copy(toy_sample))
    d = out["coord"] - toy_sample["coord"]
    assert np.abs(d).max() <= 0.02 + 1e-6 and d.std() > 0.005
    for t in (T.ChromaticAutoContrast(p=1.0), T.ChromaticTranslation(p=1.0), T.ChromaticJitter(p=1.0)):
        c = t(copy(toy_sample))["color"]
        assert c.shape == toy_sample["color"].shape and c.min() >= 0 and c.max() <= 255
        assert not np.allclose(c, toy_sample["color"])
    norm = T.NormalizeColor()(copy(toy_sample))["color"]
    assert norm.max() <= 1.0 and np.allclose(norm * 255, toy_sample["color"], atol=1e-3)


@pytest.mark.parametrize("shape", [(7, 6, 5, 3), (4, 3, 2, 2), (2, 9, 3, 3)])
def test_elastic_matches_reference_interpolation(shape):
    rng = np.random.default_rng(0)
    noise = smooth_noise(rng.standard_normal(shape).astype(np.float32))
    origin, spacing = np.array([-0.3, 0.1, 0.0]), 0.2
    extent = spacing * (np.array(shape[:3]) - 1)
    pts = origin + rng.random((500, 3)) * extent
    # Points on the last x node / last z slice (the seams of trilinear's slice atlas) and
    # points outside the grid (nearest edge value).
    pts[:20, 0], pts[20:40, 2] = origin[0] + extent[0], origin[2] + extent[2]
    pts[40:60] = origin - spacing + rng.random((20, 3)) * (extent + 2 * spacing)
    axes = [origin[i] + spacing * np.arange(noise.shape[i]) for i in range(3)]
    ref = RegularGridInterpolator(axes, noise)(np.clip(pts, origin, origin + extent))
    assert np.abs(trilinear(noise, origin, spacing, pts) - ref).max() < 1e-5


def test_elastic_distortion_is_smooth_and_seeded(toy_sample):
    a = ElasticDistortion(p=1.0, rng=np.random.default_rng(5))(copy(toy_sample))
    b = ElasticDistortion(p=1.0, rng=np.random.default_rng(5))(copy(toy_sample))
    assert np.array_equal(a["coord"], b["coord"])
    d = a["coord"] - toy_sample["coord"]
    assert np.abs(d).max() > 0.01
    # Nearby points move alike (a smooth field, not per-point noise).
    i, j = np.argsort(np.linalg.norm(toy_sample["coord"] - toy_sample["coord"][0], axis=1))[:2]
    assert np.linalg.norm(d[i] - d[j]) < np.abs(d).max()


def test_shuffle_remaps_inverse(toy_sample):
    val = GridSample(0.3, True)(copy(toy_sample))
    before = val["coord"][val["inverse"]].copy()
    out = T.ShufflePoints(rng=np.random.default_rng(0))(val)
    assert np.array_equal(out["coord"][out["inverse"]], before)


@pytest.mark.parametrize("dataset", ["scannet", "s3dis", "structured3d"])
def test_train_pipeline_contract_and_determinism(toy_sample, dataset):
    outs = [build_transforms(dataset, "train", 0.05, rng=np.random.default_rng(7))(copy(toy_sample))
            for _ in range(2)]
    out = outs[0]
    assert set(out) == {"coord", "grid_coord", "feat", "segment", "dataset", "name"}
    n = len(out["coord"])
    assert out["coord"].dtype == np.float32 and out["grid_coord"].dtype == np.int32
    assert out["feat"].shape == (n, 6) and out["feat"].dtype == np.float32
    assert out["segment"].dtype == np.int64 and out["grid_coord"].min() >= 0
    assert 0 <= out["feat"][:, :3].min() and out["feat"][:, :3].max() <= 1
    # One point per voxel survives the crop.
    assert len(np.unique(out["grid_coord"], axis=0)) == n
    for k in ("coord", "grid_coord", "feat", "segment"):
        assert np.array_equal(out[k], outs[1][k])
    plain = build_transforms(dataset, "train", 0.05, augment=False)(copy(toy_sample))
    voxels = len(GridSample(0.05)(copy(toy_sample))["coord"])
    expected = {"scannet": voxels, "s3dis": int(0.6 * voxels), "structured3d": int(0.8 * voxels)}
    assert len(plain["coord"]) == expected[dataset]


def test_val_pipeline_inverse(toy_sample):
    out = build_transforms("scannet", "val", 0.1)(copy(toy_sample))
    assert out["inverse"].shape == (2000,) and out["inverse"].max() < len(out["coord"])
    assert np.array_equal(out["origin_segment"], toy_sample["segment"])
    # Each original point maps to the row of its own voxel.
    centred = toy_sample["coord"] - np.array([*(toy_sample["coord"].min(0)[:2] + toy_sample["coord"].max(0)[:2]) / 2,
                                              toy_sample["coord"][:, 2].min()], np.float32)
    grid, _ = voxelize(centred, 0.1)
    assert np.array_equal(out["grid_coord"][out["inverse"]], grid)


def test_test_views_cover_points(toy_sample):
    views = build_test_views(copy(toy_sample), 0.3)
    assert sorted({v["view"] for v in views}) == list(range(13))
    for view in range(13):
        frags = [f for f in views if f["view"] == view]
        owned = np.concatenate([f["index"][f["owned"]] for f in frags])
        assert np.array_equal(np.sort(owned), np.arange(2000))
    f0 = views[0]
    assert f0["feat"].shape[1] == 6 and f0["grid_coord"].min() >= 0

    # Each fragment is its view's rotation/scale/flip of the centred scene, up to an xy shift.
    c = toy_sample["coord"]
    base = c - np.array([*(c.min(0)[:2] + c.max(0)[:2]) / 2, c[:, 2].min()], np.float32)
    params = [(a, s, False) for a in (0, np.pi / 2, np.pi, 1.5 * np.pi) for s in (0.95, 1, 1.05)]
    params.append((0, 1, True))
    for f in views:
        a, scale, flip = params[f["view"]]
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        expected = (base[f["index"]] @ rot.T) * scale * np.array([-1 if flip else 1, 1, 1])
        shift = f["coord"] - expected
        assert np.allclose(shift, shift[0], atol=1e-4) and abs(shift[0, 2]) < 1e-4


def pointcept_elastic(coords: np.ndarray, params, rng: np.random.Generator) -> np.ndarray:
    """Pointcept's ElasticDistortion (pointcept/datasets/transform.py), written out here as an
    independent reference: per (granularity, magnitude), in order, a noise grid over the
    CURRENT coordinates, blurred by ndimage.convolve with (3,1,1,1)-shaped box kernels twice,
    read by RegularGridInterpolator at the current (already displaced) points. Noise is drawn
    as ours draws it (``standard_normal(..., dtype=float32)`` per pass), so both see the same
    numbers; the reference's own ``np.random.randn`` is the only thing replaced."""
    coords = coords.astype(np.float32).copy()
    blurx = np.ones((3, 1, 1, 1), np.float32) / 3
    blury = np.ones((1, 3, 1, 1), np.float32) / 3
    blurz = np.ones((1, 1, 3, 1), np.float32) / 3
    for granularity, magnitude in params:
        coords_min = coords.min(0)
        noise_dim = ((coords - coords_min).max(0) // granularity).astype(int) + 3
        noise = rng.standard_normal((*noise_dim, 3), dtype=np.float32)
        for _ in range(2):
            for kernel in (blurx, blury, blurz):
                noise = ndimage.convolve(noise, kernel, mode="constant", cval=0)
        ax = [np.linspace(d_min, d_max, d) for d_min, d_max, d in
              zip(coords_min - granularity, coords_min + granularity * (noise_dim - 2), noise_dim)]
        interp = RegularGridInterpolator(ax, noise, bounds_error=False, fill_value=0)
        coords += interp(coords) * magnitude
    return coords


def test_elastic_matches_pointcept_semantics(toy_sample):
    params = ((0.2, 0.4), (0.8, 1.6))
    coord = toy_sample["coord"]
    for seed in (9, 10):
        out = ElasticDistortion(params, p=1.0, rng=np.random.default_rng(seed))(copy(toy_sample))["coord"]
        rng = np.random.default_rng(seed)
        rng.random()  # the p draw
        expected = pointcept_elastic(coord, params, rng)
        assert out.dtype == np.float32 and np.allclose(out, expected, atol=1e-5)
        assert np.abs(out - coord).max() > 0.02  # and it did move the points
    # Power of this comparison: reading the coarse grid at the ORIGINAL points (on a grid laid
    # over them), the shortcut this transform once took, moves points by millimetres to
    # centimetres against the reference; far above the tolerance.
    rng = np.random.default_rng(9)
    rng.random()
    shortcut = coord.astype(np.float64)
    for g, m in params:
        lo = coord.min(0)
        noise = smooth_noise(rng.standard_normal((*(((coord - lo).max(0) // g).astype(int) + 3), 3), dtype=np.float32))
        shortcut = shortcut + m * trilinear(noise, lo - g, g, coord)
    rng = np.random.default_rng(9)
    rng.random()
    assert np.abs(shortcut - pointcept_elastic(coord, params, rng)).max() > 1e-3


def test_data_modules_import_each_other_without_a_circle():
    # transforms, grid and elastic once imported each other (some imports hidden inside
    # functions); the shared pieces now sit below them in sample_ops. Every import of a
    # ppt.data module by another, at any depth of the file, must form an acyclic graph.
    import ast
    from pathlib import Path

    folder = Path(T.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ppt.data":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ppt.data."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps & {p.stem for p in folder.glob("*.py")}
    assert {"grid", "elastic", "sample_ops"} <= graph["transforms"]
    done: set[str] = set()

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join([*path, name])}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, [*path, name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_data_crop_points_reaches_every_training_pipeline(synthetic_root):
    """``data.crop_points`` caps each dataset's training sample (after grid sampling); names
    left out keep the reference's cap; an unknown name is an error naming the key."""
    from ppt.config import ConfigError, DataConfig, load_config
    from ppt.engine.build import build_train_loader

    assert DataConfig().crop_points == T.CROP_POINTS  # the config default is the reference's

    def crops(*extra):
        cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1, s3dis: 1}",
                                 "data.batch_size=2", "data.num_workers=0", "data.voxel_size=0.05",
                                 "data.check=false", *extra])
        loader = build_train_loader(cfg)
        return {name: [(t.point_max, t.ratio) for t in ds.transform.transforms if isinstance(t, T.SphereCrop)]
                for name, ds in loader.datasets.items()}, loader

    default, _ = crops()
    assert default == {"scannet": [(100_000, None)], "s3dis": [(0, 0.6)]}
    capped, loader = crops("data.crop_points={s3dis: 300}")
    assert capped == {"scannet": [(100_000, None)], "s3dis": [(300, 0.6)]}
    sample = loader.datasets["s3dis"].get(0, np.random.default_rng(0))
    assert len(sample["coord"]) == 300  # the synthetic rooms hold thousands of voxels
    with pytest.raises(ConfigError, match="'data.crop_points'.*unknown dataset 'scanet'"):
        load_config(None, ["data.crop_points={scanet: 5}"])
    with pytest.raises(ConfigError, match="'data.crop_points.s3dis'.*>= 0"):
        load_config(None, ["data.crop_points={s3dis: -1}"])
