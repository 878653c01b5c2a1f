"""Scene readers: layouts, every bad input, normal estimation, dataset construction."""
from __future__ import annotations

import numpy as np
import pytest

from ppt.data.classes import DATASETS, SCANNET20
from ppt.data.datasets import FolderDataset, NormalCache, SceneDataset, build_dataset
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
    with pytest.raises(ValueError, match="unknown dataset 'scanet': not built in .*scanet/ does not exist"):
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


# --- estimated normals: computed once per scene, cached on disk -------------------------------

def plane_scene(folder, n=300, slope=(0.5, 0.2), seed=0):
    """Scene without normal.npy: points on z = a x + b y. Returns its true unit normal."""
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2)) * 2
    coord = np.c_[xy, xy @ np.array(slope)].astype(np.float32)
    write_scene(folder, {"coord": coord, "color": np.zeros((n, 3), np.uint8), "segment": np.zeros(n, np.int16)})
    truth = np.array([-slope[0], -slope[1], 1.0])
    return truth / np.linalg.norm(truth)


@pytest.fixture
def estimator_calls(monkeypatch):
    """Count calls of the k-NN PCA estimator the normal cache uses."""
    import ppt.data.normals as normals

    calls = []
    real = normals.estimate_normals

    def counting(coord, *args, **kwargs):
        calls.append(len(coord))
        return real(coord, *args, **kwargs)

    monkeypatch.setattr(normals, "estimate_normals", counting)
    return calls


def make_read_only(root, monkeypatch):
    """Make ``root`` unwritable: chmod, and (root user ignores modes) refuse writes below it."""
    import os

    import ppt.data.normals as normals

    real = normals.atomic_write

    def guarded(path, write):
        if str(root) in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, write)

    monkeypatch.setattr(normals, "atomic_write", guarded)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        os.chmod(d, 0o555)


def test_normals_estimated_once_and_kept_next_to_scene(tmp_path, estimator_calls):
    truth = plane_scene(tmp_path / "data" / "train" / "plane")
    cache = NormalCache(tmp_path / "cache")
    ds = FolderDataset(tmp_path / "data", ("a",), "train", normal_cache=cache)
    first = ds[0]["normal"]
    assert estimator_calls == [300]
    assert np.abs(first @ truth).min() > 0.999
    # the same dataset again, and a fresh one as another DataLoader worker or process would be
    again = ds[0]["normal"]
    other = FolderDataset(tmp_path / "data", ("a",), "train", normal_cache=NormalCache(tmp_path / "cache"))[0]["normal"]
    assert estimator_calls == [300]
    assert np.array_equal(first, again) and np.array_equal(first, other)
    folder = tmp_path / "data" / "train" / "plane"
    assert sorted(p.name for p in folder.iterdir()) == [".normal.npy.source", "color.npy", "coord.npy",
                                                         "normal.npy", "segment.npy"]
    assert not (tmp_path / "cache").exists()


def test_read_only_root_caches_in_cache_folder(tmp_path, monkeypatch, estimator_calls):
    truth = plane_scene(tmp_path / "data" / "train" / "plane")
    make_read_only(tmp_path / "data", monkeypatch)
    cache_dir = tmp_path / "cache"
    first = FolderDataset(tmp_path / "data", ("a",), "train", normal_cache=NormalCache(cache_dir))[0]["normal"]
    second = FolderDataset(tmp_path / "data", ("a",), "train", normal_cache=NormalCache(cache_dir))[0]["normal"]
    assert estimator_calls == [300]
    assert np.array_equal(first, second) and np.abs(second @ truth).min() > 0.999
    assert not (tmp_path / "data" / "train" / "plane" / "normal.npy").exists()
    assert len(list(cache_dir.glob("*.npy"))) == 1 and not list(cache_dir.glob(".*"))  # no temp files


@pytest.mark.parametrize("n_new", [300, 250], ids=["same_length", "new_length"])
@pytest.mark.parametrize("read_only", [False, True], ids=["next_to_scene", "cache_folder"])
def test_changed_coord_invalidates_cached_normals(tmp_path, monkeypatch, estimator_calls, read_only, n_new):
    import os

    folder = tmp_path / "data" / "train" / "plane"
    plane_scene(folder)
    if read_only:
        make_read_only(tmp_path / "data", monkeypatch)
    cache_dir = tmp_path / "cache"

    def normals():
        return FolderDataset(tmp_path / "data", ("a",), "train", normal_cache=NormalCache(cache_dir))[0]["normal"]

    normals()
    assert estimator_calls == [300]
    # coord.npy (and the other arrays) re-exported in place with other points (another plane;
    # the same or another length): the cached normals no longer fit
    rng = np.random.default_rng(1)
    xy = rng.random((n_new, 2)) * 2
    new_points = {"coord": np.c_[xy, xy @ np.array([-0.3, 0.6])].astype(np.float32),
                  "color": np.zeros((n_new, 3), np.uint8), "segment": np.zeros(n_new, np.int16)}
    for name, array in new_points.items():
        np.save(folder / f"{name}.npy", array)  # overwrites the files (read-only folders allow it)
    later = os.stat(folder / "coord.npy").st_mtime_ns + 10**9  # a distinct mtime even on coarse clocks
    os.utime(folder / "coord.npy", ns=(later, later))
    new = normals()
    truth = np.array([0.3, -0.6, 1.0]) / np.linalg.norm([0.3, -0.6, 1.0])
    assert new.shape == (n_new, 3) and np.abs(new @ truth).min() > 0.999
    assert estimator_calls == [300, n_new]
    normals()
    assert estimator_calls == [300, n_new]  # the new estimate is cached in turn
    if read_only:
        assert len(list(cache_dir.glob("*.npy"))) == 1  # the stale entry was replaced
    else:
        assert np.array_equal(np.load(folder / "normal.npy"), new)


def _estimate_in_process(folder, cache_dir, barrier):
    barrier.wait()
    NormalCache(cache_dir).get(folder, np.load(folder / "coord.npy"))


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    import multiprocessing

    folder = tmp_path / "data" / "train" / "plane"
    plane_scene(folder, n=3000)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_estimate_in_process, args=(folder, tmp_path / "cache", barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(p.name for p in folder.iterdir()) == [".normal.npy.source", "color.npy", "coord.npy",
                                                         "normal.npy", "segment.npy"]
    assert np.array_equal(np.load(folder / "normal.npy"), estimate_normals(np.load(folder / "coord.npy")))
