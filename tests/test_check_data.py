"""Data-root checker: a clean root passes; each kind of bad data is caught and named."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ppt.data.check import check_data_root
from ppt.data.scene_io import SceneError, write_scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_data as check_cli  # noqa: E402


def scene(n, num_classes, segment_name="segment", seed=0):
    rng = np.random.default_rng(seed)
    return {"coord": rng.uniform(0, 3, (n, 3)).astype(np.float32),
            "color": rng.integers(0, 256, (n, 3)).astype(np.uint8),
            "normal": np.tile(np.float32([0, 0, 1]), (n, 1)),
            segment_name: rng.integers(-1, num_classes, n).astype(np.int16)}


@pytest.fixture()
def root(tmp_path):
    for split in ("train", "val"):
        write_scene(tmp_path / "scannet" / split / f"scene000{len(split)}_00",
                    scene(50, 20, "segment20"))
    write_scene(tmp_path / "scannet" / "test" / "scene0707_00",
                {k: v for k, v in scene(30, 20).items() if k != "segment"})
    for area in ("Area_1", "Area_5"):
        write_scene(tmp_path / "s3dis" / area / "office_1", scene(40, 13))
    for split in ("train", "val"):
        write_scene(tmp_path / "structured3d" / split / "scene_00000" / "room_1", scene(20, 25))
    return tmp_path


def test_clean_root_passes_and_reports(root):
    report = check_data_root(root, quick=False)
    assert report.ok
    assert report.splits["scannet"]["train"].scenes == 1
    assert report.splits["scannet"]["train"].points == 50
    assert report.splits["s3dis"]["train"].points == 40  # Area_1 only; Area_5 is val
    assert report.splits["structured3d"]["val"].histogram.sum() + \
        report.splits["structured3d"]["val"].ignored == 20
    quick = check_data_root(root, ["scannet"], ["train", "val", "test"], quick=True)
    assert quick.ok and quick.splits["scannet"]["test"].points == 30
    assert quick.splits["scannet"]["train"].histogram is None


def corrupt(folder, kind):
    if kind == "missing":
        (folder / "color.npy").unlink()
    elif kind == "length":
        np.save(folder / "color.npy", np.zeros((49, 3), np.uint8))
    elif kind == "float_labels":
        np.save(folder / "segment20.npy", np.zeros(50, np.float32))
    elif kind == "int_coords":
        np.save(folder / "coord.npy", np.zeros((50, 3), np.int32))
    elif kind == "truncated":
        data = (folder / "coord.npy").read_bytes()
        (folder / "coord.npy").write_bytes(data[:-100])
    elif kind == "nan":
        coord = np.load(folder / "coord.npy")
        coord[3, 1] = np.nan
        np.save(folder / "coord.npy", coord)
    elif kind == "range":
        seg = np.load(folder / "segment20.npy")
        seg[0] = 20
        np.save(folder / "segment20.npy", seg)
    elif kind == "no_labels":
        (folder / "segment20.npy").unlink()


CASES = {  # kind -> (message fragment, caught by the quick header check too)
    "missing": ("color.npy: file is missing", True),
    "length": ("expected shape (50, 3) to match coord.npy, got (49, 3)", True),
    "float_labels": ("segment20.npy: expected integer labels, got float32", True),
    "int_coords": ("coord.npy: expected float coordinates, got int32", True),
    "truncated": ("coord.npy", True),
    "nan": ("coord.npy: 1 points have NaN or inf coordinates", False),
    "range": ("segment20.npy: 1 labels outside 0..19", False),
    "no_labels": ("segment20.npy: file is missing", True),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_of_bad_data_is_caught(root, kind):
    folder = root / "scannet" / "train" / "scene0005_00"
    corrupt(folder, kind)
    fragment, quick_catches = CASES[kind]
    with pytest.raises(SceneError) as err:
        check_data_root(root, ["scannet"], quick=False)
    assert fragment in str(err.value) and str(folder) in str(err.value)
    if quick_catches:
        with pytest.raises(SceneError, match="1 problem"):
            check_data_root(root, ["scannet"], quick=True)
    else:  # content checks are the full mode's job
        assert check_data_root(root, ["scannet"], quick=True).ok


def test_empty_split_and_unknown_names(root):
    report = check_data_root(root, ["structured3d"], ["train", "val", "test"],
                             raise_on_error=False)
    assert len(report.problems) == 1 and "structured3d/test: no scene folders" in report.problems[0]
    with pytest.raises(ValueError, match="unknown dataset 'nuscenes': not built in .*nuscenes/ does not exist"):
        check_data_root(root, ["nuscenes"])
    with pytest.raises(SceneError, match="data root is missing"):
        check_data_root(root / "nope")


def test_cli_summary_and_exit_status(root, capsys):
    assert check_cli.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "scannet/train: 1 scenes, 50 points" in out and "labels: wall" in out
    assert "0 problem(s)" in out
    corrupt(root / "s3dis" / "Area_1" / "office_1", "missing")
    assert check_cli.main([str(root), "--quick"]) == 1
    assert "office_1/color.npy: file is missing" in capsys.readouterr().out
    assert check_cli.main([str(root), "--datasets", "bogus"]) == 2


def test_scenes_without_normals_are_counted_not_failed(root, tmp_path, capsys):
    import os

    from ppt.data.datasets import build_dataset
    from ppt.data.normals import NormalCache

    office = root / "s3dis" / "Area_1" / "office_2"
    write_scene(office, {k: v for k, v in scene(60, 13, seed=3).items() if k != "normal"})
    cache = NormalCache(tmp_path / "normal_cache", next_to_scene=False)
    for quick in (True, False):
        report = check_data_root(root, ["s3dis"], ["train"], quick=quick, normal_cache=cache)
        rep = report.splits["s3dis"]["train"]
        assert report.ok and (rep.scenes, rep.with_normal, rep.cached) == (2, 1, 0)
    assert "1 scene(s) without normal.npy" in report.format()
    assert "1 to estimate on first use (k-NN PCA, once), 0 cached already" in report.format()
    assert str(tmp_path / "normal_cache") in report.format()

    build_dataset("s3dis", root, "train", normal_cache=cache)[1]  # office_2: estimated, cached aside
    report = check_data_root(root, ["s3dis"], ["train"], normal_cache=cache)
    assert "0 to estimate on first use (k-NN PCA, once), 1 cached already" in report.format()

    build_dataset("s3dis", root, "train")[1]  # default: written next to the scene
    report = check_data_root(root, ["s3dis"], ["train"], quick=False, normal_cache=cache)
    rep = report.splits["s3dis"]["train"]
    assert (rep.with_normal, rep.estimated) == (2, 1) and "without normal.npy" not in report.format()

    # coord.npy re-exported with fewer points: the estimate is stale, not a shape error
    np.save(office / "coord.npy", np.zeros((50, 3), np.float32))
    later = os.stat(office / "coord.npy").st_mtime_ns + 10**9
    os.utime(office / "coord.npy", ns=(later, later))
    np.save(office / "color.npy", np.zeros((50, 3), np.uint8))
    np.save(office / "segment.npy", np.zeros(50, np.int16))
    report = check_data_root(root, ["s3dis"], ["train"], quick=False, normal_cache=cache)
    assert report.ok and report.splits["s3dis"]["train"].with_normal == 1, report.problems

    assert check_cli.main([str(root), "--datasets", "s3dis", "--normal-cache", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert "s3dis/train: 2 scenes" in out and "1 scene(s) without normal.npy" in out
    assert str(tmp_path / "elsewhere") in out
