"""PEFT study: every stage adapts one base to a domain it never trained on, under ONE recipe
(only the stage and its lr differ), lr from a sweep on held-out scenes per label budget, seeds.

    python bench/peft_study.py [--target synthetic|real|colour] [--real data/real] [--backbone spunet|ptv3]
        [--base-steps 2000] [--steps 300] [--sweep-steps 150] [--lrs 0.0003,0.001,0.003,0.01,0.03]
        [--seeds 0,1,2] [--budgets 0,20] [--stages full,...] [--recipe one|own] [--out DIR]
        [--base CKPT] [--lrs-from STUDY.json] [--report]

Targets (``bench/peft_targets.py``): ``synthetic`` (synthetic S3DIS from a base trained on
synthetic Structured3D + ScanNet), ``real`` (real ScanNet rooms from a base that trained on other
real rooms plus the synthetic domains), ``colour`` (the synthetic target through another sensor).

1. Base: the demo model (``configs/demo.yaml`` / ``demo_ptv3.yaml``: PPT, PDNorm, language head)
   trained on the target's base data for ``--base-steps`` steps with precise BN.
2. Recipe ``one`` (default): every stage runs ``ONE_RECIPE`` (AdamW, OneCycle, CE + Lovász, grad
   clip 3, batch 2, the same steps); the stage's config gives only its stage settings (what
   trains, adapter sizes). The JSON stores each run's resolved optimiser / loss / clip / batch /
   steps, and the study stops if two runs differ in anything but stage and lr.
   Recipe ``own``: each stage keeps its config's optimiser, scheduler and loss (the study of
   2026-12-06, which compared recipes, not stages: kept to label its rows).
3. Sweep, per label budget: each stage at every lr of ``--lrs`` (recipe own: its config's lr x
   1/4, 1, 4), seed 0, ``--sweep-steps`` steps, trained on the held-out split's train scenes and
   scored on its val scenes (the reported val scenes are never used to choose). A chosen lr at the
   grid's edge is marked ``edge`` in the table and the reading.
4. Runs: stage x budget x seed at the budget's chosen lr for ``--steps`` steps on the target's
   train split (the budget: ``data.label_budget`` labelled points per scene), val mIoU on the
   target's val split (every point).
5. Cost per stage on the same base: trainable share, step time (from the runs) and peak
   allocated memory of one training step (``bench/peft.py``'s profiler accounting).

Every run is cached in ``<out>/<run>/result.json``: an interrupted study resumes; runs go seed by
seed. Writes ``<out>/study.json`` and prints the tables with the reading: a difference to full
fine-tuning (and to linear probing) counts only when it exceeds the larger of the two seed
standard deviations times 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/peft.py != peft
sys.path.insert(0, str(REPO))

from bench.common import format_table, machine_info, save_json  # noqa: E402
from bench.peft_targets import TARGETS, Target, build_target  # noqa: E402

STAGES = ("full", "linear", "decoder", "bitfit", "lora", "dapt", "pointpeft")
LR_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03)
OWN_LR_FACTORS = (0.25, 1.0, 4.0)
BASE_CONFIG = {"spunet": "configs/demo.yaml", "ptv3": "configs/demo_ptv3.yaml"}
# One recipe for every stage (recipe "one"): AdamW + OneCycle + CE + Lovász + clip, the
# reference's decoder-probing recipe (Sonata / Concerto "-dec"), one lr for every group.
ONE_RECIPE = ["optim.name=adamw", "optim.weight_decay=0.01", "optim.betas=[0.9, 0.999]", "optim.scheduler=onecycle",
              "optim.pct_start=0.05", "optim.div_factor=10.0", "optim.final_div_factor=1000.0", "optim.grad_clip=3.0",
              "optim.block_lr_scale=1.0", "optim.prompt_lr_scale=0.1", "optim.cycle_momentum=true",
              "optim.base_momentum=0.85", "optim.max_momentum=0.95", "train.loss=ce+lovasz"]


def common(root: Path, steps: int, seed: int) -> list[str]:
    return [f"data.root={root}", "data.num_workers=1", "data.batch_size=2", "data.check=false",
            "train.epochs=1", f"train.steps_per_epoch={steps}", "train.amp=false", "train.device=cpu",
            "train.log_every=50", f"train.seed={seed}", "data.loop=50", "train.threads=1"]


def train_base(backbone: str, target: Target, steps: int, out: Path) -> Path:
    from ppt.config import load_config
    from ppt.engine.trainer import train

    path = out / "base" / "model" / "model_last.pth"
    if not path.is_file():
        if (out / "base").exists():
            shutil.rmtree(out / "base")
        cfg = load_config(BASE_CONFIG[backbone], common(target.base_root, steps, 0) + [
            f"data.mix={target.base_mix}", "data.val=[]", "train.eval_every=0", "train.precise_bn=10",
            "data.loop=200",  # the epoch (one pass over the first dataset) must hold the steps: the cap only shortens
            "train.best_on=first", *target.base_overrides])
        tic = time.perf_counter()
        train(cfg, out / "base")
        (out / "base" / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - tic}))
        print(f"base: {steps} steps in {time.perf_counter() - tic:.0f} s", flush=True)
    return path


def stage_config(stage: str, base: Path, root: Path, dataset: str, steps: int, seed: int, lr: float, budget: int,
                 recipe: str):
    from ppt.config import load_config
    from ppt.engine.peft_checkpoint import peft_run_overrides

    shared = ONE_RECIPE if recipe == "one" else []
    return load_config(f"configs/peft_{stage}.yaml", peft_run_overrides(stage, base) + common(root, steps, seed) + [
        f"data.mix={{{dataset}: 1}}", f"data.val=[{dataset}]", "train.eval_every=1", *shared, f"optim.lr={lr}",
        f"data.label_budget={budget}", "data.mix3d_prob=0.0", "train.precise_bn=0"])


def recipe_of(cfg) -> dict:
    """What a run trained with besides its stage and lr (the study's JSON shows it per run)."""
    optim = {k: v for k, v in asdict(cfg.optim).items() if k != "lr"}
    return {"optim": optim, "loss": cfg.train.loss, "batch_size": cfg.data.batch_size,
            "steps": cfg.train.steps_per_epoch, "mix3d_prob": cfg.data.mix3d_prob, "augment": cfg.data.augment}


REPORT_ONLY = False  # --report: tables from the cached runs, no training


def run(name: str, stage: str, base: Path, root: Path, dataset: str, steps: int, seed: int, lr: float, budget: int,
        recipe: str, out: Path) -> dict | None:
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
    cfg = stage_config(stage, base, root, dataset, steps, seed, lr, budget, recipe)
    tic = time.perf_counter()
    summary = train(cfg, exp)
    seconds = time.perf_counter() - tic
    row = {"stage": stage, "seed": seed, "lr": lr, "budget": budget, "steps": summary["steps"],
           "val_mIoU": summary["val"][dataset]["mIoU"], "seconds": seconds, "s_per_step": seconds / max(1, steps),
           "recipe": recipe_of(cfg)}
    (exp / "result.json").write_text(json.dumps(row))
    for heavy in (exp / "model",):  # the study keeps its numbers, not 100 checkpoints
        shutil.rmtree(heavy, ignore_errors=True)
    print(f"  {name}: val mIoU {row['val_mIoU']:.4f} ({seconds:.0f} s)", flush=True)
    return row


def one_recipe_check(runs: list[dict], sweep: list[dict]) -> str | None:
    """None when every run and sweep run shares one recipe besides stage and lr (the sweep has
    its own step count), else what differs."""
    def differ(rows: list[dict], drop: tuple[str, ...]) -> list[str]:
        keys = {k for r in rows for k in r.get("recipe", {}) if k not in drop}
        return sorted(k for k in keys if len({json.dumps(r.get("recipe", {}).get(k), sort_keys=True)
                                                for r in rows}) > 1)

    bad = sorted({*differ(runs + sweep, ("steps",)), *differ(runs, ()), *differ(sweep, ())})
    return f"the runs do not share one recipe: {', '.join(bad)} differ" if bad else None


def stage_cost(stage: str, base: Path, target: Target, recipe: str, out: Path) -> dict:
    """Trainable share and peak allocated MiB of one training step of the stage on the base."""
    import torch

    from bench.peft import profiled_step, tensor_mb, training_step
    from ppt.engine.build import build_model, build_train_loader
    from ppt.engine.peft_checkpoint import prepare_peft_model
    from ppt.models.peft.stages import parameter_counts

    cfg = stage_config(stage, base, target.root, target.dataset, 2, 0, 1e-3, 0, recipe)
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


def summarise(rows: list[dict], costs: dict, lrs: dict, budgets: list[int], edges: dict) -> list[dict]:
    """One line per stage: its lr per budget (``*`` = at the grid's edge), cost, mean / std."""
    table = []
    for stage in costs:
        line = {"stage": stage, **{k: costs[stage][k] for k in ("trainable_pct", "peak_alloc_mb")}}
        mine = [r for r in rows if r["stage"] == stage]
        line["s_per_step"] = statistics.median(r["s_per_step"] for r in mine) if mine else None
        for b in budgets:
            lr = lrs.get(b, {}).get(stage)
            line[f"lr_{b}"] = None if lr is None else f"{lr:g}{'*' if stage in edges.get(b, ()) else ''}"
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
            edge = " (an lr at the grid's edge)" if "*" in f"{t[f'lr_{b}']}{base[f'lr_{b}']}" else ""
            if min(t[f"n_{b}"], base[f"n_{b}"]) < 2:
                lines.append(f"budget {b or 'all'}: {t['stage']} - {ref} = {100 * diff:+.1f} mIoU (one seed: no spread "
                             f"to judge it by){edge}")
                continue
            spread = 2 * max(t[f"std_{b}"], base[f"std_{b}"])
            verdict = "outside" if abs(diff) > spread else "within"
            lines.append(f"budget {b or 'all'}: {t['stage']} - {ref} = {100 * diff:+.1f} mIoU, {verdict} the seed "
                         f"spread (2 x std = {100 * spread:.1f}){edge}")
    return lines


def sweep_lrs(stage: str, base: Path, recipe: str, grid: tuple[float, ...]) -> list[float]:
    if recipe == "one":
        return list(grid)
    from ppt.config import load_config

    lr0 = load_config(f"configs/peft_{stage}.yaml", [f"peft.base={base}"]).optim.lr
    return [lr0 * f for f in OWN_LR_FACTORS]


def read_lrs_from(path: str, budgets: list[int]) -> dict:
    """A study's chosen lrs per budget (an older study's flat ``{stage: lr}`` applies to every budget)."""
    lrs = json.loads(Path(path).read_text())["lrs"]
    if lrs and all(isinstance(v, (int, float)) for v in lrs.values()):
        return {b: dict(lrs) for b in budgets}
    return {b: dict(lrs.get(str(b), {})) for b in budgets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="spunet", choices=tuple(BASE_CONFIG))
    p.add_argument("--target", default="synthetic", choices=TARGETS)
    p.add_argument("--target-shift", default="none", choices=("none", "colour"), help="colour: --target colour")
    p.add_argument("--data", default=str(REPO / "data" / "synthetic"), help="the synthetic data root")
    p.add_argument("--real", default=str(REPO / "data" / "real"), help="real ScanNet scans (bench/real_scans.py)")
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sweep-steps", type=int, default=150, help="0: no sweep, the grid's middle lr (recipe own: "
                   "each config's lr)")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LR_GRID), help="the sweep's grid (recipe one)")
    p.add_argument("--recipe", default="one", choices=("one", "own"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0,20", help="labelled points per scene; 0 = every label")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", default="")
    p.add_argument("--report", action="store_true", help="tables from the runs made so far; train nothing")
    p.add_argument("--base", default="", help="adapt this base checkpoint (e.g. another study's base/model/"
                   "model_last.pth) instead of training one")
    p.add_argument("--lrs-from", default="", help="take each stage's lr from this study.json (no sweep)")
    args = p.parse_args(argv)
    global REPORT_ONLY
    REPORT_ONLY = args.report
    import torch

    torch.set_num_threads(1)  # the study runs beside other work; one thread is its measured unit
    target_name = "colour" if args.target_shift == "colour" else args.target
    synthetic = Path(args.data)
    if not (synthetic / "s3dis" / "Area_5").is_dir():
        print(f"error: no synthetic data at {synthetic} (run tools/make_synthetic.py --out {synthetic} --scenes 30)",
              file=sys.stderr)
        return 2
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: --stages: unknown {', '.join(unknown)}; valid: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        grid = tuple(sorted(float(x) for x in args.lrs.split(",") if x))
        seeds = [int(s) for s in args.seeds.split(",")]
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError as e:
        print(f"error: --lrs / --seeds / --budgets: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "exp" / f"peft_study_{args.backbone}_{target_name}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        target = build_target(target_name, synthetic.resolve(), Path(args.real).resolve(), out.resolve())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(REPO)
    if args.base:
        base = Path(args.base)
        if not base.is_file():
            print(f"error: --base {base}: no such checkpoint", file=sys.stderr)
            return 2
    elif args.report:
        base = out / "base" / "model" / "model_last.pth"
    else:
        base = train_base(args.backbone, target, args.base_steps, out)

    chosen = read_lrs_from(args.lrs_from, budgets) if args.lrs_from else {}
    missing = sorted({s for b in budgets for s in stages if args.lrs_from and s not in chosen[b]})
    if missing:
        print(f"error: --lrs-from {args.lrs_from}: no lr for {', '.join(missing)}", file=sys.stderr)
        return 2
    lrs, edges, sweep = {b: {} for b in budgets}, {b: set() for b in budgets}, []
    for budget in budgets:
        for stage in stages:
            if args.lrs_from:
                lrs[budget][stage] = chosen[budget][stage]
                continue
            tries_at = sweep_lrs(stage, base, args.recipe, grid)
            if args.sweep_steps == 0:  # no sweep: the grid's middle (a reduced study says so)
                lrs[budget][stage] = tries_at[len(tries_at) // 2]
                continue
            tries = [run(f"sweep_{stage}_b{budget}_lr{lr:g}", stage, base, target.held_out, target.dataset,
                         args.sweep_steps, 0, lr, budget, args.recipe, out) for lr in tries_at]
            tries = [t for t in tries if t is not None]
            sweep += tries
            if len(tries) == len(tries_at):
                best = max(tries, key=lambda r: r["val_mIoU"])["lr"]
                lrs[budget][stage] = best
                if best in (tries_at[0], tries_at[-1]):
                    edges[budget].add(stage)
        print(f"budget {budget or 'all'}: chosen lr " + ", ".join(
            f"{s} {lr:g}{' (edge)' if s in edges[budget] else ''}" for s, lr in lrs[budget].items()), flush=True)
    costs = {}
    for s in stages:
        cache = out / f"cost_{s}.json"
        if not cache.is_file() and not REPORT_ONLY:
            cache.write_text(json.dumps(stage_cost(s, base, target, args.recipe, out)))
        if cache.is_file():
            costs[s] = json.loads(cache.read_text())
    rows = []
    for seed in seeds:
        for budget in budgets:
            for stage in stages:
                if stage in lrs[budget]:
                    rows.append(run(f"{stage}_b{budget}_seed{seed}", stage, base, target.root, target.dataset, args.steps,
                                    seed, lrs[budget][stage], budget, args.recipe, out))
    rows = [r for r in rows if r is not None]
    mixed = one_recipe_check(rows, sweep) if args.recipe == "one" else None
    if mixed:
        print(f"error: {out}: {mixed} (runs cached by another study? use another --out)", file=sys.stderr)
        return 2
    from bench.peft_transfer import zero_shot

    start = zero_shot(base, common(target.root, 1, 0), out, "cpu", target.dataset) if base.is_file() else None
    table = summarise(rows, costs, lrs, budgets, edges)
    cols = ["stage", "trainable_pct", "peak_alloc_mb", "peak_vs_full", "s_per_step"]
    for b in budgets:
        cols += [f"lr_{b}", f"miou_{b}", f"std_{b}"]
    before = f"{start['val_mIoU']:.4f}" if start else "n/a"
    print(f"\n{args.backbone}: base {args.base or f'{args.base_steps} steps'}; target {target.name} "
          f"({target.dataset}); recipe {args.recipe}; {args.steps} steps per run, seeds {seeds}; "
          f"the base before any step: val mIoU {before}  (* = lr at the sweep grid's edge)")
    print(format_table(table, cols))
    notes = reading(table, budgets) + reading(table, budgets, ref="linear")
    print("\n".join(notes))
    recipe = rows[0]["recipe"] if rows and args.recipe == "one" else "each stage's config (recipe own)"
    save_json({"machine": machine_info(), "args": vars(args), "target": {"name": target.name, "dataset":
               target.dataset, "base_mix": target.base_mix, "splits": target.splits}, "recipe": recipe,
               "lr_grid": list(grid) if args.recipe == "one" else list(OWN_LR_FACTORS),
               "lrs": {str(b): v for b, v in lrs.items()}, "edges": {str(b): sorted(v) for b, v in edges.items()},
               "sweep": sweep, "runs": rows, "zero_shot": start, "table": table, "reading": notes},
              out / "study.json")
    print(f"wrote {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
