"""``tools/preprocess.py labelled``: every input format round-trips, bad input is one error line
before anything is written, splits, resumability, dataset.yaml last, make_synthetic's PLY folder."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ppt.data.dataset_file import read_dataset_file
from ppt.data.preprocess import labelled
from ppt.data.preprocess.labelled_inputs import Source, assign_splits
from ppt.data.scene_io import load_scene

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import make_synthetic  # noqa: E402
import preprocess as preprocess_cli  # noqa: E402

CLASSES = "floor,wall,desk"


def cloud(n=300, seed=0, k=3, colour=True):
    """A tiny room-sized cloud: coord (n, 3) in metres, colour uint8, labels 0..k-1."""
    rng = np.random.default_rng(seed)
    coord = (rng.random((n, 3)) * [4.0, 3.0, 2.5] + [1.0, -2.0, 0.0]).astype(np.float32)
    color = rng.integers(0, 256, (n, 3)).astype(np.uint8) if colour else None
    label = rng.integers(0, k, n)
    label[:k] = np.arange(k)                     # every class present
    return coord, color, label


def write_ply(path, coord, color, label, text=False, label_name="scalar_Label", label_type="f4"):
    from plyfile import PlyData, PlyElement

    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if color is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if label is not None:
        fields.append((label_name, label_type))
    vertex = np.empty(len(coord), fields)
    for i, a in enumerate("xyz"):
        vertex[a] = coord[:, i]
    if color is not None:
        for i, c in enumerate(("red", "green", "blue")):
            vertex[c] = color[:, i]
    if label is not None:
        vertex[label_name] = label
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], text=text).write(str(path))


def write_las(path, coord, color, label):
    laspy = pytest.importorskip("laspy")
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = np.array([1e-4] * 3), np.zeros(3)
    las = laspy.LasData(header)
    las.x, las.y, las.z = coord[:, 0], coord[:, 1], coord[:, 2]
    las.red, las.green, las.blue = (color.astype(np.uint16) * 257).T   # 16-bit colour
    las.classification = label.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    las.write(str(path))


def write_source(fmt, folder, name, coord, color, label):
    """Write one labelled cloud in format ``fmt``; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    table = np.column_stack([coord, color, label]) if color is not None else np.column_stack([coord, label])
    if fmt == "ply":
        path = folder / f"{name}.ply"
        write_ply(path, coord, color, label.astype(np.float32))
    elif fmt == "ply_ascii":
        path = folder / f"{name}.ply"
        write_ply(path, coord, color, label.astype(np.float32), text=True)
    elif fmt == "txt":
        path = folder / f"{name}.txt"
        np.savetxt(path, table, fmt="%.6f")
    elif fmt == "csv":
        path = folder / f"{name}.csv"
        np.savetxt(path, table, fmt="%.6f", delimiter=",", comments="", header="X,Y,Z,Red,Green,Blue,Classification")
    elif fmt == "npy":
        path = folder / f"{name}.npy"
        np.save(path, table)
    elif fmt == "npz":
        path = folder / f"{name}.npz"
        np.savez(path, xyz=coord, rgb=color, segment=label.astype(np.int32))
    elif fmt in ("las", "laz"):
        path = folder / f"{name}.{fmt}"
        write_las(path, coord, color, label)
    elif fmt == "folder":
        path = folder / name
        path.mkdir()
        np.save(path / "coord.npy", coord)
        np.save(path / "color.npy", color)
        np.save(path / "segment.npy", label.astype(np.int16))
    else:
        raise ValueError(fmt)
    return path


def run(capsys, src, out, *extra, classes=CLASSES, name="mine"):
    """The command line; returns (exit status, stdout, stderr)."""
    argv = ["labelled", "--src", str(src), "--name", name, "--classes", classes, "--out", str(out),
            "--workers", "1", "--no-progress", *map(str, extra)]
    rc = preprocess_cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def scenes(out, name="mine"):
    return sorted(str(p.relative_to(out / name)) for p in (out / name).glob("*/*") if p.is_dir())


