"""Structured3D renders -> ``{split}/scene_XXXXX/room_<id>/{coord,color,normal,segment}.npy``.

Per room, every view is back-projected and the points are fused:

- panorama: ``2D_rendering/<room>/panorama/<variant>/{rgb_rawlight,depth,semantic}.png`` and
  ``panorama/camera_xyz.txt`` (camera centre, mm). Equirectangular: pixel (row v, column u) of
  an H x W image looks along azimuth ``a = 2 pi u / W - pi`` and elevation
  ``e = pi / 2 - pi v / H``, direction ``(cos e sin a, cos e cos a, sin e)``; its depth is the
  distance along that ray.
- perspective: ``perspective/full/<pos>/{rgb_rawlight,depth,semantic,camera_pose}``;
  ``camera_pose.txt = position (mm), forward, up, xfov, yfov, 1`` with half field-of-view
  angles in radians; ``fx = (W / 2) / tan(xfov)``, principal point (W / 2, H / 2); its depth is
  the z-depth along ``forward`` (pixel u right = ``forward x up``, row v down = ``-up``).
  Pixel centres are the integer indices, as in the reference and official tools.
- depth PNGs are uint16 millimetres, 0 = no reading; ``semantic.png`` is an 8-bit palette
  (or greyscale) PNG whose pixel INDICES are NYU40 ids (the palette only colours them for
  viewing), so it is read with ``np.asarray(Image.open(...))`` without RGB conversion;
  0 = unlabelled. A true-colour semantic PNG is rejected with a clear error.
- pixels are kept when depth > 0, semantic > 0 and the view ray is not grazing the surface
  (``|cos| > 0.15`` against the normal from neighbouring pixels, as the reference does).

Coordinates are the dataset's own world frame in metres (z up). The reference (Pointcept)
output equals ours with x and y swapped (a mirror). NYU40 -> 25 classes via
``classes.STRUCTURED3D25_NYU40`` (others -1). Fused points are voxel-downsampled (first point of
each voxel, default 1 cm) and normals estimated with k-NN PCA. Split by scene id: < 3000 train,
3000-3249 val, >= 3250 test. Input: extracted folders or the official zip files, read with
``zipfile`` without extracting.
"""
from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ppt.data.classes import IGNORE_INDEX, STRUCTURED3D25_NYU40
from ppt.data.preprocess.common import SceneTask, SkipScene

NYU40_TO_25 = np.full(256, IGNORE_INDEX, dtype=np.int64)
NYU40_TO_25[list(STRUCTURED3D25_NYU40)] = np.arange(len(STRUCTURED3D25_NYU40))
GRAZING_COS = 0.15


def split_of(scene: str) -> str:
    scene_id = int(scene.split("_")[-1])
    return "train" if scene_id < 3000 else "val" if scene_id < 3250 else "test"


class Source:
    """Read-only view of a Structured3D root: a folder or a set of official zip files.

    Paths are relative to the folder holding the ``scene_XXXXX`` folders (inside the zips
    that is ``Structured3D/``).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        zips = sorted(self.root.glob("*.zip")) if self.root.is_dir() else []
        self.zips: dict[str, tuple[Path, str]] = {}  # relative name -> (zip, member)
        self.children: dict[str, set[str]] = {}  # folder -> sub-folder names (zips only)
        self._open: dict[Path, zipfile.ZipFile] = {}
        self._pid = os.getpid()
        if zips:
            for path in zips:
                for member in self._zip(path).namelist():
                    rel = member.split("Structured3D/", 1)[-1]
                    if rel and not rel.endswith("/"):
                        self.zips[rel] = (path, member)
                        parts = rel.split("/")
                        for i in range(len(parts) - 1):
                            self.children.setdefault("/".join(parts[:i]), set()).add(parts[i])
            self.folder = None
        else:
            inner = self.root / "Structured3D"
            self.folder = inner if inner.is_dir() else self.root

    def _zip(self, path: Path) -> zipfile.ZipFile:
        # A forked worker must not share the parent's file offsets: reopen per process.
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if path not in self._open:
            self._open[path] = zipfile.ZipFile(path)
        return self._open[path]

    def exists(self, rel: str) -> bool:
        return rel in self.zips if self.folder is None else (self.folder / rel).is_file()

    def read(self, rel: str) -> bytes:
        if self.folder is not None:
            return (self.folder / rel).read_bytes()
        if rel not in self.zips:
            raise FileNotFoundError(f"{rel}: not in any zip under {self.root}")
        path, member = self.zips[rel]
        return self._zip(path).read(member)

    def where(self, rel: str) -> str:
        if self.folder is not None:
            return str(self.folder / rel)
        return f"{self.zips[rel][0]}:{self.zips[rel][1]}" if rel in self.zips else rel

    def listdir(self, rel: str) -> list[str]:
        """Names of the sub-folders of ``rel``."""
        if self.folder is not None:
            base = self.folder / rel
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        return sorted(self.children.get(rel.strip("/"), ()))


_SOURCES: dict[Path, Source] = {}


def open_source(root: Path) -> Source:
    """One ``Source`` per root and process: indexing the zips' member lists is the slow part."""
    root = Path(root)
    if root not in _SOURCES:
        _SOURCES[root] = Source(root)
    return _SOURCES[root]


