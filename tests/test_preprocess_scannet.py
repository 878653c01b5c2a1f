"""ScanNet v2 conversion on tiny scans written in the official raw formats."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from ppt.data.preprocess import scannet
from ppt.data.preprocess.common import run_tasks
from ppt.data.classes import SCANNET20
from ppt.data.scannet200 import CLASS_LABELS_200
from ppt.data.scene_io import load_scene

REPO = Path(__file__).resolve().parents[1]

# id, raw_category, nyu40id; the other official columns are filled with placeholders.
TSV_ROWS = [(1, "wall", 1), (3, "floor", 2), (10, "office chair", 5), (41, "ceiling", 22),
            (12, "crate", 39)]
# Per-vertex labels of an annotated make_scan, computed by hand from TSV_ROWS:
#   floor:        nyu40 2 -> 20-class 1 (floor);          id 3 -> 200-class 2 (floor)
#   ceiling:      nyu40 22 (not among the 20) -> -1;      id 41 -> 200-class 35 (ceiling)
#   crate:        nyu40 39 -> 20-class 19 (otherfurniture); id 12 (not among the 200) -> -1
#   wall:         nyu40 1 -> 0 (wall);                    id 1 -> 0 (wall)
#   office chair: nyu40 5 -> 4 (chair);                   id 10 -> 9 (office chair)
#   unannotated segment and "mystery thing" (not in the TSV): -1 in both.
EXPECTED_SEGMENT20 = [1] * 10 + [-1] * 2 + [19] * 2 + [-1] * 2 + [0] * 4 + [4] * 4 + [0] * 4 + [-1] * 4
EXPECTED_SEGMENT200 = [2] * 10 + [35] * 2 + [-1] * 2 + [-1] * 2 + [0] * 4 + [9] * 4 + [0] * 4 + [-1] * 4
TSV_HEADER = ("id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class\t"
              "eigen13class\tModelNet40\tModelNet10\tShapeNetCore55\tsynsetoffset\twnsynsetid\t"
              "wnsynsetkey\tmpcat40\tmpcat40index")


def grid_mesh(origin, du, dv, n=4):
    """n x n vertex grid origin + i du + j dv; triangles wound so normal = du x dv."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    verts = np.asarray(origin) + i.reshape(-1, 1) * np.asarray(du) + j.reshape(-1, 1) * np.asarray(dv)
    faces = []
    for a in range(n - 1):
        for b in range(n - 1):
            v00, v10, v01, v11 = a * n + b, (a + 1) * n + b, a * n + b + 1, (a + 1) * n + b + 1
            faces += [(v00, v10, v11), (v00, v11, v01)]
    return verts.astype(np.float32), np.asarray(faces)


def write_ply(path, verts, faces, text):
    vertex = np.empty(len(verts), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"),
                                         ("green", "u1"), ("blue", "u1"), ("alpha", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = verts.T
    vertex["red"] = np.arange(len(verts)) % 256
    vertex["green"], vertex["blue"], vertex["alpha"] = 7, 200, 255
    face = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    face["vertex_indices"] = faces
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")],
            text=text).write(str(path))


def make_scan(folder, scene, text=False, annotated=True, matrix=None):
    """Floor (z = 0, normal +z, 16 verts) + wall (y = 1, normal -y, 16 verts)."""
    d = folder / scene
    d.mkdir(parents=True)
    floor_v, floor_f = grid_mesh((0, 0, 0), (0.2, 0, 0), (0, 0.2, 0))
    wall_v, wall_f = grid_mesh((0, 1, 0), (0.2, 0, 0), (0, 0, 0.2))
    verts = np.concatenate([floor_v, wall_v])
    faces = np.concatenate([floor_f, wall_f + 16])
    write_ply(d / f"{scene}_vh_clean_2.ply", verts, faces, text)
    if annotated:
        # floor: seg 10 (10 verts), then seg 50 = "ceiling" and seg 60 = "crate" (2 verts each),
        # last 2 floor verts: seg 99 (unannotated); wall: segs 20 and 21, 4 wall verts: seg 30 =
        # "office chair", seg 40 = category not in the TSV. Labels: EXPECTED_SEGMENT20 / 200.
        seg = np.array([10] * 10 + [50] * 2 + [60] * 2 + [99] * 2 + [20] * 4 + [30] * 4 + [21] * 4
                       + [40] * 4)
        (d / f"{scene}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(
            {"sceneId": scene, "segIndices": seg.tolist()}))
        groups = [{"id": 0, "objectId": 0, "segments": [10], "label": "floor"},
                  {"id": 1, "objectId": 1, "segments": [20, 21], "label": "wall"},
                  {"id": 2, "objectId": 2, "segments": [30], "label": "office chair"},
                  {"id": 3, "objectId": 3, "segments": [40], "label": "mystery thing"},
                  {"id": 4, "objectId": 4, "segments": [50], "label": "ceiling"},
                  {"id": 5, "objectId": 5, "segments": [60], "label": "crate"}]
        (d / f"{scene}.aggregation.json").write_text(json.dumps(
            {"sceneId": scene, "segGroups": groups}))
    if matrix is not None:
        (d / f"{scene}.txt").write_text("colorHeight = 968\naxisAlignment = "
                                        + " ".join(f"{x:g}" for x in matrix.ravel()) + "\n")
    return verts


