"""Users' own clouds: the readers (ppt.data.clouds), tiled prediction (ppt.engine.predict) and
tools/infer.py end to end in a subprocess, on a tiny model saved without training."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from ppt.data.classes import SCANNET20, union_label_space, S3DIS13
from ppt.data.clouds import CloudError, list_inputs, palette, read_cloud
from ppt.engine.predict import Predictor, predict_chunked, xy_tiles

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ppt_infer_tool", REPO / "tools" / "infer.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = ["model.channels=[8,8,16,16,16,8,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "data.voxel_size=0.1", "data.mix={scannet: 1, s3dis: 1}", "data.check=false"]


def save_experiment(folder: Path, *overrides: str, best: bool = True) -> Path:
    """An experiment folder (config.yaml + checkpoint) of a randomly initialised tiny model:
    its predictions vary from point to point, and no training time is spent. The language
    head gets random class embeddings (stored in the checkpoint, as real ones are): no text
    encoder runs."""
    from ppt.config import load_config, save_config
    from ppt.data.dataset_file import get_dataset_info
    from ppt.engine.build import build_model, model_datasets

    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    embeddings = {d: torch.randn(get_dataset_info(d).num_classes, 32) for d in model_datasets(cfg)}
    model = build_model(cfg, embeddings)
    (folder / "model").mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    torch.save({"model": model.state_dict()}, folder / "model" / ("model_best.pth" if best else "model_last.pth"))
    return folder


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return save_experiment(tmp_path_factory.mktemp("exp") / "tiny")


def room(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coord f32 (n, 3), colour uint8 (n, 3)): a 6 x 4 x 2.5 m box of floor, walls and blobs."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform([0, 0, 0], [6, 4, 2.5], (n, 3)).astype(np.float32)
    surface = rng.integers(0, 3, n)
    coord[surface == 0, 2] = 0.0                        # floor
    coord[surface == 1, 0] = rng.choice([0.0, 6.0], (surface == 1).sum())  # two walls
    color = (np.stack([coord[:, 0] * 40, coord[:, 1] * 60, coord[:, 2] * 100], 1) % 256).astype(np.uint8)
    return coord, color


def write_ply(path: Path, coord, color=None, normal=None, text=False, byte_order="<", xyz="f4",
              color_type="u1", color_names=("red", "green", "blue"), faces=None) -> None:
    fields = [("x", xyz), ("y", xyz), ("z", xyz)]
    if color is not None:
        fields += [(n, color_type) for n in color_names]
    if normal is not None:
        fields += [("nx", "f4"), ("ny", "f4"), ("nz", "f4")]
    vertex = np.empty(len(coord), fields)
    for i, a in enumerate("xyz"):
        vertex[a] = coord[:, i]
    if color is not None:
        for i, n in enumerate(color_names):
            vertex[n] = color[:, i]
    if normal is not None:
        for i, n in enumerate(("nx", "ny", "nz")):
            vertex[n] = normal[:, i]
    elements = [PlyElement.describe(vertex, "vertex")]
    if faces is not None:
        face = np.empty(len(faces), [("vertex_indices", "i4", (faces.shape[1],))])
        face["vertex_indices"] = faces
        elements.append(PlyElement.describe(face, "face"))
    PlyData(elements, text=text, byte_order=byte_order).write(str(path))


# --- readers ---------------------------------------------------------------------------------

def test_binary_big_endian_double_xyz_float_colour_and_normals(tmp_path):
    coord = np.array([[1e5 + 0.123456789, 2.5, 3.0], [4.0, 5.0, 6.0]], np.float64)
    color = np.array([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]], np.float32)
    normal = np.array([[0, 0, 1], [1, 0, 0]], np.float32)
    write_ply(tmp_path / "a.ply", coord, color, normal, byte_order=">", xyz="f8", color_type="f4")
    cloud = read_cloud(tmp_path / "a.ply")
    assert cloud.coord.dtype == np.float64 and cloud.coord.dtype.isnative
    np.testing.assert_array_equal(cloud.coord, coord)     # full double precision kept
    np.testing.assert_allclose(cloud.color, color * 255)  # 0..1 detected
    np.testing.assert_array_equal(cloud.normal, normal)
    assert any("0..1" in n for n in cloud.notes)


def test_ascii_ply_mesh_with_r_g_b_names_uses_vertices(tmp_path):
    coord = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    color = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [200, 210, 220]], np.uint8)
    write_ply(tmp_path / "m.ply", coord, color, text=True, color_names=("r", "g", "b"),
              faces=np.array([[0, 1, 2, 3]]))  # one quad: not a triangle list
    cloud = read_cloud(tmp_path / "m.ply")
    np.testing.assert_array_equal(cloud.coord, coord)
    np.testing.assert_array_equal(cloud.color, color.astype(np.float32))  # 0..255 kept as is
    assert cloud.normal is None and cloud.notes == []


def test_text_with_header_and_commas_and_16_bit_colour(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_text("X,Y,Z,R,G,B\n1.5,2,3,65535,0,32768\n# comment\n4,5,6,0,65535,0\n")
    cloud = read_cloud(path)
    np.testing.assert_array_equal(cloud.coord, [[1.5, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(cloud.color, [[255, 0, 127.5], [0, 255, 0]], atol=0.01)
    assert any("16-bit" in n for n in cloud.notes)


def test_nan_rows_dropped_with_count_and_all_bad_refused(tmp_path):
    array = np.arange(30, dtype=np.float64).reshape(5, 6)
    array[1, 0], array[3, 2] = np.nan, np.inf
    np.save(tmp_path / "a.npy", array)
    cloud = read_cloud(tmp_path / "a.npy")
    assert len(cloud) == 3 and cloud.valid.tolist() == [True, False, True, False, True]
    np.testing.assert_array_equal(cloud.coord, array[[0, 2, 4], :3])
    np.testing.assert_array_equal(cloud.color, array[[0, 2, 4], 3:].astype(np.float32))
    assert "dropped 2 of 5 points with NaN/inf coordinates" in cloud.notes
    np.save(tmp_path / "b.npy", np.full((4, 3), np.nan))
    with pytest.raises(CloudError, match=r"b.npy: all 4 points have NaN/inf"):
        read_cloud(tmp_path / "b.npy")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "empty point cloud"),
    ("words.txt", "hello world\nthis is prose\n", "not a point cloud"),
    ("ragged.txt", "1 2 3\n4 5\n", "not a point cloud"),
    ("four.npy", np.zeros((5, 4)), r"expected N rows of 3 \(x y z\), 6 .* got shape \(5, 4\)"),
    ("none.npy", np.zeros((0, 3)), "empty point cloud"),
    ("text.npy", "1 2 3\n", r"not a .npy file \(no NumPy header\)"),
    ("fake.ply", "this is not a ply file\n", "not a readable PLY file"),
    ("noxyz.ply", "noxyz", r"no x, y, z properties \(they have: a, b\)"),
    ("novertex.ply", "novertex", r"no 'vertex' element \(elements: face\)"),
    ("cut.ply", "cut", "not a readable PLY file"),
])
def test_bad_files_are_one_clear_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content == "noxyz":
        PlyData([PlyElement.describe(np.zeros(3, [("a", "f4"), ("b", "f4")]), "vertex")]).write(str(path))
    elif content == "novertex":
        PlyData([PlyElement.describe(np.zeros(2, [("vertex_indices", "i4", (3,))]), "face")]).write(str(path))
    elif content == "cut":
        write_ply(path, *room(100))
        path.write_bytes(path.read_bytes()[:-700])  # truncated binary body
    else:
        path.write_text(content)
    with pytest.raises(CloudError, match=message) as info:
        read_cloud(path)
    assert str(info.value).startswith(str(path))


def test_labelled_ply_keeps_double_coordinates(tmp_path):
    from ppt.data.clouds import write_labelled_ply

    coord = np.array([[512345.123456789, 5412345.987654321, 101.25], [0.5, 0.25, 0.125]])
    write_labelled_ply(tmp_path / "p.ply", coord, np.array([2, 0]), 3,
                       {"label": ("i2", np.array([2, 0])), "confidence": ("f4", np.array([0.5, 0.9]))})
    vertex = PlyData.read(str(tmp_path / "p.ply"))["vertex"]
    np.testing.assert_array_equal(np.stack([vertex[a] for a in "xyz"], 1), coord)  # float32 would lose ~5 cm
    assert vertex["label"].tolist() == [2, 0] and vertex["red"].tolist() == palette(3)[[2, 0], 0].tolist()
    assert vertex["confidence"].dtype == np.float32 and vertex["confidence"].tolist() == [0.5, np.float32(0.9)]


def redmean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Colour distance 0..765 that tracks what the eye tells apart (the "redmean" weighting):
    independent of the CIELAB distance the palette is built with."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    r, d = (a[..., 0] + b[..., 0]) / 2, a - b
    return np.sqrt((2 + r / 256) * d[..., 0] ** 2 + 4 * d[..., 1] ** 2 + (2 + (255 - r) / 256) * d[..., 2] ** 2)


@pytest.mark.parametrize("datasets", [("scannet", "s3dis", "structured3d"), ("scannet",), ("s3dis",),
                                      ("structured3d",)])
def test_no_two_classes_in_a_picture_share_a_colour(datasets):
    # The golden-ratio hues used before gave wall and otherprop/clutter the same yellow (redmean
    # distance 24); every pair of classes, and each class against the white background and the
    # grey of dropped rows, must now be far apart.
    from ppt.data.dataset_file import get_dataset_info

    names, _ = union_label_space({d: get_dataset_info(d).class_names for d in datasets})
    colours = palette(len(names))
    assert colours.shape == (len(names) + 1, 3) and colours[-1].tolist() == [128, 128, 128]
    cls = colours[:-1]
    pairs = redmean(cls[:, None], cls[None])
    np.fill_diagonal(pairs, np.inf)
    i, j = np.unravel_index(np.argmin(pairs), pairs.shape)
    assert pairs[i, j] > 60, (names[i], names[j], cls[i], cls[j])
    assert redmean(cls, np.array([255, 255, 255])).min() > 60 and redmean(cls, colours[-1]).min() > 60
    assert (palette(len(names) + 5)[:len(names)] == cls).all()  # a class keeps its colour in longer lists


def test_list_inputs_expands_folders_and_skips_the_output_folder(tmp_path):
    (tmp_path / "scans" / "out").mkdir(parents=True)
    (tmp_path / "scans" / "sub").mkdir()
    for name in ("b.ply", "a.npy", "notes.md", "pts.csv"):
        (tmp_path / "scans" / name).write_text("x")
    (tmp_path / "scans" / "out" / "a_pred.ply").write_text("x")
    (tmp_path / "scans" / "sub" / "c.ply").write_text("x")
    files, errors, skipped = list_inputs([tmp_path / "scans", tmp_path / "scans" / "a.npy", tmp_path / "nope.ply",
                                          tmp_path / "scans" / "notes.md"], exclude=tmp_path / "scans" / "out")
    assert [f.name for f in files] == ["a.npy", "b.ply"]  # sorted, no repeat, no .md, not recursive
    assert len(errors) == 2 and "nope.ply: no such file" in errors[0]
    assert "notes.md: not a point cloud format (.md); supported: .ply, .npy, .txt, .xyz" in errors[1]
    # What a folder held but was not read is said, with why (the output folder is not mentioned).
    assert len(skipped) == 3, skipped
    assert skipped[0].endswith("notes.md: not a point cloud format (.md); supported: .ply, .npy, .txt, .xyz")
    assert "pts.csv: not a point cloud format (.csv)" in skipped[1] and "rename it to .txt" in skipped[1]
    assert "sub: a folder" in skipped[2] and "not recursively" in skipped[2]


def test_cli_lists_the_files_a_folder_held_but_did_not_read(experiment, tmp_path, capsys):
    (tmp_path / "scans").mkdir()
    np.save(tmp_path / "scans" / "a.npy", np.concatenate(room(300), 1))
    (tmp_path / "scans" / "README.md").write_text("my scans")
    (tmp_path / "scans" / "pts.csv").write_text("1,2,3\n")
    rc = tool.main([str(tmp_path / "scans"), "--exp", str(experiment), "--out", str(tmp_path / "out"),
                    "--device", "cpu"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("skipped")]
    assert rc == 0 and len(lines) == 2, lines  # skipping is not a failure
    assert "README.md: not a point cloud format (.md); supported: .ply, .npy, .txt, .xyz" in lines[0]
    assert "pts.csv: not a point cloud format (.csv)" in lines[1]
    assert (tmp_path / "out" / "a_pred.npy").is_file()


# --- tiles -----------------------------------------------------------------------------------

def test_tiles_partition_the_plane_and_respect_the_budget():
    coord, _ = room(20000)
    voxel, budget, margin = 0.1, 800, 3
    tiles = xy_tiles(coord, voxel, budget, margin)
    assert len(tiles) > 4
    cell = np.floor(coord[:, :2].astype(np.float64) / voxel).astype(np.int64)
    inside = np.stack([((cell >= lo) & (cell < hi)).all(1) for lo, hi in tiles])
    assert (inside.sum(0) == 1).all()  # every point in exactly one core
    grid = np.floor(coord.astype(np.float64) / voxel).astype(np.int64)
    for lo, hi in tiles:
        grown = ((cell >= lo - margin) & (cell < hi + margin)).all(1)
        assert len(np.unique(grid[grown], axis=0)) <= budget


def position_scores(scene: dict) -> torch.Tensor:
    """A stand-in for a model pass: scores that depend only on each point's own position, so
    any pass over any subset must give every point the same row."""
    c = scene["coord"].astype(np.float64)
    k = np.arange(5)
    logits = np.sin(c[:, :1] * (k + 1) * 1.7 + c[:, 1:2] * (5 - k) * 0.9 + c[:, 2:3] * k)
    return torch.from_numpy(np.exp(3 * logits)).float() * 2.0  # rows not normalised on purpose


def test_tiled_scores_land_on_their_own_points():
    coord, color = room(20000, seed=1)
    scene = {"coord": coord, "color": color.astype(np.float32), "normal": np.zeros_like(coord)}
    whole, passes = predict_chunked(scene, position_scores, 0.1, 10**9, 0.3)
    assert passes == 1
    tiled, passes = predict_chunked(scene, position_scores, 0.1, 800, 0.3)
    assert passes > 4
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiled.sum(1), 1, rtol=1e-5)


def lattice_room(offset_x: int, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """One point per voxel of a 40 x 30 x 20-voxel room (floor, three walls, a box), shifted
    ``offset_x`` voxels in x; colour varies along the walls."""
    i, j, k = np.meshgrid(np.arange(40), np.arange(30), np.arange(20), indexing="ij")
    solid = (k == 0) | (i == 0) | (i == 39) | (j == 0) | ((i > 10) & (i < 20) & (j > 8) & (j < 15) & (k < 6))
    cells = np.stack([i[solid], j[solid], k[solid]], 1)
    index = cells + [offset_x, 0, 0]
    # Index 0 at exactly 0 (the minimum the predictor and CenterShift subtract), the others at
    # (index + 0.5) voxels: after every shift the pipeline makes (whole scene or one tile) the
    # points stay a quarter or half voxel away from voxel boundaries, where float rounding
    # could otherwise merge neighbours differently in the two runs.
    coord = np.where(index == 0, 0.0, (index + 0.5) * voxel).astype(np.float32)
    color = np.stack([cells[:, 0] * 6, cells[:, 1] * 8, cells[:, 2] * 12], 1).astype(np.float32)
    return coord, color


def test_tiles_that_cut_no_room_give_exactly_the_whole_scene_prediction(experiment):
    # Two rooms 16 m apart (160 voxels: a multiple of the network's total stride 16, so each
    # room's sparse grid is the same alone or together; one point per voxel, at its centre, so
    # grid sampling keeps the same points): a tile holding one room must label it exactly as
    # the whole scene does. Misplaced tile scores would agree only by chance.
    a, ca = lattice_room(0, 0.1)
    b, cb = lattice_room(160, 0.1)
    array = np.concatenate([np.concatenate([a, b]), np.concatenate([ca, cb])], 1)
    whole = Predictor(experiment, device="cpu").predict(array)
    tiled = Predictor(experiment, device="cpu", max_points=len(a) + 100, overlap=1.0).predict(array)
    assert whole.chunks == 1 and tiled.chunks == 2
    shares = np.bincount(whole.labels) / len(whole.labels)
    chance = (shares ** 2).sum()
    assert chance < 0.8, shares  # the labels vary: agreeing means something
    assert (tiled.labels == whole.labels).mean() > 0.99
    np.testing.assert_allclose(tiled.confidence, whole.confidence, atol=1e-3)


def test_python_api_arrays_paths_and_label_sets(experiment, tmp_path):
    import ppt

    coord, color = room(3000, seed=3)
    array = np.concatenate([coord, color], 1).astype(np.float64)
    array[7, 1] = np.nan
    pred = ppt.predict(array, exp=experiment, device="cpu")
    union, _ = union_label_space({"scannet": SCANNET20, "s3dis": S3DIS13})
    assert pred.class_names == union
    assert pred.labels.shape == (3000,) and pred.labels[7] == -1 and (pred.labels[np.arange(3000) != 7] >= 0).all()
    assert pred.confidence[7] == 0 and (pred.confidence[pred.labels >= 0] > 0).all()
    assert sum(pred.histogram().values()) == 2999
    np.save(tmp_path / "c.npy", array)
    predictor = ppt.Predictor(experiment, device="cpu", prompt="s3dis")
    assert predictor.class_names == S3DIS13
    np.testing.assert_array_equal(predictor.predict(tmp_path / "c.npy").labels,
                                  predictor.predict(array[:, :3], color=array[:, 3:]).labels)


# --- the command line ------------------------------------------------------------------------

def infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "infer.py"), *map(str, args), "--device", "cpu"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_writes_one_labelled_vertex_per_point_and_survives_bad_inputs(experiment, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    coord, color = room(4000, seed=4)
    write_ply(inputs / "scan.ply", coord, color)                    # another program's PLY, no normals
    txt_coord, txt_color = room(1500, seed=5)
    np.savetxt(inputs / "area.txt", np.concatenate([txt_coord, txt_color], 1), fmt="%.4f")
    npy = np.concatenate(room(2500, seed=6), 1).astype(np.float32)
    npy[[10, 20], 0] = np.nan
    np.save(inputs / "room.npy", npy)
    (inputs / "empty.txt").write_text("")
    (inputs / "broken.ply").write_text("ply\nformat nonsense\n")
    out = tmp_path / "out"
    proc = infer(inputs / "scan.ply", inputs / "area.txt", inputs / "room.npy", inputs / "empty.txt",
                 inputs / "broken.ply", "--exp", experiment, "--out", out, "--png")
    assert proc.returncode == 2, proc.stderr[-3000:]  # a user error: two inputs could not be labelled
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "empty.txt" in errors[0] and "empty point cloud" in errors[0]
    assert "broken.ply" in errors[1] and "not a readable PLY" in errors[1]
    assert "Traceback" not in proc.stderr
    assert "dropped 2 of 2500 points with NaN/inf coordinates" in proc.stdout
    assert "no normals: estimated" in proc.stdout and "points/s" in proc.stdout

    labels = json.loads((out / "labels.json").read_text())
    names = labels["class_names"]
    colours = palette(len(names))
    for stem, xyz, n_in in (("scan", coord, 4000), ("area", txt_coord, 1500), ("room", npy[:, :3], 2500)):
        for suffix in ("ply", "npy", "png"):
            assert f"wrote {out / f'{stem}_pred.{suffix}'}" in proc.stdout
        pred = np.load(out / f"{stem}_pred.npy")
        assert pred.dtype == np.int16 and pred.shape == (n_in,)
        valid = np.isfinite(xyz).all(1)
        assert (pred[~valid] == -1).all() and (pred[valid] >= 0).all() and (pred[valid] < len(names)).all()
        vertex = PlyData.read(str(out / f"{stem}_pred.ply"))["vertex"]
        assert len(vertex) == valid.sum()
        np.testing.assert_allclose(np.stack([vertex[a] for a in "xyz"], 1), xyz[valid], atol=1e-4)
        np.testing.assert_array_equal(vertex["label"], pred[valid])
        np.testing.assert_array_equal(np.stack([vertex[c] for c in ("red", "green", "blue")], 1),
                                      colours[pred[valid]])
        assert ((vertex["confidence"] > 0) & (vertex["confidence"] <= 1)).all()
    assert [e["color"] for e in labels["labels"]] == colours[:-1].tolist()
    assert not list(out.glob(".*tmp")) and not (out / "empty_pred.npy").exists()
    assert not (out / "broken_pred.ply").exists()

    # The command line and the Python API read and label the same points the same way.
    api = Predictor(experiment, device="cpu").predict(inputs / "scan.ply")
    np.testing.assert_array_equal(np.load(out / "scan_pred.npy"), api.labels)


def test_cli_usage_errors_are_one_line(experiment, tmp_path, capsys):
    # In-process through main() (the same code as the command line) to spare four interpreter
    # start-ups; the end-to-end test above runs the real subprocess.
    decoupled = save_experiment(tmp_path / "dec", "model.head=decoupled", best=False)  # model_last.pth only
    np.save(tmp_path / "a.npy", np.concatenate(room(500), 1))
    cases = [
        (["--exp", decoupled, "--classes", "wall,floor"], "needs the language head; this model's head is 'decoupled'"),
        (["--exp", experiment, "--prompt", "structured3d"], "unknown prompt 'structured3d'; valid: scannet, s3dis, mean"),
        (["--exp", experiment, "--classes", " , "], "names no class"),
        (["--exp", tmp_path / "missing"], "experiment folder"),
        ([], "give --exp"),
    ]
    for args, message in cases:
        rc = tool.main([str(tmp_path / "a.npy"), *map(str, args), "--device", "cpu"])
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0], (args, errors)
    assert not (decoupled / "infer").exists() and not (experiment / "infer").exists()
    rc = tool.main([str(tmp_path / "nothing.ply"), "--exp", str(experiment)])
    assert rc == 2 and "nothing.ply: no such file" in capsys.readouterr().err
    # The decoupled model loads from model_last.pth and predicts its first dataset's classes.
    rc = tool.main([str(tmp_path / "a.npy"), "--exp", str(decoupled), "--max-points", "200", "--overlap", "0.3",
                    "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    run = decoupled / "infer" / os.readlink(decoupled / "infer" / "latest")  # this run's own folder
    assert json.loads((run / "labels.json").read_text())["class_names"] == list(SCANNET20)
    assert "tiles" in out and "tile 1/" in out and f"wrote {run / 'a_pred.ply'}" in out
