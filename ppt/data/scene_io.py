"""Read, validate and atomically write one scene folder of the preprocessed layout.

A scene folder holds ``coord.npy`` float32 (N, 3), ``color.npy`` uint8 (N, 3), optional
``normal.npy`` float32 (N, 3), a label file (``segment.npy`` / ``segment20.npy`` ...,
integer (N,), -1 = ignore) and optional ``instance.npy`` (N,). Every problem raises one
``SceneError`` that names the file and the reason.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ppt.data.classes import IGNORE_INDEX


class SceneError(ValueError):
    """A scene on disk is missing, corrupt or inconsistent."""


def load_array(path: Path) -> np.ndarray:
    """``np.load`` with a readable error for missing, truncated or pickled files."""
    if not path.is_file():
        raise SceneError(f"{path}: file is missing")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SceneError(f"{path}: not a readable .npy file ({err})") from None


def check_scene(arrays: dict[str, np.ndarray], folder: Path, num_classes: int | None,
                segment_file: str = "segment.npy") -> None:
    """Validate loaded arrays of one scene; raise ``SceneError`` naming file and reason."""
    coord = arrays["coord"]
    n = len(coord)
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise SceneError(f"{folder / 'coord.npy'}: expected shape (N, 3), got {coord.shape}")
    if n == 0:
        raise SceneError(f"{folder / 'coord.npy'}: empty scene (0 points)")
    if not np.isfinite(coord).all():
        bad = int((~np.isfinite(coord).all(axis=1)).sum())
        raise SceneError(f"{folder / 'coord.npy'}: {bad} points have NaN or inf coordinates")
    for key in ("color", "normal"):
        if key in arrays:
            a = arrays[key]
            if a.shape != (n, 3):
                raise SceneError(f"{folder / (key + '.npy')}: expected shape ({n}, 3) to match "
                                 f"coord.npy, got {a.shape}")
    if "normal" in arrays and not np.isfinite(arrays["normal"]).all():
        raise SceneError(f"{folder / 'normal.npy'}: contains NaN or inf")
    for key, fname in (("segment", segment_file), ("instance", "instance.npy")):
        if key not in arrays:
            continue
        a = arrays[key]
        if a.shape != (n,):
            raise SceneError(f"{folder / fname}: expected shape ({n},) to match coord.npy, "
                             f"got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise SceneError(f"{folder / fname}: expected integer labels, got {a.dtype}")
    if "segment" in arrays and num_classes is not None:
        seg = arrays["segment"]
        bad = (seg != IGNORE_INDEX) & ((seg < 0) | (seg >= num_classes))
        if bad.any():
            raise SceneError(
                f"{folder / segment_file}: {int(bad.sum())} labels outside 0..{num_classes - 1} "
                f"(and not the ignore label {IGNORE_INDEX}), e.g. {int(seg[bad][0])}")


def load_scene(folder: str | os.PathLike, num_classes: int | None = None,
               segment_file: str = "segment.npy", require_segment: bool = False,
               ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """Load and validate one scene folder (labels equal to ``ignore_index`` are read as -1).

    Returns a dict with ``coord`` float32 (N, 3), ``color`` float32 (N, 3) in 0..255,
    ``normal`` float32 (N, 3) if present, ``segment`` int64 (N,) if present (else absent,
    unless ``require_segment``), ``instance`` int64 (N,) if present, and ``name``.
    Missing normals are left out; ``ppt.data.normals.estimate_normals`` fills them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SceneError(f"{folder}: scene folder is missing")
    arrays: dict[str, np.ndarray] = {"coord": load_array(folder / "coord.npy")}
    arrays["color"] = load_array(folder / "color.npy")
    if (folder / "normal.npy").exists():
        arrays["normal"] = load_array(folder / "normal.npy")
    if (folder / segment_file).exists() or require_segment:
        arrays["segment"] = load_array(folder / segment_file)
        if ignore_index != IGNORE_INDEX and np.issubdtype(arrays["segment"].dtype, np.integer):
            seg = arrays["segment"].astype(np.int64)
            arrays["segment"] = np.where(seg == ignore_index, IGNORE_INDEX, seg)
    if (folder / "instance.npy").exists():
        arrays["instance"] = load_array(folder / "instance.npy")
    check_scene(arrays, folder, num_classes, segment_file)
    scene = {"coord": arrays["coord"].astype(np.float32, copy=False),
             "color": arrays["color"].astype(np.float32)}
    if "normal" in arrays:
        scene["normal"] = arrays["normal"].astype(np.float32, copy=False)
    for key in ("segment", "instance"):
        if key in arrays:
            scene[key] = arrays[key].astype(np.int64)
    scene["name"] = folder.name
    return scene


def write_scene(folder: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``{name: array}`` as ``name.npy`` files into ``folder`` atomically.

    Files go to a temporary sibling folder that is renamed into place, so an interrupted
    write never leaves a half-written scene; an existing ``folder`` is replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