FORMATS = ["ply", "ply_ascii", "txt", "csv", "npy", "npz", "las", "laz", "folder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_round_trips(tmp_path, capsys, fmt):
    if fmt == "laz":
        pytest.importorskip("lazrs")
    coord, color, label = cloud()
    write_source(fmt, tmp_path / "src", "room", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 0, err
    scene = load_scene(tmp_path / "data" / "mine" / "train" / "room", num_classes=3)
    np.testing.assert_array_equal(scene["segment"], label)
    np.testing.assert_allclose(scene["coord"], coord, atol=2e-4)
    np.testing.assert_allclose(scene["color"], color, atol=1)
    assert scene["normal"].shape == coord.shape and np.isfinite(scene["normal"]).all()
    spec = read_dataset_file(tmp_path / "data" / "mine")
    assert spec.classes == ["floor", "wall", "desk"] and spec.color
    assert spec.splits == {"train": ["train/*"]}          # one scene: no val
    assert "labelled --src" in spec.source
    assert "floor" in out and "no val split" in out


def test_label_outside_class_list_is_one_error_and_writes_nothing(tmp_path, capsys):
    coord, color, label = cloud()
    write_source("ply", tmp_path / "src", "good", coord, color, label)
    label = label.copy()
    label[:7] = 5
    write_source("ply", tmp_path / "src", "bad", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "bad.ply" in lines[0] and "label 5 on 7 points" in lines[0]
    assert "--ignore 5" in lines[0] and "--classes" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "data" / "mine").exists()


def test_ignore_maps_to_minus_one(tmp_path, capsys):
    coord, color, label = cloud()
    label = label.copy()
    label[10:20] = 9
    write_source("txt", tmp_path / "src", "room", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--ignore", "9")
    assert rc == 0, err
    seg = np.load(tmp_path / "data" / "mine" / "train" / "room" / "segment.npy")
    assert (seg[10:20] == -1).all() and (seg[20:] >= 0).all()
    assert "10 ignored" in out


def test_missing_label_field_lists_fields_and_label_field_picks_one(tmp_path, capsys):
    coord, color, label = cloud()
    write_ply(tmp_path / "src" / "room.ply", coord, color, label.astype(np.int32), label_name="my_cls", label_type="i4")
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no label vertex property" in err and "x, y, z, red, green, blue, my_cls" in err
    assert "--label-field" in err
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--label-field", "my_cls")
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "data" / "mine" / "train" / "room" / "segment.npy"), label)


def test_millimetre_cloud_refused_unless_scaled(tmp_path, capsys):
    coord, color, label = cloud()
    write_source("ply", tmp_path / "src", "room", coord * 1000, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 2 and "millimetres" in err and "--scale 0.001" in err
    assert not (tmp_path / "data" / "mine").exists()
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--scale", "0.001")
    assert rc == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "data" / "mine" / "train" / "room" / "coord.npy"), coord, atol=1e-4)


def test_colourless_input_sets_color_false(tmp_path, capsys):
    coord, _, label = cloud(colour=False)
    write_source("txt", tmp_path / "src", "room", coord, None, label)     # x y z label
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 0, err
    assert read_dataset_file(tmp_path / "data" / "mine").color is False
    assert not np.load(tmp_path / "data" / "mine" / "train" / "room" / "color.npy").any()
    assert "no colour" in out and "data.color_drop" in out


def test_nan_rows_dropped_with_a_note_all_nan_is_an_error(tmp_path, capsys):
    coord, color, label = cloud()
    coord = coord.copy()
    coord[:5, 1] = np.nan
    write_source("npy", tmp_path / "src", "room", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 0, err
    assert "dropped 5 of 300 points" in out
    np.testing.assert_array_equal(np.load(tmp_path / "data" / "mine" / "train" / "room" / "segment.npy"), label[5:])
    coord[:] = np.nan
    write_source("npy", tmp_path / "src2", "room", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src2", tmp_path / "data2")
    assert rc == 2 and "NaN" in err and not (tmp_path / "data2" / "mine").exists()


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (b"ply\nformat garbage\n", "not a readable PLY"),
                                               (b"x y z label\n", "empty")])
def test_empty_or_unreadable_file_is_one_error(tmp_path, capsys, content, expected):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ("room.ply" if content.startswith(b"ply") else "room.txt")).write_bytes(content)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err


def test_non_integer_label_field_refused(tmp_path, capsys):
    coord, color, label = cloud()
    write_ply(tmp_path / "src" / "room.ply", coord, color, label + 0.5)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 2 and "non-integer" in err and "scalar_Label" in err


def test_classes_file_with_comments(tmp_path, capsys):
    coord, color, label = cloud()
    write_source("ply", tmp_path / "src", "room", coord, color, label)
    classes = tmp_path / "src" / "classes.txt"    # inside --src: not read as a cloud
    classes.write_text("# my labels\nfloor\n\nwall  # the walls\ndesk\n")
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", classes=str(classes))
    assert rc == 0, err
    assert read_dataset_file(tmp_path / "data" / "mine").classes == ["floor", "wall", "desk"]


