"""Negative-transfer study on the three-domain synthetic data, with the engine's own trainer.

    python bench/negative_transfer.py                    # full study (19 runs, ~65 min on 2 busy cores)
    python bench/negative_transfer.py --quick --out /tmp/nt --results /tmp/nt   # smoke (< 1 min)
    python bench/negative_transfer.py --report-only      # table + chart from finished runs
    python bench/negative_transfer.py --backbone ptv3 --variants alone_scannet alone_s3dis \
        alone_structured3d naive ppt --out exp/negative_transfer_ptv3 \
        --results bench/results/negative_transfer_ptv3     # the PTv3 rows (demo-size PTv3)

Every run is ``ppt.engine.trainer.train(cfg, exp_dir)`` in this process (the code
``tools/train.py`` calls) with the same model size, step count and seeds; only the data mix,
the prompt adapter and the head change:

    alone_<d>   one dataset, plain SpUNet + linear head (prompt none, head union)
    matched_<d> the same with a third of the steps: the per-dataset steps of a joint run
    naive_x3, ppt_x3  joint runs with 3x the steps: each dataset gets the steps of its alone run
    naive       three datasets 1:1:1, no prompts, one head over the union of the classes
    ppt         PDNorm (decoupled BN, zero-init) + language-guided head (MiniLM text)
    pdnorm_decoupled  PDNorm + one linear head per dataset     } head ablation: all three
    pdnorm_union      PDNorm + unionized head                  } with decoupled BN, as ppt
    ppt_sharedbn      PDNorm + language head, ONE shared BN    } adapter ablation: all three
    inject      direct prompt injection + language head, shared BN  } with one shared BN
    xattn       prompt cross-attention + language head, shared BN   }

The score of a run is the val mIoU of each dataset it trained on, measured by the trainer's
final evaluation (``ppt.engine.evaluate``: every original point, no TTA). A run writes
``<out>/<variant>_s<seed>/result.json`` when it finishes; runs whose result exists are skipped,
so the study resumes after an interruption. The summary (mean ± std over seeds per dataset)
goes to ``<results>/negative_transfer.json`` and ``negative_transfer.png``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, format_table, machine_info, save_json  # noqa: E402

DOMAINS = ("scannet", "s3dis", "structured3d")
JOINT = "{scannet: 1, s3dis: 1, structured3d: 1}"

# Variant -> (data mix, model overrides). The alone runs use a plain network: with a single
# dataset the "union" head is one linear classifier over that dataset's classes.
PLAIN = ["model.prompt=none", "model.head=union"]
# Adapter ablation (PDNorm vs injection vs cross-attention): every variant normalises with ONE
# BN shared by the datasets, so the rows differ in how the prompt enters and in nothing else.
# Decoupled (per-dataset) BN is itself a domain-specific path that works without any prompt,
# and at this step budget its running statistics are stale (RESULTS.md, finding 4); giving it
# to the PDNorm row only (as before) compared BN choices, not adapters. Shared rather than
# decoupled for all three because injection and cross-attention exist only with a shared BN
# (ppt.models.segmentor), so this is the choice every adapter can take. Spelled out for inject
# and xattn too (the Segmentor uses decoupled_bn for PDNorm only), so the recipe says it.
SHARED_BN = "model.decoupled_bn=false"
ADAPTER_ABLATION = ("ppt_sharedbn", "inject", "xattn")
VARIANTS: dict[str, tuple[str, list[str]]] = {
    **{f"alone_{d}": (f"{{{d}: 1}}", PLAIN) for d in DOMAINS},
    "naive": (JOINT, PLAIN),
    "ppt": (JOINT, ["model.prompt=pdnorm", "model.head=language"]),
    "inject": (JOINT, ["model.prompt=inject", "model.head=language", SHARED_BN]),
    "xattn": (JOINT, ["model.prompt=xattn", "model.head=language", SHARED_BN]),
    "pdnorm_decoupled": (JOINT, ["model.prompt=pdnorm", "model.head=decoupled"]),
    "pdnorm_union": (JOINT, ["model.prompt=pdnorm", "model.head=union"]),
    # PPT with one BN shared by the datasets (the prompt still modulates it): the PDNorm row
    # of the adapter ablation, and the diagnostic of stale per-dataset statistics.
    "ppt_sharedbn": (JOINT, ["model.prompt=pdnorm", "model.head=language", SHARED_BN]),
    # Controls for the step budget: a joint run gives each dataset a third of its steps, so
    # compare with alone runs of a third of the steps and with joint runs of 3x the steps.
    **{f"matched_{d}": (f"{{{d}: 1}}", PLAIN) for d in DOMAINS},
    "naive_x3": (JOINT, PLAIN),
    "ppt_x3": (JOINT, ["model.prompt=pdnorm", "model.head=language"]),
}
EXTRA = ("naive_x3", "ppt_x3")  # run only when named with --variants
ABLATIONS = ("inject", "xattn", "pdnorm_decoupled", "pdnorm_union", "ppt_sharedbn")
LABELS = {"alone": "(a) each alone", "matched": "(a') each alone, 1/3 of the steps",
          "naive": "(b) naive joint", "naive_x3": "(b') naive joint, 3x the steps",
          "ppt": "(c) PPT: PDNorm+language", "ppt_sharedbn": "(c') PPT, BN shared (adapter ablation)",
          "ppt_x3": "(c'') PPT, 3x the steps",
          "inject": "(d) injection+language, BN shared", "xattn": "(e) cross-attn+language, BN shared",
          "pdnorm_decoupled": "(f) PDNorm+decoupled", "pdnorm_union": "(g) PDNorm+union"}

# The study's shared recipe: the small CPU model of configs/demo.yaml, coarse voxels, 200 steps.
# AdamW and no Mix3D because the budget is a few hundred steps: in a pilot (100 steps, ScanNet
# alone, seed 0) AdamW 5e-3 without Mix3D reached 11.0 mIoU, SGD 0.05 with Mix3D 9.0 and SGD 0.1
# without Mix3D 9.1 (walls and floors only). Everything is spelled out here so the study does
# not move when a config does.
STUDY = [
    "model.channels=[16, 32, 48, 64, 64, 48, 32, 32]", "model.layers=[1, 1, 1, 1, 1, 1, 1, 1]",
    "model.prompt_dim=64", "model.text_encoder=minilm", "model.template='a point of {}'",
    "data.voxel_size=0.1", "data.batch_size=2", "data.num_workers=1", "data.mix3d_prob=0.0",
    "data.loop=100", "data.check=false", "data.val=[]",
    "optim.name=adamw", "optim.lr=0.005", "optim.weight_decay=0.01", "optim.prompt_lr_scale=0.1",
    "optim.scheduler=onecycle",
    "optim.pct_start=0.05", "optim.final_div_factor=1000.0",
    "train.epochs=1", "train.eval_every=1", "train.device=cpu", "train.threads=1",
    "train.log_every=50", "train.amp=false",
]
# --backbone ptv3: the demo-size PTv3 of configs/demo_ptv3.yaml (0.6 M parameters) in place of
# the SpUNet, everything else as STUDY (cross-entropy only, as the SpUNet rows).
PTV3 = ["model.backbone=ptv3", "ptv3.enc_depths=[1, 1, 1, 1]", "ptv3.enc_channels=[16, 32, 48, 64]",
        "ptv3.enc_heads=[1, 2, 3, 4]", "ptv3.dec_depths=[1, 1, 1]", "ptv3.dec_channels=[32, 32, 48]",
        "ptv3.dec_heads=[2, 2, 3]", "ptv3.patch_size=128", "ptv3.mlp_ratio=2.0", "ptv3.drop_path=0.0"]
QUICK = ["model.channels=[8, 8, 16, 16, 16, 16, 8, 8]", "model.prompt_dim=16", "data.num_workers=0"]


def run_config(variant: str, seed: int, data_root: str, steps: int, extra: list[str]):
    from ppt.config import load_config

    mix, overrides = VARIANTS[variant]
    if variant.startswith("matched_"):
        steps = max(1, steps // len(DOMAINS))
    elif variant.endswith("_x3"):
        steps *= len(DOMAINS)
    return load_config(None, [*STUDY, *overrides, f"data.mix={mix}", f"data.root={data_root!r}",
                              f"train.steps_per_epoch={steps}", f"train.seed={seed}", *extra])


def run_one(variant: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train one variant/seed (or read its finished result)."""
    from ppt.engine.trainer import train

    run_dir = Path(args.out) / f"{variant}_s{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run starts over
    cfg = run_config(variant, seed, args.data, args.steps, extra)
    start = time.time()
    summary = train(cfg, run_dir)
    result = {"variant": variant, "seed": seed, "steps": summary["steps"],
              "wall_s": round(time.time() - start, 1), "skipped_steps": summary["skipped_steps"],
              "val": {d: {k: r[k] for k in ("mIoU", "mAcc", "allAcc")} for d, r in summary["val"].items()},
              "config": cfg.to_dict()}
    if args.precise_bn > 0:
        result["val_precise_bn"] = precise_bn_scores(cfg, run_dir, args.precise_bn)
    for ckpt in (run_dir / "model").glob("*.pth"):
        ckpt.unlink()  # the study keeps scores, not weights
    save_json(result, result_path)
    return result