@pytest.fixture()
def raw(tmp_path):
    root = tmp_path / "ScanNet"
    rot = np.array([[0, -1, 0, 5.0], [1, 0, 0, -2.0], [0, 0, 1, 0.5], [0, 0, 0, 1]])
    make_scan(root / "scans", "scene0000_00", text=False, matrix=rot)
    make_scan(root / "scans", "scene0001_00", text=True, matrix=np.eye(4))
    make_scan(root / "scans_test", "scene0707_00", annotated=False)
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    (root / "scannetv2_val.txt").write_text("scene0001_00\n")
    (root / "scannetv2_test.txt").write_text("scene0707_00\n")
    rows = [f"{i}\t{name}\t{name}\t1\t{nyu}" + "\tx" * 12 for i, name, nyu in TSV_ROWS]
    (root / "scannetv2-labels.combined.tsv").write_text("\n".join([TSV_HEADER, *rows]) + "\n")
    return root


def test_vertex_normals_are_area_weighted_and_follow_winding():
    coord = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0, 0.1]], np.float32)
    # big triangle (area 2, normal +z) and a small one (area 0.1, normal +y) share vertex 0
    faces = np.array([[0, 1, 2], [0, 3, 1]])
    normal = scannet.vertex_normals(coord, faces)
    expected0 = np.array([0, 0.2, 4.0]) / np.linalg.norm([0, 0.2, 4.0])
    np.testing.assert_allclose(normal[0], expected0, atol=1e-6)
    np.testing.assert_allclose(normal[2], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-6)


