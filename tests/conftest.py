"""Shared fixtures: a tiny synthetic data root made once per test session."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ppt.data.synthetic import generate

# Tests run tiny tensors: with several intra-op threads on a loaded 2-core machine OpenMP
# barriers dominate (measured ~100x slower per op), so the suite runs single-threaded.
torch.set_num_threads(1)

TINY_SCENES = 5          # per domain: scannet 4 train + 1 val, s3dis Area_1..5, structured3d 4 + 1


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Data root with ``scannet/``, ``s3dis/``, ``structured3d/`` (5 rooms each, seed 0).

    Read-only by convention: copy it before modifying.
    """
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, scenes_per_domain=TINY_SCENES, seed=0)
    return root


@pytest.fixture
def toy_sample():
    """A random 2000-point sample in a 4 x 3 x 2.5 m box, colour 0..255, labels 0..19."""
    rng = np.random.default_rng(123)
    n = 2000
    normal = rng.standard_normal((n, 3)).astype(np.float32)
    return {
        "coord": (rng.random((n, 3)) * [4, 3, 2.5] + [10, -5, 1]).astype(np.float32),
        "color": (rng.random((n, 3)) * 255).astype(np.float32),
        "normal": normal / np.linalg.norm(normal, axis=1, keepdims=True),
        "segment": rng.integers(-1, 20, n).astype(np.int64),
        "instance": rng.integers(0, 10, n).astype(np.int64),
        "dataset": "scannet",
        "name": "toy",
    }


@pytest.fixture
def saved_numel():
    """``measure(fn) -> (fn(), elements of the tensors autograd saves while fn runs)`` (tensors
    saved inside a checkpoint are not seen: a checkpoint keeps only its inputs)."""
    def measure(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = fn()
        return out, sum(saved)
    return measure
