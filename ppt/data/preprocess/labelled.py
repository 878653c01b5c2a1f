"""A user's labelled scans -> a dataset folder ``<out>/<name>/{train,val}/<scene>/`` + ``dataset.yaml``.

``tools/preprocess.py labelled --src DIR --name NAME --classes classes.txt --out DATA_ROOT``.
Every file (PLY, txt / xyz / csv, npy / npz, LAS / LAZ; see ``labelled_formats``) or scene
folder under ``--src`` becomes one scene. The run has two passes:

1. check: every file still to do is read and checked (labels within the class list, a label
   field, metric units, finite coordinates, points at all), in parallel. Any problem stops the
   run with ONE ``error:`` line (:class:`LabelledError`) before anything is written.
2. write: ``common.run_tasks`` converts the files (normals from the file, else estimated as for
   S3DIS), each scene atomically, in parallel, resumably (finished scenes are skipped unless
   ``overwrite``). ``dataset.yaml`` is written last, only when every scene succeeded.

Labels: raw values must be ``0..K-1`` (K = number of classes); ``ignore`` values (and NaN
labels) become -1. The settings that shape a scene's content are kept in ``.import.json``:
finished scenes are reused only when they were written with the same settings.
The split is a seeded hash of each scene's name (independent of file order), or ``--val`` globs.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ppt.data.classes import IGNORE_INDEX
from ppt.data.dataset_file import DATASET_FILE, DatasetFileError, DatasetSpec, check_name, write_dataset_file
from ppt.data.preprocess.common import SceneTask, run_tasks
from ppt.data.preprocess.labelled_formats import LabelledError, read_labelled
from ppt.data.preprocess.labelled_inputs import (Source, assign_splits, find_sources, parse_classes,
                                                 parse_ignore)
from ppt.io import atomic_write

MM_EXTENT = 100.0         # a room wider than this on an axis is taken for millimetres
SHIFT_ABOVE = 1e4         # coordinates beyond this lose float32 precision: shift them
SETTINGS_FILE = ".import.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImportSettings:
    """What shapes the written scenes (picklable: it travels to the worker processes).

    Args:
        class_names: class names in label order (only the count shapes the scenes).
        ignore: raw label values that become -1.
        label_field: the field / column / array holding the labels (None: the usual names).
        columns: names of the columns of text / .npy tables (None: by count or header).
        scale: factor applied to the coordinates (None: 1, and millimetre clouds are refused).
        normal_k: neighbours for normal estimation when a file has no normals.
    """

    class_names: tuple[str, ...]
    ignore: tuple[int, ...] = ()
    label_field: str | None = None
    columns: tuple[str, ...] | None = None
    scale: float | None = None
    normal_k: int = 16

    def fingerprint(self) -> dict:
        """The settings a finished scene depends on (class names only by their count)."""
        d = asdict(self)
        d["num_classes"] = len(d.pop("class_names"))
        d["ignore"], d["columns"] = list(self.ignore), list(self.columns) if self.columns else None
        return d


@dataclass
class FileCheck:
    """What the check pass learnt about one source."""

    source: Source
    notes: tuple[str, ...] = ()
    error: str = ""   # the one-line problem, "" when the source is fine


def load_source(path: Path, settings: ImportSettings) -> tuple[dict[str, np.ndarray], bool, list[str]]:
    """Read and check one source: ``({coord, color, segment[, normal]}, has colour, notes)``.

    Raises LabelledError for labels outside the class list, non-integer labels, millimetre
    clouds, no finite coordinates, no points.
    """
    raw = read_labelled(path, settings.label_field, settings.columns)
    notes = list(raw.notes)
    coord = np.asarray(raw.coord, np.float64)
    n = len(coord)
    if n == 0:
        raise LabelledError(f"{path}: empty point cloud (0 points)")
    finite = np.isfinite(coord).all(1)
    if not finite.any():
        raise LabelledError(f"{path}: all {n:,} points have NaN / inf coordinates")
    if not finite.all():
        notes.append(f"dropped {n - int(finite.sum()):,} of {n:,} points with NaN / inf coordinates")
    coord = coord[finite]
    segment = labels(raw.label[finite], raw.label_field, raw.fields, path, settings, notes)
    if settings.scale is not None:
        coord = coord * settings.scale
    extent = coord.max(0) - coord.min(0)
    if settings.scale is None and extent.max() > MM_EXTENT:
        axis = "xyz"[int(extent.argmax())]
        raise LabelledError(f"{path}: the cloud spans {extent.max():,.0f} units along {axis}, which looks like "
                            f"millimetres (an indoor scene spans metres); add --scale 0.001 to convert "
                            f"(or --scale 1 if the units are metres)")
    if np.abs(coord).max() > SHIFT_ABOVE:
        shift = np.floor(coord.min(0))
        coord = coord - shift
        notes.append(f"coordinates shifted by {tuple(float(v) for v in -shift)} to keep float32 precision")
    color = raw.color[finite] if raw.color is not None else None
    arrays = {"coord": coord.astype(np.float32),
              "color": (np.clip(np.rint(color), 0, 255).astype(np.uint8) if color is not None
                        else np.zeros((len(coord), 3), np.uint8)),
              "segment": segment}
    if raw.normal is not None:
        normal = raw.normal[finite]
        if np.isfinite(normal).all() and (np.linalg.norm(normal, axis=1) > 0.5).all():
            arrays["normal"] = normal.astype(np.float32)
        else:
            notes.append("the file's normals hold NaN / zero vectors: estimated instead")
    return arrays, color is not None, notes


def labels(values: np.ndarray, field: str, fields: tuple[str, ...], path: Path,
           settings: ImportSettings, notes: list[str]) -> np.ndarray:
    """Raw label values -> int16/int32 labels 0..K-1 or -1 (``ignore`` values, NaN)."""
    values = np.asarray(values)
    k = len(settings.class_names)
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind not in "iuf":
        raise LabelledError(f"{path}: label field {field!r} holds {values.dtype} values, not numbers; "
                            f"pick the label field with --label-field (fields: {', '.join(fields)})")
    unlabelled = np.zeros(len(values), bool)
    if values.dtype.kind == "f":
        unlabelled = ~np.isfinite(values)
        if unlabelled.any():
            notes.append(f"{int(unlabelled.sum()):,} points have a NaN label: set to ignore (-1)")
        safe = np.where(unlabelled, 0, values)
        fractional = safe != np.round(safe)
        if fractional.any():
            raise LabelledError(
                f"{path}: label field {field!r} holds non-integer values (e.g. {safe[fractional][0]:g} on "
                f"{int(fractional.sum()):,} points); is it the label? pick the label field with --label-field "
                f"(fields: {', '.join(fields)})")
        values = safe
    values = values.astype(np.int64)
    if settings.ignore:
        unlabelled |= np.isin(values, settings.ignore)
    bad = ~unlabelled & ((values < 0) | (values >= k))
    if bad.any():
        found, counts = np.unique(values[bad], return_counts=True)
        first = f"label {found[0]} on {counts[0]:,} points"
        more = "".join(f", {v} ({c:,} points)" for v, c in list(zip(found, counts))[1:4])
        more += ", ..." if len(found) > 4 else ""
        las = (" (in LAS, class 0 = never classified, 1 = unclassified)"
               if path.suffix.lower() in (".las", ".laz") and found[0] in (0, 1) else "")
        raise LabelledError(
            f"{path}: {first} is outside the class list (--classes has {k}: labels 0..{k - 1} = "
            f"{settings.class_names[0]!r}..{settings.class_names[-1]!r}){las}"
            f"{'; also ' + more[2:] if more else ''}; fix --classes (one name per label, in label order) "
            f"or add --ignore {found[0]} to treat those points as unlabelled")
    out = np.where(unlabelled, IGNORE_INDEX, values)
    return out.astype(np.int16 if k < 2 ** 15 else np.int32)


def check_source(job: tuple[Source, ImportSettings]) -> FileCheck:
    """Check pass of one source (top level: runs in worker processes); never raises."""
    source, settings = job
    try:
        _, _, notes = load_source(source.path, settings)
    except LabelledError as err:
        return FileCheck(source, error=str(err))
    except Exception as err:  # a file no reader understands is the user's input, not our bug
        return FileCheck(source, error=f"{source.path}: not readable ({type(err).__name__}: {err})")
    return FileCheck(source, tuple(notes))


def process(task: SceneTask) -> dict[str, np.ndarray]:
    """Write pass of one scene: the checked arrays plus normals (``task.inputs = (path, settings)``)."""
    from ppt.data.normals import estimate_normals

    path, settings = task.inputs
    arrays, _, _ = load_source(path, settings)
    if "normal" not in arrays:
        arrays["normal"] = estimate_normals(arrays["coord"], k=settings.normal_k)
    return arrays


def _map(function: Callable, jobs: list, workers: int, progress: bool, what: str) -> list:
    """``[function(job) for job in jobs]`` in input order, in ``workers`` processes, with a bar."""
    from tqdm import tqdm

    pool = mp.get_context().Pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
    results = []
    try:
        with tqdm(total=len(jobs), unit="file", desc=what, disable=not progress, dynamic_ncols=True) as bar:
            for result in (pool.imap(function, jobs) if pool else map(function, jobs)):
                results.append(result)
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
    return results


def _check_previous(folder: Path, settings: ImportSettings, overwrite: bool) -> None:
    """Refuse to mix finished scenes written with other settings (or by something else)."""
    path = folder / SETTINGS_FILE
    scenes = [p for s in SPLITS for p in (folder / s).glob("*") if p.is_dir() and not p.name.startswith(".")]
    if overwrite or not scenes:
        return
    if not path.is_file():
        raise LabelledError(f"{folder}: holds scenes this importer did not write (no {SETTINGS_FILE}); "
                            f"add --overwrite to replace them, or choose another --name")
    before = json.loads(path.read_text())
    now = settings.fingerprint()
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
    if changed:
        raise LabelledError(f"{folder}: its scenes were written with other settings ({'; '.join(changed)}); "
                            f"add --overwrite to redo every scene")


def _place_scenes(folder: Path, split_of: dict[str, str], log: Callable[[str], None]) -> None:
    """Move finished scenes whose split changed (e.g. files were added); note scenes not in --src."""
    for split in SPLITS:
        for scene in sorted(p for p in (folder / split).glob("*") if p.is_dir() and not p.name.startswith(".")):
            want = split_of.get(scene.name)
            if want is None:
                log(f"note: {split}/{scene.name} is not among the --src files any more; it stays in "
                    f"the dataset (delete the folder to drop it)")
            elif want != split:
                target = folder / want / scene.name
                if target.exists():
                    shutil.rmtree(scene)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(scene, target)


def histogram_report(folder: Path, split_of: dict[str, str], class_names: tuple[str, ...]) -> list[str]:
    """Per split: points per class and % of labelled points, then a note per class absent from val."""
    k = len(class_names)
    lines, counts = [], {}
    for split in SPLITS:
        names = [n for n, s in split_of.items() if s == split]
        if not names:
            continue
        hist, ignored, total = np.zeros(k, np.int64), 0, 0
        for n in names:
            seg = np.load(folder / split / n / "segment.npy").astype(np.int64)
            hist += np.bincount(seg[seg >= 0], minlength=k)[:k]
            ignored += int((seg < 0).sum())
            total += len(seg)
        counts[split] = hist
        labelled = max(int(hist.sum()), 1)
        lines.append(f"[{split}] {len(names)} scenes, {total:,} points ({ignored:,} ignored)")
        width = max(len(c) for c in class_names)
        lines += [f"  {c:<{width}}  {h:>12,}  {100 * h / labelled:5.1f}%" for c, h in zip(class_names, hist)]
    if "val" in counts:
        lines += [f"note: class {c!r} has no points in val" for c, h in zip(class_names, counts["val"]) if h == 0]
    if "train" in counts:
        lines += [f"note: class {c!r} has no points in train" for c, h in zip(class_names, counts["train"]) if h == 0]
    if "val" not in counts:
        lines.append("note: no val split (one scene, or --val-fraction 0): training cannot be validated")
    return lines


def import_labelled(src: Path, name: str, classes: str, out: Path, *, label_field: str | None = None,
                    columns: str | None = None, val: list[str] | None = None, val_fraction: float = 0.2,
                    seed: int = 0, ignore: str | None = None, scale: float | None = None,
                    normal_k: int = 16, workers: int = 1, overwrite: bool = False, progress: bool = True,
                    source_note: str = "", log: Callable[[str], None] = print) -> int:
    """Import labelled clouds under ``src`` as dataset ``name`` in ``out``; returns the exit
    status (0 done, 1 a scene failed to write). Raises LabelledError for bad input, before
    anything is written."""
    try:
        check_name(name)
    except DatasetFileError as err:
        raise LabelledError(f"--name: {err}") from None
    if scale is not None and not scale > 0:
        raise LabelledError(f"--scale {scale}: must be a positive factor, e.g. 0.001 for millimetres")
    settings = ImportSettings(parse_classes(classes), parse_ignore(ignore), label_field,
                              tuple(c.strip() for c in columns.split(",")) if columns else None, scale, normal_k)
    if settings.columns and not {"x", "y", "z"} <= {c.lower() for c in settings.columns}:
        raise LabelledError(f"--columns {columns}: must name x, y and z (and the label column)")
    folder = Path(out) / name
    exclude = {folder.resolve()} | ({Path(classes).resolve()} if Path(classes).is_file() else set())
    sources, skipped = find_sources(Path(src), exclude)
    for line in skipped:
        log(f"note: {line}")
    split_of = assign_splits(sources, val, val_fraction, seed)
    _check_previous(folder, settings, overwrite)
    todo = [s for s in sources if overwrite or not any((folder / sp / s.name).is_dir() for sp in SPLITS)]
    log(f"{name}: {len(sources)} scenes from {src} ({len(sources) - len(todo)} already done), "
        f"{len(settings.class_names)} classes -> {folder}")
    checks = _map(check_source, [(s, settings) for s in todo], workers, progress, "check")
    errors = [c.error for c in checks if c.error]
    if errors:
        more = f" ({len(errors) - 1} more files have problems, e.g. {errors[1].split(':')[0]})" if len(errors) > 1 else ""
        raise LabelledError(errors[0] + more)
    for c in checks:
        for note in c.notes:
            log(f"note: {c.source.rel}: {note}")

    # Write pass: nothing was wrong with the input. A dataset.yaml of an earlier run goes first,
    # so that a failed run never leaves one describing a mix of old and new scenes.
    (folder / DATASET_FILE).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings.fingerprint(), indent=1).encode()
    atomic_write(folder / SETTINGS_FILE, lambda f: f.write(text))
    _place_scenes(folder, split_of, log)
    tasks = [SceneTask(s.name, folder / split_of[s.name] / s.name, split_of[s.name], (s.path, settings))
             for s in sources]
    summary = run_tasks(tasks, process, settings.class_names, "segment", workers=workers,
                        overwrite=overwrite, progress=progress, log=_without_histograms(log))
    if not summary.ok:
        log(f"error: {summary.count('failed')} scenes failed (above); {DATASET_FILE} not written; "
            f"re-run to retry them (finished scenes are kept)")
        return 1
    for line in histogram_report(folder, split_of, settings.class_names):
        log(line)
    colourless = [s.name for s in sources if not _has_color(folder / split_of[s.name] / s.name)]
    if colourless:
        log(f"note: {len(colourless)} of {len(sources)} scenes have no colour (e.g. {colourless[0]}): "
            f"color.npy holds zeros and {DATASET_FILE} says color: false, so the model is told; train "
            f"with data.color_drop (e.g. 0.5) when mixing with coloured datasets, or without colour "
            f"features (data.features: [normal])")
    splits = {s: [f"{s}/*"] for s in SPLITS if s in split_of.values()}
    spec = DatasetSpec(list(settings.class_names), splits, color=not colourless,
                       source=source_note or f"tools/preprocess.py labelled --src {src}")
    write_dataset_file(folder, spec)
    log(f"wrote {folder / DATASET_FILE}: dataset {name!r} in data root {out}")
    return 0


def _without_histograms(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` minus run_tasks' per-split lines: the report after the run covers every scene."""
    def write(message: str) -> None:
        if message.startswith("done "):
            message = "\n".join(ln for ln in message.splitlines() if not ln.startswith(("[", "  labels:")))
        log(message)
    return write


def _has_color(scene: Path) -> bool:
    return bool(np.load(scene / "color.npy", mmap_mode="r").any())