def read_png(source: Source, rel: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(source.read(rel))) as image:
        if rel.endswith("semantic.png") and image.mode not in ("P", "L"):
            raise ValueError(f"{source.where(rel)}: semantic PNG has mode {image.mode}; expected "
                             f"an 8-bit palette/greyscale image whose indices are NYU40 ids")
        if rel.endswith("depth.png") and image.mode not in ("I;16", "I;16B", "I", "I;16L"):
            raise ValueError(f"{source.where(rel)}: depth PNG has mode {image.mode}; expected "
                             f"16-bit millimetres")
        if rel.endswith(".png") and "rgb" in rel.rsplit("/", 1)[-1]:
            image = image.convert("RGB")
        return np.asarray(image)


def grid_normals(points: np.ndarray) -> np.ndarray:
    """Normals (H, W, 3) of an organised point image from neighbouring-pixel differences."""
    pad = np.pad(points, ((0, 1), (0, 1), (0, 0)), mode="edge")
    du = pad[:-1, 1:] - pad[:-1, :-1]
    dv = pad[1:, :-1] - pad[:-1, :-1]
    normal = np.cross(du, dv)
    length = np.linalg.norm(normal, axis=-1, keepdims=True)
    return np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)


def panorama_rays(height: int, width: int) -> np.ndarray:
    """Unit view rays (H, W, 3) of an equirectangular image in the world frame."""
    azimuth = 2 * np.pi * np.arange(width) / width - np.pi
    elevation = np.pi / 2 - np.pi * np.arange(height) / height
    a, e = np.meshgrid(azimuth, elevation)
    return np.stack([np.cos(e) * np.sin(a), np.cos(e) * np.cos(a), np.sin(e)], axis=-1)


def perspective_rays(height: int, width: int, pose: np.ndarray) -> np.ndarray:
    """World-frame ray directions (H, W, 3) scaled so that depth = z-depth along ``forward``."""
    forward, up = pose[3:6] / np.linalg.norm(pose[3:6]), pose[6:9]
    up = up - forward * (up @ forward)  # tolerate a slightly non-orthogonal up
    up /= np.linalg.norm(up)
    right = np.cross(forward, up)
    fx, fy = (width / 2) / np.tan(pose[9]), (height / 2) / np.tan(pose[10])
    u = (np.arange(width) - width / 2) / fx
    v = (np.arange(height) - height / 2) / fy
    uu, vv = np.meshgrid(u, v)
    return forward + uu[..., None] * right - vv[..., None] * up


