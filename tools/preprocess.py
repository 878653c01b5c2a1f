"""Convert a raw dataset download into the preprocessed scene layout.

    python tools/preprocess.py scannet --raw /data/ScanNet --out data/scannet [--align] [--splits DIR]
    python tools/preprocess.py s3dis --raw /data/Stanford3dDataset_v1.2 --out data/s3dis
    python tools/preprocess.py structured3d --raw /data/Structured3D_zips --out data/structured3d
    python tools/preprocess.py labelled --src my_scans --name office --classes classes.txt --out data

``labelled`` imports your own labelled clouds (PLY with a label property such as CloudCompare's
``scalar_Label``, txt / xyz / csv, npy / npz, LAS / LAZ ``classification``, or scene folders)
into ``DATA_ROOT/NAME/{train,val}/<scene>/`` plus ``DATA_ROOT/NAME/dataset.yaml`` (written
last). A problem with the input (a label outside --classes, no label field, millimetres, ...)
is one ``error:`` line, exit status 2, before anything is written.

Parallel over scenes (``--workers``), resumable (finished scenes are skipped, so re-running
after an interruption continues; ``--overwrite`` redoes them), every scene written atomically.
Do not run two conversions into the same ``--out`` at once: start-up removes temporary
folders of interrupted runs. Exit status 1 when any scene failed.

ScanNet splits come from the official v2 lists shipped in ``ppt/data/preprocess/meta/`` unless
``--splits DIR`` (or lists beside the download) provide others; the line "split lists: ..."
says which were used.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data.dataset_file import get_dataset_info  # noqa: E402
from ppt.data.preprocess import labelled, s3dis, scannet, structured3d  # noqa: E402
from ppt.data.preprocess.common import run_tasks  # noqa: E402
from ppt.data.preprocess.labelled_formats import LabelledError  # noqa: E402

CONVERTERS = {"scannet": scannet, "s3dis": s3dis, "structured3d": structured3d}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True,
                        help="output dataset root (labelled: the data root holding NAME/)")
    common.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    common.add_argument("--overwrite", action="store_true", help="redo finished scenes")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--normal-k", type=int, default=16,
                        help="s3dis/structured3d/labelled: neighbours for normal estimation")
    raw = argparse.ArgumentParser(add_help=False, parents=[common])
    raw.add_argument("--raw", type=Path, required=True, help="raw download root")
    raw.add_argument("--align", action="store_true",
                     help="scannet: apply axisAlignment; s3dis: rotate by the area's "
                          "alignment angles")
    raw.add_argument("--splits", type=Path, default=None,
                     help="scannet: folder of scannetv2_{train,val,test}.txt (and possibly the "
                          "label TSV); default: the official v2 lists shipped with ppt")
    raw.add_argument("--voxel", type=float, default=0.01,
                     help="structured3d: voxel size (m) of the fused room, 0 = keep all")
    raw.add_argument("--variant", default="full", choices=("full", "simple", "empty"),
                     help="structured3d: panorama furniture variant")
    raw.add_argument("--views", default="panorama,perspective",
                     help="structured3d: comma list of panorama, perspective")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{labelled,s3dis,scannet,structured3d}")
    for name in sorted(CONVERTERS):
        sub.add_parser(name, parents=[raw], help=f"raw {name} download -> preprocessed layout")
    lab = sub.add_parser("labelled", parents=[common], help="your own labelled clouds -> a dataset folder",
                         description="Import labelled PLY / txt / csv / npy / npz / LAS / LAZ files "
                                     "(or scene folders) as dataset NAME under --out.")
    lab.add_argument("--src", type=Path, required=True, help="folder of labelled files (read recursively)")
    lab.add_argument("--name", required=True, help="dataset name: lower-case letters, digits, _ or -")
    lab.add_argument("--classes", required=True,
                     help="class names in label order: a file (one per line, # comments) or a comma list")
    lab.add_argument("--label-field", default=None,
                     help="the property / column / array / LAS dimension holding the labels "
                          "(default: label, class, semantic, ..., scalar_Label, classification, category)")
    lab.add_argument("--columns", default=None,
                     help="text / npy column names, e.g. x,y,z,r,g,b,label or x,y,z,intensity,label "
                          "(default: 7 columns x,y,z,r,g,b,label; 4 columns x,y,z,label; or the header)")
    split = lab.add_mutually_exclusive_group()
    split.add_argument("--val", action="append", default=None, metavar="GLOB",
                       help="scenes whose file name matches go to val (repeatable)")
    split.add_argument("--val-fraction", type=float, default=0.2,
                       help="fraction of scenes for val, chosen by a seeded hash of the name (default 0.2)")
    lab.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction choice")
    lab.add_argument("--ignore", default=None, metavar="V",
                     help="raw label value(s) meaning 'unlabelled' (comma list), stored as -1")
    lab.add_argument("--scale", type=float, default=None,
                     help="multiply coordinates by this (0.001: millimetres -> metres)")
    return parser.parse_args(argv)


def build_tasks(args: argparse.Namespace) -> list:
    if args.dataset == "scannet":
        tasks = scannet.list_tasks(args.raw, args.out, splits_dir=args.splits, align=args.align)
        print(f"split lists: {scannet.find_split_lists(args.raw, args.splits)}")
        return tasks
    if args.dataset == "s3dis":
        return s3dis.list_tasks(args.raw, args.out, align=args.align, k=args.normal_k)
    views = {v.strip() for v in args.views.split(",") if v.strip()}
    if views - {"panorama", "perspective"}:
        raise SystemExit(f"--views: unknown {sorted(views - {'panorama', 'perspective'})}; "
                         f"valid: panorama, perspective")
    return structured3d.list_tasks(args.raw, args.out, variant=args.variant,
                                   panorama="panorama" in views,
                                   perspective="perspective" in views, voxel=args.voxel,
                                   k=args.normal_k)


def run_labelled(args: argparse.Namespace, argv: list[str]) -> int:
    """The ``labelled`` command: bad input is one ``error:`` line and exit status 2."""
    try:
        return labelled.import_labelled(
            args.src, args.name, args.classes, args.out, label_field=args.label_field,
            columns=args.columns, val=args.val, val_fraction=args.val_fraction, seed=args.seed,
            ignore=args.ignore, scale=args.scale, normal_k=args.normal_k, workers=args.workers,
            overwrite=args.overwrite, progress=not args.no_progress,
            source_note="tools/preprocess.py " + shlex.join(argv))
    except LabelledError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dataset == "labelled":
        return run_labelled(args, argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tasks = build_tasks(args)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:  # e.g. scans in no split list: one line each, no source location
        print(f"warning: {warning.message}", file=sys.stderr)
    info = get_dataset_info(args.dataset)
    segment_key = "segment20" if args.dataset == "scannet" else "segment"
    print(f"{args.dataset}: {len(tasks)} scenes from {args.raw} -> {args.out}")
    summary = run_tasks(tasks, CONVERTERS[args.dataset].process, info.class_names, segment_key,
                        workers=args.workers, overwrite=args.overwrite,
                        progress=not args.no_progress)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
