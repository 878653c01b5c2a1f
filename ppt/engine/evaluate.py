"""Evaluation on every original point: validation (one grid-sampled view) and test-time voting.

Validation (``tta=False``): each scene is grid-sampled once (``build_transforms(.., "val")``,
one point per voxel, seeded by the scene index), the model predicts the voxels and
``inverse`` carries each voxel's prediction back to every original point. Several scenes
share one forward (offset batching) up to ``max_points`` voxels.

Test-time augmentation (``tta=True``, SPEC §7): ``build_test_views`` turns a scene into 13
augmented views (z-rotations 0, π/2, π, 3π/2 x scales 0.95, 1, 1.05, plus one x-flip), each
split into fragments that together cover every point (fragment i takes the i-th point of each
voxel). Softmax scores of every fragment row are summed at its original point (as in the
reference, a point repeated to fill a sparse voxel votes each time it appears), and the
argmax is the prediction. Unlike the reference tester, which runs fragments one at a time,
fragments of a scene are collated into batches of up to ``max_points`` points per forward.

The model sees eval mode, ``torch.inference_mode`` and, on CUDA, autocast; the metrics are
summed over the split and across processes (``ConfusionMeter``); each process evaluates the
scenes ``rank::world_size``.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ppt.data.collate import collate
from ppt.data.grid import TTA_ANGLES, TTA_SCALES, build_test_views
from ppt.data.transforms import build_transforms
from ppt.metrics import ConfusionMeter

# Voxels per forward: a few ScanNet scenes (about 100k voxels each at 2 cm) or one scene's
# test fragments; bounded so that a batch fits a 24 GB GPU at inference with the default widths.
MAX_POINTS = 600_000


def tta_views() -> list[tuple[float, float, bool]]:
    """(z-angle, scale, x-flip) of the 13 test-time views, in ``build_test_views`` order."""
    return [(a, s, False) for a in TTA_ANGLES for s in TTA_SCALES] + [(0.0, 1.0, True)]


class SceneViews(torch.utils.data.Dataset):
    """Model inputs per scene (validation) or per (scene, view) (TTA), made in loader workers.

    Validation item: ``name``, ``coord`` f32 (M, 3) original points, ``segment`` i64 (M,) or
    None, ``fragments`` = [the grid-sampled sample with ``inverse``].
    TTA item: ``name``, ``view`` (0..12), ``last`` (bool), ``num_points`` M, ``fragments`` of
    that one view (with ``index``); the first view of a scene also carries ``coord`` and
    ``segment``. One view per item keeps a scene's 13 views x fragments out of memory at once
    (large S3DIS rooms would need gigabytes) and spreads a scene over the workers.

    Args:
        dataset: a ``ppt.data.datasets.SceneDataset`` (needs ``load(i)``, ``info``, ``scenes``).
        indices: scene indices to serve.
        tta: test-time views instead of the single validation view.
        voxel_size: grid size in metres.
    """

    def __init__(self, dataset, indices: Sequence[int], tta: bool, voxel_size: float):
        self.dataset, self.indices = dataset, list(indices)
        self.tta, self.voxel_size = tta, voxel_size
        self.views = tta_views() if tta else [None]
        self.val_transform = None if tta else build_transforms(dataset.info.name, "val", voxel_size)
        self._cache: tuple[int, dict] | None = None  # last scene loaded by this worker

    def __len__(self) -> int:
        return len(self.indices) * len(self.views)

    def _load(self, index: int) -> dict:
        if self._cache is None or self._cache[0] != index:
            self._cache = (index, self.dataset.load(index))
        return self._cache[1]

    def __getitem__(self, i: int) -> dict:
        position, v = divmod(i, len(self.views))
        index = self.indices[position]
        raw = self._load(index)
        item = {"name": raw["name"], "num_points": len(raw["coord"])}
        if v == 0:
            item.update(coord=raw["coord"], segment=raw.get("segment"))
        if not self.tta:
            # Seed per scene: the kept point of each voxel does not depend on order or workers.
            self.val_transform.set_rng(np.random.default_rng(index))
            item["fragments"] = [self.val_transform(dict(raw))]
            return item
        angle, scale, flip = self.views[v]
        fragments = build_test_views(raw, self.voxel_size, angles=() if flip else (angle,),
                                     scales=() if flip else (scale,), flip=flip)
        for fragment in fragments:
            fragment["view"] = v
        item.update(view=v, last=v == len(self.views) - 1, fragments=fragments)
        return item


def _first(items: list) -> dict:
    return items[0]


def chunk_by_points(sizes: Sequence[int], max_points: int) -> list[list[int]]:
    """Group consecutive items so each group's total size is <= ``max_points`` (an item larger
    than the bound gets a group of its own). Returns lists of item positions."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if groups and total + n <= max_points:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def _forward(model: nn.Module, samples: list[dict], label_space: str, prompt: str | None,
             device: torch.device, amp_dtype: torch.dtype | None) -> tuple[dict, torch.Tensor]:
    """One collated forward. Returns the batch (on ``device``) and logits f32 (N, K)."""
    batch = collate(samples)
    batch["dataset"] = label_space
    for key, value in batch.items():
        if torch.is_tensor(value):
            batch[key] = value.to(device, non_blocking=True)
    enabled = device.type == "cuda" and amp_dtype is not None
    with torch.autocast(device.type, dtype=amp_dtype if enabled else torch.float32, enabled=enabled):
        logits = model(batch, prompt=prompt)
    return batch, logits.float()


