"""A dataset none of the models has seen, with a label set of its own: trained alone, joined to the
synthetic mix (PPT vs naive), and adapted from the demo model with every PEFT stage.

    python bench/own_dataset.py [--base exp/demo/model/model_best.pth] [--rooms 30] [--steps 240]
        [--peft-steps 150] [--seeds 0,1,2] [--stages full,...] [--out bench/results/own_dataset] [--report]

1. Data, as a user brings it: ``tools/make_synthetic.py --labelled-ply`` writes ``--rooms`` office
   and meeting rooms as CloudCompare-style labelled PLY files (12 classes, among them ``swivel
   chair``, ``screen``, ``filing cabinet``, ``shelving``: names no built-in dataset has), seed 7
   (the demo's data used seed 0); ``tools/preprocess.py labelled`` imports them as dataset
   ``office`` into ``<out>/data``, beside links to the synthetic domains of ``--data``.
2. From scratch, ``--steps`` steps, the demo recipe (``configs/demo.yaml``: AdamW OneCycle,
   CE + Lovasz, precise BN), val = office: ``alone`` (office only), ``ppt`` (office joined to the
   three synthetic domains, ratios office 2 : structured3d 2 : scannet 1 : s3dis 1, PDNorm +
   language head) and ``naive`` (the same mix, no prompts, union head), at equal TOTAL steps (the
   joint runs give office a third of them) and, as ``ppt_3x`` / ``naive_3x``, at 3x the steps
   (office gets as many steps as alone): what the other domains add, at both budgets.
3. From the demo model (``--base``; it never saw office: the new domain starts from the mean
   prompt, its classes from their names), ``--peft-steps`` steps of each stage with ONE recipe
   (``configs/demo_peft.yaml``: AdamW 0.005 cosine, CE; only the stage differs).

Each run is cached in ``<out>/<run>/result.json`` (val mIoU on every point of office's val rooms,
CPU seconds of the run with its loader worker (one torch thread: robust to other work on the
machine), wall seconds, trainable share); ``<out>/own_dataset.json`` holds the table and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from bench.common import format_table, machine_info, save_json  # noqa: E402

NAME = "office"
STAGES = ("full", "linear", "decoder", "bitfit", "lora", "dapt", "pointpeft")
JOINT_MIX = {NAME: 2, "structured3d": 2, "scannet": 1, "s3dis": 1}
NAIVE = ["model.prompt=none", "model.head=union"]
# run -> (mix, overrides, steps as a multiple of --steps); the "_3x" runs give office as many
# steps as alone (it has 2 of every 6 batches of the joint mix)
SCRATCH = {"alone": ({NAME: 1}, [], 1), "ppt": (JOINT_MIX, [], 1), "naive": (JOINT_MIX, NAIVE, 1),
           "ppt_3x": (JOINT_MIX, [], 3), "naive_3x": (JOINT_MIX, NAIVE, 3)}


def make_data(src: Path, out: Path, rooms: int) -> Path:
    """``out/data``: the imported user dataset beside links to the synthetic domains."""
    root = out / "data"
    if (root / NAME / "dataset.yaml").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for domain in ("structured3d", "scannet", "s3dis"):
        if not (root / domain).exists():
            (root / domain).symlink_to((src / domain).resolve(), target_is_directory=True)
    ply = out / "ply"
    py = sys.executable
    for cmd in ([py, "tools/make_synthetic.py", "--labelled-ply", str(ply), "--scenes", str(rooms), "--seed", "7"],
                [py, "tools/preprocess.py", "labelled", "--src", str(ply), "--name", NAME, "--classes",
                 str(ply / "classes.txt"), "--out", str(root), "--no-progress"]):
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return root


def common(root: Path, steps: int, seed: int) -> list[str]:
    return [f"data.root={root}", f"data.val=[{NAME}]", "data.num_workers=1", "train.epochs=1",
            f"train.steps_per_epoch={steps}", "data.loop=100", "train.eval_every=1", f"train.best_on={NAME}",
            "train.device=cpu", "train.threads=1", "train.log_every=50", f"train.seed={seed}"]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader workers): with one torch
    thread, what the run costs on an idle core, robust to other work on the machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(name: str, cfg_fn, out: Path, report_only: bool) -> dict | None:
    """One cached training run: val mIoU on office, seconds, trainable share."""
    from ppt.engine.trainer import train

    exp = out / name
    if (exp / "result.json").is_file():
        return json.loads((exp / "result.json").read_text())
    if report_only:
        return None
    shutil.rmtree(exp, ignore_errors=True)
    cfg = cfg_fn()
    tic, cpu = time.perf_counter(), cpu_seconds()
    summary = train(cfg, exp)
    seconds, cpu = time.perf_counter() - tic, cpu_seconds() - cpu
    log = (exp / "train.log").read_text()
    share = re.search(r"([\d,]+) of ([\d,]+) parameters train", log)
    trainable, total = ((int(share[1].replace(",", "")), int(share[2].replace(",", ""))) if share else
                        (None, None))
    if trainable is None:  # plain training: every parameter
        import torch

        state = torch.load(exp / "model" / "model_last.pth", map_location="cpu", weights_only=False)["model"]
        trainable = total = sum(v.numel() for k, v in state.items() if "running_" not in k
                                and "num_batches" not in k and not k.startswith("head.text_"))
    row = {"run": name, "val_mIoU": summary["val"][NAME]["mIoU"], "seconds": seconds, "cpu_seconds": cpu,
           "steps": summary["steps"],
           "trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total,
           "per_class": summary["val"][NAME]["per_class"]}
    (exp / "result.json").write_text(json.dumps(row))
    shutil.rmtree(exp / "model", ignore_errors=True)
    print(f"  {name}: val mIoU {row['val_mIoU']:.4f} in {seconds:.0f} s", flush=True)
    return row


def summarise(rows: dict[str, list[dict]]) -> list[dict]:
    table = []
    for what, runs in rows.items():
        vals = [r["val_mIoU"] for r in runs]
        if not vals:
            continue
        table.append({"run": what, "seeds": len(vals), "mIoU": 100 * statistics.mean(vals),
                      "std": 100 * statistics.stdev(vals) if len(vals) > 1 else None,
                      "seconds": statistics.median(r["seconds"] for r in runs),
                      "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                      "trainable_pct": runs[0]["trainable_pct"]})
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO / "data" / "synthetic"), help="the synthetic domains (the demo's)")
    p.add_argument("--base", default=str(REPO / "exp" / "demo" / "model" / "model_best.pth"))
    p.add_argument("--rooms", type=int, default=30)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--peft-steps", type=int, default=150)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--scratch", default=",".join(SCRATCH), help=f"runs from scratch: {', '.join(SCRATCH)}")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "own_dataset"))
    p.add_argument("--report", action="store_true", help="the table from the runs made so far")
    args = p.parse_args(argv)
    os.chdir(REPO)
    src, base, out = Path(args.data), Path(args.base), Path(args.out)
    if not (src / "s3dis").is_dir():
        print(f"error: --data {src}: no synthetic domains (run bash tools/train.sh once)", file=sys.stderr)
        return 2
    if not base.is_file():
        print(f"error: --base {base}: no such checkpoint (run bash tools/train.sh once)", file=sys.stderr)
        return 2
    stages = [s for s in args.stages.split(",") if s]
    if any(s not in STAGES for s in stages) or any(s not in SCRATCH for s in args.scratch.split(",") if s):
        print(f"error: --stages: valid: {', '.join(STAGES)}; --scratch: valid: {', '.join(SCRATCH)}", file=sys.stderr)
        return 2
    import torch

    from ppt.config import load_config
    from ppt.engine.peft_checkpoint import peft_run_overrides

    torch.set_num_threads(1)
    root = make_data(src, out, args.rooms)
    scratch = [s for s in args.scratch.split(",") if s]
    rows: dict[str, list[dict]] = {k: [] for k in [*scratch, *stages]}
    for seed in (int(s) for s in args.seeds.split(",")):
        for what, (mix, extra, times) in SCRATCH.items():
            if what not in scratch:
                continue
            mix_text = "{" + ", ".join(f"{k}: {v}" for k, v in mix.items()) + "}"
            row = run(f"{what}_s{seed}", lambda: load_config("configs/demo.yaml", [
                *common(root, args.steps * times, seed), f"data.mix={mix_text}", *extra]), out, args.report)
            rows[what] += [row] if row else []
        for stage in stages:
            row = run(f"{stage}_s{seed}", lambda: load_config("configs/demo_peft.yaml", [
                *peft_run_overrides(stage, base), *common(root, args.peft_steps, seed),
                f"data.mix={{{NAME}: 1}}"]), out, args.report)
            rows[stage] += [row] if row else []
    table = summarise(rows)
    for t in table:
        t["steps"] = args.steps * SCRATCH[t["run"]][2] if t["run"] in SCRATCH else args.peft_steps
        t["from"] = "scratch" if t["run"] in SCRATCH else "demo model"
    print(format_table(table, ["run", "from", "steps", "seeds", "mIoU", "std", "cpu_seconds", "seconds", "trainable_pct"],
                       ["run", "from", "steps", "seeds", "val mIoU (%)", "std", "CPU s (median)", "wall s", "trainable %"]))
    save_json({"machine": machine_info(), "args": vars(args), "table": table, "rows": rows},
              out / "own_dataset.json")
    print(f"written: {out / 'own_dataset.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
