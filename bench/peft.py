"""PEFT stages side by side: trainable share, training memory, step time, transfer mIoU.

    python bench/peft.py                 # full run (FULL below): 13 min of CPU time on 2 cores
                                         # (32 min wall while other jobs shared the cores)
    python bench/peft.py --quick         # smoke test: tiny widths, 2-3 steps, no "+tricks off" rows
                                         # (~2.5 min on 2 shared cores, mostly process start-up)
    python bench/peft.py --skip-transfer # cost table only

Part 1, cost (same batch for every stage, one fresh subprocess per stage so peak RSS is the
stage's own): the default SpUNet widths (about 39 M parameters), PDNorm + language head, one
batch of two synthetic S3DIS rooms. Per stage: trainable parameters (count, % of total);
bytes of the tensors autograd saves for backward in one forward (``saved_tensors_hooks``,
counted once per storage; float activations and integer rulebooks/indices apart); the worker's peak RSS and its rise over the RSS before the first
step; CUDA max allocated when run on a GPU; median step time (forward + backward + AdamW) over
``repeats`` steps after one warm-up step. "+tricks off" rows rerun a stage with
``input_grad_only`` and ``no_grad_prefix`` disabled, to show what those save.

Part 2, transfer (the engine's ``train()``, as ``tools/train.sh --peft`` runs it): a PPT model
(PDNorm, language head, small widths) trained on synthetic Structured3D + ScanNet, then each
stage adapts it to synthetic S3DIS (13 classes, 5 never in the base's label sets: ceiling is in
Structured3D's but beam, column, board, bookcase and clutter are new) for the same number of
steps with its own config; val mIoU on S3DIS Area_5 (every original point, no TTA).

Results: printed tables and ``bench/results/peft.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, format_table, machine_info, save_json  # noqa: E402

STAGES = ("full", "linear", "bitfit", "dapt", "pointpeft")
TRICKS_OFF = ("linear", "dapt", "pointpeft")  # stages rerun with input_grad_only/no_grad_prefix off
DEFAULT_WIDTHS = [32, 64, 128, 256, 256, 128, 96, 96]
SMALL_WIDTHS = [16, 32, 48, 64, 64, 48, 32, 32]
BASE_MIX = "{structured3d: 2, scannet: 1}"
TARGET = "s3dis"

# (cost widths, cost voxel size, cost repeats, base steps, stage steps, batch size, voxel size)
FULL = dict(widths=DEFAULT_WIDTHS, cost_voxel=0.05, repeats=2, base_steps=50, stage_steps=30,
            batch_size=4, voxel=0.08)
QUICK = dict(widths=[8, 16, 16, 32, 32, 16, 16, 16], cost_voxel=0.2, repeats=1, base_steps=3,
             stage_steps=2, batch_size=2, voxel=0.12)


# --------------------------------------------------------------------------------------------
# Part 1: cost worker (runs in its own process)

def cost_worker(stage: str, tricks: bool, widths: list[int], voxel: float, repeats: int,
                root: str, device: str) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from bench.common import current_rss_mb, cuda_peak_mb, reset_cuda_peak
    from ppt.config import PeftConfig
    from ppt.data.classes import get_dataset_info
    from ppt.data.collate import collate
    from ppt.data.datasets import build_dataset
    from ppt.data.transforms import build_transforms
    from ppt.losses import segmentation_loss
    from ppt.models.peft.memory_bank import build_memory_bank
    from ppt.models.peft.stages import apply_stage, parameter_counts
    from ppt.models.segmentor import Segmentor

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    names = get_dataset_info(TARGET).class_names
    g = torch.Generator().manual_seed(0)
    text = {TARGET: F.normalize(torch.randn(len(names), 384, generator=g), dim=-1)}
    model = Segmentor({TARGET: names}, backbone=dict(channels=tuple(widths)), prompt="pdnorm",
                      prompt_dim=256, head="language", text_embeddings=text).to(device)
    ds = build_dataset(TARGET, root, "train", build_transforms(TARGET, "val", voxel))
    samples = [ds[i] for i in range(min(2, len(ds)))]
    for s in samples:
        s.pop("inverse", None), s.pop("origin_segment", None)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(samples).items()}
    bank = None
    if stage == "pointpeft":  # bank over a few training rooms (its cost is not measured here)
        rooms = [collate([ds[i]]) for i in range(min(6, len(ds)))]
        bank = build_memory_bank(model, rooms, device=device, progress=False)
    cfg = PeftConfig(stage=stage, base="-", input_grad_only=tricks, no_grad_prefix=tricks)
    apply_stage(model, cfg, bank, domain=TARGET)
    model.train()
    trainable, total = parameter_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        segmentation_loss(model(batch), batch["segment"]).backward()
        opt.step()

    storages: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, floating point)

    def pack(t):
        try:
            storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.is_floating_point())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    rss_before = current_rss_mb()
    reset_cuda_peak(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # warm-up step, also the saved-tensor count
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stage": stage, "tricks": tricks, "voxels": int(len(batch["segment"])),
            "trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total,
            "saved_mb": sum(b for b, fp in storages.values() if fp) / 2**20,
            "saved_index_mb": sum(b for b, fp in storages.values() if not fp) / 2**20, "peak_rss_mb": peak,
            "rss_rise_mb": peak - rss_before, "cuda_peak_mb": cuda_peak_mb(device),
            "step_s": sorted(times)[len(times) // 2]}


def run_cost(settings: dict, root: str, device: str) -> list[dict]:
    rows = []
    jobs = [(s, True) for s in STAGES] + [(s, False) for s in (() if settings.get("quick") else TRICKS_OFF)]
    for stage, tricks in jobs:
        cmd = [sys.executable, __file__, "--worker", stage, "--tricks", str(int(tricks)),
               "--widths", json.dumps(settings["widths"]), "--voxel", str(settings["cost_voxel"]),
               "--repeats", str(settings["repeats"]), "--data-root", root, "--device", device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"cost worker {stage} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["name"] = stage if tricks else f"{stage} +tricks off"
        print(f"  cost {row['name']}: {row['voxels']} voxels, {row['step_s']:.2f} s/step, saved "
              f"{row['saved_mb']:.1f} MB float + {row['saved_index_mb']:.1f} MB index", flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Part 2: transfer with the engine

def zero_shot(base_path: Path, common: list[str], out_dir: Path, device: str) -> dict:
    """The base mapped onto the target before any step (new dataset: mean prompt, mean BN;
    S3DIS class names embedded): the reference every stage starts from."""
    from ppt.config import load_config
    from ppt.engine.build import build_model, build_val_datasets
    from ppt.engine.evaluate import evaluate
    from ppt.models.peft.checkpoint import peft_run_overrides, prepare_peft_model

    result_file = out_dir / "zero_shot.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cfg = load_config("configs/peft_linear.yaml", peft_run_overrides("linear", base_path) + common
                      + [f"data.mix={{{TARGET}: 1}}", "data.val=[]"])
    model = build_model(cfg, None)
    prepare_peft_model(model, cfg, out_dir / "zero_shot", device)
    res = evaluate(model.to(device).eval(), build_val_datasets(cfg)[TARGET], device,
                   voxel_size=cfg.data.voxel_size, amp_dtype=None, num_workers=1)
    row = {"stage": "base, 0 steps", "val_mIoU": res["mIoU"], "val_mAcc": res.get("mAcc"), "steps": 0}
    result_file.write_text(json.dumps(row))
    print(f"  transfer zero-shot: val mIoU {row['val_mIoU']:.4f}", flush=True)
    return row


def run_transfer(settings: dict, root: str, out_dir: Path, device: str) -> tuple[dict, list[dict]]:
    import torch

    from ppt.config import load_config
    from ppt.engine.build import build_model
    from ppt.engine.trainer import train
    from ppt.models.peft.checkpoint import peft_run_overrides, prepare_peft_model
    from ppt.models.peft.stages import parameter_counts

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
    base = {"mix": BASE_MIX, "steps": settings["base_steps"], "seconds": base_s, "widths": settings["widths_transfer"]}
    rows = [zero_shot(base_path, common, out_dir, device)]
    for stage in STAGES:
        exp = out_dir / stage
        result_file = exp / "result.json"
        if result_file.is_file():
            rows.append(json.loads(result_file.read_text()))
            continue
        overrides = peft_run_overrides(stage, base_path) + common + [
            f"data.mix={{{TARGET}: 1}}", "data.val=[]", f"train.steps_per_epoch={settings['stage_steps']}",
            "train.eval_every=1"]
        cfg = load_config(f"configs/peft_{stage}.yaml", overrides)
        if exp.exists():  # an interrupted run: start it again
            import shutil

            shutil.rmtree(exp)
        tic = time.perf_counter()
        summary = train(cfg, exp)
        seconds = time.perf_counter() - tic
        model = build_model(cfg, None)
        prepare_peft_model(model, cfg, exp, device)
        trainable, total = parameter_counts(model)
        ckpt = exp / "model" / "model_last.pth"
        row = {"stage": stage, "val_mIoU": summary["val"][TARGET]["mIoU"],
               "val_mAcc": summary["val"][TARGET].get("mAcc"), "steps": summary["steps"],
               "seconds": seconds, "trainable": trainable, "total": total,
               "trainable_pct": 100.0 * trainable / total, "checkpoint_mb": ckpt.stat().st_size / 2**20,
               "lr": cfg.optim.lr, "optimizer": cfg.optim.name}
        result_file.write_text(json.dumps(row))
        rows.append(row)
        print(f"  transfer {stage}: val mIoU {row['val_mIoU']:.4f} ({seconds:.0f} s)", flush=True)
        del model
        torch.set_num_threads(torch.get_num_threads())
    return base, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-transfer", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--out", default="exp/bench_peft", help="experiment folders of the transfer runs")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--device", default="cpu")
    p.add_argument("--base-steps", type=int, default=None, help="override the base model's training steps")
    p.add_argument("--stage-steps", type=int, default=None, help="override the steps of every stage")
    p.add_argument("--name", default=None, help="results file name (default peft.json / peft_quick.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tricks", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--widths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--voxel", type=float, default=0.04, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        row = cost_worker(args.worker, bool(args.tricks), json.loads(args.widths), args.voxel,
                          args.repeats, args.data_root, args.device)
        print(json.dumps(row))
        return 0
    if not Path(args.data_root, TARGET).is_dir():
        print(f"error: {args.data_root}/{TARGET} missing; make it with "
              f"python tools/make_synthetic.py --out {args.data_root}", file=sys.stderr)
        return 2
    settings = dict(QUICK if args.quick else FULL, quick=args.quick)
    settings["widths_transfer"] = QUICK["widths"] if args.quick else SMALL_WIDTHS
    for key in ("base_steps", "stage_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out_dir = Path(args.out + ("_quick" if args.quick else ""))
    result = {"machine": machine_info(), "settings": settings, "quick": args.quick}
    tic = time.perf_counter()
    if not args.skip_cost:
        print("cost per stage (fresh process each):", flush=True)
        result["cost"] = run_cost(settings, args.data_root, args.device)
        print(format_table(result["cost"], ["name", "trainable", "trainable_pct", "saved_mb", "saved_index_mb",
                                            "peak_rss_mb", "rss_rise_mb", "step_s"],
                           ["stage", "trainable", "% of total", "saved float MB", "saved index MB",
                            "peak RSS MB", "RSS rise MB", "step s"]))
    if not args.skip_transfer:
        print(f"transfer {BASE_MIX} -> {TARGET}:", flush=True)
        result["base"], result["transfer"] = run_transfer(settings, args.data_root, out_dir, args.device)
        print(format_table(result["transfer"], ["stage", "trainable", "trainable_pct", "val_mIoU", "val_mAcc",
                                                "seconds", "checkpoint_mb"],
                           ["stage", "trainable", "% of total", "val mIoU", "val mAcc", "train+eval s",
                            "checkpoint MB"]))
    result["seconds" if not (args.skip_cost or args.skip_transfer) else "seconds_partial_rerun"] = \
        time.perf_counter() - tic
    name = args.name or ("peft_quick.json" if args.quick else "peft.json")
    previous = Path(args.results) / name
    if previous.is_file():  # a partial rerun (--skip-cost / --skip-transfer) keeps the other part
        result = {**json.loads(previous.read_text()), **result}
    path = save_json(result, previous)
    print(f"wrote {path} ({time.perf_counter() - tic:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
