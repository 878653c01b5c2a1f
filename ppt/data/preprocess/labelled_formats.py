"""Readers of a user's labelled point clouds, one per format, all returning a :class:`RawCloud`.

Formats (by suffix; a folder holding ``coord.npy`` is a scene in the preprocessed layout):

- PLY, binary or ASCII (meshes: the vertices): ``x, y, z``, colour and normals as
  ``ppt.data.clouds`` reads them, the label from a vertex property, integer or integer-valued
  float (CloudCompare writes float ``scalar_<Name>`` fields). The first of :data:`LABEL_NAMES`
  present is used (exact name, then ignoring case) unless ``--label-field`` names one.
- ``.txt`` / ``.xyz`` / ``.csv``: rows of numbers, spaces or commas, one header line allowed.
  Columns: ``--columns`` if given, else a header naming x, y, z and a label column, else
  ``x,y,z,r,g,b,label`` (7 columns) or ``x,y,z,label`` (4).
- ``.npy``: (N, 7) ``x y z r g b label`` or (N, 4) ``x y z label`` (``--columns`` for others).
- ``.npz``: arrays ``coord``/``xyz``, ``color``/``rgb`` (optional), ``normal`` (optional) and the
  label from ``label``/``segment``/``semantic`` (or ``--label-field``).
- LAS / LAZ (``laspy``, imported when such a file is read; LAZ needs ``lazrs``): scaled
  coordinates, the ``classification`` dimension (or ``--label-field``), 16-bit colour to 0..255.
- a scene folder: ``coord.npy``, ``segment.npy`` (or ``--label-field``'s ``.npy``), optional
  ``color.npy`` and ``normal.npy``.

Every problem raises :class:`LabelledError` whose one-line message names the file, the
problem and the fix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppt.data.clouds import (COLOR_NAMES, NORMAL_NAMES, CloudError, color_to_255, read_npy_array,
                             read_ply_vertices, read_text_array, vertex_arrays)

LABEL_NAMES = ("label", "class", "semantic", "semantic_label", "scalar_Label", "scalar_label",
               "scalar_Classification", "scalar_classification", "classification", "category")
NPZ_COORD = ("coord", "xyz", "points")
NPZ_COLOR = ("color", "rgb", "colors")
NPZ_NORMAL = ("normal", "normals")
NPZ_LABEL = ("label", "segment", "semantic", "labels", "semantic_label", "classification")
CLOUD_SUFFIXES = (".ply", ".txt", ".xyz", ".csv", ".npy", ".npz", ".las", ".laz")
DEFAULT_COLUMNS = {7: ("x", "y", "z", "r", "g", "b", "label"), 4: ("x", "y", "z", "label")}
# Header / --columns spellings -> the names used here.
COLUMN_ALIASES = {**{c: k for names in COLOR_NAMES for c, k in zip(names, "rgb")},
                  **{c: k for names in NORMAL_NAMES for c, k in zip(names, ("nx", "ny", "nz"))},
                  "x": "x", "y": "y", "z": "z"}


class LabelledError(ValueError):
    """An input that cannot be imported; the message is one line: file, problem, fix."""


@dataclass
class RawCloud:
    """One labelled cloud as read, before any checks.

    Attributes:
        coord: float (N, 3) as in the file (may hold NaN).
        label: (N,) raw label values in the file's number type.
        color: float32 (N, 3) 0..255, or None when the file has no colour.
        normal: float32 (N, 3), or None.
        label_field: the field / column / array the labels came from.
        fields: every field the file has (named in errors about the labels).
        notes: remarks for the user (colour scale ...).
    """

    coord: np.ndarray
    label: np.ndarray
    color: np.ndarray | None
    normal: np.ndarray | None
    label_field: str
    fields: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def pick_label_field(names: tuple[str, ...], wanted: str | None, where: str,
                     candidates: tuple[str, ...] = LABEL_NAMES, what: str = "field") -> str:
    """The label field among ``names``: ``wanted`` (``--label-field``) or the first candidate
    present (exact spelling first, then ignoring case). Raises LabelledError listing ``names``."""
    if wanted:
        if wanted in names:
            return wanted
        raise LabelledError(f"{where}: no {what} {wanted!r} (--label-field); it has: {', '.join(names) or 'none'}")
    for name in candidates:
        if name in names:
            return name
    lower = {n.lower(): n for n in names}
    for name in candidates:
        if name.lower() in lower:
            return lower[name.lower()]
    raise LabelledError(f"{where}: no label {what} found (looked for {', '.join(candidates)}); it has: "
                        f"{', '.join(names) or 'none'}; name the one holding the labels with --label-field NAME")


def read_labelled(path: Path, label_field: str | None = None,
                  columns: tuple[str, ...] | None = None) -> RawCloud:
    """Read one labelled file or scene folder. Raises :class:`LabelledError`."""
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return _read_scene_folder(path, label_field)
        if suffix == ".ply":
            return _read_ply(path, label_field)
        if suffix in (".txt", ".xyz", ".csv"):
            return _read_table(path, read_text_array(path), label_field, columns, _header(path))
        if suffix == ".npy":
            return _read_table(path, read_npy_array(path), label_field, columns, None)
        if suffix == ".npz":
            return _read_npz(path, label_field)
        if suffix in (".las", ".laz"):
            return _read_las(path, label_field)
    except CloudError as err:
        raise LabelledError(str(err)) from None
    except OSError as err:
        raise LabelledError(f"{path}: cannot read ({err.strerror or err})") from None
    raise LabelledError(f"{path}: not a labelled point cloud format ({suffix or 'no suffix'}); "
                        f"supported: {', '.join(CLOUD_SUFFIXES)} or a scene folder with coord.npy")


def _read_ply(path: Path, label_field: str | None) -> RawCloud:
    vertex = read_ply_vertices(path)
    names = tuple(vertex.dtype.names)
    name = pick_label_field(names, label_field, str(path), what="vertex property")
    coord, color, normal = vertex_arrays(vertex)
    label = vertex[name].astype(vertex[name].dtype.newbyteorder("="))
    return _with_color(RawCloud(coord, label, None, normal, name, names), color)


def _with_color(cloud: RawCloud, color: np.ndarray | None) -> RawCloud:
    if color is not None:
        cloud.color, note = color_to_255(np.asarray(color))
        if note:
            cloud.notes.append(note)
    return cloud


def _header(path: Path) -> tuple[str, ...] | None:
    """The names of a text file's header line (its first line that is not numbers), if any."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    for line in head.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "//")):
            continue
        tokens = [t for t in re.split(r"[,;\s]+", line) if t]
        try:
            [float(t) for t in tokens]
            return None
        except ValueError:
            return tuple(t.strip("\"'") for t in tokens)
    return None


