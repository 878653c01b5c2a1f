"""S3DIS conversion: parsing, known raw defects, alignment, resumable runs after a kill."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppt.data.classes import S3DIS13
from ppt.data.preprocess import s3dis
from ppt.data.scene_io import load_scene

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import preprocess as preprocess_cli  # noqa: E402


def write_points(path, xyz, rgb=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.broadcast_to(np.asarray(rgb), (len(xyz), 3))
    path.write_text("".join(f"{x:.6f} {y:.6f} {z:.6f} {r} {g} {b}\n"
                            for (x, y, z), (r, g, b) in zip(xyz, rgb)))


def plane_points(rng, n, axis, value):
    xyz = rng.uniform(0, 2, size=(n, 3))
    xyz[:, axis] = value
    return xyz


@pytest.fixture()
def raw(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "Stanford3dDataset_v1.2"
    ann = root / "Area_1" / "office_1" / "Annotations"
    write_points(ann / "floor_1.txt", plane_points(rng, 200, 2, 0.0))
    write_points(ann / "wall_1.txt", plane_points(rng, 200, 0, 0.0), rgb=(200, 100, 0))
    write_points(ann / "stairs_1.txt", rng.uniform(0.5, 1.0, size=(30, 3)))
    write_points(ann / "chair_2.txt", rng.uniform(1.0, 1.5, size=(40, 3)))
    ann = root / "Area_1" / "office_2" / "Annotations"
    write_points(ann / "ceiling_1.txt", plane_points(rng, 100, 2, 3.0))
    # Area_5/hallway_6: the release's stray byte, plus a truncated line.
    ann = root / "Area_5" / "hallway_6" / "Annotations"
    write_points(ann / "ceiling_1.txt", plane_points(rng, 50, 2, 3.0))
    with open(ann / "ceiling_1.txt", "a", encoding="latin-1") as f:
        f.write("1.000000 1.500000 3.000000 185.18\x10 156 123\n")
        f.write("1.000000 1.500000\n")
    write_points(ann / "floor_1.txt", plane_points(rng, 50, 2, 0.0))
    # Area_5/office_36: duplicated "wall_3 (1).txt".
    ann = root / "Area_5" / "office_36" / "Annotations"
    write_points(ann / "wall_3.txt", plane_points(rng, 60, 1, 0.0))
    (ann / "wall_3 (1).txt").write_bytes((ann / "wall_3.txt").read_bytes())
    write_points(ann / "door_1.txt", plane_points(rng, 60, 0, 2.0))
    for area, rooms in (("Area_1", ("office_1 90", "office_2 0")),
                        ("Area_5", ("hallway_6 0", "office_36 180"))):
        (root / area / f"{area}_alignmentAngle.txt").write_text(
            f"## Global alignment angle per disjoint space in {area} ##\n"
            + "\n".join(rooms) + "\n")
    return root


def test_room_arrays_labels_instances_normals(raw, tmp_path):
    tasks = s3dis.list_tasks(raw, tmp_path / "out")
    assert [t.name for t in tasks] == ["Area_1/office_1", "Area_1/office_2", "Area_5/hallway_6",
                                       "Area_5/office_36"]
    arrays = s3dis.process(tasks[0])
    assert {k: v.dtype for k, v in arrays.items()} == {
        "coord": np.float32, "color": np.uint8, "normal": np.float32, "segment": np.int16,
        "instance": np.int16}
    assert len(arrays["coord"]) == 470
    # sorted files: chair_2, floor_1, stairs_1 (-> clutter), wall_1
    seg, inst = arrays["segment"], arrays["instance"]
    names = ("chair", "floor", "clutter", "wall")
    sizes = (40, 200, 30, 200)
    start = 0
    for i, (name, n) in enumerate(zip(names, sizes)):
        assert (seg[start:start + n] == S3DIS13.index(name)).all()
        assert (inst[start:start + n] == i).all()
        start += n
    wall = slice(270, 470)
    assert (arrays["color"][wall] == [200, 100, 0]).all()
    # wall at x = 0, away from the floor edge: normal +x (into the room); floor: +z
    normal, coord = arrays["normal"], arrays["coord"]
    away = (coord[:, 2] > 0.5) & (np.arange(len(coord)) >= 270)
    assert (normal[away, 0] > 0.95).mean() > 0.95
    away = (coord[:, 0] > 0.5) & (np.arange(len(coord)) >= 40) & (np.arange(len(coord)) < 240)
    assert (normal[away, 2] > 0.95).mean() > 0.9


def test_known_defects_warn_and_are_handled(raw, tmp_path):
    tasks = {t.name: t for t in s3dis.list_tasks(raw, tmp_path / "out")}
    with pytest.warns(UserWarning) as caught:
        hallway = s3dis.process(tasks["Area_5/hallway_6"])
    messages = [str(w.message) for w in caught]
    assert any("ceiling_1.txt:51" in m and "repaired" in m for m in messages)
    assert any("ceiling_1.txt:52" in m and "skipped" in m for m in messages)
    assert len(hallway["coord"]) == 50 + 1 + 50
    assert hallway["color"][50].tolist() == [185, 156, 123]
    with pytest.warns(UserWarning, match=r"wall_3 \(1\).txt: duplicate of wall_3.txt, skipped"):
        office = s3dis.process(tasks["Area_5/office_36"])
    assert len(office["coord"]) == 120 and set(office["instance"].tolist()) == {0, 1}


def test_fast_path_parses_clean_files_without_fallback(raw, monkeypatch):
    def no_fallback(text, path):
        raise AssertionError(f"slow path used for {path}")
    monkeypatch.setattr(s3dis, "_parse_lines", no_fallback)
    data = s3dis.read_points(raw / "Area_1" / "office_1" / "Annotations" / "floor_1.txt")
    assert data.shape == (200, 6) and (data[:, 2] == 0).all()


def test_alignment_rotates_about_room_centre(raw, tmp_path):
    plain = s3dis.list_tasks(raw, tmp_path / "a")[0]
    aligned = s3dis.list_tasks(raw, tmp_path / "b", align=True)[0]
    a, b = s3dis.process(plain), s3dis.process(aligned)
    centre = (a["coord"].max(0) + a["coord"].min(0)) / 2
    # office_1 angle 90 degrees -> rotation by -90 degrees: (x, y) -> (y, -x) about the centre
    rel = a["coord"] - centre
    expected = np.stack([rel[:, 1], -rel[:, 0], rel[:, 2]], 1) + centre
    np.testing.assert_allclose(b["coord"], expected, atol=1e-5)
    assert np.median(np.abs(b["normal"][270:, 1])) > 0.99  # the x = 0 wall now faces along y


KILLER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tools!r})
import ppt.data.scene_io as scene_io
calls = [0]
real_save = np.save
def save(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 8:  # 5 arrays per room: the 2nd room is half written
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(*args, **kwargs)
scene_io.np.save = save
import preprocess
preprocess.main(["s3dis", "--raw", {raw!r}, "--out", {out!r}, "--workers", "1", "--no-progress"])
"""


