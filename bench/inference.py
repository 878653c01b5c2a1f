"""Test-time augmentation on a trained model: time, mIoU and peak memory of plain / fast / fragments.

    python tools/make_synthetic.py --out data/synthetic --scenes 30 --seed 0
    python tools/train.py --config configs/demo.yaml --name tta_bench --data-root data/synthetic
    python bench/inference.py --exp exp/tta_bench          # all val scenes of the three domains
    python bench/inference.py --quick                      # smoke: random demo model, 1 scene, no TTA

Each protocol runs in its own child process (``--protocol``), so its peak RSS is its own:
``off`` (one grid-sampled pass), ``fast`` (13 views, each voxelised once on a shifted grid, each
point voting with the voxels around it that look like it; ``tools/test.py --tta``) and
``fragments`` (the reference's 13 views x covering fragments; ``--tta fragments``). ``--variants``
adds ablations of ``fast`` (``FAST_VARIANTS``: the previous fast protocol ``fast-voxel``, and
the kept one without its neighbours, its grid shift or its weights), run through the same
``evaluate`` with other ``TestGrid`` options. Each child loads the experiment as tools/test.py does, runs one
untimed warm-up scene, then ``ppt.engine.evaluate.evaluate`` on the first ``--scenes`` val scenes
of every trained dataset (default all), in one thread and no loader workers, so its CPU time is
the whole cost (robust to other processes sharing the machine; wall time is not). Reported per
protocol and dataset: seconds and CPU seconds per scene, the ratio to ``off``, mIoU (classes
present) and mIoU_ref (all classes), and the child's peak RSS (``ru_maxrss``) and its RSS
before evaluating. The machine's 1-minute load average is recorded next to every figure.
``--interleaved ROUNDS`` measures cost only, in one process: the protocols take turns scene by
scene (``off`` included), so a load that drifts reaches them alike (CPU time alone still moves
by 10-20 % between separate processes on a shared machine).
Results: ``bench/results/inference_tta.json`` (``--quick``: ``bench/results/inference_quick.json``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    DEMO_CHANNELS, DEMO_LAYERS, RESULTS_DIR, build_bench_model, current_rss_mb, format_table, machine_info,
    peak_rss_mb, save_json,
)

PROTOCOLS = ("off", "fast", "fragments")
# Ablations of the fast protocol: ``TestGrid`` options (ppt/data/grid.py), all 13 views x one forward.
FAST_VARIANTS = {
    "fast-voxel": {"sigma": None, "shift": False},   # before: every point takes its voxel's vote
    "fast-shift": {"sigma": None},                   # + grid origins shifted per view
    "fast-own": {"neighbours": False, "shift": False},  # + weights, own voxel only
    "fast-own-shift": {"neighbours": False},         # + weights and shift, own voxel only
    "fast-noshift": {"shift": False},                # kept protocol without the shift
}


class Subset:
    """The first scenes of a SceneDataset, seen through the interface ``evaluate`` uses."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.info, self.scenes = dataset.info, [dataset.scenes[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> dict:
        return self.dataset.load(self.indices[i])


def _load(i: int) -> float:
    return round(os.getloadavg()[i], 2)


def use_protocol(protocol: str) -> str:
    """The ``tta`` argument of ``protocol``; points ``evaluate``'s ``iter_test_views`` at the
    ``TestGrid`` options of a ``FAST_VARIANTS`` entry (and back to the default for any other)."""
    from ppt.engine import evaluate as evaluate_module

    default = getattr(use_protocol, "default", None) or evaluate_module.iter_test_views
    use_protocol.default = default
    options = FAST_VARIANTS.get(protocol)
    evaluate_module.iter_test_views = functools.partial(default, fast_options=options) if options else default
    return "fast" if options else protocol