def test_split_by_val_glob_and_note_on_class_absent_from_val(tmp_path, capsys):
    for i, name in enumerate(("office_a", "office_b", "hall_c")):
        coord, color, label = cloud(seed=i)
        if name == "hall_c":
            label = label % 2                    # no 'desk' in val
        write_source("ply", tmp_path / "src", name, coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--val", "hall_*")
    assert rc == 0, err
    assert scenes(tmp_path / "data") == ["train/office_a", "train/office_b", "val/hall_c"]
    assert "note: class 'desk' has no points in val" in out
    assert "note: class 'floor'" not in out
    assert read_dataset_file(tmp_path / "data" / "mine").splits == {"train": ["train/*"], "val": ["val/*"]}


def test_split_by_fraction_is_seeded_and_independent_of_file_order(tmp_path, capsys):
    sources = [Source(Path(f"scan_{i}.ply"), f"scan_{i}", f"scan_{i}.ply") for i in range(10)]
    first = assign_splits(sources, None, 0.2)
    shuffled = sources[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(shuffled, None, 0.2) == first
    assert sum(s == "val" for s in first.values()) == 2
    assert assign_splits(sources, None, 0.2, seed=5) != first        # the seed matters
    two = assign_splits(sources[:2], None, 0.2)                      # >= 2 scenes: one val
    assert sorted(two.values()) == ["train", "val"]
    # Through the command line: written files land in the split the function chose.
    for i in range(5):
        coord, color, label = cloud(seed=i)
        write_source("npz", tmp_path / "src", f"scan_{i}", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 0, err
    expected = assign_splits(sources[:5], None, 0.2)
    assert scenes(tmp_path / "data") == sorted(f"{s}/{n}" for n, s in expected.items())


def test_dataset_yaml_written_last_and_resume(tmp_path, capsys, monkeypatch):
    for i in range(3):
        coord, color, label = cloud(seed=i)
        write_source("ply", tmp_path / "src", f"room_{i}", coord, color, label)
    real = labelled.process

    def failing(task):
        if task.name == "room_1":
            raise OSError("disk full (simulated)")
        return real(task)

    monkeypatch.setattr(labelled, "process", failing)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 1 and "FAILED room_1" in out
    folder = tmp_path / "data" / "mine"
    assert not (folder / "dataset.yaml").exists()
    assert len(scenes(tmp_path / "data")) == 2                   # the others are kept
    monkeypatch.setattr(labelled, "process", real)
    done = {p: p.stat().st_mtime_ns for p in folder.glob("*/*/segment.npy")}
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 0, err
    assert "done 1, skipped 2" in out and (folder / "dataset.yaml").is_file()
    assert {p: p.stat().st_mtime_ns for p in done} == done        # finished scenes untouched
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data")
    assert rc == 0 and "done 0, skipped 3" in out
    # Changed settings would mix differently labelled scenes: refused unless --overwrite.
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--ignore", "2")
    assert rc == 2 and "--overwrite" in err and (folder / "dataset.yaml").is_file()
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--ignore", "2", "--overwrite")
    assert rc == 0 and "done 3, skipped 0" in out
    assert all((np.load(p) != 2).all() for p in folder.glob("*/*/segment.npy"))


def test_parallel_workers(tmp_path, capsys):
    for i in range(3):
        coord, color, label = cloud(seed=i)
        write_source("txt", tmp_path / "src", f"room_{i}", coord, color, label)
    rc, out, err = run(capsys, tmp_path / "src", tmp_path / "data", "--workers", "2")
    assert rc == 0, err
    for path in (tmp_path / "data" / "mine").glob("*/*"):
        i = int(path.name[-1])
        np.testing.assert_array_equal(np.load(path / "segment.npy"), cloud(seed=i)[2])


def test_make_synthetic_labelled_ply_imports_with_all_classes(tmp_path, capsys):
    from plyfile import PlyData

    src = tmp_path / "scans"
    make_synthetic.main(["--labelled-ply", str(src), "--scenes", "3", "--seed", "1"])
    files = sorted(src.glob("*.ply"))
    assert len(files) == 3
    vertex = PlyData.read(str(files[0]))["vertex"].data
    assert vertex.dtype.names == ("x", "y", "z", "red", "green", "blue", "scalar_Label")
    assert vertex["scalar_Label"].dtype == np.float32 and 20_000 <= len(vertex) <= 40_000
    classes = [c for c in (src / "classes.txt").read_text().splitlines() if c and not c.startswith("#")]
    from ppt.data.classes import DATASETS
    builtin = {c for info in DATASETS.values() for c in info.class_names}
    assert len(set(classes) - builtin) >= 3                     # a label set of its own
    again = tmp_path / "again"
    make_synthetic.main(["--labelled-ply", str(again), "--scenes", "3", "--seed", "1"])
    assert all((again / f.name).read_bytes() == f.read_bytes() for f in files)   # deterministic
    capsys.readouterr()
    rc, out, err = run(capsys, src, tmp_path / "data", "--normal-k", "8", classes=str(src / "classes.txt"),
                       name="office")
    assert rc == 0, err
    counts = np.zeros(len(classes), np.int64)
    for seg in (tmp_path / "data" / "office").glob("*/*/segment.npy"):
        counts += np.bincount(np.load(seg), minlength=len(classes))
    assert (counts > 0).all(), dict(zip(classes, counts))
    spec = yaml.safe_load((tmp_path / "data" / "office" / "dataset.yaml").read_text())
    assert spec["classes"] == classes and spec["color"] is True
