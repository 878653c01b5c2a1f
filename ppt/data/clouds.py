"""Users' own point clouds: read PLY / ``.npy`` / ``.txt`` / ``.xyz`` files, write labelled PLY.

Readers turn a file into a :class:`Cloud`: coordinates in their original precision, colour as
float32 0..255 (or none), normals (or none), and the mask of input rows kept. Whatever is odd
about the file (colour scale, dropped rows, missing colour) is said in ``Cloud.notes``; what
makes it unusable raises :class:`CloudError` whose message names the file and the reason.

Formats:

- PLY, binary (little or big endian) or ASCII: the ``vertex`` element's ``x, y, z`` (any number
  type), colour from ``red/green/blue``, ``r/g/b`` or ``diffuse_red/...`` (uchar, ushort or
  float), normals from ``nx/ny/nz`` or ``normal_x/...``. Meshes: the vertices, faces ignored.
- ``.npy``: a float or integer array (N, 3), (N, 6) or (N, 9): x y z [r g b [nx ny nz]].
- ``.txt`` / ``.xyz``: the same columns as text (S3DIS style "x y z r g b"), separated by
  spaces or commas; lines starting with ``#`` or ``//`` and one header line are skipped.

Colour scale is detected: float colour whose maximum is <= 1 is read as 0..1, 16-bit colour
(maximum > 255) as 0..65535; everything else as 0..255.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

SUFFIXES = (".ply", ".npy", ".txt", ".xyz")
COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))
NORMAL_NAMES = (("nx", "ny", "nz"), ("normal_x", "normal_y", "normal_z"))
COLUMNS = {3: "x y z", 6: "x y z r g b", 9: "x y z r g b nx ny nz"}
_UINT16_MAX = 65535.0


class CloudError(ValueError):
    """A file that cannot be used as a point cloud; the message names the file and the reason."""


@dataclass
class Cloud:
    """One point cloud as read from a file (only rows with finite coordinates).

    Attributes:
        path: the file it came from (``None`` for arrays passed in memory).
        coord: float32 or float64 (N, 3), the file's coordinates and precision.
        color: float32 (N, 3) 0..255, or None when the file has no colour.
        normal: float32 (N, 3), or None when the file has none (or they were unusable).
        valid: bool (N_in,): input rows kept (False = non-finite coordinates, dropped).
        notes: remarks for the user (colour scale, dropped rows, missing colour ...).
    """

    path: Path | None
    coord: np.ndarray
    color: np.ndarray | None
    normal: np.ndarray | None
    valid: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else "cloud"

    @property
    def num_input(self) -> int:
        return len(self.valid)

    def __len__(self) -> int:
        return len(self.coord)


def list_inputs(paths: Iterable[str | os.PathLike], exclude: Path | None = None,
                ) -> tuple[list[Path], list[str], list[str]]:
    """Expand files and folders into cloud files.

    A folder contributes every file with a supported suffix directly inside it (sorted, not
    recursive); files inside ``exclude`` (the output folder) are left out so that a re-run
    does not read its own predictions. Every other entry of a folder is reported as skipped,
    with the reason (a user who drops ``scan.las`` or ``pts.csv`` into the folder learns why
    it was not labelled, instead of finding one output fewer).

    Returns:
        (files in order, without repeats; error messages for paths that give no cloud file;
        one message per folder entry skipped, naming it and why).
    """
    files: list[Path] = []
    errors: list[str] = []
    skipped: list[str] = []
    exclude = exclude.resolve() if exclude is not None else None
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            for entry in sorted(path.iterdir()):
                resolved = entry.resolve()
                if exclude is not None and exclude in (resolved, resolved.parent):
                    continue  # the output folder, or our own earlier output
                if entry.is_dir():
                    skipped.append(f"{entry}: a folder (folders are read one level deep, not recursively)")
                elif entry.suffix.lower() in SUFFIXES:
                    found.append(entry)
                else:
                    skipped.append(f"{entry}: {unsupported(entry)}")
            if not found:
                errors.append(f"{path}: folder holds no point cloud file ({', '.join(SUFFIXES)})")
            files += found
        elif not path.exists():
            errors.append(f"{path}: no such file or folder")
        elif path.suffix.lower() not in SUFFIXES:
            errors.append(f"{path}: {unsupported(path)}")
        else:
            files.append(path)
    unique = list(dict.fromkeys(files))
    return unique, errors, skipped


# What to do with files of a format the readers do not take, by suffix.
FORMAT_HINTS = {".csv": "if it holds x,y,z[,r,g,b] rows, rename it to .txt",
                ".las": "convert it to PLY (e.g. pdal translate in.las out.ply)",
                ".laz": "convert it to PLY (e.g. pdal translate in.laz out.ply)",
                ".pcd": "convert it to PLY (e.g. pcl_pcd2ply, or Open3D)",
                ".e57": "convert it to PLY (e.g. CloudCompare)"}


def unsupported(path: Path) -> str:
    """Why ``path`` is not read: its format, the supported ones, and a hint where one exists."""
    suffix = path.suffix.lower()
    hint = FORMAT_HINTS.get(suffix)
    return (f"not a point cloud format ({suffix or 'no suffix'}); supported: {', '.join(SUFFIXES)}"
            + (f"; {hint}" if hint else ""))


def read_cloud(path: str | os.PathLike) -> Cloud:
    """Read one cloud file (format by suffix). Raises :class:`CloudError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".ply":
            coord, color, normal, notes = _read_ply(path)
        elif suffix == ".npy":
            coord, color, normal, notes = _split_columns(read_npy_array(path), path)
        elif suffix in (".txt", ".xyz"):
            coord, color, normal, notes = _split_columns(read_text_array(path), path)
        else:
            raise CloudError(f"{path}: {unsupported(path)}")
    except OSError as err:
        raise CloudError(f"{path}: cannot read ({err.strerror or err})") from None
    return make_cloud(coord, color, normal, path=path, notes=notes)


def make_cloud(coord: np.ndarray, color: np.ndarray | None = None, normal: np.ndarray | None = None,
               path: Path | None = None, notes: list[str] | None = None) -> Cloud:
    """Check and normalise in-memory arrays into a :class:`Cloud`.

    Args:
        coord: (N, 3) numbers; rows with NaN/inf are dropped (counted in ``notes``).
        color: (N, 3) colour in any supported scale, or None.
        normal: (N, 3) normals, or None.
        path: the source file, named in errors.
        notes: remarks collected while reading.
    """
    where = str(path) if path is not None else "points"
    notes = list(notes or [])
    coord = np.asarray(coord)
    if coord.ndim != 2 or coord.shape[1] != 3 or not np.issubdtype(coord.dtype, np.number):
        raise CloudError(f"{where}: coordinates must be a numeric (N, 3) array, got {coord.dtype} {coord.shape}")
    n = len(coord)
    if n == 0:
        raise CloudError(f"{where}: empty point cloud (0 points)")
    if coord.dtype not in (np.float32, np.float64):
        coord = coord.astype(np.float64)
    valid = np.isfinite(coord).all(1)
    bad = n - int(valid.sum())
    if bad == n:
        raise CloudError(f"{where}: all {n} points have NaN/inf coordinates")
    if bad:
        notes.append(f"dropped {bad} of {n} points with NaN/inf coordinates")
        coord = coord[valid]
    coord = np.ascontiguousarray(coord)
    for name, array in (("colour", color), ("normals", normal)):
        if array is not None and np.shape(array) != (n, 3):
            raise CloudError(f"{where}: {name} must be ({n}, 3) like the coordinates, got {np.shape(array)}")
    if color is not None:
        color, note = color_to_255(np.asarray(color)[valid])
        if note:
            notes.append(note)
    if normal is not None:
        normal = np.asarray(normal, np.float32)[valid]
        if not np.isfinite(normal).all():
            notes.append("normals hold NaN/inf: estimated instead")
            normal = None
    return Cloud(path, coord, color, normal, valid, notes)


def color_to_255(color: np.ndarray) -> tuple[np.ndarray, str]:
    """float32 (N, 3) colour in 0..255 and a note saying how the scale was read ("" = as is).

    Integers: uint8 as is, wider integers with values above 255 as 16-bit. Floats: maximum
    <= 1 -> 0..1, above 255 -> 16-bit, else 0..255. Non-finite values become 0.
    """
    values = color.astype(np.float32)
    note = ""
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, 0)
        note = "colour holds NaN/inf: set to 0; "
    top = float(values.max()) if values.size else 0.0
    if np.issubdtype(color.dtype, np.floating) and top <= 1.0:
        values *= 255.0
        note += "colour read as 0..1"
    elif top > 255.0:
        values *= 255.0 / _UINT16_MAX
        note += "colour read as 16-bit (0..65535)"
    return np.clip(values, 0, 255), note.rstrip("; ")


def _read_ply(path: Path):
    coord, color, normal = vertex_arrays(read_ply_vertices(path))
    return coord, color, normal, []


def read_ply_vertices(path: str | os.PathLike) -> np.ndarray:
    """The ``vertex`` element of a PLY file (binary or ASCII, meshes too) as a structured array
    holding every vertex property (``x, y, z`` checked present). Raises :class:`CloudError`."""
    from plyfile import PlyData, PlyParseError

    path = Path(path)
    try:
        # Triangle lists declared: plyfile maps a binary mesh's faces in one read instead of
        # one Python call per face; other meshes fall back to the generic reader.
        try:
            ply = PlyData.read(str(path), known_list_len={"face": {"vertex_indices": 3, "vertex_index": 3}})
        except PlyParseError as err:
            if "list length" not in str(err):
                raise
            ply = PlyData.read(str(path))
    except PlyParseError as err:
        raise CloudError(f"{path}: not a readable PLY file ({err})") from None
    except (ValueError, UnicodeDecodeError, EOFError) as err:
        raise CloudError(f"{path}: not a readable PLY file ({type(err).__name__}: {err})") from None
    if "vertex" not in ply:
        names = ", ".join(e.name for e in ply.elements) or "none"
        raise CloudError(f"{path}: not a point cloud: no 'vertex' element (elements: {names})")
    vertex = ply["vertex"].data
    props = vertex.dtype.names or ()
    if not {"x", "y", "z"} <= set(props):
        raise CloudError(f"{path}: vertices have no x, y, z properties (they have: {', '.join(props)})")
    return vertex


def vertex_arrays(vertex: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(coord, color, normal)`` of a structured vertex array (see :func:`read_ply_vertices`):
    coord float32 (float64 for double or integer coordinates), colour in the file's type (or
    None), normals float32 (or None), all in native byte order."""
    props = vertex.dtype.names or ()

    def columns(names: tuple[str, str, str], dtype=None) -> np.ndarray:
        # astype(native) also turns big-endian fields into native numbers.
        parts = [vertex[n] for n in names]
        dtype = dtype or np.result_type(*parts).newbyteorder("=")
        return np.stack([p.astype(dtype) for p in parts], 1)

    kind = np.result_type(*(vertex[a] for a in "xyz"))
    coord = columns(("x", "y", "z"), np.float64 if kind.itemsize > 4 or kind.kind in "iu" else np.float32)
    color = next((columns(c) for c in COLOR_NAMES if set(c) <= set(props)), None)
    normal = next((columns(c, np.float32) for c in NORMAL_NAMES if set(c) <= set(props)), None)
    return coord, color, normal


def read_npy_array(path: Path) -> np.ndarray:
    """A numeric ``.npy`` array (no pickles). Raises :class:`CloudError`."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise CloudError(f"{path}: not a .npy file (no NumPy header); save arrays with numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:  # pickled objects, a truncated file, not .npy at all
        raise CloudError(f"{path}: not a numeric .npy array ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.names or not np.issubdtype(array.dtype, np.number):
        raise CloudError(f"{path}: not a numeric array (dtype {getattr(array, 'dtype', type(array).__name__)})")
    return array


def read_text_array(path: Path) -> np.ndarray:
    """float64 (N, C) rows of a text cloud: spaces or commas, ``#`` / ``//`` comments and one
    header line skipped. Raises :class:`CloudError`."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\0" in head:
        raise CloudError(f"{path}: not a text point cloud (binary data)")
    lines = [ln.strip() for ln in head.decode("utf-8", "replace").splitlines()]
    content = [ln for ln in lines if ln and not ln.startswith(("#", "//"))]
    if not content:
        raise CloudError(f"{path}: empty point cloud (no data lines)")

    def numeric(line: str) -> bool:
        try:
            [float(v) for v in line.replace(",", " ").split()]
            return True
        except ValueError:
            return False

    # One header line ("x y z r g b") is allowed; anything else that is not numbers is an error.
    skip = 0
    if not numeric(content[0]):
        if len(content) > 1 and numeric(content[1]):
            skip = lines.index(content[0]) + 1
        else:
            raise CloudError(f"{path}: not a point cloud: {content[0][:60]!r} is not a row of numbers")
    delimiter = "," if "," in content[1 if skip else 0] else None
    try:
        return np.loadtxt(path, dtype=np.float64, comments=("#", "//"), delimiter=delimiter,
                          skiprows=skip, ndmin=2)
    except ValueError as err:
        reason = str(err).splitlines()[0][:160]
        raise CloudError(f"{path}: not a point cloud ({reason})") from None


def _split_columns(array: np.ndarray, path: Path):
    if array.ndim == 2 and array.shape[0] == 0:
        raise CloudError(f"{path}: empty point cloud (0 points)")
    if array.ndim != 2 or array.shape[1] not in COLUMNS:
        wanted = ", ".join(f"{k} ({v})" for k, v in COLUMNS.items())
        raise CloudError(f"{path}: expected N rows of {wanted} numbers, got shape {array.shape}")
    k = array.shape[1]
    coord = array[:, :3]
    color = array[:, 3:6] if k >= 6 else None
    normal = array[:, 6:9] if k == 9 else None
    return coord, color, normal, []


IGNORE_RGB = (128, 128, 128)      # label -1 (dropped rows)
_BACKGROUND_RGB = (255, 255, 255)  # the top-down picture's empty pixels


def palette(num_classes: int) -> np.ndarray:
    """uint8 (K + 1, 3) class colours, as far apart as the eye tells; the last row (label -1)
    is grey.

    Picked greedily from an RGB grid (steps of 15): each next colour is the candidate farthest
    (CIE76 distance in CIELAB) from all colours taken so far, white (the picture's background)
    and the ignore grey. So any two classes differ clearly: ΔE >= 32 among the 35 classes of
    ScanNet, S3DIS and Structured3D merged (golden-ratio hues, used before, gave ``wall`` and
    ``clutter`` the same yellow); and ``palette(K)`` is a prefix of ``palette(K + 1)``. The
    same colours in ``tools/test.py``'s PLY files and ``tools/infer.py``'s outputs.
    """
    order = _palette_order(num_classes)
    return np.array([*order[:num_classes], IGNORE_RGB], np.uint8).reshape(-1, 3)


@lru_cache(maxsize=8)
def _palette_order(count: int) -> tuple[tuple[int, int, int], ...]:
    levels = np.arange(0, 256, 15)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = srgb_to_lab(grid)
    taken = srgb_to_lab(np.array([_BACKGROUND_RGB, IGNORE_RGB]))
    gap = np.linalg.norm(lab[:, None] - taken[None], axis=2).min(1)
    picks = []
    for _ in range(count):
        i = int(np.argmax(gap))  # beyond len(grid) colours repeat (gap 0 everywhere)
        picks.append(tuple(int(v) for v in grid[i]))
        np.minimum(gap, np.linalg.norm(lab - lab[i], axis=1), out=gap)
    return tuple(picks)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """float64 (N, 3) CIELAB (D65) of (N, 3) sRGB colours in 0..255."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def write_labelled_ply(path: str | os.PathLike, coord: np.ndarray, label: np.ndarray, num_classes: int,
                       fields: dict[str, tuple[str, np.ndarray]]) -> Path:
    """Binary PLY (atomic), one vertex per row of ``coord`` (N, 3): x, y, z (the dtype of
    ``coord``), red, green, blue (the colour of class ``label`` (N,)), then ``fields``:
    property name -> (PLY numpy type such as "i2" or "f4", (N,) values)."""
    from plyfile import PlyData, PlyElement

    from ppt.io import atomic_write

    kind = "f8" if coord.dtype == np.float64 else "f4"
    vertex = np.empty(len(coord), [("x", kind), ("y", kind), ("z", kind), ("red", "u1"), ("green", "u1"),
                                   ("blue", "u1"), *((name, t) for name, (t, _) in fields.items())])
    colours = palette(num_classes)[label]
    for i, axis in enumerate("xyz"):
        vertex[axis] = coord[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = colours[:, i]
    for name, (_, values) in fields.items():
        vertex[name] = values
    return atomic_write(path, PlyData([PlyElement.describe(vertex, "vertex")]).write)
