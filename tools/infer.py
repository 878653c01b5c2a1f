"""Label your own point clouds with a trained experiment.

    python tools/infer.py scan.ply room2.npy scans/ --exp exp/demo
    python tools/infer.py scan.ply --exp exp/ppt --prompt scannet --tta --png
    python tools/infer.py scan.ply --exp exp/ppt --classes "wall,floor,chair,table,sofa,bed"

Inputs: PLY (binary or ASCII, point clouds or meshes), ``.npy`` (N x 3/6/9: x y z [r g b [nx ny
nz]]), ``.txt`` / ``.xyz`` (the same columns as text, S3DIS style), folders (every such file
directly inside; every other entry is listed as ``skipped``, with why), in any number (see
``ppt.data.clouds``). Missing normals -> estimated. Missing
colour -> refused (one ``error:`` line) unless the model was trained with colour dropout
(``data.color_drop`` > 0): then filled as training dropped it, said in one ``note:`` line. Rows
with NaN/inf coordinates are dropped and counted.

Outputs: one folder per run, ``<exp>/infer/<YYYYmmdd-HHMMSS>/`` (``-2``, ``-3`` ... when two runs
start in the same second), with the link ``<exp>/infer/latest`` to the newest (``latest.txt``
holding its name where the file system has no links); the run's folder is printed. A run's files
always belong together: per input ``<stem>``, ``<stem>_pred.ply`` (every kept point at its
original coordinates, coloured by class, with ``label`` and ``confidence`` vertex properties),
``<stem>_pred.npy`` (int16, one label per INPUT row, -1 for dropped rows), ``<stem>_pred.png``
with ``--png`` (top-down picture and legend); plus the run's ``labels.json`` (class names and
colour of each label id, prompt, weights, voxel size, TTA). A ``--classes`` run and a default run
thus never share a ``labels.json``. ``--out DIR`` writes into DIR itself (no run folder); a DIR
whose ``labels.json`` names other classes is refused, so its ids stay readable. All files are
written atomically.

Default prompt ``mean`` (data from an unknown domain); ``--prompt NAME`` uses a trained dataset's
prompt and classes; ``--classes`` (language head) any class names. Clouds whose voxels exceed
``--max-points`` run in overlapping xy tiles (``ppt.engine.predict``). torch uses one thread per
core that other work leaves free (``--threads 0``, the default, as training and ``tools/test.py``
choose: OpenMP threads on a busy core stall every layer; a 50k-point scan through a converted
PTv3 took 1.3-1.8 s with one thread and 5.9-17.9 s with both cores on a 2-core machine beside
other jobs).

Exit status: 0 when every input was labelled; 2 for a user error: a bad command line or
experiment (one ``error:`` line, nothing written), or an input that could not be labelled (one
``error:`` line per input; the others are still labelled and written). Any other status is a
crash (a bug; the traceback says where).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.io import atomic_write  # noqa: E402

PNG_SIZE = 1000         # most pixels along the longer side of the top-down picture
LEGEND_MIN_SHARE = 0.5  # % of the points a class needs to get its own legend entry
LEGEND_MAX = 15         # most legend entries (then one "N more classes" line)
HISTOGRAM_MAX = 12      # classes printed per cloud (then one "N more" entry)


EXIT_STATUS = "exit status: 0 every input labelled; 2 a user error (one error: line each; other inputs still run)"
RUN_FORMAT = "%Y%m%d-%H%M%S"  # <exp>/infer/<run>/
LATEST = "latest"            # <exp>/infer/latest -> the newest run folder


class UsageError(Exception):
    """Bad command-line input; printed as one ``error:`` line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="cloud files (.ply .npy .txt .xyz) and/or folders of them")
    p.add_argument("--exp", default="", help="experiment folder exp/<name>")
    p.add_argument("--weights", default="", help="checkpoint (default <exp>/model/model_best.pth, "
                                                 "else model_last.pth)")
    p.add_argument("--out", default="", help="write into this folder (default: a new <exp>/infer/<date-time>/ "
                                             "per run, <exp>/infer/latest -> the newest)")
    p.add_argument("--prompt", default="mean", help="domain prompt: a trained dataset name or 'mean' (default)")
    p.add_argument("--classes", default=None, help='class names to predict (language head), e.g. "wall,floor,chair"')
    p.add_argument("--voxel-size", type=float, default=None, help="grid size in metres (default: training value)")
    p.add_argument("--tta", action="store_true", help="13-view test-time augmentation (slower, steadier)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--png", action="store_true", help="also write a top-down picture with a legend")
    p.add_argument("--max-points", type=int, default=None,
                   help="most voxels per model pass; larger clouds run in overlapping tiles (default 600000)")
    p.add_argument("--overlap", type=float, default=None, help="tile margin in metres (default 32 voxels)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0 = one per core that other work leaves free)")
    return p.parse_args(argv)


def output_root(args: argparse.Namespace) -> Path:
    """``--out``, else the experiment's ``infer/`` folder (that of ``--weights``' experiment)."""
    if args.out:
        return Path(args.out)
    if args.exp:
        return Path(args.exp) / "infer"
    weights = Path(args.weights)
    # exp/<name>/model/model_best.pth -> exp/<name>/infer
    return (weights.parent.parent if weights.parent.name == "model" else weights.parent) / "infer"


