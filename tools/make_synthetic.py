"""Write the three-domain synthetic demo data set.

    python tools/make_synthetic.py --out data/synthetic --scenes 30 --seed 0

``--scenes`` counts rooms PER DOMAIN (30 -> 90 rooms: scannet train/val, s3dis Area_1..6,
structured3d train/val; about 20 % of each domain is validation).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data.synthetic import DOMAINS, generate  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="output data root")
    parser.add_argument("--scenes", type=int, default=30, help="rooms per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ",".join(DOMAINS))
    args = parser.parse_args(argv)
    domains = tuple(d for d in args.domains.split(",") if d)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        parser.error(f"unknown domains {unknown}; valid: {', '.join(DOMAINS)}")
    if args.scenes < 1:
        parser.error("--scenes must be >= 1")
    start = time.time()
    written = generate(args.out, args.scenes, args.seed, domains)
    print(f"wrote {len(written)} scenes ({args.scenes} per domain: {', '.join(domains)}) to {args.out} "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