def _read_table(path: Path, array: np.ndarray, label_field: str | None,
                columns: tuple[str, ...] | None, header: tuple[str, ...] | None) -> RawCloud:
    """Rows of numbers (text or .npy) -> RawCloud, columns from ``columns``, the header or the count."""
    if array.ndim != 2 or len(array) == 0:
        raise LabelledError(f"{path}: empty point cloud (0 points)" if array.size == 0 else
                            f"{path}: expected a table of N rows, got shape {array.shape}")
    ncol = array.shape[1]
    source = "--columns"
    if columns is None and header is not None and len(header) == ncol:
        try:
            pick_label_field(header, label_field, str(path))
            if {"x", "y", "z"} <= {COLUMN_ALIASES.get(h.lower()) for h in header}:
                columns, source = header, "the header"
        except LabelledError:
            if label_field or ncol not in DEFAULT_COLUMNS:
                raise
    if columns is None:
        if ncol not in DEFAULT_COLUMNS:
            fields = f"header: {', '.join(header)}; " if header else ""
            raise LabelledError(
                f"{path}: {ncol} columns, {fields}expected 7 (x,y,z,r,g,b,label) or 4 (x,y,z,label); "
                f"name them with --columns, e.g. --columns x,y,z,intensity,label")
        columns, source = DEFAULT_COLUMNS[ncol], ""
    if len(columns) != ncol:
        raise LabelledError(f"{path}: {source} names {len(columns)} columns ({','.join(columns)}) "
                            f"but the file has {ncol}")
    index: dict[str, int] = {}
    for i, c in enumerate(columns):
        index.setdefault(COLUMN_ALIASES.get(c.lower(), c), i)
    if not {"x", "y", "z"} <= set(index):
        raise LabelledError(f"{path}: {source or 'the columns'} ({','.join(columns)}) must name x, y and z")
    name = pick_label_field(tuple(columns), label_field, str(path), what="column")
    label = array[:, columns.index(name)]
    coord = array[:, [index[a] for a in "xyz"]]
    color = array[:, [index[c] for c in "rgb"]] if set("rgb") <= set(index) else None
    normal = (array[:, [index[c] for c in ("nx", "ny", "nz")]].astype(np.float32)
              if {"nx", "ny", "nz"} <= set(index) else None)
    return _with_color(RawCloud(coord, label, None, normal, name, tuple(columns)), color)


