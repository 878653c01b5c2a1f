"""A CPU recipe for real scans: candidates at one wall budget against a plain spconv loop.

    python bench/real_scans.py --snapshot <votenet git dir> --out data/real     # once
    python bench/cpu_recipe.py --data data/real [--minutes 8] [--candidates shipped,wide4]
    python bench/cpu_recipe.py --candidates shipped --seeds 1 --steps 540 --out exp/cpu_recipe_final
                                                    # the shipped step count, no calibration
    python bench/cpu_recipe.py --report-only
    python bench/cpu_recipe.py --data <tiny root> --quick --minutes 0.2        # smoke (tests)

Every candidate is ``configs/cpu_scannet.yaml`` plus the overrides in ``CANDIDATES``, trained on
ScanNet scenes by ``ppt.engine.trainer.train`` (what tools/train.py runs) for the step count that
fills ``--minutes``: a 40-step calibration run gives seconds per step (train.log timestamps of
steps 10 and 40) and the fixed cost (start-up, precise BN, final evaluation), so the WHOLE call
lands near the budget; the measured wall is what the table reports.

The baseline (``plain``) is ``bench/plain_baseline.py`` set up as Pointcept's SpUNet-v1m1 recipe
for ScanNet at a CPU's voxel: full SpUNet widths and depths, colour + normal, 4 cm instead of
2 cm, SGD 0.05 (momentum 0.9, Nesterov, wd 1e-4), OneCycle laid over the budget, cross-entropy,
batch 2, every core. It trains for the wall time of the best candidate's whole call (its clock
counts training only, so it gets the start-up and evaluation time on top) and is scored with the
same metric code on every point of the val scenes.

Score: val mIoU over the classes present in the val scenes (the trainer's ``mIoU``). Each
finished run writes ``<out>/<name>_s<seed>.json`` and is skipped next time (the study resumes).
Results: ``bench/results/cpu_recipe.json`` and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS_DIR, format_table, fresh_run, machine_info, save_json, unknown_names  # noqa: E402

DEMO_WIDTH = ["model.channels=[16, 32, 48, 64, 64, 48, 32, 32]", "model.layers=[1, 1, 1, 1, 1, 1, 1, 1]"]
MID_WIDTH = ["model.channels=[32, 48, 64, 96, 96, 64, 48, 48]", "model.layers=[1, 1, 2, 2, 1, 1, 1, 1]"]
FULL_WIDTH = ["model.channels=[32, 64, 128, 256, 256, 128, 96, 96]", "model.layers=[2, 3, 4, 6, 2, 2, 2, 2]"]
# name -> (what it changes, overrides on configs/cpu_scannet.yaml)
CANDIDATES = {
    "shipped": ("configs/cpu_scannet.yaml as is", []),
    "demo4": ("voxel 4 cm", ["data.voxel_size=0.04"]),
    "demo8": ("voxel 8 cm", ["data.voxel_size=0.08"]),
    "mid5": ("wider and deeper (3.2 M)", MID_WIDTH),
    "ce": ("cross-entropy only", ["train.loss=ce"]),
    "sgd": ("SGD 0.05 OneCycle (the reference's optimiser)", ["optim.name=sgd", "optim.lr=0.05",
                                                             "optim.weight_decay=0.0001"]),
    "language": ("language head (MiniLM)", ["model.head=language"]),
    "wide4": ("the earlier CPU advice: full widths at 4 cm", ["data.voxel_size=0.04", *FULL_WIDTH]),
}
QUICK = ["model.channels=[8, 8, 16, 16, 16, 16, 8, 8]", "data.num_workers=0", "train.precise_bn=2"]
STEP_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] .* step (\d+) loss")
CALIBRATION_STEPS = 40


def config(name: str, steps: int, seed: int, args):
    from ppt.config import load_config

    # One epoch of exactly ``steps`` steps (data.loop makes the epoch long enough for the cap).
    overrides = [f"data.root={args.data!r}", "train.epochs=1", "data.loop=1000", f"train.steps_per_epoch={steps}",
                 "train.log_every=10", "train.eval_every=1", f"train.seed={seed}", *CANDIDATES[name][1], *(QUICK if args.quick else [])]
    return load_config(REPO / "configs" / "cpu_scannet.yaml", overrides)


def run_candidate(name: str, steps: int, seed: int, args, tag: str) -> dict:
    """Train ``steps`` steps; the whole call's wall seconds, val mIoU and the log's step times."""
    run_dir = Path(args.out) / f"{name}_s{seed}_{tag}"
    summary, wall = fresh_run(config(name, steps, seed, args), run_dir)
    stamps = {}
    for line in (run_dir / "train.log").read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            stamps[int(m.group(2))] = datetime.fromisoformat(m.group(1)).timestamp()
    return {"name": name, "seed": seed, "steps": summary["steps"], "seconds": wall,
            "mIoU": summary["val"]["scannet"]["mIoU"], "stamps": stamps}


def calibrate(name: str, args) -> tuple[float, float]:
    """(fixed seconds, seconds per step) of a candidate, from one short run (cached)."""
    path = Path(args.out) / f"{name}_calibration.json"
    if path.is_file():
        c = json.loads(path.read_text())
        return c["fixed_s"], c["s_per_step"]
    steps = 4 if args.quick else CALIBRATION_STEPS
    r = run_candidate(name, steps, 0, args, "cal")
    s = r["stamps"]
    first, last = min(s), max(s)
    per_step = (s[last] - s[first]) / (last - first) if last > first and s[last] > s[first] else r["seconds"] / steps
    fixed = max(r["seconds"] - steps * per_step, 0.0)
    save_json({"fixed_s": fixed, "s_per_step": per_step, "wall_s": r["seconds"], "steps": steps}, path)
    return fixed, per_step


def run_plain(seconds: float, seed: int, args) -> dict:
    from bench import plain_baseline

    full = [32, 64, 128, 256, 256, 128, 96, 96], [2, 3, 4, 6, 2, 2, 2, 2]
    channels, layers = ([8, 8, 16, 16, 16, 16, 8, 8], [1] * 8) if args.quick else full
    records = plain_baseline.run(args.data, ["scannet"], seconds / 60, [seconds / 60], channels, layers,
                                 voxel=0.04, batch_size=2, lr=0.05, seed=seed, optimizer="sgd", normals=True)
    r = records[-1]
    return {"name": "plain", "seed": seed, "steps": r["steps"], "seconds": r["minutes"] * 60,
            "mIoU": r["mIoU"]["scannet"]}


def report(out: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*_s*.json"))]
    names = [n for n in ["plain", *CANDIDATES] if any(r["name"] == n for r in runs)]
    rows, plain = [], [r["mIoU"] for r in runs if r["name"] == "plain"]
    for n in names:
        rs = [r for r in runs if r["name"] == n]
        m = sum(r["mIoU"] for r in rs) / len(rs)
        rows.append({"name": n, "what": "Pointcept SpUNet-v1m1 recipe, plain loop, 4 cm" if n == "plain"
                     else CANDIDATES[n][0], "seeds": len(rs),
                     "steps": "/".join(str(r["steps"]) for r in rs),
                     "seconds": "/".join(f"{r['seconds']:.0f}" for r in rs),
                     "mIoU": "/".join(f"{100 * r['mIoU']:.1f}" for r in rs), "mean": f"{100 * m:.1f}",
                     "vs plain": f"{m / (sum(plain) / len(plain)):.2f}x" if plain and sum(plain) > 0 else "-"})
    text = format_table(rows, ["name", "what", "seeds", "steps", "seconds", "mIoU", "mean", "vs plain"],
                        ["run", "what it changes", "seeds", "steps", "wall s (whole call; plain: training)",
                         "val mIoU per seed", "mean", "vs plain"])
    print(text)
    return {"runs": runs, "markdown": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/real", help="data root with scannet/{train,val}")
    p.add_argument("--minutes", type=float, default=8.0, help="wall budget of each run")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, of " + ", ".join(CANDIDATES))
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=0,
                   help="train every candidate this many steps (no calibration; e.g. the shipped config's own)")
    p.add_argument("--plain-after", default="shipped",
                   help="the candidate whose measured wall time the plain loop gets ('' = skip the plain loop)")
    p.add_argument("--out", default="exp/cpu_recipe")
    p.add_argument("--results", default=str(RESULTS_DIR / "cpu_recipe.json"))
    p.add_argument("--quick", action="store_true", help="tiny widths (smoke test)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    names = [n for n in args.candidates.split(",") if n]
    bad = unknown_names("--candidates", names, tuple(CANDIDATES))
    if bad:
        print(bad, file=sys.stderr)
        return 2
    if not args.report_only and not (Path(args.data) / "scannet" / "train").is_dir():
        print(f"error: --data {args.data}: no scannet/train folder (make it with bench/real_scans.py)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                path = out / f"{name}_s{seed}.json"
                if not path.is_file():
                    if args.steps:
                        steps = args.steps
                        print(f"{name} seed {seed}: {steps} steps (--steps)", flush=True)
                    else:
                        fixed, per_step = calibrate(name, args)
                        steps = max(1, int((args.minutes * 60 - fixed) / per_step))
                        print(f"{name} seed {seed}: {steps} steps ({per_step:.2f} s/step, {fixed:.0f} s fixed)",
                              flush=True)
                    r = run_candidate(name, steps, seed, args, "run")
                    r.pop("stamps")
                    save_json({**r, "load_after": os.getloadavg()}, path)
                    print(f"{name} seed {seed}: val mIoU {100 * r['mIoU']:.1f} in {r['seconds']:.0f} s", flush=True)
                plain = out / f"plain_s{seed}.json"
                if name == args.plain_after and not plain.is_file():  # right after it: same machine state
                    seconds = json.loads(path.read_text())["seconds"]
                    print(f"plain seed {seed}: {seconds:.0f} s of training", flush=True)
                    save_json({**run_plain(seconds, seed, args), "load_after": os.getloadavg()}, plain)
    result = {**report(out), "machine": machine_info(), "minutes": args.minutes}
    save_json(result, args.results)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
