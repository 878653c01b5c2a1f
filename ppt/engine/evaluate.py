"""Evaluation on every original point: validation, test-time voting, and one scene's scores.

Every protocol turns a scene into a stream of model samples, each tied to the original points
either by ``inverse`` (N,) (point -> row) or by ``index`` (M,) (row -> point). The samples are
batched into forwards of at most ``max_points`` rows (several scenes may share one; on the CPU
one sample per forward, see ``SAMPLES_PER_FORWARD``), and the softmax of every row is added at
its original points; the argmax of the sum is the prediction.
``evaluate`` (a split) and ``predict_scene`` (one raw scene, e.g. ``tools/infer.py``) both run
this one path (``_Voter``).

- ``"off"`` (validation): each scene grid-sampled once (``build_transforms(.., "val")``, one
  random point per voxel, seeded by the scene index), ``inverse`` carries each voxel's scores
  to every point.
- ``"fast"`` (default of ``tools/test.py --tta``): the 13 views of SPEC §7 (z-rotations 0, π/2,
  π, 3π/2 x scales 0.95, 1, 1.05, plus one x-flip), each voxelised ONCE on a grid shifted by a
  random fraction of a voxel (one random point per voxel, seeded): 13 forwards per scene. Each
  point sums the softmax of its own voxel and of its 6 face neighbours, each weighted by how
  much the point looks like that voxel's kept point (``vote_rows`` / ``vote_weights``,
  ``ppt.data.grid.TestGrid``), so every point votes with a prediction close to its own, as
  with fragments. A deliberate deviation from the reference's test protocol, which costs one
  forward per fragment (bench/RESULTS.md §2b: on the demo models more accurate than the
  fragment protocol on every domain, at 1/14-1/27 of its CPU time).
- ``"fragments"`` (reference, SPEC §7): each view split into fragments that together cover
  every point (fragment i takes the i-th point of each voxel); a point repeated to fill a
  sparse voxel votes each time it appears, as in the reference. Unlike the reference tester,
  which runs fragments one at a time, fragments are batched up to ``max_points`` rows on CUDA.

Memory: samples are made lazily (``ppt.data.grid.iter_test_views``) and freed after their
forward, so at most ``max_points`` rows wait at once, plus the (N, K) vote sums of the scenes
in flight (one per loader worker) whatever the number of fragments. A sample larger than
``max_points`` (a view of a huge scene) runs alone: samples are never split, splitting would
change what the convolutions see.

The model sees eval mode, ``torch.inference_mode`` and, on CUDA, autocast; the metrics are
summed over the split and across processes (``ConfusionMeter``); each process evaluates the
scenes ``rank::world_size``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ppt.data.collate import collate
from ppt.data.grid import TTA_PROTOCOLS, iter_test_views, tta_views
from ppt.data.sample_ops import FEATURES
from ppt.data.transforms import build_transforms
from ppt.metrics import ConfusionMeter

# Voxels per forward: a few ScanNet scenes (about 100k voxels each at 2 cm) or one scene's
# test fragments; bounded so that a batch fits a 24 GB GPU at inference with the default widths.
MAX_POINTS = 600_000

# Samples (scenes, views, fragments) per forward, by device type; absent = as many as fit
# ``max_points``. On the CPU spconv's Native algorithm builds its indice pairs through a dense
# grid of batch size x spatial volume, so a batch of 13 views costs 1.8x the same views run one
# by one (demo model, 28k-point room: 2.56 vs 1.40 CPU s); on CUDA batches fill the GPU.
SAMPLES_PER_FORWARD = {"cpu": 1}

PROTOCOLS = ("off", *TTA_PROTOCOLS)  # values of ``tta``
DEFAULT_TTA = "fast"                 # what ``tta=True`` / a bare ``--tta`` means


def tta_protocol(tta: str | bool) -> str:
    """Normalise a ``tta`` argument: True -> the default protocol, False -> "off"."""
    if tta is True or tta is False:
        return DEFAULT_TTA if tta else "off"
    if tta not in PROTOCOLS:
        raise ValueError(f"unknown TTA protocol {tta!r}; valid: {', '.join(PROTOCOLS)}")
    return tta


def views_per_scene(tta: str | bool) -> int:
    """Number of views a scene is seen in under protocol ``tta`` (1 or 13)."""
    return 1 if tta_protocol(tta) == "off" else len(tta_views())


def eval_prompt(dataset_name: str, trained: set[str] | Iterable[str], prompt: str | None) -> tuple[str | None, str]:
    """The prompt to evaluate ``dataset_name`` with, given the domains that were TRAINED.

    A domain that is in the model but never trained (a dataset of ``data.val`` that is not in
    ``data.mix``) has a random prompt and untouched BN statistics (mean 0, var 1): evaluating
    through it measures nothing. So:

    - ``prompt`` given and trained, or "mean": used as is (note "").
    - ``prompt`` given but untrained: ``ValueError`` suggesting ``--prompt mean``.
    - no ``prompt``, dataset trained: None = the dataset's own prompt (note "").
    - no ``prompt``, dataset untrained: "mean", with a note saying why.

    Returns:
        (prompt to pass to ``evaluate``, note for the log / metrics; "" when nothing to say).
    """
    trained = set(trained)
    if prompt is not None:
        if prompt != "mean" and prompt not in trained:
            raise ValueError(f"prompt {prompt!r} was never trained (trained: {', '.join(sorted(trained)) or 'none'}); "
                             f"its prompt and normalisation statistics are untrained: use --prompt mean")
        return prompt, ""
    if dataset_name in trained:
        return None, ""
    return "mean", f"{dataset_name} was not trained: evaluated with the mean prompt"


def scene_samples(raw: dict, tta: str, voxel_size: float, seed: int = 0,
                  features: tuple[str, ...] = FEATURES) -> Iterator[dict]:
    """Model samples of one raw scene under protocol ``tta`` ("off" | "fast" | "fragments").

    Each sample has ``coord`` (M, 3), ``grid_coord``, ``feat``, ``view`` (0..12) and either
    ``inverse`` i64 (N,) (point -> row) or ``index`` i64 (M,) (row -> point).
    ``seed`` picks the kept point per voxel of the "off" and "fast" views (deterministic per scene);
    ``features`` are the keys ``feat`` concatenates (``data.features``).
    """
    raw = dict(raw)
    raw.setdefault("name", "scene")
    raw.setdefault("dataset", "scene")
    if tta != "off":
        yield from iter_test_views(raw, voxel_size, tta, seed=seed, features=features)
        return
    transform = build_transforms(raw["dataset"], "val", voxel_size, features=features)
    transform.set_rng(np.random.default_rng(seed))
    sample = transform(raw)
    sample["view"] = 0
    yield sample


def _tagged(key: int, raw: dict, samples: Iterator[dict]) -> Iterator[dict]:
    """Mark samples for ``_Voter``: ``scene`` key, ``num_points``, ``view_end`` (last sample of a
    view), ``last`` (of the scene), and ``meta`` (name, coord, segment) on the first one."""
    meta = {"name": raw.get("name", "scene"), "coord": raw["coord"], "segment": raw.get("segment")}
    previous = None
    for sample in samples:
        sample.update(scene=key, num_points=len(raw["coord"]), last=False)
        if previous is None:
            sample["meta"] = meta
        else:
            previous["view_end"] = sample["view"] != previous["view"]
            yield previous
        previous = sample
    previous.update(view_end=True, last=True)
    yield previous


class SceneStream(torch.utils.data.IterableDataset):
    """Tagged model samples of several scenes, made lazily (in loader workers when asked).

    A worker takes every ``num_workers``-th scene and yields its samples in order; the loader
    interleaves workers, so up to ``num_workers`` scenes are in flight at once.

    Args:
        dataset: a ``SceneDataset`` (``load(i)``).
        indices: scene indices to serve.
        tta: protocol, "off" | "fast" | "fragments".
        voxel_size: grid size in metres.
        features: the keys ``feat`` concatenates.
    """

    def __init__(self, dataset, indices: Sequence[int], tta: str, voxel_size: float,
                 features: tuple[str, ...] = FEATURES):
        self.dataset, self.indices, self.tta, self.voxel_size = dataset, list(indices), tta, voxel_size
        self.features = tuple(features)

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        mine = self.indices if worker is None else self.indices[worker.id::worker.num_workers]
        for index in mine:
            raw = self.dataset.load(index)
            yield from _tagged(index, raw, scene_samples(raw, self.tta, self.voxel_size, seed=index,
                                                         features=self.features))


def _same(item: dict) -> dict:
    return item


def _forward(model: nn.Module, samples: list[dict], label_space: str, prompt: str | None,
             device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One collated forward. Returns logits f32 (sum of rows, K)."""
    batch = collate([{k: s[k] for k in ("coord", "grid_coord", "feat", "segment", "view", "name")}
                     | {"dataset": label_space} for s in samples])
    for key, value in batch.items():
        if torch.is_tensor(value):
            batch[key] = value.to(device, non_blocking=True)
    enabled = device.type == "cuda" and amp_dtype is not None
    with torch.autocast(device.type, dtype=amp_dtype if enabled else torch.float32, enabled=enabled):
        logits = model(batch, prompt=prompt)
    return logits.float()


