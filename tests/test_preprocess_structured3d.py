"""Structured3D conversion on analytically rendered views of a known box room."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from ppt.data.classes import STRUCTURED3D25
from ppt.data.preprocess import structured3d
from ppt.data.preprocess.common import run_tasks
from ppt.data.scene_io import load_scene

BOX = np.array([4000.0, 3000.0, 2800.0])  # room [0, 4] x [0, 3] x [0, 2.8] m, in mm
PANO_CAM = np.array([1500.0, 1200.0, 1400.0])
PERSP_CAM = np.array([2000.0, 1500.0, 1500.0])
FORWARD = np.array([1.0, 0.3, -0.2]) / np.linalg.norm([1.0, 0.3, -0.2])
XFOV = 0.55  # half angles, radians
PANO_HW, PERSP_HW = (64, 128), (48, 64)
# NYU40 ids: wall 1, floor 2, ceiling 22, door 8, counter 12 (not a Structured3D-25 class)
COLOURS = {1: (200, 10, 10), 2: (10, 200, 10), 22: (10, 10, 200), 8: (90, 90, 0), 12: (0, 90, 90)}


def hit_box(origin, dirs):
    """Ray parameter t > 0 where origin + t dirs leaves the box, and the hit point."""
    with np.errstate(divide="ignore"):
        t_hi = np.where(dirs > 0, (BOX - origin) / dirs, np.inf)
        t_lo = np.where(dirs < 0, (0 - origin) / dirs, np.inf)
    t = np.minimum(t_hi, t_lo).min(axis=-1)
    return t, origin + t[..., None] * dirs


def surface_label(p):
    """NYU40 id of the surface at points p (mm); 0 = unlabelled patch."""
    label = np.ones(p.shape[:-1], np.uint8)  # walls
    label[p[..., 2] < 1] = 2
    label[p[..., 2] > BOX[2] - 1] = 22
    door = (p[..., 0] > BOX[0] - 1) & (np.abs(p[..., 1] - 1500) < 500) & (p[..., 2] < 2000)
    label[door] = 8
    counter = (p[..., 1] > BOX[1] - 1) & (p[..., 0] < 1000) & (p[..., 2] < 900)
    label[counter] = 12
    label[(p[..., 0] < 1) & (p[..., 2] > 2000)] = 0  # unlabelled patch high on the x = 0 wall
    return label


def render_panorama():
    h, w = PANO_HW
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    lon = u / w * 2 * np.pi - np.pi  # column 0 looks along -y, centre column along +y
    lat = np.pi / 2 - v / h * np.pi  # row 0 looks straight up
    dirs = np.stack([np.sin(lon) * np.cos(lat), np.cos(lon) * np.cos(lat), np.sin(lat)], -1)
    t, p = hit_box(PANO_CAM, dirs)
    return np.round(t).astype(np.uint16), surface_label(p)  # t = distance along the ray


def render_perspective():
    h, w = PERSP_HW
    up = np.array([0, 0, 1.0]) - FORWARD * FORWARD[2]
    up /= np.linalg.norm(up)
    right = np.cross(FORWARD, up)
    yfov = np.arctan(np.tan(XFOV) * h / w)
    k = np.array([[w / 2 / np.tan(XFOV), 0, w / 2], [0, h / 2 / np.tan(yfov), h / 2], [0, 0, 1]])
    rot = np.stack([right, -up, FORWARD], 1)  # camera (x right, y down, z forward) -> world
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    pix = np.stack([u, v, np.ones_like(u)], -1)
    dirs = pix @ np.linalg.inv(k).T @ rot.T  # unit z-component in the camera frame
    t, p = hit_box(PERSP_CAM, dirs)
    pose = [*PERSP_CAM, *FORWARD, *up, XFOV, yfov, 1]
    return np.round(t).astype(np.uint16), surface_label(p), " ".join(f"{x:.9g}" for x in pose)


def png(array, mode=None, palette=False):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    if palette:  # like the release: 8-bit indices = NYU40 ids, coloured by a palette
        image = image.convert("L").convert("P")
        pal = np.random.default_rng(1).integers(0, 256, size=768).astype(np.uint8)
        image.putpalette(pal.tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def room_files(semantic_mode="P"):
    pano_depth, pano_sem = render_panorama()
    persp_depth, persp_sem, pose = render_perspective()
    files = {"panorama/camera_xyz.txt": " ".join(f"{x:g}" for x in PANO_CAM).encode()}
    for prefix, depth, sem in (("panorama/full", pano_depth, pano_sem),
                               ("perspective/full/0", persp_depth, persp_sem)):
        rgba = np.zeros(sem.shape + (4,), np.uint8)
        for nyu, colour in COLOURS.items():
            rgba[sem == nyu, :3] = colour
        rgba[..., 3] = 255
        files[f"{prefix}/depth.png"] = png(depth)
        sem_png = png(sem, palette=True) if semantic_mode == "P" else png(
            np.repeat(sem[..., None], 3, -1))
        files[f"{prefix}/semantic.png"] = sem_png
        files[f"{prefix}/rgb_rawlight.png"] = png(rgba)
    files["perspective/full/0/camera_pose.txt"] = pose.encode()
    return files


SCENES = {"scene_00000": "485142", "scene_03000": "7", "scene_03250": "12"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The same box room in three scenes, as extracted folders and as the official zips."""
    root = tmp_path_factory.mktemp("s3d")
    folder = root / "extracted" / "Structured3D"
    files = room_files()
    (root / "zips").mkdir()
    pano_zip = zipfile.ZipFile(root / "zips" / "Structured3D_panorama_00.zip", "w")
    persp_zip = zipfile.ZipFile(root / "zips" / "Structured3D_perspective_full_00.zip", "w")
    for scene, room in SCENES.items():
        for rel, data in files.items():
            name = f"{scene}/2D_rendering/{room}/{rel}"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            (pano_zip if rel.startswith("panorama") else persp_zip).writestr(
                f"Structured3D/{name}", data)
    pano_zip.close()
    persp_zip.close()
    return root


