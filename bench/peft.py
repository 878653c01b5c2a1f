"""PEFT stages side by side: training memory, trainable share, step time, transfer mIoU.

    python bench/peft.py --skip-transfer # part 1 only: the memory table of bench/RESULTS.md
    python bench/peft.py                 # both parts (the transfer study is long on a CPU)
    python bench/peft.py --quick         # smoke test: tiny widths, 2-3 steps, one seed, one cost process
    python bench/peft.py --skip-transfer --backbone ptv3   # the PTv3 cost table
    python bench/peft.py --skip-transfer --stages dapt --peft-options '{"ssf": true}' --name peft_ssf.json
                                         # stage rows with other peft.* settings (DAPT's SSF here)

PTv3 (``--backbone ptv3``; cost part only): every stage (full, linear, decoder, bitfit, lora,
dapt, pointpeft) on a PTv3 with PDNorm / PDLayerNorm and the language head, the same batch and
the same measurements, no glibc-mmap RSS rerun. ``--ptv3-size``: ``paper`` (PTv3's default
widths, about 46 M parameters, the paper size), ``half`` (every width halved: what a CPU
measures in reasonable time) or ``tiny``; the trainable share at the paper size is
always reported too (``trainable_pct_paper``: parameters only, no forward).

Part 1, memory (same batch for every row, one fresh subprocess per row so peak RSS is the row's
own; ``--threads`` torch threads, default 1): the default SpUNet widths (about 39 M parameters),
PDNorm + language head, one batch of two synthetic S3DIS rooms. Per row:
- trainable parameters, as a share of the total and of the total without the PDNorm
  modulation weights (frozen in every stage but `full`; for a fixed dataset they fold into the
  norms, so they inflate the denominator);
- held after forward: memory allocated during the forward and still held when it ends
  (everything autograd keeps for backward, rulebooks, outputs);
- peak allocated: what is allocated at every step's start (weights, buffers, optimiser state,
  the batch) plus the peak allocated above it during one step (forward, backward, AdamW). Every
  torch allocation counts, whatever the allocator does with freed memory: on CPU from the
  profiler's allocation events, on CUDA ``torch.cuda.max_memory_allocated``. This is the
  figure a GPU run would see, and the goal's measure;
- the worker's peak RSS (glibc defaults) and its rise over the RSS before the first step; for the
  five stage rows also the peak RSS with glibc's mmap threshold fixed at 1 MiB (``MMAP_ENV``),
  where RSS follows live memory instead of glibc's heap high-water mark; each as a share of
  full fine-tuning's. Peak RSS includes about 0.9 GB of interpreter, libraries and data;
- step time, wall and CPU (forward + backward + AdamW; median over ``repeats`` steps after one
  warm-up step; with one thread the CPU time is what the step costs on an idle core).
Ablation rows (not with --quick) rerun DAPT / Point-PEFT with one memory setting changed:
DAPT training the norm affines (its behaviour before the backbone was frozen whole), without
block recomputation, and with every memory setting off (no input-grad-only convs, no frozen-norm
scale-and-shift, no block recomputation, no no-grad prefix).

Part 2, transfer (``bench/peft_transfer.py``; the engine's ``train()``, as ``tools/train.sh --peft`` runs it): a PPT model
(PDNorm, language head, small widths) trained on synthetic Structured3D + ScanNet, then each
stage adapts it to synthetic S3DIS (13 classes, 5 never in the base's label sets: ceiling is in
Structured3D's but beam, column, board, bookcase and clutter are new) for the same number of
steps, with ONE optimiser setting for every stage (AdamW, same lr, weight decay and schedule, as
the DAPT reference fine-tunes both full and DAPT) and 3 seeds (model init of the new modules,
data order, augmentation); val mIoU on S3DIS Area_5 (every original point, no TTA), mean and
standard deviation over the seeds.

Results: printed tables and ``bench/results/peft.json`` (a partial rerun with --skip-cost or
--skip-transfer keeps the other part of an existing file).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The script's own folder (bench/) is sys.path[0]; there this file is "peft" and shadows the
# `peft` package that sentence-transformers (the offline text encoder) probes for: drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, format_table, machine_info, save_json  # noqa: E402
from bench.peft_transfer import BASE_MIX, SEEDS, TARGET, run_transfer  # noqa: E402

# cost rows: (row name, stage, memory settings that differ from the stage's defaults)
ABLATIONS = (
    ("dapt, norms train (before)", "dapt", {"train_norms": True}),
    ("dapt, no block recompute", "dapt", {"recompute_blocks": False}),
    ("pointpeft, no block recompute", "pointpeft", {"recompute_blocks": False}),
    ("dapt, memory settings off", "dapt", {"tricks": False}),
    ("pointpeft, memory settings off", "pointpeft", {"tricks": False}),
)
DEFAULT_WIDTHS = [32, 64, 128, 256, 256, 128, 96, 96]
SMALL_WIDTHS = [16, 32, 48, 64, 64, 48, 32, 32]
# glibc raises its mmap threshold (up to 32 MiB) after the first large free, so later tensors of
# a few to 32 MiB come from the heap, whose freed holes stay resident; fixing the threshold makes
# every tensor above 1 MiB its own mapping, returned on free, and RSS follows live memory
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

FULL = dict(widths=DEFAULT_WIDTHS, cost_voxel=0.05, repeats=2, base_steps=50, stage_steps=30,
            batch_size=4, voxel=0.08, seeds=list(SEEDS))
QUICK = dict(widths=[8, 16, 16, 32, 32, 16, 16, 16], cost_voxel=0.2, repeats=1, base_steps=3,
             stage_steps=2, batch_size=2, voxel=0.12, seeds=[0])
COST_STAGES = ("full", "linear", "decoder", "bitfit", "lora", "dapt", "pointpeft")  # both backbones
PTV3_ABLATIONS = (("dapt, no block recompute", "dapt", {"recompute_blocks": False}),
                  ("pointpeft, no block recompute", "pointpeft", {"recompute_blocks": False}))
_PTV3_PAPER = dict(enc_channels=[32, 64, 128, 256, 512], dec_channels=[64, 64, 128, 256])
PTV3_SIZES = {  # ptv3 kwargs on top of PointTransformerV3's defaults (paper: the defaults)
    "paper": {},
    "half": {k: [c // 2 for c in v] for k, v in _PTV3_PAPER.items()},
    "tiny": dict(enc_depths=[1, 1, 1, 1, 1], enc_channels=[8, 16, 16, 32, 32], enc_heads=[1, 2, 2, 4, 4],
                 dec_depths=[1, 1, 1, 1], dec_channels=[16, 16, 16, 32], dec_heads=[2, 2, 2, 4]),
}


def ptv3_model(size: str, names: dict, text: dict, device: str):
    from ppt.models.segmentor import Segmentor

    return Segmentor(names, backbone=dict(PTV3_SIZES[size]), backbone_type="ptv3", prompt="pdnorm",
                     prompt_dim=256, head="language", text_embeddings=text).to(device)


def peft_options(settings: dict) -> dict:
    """The ``peft.*`` config fields among a row's settings (``--peft-options``)."""
    import dataclasses

    from ppt.config import PeftConfig

    return {k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(PeftConfig)}}