class _Voter:
    """Batches tagged samples into forwards of at most ``max_points`` rows (and
    ``SAMPLES_PER_FORWARD`` samples) and sums each row's softmax at its original points, per scene.

    ``add`` / ``flush`` return the scenes whose last sample has been voted: dicts with ``name``,
    ``coord`` (N, 3), ``segment`` (N,) or None and ``scores`` f32 (N, K) on ``device``.
    ``on_forward(rows, views_done)`` is called after each forward (progress, tests).
    """

    def __init__(self, model: nn.Module, label_space: str, prompt: str | None, device: torch.device,
                 amp_dtype: torch.dtype | None, max_points: int,
                 on_forward: Callable[[int, int], None] | None = None):
        self.model, self.label_space, self.prompt = model, label_space, prompt
        self.device, self.amp_dtype, self.max_points = device, amp_dtype, max_points
        self.on_forward = on_forward
        self.max_samples = SAMPLES_PER_FORWARD.get(device.type)
        self.pending: list[dict] = []
        self.pending_rows = 0
        self.scenes: dict[int, dict] = {}

    def add(self, sample: dict) -> list[dict]:
        if "meta" in sample:
            self.scenes[sample["scene"]] = dict(sample.pop("meta"), scores=None)
        rows = len(sample["coord"])
        full = self.pending_rows + rows > self.max_points or len(self.pending) == self.max_samples
        done = self.flush() if self.pending and full else []
        self.pending.append(sample)
        self.pending_rows += rows
        return done

    def flush(self) -> list[dict]:
        if not self.pending:
            return []
        probs = _forward(self.model, self.pending, self.label_space, self.prompt, self.device,
                         self.amp_dtype).softmax(1)
        done, row, views = [], 0, 0
        for sample in self.pending:
            part = probs[row:row + len(sample["coord"])]
            row += len(part)
            scene = self.scenes[sample["scene"]]
            if scene["scores"] is None:
                scene["scores"] = torch.zeros(sample["num_points"], probs.shape[1], device=self.device)
            if "vote_rows" in sample:  # every point: weighted rows of its voxel and neighbours
                scene["scores"] += nn.functional.embedding_bag(
                    torch.from_numpy(sample["vote_rows"]).to(self.device), part, mode="sum",
                    per_sample_weights=torch.from_numpy(sample["vote_weights"]).to(self.device))
            elif "inverse" in sample:  # every point gets its voxel's row
                scene["scores"] += part[torch.from_numpy(sample["inverse"]).to(self.device)]
            else:                    # every row goes to its point
                scene["scores"].index_add_(0, torch.from_numpy(sample["index"]).to(self.device), part)
            views += sample["view_end"]
            if sample["last"]:
                done.append(self.scenes.pop(sample["scene"]))
        self.pending, self.pending_rows = [], 0
        if self.on_forward is not None:
            self.on_forward(row, views)
        return done


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode + inference mode for the block; the caller's train/eval mode comes back."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _unwrap(model: nn.Module) -> nn.Module:
    # Evaluation forwards differ in number across processes: never through DDP.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def predict_scene(model: nn.Module, scene: dict, *, voxel_size: float, label_space: str, prompt: str | None,
                  tta: str = "off", device: torch.device | str, amp_dtype: torch.dtype | None = None,
                  max_points: int = MAX_POINTS, on_forward: Callable[[int, int], None] | None = None,
                  seed: int = 0, features: tuple[str, ...] = FEATURES) -> torch.Tensor:
    """Class scores of every original point of one raw scene (the path ``evaluate`` runs).

    Args:
        model: a segmentor ``forward(batch, prompt) -> logits (M, K)``.
        scene: raw scene dict as ``SceneDataset.load()`` returns it: ``coord`` f32 (N, 3),
            ``color`` (N, 3) 0..255, ``normal`` f32 (N, 3), optional ``segment``/``name``.
        voxel_size: grid size in metres (the training value).
        label_space: the model's label set to predict in (``batch["dataset"]``).
        prompt: domain prompt (a trained dataset name or "mean"); None = ``label_space``'s.
        tta: "off" | "fast" | "fragments" (True = "fast").
        device: where the model runs.
        amp_dtype: autocast dtype on CUDA; None = full precision.
        max_points: most rows per forward.
        on_forward: called ``(rows, views finished)`` after each forward.
        seed: picks the kept point per voxel ("off", "fast"); ``evaluate`` uses the scene index.
        features: the keys ``feat`` concatenates (the model's ``data.features``).

    Returns:
        f32 (N, K) on CPU: softmax probabilities (one view) or their sum over the views
        ("fast": weighted, up to 7 per view, see the module doc; "fragments": one per
        appearance of the point in a fragment).
    """
    tta, device = tta_protocol(tta), torch.device(device)
    model = _unwrap(model)
    voter = _Voter(model, label_space, prompt, device, amp_dtype, max_points, on_forward)
    done: list[dict] = []
    with _eval_mode(model):
        for sample in _tagged(0, scene, scene_samples(scene, tta, voxel_size, seed, features)):
            done += voter.add(sample)
        done += voter.flush()
    return done[0]["scores"].cpu()