def load_model(exp: Path, data_root: str):
    """(config, model on the CPU, {trained dataset: val SceneDataset}) as tools/test.py loads them."""
    import importlib.util

    import torch

    from ppt.data.datasets import build_dataset

    spec = importlib.util.spec_from_file_location("ppt_test_tool", Path(__file__).resolve().parents[1] / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg, model, _ = tool.load_experiment(exp, "", torch.device("cpu"))
    root = data_root or cfg.data.root
    return cfg, model, {name: build_dataset(name, root, "val") for name in cfg.data.mix}


def run_protocol(exp: Path, protocol: str, scenes: int, data_root: str) -> dict:
    """Child process: every trained dataset's val scenes under one protocol (see module doc)."""
    from ppt.engine.evaluate import evaluate

    tta = use_protocol(protocol)
    cfg, model, datasets = load_model(exp, data_root)
    first = next(iter(datasets.values()))
    evaluate(model, Subset(first, [len(first.scenes) - 1]), "cpu", tta=tta, voxel_size=cfg.data.voxel_size)
    rows = []
    for name, dataset in datasets.items():
        subset = Subset(dataset, range(min(scenes or len(dataset.scenes), len(dataset.scenes))))
        rss_before, load_before = current_rss_mb(), _load(0)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = evaluate(model, subset, "cpu", tta=tta, voxel_size=cfg.data.voxel_size)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        rows.append({"dataset": name, "protocol": protocol, "scenes": result["scenes"], "points": result["points"],
                     "s_per_scene": round(seconds / result["scenes"], 3),
                     "cpu_s_per_scene": round(cpu / result["scenes"], 3),
                     "mIoU": round(100 * result["mIoU"], 2), "mIoU_ref": round(100 * result["mIoU_ref"], 2),
                     "rss_before_mb": round(rss_before), "load_1min": [load_before, _load(0)]})
        print(f"  {protocol} {name}: {rows[-1]['cpu_s_per_scene']} CPU s/scene, mIoU {rows[-1]['mIoU']}", flush=True)
    return {"protocol": protocol, "voxel_m": cfg.data.voxel_size, "rows": rows, "peak_rss_mb": round(peak_rss_mb())}


def interleaved(exp: Path, protocols: list[str], rounds: int, scenes: int, data_root: str) -> list[dict]:
    """CPU time per scene of each protocol, the protocols taking turns scene by scene in ONE
    process (``predict_scene``, the path ``evaluate`` runs, seeded by the scene index), ``rounds``
    times over: a load that drifts during the run reaches every protocol alike, so the ratios to
    ``off`` are steadier than those of separate processes."""
    from ppt.engine.evaluate import predict_scene

    cfg, model, datasets = load_model(exp, data_root)
    cpu = {(name, p): 0.0 for name in datasets for p in protocols}
    counts = {name: 0 for name in datasets}
    load_start = _load(0)
    first = next(iter(datasets.values()))
    for r in range(rounds + 1):  # round 0: untimed warm-up on one scene
        for name, dataset in datasets.items():
            indices = [len(dataset.scenes) - 1] if r == 0 else range(min(scenes or len(dataset.scenes), len(dataset.scenes)))
            if r == 0 and dataset is not first:
                continue
            for i in indices:
                raw = dataset.load(i)
                for protocol in protocols:
                    tta = use_protocol(protocol)
                    start = time.process_time()
                    predict_scene(model, raw, voxel_size=cfg.data.voxel_size, label_space=name, prompt=None, tta=tta,
                                  device="cpu", seed=i, features=tuple(cfg.data.features))
                    if r:
                        cpu[name, protocol] += time.process_time() - start
                counts[name] += r > 0
    use_protocol("off")
    rows = []
    for (name, protocol), seconds in cpu.items():
        per_scene = seconds / counts[name]
        rows.append({"dataset": name, "protocol": protocol, "scenes": counts[name] // rounds, "rounds": rounds,
                     "cpu_s_per_scene": round(per_scene, 3),
                     "x_off_cpu": round(seconds / cpu[name, "off"], 1) if "off" in protocols else None,
                     "load": f"{load_start}/{_load(0)}"})
    return rows


def quick(args: argparse.Namespace) -> int:
    """Smoke test: the random-weight demo model on one synthetic ScanNet val scene, no TTA."""
    import torch

    from ppt.data.datasets import build_dataset
    from ppt.engine.evaluate import evaluate

    if not Path(args.data, "scannet", "val").is_dir():
        from ppt.data.synthetic import generate

        generate(args.data, 10, seed=0, domains=("scannet",))
    dataset = build_dataset("scannet", args.data, "val")
    model = build_bench_model("pdnorm_language", DEMO_CHANNELS, DEMO_LAYERS, prompt_dim=64).eval()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = evaluate(model, Subset(dataset, [0]), torch.device("cpu"), voxel_size=0.08)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    row = {"protocol": "off", "scenes": result["scenes"], "points": result["points"], "seconds": round(seconds, 3),
           "points_per_s": round(result["points"] / seconds), "cpu_s_per_scene": round(cpu, 3)}
    print(f"quick: {row['points']:,} points in {seconds:.2f} s, {row['points_per_s']:,} points/s")
    save_json({"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "rows": [row]}, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="exp/tta_bench", help="trained experiment (see the module doc)")
    p.add_argument("--data", default="", help="data root (default: the experiment's; --quick: data/synthetic_study)")
    p.add_argument("--scenes", type=int, default=0, help="val scenes per dataset (default all)")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS + tuple(FAST_VARIANTS))
    p.add_argument("--variants", action="store_true", help="also run every ablation of fast (FAST_VARIANTS)")
    p.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                   help="CPU cost only: the protocols take turns scene by scene in one process, ROUNDS times")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke test: random demo model, one scene, no TTA")
    p.add_argument("--protocol", choices=PROTOCOLS + tuple(FAST_VARIANTS), help=argparse.SUPPRESS)  # child
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.data = args.data or "data/synthetic_study"
        args.out = args.out or str(RESULTS_DIR / "inference_quick.json")
        return quick(args)
    exp = Path(args.exp)
    if not (exp / "model" / "model_best.pth").is_file():
        p.error(f"{exp / 'model' / 'model_best.pth'} is missing: train the model first (see --help)")
    if args.protocol:  # child: one protocol, JSON to --out
        save_json(run_protocol(exp, args.protocol, args.scenes, args.data), args.out)
        return 0

    out = Path(args.out or RESULTS_DIR / "inference_tta.json")
    start, uptime = time.time(), Path("/proc/loadavg").read_text().split()[:3]
    if args.interleaved:
        protocols = list(dict.fromkeys(["off", *args.protocols]))
        rows = interleaved(exp, protocols, args.interleaved, args.scenes, args.data)
        table = format_table(rows, ["protocol", "dataset", "scenes", "rounds", "cpu_s_per_scene", "x_off_cpu", "load"],
                             ["protocol", "dataset", "scenes", "rounds", "CPU s/scene", "x off (CPU)", "load 1 min (start/end)"])
        print(table)
        save_json({"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "exp": str(exp),
                   "threads": args.threads, "loadavg_at_start": uptime, "wall_s": round(time.time() - start, 1),
                   "rows": rows, "markdown": table}, out)
        print(f"wrote {out}")
        return 0
    children = {}
    for protocol in args.protocols + [v for v in FAST_VARIANTS if args.variants and v not in args.protocols]:
        with tempfile.TemporaryDirectory() as tmp:
            child = Path(tmp) / "child.json"
            cmd = [sys.executable, __file__, "--exp", str(exp), "--protocol", protocol, "--scenes", str(args.scenes),
                   "--threads", str(args.threads), "--out", str(child)] + (["--data", args.data] if args.data else [])
            print(f"{protocol}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
            children[protocol] = json.loads(child.read_text())
    base = {r["dataset"]: r for r in children.get("off", {"rows": []})["rows"]}
    rows = []
    for protocol, child in children.items():
        for r in child["rows"]:
            plain = base.get(r["dataset"])
            r["x_off_cpu"] = round(r["cpu_s_per_scene"] / plain["cpu_s_per_scene"], 1) if plain else None
            r["peak_rss_mb"] = child["peak_rss_mb"]
            r["load"] = "/".join(map(str, r["load_1min"]))
            rows.append(r)
    table = format_table(rows, ["protocol", "dataset", "scenes", "s_per_scene", "cpu_s_per_scene", "x_off_cpu",
                                "mIoU", "mIoU_ref", "rss_before_mb", "peak_rss_mb", "load"],
                         ["protocol", "dataset", "scenes", "s/scene", "CPU s/scene", "x off (CPU)", "mIoU",
                          "mIoU_ref", "RSS before (MB)", "peak RSS (MB)", "load 1 min (start/end)"])
    print(table)
    summary = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "exp": str(exp),
               "voxel_m": next(iter(children.values()))["voxel_m"], "threads": args.threads, "workers": 0,
               "loadavg_at_start": uptime, "wall_s": round(time.time() - start, 1), "rows": rows, "markdown": table}
    save_json(summary, out)
    print(f"wrote {out} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
