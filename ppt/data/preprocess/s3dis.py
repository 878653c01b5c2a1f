"""S3DIS (Stanford3dDataset_v1.2) rooms -> ``Area_N/<room>/{coord,color,normal,segment,instance}.npy``.

Raw input: ``Area_N/<room>/Annotations/<class>_<k>.txt``, one point per line ``x y z r g b``.
The class is the file-name prefix; prefixes outside ``classes.S3DIS13`` (``stairs``) are
``clutter``. Each kept annotation file is one instance (ids 0.. in sorted file order).
With ``align=True`` each room is rotated about z by minus its angle in
``Area_N/Area_N_alignmentAngle.txt`` (lines ``<room> <degrees>``, ``#`` comments), about the
centre of its bounding box, as the reference preprocessing does.

Known defects of the official release, handled with a warning instead of a traceback:
- a stray non-numeric byte in a line (``185.18\\x10`` in Area_5/hallway_6 ceiling_1.txt): the
  line is REPAIRED by deleting the characters that cannot be part of a number when that leaves
  exactly six numbers, otherwise the line is SKIPPED; the warning names file, line and action;
- ``wall_3 (1).txt`` next to ``wall_3.txt`` in Area_5/office_36: skipped when byte-identical to
  ``wall_3.txt``, kept as its own instance (with a warning) when not.
Normals are estimated (k-NN PCA, ``ppt.data.normals.estimate_normals``): the text files carry none.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ppt.data.classes import S3DIS13
from ppt.data.preprocess.common import SceneTask

CLASS_TO_LABEL = {name: i for i, name in enumerate(S3DIS13)}
COPY_SUFFIX = re.compile(r"^(?P<base>.+) \(\d+\)$")  # "wall_3 (1)"
NOT_NUMERIC = re.compile(r"[^0-9eE+\-.]")


def _parse_lines(text: str, path: Path) -> np.ndarray:
    """Slow path: parse line by line, repairing or skipping malformed lines with a warning."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
            if len(values) == 6:
                rows.append(values)
                continue
        except ValueError:
            pass
        repaired = [t for t in NOT_NUMERIC.sub(" ", line).split() if t not in "+-.eE"]
        try:
            values = [float(t) for t in repaired]
        except ValueError:
            values = []
        if len(values) == 6:
            rows.append(values)
            warnings.warn(f"{path}:{number}: malformed line {line!r} repaired to "
                          f"{' '.join(repaired)!r} (deleted non-numeric characters)")
        else:
            warnings.warn(f"{path}:{number}: malformed line {line!r} skipped "
                          f"(expected 6 numbers x y z r g b)")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


def read_points(path: Path) -> np.ndarray:
    """Read one annotation file -> (N, 6) float64 ``x y z r g b``.

    Fast path: parse the whole file at once with ``np.fromstring``; if that stops early (a
    bad token) or the count is not a multiple of six per line, fall back to ``_parse_lines``.
    """
    text = path.read_bytes().decode("latin-1")
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # fromstring warns on a bad token
        try:
            values = np.fromstring(text, dtype=np.float64, sep=" ")
        except (DeprecationWarning, ValueError):
            values = None
    if values is not None and values.size == 6 * lines:
        return values.reshape(-1, 6)
    return _parse_lines(text, path)


def read_alignment(area_dir: Path) -> dict[str, float]:
    """``Area_N_alignmentAngle.txt`` -> {room: angle in degrees}."""
    path = area_dir / f"{area_dir.name}_alignmentAngle.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: alignment angle file missing (needed by --align)")
    angles = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#"):
            angles[parts[0]] = float(parts[1])
    return angles


def annotation_files(room_dir: Path) -> list[Path]:
    """Sorted annotation files with duplicated ``name (1).txt`` copies dropped (with a warning)."""
    files = sorted((room_dir / "Annotations").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{room_dir / 'Annotations'}: no annotation .txt files")
    kept = []
    for path in files:
        copy = COPY_SUFFIX.match(path.stem)
        if copy:
            original = path.with_name(copy["base"] + ".txt")
            if original.is_file() and original.read_bytes() == path.read_bytes():
                warnings.warn(f"{path}: duplicate of {original.name}, skipped")
                continue
            warnings.warn(f"{path}: looks like a copy of {original.name} but differs; "
                          f"kept as its own instance")
        kept.append(path)
    return kept


def rotate_z(coord: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate by ``-degrees`` about z through the bounding-box centre (reference convention)."""
    angle = -np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    centre = (coord.max(axis=0) + coord.min(axis=0)) / 2
    return (coord - centre) @ rot.T + centre


def process(task: SceneTask) -> dict[str, np.ndarray]:
    """Convert one room; ``task.inputs = (room_dir, angle in degrees or None, k)``."""
    from ppt.data.normals import estimate_normals

    room_dir, angle, k = task.inputs
    points, segment, instance = [], [], []
    for instance_id, path in enumerate(annotation_files(room_dir)):
        data = read_points(path)
        if len(data) == 0:
            warnings.warn(f"{path}: no points, skipped")
            continue
        name = path.stem.split("_")[0]
        points.append(data)
        segment.append(np.full(len(data), CLASS_TO_LABEL.get(name, CLASS_TO_LABEL["clutter"])))
        instance.append(np.full(len(data), instance_id))
    if not points:
        raise ValueError(f"{room_dir}: no points in any annotation file")
    data = np.concatenate(points)
    coord = data[:, :3]
    if angle is not None:
        coord = rotate_z(coord, angle)
    coord = coord.astype(np.float32)
    return {
        "coord": coord,
        "color": np.clip(np.rint(data[:, 3:6]), 0, 255).astype(np.uint8),
        "normal": estimate_normals(coord, k=k).astype(np.float32),
        "segment": np.concatenate(segment).astype(np.int16),
        "instance": np.concatenate(instance).astype(np.int16),
    }


def list_tasks(raw: Path, out: Path, align: bool = False, k: int = 16) -> list[SceneTask]:
    """One task per ``Area_N/<room>`` folder holding ``Annotations/``.

    Args:
        raw: ``Stanford3dDataset_v1.2`` (or ``..._Aligned_Version``) root with ``Area_1..6``.
        out: output root; rooms go to ``out/Area_N/<room>``.
        align: rotate rooms by the per-area alignment angles.
        k: neighbours for normal estimation.
    """
    raw, out = Path(raw), Path(out)
    areas = sorted(p for p in raw.glob("Area_*") if p.is_dir())
    if not areas:
        raise FileNotFoundError(f"{raw}: no Area_N folders; --raw must be the "
                                f"Stanford3dDataset_v1.2 folder")
    tasks = []
    for area in areas:
        angles = read_alignment(area) if align else {}
        for room in sorted(p for p in area.iterdir() if (p / "Annotations").is_dir()):
            if align and room.name not in angles:
                raise KeyError(f"{area.name}_alignmentAngle.txt: no angle for room {room.name}")
            tasks.append(SceneTask(f"{area.name}/{room.name}", out / area.name / room.name,
                                   area.name, (room, angles.get(room.name), k)))
    return tasks