def test_convert_labels_normals_splits(raw, tmp_path):
    out = tmp_path / "out"
    tasks = scannet.list_tasks(raw, out)
    assert sorted(t.name for t in tasks) == ["test/scene0707_00", "train/scene0000_00",
                                             "val/scene0001_00"]
    with pytest.warns(UserWarning, match="mystery thing"):
        arrays = scannet.process(next(t for t in tasks if t.split == "val"))  # ASCII PLY
    assert {k: v.dtype for k, v in arrays.items()} == {
        "coord": np.float32, "color": np.uint8, "normal": np.float32,
        "segment20": np.int16, "segment200": np.int16, "instance": np.int16}
    np.testing.assert_allclose(arrays["normal"][:16], np.tile([0, 0, 1], (16, 1)), atol=1e-6)
    np.testing.assert_allclose(arrays["normal"][16:], np.tile([0, -1, 0], (16, 1)), atol=1e-6)
    assert arrays["color"][5].tolist() == [5, 7, 200]
    seg20, seg200, inst = arrays["segment20"], arrays["segment200"], arrays["instance"]
    # office chair: "chair" among the 20, its own class among the 200; ceiling: 200 only; crate:
    # 20 only (otherfurniture); the hand-computed labels name the classes they claim to:
    assert [SCANNET20[i] for i in (0, 1, 4, 19)] == ["wall", "floor", "chair", "otherfurniture"]
    assert [CLASS_LABELS_200[i] for i in (0, 2, 9, 35)] == ["wall", "floor", "office chair", "ceiling"]
    assert seg20.tolist() == EXPECTED_SEGMENT20
    assert seg200.tolist() == EXPECTED_SEGMENT200
    assert inst[:10].tolist() == [0] * 10 and inst[10:14].tolist() == [4, 4, 5, 5]
    assert inst[14:16].tolist() == [-1, -1] and inst[20:24].tolist() == [2] * 4
    assert (inst[28:] == 3).all()  # unknown category: no label, still an instance

    summary = run_tasks(tasks, scannet.process, SCANNET20, "segment20", workers=2, progress=False,
                        log=lambda s: None)
    assert summary.ok and summary.count("done") == 3
    test_scene = out / "test" / "scene0707_00"
    assert sorted(p.name for p in test_scene.iterdir()) == ["color.npy", "coord.npy", "normal.npy"]
    scene = load_scene(out / "train" / "scene0000_00", 20, "segment20.npy", require_segment=True)
    binary = np.load(out / "val" / "scene0001_00" / "segment20.npy")
    np.testing.assert_array_equal(scene["segment"], binary)  # binary and ASCII PLY agree
    for split, name in (("train", "scene0000_00"), ("val", "scene0001_00")):  # both files written
        for file, expected in (("segment20.npy", EXPECTED_SEGMENT20), ("segment200.npy", EXPECTED_SEGMENT200)):
            written = np.load(out / split / name / file)
            assert written.dtype == np.int16 and written.tolist() == expected, (split, file)


def test_axis_alignment_moves_coords_and_rotates_normals(raw, tmp_path):
    plain = scannet.list_tasks(raw, tmp_path / "a")
    aligned = scannet.list_tasks(raw, tmp_path / "b", align=True)
    with pytest.warns(UserWarning):
        a = scannet.process(plain[0])
        b = scannet.process(aligned[0])
    expected = np.stack([-a["coord"][:, 1] + 5, a["coord"][:, 0] - 2, a["coord"][:, 2] + 0.5], 1)
    np.testing.assert_allclose(b["coord"], expected, atol=1e-5)
    np.testing.assert_allclose(b["normal"][16:], np.tile([1, 0, 0], (16, 1)), atol=1e-6)