def back_project(depth_mm: np.ndarray, rays: np.ndarray, centre_mm: np.ndarray, semantic: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Points (H, W, 3) in metres and the keep mask (H, W) of one view."""
    local = rays * (depth_mm[..., None].astype(np.float64) / 1000.0)
    normal = grid_normals(local)
    distance = np.maximum(np.linalg.norm(local, axis=-1), 1e-6)
    cosine = np.abs((local * normal).sum(-1)) / distance
    keep = (depth_mm > 0) & (semantic > 0) & (cosine > GRAZING_COS)
    return local + centre_mm / 1000.0, keep


def read_view(source: Source, folder: str, camera: str, panorama: bool,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Back-project one view -> (coord (M, 3) f64, color (M, 3) u8, nyu40 (M,)) or None."""
    names = {k: f"{folder}/{k}.png" for k in ("depth", "semantic", "rgb_rawlight")}
    missing = [n for n in [camera, *names.values()] if not source.exists(n)]
    if missing:
        warnings.warn(f"view {folder} skipped: missing {', '.join(missing)}")
        return None
    values = np.array(source.read(camera).decode().split(), dtype=np.float64)
    depth = read_png(source, names["depth"]).astype(np.float64)
    semantic = read_png(source, names["semantic"])
    rgb = read_png(source, names["rgb_rawlight"])
    if not (depth.shape == semantic.shape == rgb.shape[:2]):
        raise ValueError(f"{folder}: depth {depth.shape}, semantic {semantic.shape} and rgb "
                         f"{rgb.shape} sizes differ")
    h, w = depth.shape
    if panorama:
        if values.size < 3:
            raise ValueError(f"{source.where(camera)}: expected 3 numbers (camera centre, mm)")
        rays, centre = panorama_rays(h, w), values[:3]
    else:
        if values.size < 11:
            raise ValueError(f"{source.where(camera)}: expected 12 numbers (position, forward, "
                             f"up, xfov, yfov, 1), got {values.size}")
        rays, centre = perspective_rays(h, w, values), values[:3]
    coord, keep = back_project(depth, rays, centre, semantic)
    return coord[keep], rgb[keep], semantic[keep]


def voxel_downsample(coord: np.ndarray, voxel: float) -> np.ndarray:
    """Indices of the first point in each ``voxel``-sized cell, in input order."""
    cells = np.floor(coord / voxel).astype(np.int64)
    cells -= cells.min(axis=0)
    dims = cells.max(axis=0) + 1
    # One int64 key per cell: a 1-D unique is ~20x faster than np.unique(axis=0).
    key = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    _, first = np.unique(key, return_index=True)
    return np.sort(first)


def process(task: SceneTask) -> dict[str, np.ndarray]:
    """Fuse the views of one room; ``task.inputs = (source, room_rel, options)``."""
    from ppt.data.normals import estimate_normals

    root, room, opts = task.inputs
    source = open_source(root)
    views = []
    if opts["panorama"]:
        views.append(read_view(source, f"{room}/panorama/{opts['variant']}",
                               f"{room}/panorama/camera_xyz.txt", panorama=True))
    if opts["perspective"]:
        for pos in source.listdir(f"{room}/perspective/full"):
            folder = f"{room}/perspective/full/{pos}"
            views.append(read_view(source, folder, f"{folder}/camera_pose.txt", panorama=False))
    views = [v for v in views if v is not None and len(v[0])]
    if not views:
        raise SkipScene("no view with valid depth and labels")
    coord, color, nyu40 = (np.concatenate(parts) for parts in zip(*views))
    if opts["voxel"] > 0:
        keep = voxel_downsample(coord, opts["voxel"])
        coord, color, nyu40 = coord[keep], color[keep], nyu40[keep]
    coord = coord.astype(np.float32)
    return {"coord": coord, "color": color.astype(np.uint8),
            "normal": estimate_normals(coord, k=opts["k"]).astype(np.float32),
            "segment": NYU40_TO_25[nyu40.astype(np.int64)].astype(np.int16)}


def list_tasks(raw: Path, out: Path, variant: str = "full", panorama: bool = True,
               perspective: bool = True, voxel: float = 0.01, k: int = 16) -> list[SceneTask]:
    """One task per ``scene_XXXXX/2D_rendering/<room>``.

    Args:
        raw: folder of the official zips (``Structured3D_panorama_00.zip`` ...) or of the
            extracted ``Structured3D/scene_XXXXX`` folders.
        out: output root; rooms go to ``out/{split}/scene_XXXXX/room_<id>``.
        variant: panorama furniture variant: ``full``, ``simple`` or ``empty``.
        panorama, perspective: which views to fuse.
        voxel: voxel size in metres for downsampling (0 = keep every point).
        k: neighbours for normal estimation.
    """
    if variant not in ("full", "simple", "empty"):
        raise ValueError(f"panorama variant {variant!r}: valid are full, simple, empty")
    if not (panorama or perspective):
        raise ValueError("choose at least one of panorama / perspective views")
    source = open_source(Path(raw))
    scenes = [s for s in source.listdir("") if s.startswith("scene_")]
    if not scenes:
        raise FileNotFoundError(f"{raw}: no scene_XXXXX folders or Structured3D zip files")
    opts = {"variant": variant, "panorama": panorama, "perspective": perspective,
            "voxel": voxel, "k": k}
    tasks = []
    for scene in scenes:
        split = split_of(scene)
        for room in source.listdir(f"{scene}/2D_rendering"):
            tasks.append(SceneTask(f"{scene}/room_{room}", Path(out) / split / scene / f"room_{room}",
                                   split, (Path(raw), f"{scene}/2D_rendering/{room}", opts)))
    return tasks