def new_run_folder(root: Path) -> Path:
    """``root/<YYYYmmdd-HHMMSS>`` created now (``-2``, ``-3`` ... when taken)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(RUN_FORMAT)
    for n in range(1, 1000):
        folder = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise UsageError(f"{root}: no free run folder name for {stamp}")


def point_latest(root: Path, run: Path) -> Path:
    """``root/latest`` -> ``run`` (a relative link, replaced atomically), or ``root/latest.txt``
    holding the run's name where links cannot be made; returns what was written."""
    link = root / LATEST
    tmp = root / f".{LATEST}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run.name, target_is_directory=True)
        os.replace(tmp, link)
        return link
    except OSError:
        text = root / f"{LATEST}.txt"
        atomic_write(text, lambda f: f.write(f"{run.name}\n".encode()))
        return text


def check_labels_match(folder: Path, class_names: tuple[str, ...]) -> None:
    """``--out`` a folder with predictions of another label set: refuse (the ids would mix)."""
    path = folder / "labels.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("class_names")
    except (OSError, ValueError, AttributeError):
        old = None
    if old is not None and list(old) != list(class_names):
        raise UsageError(f"--out {folder} holds predictions of another label set ({path.name}: {len(old)} classes, "
                         f"this run: {len(class_names)}); give another --out, or none (each run then gets its own "
                         f"folder under the experiment's infer/)")


def output_stems(files: list[Path]) -> list[str]:
    """One distinct output stem per input: ``scan``; ``scan-ply`` / ``scan-npy`` when stems clash."""
    stems = [f.stem for f in files]
    clash = {s for s in stems if stems.count(s) > 1}
    stems = [f"{f.stem}-{f.suffix.lstrip('.').lower()}" if f.stem in clash else f.stem for f in files]
    seen: dict[str, int] = {}
    unique = []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        unique.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return unique