def _mapped(segment: np.ndarray | None, label_map: np.ndarray | None) -> np.ndarray | None:
    if segment is None or label_map is None:
        return segment
    # Label -1 stays -1 (the last entry of the padded map).
    return np.append(label_map, -1)[segment]


def evaluate(model: nn.Module, dataset, device: torch.device | str, prompt: str | None = None,
             tta: str | bool = "off", voxel_size: float = 0.02, max_points: int = MAX_POINTS,
             label_space: str | None = None, class_names: Sequence[str] | None = None,
             label_map: np.ndarray | None = None, keep_predictions: bool = False,
             on_scene: Callable[[dict], None] | None = None, num_workers: int = 0,
             amp_dtype: torch.dtype | None = torch.float16, log: Callable[[str], None] | None = None,
             on_forward: Callable[[int, int], None] | None = None,
             features: tuple[str, ...] = FEATURES) -> dict:
    """Segment every original point of ``dataset`` and score it.

    Args:
        model: a segmentor ``forward(batch, prompt) -> logits (N, K)`` (DDP wrappers are
            unwrapped: evaluation forwards differ in number across processes).
        dataset: a ``SceneDataset`` (``load(i)`` gives the raw scene, ``info`` its label space).
        device: where the model runs.
        prompt: domain prompt override (a trained dataset name or "mean"); None = the dataset's.
        tta: "off" (one validation view), "fast" or "fragments" (13 views, see the module doc);
            True means "fast".
        voxel_size: grid size in metres (the training value).
        max_points: most rows per forward.
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
        on_forward: called ``(rows, views finished)`` after each forward; a split has
            ``scenes x views_per_scene(tta)`` views (progress bars).
        features: the keys ``feat`` concatenates (the model's ``data.features``).

    Returns:
        ``ConfusionMeter.summary`` (mIoU, mAcc, allAcc, per_class, per_class_acc, confusion,
        ...; summed over all processes) plus ``scenes``, ``points``, ``seconds``, ``tta`` and,
        if asked, ``predictions`` (scenes .. predictions cover this process's scenes only).
        Scenes without labels are predicted but not scored.
    """
    import torch.distributed as dist

    tta, device, model = tta_protocol(tta), torch.device(device), _unwrap(model)
    label_space = label_space or dataset.info.name
    class_names = tuple(class_names or dataset.info.class_names)
    if prompt is None and label_space != dataset.info.name:
        prompt = dataset.info.name
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    num_scenes = len(getattr(dataset, "scenes", dataset))
    stream = SceneStream(dataset, range(rank, num_scenes, world), tta, voxel_size, features)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_same)
    voter = _Voter(model, label_space, prompt, device, amp_dtype, max_points, on_forward)
    meter = ConfusionMeter(len(class_names))
    predictions: dict[str, np.ndarray] = {}
    stats = {"scenes": 0, "points": 0}
    start = time.perf_counter()

    def finish(scene: dict) -> None:
        if scene["scores"].shape[1] != len(class_names):
            raise ValueError(f"the model predicts {scene['scores'].shape[1]} classes in {label_space!r}, "
                             f"but {len(class_names)} class names were given")
        pred = scene["scores"].argmax(1).cpu().numpy()
        segment = _mapped(scene["segment"], label_map)
        if segment is not None:
            meter.update(pred, segment)
        if keep_predictions:
            predictions[scene["name"]] = pred
        if on_scene is not None:
            on_scene({"name": scene["name"], "coord": scene["coord"], "segment": segment, "pred": pred})
        stats["scenes"] += 1
        stats["points"] += len(pred)
        if log is not None and stats["scenes"] % max(1, len(stream.indices) // 10) == 0:
            log(f"evaluate {dataset.info.name}: {stats['scenes']}/{len(stream.indices)} scenes")

    with _eval_mode(model):
        for sample in loader:
            for scene in voter.add(sample):
                finish(scene)
        for scene in voter.flush():
            finish(scene)
    meter.all_reduce()
    groups = dataset.info.groups if label_space == dataset.info.name else None
    result = meter.summary(class_names, groups=groups or None)  # ScanNet200: head / common / tail
    result.update(stats, seconds=time.perf_counter() - start, tta=tta)
    if keep_predictions:
        result["predictions"] = predictions
    return result
