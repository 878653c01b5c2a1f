"""Which category-alignment head on real scans: union / decoupled / language, at equal steps.

    python bench/real_scans.py --snapshot <votenet git dir> --out data/real     # once
    python bench/heads_real.py [--data data/real] [--synthetic data/synthetic] [--seeds 0,1,2]
        [--rows alone_decoupled,alone_language,...] [--steps-alone 150] [--steps-joint 240]
    python bench/heads_real.py --report-only

Setups (``configs/cpu_scannet.yaml``: demo widths, 5 cm, AdamW OneCycle, CE + Lovász, precise BN):
- ``alone``: the real ScanNet scenes only (no prompt). Union and decoupled are the same head
  for one dataset (one linear layer over its classes), so ``alone_decoupled`` stands for both.
- ``joint``: the real ScanNet scenes with the synthetic Structured3D and S3DIS domains (the demo's
  data; its synthetic ScanNet-like domain is left out: same name), mixed 1 : 1 : 1 (equal steps per
  domain), PDNorm (prompt length 64), as PPT trains.
Rows change ONE thing against ``<setup>_language`` (the shipped head: MiniLM text, "a point of
{}", fixed logit scale 100): the head (union / decoupled), the logit scale (fixed 20, or learnt
from 100: ``model.logit_scale_learnable``), the template ("{}") or the text embeddings (seeded
random unit vectors instead of MiniLM's: ``language_random``, a bench-only probe). Every run is evaluated three
times (after each third of its steps, same OneCycle run: a curve over steps, not three
converged runs) on every val scene of each dataset; score: val mIoU over the classes present.

Each finished run writes ``<out>/<row>_s<seed>.json`` (skipped next time: the study resumes).
Results: ``bench/results/heads_real.json`` and a markdown table (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import zlib
from contextlib import contextmanager, nullcontext
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import format_table, fresh_run, machine_info, save_json, unknown_names  # noqa: E402

SETUPS = {
    "alone": {"mix": "{scannet: 1}", "overrides": ["model.prompt=none"]},
    "joint": {"mix": "{scannet: 1, structured3d: 1, s3dis: 1}",
              "overrides": ["model.prompt=pdnorm", "model.prompt_dim=64", "train.best_on=scannet"]},
}
VARIANTS = {  # what a row changes against the shipped language head
    "union": ["model.head=union"],
    "decoupled": ["model.head=decoupled"],
    "language": ["model.head=language"],
    "language_s20": ["model.head=language", "model.logit_scale=20"],
    "language_learnt": ["model.head=language", "model.logit_scale_learnable=true"],
    "language_bare": ["model.head=language", "model.template='{}'"],
    "language_random": ["model.head=language"],  # + RANDOM_TEXT: the text encoder's geometry taken out
}
# Variants whose class embeddings are fixed random unit vectors (one per class name, seeded by
# the name; off-diagonal cosines ~0.05) instead of MiniLM's (ScanNet's 20 names with "a point of
# {}": mean off-diagonal cosine 0.46, max 0.84): same head, same scale, no text geometry.
RANDOM_TEXT = {"language_random"}
ROWS = [f"{s}_{v}" for s in SETUPS for v in VARIANTS if not (s == "alone" and v == "union")]
DEFAULT_ROWS = ["alone_decoupled", "alone_language", "joint_union", "joint_decoupled", "joint_language"]
QUICK = ["model.channels=[8, 8, 16, 16, 16, 16, 8, 8]", "data.num_workers=0", "train.precise_bn=2"]


def joint_root(real: Path, synthetic: Path, out: Path) -> Path:
    """A data root of symlinks: real ``scannet``, synthetic ``structured3d`` and ``s3dis``."""
    root = out / "joint_root"
    root.mkdir(parents=True, exist_ok=True)
    for name, src in (("scannet", real), ("structured3d", synthetic), ("s3dis", synthetic)):
        link = root / name
        if not link.exists():
            os.symlink((src / name).resolve(), link)
    return root


def config(row: str, seed: int, steps: int, root: Path, quick: bool):
    from ppt.config import load_config

    setup, variant = row.split("_", 1)
    per_eval = max(1, steps // 3)
    overrides = [f"data.root={str(root)!r}", f"data.mix={SETUPS[setup]['mix']}", "train.epochs=3",
                 "data.loop=1000", f"train.steps_per_epoch={per_eval}", "train.eval_every=1", "train.log_every=30",
                 f"train.seed={seed}", *SETUPS[setup]["overrides"], *VARIANTS[variant], *(QUICK if quick else [])]
    return load_config(REPO / "configs" / "cpu_scannet.yaml", overrides)


def curve(log: Path) -> list[dict]:
    """The val mIoU of each dataset at each evaluation, from train.log."""
    points: dict[int, dict] = {}
    for line in log.read_text().splitlines():
        if "] val " in line and " epoch " in line and ": mIoU " in line:
            dataset = line.split("] val ")[1].split()[0]
            epoch = int(line.split(" epoch ")[1].split(":")[0])
            points.setdefault(epoch, {})[dataset] = float(line.split(": mIoU ")[1].split()[0])
    return [{"epoch": e, **points[e]} for e in sorted(points)]


@contextmanager
def random_text_embeddings(dim: int = 384):
    """``ppt.text.class_embeddings`` (what ``build_model`` calls) returns seeded random unit
    vectors of width ``dim`` while the block runs."""
    import torch

    import ppt.text as text

    def fake(class_names, *args, **kwargs):
        rows = [torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))) for n in class_names]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    real = text.class_embeddings
    text.class_embeddings = fake
    try:
        yield
    finally:
        text.class_embeddings = real


def run(row: str, seed: int, args) -> dict:
    setup = row.split("_", 1)[0]
    steps = args.steps_alone if setup == "alone" else args.steps_joint
    root = Path(args.data) if setup == "alone" else joint_root(Path(args.data), Path(args.synthetic), Path(args.out))
    run_dir = Path(args.out) / f"{row}_s{seed}_run"
    with random_text_embeddings() if row.split("_", 1)[1] in RANDOM_TEXT else nullcontext():
        summary, seconds = fresh_run(config(row, seed, steps, root, args.quick), run_dir)
    points = curve(run_dir / "train.log")
    return {"row": row, "seed": seed, "steps": summary["steps"], "seconds": seconds, "load_after": os.getloadavg(),
            "val": {d: r["mIoU"] for d, r in summary["val"].items()}, "curve": points}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.mean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def report(out: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*_s[0-9]*.json"))]
    rows = []
    for row in ROWS:
        rs = [r for r in runs if r["row"] == row]
        if not rs:
            continue
        datasets = list(rs[0]["val"])
        line = {"row": row, "seeds": len(rs), "steps": rs[0]["steps"],
                "seconds": f"{statistics.mean(r['seconds'] for r in rs):.0f}"}
        for d in ("scannet", "structured3d", "s3dis"):
            line[d] = mean_std([r["val"][d] for r in rs]) if d in datasets else "-"
            # the curve: ScanNet val mIoU after each third of the run, mean over seeds
        line["curve"] = " / ".join(f"{100 * statistics.mean(r['curve'][i]['scannet'] for r in rs):.1f}"
                                   for i in range(min(len(r["curve"]) for r in rs)))
        rows.append(line)
    text = format_table(rows, ["row", "seeds", "steps", "seconds", "scannet", "structured3d", "s3dis", "curve"],
                        ["row", "seeds", "steps", "s per run", "real ScanNet val mIoU", "synthetic Structured3D",
                         "synthetic S3DIS", "ScanNet after 1/3, 2/3, 3/3"])
    print(text)
    return {"runs": runs, "markdown": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/real", help="data root with the real scannet/{train,val}")
    p.add_argument("--synthetic", default="data/synthetic", help="synthetic data root (tools/train.sh makes it)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated, of " + ", ".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps-alone", type=int, default=150)
    p.add_argument("--steps-joint", type=int, default=240)
    p.add_argument("--out", default="exp/heads_real")
    p.add_argument("--results", default=str(REPO / "bench" / "results" / "heads_real.json"))
    p.add_argument("--quick", action="store_true", help="tiny widths (smoke test)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    bad = unknown_names("--rows", rows, ROWS)
    if bad:
        print(bad, file=sys.stderr)
        return 2
    for flag, path, what in (("--data", Path(args.data) / "scannet" / "train", "bench/real_scans.py"),
                             ("--synthetic", Path(args.synthetic) / "s3dis", "tools/make_synthetic.py")):
        if not args.report_only and not path.is_dir():
            print(f"error: {flag}: no {path} (make it with {what})", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):  # seed by seed: a stopped study has whole seeds
            for row in rows:
                path = out / f"{row}_s{seed}.json"
                if path.is_file():
                    continue
                r = run(row, seed, args)
                save_json(r, path)
                print(f"{row} seed {seed}: " + " ".join(f"{d} {100 * v:.1f}" for d, v in r["val"].items())
                      + f" ({r['seconds']:.0f} s)", flush=True)
    result = {**report(out), "machine": machine_info()}
    save_json(result, args.results)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
