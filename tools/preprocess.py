"""Convert a raw dataset download into the preprocessed scene layout.

    python tools/preprocess.py scannet --raw /data/ScanNet --out data/scannet [--align] [--splits DIR]
    python tools/preprocess.py s3dis --raw /data/Stanford3dDataset_v1.2 --out data/s3dis
    python tools/preprocess.py structured3d --raw /data/Structured3D_zips --out data/structured3d

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
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data.classes import get_dataset_info  # noqa: E402
from ppt.data.preprocess import s3dis, scannet, structured3d  # noqa: E402
from ppt.data.preprocess.common import run_tasks  # noqa: E402

CONVERTERS = {"scannet": scannet, "s3dis": s3dis, "structured3d": structured3d}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("--raw", type=Path, required=True, help="raw download root")
    parser.add_argument("--out", type=Path, required=True, help="output dataset root")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="redo finished scenes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--align", action="store_true",
                        help="scannet: apply axisAlignment; s3dis: rotate by the area's "
                             "alignment angles")
    parser.add_argument("--splits", type=Path, default=None,
                        help="scannet: folder of scannetv2_{train,val,test}.txt (and possibly the "
                             "label TSV); default: the official v2 lists shipped with ppt")
    parser.add_argument("--normal-k", type=int, default=16,
                        help="s3dis/structured3d: neighbours for normal estimation")
    parser.add_argument("--voxel", type=float, default=0.01,
                        help="structured3d: voxel size (m) of the fused room, 0 = keep all")
    parser.add_argument("--variant", default="full", choices=("full", "simple", "empty"),
                        help="structured3d: panorama furniture variant")
    parser.add_argument("--views", default="panorama,perspective",
                        help="structured3d: comma list of panorama, perspective")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