def test_missing_split_list_is_one_clear_error(raw, tmp_path):
    # Lists beside the download are used as one set: a train list without its val list is an
    # error, not a silent mix with the packaged lists.
    (raw / "scannetv2_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="scannetv2_val.txt"):
        scannet.list_tasks(raw, tmp_path / "out")
    (raw / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="elsewhere/scannetv2_train.txt"):
        scannet.list_tasks(raw, tmp_path / "out", splits_dir=raw / "elsewhere")


def test_packaged_split_lists_are_the_official_v2_lists():
    lists = {s: (scannet.PACKAGED_SPLITS / f"scannetv2_{s}.txt").read_text().split()
             for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in lists.items()} == {"train": 1201, "val": 312, "test": 100}
    names = [n for v in lists.values() for n in v]
    assert len(set(names)) == len(names)  # disjoint, no repeats
    assert lists["train"][0] == "scene0191_00" and "scene0011_00" in lists["val"]
    assert all(n.startswith("scene07") or n.startswith("scene08") for n in lists["test"])
    assert scannet.read_split_lists(scannet.PACKAGED_SPLITS)["scene0568_00"] == "val"


def preprocess_cmd(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "preprocess.py"), "scannet",
                           *map(str, args), "--workers", "1", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def official_download(tmp_path):
    """What the official download holds: scans/, scans_test/ and the TSV, no split lists."""
    root = tmp_path / "download"
    for scene in ("scene0000_00", "scene0011_00", "scene0999_00"):  # train, val, in no list
        make_scan(root / "scans", scene, text=True)
    for scene in ("scene0707_00", "scene0999_01"):  # test, in no list
        make_scan(root / "scans_test", scene, annotated=False)
    rows = [f"{i}\t{name}\t{name}\t1\t{nyu}" + "\tx" * 12 for i, name, nyu in TSV_ROWS]
    (root / "scannetv2-labels.combined.tsv").write_text("\n".join([TSV_HEADER, *rows]) + "\n")
    return root


def test_official_download_uses_packaged_lists_and_warns_for_unlisted(official_download, tmp_path):
    out = tmp_path / "out"
    proc = preprocess_cmd("--raw", official_download, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"split lists: {scannet.PACKAGED_SPLITS}" in proc.stdout
    written = sorted(str(p.relative_to(out)) for p in out.glob("*/*"))
    assert written == ["test/scene0707_00", "test/scene0999_01", "train/scene0000_00",
                       "train/scene0999_00", "val/scene0011_00"]
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any("scene0999_00" in line and "train/" in line for line in warned), proc.stderr
    assert any("scene0999_01" in line and "test/" in line for line in warned), proc.stderr
    assert not any("scene0000_00" in line or "scene0707_00" in line for line in warned)
    assert "Traceback" not in proc.stderr
    assert (out / "val" / "scene0011_00" / "segment20.npy").is_file()
    assert not (out / "test" / "scene0999_01" / "segment20.npy").exists()  # scans_test: no labels


def test_only_scans_folder_and_tsv_preprocesses(official_download, tmp_path):
    import shutil

    shutil.rmtree(official_download / "scans_test")
    out = tmp_path / "out"
    proc = preprocess_cmd("--raw", official_download, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]


def test_splits_dir_overrides_packaged_lists(official_download, tmp_path):
    splits = tmp_path / "my_splits"
    splits.mkdir()
    (splits / "scannetv2_train.txt").write_text("scene0011_00\nscene0999_00\n")
    (splits / "scannetv2_val.txt").write_text("scene0000_00\n")
    with pytest.warns(UserWarning, match="scans_test: 2 scan.*scene0707_00, scene0999_01"):
        tasks = scannet.list_tasks(official_download, tmp_path / "out", splits_dir=splits)
    assert sorted(t.name for t in tasks) == ["test/scene0707_00", "test/scene0999_01",
                                             "train/scene0011_00", "train/scene0999_00",
                                             "val/scene0000_00"]


def test_scene_in_two_lists_is_an_error(raw, tmp_path):
    (raw / "scannetv2_val.txt").write_text("scene0001_00\nscene0000_00\n")
    with pytest.raises(ValueError, match="scene0000_00 is also listed in scannetv2_train.txt"):
        scannet.list_tasks(raw, tmp_path / "out")


def test_vertex_count_mismatch_fails_that_scene_only(raw, tmp_path):
    segs = raw / "scans" / "scene0000_00" / "scene0000_00_vh_clean_2.0.010000.segs.json"
    segs.write_text(json.dumps({"segIndices": [0, 1, 2]}))
    lines = []
    summary = run_tasks(scannet.list_tasks(raw, tmp_path / "out"), scannet.process, SCANNET20,
                        "segment20", workers=1, progress=False, log=lines.append)
    assert not summary.ok and summary.count("done") == 2
    assert "3 segIndices but the mesh has 32 vertices" in lines[-1] or any(
        "3 segIndices but the mesh has 32 vertices" in line for line in lines)
    assert not (tmp_path / "out" / "train" / "scene0000_00").exists()


def test_non_triangle_faces_are_one_clear_error(tmp_path):
    verts = np.zeros((4, 3), np.float32)
    vertex = np.array([tuple(v) + (0, 0, 0, 255) for v in verts],
                      dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"),
                             ("green", "u1"), ("blue", "u1"), ("alpha", "u1")])
    face = np.empty(1, dtype=[("vertex_indices", "i4", (4,))])
    face["vertex_indices"] = [[0, 1, 2, 3]]
    path = tmp_path / "quad.ply"
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")]).write(
        str(path))
    with pytest.raises(ValueError, match=r"quad.ply: expected triangle faces.*\[4\]"):
        scannet.read_mesh(path)
