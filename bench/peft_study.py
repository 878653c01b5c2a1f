"""PEFT study: every stage adapts one converged base to a domain it never trained on, with its
learning rate from a sweep on a held-out split, several seeds, full labels and a label budget.

    python bench/peft_study.py [--backbone spunet|ptv3] [--base-steps 2000] [--steps 300]
        [--sweep-steps 150 (0: no sweep, each config's lr)] [--seeds 0,1,2] [--budgets 0,20] [--stages full,...]
        [--out bench/results/peft_study_<backbone>] [--base CKPT] [--target-shift colour] [--lrs-from STUDY.json]

1. Base: the demo model (``configs/demo.yaml`` / ``demo_ptv3.yaml``: PPT, PDNorm, language head)
   trained on synthetic Structured3D + ScanNet (2:1) for ``--base-steps`` steps with precise BN.
   Target: synthetic S3DIS (13 classes, never trained by the base; the base meets it through the
   mean prompt, mean BN statistics and the embeddings of S3DIS's class names).
2. Sweep: each stage at its config's lr x (1/4, 1, 4), seed 0, full labels, ``--sweep-steps``
   steps, trained on S3DIS Areas 1, 2, 3, 6 and scored on Area 4 (held out: the reported val
   area, Area 5, is never used to choose). The best lr of each stage is used for every budget.
3. Runs: stage x budget x seed at the chosen lr for ``--steps`` steps on Areas 1-4, 6 (the
   budget: ``data.label_budget`` labelled points per scene), val mIoU on Area 5 (every point).
4. Cost per stage on the same base: trainable share, step time (from the runs) and peak
   allocated memory of one training step (``bench/peft.py``'s profiler accounting).

The probe (``--target-shift colour --base <a study's base>``): the same protocol on a target the
base's features do NOT already separate: synthetic S3DIS seen through another sensor (each colour
inverted and its channels rotated, RGB -> 255 - BRG; geometry and labels as they were). It tests
the reading of the main study (every frozen stage at one ceiling because the frozen features
already separate a near-domain target): there, stages that change the encoder's features
(adapters, LoRA, full) should pull ahead of linear / decoder probing. The second probe is a
weaker base (``--base-steps 200 --lrs-from <the main study's study.json>``): frozen features that
separate every domain less, the same learning rates.

Every run is cached in ``<out>/<run>/result.json``: an interrupted study resumes; runs go seed by
seed, so a stopped study has whole seeds. Writes ``<out>/study.json`` and prints the tables with
the reading: a difference to full fine-tuning counts only when it exceeds the larger of the two
seed standard deviations times 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/peft.py != peft
sys.path.insert(0, str(REPO))

from bench.common import format_table, machine_info, save_json  # noqa: E402

STAGES = ("full", "linear", "decoder", "bitfit", "lora", "dapt", "pointpeft")
BASE_MIX = "{structured3d: 2, scannet: 1}"
TARGET = "s3dis"
LR_FACTORS = (0.25, 1.0, 4.0)
SWEEP_TRAIN, SWEEP_VAL = ("Area_1", "Area_2", "Area_3", "Area_6"), "Area_4"
BASE_CONFIG = {"spunet": "configs/demo.yaml", "ptv3": "configs/demo_ptv3.yaml"}


def sweep_root(root: Path, out: Path) -> Path:
    """A data root whose S3DIS train split is SWEEP_TRAIN and whose val split (``Area_5``) is
    SWEEP_VAL, made of symlinks (the held-out split of the lr sweep)."""
    where = out / "sweep_root"
    if not (where / TARGET / "Area_5").exists():
        (where / TARGET).mkdir(parents=True, exist_ok=True)
        for area in SWEEP_TRAIN:
            os.symlink((root / TARGET / area).resolve(), where / TARGET / area)
        os.symlink((root / TARGET / SWEEP_VAL).resolve(), where / TARGET / "Area_5")
    return where


def shifted_root(root: Path, out: Path) -> Path:
    """A data root whose S3DIS scenes are the originals with colour 255 - (B, R, G): a sensor
    shift no base domain has (every other file a symlink; written once, atomically per scene)."""
    import numpy as np

    where = out / "shifted_root"
    for scene in sorted((root / TARGET).glob("Area_*/*")):
        dst = where / TARGET / scene.parent.name / scene.name
        if (dst / "color.npy").is_file():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for f in scene.iterdir():
            if f.name != "color.npy" and not (dst / f.name).exists():
                os.symlink(f.resolve(), dst / f.name)
        color = np.load(scene / "color.npy")
        np.save(dst / "color.tmp.npy", (255 - color[:, [2, 0, 1]]).astype(np.uint8))
        os.replace(dst / "color.tmp.npy", dst / "color.npy")
    return where


def common(root: Path, steps: int, seed: int) -> list[str]:
    return [f"data.root={root}", "data.num_workers=1", "data.batch_size=2", "data.check=false",
            "train.epochs=1", f"train.steps_per_epoch={steps}", "train.amp=false", "train.device=cpu",
            "train.log_every=50", f"train.seed={seed}", "data.loop=50", "train.threads=1"]


def train_base(backbone: str, root: Path, steps: int, out: Path) -> Path:
    from ppt.config import load_config
    from ppt.engine.trainer import train

    path = out / "base" / "model" / "model_last.pth"
    if not path.is_file():
        if (out / "base").exists():
            shutil.rmtree(out / "base")
        cfg = load_config(BASE_CONFIG[backbone], common(root, steps, 0) + [
            f"data.mix={BASE_MIX}", "data.val=[]", "train.eval_every=0", "train.precise_bn=10",
            "data.loop=200",  # the epoch (one pass over Structured3D) must hold the steps: the cap only shortens
            "train.best_on=first"])
        tic = time.perf_counter()
        train(cfg, out / "base")
        (out / "base" / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - tic}))
        print(f"base: {steps} steps in {time.perf_counter() - tic:.0f} s", flush=True)
    return path


def stage_config(stage: str, base: Path, root: Path, steps: int, seed: int, lr: float, budget: int):
    from ppt.config import load_config
    from ppt.engine.peft_checkpoint import peft_run_overrides

    return load_config(f"configs/peft_{stage}.yaml", peft_run_overrides(stage, base) + common(root, steps, seed) + [
        f"data.mix={{{TARGET}: 1}}", f"data.val=[{TARGET}]", "train.eval_every=1", f"optim.lr={lr}",
        f"data.label_budget={budget}", "data.mix3d_prob=0.0", "train.precise_bn=0"])


REPORT_ONLY = False  # --report: tables from the cached runs, no training


def run(name: str, stage: str, base: Path, root: Path, steps: int, seed: int, lr: float, budget: int,
        out: Path) -> dict | None:
    """One training run (cached in ``out/name/result.json``); None under ``--report`` when the
    run has not been made."""
    from ppt.engine.trainer import train

    exp = out / name
    if (exp / "result.json").is_file():
        cached = json.loads((exp / "result.json").read_text())
        if abs(cached["lr"] - lr) <= 1e-12 * max(lr, 1.0):
            return cached
        if not REPORT_ONLY:  # made at another lr (e.g. a --sweep-steps 0 run before the sweep): not this study's
            print(f"  {name}: cached at lr {cached['lr']:g}, this study's lr is {lr:g}: trained again", flush=True)
    if REPORT_ONLY:
        return None
    if exp.exists():  # an interrupted run: start it again
        shutil.rmtree(exp)
    cfg = stage_config(stage, base, root, steps, seed, lr, budget)
    tic = time.perf_counter()
    summary = train(cfg, exp)
    seconds = time.perf_counter() - tic
    row = {"stage": stage, "seed": seed, "lr": lr, "budget": budget, "steps": summary["steps"],
           "val_mIoU": summary["val"][TARGET]["mIoU"], "seconds": seconds, "s_per_step": seconds / max(1, steps)}
    (exp / "result.json").write_text(json.dumps(row))
    for heavy in (exp / "model",):  # the study keeps its numbers, not 60 checkpoints
        shutil.rmtree(heavy, ignore_errors=True)
    print(f"  {name}: val mIoU {row['val_mIoU']:.4f} ({seconds:.0f} s)", flush=True)
    return row


def stage_cost(stage: str, base: Path, root: Path, out: Path) -> dict:
    """Trainable share and peak allocated MiB of one training step of the stage on the base."""
    import torch

    from bench.peft import profiled_step, tensor_mb, training_step
    from ppt.engine.build import build_model, build_train_loader
    from ppt.engine.peft_checkpoint import prepare_peft_model
    from ppt.models.peft.stages import parameter_counts

    cfg = stage_config(stage, base, root, 2, 0, 1e-3, 0)
    torch.manual_seed(0)
    model = build_model(cfg, None)
    prepare_peft_model(model, cfg, out / f"cost_{stage}", "cpu")
    model.train()
    batch = next(iter(build_train_loader(cfg)))
    opt, forward, backward = training_step(model, batch)

    backward(forward())  # warm-up: optimiser state exists before the measured step
    state = [t for group in opt.state.values() for t in group.values() if torch.is_tensor(t)]
    static = tensor_mb([*model.parameters(), *model.buffers(), *state])
    _, step_peak = profiled_step(forward, backward, "cpu")
    trainable, total = parameter_counts(model)
    shutil.rmtree(out / f"cost_{stage}", ignore_errors=True)
    return {"stage": stage, "trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total,
            "peak_alloc_mb": static + step_peak}


def summarise(rows: list[dict], costs: dict, lrs: dict, budgets: list[int]) -> list[dict]:
    table = []
    for stage in lrs:
        line = {"stage": stage, "lr": lrs[stage], **{k: costs[stage][k] for k in ("trainable_pct", "peak_alloc_mb")}}
        mine = [r for r in rows if r["stage"] == stage]
        line["s_per_step"] = statistics.median(r["s_per_step"] for r in mine) if mine else None
        for b in budgets:
            vals = [r["val_mIoU"] for r in mine if r["budget"] == b]
            line[f"miou_{b}"] = statistics.mean(vals) if vals else None
            line[f"std_{b}"] = statistics.stdev(vals) if len(vals) > 1 else None
            line[f"n_{b}"] = len(vals)
        table.append(line)
    full = next((t for t in table if t["stage"] == "full"), None)
    for t in table:
        t["peak_vs_full"] = t["peak_alloc_mb"] / full["peak_alloc_mb"] if full else None
    return table


def reading(table: list[dict], budgets: list[int], ref: str = "full") -> list[str]:
    """Which differences to the ``ref`` stage (full fine-tuning; linear probing for what the
    frozen features alone give) exceed twice the larger seed std."""
    base = next((t for t in table if t["stage"] == ref), None)
    lines = []
    for b in budgets:
        if base is None or base[f"miou_{b}"] is None:
            continue
        for t in table:
            if t is base or t[f"miou_{b}"] is None or (ref != "full" and t["stage"] == "full"):
                continue
            diff = t[f"miou_{b}"] - base[f"miou_{b}"]
            if min(t[f"n_{b}"], base[f"n_{b}"]) < 2:
                lines.append(f"budget {b or 'all'}: {t['stage']} - {ref} = {100 * diff:+.1f} mIoU (one seed: no spread "
                             f"to judge it by)")
                continue
            spread = 2 * max(t[f"std_{b}"], base[f"std_{b}"])
            verdict = "outside" if abs(diff) > spread else "within"
            lines.append(f"budget {b or 'all'}: {t['stage']} - {ref} = {100 * diff:+.1f} mIoU, {verdict} the seed "
                         f"spread (2 x std = {100 * spread:.1f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="spunet", choices=tuple(BASE_CONFIG))
    p.add_argument("--data", default=str(REPO / "data" / "synthetic"))
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sweep-steps", type=int, default=150)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0,20", help="labelled points per scene; 0 = every label")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", default="")
    p.add_argument("--report", action="store_true", help="tables from the runs made so far; train nothing")
    p.add_argument("--base", default="", help="adapt this base checkpoint (e.g. another study's base/model/"
                   "model_last.pth) instead of training one")
    p.add_argument("--lrs-from", default="", help="take each stage's lr from this study.json (no sweep): a probe "
                   "at the main study's learning rates")
    p.add_argument("--target-shift", default="none", choices=("none", "colour"),
                   help="colour: the probe target (S3DIS colours inverted, channels rotated)")
    args = p.parse_args(argv)
    global REPORT_ONLY
    REPORT_ONLY = args.report
    import torch

    torch.set_num_threads(1)  # the study runs beside other work; one thread is its measured unit
    root = Path(args.data)
    if not (root / TARGET / "Area_5").is_dir():
        print(f"error: no synthetic data at {root} (run tools/make_synthetic.py --out {root} --scenes 30)",
              file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "bench" / "results" / f"peft_study_{args.backbone}")
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages: unknown {', '.join(unknown)}; valid: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    os.chdir(REPO)
    if args.base:
        base = Path(args.base)
        if not base.is_file():
            print(f"error: --base {base}: no such checkpoint", file=sys.stderr)
            return 2
    elif args.report:
        base = out / "base" / "model" / "model_last.pth"
    else:
        base = train_base(args.backbone, root, args.base_steps, out)
    if args.target_shift == "colour":
        root = shifted_root(root, out)
    held_out = sweep_root(root, out)
    from ppt.config import load_config

    lrs, sweep = {}, []
    chosen = json.loads(Path(args.lrs_from).read_text())["lrs"] if args.lrs_from else {}
    missing = [s for s in stages if args.lrs_from and s not in chosen]
    if missing:
        print(f"error: --lrs-from {args.lrs_from}: no lr for {', '.join(missing)}", file=sys.stderr)
        return 2
    for stage in stages:
        if stage in chosen:
            lrs[stage] = chosen[stage]
            continue
        lr0 = load_config(f"configs/peft_{stage}.yaml", [f"peft.base={base}"]).optim.lr
        if args.sweep_steps == 0:  # no sweep: each stage's config lr (a reduced study says so)
            lrs[stage] = lr0
            continue
        tries = [run(f"sweep_{stage}_lr{lr0 * f:g}", stage, base, held_out, args.sweep_steps, 0, lr0 * f, 0, out)
                 for f in LR_FACTORS]
        tries = [t for t in tries if t is not None]
        sweep += tries
        if len(tries) == len(LR_FACTORS):
            lrs[stage] = max(tries, key=lambda r: r["val_mIoU"])["lr"]
    print("chosen lr: " + ", ".join(f"{s} {lr:g}" for s, lr in lrs.items()), flush=True)
    costs = {}
    for s in lrs:
        cache = out / f"cost_{s}.json"
        if not cache.is_file():
            cache.write_text(json.dumps(stage_cost(s, base, root, out)))
        costs[s] = json.loads(cache.read_text())
    rows = []
    for seed in seeds:
        for budget in budgets:
            for stage in lrs:
                rows.append(run(f"{stage}_b{budget}_seed{seed}", stage, base, root, args.steps, seed, lrs[stage],
                                budget, out))
    rows = [r for r in rows if r is not None]
    from bench.peft_transfer import zero_shot

    start = zero_shot(base, common(root, 1, 0), out, "cpu")  # the base on Area 5 before any step
    table = summarise(rows, costs, lrs, budgets)
    cols = ["stage", "lr", "trainable_pct", "peak_alloc_mb", "peak_vs_full", "s_per_step"]
    for b in budgets:
        cols += [f"miou_{b}", f"std_{b}"]
    print(f"\n{args.backbone}: base {args.base or f'{args.base_steps} steps'}; target {TARGET} "
          f"(shift: {args.target_shift}); {args.steps} steps per run, seeds {seeds}; "
          f"the base before any step: val mIoU {start['val_mIoU']:.4f}")
    print(format_table(table, cols))
    notes = reading(table, budgets) + reading(table, budgets, ref="linear")
    print("\n".join(notes))
    save_json({"machine": machine_info(), "args": vars(args), "lrs": lrs, "sweep": sweep, "runs": rows,
               "zero_shot": start,
               "table": table, "reading": notes}, out / "study.json")
    print(f"wrote {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