def paper_trainable_pct(stage: str, names: dict, text: dict, options: dict | None = None) -> float:
    """Trainable share of PTv3 at the paper size (parameter count only, no forward; the
    memory bank's width is all Point-PEFT's modules need)."""
    import torch

    from ppt.config import PeftConfig
    from ppt.models.peft.memory_bank import MemoryBank
    from ppt.models.peft.stages import apply_stage, parameter_counts

    model = ptv3_model("paper", names, text, "cpu")
    bank = MemoryBank(torch.randn(4, 512), [f"s{i}" for i in range(4)]) if stage == "pointpeft" else None
    apply_stage(model, PeftConfig(stage=stage, base="-", **(options or {})), bank, domain=TARGET)
    trainable, total = parameter_counts(model)
    return 100.0 * trainable / total


# --------------------------------------------------------------------------------------------
# Part 1: memory worker (runs in its own process)

def modulation_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters of PDNorm's / PDLayerNorm's prompt modulations
    (Linear(prompt_dim -> 2C) per norm)."""
    from ppt.models.prompts import PDLayerNorm, PDNorm

    params = [p for m in model.modules() if isinstance(m, (PDNorm, PDLayerNorm)) and m.modulation is not None
              for p in m.modulation.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def profiled_step(forward, backward, device: str) -> tuple[float, float]:
    """Run one training step (``forward()`` returns what ``backward(out)`` consumes); returns
    (MiB allocated during the forward and still held at its end, peak MiB allocated during the
    step above its start). CPU: the profiler's allocation events (every torch allocation,
    allocator-independent); CUDA: ``torch.cuda`` memory statistics."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = forward()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        backward(out)
        torch.cuda.synchronize()
        return held / 2**20, (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("peft_bench_forward"):
            out = forward()
        backward(out)
    events = prof.profiler.kineto_results.events()
    fwd_end = max(e.end_ns() for e in events if e.name() == "peft_bench_forward")
    live = peak = held = 0
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if start <= fwd_end:
            held += nbytes
        live += nbytes
        peak = max(peak, live)
    return held / 2**20, peak / 2**20


def training_step(model, batch: dict):
    """(AdamW over the trainable parameters, forward() -> loss, backward(loss): backward + step):
    one training step split where :func:`profiled_step` measures."""
    import torch

    from ppt.losses import segmentation_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def forward():
        return segmentation_loss(model(batch), batch["segment"])

    def backward(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return opt, forward, backward


def tensor_mb(tensors) -> float:
    """MiB of the distinct storages among `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def cost_worker(stage: str, settings: dict, widths: list[int], voxel: float, repeats: int,
                root: str, device: str, threads: int, backbone: str = "spunet", ptv3_size: str = "paper") -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from bench.common import current_rss_mb, cuda_peak_mb, reset_cuda_peak
    from ppt.config import PeftConfig
    from ppt.data.dataset_file import get_dataset_info
    from ppt.data.collate import collate
    from ppt.data.datasets import build_dataset
    from ppt.data.transforms import build_transforms
    from ppt.models.peft.memory_bank import build_memory_bank
    from ppt.models.peft.stages import apply_stage, parameter_counts
    from ppt.models.segmentor import Segmentor

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    names = get_dataset_info(TARGET).class_names
    g = torch.Generator().manual_seed(0)
    text = {TARGET: F.normalize(torch.randn(len(names), 384, generator=g), dim=-1)}
    if backbone == "ptv3":
        model = ptv3_model(ptv3_size, {TARGET: names}, text, device)
    else:
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
    tricks = settings.get("tricks", True)
    options = {k: v for k, v in peft_options(settings).items() if k not in ("train_norms", "recompute_blocks")}
    cfg = PeftConfig(stage=stage, base="-", input_grad_only=tricks, no_grad_prefix=tricks, **options)
    apply_stage(model, cfg, bank, domain=TARGET, train_norms=settings.get("train_norms"),
                recompute_blocks=settings.get("recompute_blocks"))
    model.train()
    trainable, total = parameter_counts(model)
    modulation_trainable, modulation = modulation_parameters(model)
    opt, forward, backward = training_step(model, batch)
    rss_before = current_rss_mb()
    reset_cuda_peak(device)
    backward(forward())  # warm-up step (spconv builds its tables, AdamW its state)
    times, cpu_times = [], []
    for _ in range(max(1, repeats)):
        start, start_cpu = time.perf_counter(), time.process_time()
        backward(forward())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the profiled step
    cuda_peak = cuda_peak_mb(device)
    # what is allocated at the start of every step: weights, buffers (memory bank, text
    # embeddings, BN statistics), optimiser state, the batch
    state = [t for group in opt.state.values() for t in group.values() if torch.is_tensor(t)]
    static = tensor_mb([*model.parameters(), *model.buffers(), *state,
                        *(v for v in batch.values() if torch.is_tensor(v))])
    held, step_peak = profiled_step(forward, backward, device)
    paper_pct = paper_trainable_pct(stage, {TARGET: names}, text, options) if backbone == "ptv3" else None
    return {"stage": stage, "settings": settings, "backbone": backbone, "voxels": int(len(batch["segment"])),
            "ptv3_size": ptv3_size if backbone == "ptv3" else None, "trainable_pct_paper": paper_pct,
            "trainable": trainable, "total": total, "modulation": modulation,
            "trainable_pct": 100.0 * trainable / total,
            "trainable_pct_no_mod": 100.0 * (trainable - modulation_trainable) / (total - modulation),
            "static_mb": static, "held_mb": held, "step_peak_mb": step_peak,
            "peak_alloc_mb": static + step_peak, "peak_rss_mb": peak, "rss_rise_mb": peak - rss_before,
            "cuda_peak_mb": cuda_peak, "step_s": statistics.median(times),
            "step_cpu_s": statistics.median(cpu_times), "threads": threads}


def run_worker(name: str, stage: str, variant: dict, settings: dict, root: str, device: str,
               threads: int, env: dict | None = None) -> dict | list[dict]:
    """One fresh process measures ``stage`` (a comma-separated list: each in turn, one row each,
    for --quick, where a process per row would cost more than the rows: RSS is then shared)."""
    cmd = [sys.executable, "-W", "ignore", __file__, "--worker", stage,
           "--backbone", settings.get("backbone", "spunet"), "--ptv3-size", settings.get("ptv3_size", "paper"),
           "--variant", json.dumps(variant), "--widths", json.dumps(settings["widths"]),
           "--voxel", str(settings["cost_voxel"]), "--repeats", str(settings["repeats"]),
           "--data-root", root, "--device", device, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"cost worker {name} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    return rows if "," in stage else rows[-1]


def run_cost(settings: dict, root: str, device: str, threads: int) -> list[dict]:
    ptv3 = settings.get("backbone") == "ptv3"
    stages, ablations = COST_STAGES, (PTV3_ABLATIONS if ptv3 else ABLATIONS)
    if settings.get("stages"):  # a chosen subset (full always: the ratios are to it), no ablations
        stages, ablations = ("full", *(s for s in settings["stages"] if s != "full")), ()
    options = settings.get("peft_options") or {}
    suffix = "".join(f", {k} {v}" for k, v in options.items())
    jobs = [(s + suffix * (s != "full"), s, options if s != "full" else {}) for s in stages]
    jobs += [] if settings.get("quick") else list(ablations)
    rows = []
    if settings.get("quick") and not options:  # smoke: every stage in one process
        batch = run_worker("quick", ",".join(s for _, s, _ in jobs), {}, settings, root, device, threads)
        jobs = [(name, stage, variant, row) for (name, stage, variant), row in zip(jobs, batch)]
    for name, stage, variant, *measured in jobs:
        row = measured[0] if measured else run_worker(name, stage, variant, settings, root, device, threads)
        row["name"] = name
        if device == "cpu" and not variant and not settings.get("quick") and not ptv3:  # again, glibc's mmap threshold fixed
            again = run_worker(name, stage, variant, settings, root, device, threads, MMAP_ENV)
            row["peak_rss_mmap_mb"] = again["peak_rss_mb"]
        print(f"  cost {name}: {row['voxels']} voxels, {row['step_s']:.2f} s/step, held after forward "
              f"{row['held_mb']:.0f} MB, peak allocated {row['peak_alloc_mb']:.0f} MB, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        rows.append(row)
    full = next(r for r in rows if r["stage"] == "full")
    for row in rows:
        for key in ("peak_alloc_mb", "peak_rss_mb", "peak_rss_mmap_mb", "cuda_peak_mb"):
            if row.get(key) is not None:
                row[key.replace("_mb", "_vs_full")] = row[key] / full[key]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-transfer", action="store_true", help="memory part only")
    p.add_argument("--skip-cost", action="store_true", help="transfer part only")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--out", default="exp/bench_peft", help="experiment folders of the transfer runs")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each memory worker")
    p.add_argument("--backbone", default="spunet", choices=("spunet", "ptv3"),
                   help="cost table of this backbone (ptv3: cost part only)")
    p.add_argument("--ptv3-size", default="paper", choices=tuple(PTV3_SIZES),
                   help="PTv3 widths of the cost rows (paper = defaults, 46 M parameters)")
    p.add_argument("--base-steps", type=int, default=None, help="override the base model's training steps")
    p.add_argument("--stage-steps", type=int, default=None, help="override the steps of every stage")
    p.add_argument("--name", default=None, help="results file name (default peft.json / peft_quick.json)")
    p.add_argument("--stages", default="", help="cost rows of these stages only (and full), e.g. decoder,lora")
    p.add_argument("--peft-options", default="{}",
                   help='peft.* settings of the stage rows (not full), JSON, e.g. \'{"ssf": true}\'')
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--widths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--voxel", type=float, default=0.04, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        for stage in args.worker.split(","):
            row = cost_worker(stage, json.loads(args.variant), json.loads(args.widths), args.voxel,
                              args.repeats, args.data_root, args.device, args.threads, args.backbone, args.ptv3_size)
            print(json.dumps(row), flush=True)
        return 0
    if not Path(args.data_root, TARGET).is_dir():
        print(f"error: {args.data_root}/{TARGET} missing; make it with "
              f"python tools/make_synthetic.py --out {args.data_root}", file=sys.stderr)
        return 2
    settings = dict(QUICK if args.quick else FULL, quick=args.quick, backbone=args.backbone,
                    ptv3_size=args.ptv3_size, stages=[s for s in args.stages.split(",") if s],
                    peft_options=json.loads(args.peft_options))
    bad = set(settings["peft_options"]) - set(peft_options(settings["peft_options"]))
    if bad:
        print(f"error: --peft-options: {', '.join(sorted(bad))} not peft.* settings", file=sys.stderr)
        return 2
    unknown = [s for s in settings["stages"] if s not in COST_STAGES]
    if unknown:
        print(f"error: --stages: unknown {', '.join(unknown)}; valid: {', '.join(COST_STAGES)}", file=sys.stderr)
        return 2
    if args.backbone == "ptv3" and not args.skip_transfer:
        print("error: --backbone ptv3 measures the cost part only; add --skip-transfer", file=sys.stderr)
        return 2
    settings["widths_transfer"] = QUICK["widths"] if args.quick else SMALL_WIDTHS
    for key in ("base_steps", "stage_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out_dir = Path(args.out + ("_quick" if args.quick else ""))
    result = {"machine": machine_info(), "settings": settings, "quick": args.quick}
    tic = time.perf_counter()
    if not args.skip_cost:
        print(f"training memory per stage (fresh process each, {args.threads} thread(s)):", flush=True)
        result["cost"] = run_cost(settings, args.data_root, args.device, args.threads)
        ptv3 = args.backbone == "ptv3"
        print(format_table(result["cost"], ["name", "trainable", "trainable_pct", "trainable_pct_no_mod",
                                            *(["trainable_pct_paper"] if ptv3 else []),
                                            "held_mb", "peak_alloc_mb", "peak_alloc_vs_full", "peak_rss_mb",
                                            "peak_rss_vs_full", "peak_rss_mmap_mb", "peak_rss_mmap_vs_full",
                                            "step_s", "step_cpu_s"],
                           ["stage", "trainable", "% of total", "% of total w/o modulation",
                            *(["% at paper size (46 M)"] if ptv3 else []),
                            "held after forward MB", "peak allocated MB", "/ full", "peak RSS MB", "/ full",
                            "peak RSS, mmap 1 MiB", "/ full", "step s", "step CPU s"]))
    if not args.skip_transfer:
        print(f"transfer {BASE_MIX} -> {TARGET}, seeds {settings['seeds']}:", flush=True)
        result["base"], result["transfer"], result["transfer_runs"] = run_transfer(
            settings, args.data_root, out_dir, args.device)
        print(format_table(result["transfer"], ["stage", "trainable", "trainable_pct", "val_mIoU", "val_mIoU_std",
                                                "seconds", "checkpoint_mb"],
                           ["stage", "trainable", "% of total", "val mIoU (mean)", "std over seeds",
                            "train+eval s", "checkpoint MB"]))
    result["seconds" if not (args.skip_cost or args.skip_transfer) else "seconds_partial_rerun"] = \
        time.perf_counter() - tic
    name = args.name or ((f"peft_ptv3_{args.ptv3_size}" if args.backbone == "ptv3" else "peft")
                         + ("_quick.json" if args.quick else ".json"))
    previous = Path(args.results) / name
    if previous.is_file():  # a partial rerun (--skip-cost / --skip-transfer) keeps the other part
        kept = ("base", "transfer", "transfer_runs") if args.skip_transfer else ("cost",)
        old = json.loads(previous.read_text())
        result = {**{k: old[k] for k in kept if k in old}, **result}  # never the old run's notes
    path = save_json(result, previous)
    print(f"wrote {path} ({time.perf_counter() - tic:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
