"""Validate a preprocessed data root and print a per-dataset summary.

    python tools/check_data.py data/                      # full check of every dataset found
    python tools/check_data.py data/ --datasets scannet --splits train,val,test --quick

Exit status: 0 no problem found; 1 problems found in the data (each printed with its file and
reason: the check's verdict, as grep / pytest use 1); 2 a user error (a data root that does not
exist, an unknown dataset name, a bad command line: one ``error:`` line). Scenes
without normal.npy are not a problem: the summary counts them; the readers estimate their
normals once (k-NN PCA) and cache them next to the scene, or in the normal cache folder
(--normal-cache, default $PPT_CACHE/normals or ~/.cache/ppt/normals) when the root is read-only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data.check import check_data_root  # noqa: E402
from ppt.data.dataset_file import DatasetFileError  # noqa: E402
from ppt.data.normals import NormalCache  # noqa: E402

EXIT_STATUS = "exit status: 0 no problem found; 1 problems found in the data; 2 a user error (one error: line)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS)
    parser.add_argument("root", type=Path, help="data root holding <dataset>/ folders")
    parser.add_argument("--datasets", default=None, help="comma list (default: all found)")
    parser.add_argument("--splits", default="train,val", help="comma list of splits")
    parser.add_argument("--quick", action="store_true", help="headers only (fast)")
    parser.add_argument("--normal-cache", type=Path, default=None,
                        help="cache folder of estimated normals for read-only roots "
                             "(default $PPT_CACHE/normals or ~/.cache/ppt/normals)")
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",") if args.datasets else None
    if not args.root.is_dir():
        print(f"error: data root {args.root} is not a folder (give the folder holding <dataset>/ folders, "
              f"e.g. data/ or data/synthetic)", file=sys.stderr)
        return 2
    try:
        report = check_data_root(args.root, datasets, args.splits.split(","), quick=args.quick,
                                 raise_on_error=False, normal_cache=NormalCache(args.normal_cache))
    except DatasetFileError as err:  # unknown dataset name: says which folder was looked at
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