def test_killed_run_leaves_no_half_scene_and_rerun_finishes(raw, tmp_path):
    out = tmp_path / "out"
    script = KILLER.format(tools=str(REPO / "tools"), raw=str(raw), out=str(out))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    area1 = out / "Area_1"
    assert (area1 / "office_1").is_dir() and not (area1 / "office_2").exists()
    stale = list(area1.glob(".office_2.tmp-*"))
    assert len(stale) == 1  # the half-written room is only a temporary folder
    load_scene(area1 / "office_1", 13)

    assert preprocess_cli.main(["s3dis", "--raw", str(raw), "--out", str(out), "--workers", "2",
                                "--no-progress"]) == 0
    assert not list(area1.glob(".*.tmp-*"))
    for room in ("Area_1/office_1", "Area_1/office_2", "Area_5/hallway_6", "Area_5/office_36"):
        load_scene(out / room, 13, require_segment=True)


def test_failure_gives_nonzero_exit_and_rerun_redoes_only_it(raw, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = s3dis.read_points

    def broken(path):
        if "office_2" in str(path):
            raise OSError("disk read error")
        return real(path)
    monkeypatch.setattr(s3dis, "read_points", broken)
    argv = ["s3dis", "--raw", str(raw), "--out", str(out), "--workers", "1", "--no-progress"]
    assert preprocess_cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "done 3, skipped 0, failed 1" in printed and "OSError: disk read error" in printed
    assert "[Area_1] 1 scenes" in printed and "clutter" in printed
    assert not (out / "Area_1" / "office_2").exists()
    monkeypatch.setattr(s3dis, "read_points", real)
    assert preprocess_cli.main(argv) == 0
    assert "done 1, skipped 3, failed 0" in capsys.readouterr().out
    assert preprocess_cli.main(argv + ["--overwrite"]) == 0
    assert "done 4, skipped 0" in capsys.readouterr().out
