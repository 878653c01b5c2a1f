"""Experiment logging: ``train.log``, TensorBoard events and the progress bar (rank 0 only).

TensorBoard is imported on first use, so ``import ppt`` stays cheap and a missing
``tensorboard`` package only disables the event files (with one warning line).
Tags, for users coming from Pointcept::

    train/loss, train/loss_<dataset>, train/lr_<group>, train/points_per_s, train/skipped_steps
    val/<dataset>/{mIoU,mAcc,allAcc}, val/mean_mIoU, val/<dataset>/iou/<class>,
    val/<dataset>/confusion (image), config (text)
    val_scene/<dataset>/{pred,gt} (point clouds of the first val scene, <= 20k points; gt once)
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

SCENE_POINTS = 20_000  # points per val-scene cloud: ~0.5 MB per cloud and evaluation in the events
# Point size in metres (TensorBoard's default, 5 mm, leaves a 20k-point room mostly blank).
SCENE_VIEW = {"material": {"cls": "PointsMaterial", "size": 0.05}}


class ExperimentLogger:
    """Writes to ``<exp_dir>/train.log``, stdout and TensorBoard; silent when ``enabled`` is False.

    Args:
        exp_dir: experiment folder (created by the caller).
        enabled: False on ranks other than 0.
        tensorboard: write TensorBoard events to ``exp_dir``.
    """

    def __init__(self, exp_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.exp_dir, self.enabled = Path(exp_dir), enabled
        self._writer = None
        self._tensorboard = tensorboard and enabled
        self.log = logging.getLogger(f"ppt.train.{id(self)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        if enabled:
            fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
            for handler in (logging.FileHandler(self.exp_dir / "train.log"), logging.StreamHandler(sys.stdout)):
                handler.setFormatter(fmt)
                self.log.addHandler(handler)

    def info(self, msg: str) -> None:
        if self.enabled:
            self.log.info(msg)

    @property
    def writer(self):
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                self.info(f"warning: TensorBoard disabled ({err}); pip install tensorboard")
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.exp_dir))
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # TensorBoard renders markdown: indent to keep YAML as a code block
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """uint8 (H, W, 3) image."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def validation(self, results: dict[str, dict], epoch: int, step: int,
                   scenes: ValScenes | None = None) -> None:
        """Scalars, per-class IoU and a confusion-matrix image per dataset, plus a log table;
        the point clouds ``scenes`` captured during the evaluation."""
        if scenes is not None and self.writer is not None:
            scenes.log(self.writer, step)
        for name, res in results.items():
            self.scalars({f"val/{name}/{k}": res[k] for k in ("mIoU", "mIoU_ref", "mAcc", "allAcc")
                          if k in res and np.isfinite(res[k])}, step)
            per_class = {f"val/{name}/iou/{c}": v for c, v in res["per_class"].items()
                         if v is not None and np.isfinite(v)}
            self.scalars(per_class, step)
            if self.writer is not None:
                self.image(f"val/{name}/confusion", confusion_image(res["confusion"], list(res["per_class"])), step)
            ious = "  ".join(f"{c}={v:.3f}" for c, v in res["per_class"].items()
                             if v is not None and np.isfinite(v))
            ref = f" (all-classes mIoU_ref {res['mIoU_ref']:.4f})" if "mIoU_ref" in res else ""
            if res.get("groups"):  # ScanNet200's head / common / tail
                ref += " " + " / ".join(f"{g} {v['mIoU']:.4f}" for g, v in res["groups"].items())
                self.scalars({f"val/{name}/mIoU_{g}": v["mIoU"] for g, v in res["groups"].items()}, step)
            self.info(f"val {name} epoch {epoch}: mIoU {res['mIoU']:.4f}{ref} mAcc {res['mAcc']:.4f} "
                      f"allAcc {res['allAcc']:.4f} | {ious}")
        if results:
            mean = float(np.mean([r["mIoU"] for r in results.values()]))
            self.scalars({"val/mean_mIoU": mean}, step)

    def progress(self, total: int, desc: str):
        """tqdm bar (loss, lr, dataset, points/s, ETA) on rank 0; a no-op object elsewhere."""
        if not self.enabled:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr,
                    mininterval=1.0, disable=None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class ValScenes:
    """The first val scene of each dataset as TensorBoard point clouds, coloured by prediction
    and by ground truth (``val_scene/<dataset>/pred``, ``.../gt``; ignored labels grey).

    ``hook(name)`` is ``evaluate``'s ``on_scene`` for dataset ``name``: it keeps that dataset's
    first scene only (``scenes[0]``, which rank 0 evaluates), subsampled at once to the same
    ``max_points`` points at every evaluation (seeded), so no other scene is held and steps
    compare point for point. ``log`` writes the kept clouds and forgets them; the ground truth,
    which never changes, only the first time (per process: a resumed run logs it again), which
    halves the events (a 20k-point cloud is ~0.5 MB per evaluation). Colours are
    ``ppt.data.clouds.palette`` (as ``tools/test.py`` / ``tools/infer.py``), the same per class
    in both clouds.

    Args:
        val_sets: {dataset name: ``SceneDataset``} evaluated (``info.class_names``; ``scenes`` and
            ``scene_name`` name the first scene; without them the first scene finished is kept).
        max_points: most points per cloud.
        seed: picks the kept points.
    """

    def __init__(self, val_sets: dict, max_points: int = SCENE_POINTS, seed: int = 0):
        self.max_points, self.seed = max_points, seed
        self.num_classes = {name: len(ds.info.class_names) for name, ds in val_sets.items()}
        self.first = {name: ds.scene_name(ds.scenes[0]) if hasattr(ds, "scene_name") else None
                      for name, ds in val_sets.items()}
        self.kept: dict[str, dict] = {}
        self.gt_logged: set[str] = set()

    def hook(self, name: str) -> Callable[[dict], None]:
        """``on_scene`` callback ({name, coord (N, 3), segment (N,) or None, pred (N,)})."""
        def keep(scene: dict) -> None:
            if name in self.kept or self.first[name] not in (None, scene["name"]):
                return
            index = scene_subsample(len(scene["coord"]), self.max_points, self.seed)
            segment = scene["segment"]
            self.kept[name] = {"coord": np.asarray(scene["coord"])[index].astype(np.float32),
                               "pred": np.asarray(scene["pred"])[index],
                               "segment": None if segment is None else np.asarray(segment)[index]}
        return keep

    def log(self, writer, step: int) -> None:
        """``add_mesh`` of every kept scene: ``pred`` and, if labelled and not yet logged, ``gt``."""
        from ppt.data.clouds import palette

        for name, scene in self.kept.items():
            k = self.num_classes[name]
            colours = palette(k)  # row k (label -1 / out of range) is grey
            vertices = scene["coord"][None]
            for kind in ("pred", "gt"):
                labels = scene["pred" if kind == "pred" else "segment"]
                if labels is None or (kind == "gt" and name in self.gt_logged):
                    continue
                labels = np.where((labels >= 0) & (labels < k), labels, k)
                writer.add_mesh(f"val_scene/{name}/{kind}", vertices=vertices, colors=colours[labels][None],
                                config_dict=SCENE_VIEW, global_step=step)
            self.gt_logged.add(name)
        self.kept.clear()


def scene_subsample(num_points: int, max_points: int = SCENE_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``num_points`` points, the same for the same
    arguments (``ValScenes``)."""
    if num_points <= max_points:
        return np.arange(num_points)
    return np.sort(np.random.default_rng(seed).choice(num_points, max_points, replace=False))


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
