"""Write the three-domain synthetic demo data set.

    python tools/make_synthetic.py --out data/synthetic --scenes 30 --seed 0

``--scenes`` counts rooms PER DOMAIN (30 -> 90 rooms: scannet train/val, s3dis Area_1..6,
structured3d train/val; about 20 % of each domain is validation).

    python tools/make_synthetic.py --labelled-ply data/my_scans --scenes 12 --seed 0

writes, instead, a folder as a user would bring it: labelled binary PLY files (CloudCompare
style: float ``scalar_Label``) of offices and meeting rooms with a label set of their own, plus
``classes.txt``; import it with ``tools/preprocess.py labelled --src data/my_scans --name
office --classes data/my_scans/classes.txt --out data``. ``--scenes`` then counts rooms
(default 12).

Exit status: 0 done; 2 a user error (a bad command line, an output folder that cannot be
written): one ``error:`` line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data.synthetic import DOMAINS, generate  # noqa: E402
from ppt.data.synthetic_labelled import LABELLED_CLASSES, write_labelled_plys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="output data root")
    parser.add_argument("--scenes", type=int, default=None,
                        help="rooms per domain (default 30); with --labelled-ply: rooms (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ",".join(DOMAINS))
    parser.add_argument("--labelled-ply", default=None, metavar="DIR",
                        help="write a user-like folder of labelled PLY files + classes.txt instead")
    args = parser.parse_args(argv)
    if args.scenes is not None and args.scenes < 1:
        parser.error("--scenes must be >= 1")
    domains = tuple(d for d in args.domains.split(",") if d)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        parser.error(f"unknown domains {unknown}; valid: {', '.join(DOMAINS)}")
    start = time.time()
    try:
        if args.labelled_ply:
            written = write_labelled_plys(args.labelled_ply, args.scenes or 12, args.seed)
            print(f"wrote {len(written)} labelled PLY rooms and classes.txt ({len(LABELLED_CLASSES)} classes) "
                  f"to {args.labelled_ply} in {time.time() - start:.1f} s")
            return 0
        args.scenes = args.scenes or 30
        written = generate(args.out, args.scenes, args.seed, domains)
    except OSError as err:  # an output folder that cannot be made or written
        print(f"error: cannot write {err.filename or args.labelled_ply or args.out}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    print(f"wrote {len(written)} scenes ({args.scenes} per domain: {', '.join(domains)}) to {args.out} "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