def vote(model: nn.Module, fragments: list[dict], scores: torch.Tensor, label_space: str,
         prompt: str | None, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """One forward over ``fragments`` (of one scene); adds softmax(logits) rows into
    ``scores`` (M, K) at the fragments' original point ids (``index``)."""
    batch, logits = _forward(model, fragments, label_space, prompt, device, amp_dtype)
    scores.index_add_(0, batch["index"], logits.softmax(1))


def predict_scene_tta(model: nn.Module, fragments: list[dict], num_points: int, num_classes: int,
                      label_space: str, prompt: str | None, device: torch.device,
                      max_points: int = MAX_POINTS, amp_dtype: torch.dtype | None = torch.float16) -> torch.Tensor:
    """Summed softmax votes of all fragments of one scene.

    Args:
        fragments: samples with ``index`` i64 (n_f,) original point ids (``build_test_views``).
        num_points: M, the scene's original point count.
        max_points: bound on the points of one forward (fragments are never split).

    Returns:
        scores f32 (M, K) on ``device``: sum over fragment rows of softmax(logits) at ``index``.
    """
    scores = torch.zeros(num_points, num_classes, device=device)
    for group in chunk_by_points([len(f["coord"]) for f in fragments], max_points):
        vote(model, [fragments[i] for i in group], scores, label_space, prompt, device, amp_dtype)
    return scores


def _mapped(segment: np.ndarray | None, label_map: np.ndarray | None) -> np.ndarray | None:
    if segment is None or label_map is None:
        return segment
    # Label -1 stays -1 (the last entry of the padded map).
    return np.append(label_map, -1)[segment]


@torch.inference_mode()
def evaluate(model: nn.Module, dataset, device: torch.device | str, prompt: str | None = None,
             tta: bool = False, voxel_size: float = 0.02, max_points: int = MAX_POINTS,
             label_space: str | None = None, class_names: Sequence[str] | None = None,
             label_map: np.ndarray | None = None, keep_predictions: bool = False,
             on_scene: Callable[[dict], None] | None = None, num_workers: int = 0,
             amp_dtype: torch.dtype | None = torch.float16, log: Callable[[str], None] | None = None) -> dict:
    """Segment every original point of ``dataset`` and score it.

    Args:
        model: a segmentor ``forward(batch, prompt) -> logits (N, K)`` (DDP wrappers are
            unwrapped: evaluation forwards differ in number across processes).
        dataset: a ``SceneDataset`` (``load(i)`` gives the raw scene, ``info`` its label space).
        device: where the model runs.
        prompt: domain prompt override (a trained dataset name or "mean"); None = the dataset's.
        tta: 13-view fragment voting instead of the single validation view.
        voxel_size: grid size in metres (the training value).
        max_points: most points per forward.
        label_space: the model's label set to predict in (``batch["dataset"]``); default the
            dataset's name. With another label set (open vocabulary) and no ``prompt``, the
            dataset's own prompt is used.
        class_names: names of ``label_space``'s classes, for the summary; default the dataset's.
        label_map: int (K_data,) dataset label -> ``label_space`` label, -1 = ignore; None =
            identity.
        keep_predictions: return ``predictions`` {scene name: i64 (M,) predicted labels}.
        on_scene: called per scene with {name, coord (M, 3), segment (M,) or None, pred (M,)}.
        num_workers: DataLoader workers preparing scenes (views, fragments) in parallel.
        amp_dtype: autocast dtype on CUDA; None = full precision.
        log: progress sink (e.g. ``logger.info``), called about ten times.

    Returns:
        ``ConfusionMeter.summary`` (mIoU, mAcc, allAcc, per_class, per_class_acc, confusion,
        ...; summed over all processes) plus ``scenes``, ``points``, ``seconds`` and, if asked,
        ``predictions`` (these four cover this process's scenes only). Scenes without labels
        are predicted but not scored.
    """
    import torch.distributed as dist

    device = torch.device(device)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    label_space = label_space or dataset.info.name
    class_names = tuple(class_names or dataset.info.class_names)
    if prompt is None and label_space != dataset.info.name:
        prompt = dataset.info.name
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    num_scenes = len(getattr(dataset, "scenes", dataset))
    views = SceneViews(dataset, range(rank, num_scenes, world), tta, voxel_size)
    loader = torch.utils.data.DataLoader(views, batch_size=1, num_workers=num_workers,
                                         collate_fn=_first)
    meter = ConfusionMeter(len(class_names))
    predictions: dict[str, np.ndarray] = {}
    stats = {"scenes": 0, "points": 0}
    was_training = model.training
    model.eval()
    start = time.perf_counter()

    def finish(item: dict, pred: torch.Tensor) -> None:
        pred = pred.cpu().numpy()
        segment = _mapped(item["segment"], label_map)
        if segment is not None:
            meter.update(pred, segment)
        if keep_predictions:
            predictions[item["name"]] = pred
        if on_scene is not None:
            on_scene({"name": item["name"], "coord": item["coord"], "segment": segment, "pred": pred})
        stats["scenes"] += 1
        stats["points"] += len(pred)
        if log is not None and stats["scenes"] % max(1, len(views.indices) // 10) == 0:
            log(f"evaluate {dataset.info.name}: {stats['scenes']}/{len(views.indices)} scenes")

    pending: list[dict] = []  # validation scenes waiting to share one forward

    def flush() -> None:
        if not pending:
            return
        batch, logits = _forward(model, [p["fragments"][0] for p in pending], label_space,
                                 prompt, device, amp_dtype)
        pred = logits.argmax(1)[batch["inverse"]]
        ends = batch["origin_offset"].tolist()
        for item, lo, hi in zip(pending, [0] + ends[:-1], ends):
            finish(item, pred[lo:hi])
        pending.clear()

    scene: dict = {}  # TTA: the scene being voted on (first view's item + scores)
    waiting: list[dict] = []  # TTA: fragments of that scene not yet forwarded

    def vote_waiting(all_of_them: bool) -> None:
        groups = chunk_by_points([len(f["coord"]) for f in waiting], max_points)
        if not all_of_them:
            groups = groups[:-1]  # the last group may still grow with the next view
        for group in groups:
            vote(model, [waiting[i] for i in group], scene["scores"], label_space, prompt, device, amp_dtype)
        del waiting[:sum(len(g) for g in groups)]

    try:
        for item in loader:
            if tta:
                if item["view"] == 0:
                    scene = {k: v for k, v in item.items() if k != "fragments"}
                    scene["scores"] = torch.zeros(item["num_points"], len(class_names), device=device)
                waiting.extend(item["fragments"])
                vote_waiting(all_of_them=item["last"])
                if item["last"]:
                    finish(scene, scene["scores"].argmax(1))
                continue
            size = len(item["fragments"][0]["coord"])
            if pending and sum(len(p["fragments"][0]["coord"]) for p in pending) + size > max_points:
                flush()
            pending.append(item)
        flush()
    finally:
        model.train(was_training)
    meter.all_reduce()
    result = meter.summary(class_names)
    result.update(stats, seconds=time.perf_counter() - start)
    if keep_predictions:
        result["predictions"] = predictions
    return result


def confusion_image(confusion: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Row-normalised confusion matrix (rows = true class) drawn as an image for TensorBoard.

    Args:
        confusion: int (K, K) counts, rows = true class, columns = predicted class.
        class_names: K names.

    Returns:
        uint8 (H, W, 3) RGB image.
    """
    # Figure + Agg canvas directly: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion, np.float64)
    k = len(class_names)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion of shape {confusion.shape} for {k} class names")
    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    size = 2.5 + 0.3 * k
    fig = Figure(figsize=(size, size), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
