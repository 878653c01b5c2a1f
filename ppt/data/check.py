"""Validate a preprocessed data root before training (and after preprocessing).

``check_data_root(root, datasets, splits, quick=True)`` walks
``<root>/<dataset>/<split globs of classes.DATASETS>`` and checks every scene folder with
``scene_io.check_scene`` (same messages): arrays present and readable, equal lengths, shapes,
integer labels, labels in range, finite coordinates; plus float coordinates. ``quick`` reads
only the ``.npy`` headers (``np.load(mmap_mode='r')``) and validates stand-in arrays of the same
shape and dtype, so it costs milliseconds per scene and skips the content checks (finite
values, label range, histogram). Problems are collected; the call raises one ``SceneError``
listing them (first few in full) unless ``raise_on_error=False``.

Scenes without ``normal.npy`` are not a problem (the readers estimate normals once and cache
them, ``ppt.data.normals.NormalCache``); the report counts them, and those already cached.
A ``normal.npy`` that ppt estimated from an older ``coord.npy`` counts as missing (it will be
re-estimated), not as a shape error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppt.data.classes import IGNORE_INDEX
from ppt.data.dataset_file import get_dataset_info
from ppt.data.normals import NormalCache, normal_source
from ppt.data.scene_io import SceneError, check_scene, load_array

MAX_LISTED = 10


@dataclass
class SplitReport:
    """Per dataset split: scene count, points, normals, label histogram.

    ``with_normal`` counts scenes with a valid ``normal.npy`` (``estimated`` of them written by
    ppt's normal cache); the other scenes get estimated normals on first use, ``cached`` of
    them already in the cache folder.
    """

    scenes: int = 0
    points: int = 0
    with_normal: int = 0
    estimated: int = 0
    cached: int = 0
    histogram: np.ndarray | None = None  # (K,) counts; None in quick mode
    ignored: int = 0


@dataclass
class DataReport:
    root: Path
    quick: bool
    normal_cache: Path | None = None
    splits: dict[str, dict[str, SplitReport]] = field(default_factory=dict)
    infos: dict = field(default_factory=dict)  # dataset name -> DatasetInfo checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"data root {self.root} ({'quick: headers only' if self.quick else 'full'})"]
        for dataset, splits in self.splits.items():
            info = self.infos.get(dataset) or get_dataset_info(dataset, self.root)
            for split, rep in splits.items():
                lines.append(f"{dataset}/{split}: {rep.scenes} scenes, {rep.points:,} points, "
                             f"normals in {rep.with_normal}/{rep.scenes}"
                             + (f" ({rep.estimated} estimated by ppt)" if rep.estimated else ""))
                without = rep.scenes - rep.with_normal
                if without:
                    todo = without - rep.cached
                    lines.append(f"  {without} scene(s) without normal.npy: {todo} to estimate on "
                                 f"first use (k-NN PCA, once), {rep.cached} cached already; kept "
                                 f"next to the scene, or in {self.normal_cache} if read-only")
                if rep.histogram is not None and rep.scenes:
                    total = max(int(rep.histogram.sum()) + rep.ignored, 1)
                    parts = [f"{n} {100 * c / total:.1f}%"
                             for n, c in zip(info.class_names, rep.histogram)]
                    lines.append("  labels: " + ", ".join(parts)
                                 + f", ignore {100 * rep.ignored / total:.1f}%")
        lines.append(f"{len(self.problems)} problem(s)")
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _header(path: Path) -> np.ndarray:
    """Zero-cost stand-in with the file's shape and dtype (reads the header only)."""
    if not path.is_file():
        raise SceneError(f"{path}: file is missing")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SceneError(f"{path}: not a readable .npy file ({err})") from None
    return np.lib.stride_tricks.as_strided(np.zeros(1, array.dtype), array.shape,
                                           (0,) * array.ndim)


def check_scene_folder(folder: Path, num_classes: int, segment_file: str, require_segment: bool,
                       quick: bool, ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """Validate one scene folder; returns the (stand-in, when quick) arrays (labels equal to
    ``ignore_index`` read as -1)."""
    read = _header if quick else load_array
    arrays = {"coord": read(folder / "coord.npy"), "color": read(folder / "color.npy")}
    stale_normal = normal_source(folder) == "stale"  # re-estimated on use: not the data's error
    for key, name in (("normal", "normal.npy"), ("segment", segment_file),
                      ("instance", "instance.npy")):
        if key == "normal" and stale_normal:
            continue
        if (folder / name).exists() or (key == "segment" and require_segment):
            arrays[key] = read(folder / name)
    seg = arrays.get("segment")
    if not quick and seg is not None and ignore_index != IGNORE_INDEX and np.issubdtype(seg.dtype, np.integer):
        arrays["segment"] = np.where(seg == ignore_index, IGNORE_INDEX, seg.astype(np.int64))
    if arrays["coord"].ndim == 2 and not np.issubdtype(arrays["coord"].dtype, np.floating):
        raise SceneError(f"{folder / 'coord.npy'}: expected float coordinates, got "
                         f"{arrays['coord'].dtype}")
    check_scene(arrays, folder, num_classes, segment_file)
    return arrays


def data_root_hint(root: str | os.PathLike, names, any_of: bool = False) -> str:
    """"; did you mean --data-root <child>?" when a child folder of ``root`` holds the dataset
    folders ``names`` (all of them, or any with ``any_of``) that ``root`` lacks; else ""."""
    root = Path(root)
    if not root.is_dir():
        return ""
    test = any if any_of else all
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if test((child / d).is_dir() for d in names):
            return f"; did you mean --data-root {child}?"
    return ""


def check_data_root(root: str | os.PathLike, datasets: list[str] | tuple[str, ...] | None = None,
                    splits: list[str] | tuple[str, ...] = ("train", "val"), quick: bool = True,
                    raise_on_error: bool = True, normal_cache: NormalCache | None = None,
                    described: dict | None = None) -> DataReport:
    """Check every scene of ``datasets`` x ``splits`` under ``root``.

    Args:
        root: data root holding ``<dataset>/`` folders.
        datasets: built-in names or folders of ``root`` with a ``dataset.yaml``; default: every
            such folder present under ``root``.
        splits: split names; labels are required except in ``test``.
        quick: headers only (see module docstring).
        raise_on_error: raise one ``SceneError`` listing the problems.
        normal_cache: where the readers cache estimated normals (default ``NormalCache()``).
        described: descriptions of a user's datasets already known (a config's ``datasets``).

    Returns:
        ``DataReport`` with per-split counts and the problems found.
    """
    from ppt.data.classes import DATASETS
    from ppt.data.dataset_file import DATASET_FILE, DatasetFileError, described_datasets

    root = Path(root)
    normal_cache = normal_cache if normal_cache is not None else NormalCache()
    report = DataReport(root, quick, normal_cache.cache_dir)
    if not root.is_dir():
        report.problems.append(f"{root}: data root is missing")
    explicit = datasets is not None  # a named dataset that resolves to nothing raises
    if root.is_dir() and datasets is None:
        datasets = described_datasets(root)
        if not datasets:
            report.problems.append(f"{root}: no dataset folders ({', '.join(DATASETS)}, or a folder with "
                                   f"a {DATASET_FILE})" f"{data_root_hint(root, DATASETS, any_of=True)}")
    for dataset in (datasets or ()) if root.is_dir() else ():
        try:
            info = get_dataset_info(dataset, root, described)
        except DatasetFileError as err:
            if explicit:
                raise
            report.problems.append(str(err))
            continue
        report.infos[dataset] = info
        base = root / info.folder_name
        report.splits[dataset] = {}
        for split in splits:
            if split not in info.splits:
                report.problems.append(f"{dataset}: unknown split {split!r}; valid: "
                                       f"{', '.join(info.splits)}")
                continue
            rep = report.splits[dataset].setdefault(split, SplitReport())
            folders = sorted({p for pattern in info.splits[split] for p in base.glob(pattern)
                              if p.is_dir()})
            if not folders:
                globs = ", ".join(str(base / g) for g in info.splits[split])
                hint = "" if base.is_dir() else data_root_hint(root, [dataset])
                report.problems.append(f"{dataset}/{split}: no scene folders match {globs}{hint}")
            if not quick:
                rep.histogram = np.zeros(info.num_classes, np.int64)
            for folder in folders:
                try:
                    arrays = check_scene_folder(folder, info.num_classes, info.segment_file,
                                                require_segment=split != "test", quick=quick,
                                                ignore_index=info.ignore_index)
                except SceneError as err:
                    report.problems.append(str(err))
                    continue
                rep.scenes += 1
                rep.points += len(arrays["coord"])
                if "normal" in arrays:
                    rep.with_normal += 1
                    rep.estimated += normal_source(folder) == "estimated"
                else:
                    rep.cached += normal_cache.cached(folder, len(arrays["coord"]), header_only=True) is not None
                if not quick and "segment" in arrays:
                    seg = arrays["segment"].astype(np.int64)
                    rep.histogram += np.bincount(seg[seg != IGNORE_INDEX],
                                                 minlength=info.num_classes)
                    rep.ignored += int((seg == IGNORE_INDEX).sum())
    if raise_on_error and report.problems:
        listed = "\n  ".join(report.problems[:MAX_LISTED])
        more = len(report.problems) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise SceneError(f"data root {root}: {len(report.problems)} problem(s) "
                         f"(run tools/check_data.py {root} for the full list):\n  {listed}{tail}")
    return report