def precise_bn_scores(cfg, run_dir: Path, batches: int) -> dict:
    """Val scores of a finished run's final weights after a precise-BN pass.

    The study evaluates once, at the end, and running statistics never enter a training
    forward, so the same weights scored with and without the pass isolate what it changes
    (``train.precise_bn`` would run the same pass, with the same batches, before that
    evaluation)."""
    import torch

    from ppt.engine import checkpoint as ckpt_io
    from ppt.engine.build import build_model, build_train_loader, build_val_datasets, text_embeddings_from_state
    from ppt.engine.precise_bn import update_bn_stats
    from ppt.engine.trainer import evaluate_all

    ckpt = ckpt_io.load_checkpoint(run_dir / "model" / "model_last.pth")
    model = build_model(cfg, text_embeddings_from_state(ckpt["model"]))
    model.load_state_dict(ckpt["model"])
    cpu = torch.device("cpu")
    update_bn_stats(model, build_train_loader(cfg), batches, cpu, epoch=cfg.train.epochs)
    results = evaluate_all(model, build_val_datasets(cfg), cfg, cpu, None)
    return {d: {k: r[k] for k in ("mIoU", "mAcc", "allAcc")} for d, r in results.items()}


def with_precise_bn(results: list[dict]) -> list[dict]:
    """The runs' precise-BN scores as results of their own (rows "<row>+pbn")."""
    return [{**r, "val": r["val_precise_bn"], "pbn": True} for r in results if "val_precise_bn" in r]


