"""Normal estimation for scenes whose source ships no normals, and its on-disk cache.

S3DIS in the reference layout has no ``normal.npy``, and k-NN PCA is slow (measured: 14 s for
300k points on one core of a loaded 2-core CPU; S3DIS rooms reach millions of points), so
:class:`NormalCache` computes it once per scene, not once per access, and keeps it next to the
scene, or in a cache folder when the data root is read-only.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from ppt.io import atomic_write


def estimate_normals(coord: np.ndarray, k: int = 16, chunk: int = 65536) -> np.ndarray:
    """Unit normals by PCA over the ``k`` nearest neighbours of each point.

    The normal is the eigenvector of the smallest eigenvalue of the neighbourhood covariance.
    Orientation: normals point towards the scene centre (the bounding-box centre), which
    makes room surfaces (walls, floor, ceiling) face inwards like the reference's mesh normals;
    degenerate neighbourhoods (fewer than 3 distinct points) get ``(0, 0, 1)``.

    Args:
        coord: float (N, 3) points.
        k: neighbourhood size (clamped to N).
        chunk: points per batched eigen-decomposition (bounds memory to ~chunk * k * 3).

    Returns:
        float32 (N, 3) unit normals.
    """
    coord = np.asarray(coord, dtype=np.float64)
    n = len(coord)
    if n == 0:
        return np.zeros((0, 3), np.float32)
    k = int(min(max(k, 3), n))
    tree = cKDTree(coord)
    centre = 0.5 * (coord.min(0) + coord.max(0))
    normal = np.empty((n, 3), np.float64)
    for s in range(0, n, chunk):
        pts = coord[s:s + chunk]
        _, nbr = tree.query(pts, k=k)
        nbr = nbr.reshape(len(pts), k)
        local = coord[nbr] - coord[nbr].mean(1, keepdims=True)      # (B, k, 3)
        cov = np.einsum("bki,bkj->bij", local, local) / k            # (B, 3, 3)
        eigval, eigvec = np.linalg.eigh(cov)                         # ascending eigenvalues
        nrm = eigvec[:, :, 0]
        # A flat-line or single-point neighbourhood has no defined plane.
        degenerate = eigval[:, 1] <= 1e-12
        nrm[degenerate] = (0.0, 0.0, 1.0)
        flip = np.einsum("bi,bi->b", nrm, centre - pts) < 0
        nrm[flip] *= -1
        normal[s:s + chunk] = nrm
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return normal.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Estimated normals, computed once per scene and kept on disk

NORMAL_FILE = "normal.npy"
STAMP_FILE = ".normal.npy.source"  # beside a normal.npy that ppt estimated: the coord.npy it came from
ESTIMATOR = "knn-pca k=16 v1"       # change when estimate_normals changes: old caches become stale
DEFAULT_NORMAL_CACHE = Path(os.environ.get("PPT_CACHE", Path.home() / ".cache" / "ppt")) / "normals"


def coord_key(folder: Path) -> str:
    """Identity of a scene's ``coord.npy`` (size and modification time) and of the estimator:
    a cached estimate is valid only while this key is unchanged."""
    stat = (folder / "coord.npy").stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{ESTIMATOR}"


def normal_source(folder: Path) -> str:
    """Where a scene's normals come from: ``"source"`` (a ``normal.npy`` of the data),
    ``"estimated"`` (a ``normal.npy`` ppt estimated, still matching ``coord.npy``), ``"stale"``
    (one ppt estimated from a ``coord.npy`` that has changed since) or ``"missing"``."""
    stamp = folder / STAMP_FILE
    has_normal = (folder / NORMAL_FILE).is_file()
    if not stamp.is_file():
        # A normal.npy without a stamp is the data's own (or, after a crash between the two
        # writes below, an estimate of the current coord.npy: equally valid).
        return "source" if has_normal else "missing"
    try:
        valid = stamp.read_text() == coord_key(folder)
    except OSError:  # stamp or coord.npy vanished in between
        valid = False
    if not has_normal:
        return "missing"
    return "estimated" if valid else "stale"


class NormalCache:
    """Estimated normals of scenes without ``normal.npy``, computed once and kept on disk.

    Where: next to the scene as ``normal.npy`` (plus the hidden stamp ``.normal.npy.source``
    that holds :func:`coord_key`), which completes the reference layout; when the scene folder
    cannot be written (read-only data root), in ``cache_dir`` as
    ``<hash of the scene path>-<hash of the key>.npy``. A changed ``coord.npy`` (size or
    mtime) makes either copy stale: it is re-estimated and replaced.

    Concurrency: every file is written through ``ppt.io.atomic_write`` (unique temp file, then
    ``os.replace``), so DataLoader workers or DDP ranks that estimate the same scene at once
    each write a complete file and the last rename wins; readers see the old file, the new
    one, or none, never a partial one. ``normal.npy`` is written before its stamp and removed
    before it, so a stamp never vouches for a ``normal.npy`` of other coordinates.

    Args:
        cache_dir: folder for scenes whose folder is read-only (default ``$PPT_CACHE/normals``
            or ``~/.cache/ppt/normals``).
        next_to_scene: try the scene folder first; False keeps the data root untouched.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, next_to_scene: bool = True):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_NORMAL_CACHE
        self.next_to_scene = next_to_scene

    def cache_file(self, folder: Path, key: str) -> Path:
        """The cache-folder file of ``folder``'s normals for coord key ``key``."""
        scene = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:20]
        return self.cache_dir / f"{scene}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"

    def discard_stale(self, folder: Path) -> None:
        """Remove a ``normal.npy`` ppt estimated from an older ``coord.npy`` (call before the
        scene is read, so its stale normals are never loaded)."""
        if normal_source(folder) != "stale":
            return
        try:
            (folder / NORMAL_FILE).unlink(missing_ok=True)  # normals first, then the stamp
            (folder / STAMP_FILE).unlink(missing_ok=True)
        except OSError as err:
            warnings.warn(f"{folder / NORMAL_FILE}: estimated from an older coord.npy and cannot be "
                          f"removed ({err}); delete it by hand")

    def cached(self, folder: Path, n: int, header_only: bool = False) -> np.ndarray | None:
        """float32 (n, 3) normals of ``folder`` from the cache folder, or None (absent, stale or
        unreadable). ``header_only`` maps the file instead of reading it (for checks)."""
        path = self.cache_file(folder, coord_key(folder))
        try:
            normal = np.load(path, mmap_mode="r" if header_only else None, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return normal if normal.shape == (n, 3) and normal.dtype == np.float32 else None

    def get(self, folder: Path, coord: np.ndarray) -> np.ndarray:
        """float32 (N, 3) normals of a scene without a valid ``normal.npy``: from the cache
        folder, else estimated (:func:`estimate_normals`) and stored."""
        folder = Path(folder)
        key = coord_key(folder)
        normal = self.cached(folder, len(coord))
        if normal is not None:
            return normal
        normal = estimate_normals(coord)
        if not (self.next_to_scene and self._store_next_to_scene(folder, normal, key)):
            self._store_in_cache(folder, normal, key)
        return normal

    @staticmethod
    def _store_next_to_scene(folder: Path, normal: np.ndarray, key: str) -> bool:
        try:
            atomic_write(folder / NORMAL_FILE, lambda f: np.save(f, normal))
            atomic_write(folder / STAMP_FILE, lambda f: f.write(key.encode()))
            return True
        except OSError:  # read-only root (EACCES, EROFS, EPERM): use the cache folder
            return False

    def _store_in_cache(self, folder: Path, normal: np.ndarray, key: str) -> None:
        path = self.cache_file(folder, key)
        try:
            atomic_write(path, lambda f: np.save(f, normal))
        except OSError as err:
            warnings.warn(f"cannot cache the estimated normals of {folder} in {self.cache_dir} ({err}); "
                          f"they will be estimated again on every access")
            return
        for old in path.parent.glob(path.name.split("-")[0] + "-*.npy"):  # stale keys of this scene
            if old != path:
                old.unlink(missing_ok=True)
