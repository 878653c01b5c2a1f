"""Normal estimation for scenes whose source ships no normals."""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


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
