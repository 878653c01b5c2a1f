"""Synthetic generator: determinism, layouts, label spaces, domain differences."""
from __future__ import annotations

import numpy as np
import pytest

from ppt.data.classes import DATASETS, IGNORE_INDEX
from ppt.data.datasets import build_dataset
from ppt.data.synthetic import DOMAINS, LABEL_MAP, generate, make_scene


def scene(domain, i=0, seed=0):
    return make_scene(domain, np.random.default_rng([seed, DOMAINS.index(domain), i]))


@pytest.mark.parametrize("domain", DOMAINS)
def test_scene_arrays_dtypes_and_label_range(domain):
    s = scene(domain)
    label_key = DATASETS[domain].segment_file[:-4]
    n = len(s["coord"])
    assert 15_000 <= n <= 75_000
    assert s["coord"].dtype == np.float32 and s["normal"].dtype == np.float32
    assert s["color"].dtype == np.uint8 and s[label_key].dtype == np.int16
    assert s["color"].shape == s["normal"].shape == (n, 3)
    seg = s[label_key]
    valid = seg[seg != IGNORE_INDEX]
    assert valid.min() >= 0 and valid.max() < DATASETS[domain].num_classes
    assert np.allclose(np.linalg.norm(s["normal"], axis=1), 1, atol=1e-4)
    if "instance" in s:
        assert s["instance"].dtype == np.int32


def test_determinism_per_seed_and_order_independence(tmp_path):
    a = generate(tmp_path / "a", 2, seed=3, domains=("s3dis",))
    b = generate(tmp_path / "b", 2, seed=3, domains=("s3dis",))
    for pa, pb in zip(a, b):
        for f in ("coord", "color", "segment"):
            assert np.array_equal(np.load(pa / f"{f}.npy"), np.load(pb / f"{f}.npy"))
    # Scene 1 is the same whether or not scene 0 was generated first.
    assert np.array_equal(scene("s3dis", 1, seed=3)["coord"], np.load(a[1] / "coord.npy"))
    assert not np.array_equal(scene("s3dis", 1, seed=4)["coord"][:100], np.load(a[1] / "coord.npy")[:100])


def test_layout_readable_and_splits(synthetic_root):
    for name in DOMAINS:
        for split in ("train", "val"):
            ds = build_dataset(name, synthetic_root, split)
            assert len(ds) >= 1
            s = ds[0]
            assert s["segment"].max() < DATASETS[name].num_classes
    assert {p.parent.name for p in build_dataset("s3dis", synthetic_root, "val").scenes} == {"Area_5"}
    ids = [int(p.parent.name.split("_")[1]) for p in build_dataset("structured3d", synthetic_root, "val").scenes]
    assert all(3000 <= i < 3250 for i in ids)
    ids = [int(p.parent.name.split("_")[1]) for p in build_dataset("structured3d", synthetic_root, "train").scenes]
    assert all(i < 3000 for i in ids)


def test_class_presence_and_domain_conventions():
    present = {d: set() for d in DOMAINS}
    for d in DOMAINS:
        for i in range(6):
            s = scene(d, i)
            seg = s[DATASETS[d].segment_file[:-4]]
            present[d] |= {DATASETS[d].class_names[c] for c in np.unique(seg[seg >= 0])}
    assert {"wall", "floor", "door"} <= present["scannet"] and "ceiling" not in DATASETS["scannet"].class_names
    assert {"ceiling", "floor", "wall", "clutter", "chair"} <= present["s3dis"]
    assert {"ceiling", "wall", "floor", "lamp"} <= present["structured3d"]
    # Same type, same name where the dataset has the class; grouping differs.
    assert LABEL_MAP["scannet"]["chair"] == LABEL_MAP["s3dis"]["chair"] == LABEL_MAP["structured3d"]["chair"]
    assert (LABEL_MAP["scannet"]["bookshelf"], LABEL_MAP["s3dis"]["bookshelf"],
            LABEL_MAP["structured3d"]["bookshelf"]) == ("bookshelf", "bookcase", "shelves")
    for d in DOMAINS:
        names = set(DATASETS[d].class_names)
        assert {v for v in LABEL_MAP[d].values() if v is not None} <= names


def test_domains_differ_in_noise_and_colour():
    walls = {}
    for d in DOMAINS:
        s = scene(d, 2)
        seg = s[DATASETS[d].segment_file[:-4]]
        wall = seg == DATASETS[d].class_names.index("wall")
        walls[d] = (s["coord"][wall], s["color"][wall].astype(float))
    # Flatness of the wall points (distance to the best plane of a wall patch) orders the domains.
    def roughness(coord):
        x0 = coord[:, 0].min()
        patch = coord[np.abs(coord[:, 0] - x0) < 0.05]                 # the wall at min x
        return np.abs(patch[:, 0] - np.median(patch[:, 0])).mean()
    r = {d: roughness(c) for d, (c, _) in walls.items()}
    assert r["structured3d"] < r["s3dis"] < r["scannet"]
    sat = {d: (c.max(1) - c.min(1)).mean() for d, (_, c) in walls.items()}
    assert sat["s3dis"] < sat["structured3d"]
