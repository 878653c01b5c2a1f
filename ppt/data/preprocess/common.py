"""Parallel, resumable runner shared by the raw-dataset converters.

Each converter lists its work as ``SceneTask``s (one per output scene folder) and supplies a
top-level ``process(task) -> dict[str, np.ndarray]`` that reads the raw files of one scene.
``run_tasks`` then:

- removes temporary folders left by an interrupted earlier run (``write_scene`` writes into
  ``.<scene>.tmp-*`` next to the target and renames it, so a killed run leaves only those);
- skips scenes whose folder already exists (the rename is the commit point, so an existing
  folder is a complete scene) unless ``overwrite``;
- runs the rest in a process pool with a progress bar; one scene failing never stops the run;
- prints warnings raised while reading a scene, prefixed by the scene name;
- ends with a summary (done / skipped / failed with reasons, points and label histogram per
  split) and reports failure so the command line can exit non-zero.
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ppt.data.scene_io import write_scene


class SkipScene(Exception):
    """Raised by a converter when a scene legitimately yields nothing (e.g. no valid pixels)."""


@dataclass(frozen=True)
class SceneTask:
    """One unit of work: raw inputs of one scene and where its folder goes.

    Attributes:
        name: display name (``Area_1/office_1``).
        out_dir: output scene folder.
        split: split used for the summary (``train``, ``Area_1`` ...).
        inputs: converter-specific, picklable description of the raw inputs.
    """

    name: str
    out_dir: Path
    split: str
    inputs: Any = None


@dataclass
class TaskResult:
    task: SceneTask
    status: str  # "done" | "skipped" | "failed"
    reason: str = ""
    points: int = 0
    histogram: np.ndarray | None = None  # counts of label 0..K-1
    ignored: int = 0  # points with the ignore label
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RunSummary:
    """Outcome of ``run_tasks``; ``ok`` is False when any scene failed."""

    results: list[TaskResult]
    seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    @property
    def points(self) -> int:
        return sum(r.points for r in self.results if r.status == "done")


def remove_stale_temp(folders: set[Path]) -> list[Path]:
    """Delete ``.<name>.tmp-*`` folders that ``write_scene`` leaves when a run is killed.

    Only safe while no other run writes into the same output root (documented in the CLI).
    """
    removed = []
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    return removed


def _histogram(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, int]:
    labels = labels.astype(np.int64)
    valid = (labels >= 0) & (labels < num_classes)
    return np.bincount(labels[valid], minlength=num_classes), int((~valid).sum())


def _run_one(job: tuple[Callable[[SceneTask], dict], SceneTask, str, int]) -> TaskResult:
    """Process and write one scene; never raises (the result carries the reason)."""
    process, task, segment_key, num_classes = job
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            arrays = process(task)
            write_scene(task.out_dir, arrays)
        except SkipScene as err:
            result = TaskResult(task, "skipped", str(err))
        except Exception as err:  # one bad scene must not stop the others
            last = traceback.extract_tb(err.__traceback__)[-1]
            where = f" ({Path(last.filename).name}:{last.lineno})"
            result = TaskResult(task, "failed", f"{type(err).__name__}: {err}{where}")
        else:
            result = TaskResult(task, "done", points=len(arrays["coord"]))
            if segment_key in arrays:
                result.histogram, result.ignored = _histogram(arrays[segment_key], num_classes)
    result.warnings = [str(w.message) for w in caught]
    result.seconds = time.perf_counter() - start
    return result


def run_tasks(tasks: list[SceneTask], process: Callable[[SceneTask], dict[str, np.ndarray]],
              class_names: tuple[str, ...], segment_key: str = "segment", workers: int = 1,
              overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              ) -> RunSummary:
    """Convert every task's scene, in parallel, resumably.

    Args:
        tasks: scenes to convert.
        process: top-level (picklable) function returning the scene's arrays.
        class_names: label names of ``segment_key`` (for the histogram).
        segment_key: array whose histogram is reported.
        workers: processes; 0 or 1 runs in this process (easier to debug).
        overwrite: redo scenes whose folder already exists.
        progress: show a tqdm progress bar.
        log: where warnings and the summary go.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    removed = remove_stale_temp({t.out_dir.parent for t in tasks})
    for tmp in removed:
        log(f"removed stale temporary folder from an interrupted run: {tmp}")
    results: list[TaskResult] = []
    todo = []
    for task in tasks:
        if task.out_dir.is_dir() and not overwrite:
            results.append(TaskResult(task, "skipped", "already done (use --overwrite to redo)"))
        else:
            todo.append(task)
    jobs = [(process, t, segment_key, len(class_names)) for t in todo]
    bar = tqdm(total=len(jobs), unit="scene", disable=not progress, dynamic_ncols=True)
    write = bar.write if progress else log

    def collect(result: TaskResult) -> None:
        results.append(result)
        for message in result.warnings:
            write(f"warning: {result.task.name}: {message}")
        if result.status == "failed":
            write(f"FAILED {result.task.name}: {result.reason}")
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                collect(_run_one(job))
        else:
            with mp.get_context().Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(_run_one, jobs):
                    collect(result)
    finally:
        bar.close()
    summary = RunSummary(results, time.perf_counter() - start)
    log(format_summary(summary, class_names))
    return summary


def format_summary(summary: RunSummary, class_names: tuple[str, ...]) -> str:
    """Human-readable summary: counts, reasons, per-split points and label histograms."""
    done = [r for r in summary.results if r.status == "done"]
    lines = [f"done {len(done)}, skipped {summary.count('skipped')}, failed "
             f"{summary.count('failed')} in {summary.seconds:.1f} s"]
    if done:
        busy = sum(r.seconds for r in done)
        lines.append(f"throughput: {len(done) / summary.seconds:.2f} scenes/s, "
                     f"{summary.points / summary.seconds:,.0f} points/s wall "
                     f"({busy / len(done):.2f} s per scene per worker)")
    reasons: dict[str, int] = {}
    for r in summary.results:
        if r.status == "skipped":
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    for reason, n in sorted(reasons.items()):
        lines.append(f"  skipped {n}: {reason}")
    for r in summary.results:
        if r.status == "failed":
            lines.append(f"  FAILED {r.task.name}: {r.reason}")
    for split in sorted({r.task.split for r in done}):
        rows = [r for r in done if r.task.split == split]
        points = sum(r.points for r in rows)
        lines.append(f"[{split}] {len(rows)} scenes, {points:,} points")
        hists = [r.histogram for r in rows if r.histogram is not None]
        if hists:
            hist = np.sum(hists, axis=0)
            ignored = sum(r.ignored for r in rows)
            total = max(int(hist.sum()) + ignored, 1)
            parts = [f"{name} {100 * c / total:.1f}%" for name, c in zip(class_names, hist)]
            lines.append("  labels: " + ", ".join(parts) + f", ignore {100 * ignored / total:.1f}%")
    return "\n".join(lines)
