"""Segmentation metrics: a confusion matrix summed over a split, and what is derived from it.

Convention (SPEC §7): intersection, union and target counts are summed over every point of
the split (and across processes) before any ratio is taken; per-class IoU = I / U, per-class
accuracy = I / T, allAcc = sum(I) / sum(T).

Absent classes: a class with ``union == 0`` (never in the labels, never predicted) has no IoU;
it shows as ``n/a`` in tables and ``None`` in ``per_class``, and is left out of the mIoU
average. Likewise a class with ``target == 0`` has no accuracy and is left out of mAcc. A class
that is predicted but never labelled has IoU 0 and IS counted. The reference (Pointcept)
averages ``I / (U + 1e-10)`` over all classes, which counts absent classes as 0; on full
benchmark splits, where every class occurs, both conventions give the same number. On small
splits (a few validation scenes, an open-vocabulary label set) ours does not penalise the
model for classes the data does not contain. ``summary`` also reports the reference numbers as
``mIoU_ref`` / ``mAcc_ref`` (mean over ALL K classes of the label set, absent classes 0, as
Pointcept's ``SemSegEvaluator`` and tester compute them) so results can be compared with
published ones; ``CONVENTIONS`` says which is which in words (tables, metrics.json).

Groups: a label set with named groups of classes (ScanNet200's head / common / tail, a
``DatasetInfo.groups``) also gets both means over each group's classes (:func:`group_metrics`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


# What each mean means, for tables and metrics.json.
CONVENTIONS = {
    "mIoU": "mean IoU over the classes present (labelled or predicted); absent classes left out",
    "mAcc": "mean accuracy over the classes labelled",
    "mIoU_ref": "reference (Pointcept) mIoU: mean over all classes of the label set, absent classes count 0",
    "mAcc_ref": "reference (Pointcept) mAcc: mean over all classes of the label set, unlabelled classes count 0",
    "groups": "per named group of classes (e.g. ScanNet200 head / common / tail): mIoU over the group's classes "
              "present, mIoU_ref over all the group's classes (absent count 0)",
}


class ConfusionMeter:
    """Accumulates a (K, K) confusion matrix: rows = true class, columns = predicted class.

    Args:
        num_classes: K, the size of the label space.
        ignore_index: label of points left out of every count.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch of points.

        Args:
            pred: (N,) predicted class ids in [0, K).
            target: (N,) true class ids in [0, K) or ``ignore_index``.
        """
        pred, target = torch.as_tensor(pred).reshape(-1), torch.as_tensor(target).reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in length")
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        k = self.num_classes
        if len(target) and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"labels must be in [0, {k}) or {self.ignore_index}, "
                             f"got range [{int(target.min())}, {int(target.max())}]")
        if len(pred) and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predictions must be in [0, {k}), got range [{int(pred.min())}, {int(pred.max())}]")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.confusion += counts.to(self.confusion.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes (no-op unless torch.distributed is initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL only reduces CUDA tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        total = self.confusion.to(device)
        dist.all_reduce(total)
        self.confusion = total.cpu()

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(intersection, union, target)`` per class, int64 (K,) each."""
        c = self.confusion.cpu().numpy()
        intersection = np.diag(c).copy()
        target = c.sum(1)
        union = target + c.sum(0) - intersection
        return intersection, union, target

    def summary(self, class_names: Sequence[str] | None = None,
                groups: dict[str, Sequence[str]] | None = None) -> dict:
        """Metrics over everything added so far.

        Args:
            class_names: names in label order (default ``"0"``, ``"1"``, ...).
            groups: named groups of class names; adds ``groups`` (:func:`group_metrics`).

        Returns:
            dict with ``mIoU``, ``mAcc``, ``allAcc`` (floats in 0..1; NaN when nothing was
            counted), ``mIoU_ref`` and ``mAcc_ref`` (reference convention, see module doc;
            NaN when nothing was counted), ``classes_present`` (classes with an IoU, out of
            ``num_classes``), ``per_class`` and
            ``per_class_acc`` ({name: float or None for absent classes}), ``intersection``,
            ``union``, ``target`` (lists of ints) and ``confusion`` (np.int64 (K, K)); with
            ``groups``, also ``groups``.
        """
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        intersection, union, target = self.counts()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
            acc = np.where(target > 0, intersection / np.maximum(target, 1), np.nan)
        total = target.sum()
        result = {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "allAcc": float(intersection.sum() / total) if total > 0 else float("nan"),
            # The reference's formulas: the epsilon turns 0 / 0 into 0 (NaN only if nothing counted).
            "mIoU_ref": float(np.mean(intersection / (union + 1e-10))) if total > 0 else float("nan"),
            "mAcc_ref": float(np.mean(intersection / (target + 1e-10))) if total > 0 else float("nan"),
            "classes_present": int((union > 0).sum()),
            "num_classes": self.num_classes,
            "per_class": {n: _or_none(v) for n, v in zip(names, iou)},
            "per_class_acc": {n: _or_none(v) for n, v in zip(names, acc)},
            "intersection": intersection.tolist(),
            "union": union.tolist(),
            "target": target.tolist(),
            "confusion": self.confusion.cpu().numpy(),
        }
        if groups:
            result["groups"] = group_metrics(result, groups)
        return result