def write_png(path: Path, coord: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
              colours: np.ndarray, title: str) -> None:
    """Top-down picture: each pixel shows the highest point's class (ceilings left out so the
    room shows), with a legend of the classes present."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    hidden = [i for i, n in enumerate(class_names) if n.lower() == "ceiling"]
    keep = ~np.isin(labels, hidden) if hidden else np.ones(len(labels), bool)
    keep &= labels >= 0
    if not keep.any():
        keep = labels >= 0
    xy, z, lab = coord[keep, :2].astype(np.float64), coord[keep, 2], labels[keep]
    lo, extent = xy.min(0), np.maximum(np.ptp(xy, 0), 1e-6)
    # Pixels about 1.5 times the mean point spacing seen from above (a filled picture, not dust),
    # and at most PNG_SIZE along the longer side.
    spacing = 1.5 * np.sqrt(extent[0] * extent[1] / len(xy))
    scale = min((PNG_SIZE - 1) / extent.max(), 1.0 / max(spacing, 1e-9))
    width, height = (np.floor(extent * scale) + 1).astype(int)
    px = np.floor((xy - lo) * scale).astype(int)
    order = np.argsort(z, kind="stable")  # later (higher) points overwrite lower ones
    image = np.full((height, width, 3), 255, np.uint8)
    image[height - 1 - px[order, 1], px[order, 0]] = colours[lab[order]]

    fig = Figure(figsize=(10, 10 * height / width + 0.6), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(image, extent=(lo[0], lo[0] + extent[0], lo[1], lo[1] + extent[1]), interpolation="nearest")
    ax.set_title(title + (" (ceiling hidden)" if hidden else ""), fontsize=10)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    counts = np.bincount(labels[labels >= 0], minlength=len(class_names))
    share = 100.0 * counts / max(counts.sum(), 1)
    order = [i for i in np.argsort(-counts, kind="stable") if counts[i]]
    shown = [i for i in order if share[i] >= LEGEND_MIN_SHARE][:LEGEND_MAX] or order[:1]
    handles = [Patch(color=colours[i] / 255.0, label=f"{class_names[i]} {share[i]:.1f} %") for i in shown]
    rest = [i for i in order if i not in shown]
    if rest:
        handles.append(Patch(color="white", label=f"{len(rest)} more classes {share[rest].sum():.1f} %"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda f: canvas.print_png(f))


def labels_json(predictor, colours: np.ndarray) -> str:
    entry = {
        "class_names": list(predictor.class_names),
        "labels": [{"label": i, "name": n, "color": colours[i].tolist()} for i, n in enumerate(predictor.class_names)],
        "ignore": {"label": -1, "meaning": "row dropped (NaN/inf coordinates); not in the PLY",
                   "color": colours[-1].tolist()},
        "label_set": predictor.label_note, "prompt": predictor.prompt, "weights": str(predictor.weights),
        "voxel_size": predictor.voxel_size, "tta": predictor.tta,
    }
    return json.dumps(entry, indent=2) + "\n"


def histogram_lines(histogram: dict[str, int], width: int = 4) -> list[str]:
    total = sum(histogram.values())
    items = [f"{name} {count} ({100 * count / total:.1f} %)" for name, count in histogram.items()]
    if len(items) > HISTOGRAM_MAX:
        rest = list(histogram.values())[HISTOGRAM_MAX:]
        items = items[:HISTOGRAM_MAX] + [f"{len(rest)} more {sum(rest)} ({100 * sum(rest) / total:.1f} %)"]
    return ["  classes: " + ", ".join(items[i:i + width]) for i in range(0, len(items), width)]


def run(args: argparse.Namespace) -> int:
    """Predict every input; returns the number of inputs that failed."""
    import logging

    from ppt.data.clouds import CloudError, list_inputs, palette, read_cloud, write_labelled_ply
    from ppt.engine.predict import MAX_POINTS, ExperimentError, Predictor

    # torch.fx logs a one-time is_fx_tracing deprecation notice (through logging, not warnings).
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

    if not args.exp and not args.weights:
        raise UsageError("give --exp exp/<name> (or --weights FILE)")
    classes = None
    if args.classes is not None:
        classes = [n.strip() for n in args.classes.split(",") if n.strip()]
        if not classes:
            raise UsageError(f"--classes {args.classes!r} names no class")
    root = output_root(args)
    files, errors, skipped = list_inputs(args.inputs, exclude=root)
    for message in skipped:
        print(f"skipped {message}", flush=True)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if not files:
        raise UsageError("no point cloud to label")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be >= 0 (0 = one per core that other work leaves free)")
    try:  # the Predictor chooses the threads (as training does) and gives the caller's count back after each call
        predictor = Predictor(args.exp or None, weights=args.weights or None, device=args.device,
                              prompt=args.prompt, classes=classes, voxel_size=args.voxel_size,
                              tta=args.tta, max_points=args.max_points or MAX_POINTS, overlap=args.overlap,
                              log=lambda line: print(f"  {line}", flush=True), threads=args.threads)
    except (ExperimentError, ValueError) as err:
        raise UsageError(str(err)) from None
    if args.out:
        check_labels_match(root, predictor.class_names)
    threads = f"; {predictor.threads_note.replace('(threads ', '(--threads ')}" if predictor.threads else ""
    colours = palette(len(predictor.class_names))
    print(f"model {predictor.weights} on {predictor.device}: prompt {predictor.prompt}, "
          f"{predictor.label_note}, voxel {predictor.voxel_size} m, tta {predictor.tta}{threads}", flush=True)

    failed = len(errors)
    out = None  # the run's folder, made when its first file is written
    for i, (path, stem) in enumerate(zip(files, output_stems(files))):
        print(f"[{i + 1}/{len(files)}] {path}", flush=True)
        try:
            tic = time.perf_counter()
            cloud = read_cloud(path)
            read_s = time.perf_counter() - tic
            print(f"  {cloud.num_input} points read in {read_s:.1f} s", flush=True)
            for note in cloud.notes:
                print(f"  note: {note}", flush=True)
            pred = predictor.predict_cloud(cloud)
        except CloudError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        except ValueError as err:  # e.g. a cloud too large to hash at this voxel size
            print(f"error: {path}: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        for note in pred.notes[len(cloud.notes):]:
            print(f"  note: {note}", flush=True)
        kept = pred.labels[cloud.valid]
        if out is None:
            out = root if args.out else new_run_folder(root)
            atomic_write(out / "labels.json", lambda f: f.write(labels_json(predictor, colours).encode()))
            print(f"  wrote {out / 'labels.json'}", flush=True)
        written = [out / f"{stem}_pred.ply", out / f"{stem}_pred.npy"]
        write_labelled_ply(written[0], cloud.coord, kept, len(pred.class_names),
                           {"label": ("i2", kept), "confidence": ("f4", pred.confidence[cloud.valid])})
        atomic_write(written[1], lambda f: np.save(f, pred.labels.astype(np.int16)))
        if args.png:
            written.append(out / f"{stem}_pred.png")
            write_png(written[-1], cloud.coord, kept, pred.class_names, colours, f"{path.name}: {predictor.label_note}")
        passes = "1 pass" if pred.chunks == 1 else f"{pred.chunks} tiles"
        print(f"  predicted in {pred.seconds:.1f} s ({len(cloud) / max(pred.seconds, 1e-9):,.0f} points/s, "
              f"{passes}), mean confidence {pred.confidence[cloud.valid].mean():.2f}")
        print("\n".join(histogram_lines(pred.histogram())))
        for target in written:
            print(f"  wrote {target}", flush=True)
    ok = len(files) - (failed - len(errors))
    where = f" into {out}" if out is not None else ""
    if out is not None and not args.out:
        where += f" ({point_latest(root, out)} -> {out.name})"
    print(f"done: {ok} of {len(files) + len(errors)} inputs labelled{where}" + (f", {failed} failed" if failed else ""))
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # spconv's torch.cuda.amp deprecations and torch's is_fx_tracing line are noise here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    try:
        failed = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2 if failed else 0  # each failed input printed its error: line


if __name__ == "__main__":
    sys.exit(main())