def surface_distance(coord):
    box = BOX / 1000
    return np.minimum(coord, box - coord).min(axis=1)


def convert(raw_dir, out, **kwargs):
    tasks = structured3d.list_tasks(raw_dir, out, **kwargs)
    summary = run_tasks(tasks, structured3d.process, STRUCTURED3D25, workers=1, progress=False,
                        log=lambda s: None)
    assert summary.ok, [r.reason for r in summary.results]
    return tasks


def test_box_room_points_labels_colours_normals(raw, tmp_path):
    out = tmp_path / "out"
    tasks = convert(raw / "extracted", out)
    assert sorted(t.name for t in tasks) == ["scene_00000/room_485142", "scene_03000/room_7",
                                             "scene_03250/room_12"]
    for split, scene, room in (("train", "scene_00000", "485142"), ("val", "scene_03000", "7"),
                               ("test", "scene_03250", "12")):
        assert (out / split / scene / f"room_{room}" / "coord.npy").is_file()
    folder = out / "train" / "scene_00000" / "room_485142"
    dtypes = {p.stem: np.load(p).dtype for p in folder.glob("*.npy")}
    assert dtypes == {"coord": np.float32, "color": np.uint8, "normal": np.float32,
                      "segment": np.int16}
    scene = load_scene(folder, 25, require_segment=True)
    coord, seg, color = scene["coord"], scene["segment"], scene["color"]
    assert len(coord) > 5000
    box = BOX / 1000
    assert (coord > -0.003).all() and (coord < box + 0.003).all()
    assert surface_distance(coord).max() < 0.004  # every point on a wall, floor or ceiling
    index = {name: i for i, name in enumerate(STRUCTURED3D25)}
    floor, ceiling = np.abs(coord[:, 2]) < 0.004, np.abs(coord[:, 2] - box[2]) < 0.004
    assert (seg[floor] == index["floor"]).mean() > 0.97
    assert (seg[ceiling] == index["ceiling"]).mean() > 0.97
    door = (np.abs(coord[:, 0] - box[0]) < 0.004) & (np.abs(coord[:, 1] - 1.5) < 0.45) & (
        coord[:, 2] < 1.95) & (coord[:, 2] > 0.05)
    assert door.sum() > 50 and (seg[door] == index["door"]).all()
    assert (color[door] == COLOURS[8]).all()
    counter = (np.abs(coord[:, 1] - box[1]) < 0.004) & (coord[:, 0] < 0.95) & (coord[:, 2] < 0.85) & (
        coord[:, 2] > 0.05) & (coord[:, 0] > 0.05)
    assert counter.sum() > 20 and (seg[counter] == -1).all()  # NYU40 12 is not a class
    unlabelled = (coord[:, 0] < 0.004) & (coord[:, 2] > 2.05) & (coord[:, 2] < box[2] - 0.05)
    assert unlabelled.sum() == 0  # semantic 0 pixels are dropped
    inner = floor & (coord[:, 0] > 0.5) & (coord[:, 0] < 3.5) & (coord[:, 1] > 0.5) & (
        coord[:, 1] < 2.5)
    assert np.median(scene["normal"][inner, 2]) > 0.99  # floor normals point up, into the room