def group_metrics(summary: dict, groups: dict[str, Sequence[str]]) -> dict[str, dict]:
    """Both mIoU conventions over each named group of classes of a :meth:`ConfusionMeter.summary`.

    Args:
        summary: a ``summary`` result (reads ``per_class``, ``intersection``, ``union``, ``target``).
        groups: group name -> class names of the summary's label set (e.g. ScanNet200's
            ``{"head": (...), "common": (...), "tail": (...)}``).

    Returns:
        ``{group: {"mIoU", "mIoU_ref", "classes", "classes_present"}}`` in ``groups`` order:
        ``mIoU`` over the group's classes with an IoU (NaN when none has one), ``mIoU_ref`` over
        all ``classes`` of the group, absent ones counting 0 (NaN when nothing was counted).

    Raises:
        ValueError: a group names a class that is not in the label set.
    """
    names = list(summary["per_class"])
    position = {n: i for i, n in enumerate(names)}
    intersection, union = np.asarray(summary["intersection"]), np.asarray(summary["union"])
    counted = int(np.sum(summary["target"])) > 0
    out = {}
    for group, members in groups.items():
        if not members:
            raise ValueError(f"class group {group!r} names no class")
        unknown = [n for n in members if n not in position]
        if unknown:
            raise ValueError(f"class group {group!r} names {', '.join(repr(n) for n in unknown[:5])}, not among "
                             f"the {len(names)} classes of the label set")
        index = [position[n] for n in members]
        present = [summary["per_class"][names[i]] for i in index if summary["per_class"][names[i]] is not None]
        ref = float(np.mean(intersection[index] / (union[index] + 1e-10))) if counted else float("nan")
        out[group] = {"mIoU": float(np.mean(present)) if present else float("nan"), "mIoU_ref": ref,
                      "classes": len(index), "classes_present": len(present)}
    return out


def format_groups(groups: dict[str, dict], key: str = "mIoU") -> str:
    """``head 41.20 / common 30.10 / tail 12.30``: one convention of :func:`group_metrics`, in %."""
    return " / ".join(f"{group} {_fmt(values[key])}" for group, values in groups.items())


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.2f}"


def format_table(summary: dict, title: str = "") -> str:
    """Plain-text per-class table (IoU, accuracy, labelled points) of a ``summary`` result.

    Values are percentages; ``n/a`` marks classes absent from both labels and predictions.
    """
    names = list(summary["per_class"])
    width = max([len(n) for n in names] + [len("class")])
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'points':>10}")
    lines.append("-" * (width + 30))
    targets = summary.get("target", [0] * len(names))
    for name, points in zip(names, targets):
        lines.append(f"{name:<{width}}  {_fmt(summary['per_class'][name]):>7}  "
                     f"{_fmt(summary['per_class_acc'][name]):>7}  {points:>10}")
    lines.append("-" * (width + 30))
    lines.append(f"mIoU {_fmt(summary['mIoU'])}  mAcc {_fmt(summary['mAcc'])}  allAcc {_fmt(summary['allAcc'])}")
    if "mIoU_ref" in summary:
        # Counted from the rows shown: IoU n/a = neither labelled nor predicted, Acc n/a = never
        # labelled (a class only predicted has IoU 0, counted in mIoU, and no accuracy).
        with_iou = sum(v is not None for v in summary["per_class"].values())
        with_acc = sum(v is not None for v in summary["per_class_acc"].values())
        lines.append(f"  mIoU over the {with_iou} classes labelled or predicted ({len(names) - with_iou} IoU n/a rows "
                     f"left out), mAcc over the {with_acc} classes labelled ({len(names) - with_acc} Acc n/a rows "
                     f"left out); reference convention over all {len(names)} classes (n/a = 0): "
                     f"mIoU_ref {_fmt(summary['mIoU_ref'])}  mAcc_ref {_fmt(summary.get('mAcc_ref'))}")
    if summary.get("groups"):
        lines.append(f"  groups: mIoU {format_groups(summary['groups'])} (classes present); "
                     f"mIoU_ref {format_groups(summary['groups'], 'mIoU_ref')} (all classes of each group)")
    return "\n".join(lines)
