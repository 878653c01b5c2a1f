"""Data-efficient training protocols (ScanNet Data Efficient benchmark; SPEC §8): a label budget
per scene (``data.label_budget``) and a share of the training scenes (``data.scene_fraction``).

Reference (Pointcept ``ScanNetDataset``, configs ``*-la20/50/100/200`` and ``*-lr1/5/10/20``):
``la_file`` is a dict scene name -> indices of the labelled points among the scene's RAW points;
``get_data`` sets every other label to ignore before any transform (so after grid sampling a
labelled point reaches the network only if the voxel keeps that point); ``lr_file`` lists the
training scenes kept. Both files are the benchmark's released lists. Here both are drawn:

- scenes: each dataset of the mix keeps ``max(1, round(fraction * n))`` of its ``n`` training
  scenes, a permutation of the sorted scene names from ``default_rng([seed, crc32(dataset)])``
  (independent of listing or loader order). Per dataset, not only the first: in a PEFT or
  single-dataset run that is the one dataset; in a mix every dataset gives up the same share.
- labels: per kept scene, ``min(budget, labelled points)`` indices drawn without replacement
  among the raw points whose label is not ignore, from ``default_rng([seed, crc32(dataset),
  crc32(scene name)])``; applied before the transforms, as the reference. Deviation: the
  reference's lists may include unlabelled points (we only pick labelled ones, so a scene keeps
  exactly ``budget`` labels when it has that many).

The selection is plain data (:class:`Selection`, JSON-able); the engine writes it into the
experiment folder and compares it on resume (``ppt.engine.build.train_selection``).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ppt.data.classes import IGNORE_INDEX
from ppt.data.datasets import SceneDataset


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def scene_count(total: int, fraction: float) -> int:
    """Scenes kept of ``total`` at ``fraction`` (at least one)."""
    return total if fraction >= 1.0 else max(1, round(fraction * total))


def scene_subset(names: Sequence[str], fraction: float, seed: int, dataset: str) -> list[str]:
    """The kept scene names, in the order of ``names`` (see module docstring)."""
    ordered = sorted(names)
    keep = scene_count(len(ordered), fraction)
    if keep >= len(ordered):
        return list(names)
    perm = np.random.default_rng([seed, _key(dataset)]).permutation(len(ordered))
    chosen = {ordered[i] for i in perm[:keep]}
    return [n for n in names if n in chosen]


def labelled_indices(segment: np.ndarray, budget: int, seed: int, dataset: str, scene: str) -> np.ndarray:
    """Sorted int64 indices (into the scene's raw points) of the labels kept: ``min(budget,
    labelled points)`` of the points whose label is not ``IGNORE_INDEX``."""
    valid = np.flatnonzero(np.asarray(segment) != IGNORE_INDEX)
    if len(valid) <= budget:
        return valid.astype(np.int64)
    rng = np.random.default_rng([seed, _key(dataset), _key(scene)])
    return np.sort(rng.choice(valid, size=budget, replace=False)).astype(np.int64)


def scene_segment(ds: SceneDataset, folder) -> np.ndarray:
    """A scene's raw labels (N,), read alone (memory-mapped) without loading the points."""
    return np.load(folder / ds.info.segment_file, mmap_mode="r")


@dataclass
class Selection:
    """What a data-efficient run trains on, per dataset of the mix.

    Attributes:
        label_budget, scene_fraction, seed: the settings it was drawn with.
        scenes: dataset -> kept scene names (all of them when ``scene_fraction`` is 1).
        totals: dataset -> training scenes before the fraction.
        labels: dataset -> scene name -> kept point indices (empty when ``label_budget`` is 0).
    """

    label_budget: int
    scene_fraction: float
    seed: int
    scenes: dict[str, list[str]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.label_budget > 0 or self.scene_fraction < 1.0

    def labelled_points(self, dataset: str) -> int:
        return sum(len(v) for v in self.labels.get(dataset, {}).values())

    def scenes_json(self) -> dict:
        return {"scene_fraction": self.scene_fraction, "seed": self.seed,
                "datasets": {d: {"total": self.totals[d], "kept": self.scenes[d]} for d in self.scenes}}

    def labels_json(self) -> dict:
        return {"label_budget": self.label_budget, "seed": self.seed,
                "datasets": {d: {s: idx.tolist() for s, idx in scenes.items()} for d, scenes in self.labels.items()}}

    def summary(self) -> list[str]:
        """One line per dataset: scenes kept and labelled points."""
        lines = []
        for d, kept in self.scenes.items():
            line = f"{d}: {len(kept)} of {self.totals[d]} training scenes (scene_fraction {self.scene_fraction:g})"
            if self.label_budget > 0:
                line += (f"; label budget {self.label_budget} points per scene: {self.labelled_points(d):,} "
                         f"labelled points in all, every other label ignored")
            lines.append(line)
        return lines


def select(datasets: dict[str, SceneDataset], label_budget: int, scene_fraction: float, seed: int) -> Selection:
    """Draw the scenes and labelled points of every training dataset (module docstring). Reads
    only the label files of the kept scenes, and only with a label budget."""
    sel = Selection(label_budget, scene_fraction, seed)
    for name, ds in datasets.items():
        folders = {ds.scene_name(f): f for f in ds.scenes}
        sel.totals[name] = len(folders)
        sel.scenes[name] = scene_subset(list(folders), scene_fraction, seed, name)
        if label_budget > 0:
            sel.labels[name] = {s: labelled_indices(scene_segment(ds, folders[s]), label_budget, seed, name, s)
                                for s in sel.scenes[name]}
    return sel


class LabelBudgetDataset(SceneDataset):
    """A SceneDataset whose samples keep only the selected labels (``label_keep``: scene name ->
    raw point indices), every other label set to ``IGNORE_INDEX`` before the transforms."""

    label_keep: dict[str, np.ndarray]

    def load(self, index: int) -> dict:
        sample = super().load(index)
        if "segment" in sample:
            keep = self.label_keep.get(sample["name"])
            if keep is None:
                raise KeyError(f"scene {sample['name']} of {self.info.name} has no label-budget entry")
            masked = np.full_like(sample["segment"], IGNORE_INDEX)
            masked[keep] = sample["segment"][keep]
            sample["segment"] = masked
        return sample


def apply_selection(datasets: dict[str, SceneDataset], selection: Selection) -> None:
    """Restrict each dataset to its kept scenes and, with a label budget, its kept labels (in
    place; the dataset's class becomes :class:`LabelBudgetDataset`, picklable for workers)."""
    for name, ds in datasets.items():
        kept = set(selection.scenes[name])
        ds.scenes = [f for f in ds.scenes if ds.scene_name(f) in kept]
        if selection.label_budget > 0:
            if type(ds) is not SceneDataset:
                raise TypeError(f"label budget on {type(ds).__name__} is not supported")
            ds.__class__ = LabelBudgetDataset
            ds.label_keep = selection.labels[name]


def selection_mismatch(selection: Selection, scenes: dict | None, labels: dict | None) -> str | None:
    """Why saved lists (``scenes.json`` / ``label_budget.json`` contents, None when the file
    is absent) differ from ``selection``; None when they agree."""
    if selection.scene_fraction < 1.0:
        if scenes is None:
            return "scenes.json is missing"
        if {d: v["kept"] for d, v in scenes.get("datasets", {}).items()} != selection.scenes:
            return "scenes.json lists other scenes than the data and config give now"
    if selection.label_budget > 0:
        if labels is None:
            return "label_budget.json is missing"
        if labels.get("datasets") != selection.labels_json()["datasets"]:
            return "label_budget.json holds other labelled points than the data and config give now"
    return None