def _read_npz(path: Path, label_field: str | None) -> RawCloud:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, EOFError) as err:
        raise LabelledError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err})") from None
    keys = tuple(arrays)
    coord_key = next((k for k in NPZ_COORD if k in arrays), None)
    if coord_key is None:
        raise LabelledError(f"{path}: no coordinates (looked for {', '.join(NPZ_COORD)}); it has: {', '.join(keys)}")
    name = pick_label_field(keys, label_field, str(path), NPZ_LABEL, what="array")
    coord, label = arrays[coord_key], arrays[name].reshape(-1)
    color = next((arrays[k] for k in NPZ_COLOR if k in arrays), None)
    normal = next((arrays[k] for k in NPZ_NORMAL if k in arrays), None)
    return _checked(path, RawCloud(coord, label, None, normal, name, keys), color)


def _checked(path: Path, cloud: RawCloud, color: np.ndarray | None) -> RawCloud:
    """Shape checks of array-based inputs (npz, scene folders), then colour scaling."""
    coord = np.asarray(cloud.coord)
    if coord.ndim != 2 or coord.shape[1] != 3 or not np.issubdtype(coord.dtype, np.number):
        raise LabelledError(f"{path}: coordinates must be a numeric (N, 3) array, got {coord.dtype} {coord.shape}")
    n = len(coord)
    if cloud.label.shape != (n,):
        raise LabelledError(f"{path}: labels {cloud.label_field!r} have shape {cloud.label.shape}, expected ({n},)")
    for what, array in (("colour", color), ("normals", cloud.normal)):
        if array is not None and np.shape(array) != (n, 3):
            raise LabelledError(f"{path}: {what} must be ({n}, 3) like the coordinates, got {np.shape(array)}")
    if cloud.normal is not None:
        cloud.normal = np.asarray(cloud.normal, np.float32)
    return _with_color(cloud, color)


def _read_las(path: Path, label_field: str | None) -> RawCloud:
    try:
        import laspy
    except ImportError:
        raise LabelledError(f"{path}: reading LAS / LAZ needs the laspy package "
                            f"(pip install laspy==2.7.0 lazrs==0.8.2)") from None
    try:
        las = laspy.read(str(path))
    except laspy.errors.LaspyException as err:
        hint = ("; LAZ needs a decompressor: pip install lazrs==0.8.2"
                if "LazBackend" in str(err) or "decompress" in str(err).lower() else "")
        raise LabelledError(f"{path}: not a readable LAS / LAZ file ({err}){hint}") from None
    except (ValueError, EOFError) as err:
        raise LabelledError(f"{path}: not a readable LAS / LAZ file ({type(err).__name__}: {err})") from None
    dims = tuple(las.point_format.dimension_names)
    name = pick_label_field(dims, label_field, str(path), what="dimension")
    coord = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], 1).astype(np.float64)
    color = (np.stack([np.asarray(las[c]) for c in ("red", "green", "blue")], 1)
             if {"red", "green", "blue"} <= set(dims) else None)
    return _with_color(RawCloud(coord, np.asarray(las[name]).reshape(-1), None, None, name, dims), color)


def _read_scene_folder(folder: Path, label_field: str | None) -> RawCloud:
    arrays = {p.stem: p for p in sorted(folder.glob("*.npy"))}
    label_name = (label_field[:-4] if label_field and label_field.endswith(".npy") else label_field) or "segment"
    if label_name not in arrays:
        raise LabelledError(f"{folder}: scene folder has no {label_name}.npy (files: "
                            f"{', '.join(p.name for p in arrays.values()) or 'none'}); name the label "
                            f"file with --label-field NAME")

    def load(name: str) -> np.ndarray | None:
        return read_npy_array(arrays[name]) if name in arrays else None

    cloud = RawCloud(load("coord"), load(label_name).reshape(-1), None, load("normal"),
                     f"{label_name}.npy", tuple(p.name for p in arrays.values()))
    return _checked(folder, cloud, load("color"))
