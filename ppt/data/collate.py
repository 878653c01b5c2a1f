"""Offset batching of point samples and Mix3D-style scene merging.

Batch (torch): ``coord`` f32 (N, 3), ``grid_coord`` i32 (N, 3), ``feat`` f32 (N, C),
``segment`` i64 (N,), ``offset`` i64 (B,) cumulative end row of each sample (sample b is rows
``offset[b-1]:offset[b]``), ``dataset`` str (one per batch), ``name`` list[str]. Optional:
``inverse`` i64 (M,) shifted so it indexes the concatenated rows, ``origin_segment`` i64 (M,),
``origin_offset`` i64 (B,) cumulative end of each sample's original points, ``index`` i64
(original point ids, NOT shifted), ``owned`` bool, ``view`` i64 (B,).
"""
from __future__ import annotations

import numpy as np
import torch

from ppt.data.sample_ops import POINT_KEYS

DTYPES = {"coord": torch.float32, "grid_coord": torch.int32, "feat": torch.float32,
          "segment": torch.int64, "index": torch.int64, "owned": torch.bool,
          "color": torch.float32, "normal": torch.float32, "instance": torch.int64,
          "inverse": torch.int64, "origin_segment": torch.int64}


def collate(samples: list[dict]) -> dict:
    """Concatenate samples of ONE dataset into a batch (format in the module docstring)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    datasets = {s["dataset"] for s in samples}
    if len(datasets) != 1:
        raise ValueError(f"a batch must come from one dataset, got {sorted(datasets)}")
    batch: dict = {}
    for key in POINT_KEYS:
        if key in samples[0]:
            batch[key] = torch.from_numpy(np.concatenate([s[key] for s in samples])).to(DTYPES[key])
    counts = [len(s["coord"]) for s in samples]
    batch["offset"] = torch.tensor(np.cumsum(counts), dtype=torch.int64)
    if "inverse" in samples[0]:
        starts = np.cumsum([0] + counts[:-1])
        batch["inverse"] = torch.from_numpy(np.concatenate(
            [s["inverse"] + start for s, start in zip(samples, starts)])).long()
        batch["origin_offset"] = torch.tensor(np.cumsum([len(s["inverse"]) for s in samples]))
        if "origin_segment" in samples[0]:
            batch["origin_segment"] = torch.from_numpy(
                np.concatenate([s["origin_segment"] for s in samples])).long()
    if "view" in samples[0]:
        batch["view"] = torch.tensor([s["view"] for s in samples], dtype=torch.int64)
    batch["dataset"] = datasets.pop()
    batch["name"] = [s["name"] for s in samples]
    return batch


def merge_samples(a: dict, b: dict) -> dict:
    """One scene made of two (Mix3D): per-point keys concatenated, names joined with '+'."""
    merged = {k: np.concatenate([a[k], b[k]]) for k in POINT_KEYS if k in a and k in b}
    merged["dataset"] = a["dataset"]
    merged["name"] = f"{a['name']}+{b['name']}"
    return merged


def mix3d(samples: list[dict], prob: float, rng: np.random.Generator) -> list[dict]:
    """Merge consecutive pairs (0+1, 2+3, ...) each with probability ``prob``.

    Both scenes are centred, so they overlap in space, as in Pointcept's Mix3D collate. An odd
    last sample stays alone. Validation samples (with ``inverse``) must not be mixed.
    """
    out = []
    for i in range(0, len(samples) - 1, 2):
        if rng.random() < prob:
            out.append(merge_samples(samples[i], samples[i + 1]))
        else:
            out += samples[i:i + 2]
    if len(samples) % 2:
        out.append(samples[-1])
    return out
