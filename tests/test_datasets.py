"""Scene readers: layouts, every bad input, normal estimation, dataset construction."""
from __future__ import annotations

import numpy as np
import pytest

from ppt.data.classes import DATASETS, SCANNET20
from ppt.data.datasets import FolderDataset, SceneDataset, build_dataset
from ppt.data.normals import estimate_normals
from ppt.data.scene_io import SceneError, write_scene


def make_scene(folder, n=200, normal=True, seed=0, segment_file="segment.npy"):
    rng = np.random.default_rng(seed)
    arrays = {"coord": rng.random((n, 3)).astype(np.float32),
              "color": rng.integers(0, 256, (n, 3)).astype(np.uint8),
              segment_file[:-4]: rng.integers(-1, 13, n).astype(np.int16)}
    if normal:
        arrays["normal"] = np.tile(np.float32([0, 0, 1]), (n, 1))
    write_scene(folder, arrays)


@pytest.fixture
def folder_root(tmp_path):
    for i in range(3):
        make_scene(tmp_path / "train" / f"s{i}", seed=i)
    make_scene(tmp_path / "val" / "v0")
    return tmp_path


def folder_dataset(root, split="train", **kw):
    return FolderDataset(root, DATASETS["s3dis"].class_names, split, name="mine", **kw)


def test_folder_dataset_lists_sorted_and_loads(folder_root):
    ds = folder_dataset(folder_root)
    assert [p.name for p in ds.scenes] == ["s0", "s1", "s2"]
    s = ds[1]
    assert s["name"] == "s1" and s["dataset"] == "mine"
    assert s["coord"].dtype == np.float32 and s["segment"].dtype == np.int64
    assert len(folder_dataset(folder_root, loop=3)) == 9
    assert folder_dataset(folder_root, loop=3)[4]["name"] == "s1"


def test_transform_is_applied_with_given_rng(folder_root):
    class Record:
        def set_rng(self, rng):
            self.value = rng.random()

        def __call__(self, sample):
            sample["tag"] = self.value
            return sample

    ds = folder_dataset(folder_root, transform=Record())
    a = ds.get(0, rng=np.random.default_rng(4))["tag"]
    assert a == ds.get(0, rng=np.random.default_rng(4))["tag"] != ds.get(0, rng=np.random.default_rng(5))["tag"]


def test_missing_root_and_empty_split_name_path(tmp_path, folder_root):
    with pytest.raises(FileNotFoundError, match="nowhere.*coord.npy"):
        build_dataset("scannet", tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="no scenes for split 'test'.*test/\\*"):
        folder_dataset(folder_root, split="test")
    with pytest.raises(KeyError, match="valid names: s3dis, scannet, structured3d"):
        build_dataset("scanet", folder_root, "train")
    with pytest.raises(KeyError, match="valid splits"):
        SceneDataset(folder_root, DATASETS["scannet"], "training")


def corrupt(folder, case):
    if case == "missing_color":
        (folder / "color.npy").unlink()
    elif case == "truncated":
        data = (folder / "coord.npy").read_bytes()
        (folder / "coord.npy").write_bytes(data[: len(data) // 2])
    elif case == "length_mismatch":
        np.save(folder / "color.npy", np.zeros((5, 3), np.uint8))
    elif case == "nan":
        c = np.load(folder / "coord.npy")
        c[3, 1] = np.nan
        np.save(folder / "coord.npy", c)
    elif case == "label_range":
        seg = np.load(folder / "segment.npy")
        seg[0] = 13
        np.save(folder / "segment.npy", seg)
    elif case == "empty":
        for name in ("coord", "color", "normal"):
            np.save(folder / f"{name}.npy", np.zeros((0, 3), np.float32))
        np.save(folder / "segment.npy", np.zeros(0, np.int16))


@pytest.mark.parametrize("case, file, reason", [
    ("missing_color", "color.npy", "missing"), ("truncated", "coord.npy", "not a readable"),
    ("length_mismatch", "color.npy", "to match"), ("nan", "coord.npy", "NaN"),
    ("label_range", "segment.npy", "outside 0..12"), ("empty", "coord.npy", "empty")])
def test_bad_scene_raises_scene_error_naming_file(folder_root, case, file, reason):
    corrupt(folder_root / "train" / "s1", case)
    ds = folder_dataset(folder_root)
    ds[0]
    with pytest.raises(SceneError, match=f"s1/{file}.*{reason}"):
        ds[1]
    with pytest.warns(UserWarning, match="skipping invalid scene.*s1"):
        good = folder_dataset(folder_root, skip_bad=True)
    assert [p.name for p in good.scenes] == ["s0", "s2"]


def test_normals_estimated_when_missing(tmp_path):
    rng = np.random.default_rng(0)
    n = 600
    # A tilted plane z = 0.5 x + 0.2 y: its unit normal is known.
    xy = rng.random((n, 2)) * 2
    coord = np.c_[xy, 0.5 * xy[:, 0] + 0.2 * xy[:, 1]].astype(np.float32)
    write_scene(tmp_path / "train" / "plane", {"coord": coord, "color": np.zeros((n, 3), np.uint8),
                                               "segment": np.zeros(n, np.int16)})
    s = FolderDataset(tmp_path, ("a",), "train")[0]
    normal = s["normal"]
    assert normal.shape == (n, 3) and normal.dtype == np.float32
    assert np.allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-5)
    truth = np.array([-0.5, -0.2, 1.0]) / np.linalg.norm([-0.5, -0.2, 1.0])
    assert np.abs(normal @ truth).min() > 0.999
    # Consistent orientation: all on one side.
    assert (np.sign(normal @ truth) == np.sign(normal[0] @ truth)).all()


def test_normals_face_room_centre():
    rng = np.random.default_rng(1)
    floor = np.c_[rng.random((400, 2)) * 4, np.zeros(400)]
    wall = np.c_[rng.random(400) * 4, np.zeros(400), rng.random(400) * 3]
    normal = estimate_normals(np.r_[floor, wall], k=12)
    # Away from the corner line, where neighbourhoods mix both planes.
    assert np.allclose(normal[:400][floor[:, 1] > 0.4], [0, 0, 1], atol=0.15)   # floor faces up
    assert np.allclose(normal[400:][wall[:, 2] > 0.4], [0, 1, 0], atol=0.15)    # wall y=0 faces +y


def test_layouts_of_all_three_datasets(synthetic_root):
    expect = {"scannet": ("train", 4, "scene0000_00"), "s3dis": ("val", 1, "Area_5-room_004"),
              "structured3d": ("val", 1, "scene_03000-room_0")}
    for name, (split, count, first) in expect.items():
        ds = build_dataset(name, synthetic_root, split)
        assert len(ds) == count and ds.scene_name(ds.scenes[0]) == first
        s = ds[0]
        assert s["dataset"] == name and s["name"] == first
        assert s["segment"].max() < len(DATASETS[name].class_names)
    assert DATASETS["scannet"].class_names == SCANNET20
