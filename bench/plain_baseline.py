"""A plain spconv U-Net training loop: the baseline of ``bench/time_to_accuracy.py``.

What a user would write in ~100 lines without this project: the same backbone widths
(``ppt.models.spunet.SpUNet``, plain BatchNorm, one linear classifier), scenes held in memory,
random z-rotation / scale 0.9-1.1 / x-y flips, one random point per voxel (``np.unique``),
colour as the only feature (or colour + normal), cross-entropy, AdamW at a constant learning rate
(or the reference's SGD + OneCycle),
torch on every core, no loader processes. Datasets of a joint run share the network; each
keeps its own block of logits (labels offset into the union) and is scored on its own block.

The clock runs only while training: it pauses for the evaluations at ``marks`` (minutes), so a
mark's score is the model after exactly that much training time.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ppt.data.dataset_file import get_dataset_info
from ppt.data.datasets import build_dataset
from ppt.metrics import ConfusionMeter
from ppt.models.spunet import SpUNet


def load_split(root: str, names: list[str], split: str, normals: bool = False) -> list[dict]:
    """Scenes in memory; ``feat`` (N, 3) colour in [0, 1], or (N, 6) colour + normal."""
    scenes = []
    for name in names:
        dataset = build_dataset(name, root, split)
        for scene in (dataset[i] for i in range(len(dataset))):
            feat = scene["color"] / 255.0
            if normals:
                feat = np.concatenate([feat, scene["normal"]], 1)
            scenes.append({"coord": scene["coord"], "color": feat.astype(np.float32),
                           "segment": scene["segment"], "dataset": name})
    return scenes


def voxelize(coord: np.ndarray, voxel: float, rng: np.random.Generator | None):
    """One point per voxel: (kept ids, grid coords of kept, inverse (N,) point -> kept row)."""
    perm = rng.permutation(len(coord)) if rng is not None else np.arange(len(coord))
    grid = np.floor(coord[perm] / voxel).astype(np.int64)
    grid -= grid.min(0)
    _, first, inverse = np.unique(grid, axis=0, return_index=True, return_inverse=True)
    inv = np.empty(len(coord), np.int64)
    inv[perm] = inverse.ravel()
    return perm[first], grid[first], inv


def augment(coord: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random z-rotation, scale 0.9-1.1, x-y flips: (augmented coord, the (3, 3) linear map)."""
    a = rng.uniform(-math.pi, math.pi)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    scale = rng.uniform(0.9, 1.1)
    flip = np.diag(np.r_[np.where(rng.random(2) < 0.5, -1.0, 1.0), 1.0])
    m = flip @ rot * scale
    return coord @ m.T, m


def make_batch(scenes: list[dict], offsets: dict[str, int], voxel: float, rng) -> dict:
    grids, feats, labels, counts = [], [], [], []
    for s in scenes:
        coord, m = augment(s["coord"], rng)
        keep, grid, _ = voxelize(coord, voxel, rng)
        grids.append(grid)
        feat = s["color"][keep]
        if feat.shape[1] == 6:  # normals turn (and flip) with the scene
            normal = feat[:, 3:] @ m.T
            feat = np.concatenate([feat[:, :3], normal / np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-6)], 1)
        feats.append(feat.astype(np.float32))
        seg = s["segment"][keep]
        labels.append(np.where(seg >= 0, seg + offsets[s["dataset"]], -1))
        counts.append(len(keep))
    return {"grid_coord": torch.from_numpy(np.concatenate(grids)).int(),
            "feat": torch.from_numpy(np.concatenate(feats)).float(),
            "offset": torch.tensor(np.cumsum(counts)), "segment": torch.from_numpy(np.concatenate(labels))}


class PlainNet(torch.nn.Module):
    def __init__(self, channels, layers, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.backbone = SpUNet(in_channels=in_channels, channels=channels, layers=layers)
        self.head = torch.nn.Linear(channels[-1], num_classes)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.backbone(batch))


@torch.no_grad()
def evaluate(model: PlainNet, scenes: list[dict], offsets: dict[str, int], voxel: float) -> dict[str, float]:
    """Val mIoU per dataset over every original point (the project's metric code)."""
    model.eval()
    meters = {d: ConfusionMeter(get_dataset_info(d).num_classes) for d in offsets}
    for s in scenes:
        keep, grid, inverse = voxelize(s["coord"], voxel, None)
        batch = {"grid_coord": torch.from_numpy(grid).int(), "feat": torch.from_numpy(s["color"][keep]).float(),
                 "offset": torch.tensor([len(keep)])}
        k0, k = offsets[s["dataset"]], get_dataset_info(s["dataset"]).num_classes
        pred = model(batch)[:, k0:k0 + k].argmax(1).numpy()[inverse]
        meters[s["dataset"]].update(torch.from_numpy(pred), torch.from_numpy(s["segment"]))
    model.train()
    return {d: m.summary()["mIoU"] for d, m in meters.items()}


def onecycle_factor(t: float, pct_start: float = 0.05, div: float = 10.0, final_div: float = 1e4) -> float:
    """Pointcept's OneCycleLR (cosine anneal) as a multiple of max lr at fraction ``t`` of the run."""
    lo, end = 1.0 / div, 1.0 / (div * final_div)
    if t < pct_start:
        return lo + (1.0 - lo) * (1 - math.cos(math.pi * t / pct_start)) / 2
    u = min((t - pct_start) / (1.0 - pct_start), 1.0)
    return end + (1.0 - end) * (1 + math.cos(math.pi * u)) / 2


def run(root: str, datasets: list[str], minutes: float, marks: list[float], channels, layers,
        voxel: float = 0.1, batch_size: int = 2, lr: float = 1e-3, seed: int = 0, log=print,
        optimizer: str = "adamw", normals: bool = False) -> list[dict]:
    """Train for ``minutes`` of training time; returns one record per mark: minutes, steps, mIoU.

    ``optimizer="sgd"``: Pointcept's SpUNet-v1m1 recipe (SGD momentum 0.9, Nesterov, weight decay
    1e-4, OneCycle from lr/10 up to ``lr`` in the first 5 % and cosine down to lr/1e5), the schedule
    laid over the training-time budget since a wall budget fixes no step count in advance;
    ``"adamw"``: AdamW at a constant ``lr``. ``normals``: colour + normal features (the reference's
    6 input channels) instead of colour alone."""
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(seed)
    train, val = load_split(root, datasets, "train", normals), load_split(root, datasets, "val", normals)
    offsets, total = {}, 0
    for d in datasets:
        offsets[d], total = total, total + get_dataset_info(d).num_classes
    model = PlainNet(channels, layers, total, in_channels=6 if normals else 3)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    records, spent, step = [], 0.0, 0
    pending = sorted(m for m in marks if m <= minutes)
    while pending:
        start = time.perf_counter()
        if optimizer == "sgd":
            for group in opt.param_groups:
                group["lr"] = lr * onecycle_factor(spent / (minutes * 60))
        batch = make_batch([train[i] for i in rng.integers(0, len(train), batch_size)], offsets, voxel, rng)
        loss = F.cross_entropy(model(batch), batch["segment"].long(), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        spent += time.perf_counter() - start
        step += 1
        if spent >= pending[0] * 60:
            miou = evaluate(model, val, offsets, voxel)
            records.append({"minutes": spent / 60, "steps": step, "mIoU": miou})
            log(f"plain {'+'.join(datasets)}: {spent / 60:.2f} min, {step} steps, mIoU "
                + " ".join(f"{d} {v:.3f}" for d, v in miou.items()))
            pending.pop(0)
    return records
