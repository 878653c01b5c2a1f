"""Part 2 of ``bench/peft.py``: each PEFT stage adapts one base model to a new dataset.

The engine's ``train()`` as ``tools/train.sh --peft`` runs it: a PPT base trained on synthetic
``BASE_MIX``, then every stage trained on ``TARGET`` for the same steps with one optimiser
setting (``TRANSFER_OPTIM``) and each seed of ``SEEDS``; val mIoU on every original point. Runs
are cached in ``<out>/<stage>_seed<seed>/result.json``, so the study resumes.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

STAGES = ("full", "linear", "bitfit", "dapt", "pointpeft")
BASE_MIX = "{structured3d: 2, scannet: 1}"
TARGET = "s3dis"
# one optimiser for every stage of the transfer study (the PEFT configs' AdamW setting)
TRANSFER_OPTIM = ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=1.0e-4",
                  "optim.scheduler=cosine"]
SEEDS = (0, 1, 2)


def zero_shot(base_path: Path, common: list[str], out_dir: Path, device: str, target: str = TARGET) -> dict:
    """The base mapped onto the target before any step (new dataset: mean prompt, mean BN;
    S3DIS class names embedded): the reference every stage starts from."""
    from ppt.config import load_config
    from ppt.engine.build import build_model, build_val_datasets
    from ppt.engine.evaluate import evaluate
    from ppt.engine.peft_checkpoint import peft_run_overrides, prepare_peft_model

    result_file = out_dir / "zero_shot.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cfg = load_config("configs/peft_linear.yaml", peft_run_overrides("linear", base_path) + common
                      + [f"data.mix={{{target}: 1}}", "data.val=[]"])
    model = build_model(cfg, None)
    prepare_peft_model(model, cfg, out_dir / "zero_shot", device)
    res = evaluate(model.to(device).eval(), build_val_datasets(cfg)[target], device,
                   voxel_size=cfg.data.voxel_size, amp_dtype=None, num_workers=1)
    row = {"stage": "base, 0 steps", "val_mIoU": res["mIoU"], "val_mAcc": res.get("mAcc"), "steps": 0}
    result_file.write_text(json.dumps(row))
    print(f"  transfer zero-shot: val mIoU {row['val_mIoU']:.4f}", flush=True)
    return row


def transfer_run(stage: str, seed: int, base_path: Path, common: list[str], settings: dict,
                 exp: Path, device: str) -> dict:
    """One stage, one seed (cached in ``exp/result.json``)."""
    import shutil

    from ppt.config import load_config
    from ppt.engine.build import build_model
    from ppt.engine.peft_checkpoint import peft_run_overrides, prepare_peft_model
    from ppt.engine.trainer import train
    from ppt.models.peft.stages import parameter_counts

    result_file = exp / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    overrides = peft_run_overrides(stage, base_path) + common + TRANSFER_OPTIM + [
        f"data.mix={{{TARGET}: 1}}", "data.val=[]", f"train.steps_per_epoch={settings['stage_steps']}",
        "train.eval_every=1", f"train.seed={seed}"]
    cfg = load_config(f"configs/peft_{stage}.yaml", overrides)
    if exp.exists():  # an interrupted run: start it again
        shutil.rmtree(exp)
    tic = time.perf_counter()
    summary = train(cfg, exp)
    seconds = time.perf_counter() - tic
    model = build_model(cfg, None)
    prepare_peft_model(model, cfg, exp, device)
    trainable, total = parameter_counts(model)
    row = {"stage": stage, "seed": seed, "val_mIoU": summary["val"][TARGET]["mIoU"],
           "val_mAcc": summary["val"][TARGET].get("mAcc"), "steps": summary["steps"],
           "seconds": seconds, "trainable": trainable, "total": total,
           "trainable_pct": 100.0 * trainable / total,
           "checkpoint_mb": (exp / "model" / "model_last.pth").stat().st_size / 2**20,
           "optimizer": cfg.optim.name, "lr": cfg.optim.lr}
    result_file.write_text(json.dumps(row))
    print(f"  transfer {stage} seed {seed}: val mIoU {row['val_mIoU']:.4f} ({seconds:.0f} s)", flush=True)
    return row


def run_transfer(settings: dict, root: str, out_dir: Path, device: str) -> tuple[dict, list[dict], list[dict]]:
    """(base, per-stage summary rows, per-seed rows)."""
    from ppt.config import load_config
    from ppt.engine.trainer import train

    common = [f"data.root={root}", f"data.voxel_size={settings['voxel']}", "data.num_workers=1",
              f"data.batch_size={settings['batch_size']}", "data.check=false", "train.epochs=1",
              "train.amp=false", f"train.device={device}", "train.log_every=10", "data.loop=50"]
    widths = json.dumps(settings["widths_transfer"])
    base_dir = out_dir / "base"
    base_path = base_dir / "model" / "model_last.pth"
    base_s = 0.0
    if not base_path.is_file():
        cfg = load_config("configs/demo.yaml", common + [
            f"data.mix={BASE_MIX}", "data.val=[]", f"model.channels={widths}",
            f"train.steps_per_epoch={settings['base_steps']}", "train.eval_every=0"])
        tic = time.perf_counter()
        train(cfg, base_dir)
        base_s = time.perf_counter() - tic
    base = {"mix": BASE_MIX, "steps": settings["base_steps"], "seconds": base_s,
            "widths": settings["widths_transfer"]}
    summary = [zero_shot(base_path, common, out_dir, device)]
    runs = []
    for stage in STAGES:
        rows = [transfer_run(stage, seed, base_path, common, settings, out_dir / f"{stage}_seed{seed}", device)
                for seed in settings["seeds"]]
        runs += rows
        mious = [r["val_mIoU"] for r in rows]
        summary.append({**{k: rows[0][k] for k in ("stage", "steps", "trainable", "total", "trainable_pct",
                                                   "checkpoint_mb", "optimizer", "lr")},
                        "seeds": len(rows), "val_mIoU": statistics.mean(mious),
                        "val_mIoU_std": statistics.stdev(mious) if len(mious) > 1 else None,
                        "val_mIoU_per_seed": mious, "seconds": statistics.mean(r["seconds"] for r in rows)})
    return base, summary, runs