def aggregate(results: list[dict]) -> dict:
    """{row: {dataset: {mean, std, n, seeds}}} with the three alone runs merged into "alone"."""
    scores: dict[str, dict[str, list[float]]] = {}
    for r in results:
        row = r["variant"].split("_")[0] if r["variant"].startswith(("alone_", "matched_")) else r["variant"]
        row += "+pbn" if r.get("pbn") else ""
        for d, m in r["val"].items():
            scores.setdefault(row, {}).setdefault(d, []).append(m["mIoU"])
    table = {}
    for row, per in scores.items():
        table[row] = {d: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "n": len(v)} for d, v in per.items()}
        # Mean over datasets; its std is over seeds, so only when every dataset has every seed.
        n = {len(v) for v in per.values()}
        seed_means = np.mean([per[d] for d in per], axis=0) if len(n) == 1 else None
        table[row]["mean"] = {"mean": float(np.mean([table[row][d]["mean"] for d in per])),
                              "std": float(np.std(seed_means, ddof=1)) if seed_means is not None
                              and len(seed_means) > 1 else 0.0, "n": min(n)}
    return table


def markdown(table: dict) -> str:
    rows = []
    for row in [r for base in LABELS for r in (base, base + "+pbn")]:
        if row not in table:
            continue
        base = row.removesuffix("+pbn")
        label = LABELS[base] + (", precise BN" if row != base else "")
        cells = {"variant": label, "seeds": table[row]["mean"]["n"]}
        for d in (*DOMAINS, "mean"):
            s = table[row].get(d)
            cells[d] = f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "-"
        if "alone" in table and row != "alone":
            delta = [table[row][d]["mean"] - table["alone"][d]["mean"] for d in DOMAINS
                     if d in table[row] and d in table["alone"]]
            cells["delta"] = f"{100 * np.mean(delta):+.1f}" if delta else "-"
        rows.append(cells)
    cols = ["variant", "seeds", *DOMAINS, "mean", "delta"]
    heads = ["variant", "seeds", *(f"{d} mIoU" for d in DOMAINS), "mean", "Δ vs alone"]
    return format_table(rows, cols, heads)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for base in LABELS for r in (base, base + "+pbn") if r in table]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(9.5, 3.8), dpi=80)
    x = np.arange(len(DOMAINS))
    for i, row in enumerate(rows):
        means = [100 * table[row].get(d, {"mean": np.nan})["mean"] for d in DOMAINS]
        stds = [100 * table[row].get(d, {"std": 0.0})["std"] for d in DOMAINS]
        label = LABELS[row.removesuffix("+pbn")] + (", precise BN" if row.endswith("+pbn") else "")
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=label,
               color=plt.get_cmap("tab20")(i % 20))
    ax.set_xticks(x, DOMAINS)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Synthetic three-domain study (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synthetic_study", help="synthetic data root (made if missing)")
    p.add_argument("--scenes", type=int, default=30, help="rooms per domain when making the data")
    p.add_argument("--out", default="exp/negative_transfer", help="folder of the runs")
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of the summary JSON and PNG")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per run")
    p.add_argument("--ablation-seeds", type=int, default=1,
                   help="the ablations (inject, xattn, pdnorm_*) run on the first N seeds only (time budget)")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in EXTRA], help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny data, model and steps, one seed")
    p.add_argument("--report-only", action="store_true", help="summarise finished runs, train nothing")
    p.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="also score each run's final weights after recomputing BN statistics from N "
                        "training batches per dataset (rows '..., precise BN')")
    p.add_argument("--backbone", choices=("spunet", "ptv3"), default="spunet",
                   help="ptv3: the demo-size PTv3 (PTV3 overrides) in every run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run, e.g. --set optim.lr=0.01")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    extra = (PTV3 if args.backbone == "ptv3" else []) + list(args.set)
    if args.quick:
        args.scenes, args.steps, args.seeds = 6, 2, args.seeds[:1]
        args.variants = [v for v in args.variants if v in ("alone_scannet", "naive", "ppt")] or args.variants
        extra = QUICK + extra

    import torch

    torch.set_num_threads(1)
    if not args.report_only and not Path(args.data, "scannet").is_dir():
        from ppt.data.synthetic import generate

        generate(args.data, args.scenes, seed=0)
        print(f"made synthetic data in {args.data} ({args.scenes} rooms per domain)")

    results = []
    # The core comparison (alone, naive, ppt) over every seed first, then the ablations, then
    # the step-budget control.
    order = [(v, s) for s in args.seeds for v in args.variants
             if v not in ABLATIONS and v not in EXTRA and "matched" not in v]
    order += [(v, s) for s in args.seeds[:args.ablation_seeds] for v in args.variants if v in ABLATIONS]
    order += [(v, s) for s in args.seeds for v in args.variants if "matched" in v or v in EXTRA]
    for i, (variant, seed) in enumerate(order):
        done = (Path(args.out) / f"{variant}_s{seed}" / "result.json").is_file()
        if args.report_only and not done:
            continue
        r = run_one(variant, seed, args, extra)
        scores = " ".join(f"{d} {100 * m['mIoU']:.1f}" for d, m in r["val"].items())
        print(f"[{i + 1}/{len(order)}] {variant} seed {seed}: {scores} ({r['wall_s']:.0f} s"
              f"{', cached' if done else ''})", flush=True)
        results.append(r)
    if not results:
        print("no finished runs")
        return 1

    table = aggregate(results + with_precise_bn(results))
    text = markdown(table)
    print(text)
    summary = {"machine": machine_info(), "command": " ".join(sys.argv), "steps": args.steps,
               "seeds": args.seeds, "data": args.data, "recipe": STUDY + extra,
               "total_run_wall_s": round(sum(r["wall_s"] for r in results), 1),
               "table": table, "markdown": text, "runs": [{k: v for k, v in r.items() if k != "config"}
                                                        for r in results]}
    out = Path(args.results)
    save_json(summary, out / "negative_transfer.json")
    plot(table, out / "negative_transfer.png")
    print(f"wrote {out / 'negative_transfer.json'} and {out / 'negative_transfer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
