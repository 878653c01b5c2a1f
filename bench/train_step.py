"""Training-step time and peak memory of SpUNet / PTv3, plain and with PDNorm + each head.

    python bench/train_step.py                      # CPU default plan (SpUNet + PTv3; ~30 min)
    python bench/train_step.py --models spunet pdnorm_language ptv3 ptv3_pdnorm_language \
        --sizes 50000 100000                        # SpUNet next to PTv3 (the paper's 46.2 M)
    python bench/train_step.py --full-grid          # every model x size, 1 warm-up + 3 repeats
    python bench/train_step.py --device cuda        # + fp32 / fp16 / bf16 autocast, full grid
    python bench/train_step.py --quick              # smoke: tiny model, 4k points
    python bench/train_step.py --forward-only ...   # inference: eval-mode forward, no grad

One step = ``ppt.engine.trainer.train_step`` (the trainer's own step: zero_grad, forward under
autocast, loss, backward, gradient norm, optimiser step; fp16 with a GradScaler, as in
training) on a batch of 2 synthetic ScanNet-style rooms grid-sampled at 2 cm and cropped to
50k / 100k / 200k points in all. Models are randomly initialised; the language head uses
random 512-d class embeddings (CLIP ViT-B/16 width). SGD as in the recipe.

Timing: ``warmup`` untimed steps, then the MEDIAN of ``repeats`` timed steps. Memory: each
row runs in a fresh child process, so CPU peak RSS (``ru_maxrss``) belongs to that row alone;
``base_rss_mb`` is the RSS after building model and batch, before the first step. On CUDA:
``torch.cuda.max_memory_allocated`` over the timed steps.

CPU default plan: a step of the 39 M model at 200k points takes tens of seconds on 2 cores,
so the bigger rows are timed ONCE after one warm-up step (``repeats`` column says how many);
sizes and repeats per row are listed in ``CPU_PLAN``. ``CPU s/step`` is the process CPU time of
the step: with the default single torch thread it is the step time on an idle core, which
stays meaningful when other processes share the machine (wall time then grows, CPU time not).
``--forward-only`` times inference instead: the model in eval mode, one forward of the same
batch under ``torch.no_grad`` (and autocast on CUDA), logits of every voxel; no optimiser.
Results: ``bench/results/train_step_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BENCH_MODELS, DEMO_CHANNELS, DEMO_LAYERS, RESULTS_DIR, build_bench_model, cuda_peak_mb, current_rss_mb,
    format_table, machine_info, peak_rss_mb, reset_cuda_peak, save_json, synthetic_batch, time_call,
)

SIZES = (50_000, 100_000, 200_000)
PRECISIONS = ("fp32", "fp16", "bf16")
# (model, points, warm-up, repeats): every model at 50k; the bigger batches for the plain
# network and the PPT default (PDNorm + language), timed with fewer repeats.
CPU_PLAN = [
    *[(m, 50_000, 1, 2) for m in BENCH_MODELS],
    *[(m, 100_000, 1, 1) for m in ("spunet", "pdnorm_language", "ptv3", "ptv3_pdnorm_language")],
    *[(m, 200_000, 1, 1) for m in ("spunet", "pdnorm_language", "ptv3", "ptv3_pdnorm_language")],
]


def measure_row(row: dict) -> dict:
    """Build model + batch and time ``row["repeats"]`` training steps (runs in a child)."""
    import torch

    from ppt.config import OptimConfig
    from ppt.engine.build import build_optimizer
    from ppt.engine.trainer import to_device, train_step

    if row["threads"] > 0:
        torch.set_num_threads(row["threads"])
    device = torch.device(row["device"])
    kwargs = {"channels": DEMO_CHANNELS, "layers": DEMO_LAYERS, "tiny": True} if row.get("tiny") else {}
    model = build_bench_model(row["model"], **kwargs).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    batch = to_device(synthetic_batch(row["points"], seed=row.get("seed", 0)), device)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[row["precision"]]
    if dtype is not None and device.type != "cuda":
        raise ValueError(f"precision {row['precision']} is measured on CUDA only")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    base_rss = current_rss_mb()
    reset_cuda_peak(row["device"])
    losses = []

    def step() -> None:
        out = train_step(model, batch, optimizer, scaler, dtype, grad_clip=0.0)
        losses.append(out["loss"])

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(batch)
        losses.append(float(logits.float().abs().mean()))

    if row.get("forward_only"):
        model.eval()
    timed = forward if row.get("forward_only") else step
    timing = time_call(timed, row["repeats"], row["warmup"], row["device"])
    n = len(batch["coord"])
    return {**row, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "actual_points": n, "step_s": round(timing["median_s"], 4), "times_s": timing["times_s"],
            "cpu_step_s": round(timing["cpu_median_s"], 4),
            "points_per_s": round(n / timing["median_s"]), "base_rss_mb": round(base_rss),
            "peak_rss_mb": round(peak_rss_mb()), "cuda_peak_mb": cuda_peak_mb(row["device"]),
            "finite_loss": all(map(lambda v: v == v and abs(v) != float("inf"), losses))}


def run_child(row: dict, timeout: float) -> dict:
    """``measure_row`` in a fresh interpreter (per-row peak memory); errors become a row."""
    cmd = [sys.executable, "-W", "ignore", __file__, "--_row", json.dumps(row)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def plan_rows(args: argparse.Namespace) -> list[dict]:
    common = {"device": args.device, "threads": args.threads, "forward_only": args.forward_only}
    if args.quick:
        return [{**common, "model": m, "points": 4_000, "warmup": 1, "repeats": 2, "precision": "fp32",
                 "tiny": True} for m in ("spunet", "pdnorm_language", "ptv3_pdnorm_language")]
    precisions = PRECISIONS if args.device == "cuda" else ("fp32",)
    if args.device == "cuda" or args.full_grid:
        w, r = (2, 10) if args.device == "cuda" else (1, 3)
        return [{**common, "model": m, "points": n, "warmup": w, "repeats": r, "precision": p}
                for n in args.sizes for m in args.models for p in precisions]
    return [{**common, "model": m, "points": n, "warmup": w, "repeats": r, "precision": "fp32"}
            for m, n, w, r in CPU_PLAN if m in args.models and n in args.sizes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(BENCH_MODELS))
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="points per batch (2 scenes)")
    p.add_argument("--full-grid", action="store_true", help="every model x size with 1 warm-up + 3 repeats")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch default); 1 by default: on a shared 2-core machine "
                        "a second OpenMP thread spin-waits and made a step 10-30x slower")
    p.add_argument("--quick", action="store_true", help="smoke test: demo-size model, 4k points")
    p.add_argument("--forward-only", action="store_true", help="inference: eval-mode forward without grad")
    p.add_argument("--timeout", type=float, default=900, help="seconds per row")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train_step_<device>.json)")
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._row is not None:
        print(json.dumps(measure_row(json.loads(args._row))), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device visible to torch")

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)  # so machine_info reports the rows' thread count
    start = time.time()
    rows = []
    for row in plan_rows(args):
        # --quick measures in this process: a fresh interpreter costs more than the row itself.
        result = measure_row(row) if args.quick else run_child(row, args.timeout)
        rows.append(result)
        shown = result.get("error") or f"{result['step_s']:.3f} s/step, peak RSS {result['peak_rss_mb']} MB"
        print(f"{row['model']:>16} {row['points']:>7} {row['precision']}: {shown}", flush=True)
    mem = "cuda_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    table = format_table(rows, ["model", "params_m", "points", "precision", "step_s", "cpu_step_s", "points_per_s",
                                mem, "warmup", "repeats", "error"],
                         ["model", "params (M)", "points", "precision", "step (s, median)", "CPU s/step",
                          "points/s",
                          "peak CUDA MB" if args.device == "cuda" else "peak RSS MB", "warm-up", "repeats",
                          "error"])
    print(table)
    summary = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]),
               "wall_s": round(time.time() - start, 1), "rows": rows, "markdown": table}
    out = Path(args.out) if args.out else RESULTS_DIR / f"train_step_{args.device}.json"
    save_json(summary, out)
    print(f"wrote {out} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
