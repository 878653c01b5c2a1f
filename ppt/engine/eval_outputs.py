"""What ``tools/test.py`` writes: the merged ``metrics.json``, per-scene outputs, progress.

- ``metrics.json`` of an experiment holds ``{"conventions", "results": {dataset: {mode: entry}}}``;
  a mode (:func:`mode_key`) is split + TTA protocol + prompt + label set (+ weights), so runs of
  other modes are merged in, never overwritten. Files of the older flat layout are read too.
- ``--save-pred`` / ``--ply``: ``<scene>_pred.npy`` (int16) and ``<scene>_pred.ply`` (points
  coloured by prediction, ``pred`` and ``gt`` properties) in :func:`mode_folder`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ppt.data.clouds import write_labelled_ply
from ppt.io import atomic_write


def mode_key(split: str, tta: str, prompt: str, label_set: str, weights: str = "") -> str:
    """Name of an evaluation mode inside a dataset's results (metrics.json)."""
    key = f"split={split}; tta={tta}; prompt={prompt}; classes={label_set}"
    return key + (f"; weights={weights}" if weights else "")


def _legacy_entries(old: dict) -> dict:
    """Results of the old flat layout {dataset: entry}, keyed by mode (their TTA was fragments)."""
    results: dict[str, dict] = {}
    for dataset, entry in old.items():
        if isinstance(entry, dict) and "mIoU" in entry:
            tta = {True: "fragments", False: "off"}.get(entry.get("tta"), str(entry.get("tta")))
            classes = ",".join(entry["label_set"]) if entry.get("label_set") else dataset
            key = mode_key(entry.get("split", "val"), tta, entry.get("prompt") or dataset, classes)
            results.setdefault(dataset, {})[key] = entry
    return results


def write_metrics(path: Path, entries: dict[str, dict[str, dict]]) -> dict:
    """Merge ``{dataset: {mode: entry}}`` into the JSON file at ``path`` (atomic): only those
    (dataset, mode) entries are replaced. Returns the whole file's content."""
    from ppt.metrics import CONVENTIONS

    old: dict = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"warning: {path} is not valid JSON; starting it afresh", file=sys.stderr)
    results = old.get("results") if isinstance(old.get("results"), dict) else _legacy_entries(old)
    for dataset, modes in entries.items():
        results.setdefault(dataset, {}).update(modes)
    merged = {"conventions": CONVENTIONS, "results": results}
    text = json.dumps(merged, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return merged


def scene_writer(out_dir: Path, save_pred: bool, ply: bool, num_classes: int):
    """``on_scene`` callback of ``evaluate`` saving predictions and/or PLY files."""
    def save(scene: dict) -> None:
        stem = scene["name"].replace("/", "-")
        if save_pred:
            atomic_write(out_dir / f"{stem}_pred.npy", lambda f: np.save(f, scene["pred"].astype(np.int16)))
        if ply:
            gt = scene["segment"] if scene["segment"] is not None else np.full(len(scene["pred"]), -1)
            write_labelled_ply(out_dir / f"{stem}_pred.ply", np.asarray(scene["coord"], np.float32), scene["pred"],
                               num_classes, {"pred": ("i2", scene["pred"]), "gt": ("i2", gt)})
    return save


def mode_folder(split: str, tta: str, prompt: str, own_prompt: str, label_set: list[str] | None) -> str:
    """Sub-folder of result/<dataset>/ for predictions of a non-default mode ("" = default)."""
    import hashlib

    parts = [] if split == "val" else [split]
    parts += [] if tta == "off" else [f"tta-{tta}"]
    parts += [] if prompt == own_prompt else [f"prompt-{prompt}"]
    if label_set:
        parts.append("classes-" + hashlib.sha1(",".join(label_set).encode()).hexdigest()[:8])
    return "_".join(parts)


class Progress:
    """A tqdm bar over views (scenes x views per scene) on a terminal, else one line per scene."""

    def __init__(self, name: str, scenes: int, views_per_scene: int):
        self.name, self.scenes, self.done = name, scenes, 0
        self.tic = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            unit = "view" if views_per_scene > 1 else "scene"
            self.bar = tqdm(total=scenes * views_per_scene, desc=name, unit=unit, file=sys.stderr,
                            dynamic_ncols=True, leave=False, mininterval=0.5)

    def forward(self, rows: int, views: int) -> None:
        if self.bar is not None and views:
            self.bar.update(views)

    def scene(self, scene: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.scenes} scenes")
        else:
            print(f"{self.name} {self.done}/{self.scenes} {scene['name']}: {len(scene['pred']):,} points "
                  f"({time.perf_counter() - self.tic:.1f} s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
