"""Training data pipeline: our ScanNet pipeline vs the reference's, profiled step by step.

    python bench/data_pipeline.py [--sizes 50000 200000] [--repeats 20] [--json out.json]

For each scene size, both pipelines run on the same synthetic room with the same seeds
(``--repeats`` samples, seeds 0..R-1, so random branches such as dropout or elastic are taken
as often as in training). Printed: per step, milliseconds per million INPUT points (the mean
over the samples) and its share of the pipeline, ours next to the reference
(``bench/reference_pipeline.py``: Pointcept's algorithms); then throughput in millions of
input points per second and the speed-up. Single process, torch and BLAS at one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import reference_pipeline  # noqa: E402
from ppt.data import transforms as T  # noqa: E402
from ppt.data.synthetic import make_scene  # noqa: E402


def scene(num_points: int) -> dict:
    arrays = make_scene("scannet", np.random.default_rng([0, num_points]), num_points=int(num_points / 0.9))
    return {"coord": arrays["coord"], "color": arrays["color"].astype(np.float32),
            "normal": arrays["normal"], "segment": arrays["segment20"].astype(np.int64),
            "dataset": "scannet", "name": "bench"}


def fresh(sample: dict) -> dict:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}


def step_names(steps) -> list[str]:
    """Unique labels: a second CenterShift is the re-centring after the crop."""
    names, seen = [], set()
    for name in steps:
        names.append(f"{name} (re-centre)" if name in seen else name)
        seen.add(name)
    return names


def profile_ours(sample: dict, repeats: int) -> dict[str, float]:
    """Seconds per step summed over ``repeats`` samples of our train pipeline."""
    pipe = T.build_transforms("scannet", "train")
    names = step_names([t.__class__.__name__ + (f" {t.axis}" if isinstance(t, T.RandomRotate) else "")
                        for t in pipe.transforms])
    spent = dict.fromkeys(names, 0.0)
    for seed in range(repeats):
        pipe.set_rng(np.random.default_rng(seed))
        s = fresh(sample)
        for name, t in zip(names, pipe.transforms):
            start = time.perf_counter()
            s = t(s)
            spent[name] += time.perf_counter() - start
    return spent


def profile_reference(sample: dict, repeats: int) -> dict[str, float]:
    steps = reference_pipeline.build()
    names = step_names([n for n, _ in steps])
    spent = dict.fromkeys(names, 0.0)
    for seed in range(repeats):
        rng = np.random.default_rng(seed)
        s = fresh(sample)
        for name, (_, fn) in zip(names, steps):
            start = time.perf_counter()
            s = fn(s, rng)
            spent[name] += time.perf_counter() - start
    return spent


def val_throughput(sample: dict, repeats: int) -> float:
    pipe = T.build_transforms("scannet", "val")
    start = time.perf_counter()
    for _ in range(repeats):
        pipe(fresh(sample))
    return len(sample["coord"]) * repeats / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for n in args.sizes:
        sample = scene(n)
        points = len(sample["coord"]) * args.repeats
        profile_ours(sample, 2)                                   # warm-up (imports, allocator)
        ours, ref = profile_ours(sample, args.repeats), profile_reference(sample, args.repeats)
        per_mpt = 1e3 * 1e6 / points                              # seconds -> ms per M input points
        total_ours, total_ref = sum(ours.values()), sum(ref.values())
        print(f"\n{len(sample['coord']):,} input points, {args.repeats} samples; ms per million input points")
        print(f"| {'step':28s} | {'ours':>7s} | {'share':>6s} | {'reference':>9s} | {'share':>6s} |")
        print("|---|---:|---:|---:|---:|")
        for name in list(ours) + [k for k in ref if k not in ours]:
            o, r = ours.get(name), ref.get(name)
            cell_o = f"{o * per_mpt:7.1f} | {100 * o / total_ours:5.1f}%" if o is not None else f"{'-':>7s} | {'':6s}"
            cell_r = f"{r * per_mpt:9.1f} | {100 * r / total_ref:5.1f}%" if r is not None else f"{'-':>9s} | {'':6s}"
            print(f"| {name:28s} | {cell_o} | {cell_r} |")
        mpts_ours, mpts_ref = points / total_ours / 1e6, points / total_ref / 1e6
        val = val_throughput(sample, max(3, args.repeats // 4))
        print(f"| {'**whole pipeline, M pts/s**':28s} | {mpts_ours:7.2f} | | {mpts_ref:9.2f} | |")
        print(f"speed-up {total_ref / total_ours:.1f}x; validation pipeline (ours) {val:.2f} M pts/s")
        results[str(n)] = {"input_points": len(sample["coord"]), "ours_ms_per_mpt": {k: v * per_mpt for k, v in ours.items()},
                           "reference_ms_per_mpt": {k: v * per_mpt for k, v in ref.items()},
                           "ours_mpts_per_s": mpts_ours, "reference_mpts_per_s": mpts_ref,
                           "val_mpts_per_s": val}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print("wrote", args.json)


if __name__ == "__main__":
    main()
