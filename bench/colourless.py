"""Val mIoU of trained experiments on the val scenes as they are and on colourless copies.

    python bench/colourless.py --data-root data/synthetic --exp exp/demo exp/demo_cd \
        --json bench/results/colourless.json

A colourless copy of a val scene links every file of the scene but ``color.npy``, which is
written filled with ``ppt.data.transforms.DROPPED_COLOR``: exactly what ``ppt.Predictor`` /
``tools/infer.py`` feed a model trained with colour dropout (``data.color_drop`` > 0) for a
cloud without colour. A model trained without it refuses such clouds; here it is scored on
them anyway, to show what the refusal spares the user. Each experiment is evaluated with
``tools/test.py`` (every original point, own prompt, no TTA) on both roots, one subprocess each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ppt.io import atomic_write  # noqa: E402


def colourless_copy(root: Path, out: Path, datasets: list[str]) -> int:
    """Write ``out/<dataset>/...`` = the val scenes of ``root`` with ``color.npy`` set to the
    training drop value (other files linked). Returns the number of scenes."""
    from ppt.data.datasets import build_dataset
    from ppt.data.transforms import DROPPED_COLOR

    count = 0
    for name in datasets:
        ds = build_dataset(name, root, "val")
        for scene in ds.scenes:
            target = out / name / scene.relative_to(root / name)
            target.mkdir(parents=True, exist_ok=True)
            for src in scene.iterdir():
                dst = target / src.name
                if src.name == "color.npy":
                    color = np.load(src)
                    np.save(dst, np.full_like(color, DROPPED_COLOR))
                elif not dst.exists():
                    os.symlink(src.resolve(), dst)
            count += 1
    return count


def evaluate(exp: Path, root: Path, datasets: list[str], threads: int) -> dict[str, float]:
    """{dataset: val mIoU} of ``tools/test.py --exp exp --data-root root``."""
    cmd = [sys.executable, str(REPO / "tools" / "test.py"), "--exp", str(exp), "--data-root", str(root),
           "--dataset", ",".join(datasets), "--device", "cpu", "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    results = json.loads((exp / "result" / "metrics.json").read_text())["results"]
    scores = {}
    for name in datasets:
        (entry,) = [e for mode, e in results[name].items() if mode.startswith("split=val; tta=off")
                    and f"prompt={name}" in mode]
        scores[name] = entry["mIoU"]
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="data root holding the datasets' val scenes")
    p.add_argument("--exp", nargs="+", required=True, help="experiment folders to score")
    p.add_argument("--dataset", default="", help="comma-separated datasets (default: the first exp's data.mix)")
    p.add_argument("--copy", default="", help="where the colourless copy goes (default <data-root>_colourless)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="write the table as JSON here")
    args = p.parse_args(argv)
    from ppt.config import load_config

    root = Path(args.data_root)
    exps = [Path(e) for e in args.exp]
    datasets = ([d for d in args.dataset.split(",") if d] or
                list(load_config(exps[0] / "config.yaml").data.mix))
    copy = Path(args.copy) if args.copy else root.with_name(root.name + "_colourless")
    tic = time.perf_counter()
    scenes = colourless_copy(root, copy, datasets)
    print(f"colourless copy of {scenes} val scenes in {copy} ({time.perf_counter() - tic:.1f} s)")
    rows = []
    for exp in exps:
        p_drop = load_config(exp / "config.yaml").data.color_drop
        for label, data in (("colour", root), ("colourless", copy)):
            scores = evaluate(exp, data, datasets, args.threads)
            rows.append({"exp": exp.name, "color_drop": p_drop, "input": label, **scores,
                         "mean": float(np.mean(list(scores.values())))})
            print(f"{exp.name:<20} color_drop {p_drop:<4g} {label:<10} " +
                  "  ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f"  mean {rows[-1]['mean']:.3f}",
                  flush=True)
    if args.json:
        atomic_write(args.json, lambda f: f.write((json.dumps(rows, indent=2) + "\n").encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