def test_panorama_and_perspective_agree(raw, tmp_path):
    from scipy.spatial import cKDTree

    pano = convert(raw / "extracted", tmp_path / "pano", perspective=False, voxel=0)[0]
    persp = convert(raw / "extracted", tmp_path / "persp", panorama=False, voxel=0)[0]
    a = load_scene(pano.out_dir, 25)
    b = load_scene(persp.out_dir, 25)
    assert surface_distance(b["coord"]).max() < 0.004  # z-depth read as z-depth, not ray length
    dist, nearest = cKDTree(a["coord"]).query(b["coord"])
    assert np.median(dist) < 0.06 and np.quantile(dist, 0.95) < 0.15
    assert (a["segment"][nearest] == b["segment"]).mean() > 0.95
    assert (a["color"][nearest] == b["color"]).all(axis=1).mean() > 0.95


def test_zip_input_matches_extracted_folders(raw, tmp_path):
    convert(raw / "extracted", tmp_path / "a")
    convert(raw / "zips", tmp_path / "b")
    for name in ("coord", "color", "segment"):
        x = np.load(tmp_path / "a" / "val" / "scene_03000" / "room_7" / f"{name}.npy")
        y = np.load(tmp_path / "b" / "val" / "scene_03000" / "room_7" / f"{name}.npy")
        np.testing.assert_array_equal(x, y)


def test_voxel_downsampling_keeps_one_point_per_cell():
    coord = np.array([[0.001, 0, 0], [0.004, 0.002, 0], [0.011, 0, 0], [0.5, 0.5, 0.5]])
    keep = structured3d.voxel_downsample(coord, 0.01)
    assert keep.tolist() == [0, 2, 3]


def test_true_colour_semantic_png_is_rejected(tmp_path):
    folder = tmp_path / "Structured3D" / "scene_00001" / "2D_rendering" / "3"
    for rel, data in room_files(semantic_mode="RGB").items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    tasks = structured3d.list_tasks(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="semantic PNG has mode RGB"):
        structured3d.process(tasks[0])


def test_missing_view_file_warns_and_uses_the_other_views(raw, tmp_path):
    import shutil

    src = raw / "extracted" / "Structured3D" / "scene_00000"
    dst = tmp_path / "raw" / "scene_00000"
    shutil.copytree(src, dst)
    (dst / "2D_rendering" / "485142" / "perspective" / "full" / "0" / "depth.png").unlink()
    task = structured3d.list_tasks(tmp_path / "raw", tmp_path / "out")[0]
    with pytest.warns(UserWarning, match="perspective/full/0 skipped: missing .*depth.png"):
        arrays = structured3d.process(task)
    assert len(arrays["coord"]) > 1000
