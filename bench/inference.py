"""Inference throughput of the tools/test.py path (``ppt.engine.evaluate``), with and without TTA.

    python bench/inference.py                        # CPU (+ CUDA when available), < 10 min on 2 cores
    python bench/inference.py --device cuda --scenes 6 6 6 6
    python bench/inference.py --quick                # smoke: demo model, 1 scene, no TTA

Two models, both PPT (PDNorm + language head, random weights and random 512-d class
embeddings: speed does not depend on them): the demo size of ``configs/demo.yaml`` at its
8 cm voxels, and the default 39 M SpUNet at the paper's 2 cm. Data: validation rooms of the
synthetic ScanNet domain (``tools/make_synthetic.py``; made if missing).

Each row runs ``evaluate`` exactly as tools/test.py does (every original point predicted, voxel
batches of up to ``MAX_POINTS``, autocast bf16/fp16 on CUDA), after one untimed warm-up scene.
``--scenes`` sets how many scenes each row times (default: demo 6 / TTA 2, default model 2 / TTA
1, on CPU; at most the split's scenes less the warm-up one); throughput = scenes and ORIGINAL points per second of wall time, and per second of this
process's CPU time (single torch thread, no workers: the cost on an idle core, robust to other
processes sharing the machine). TTA = 13 augmented views, each
split into fragments covering every point (SPEC §7). Results: ``bench/results/inference.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    DEFAULT_CHANNELS, DEFAULT_LAYERS, DEMO_CHANNELS, DEMO_LAYERS, RESULTS_DIR, build_bench_model, format_table,
    machine_info, save_json,
)

# name -> (channels, layers, prompt_dim, voxel size in metres)
MODELS = {"demo": (DEMO_CHANNELS, DEMO_LAYERS, 64, 0.08), "default": (DEFAULT_CHANNELS, DEFAULT_LAYERS, 256, 0.02)}
ROWS = (("demo", False), ("demo", True), ("default", False), ("default", True))
CPU_SCENES = (6, 2, 2, 1)  # scenes timed per row on CPU, in ROWS order
CUDA_SCENES = (6, 6, 6, 6)


class Subset:
    """The first scenes of a SceneDataset, seen through the interface ``evaluate`` uses."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.info, self.scenes = dataset.info, [dataset.scenes[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> dict:
        return self.dataset.load(self.indices[i])


def bench_row(model_name: str, tta: bool, scenes: int, dataset, device: str, workers: int) -> dict:
    import torch

    from ppt.engine.evaluate import evaluate

    channels, layers, prompt_dim, voxel = MODELS[model_name]
    model = build_bench_model("pdnorm_language", channels, layers, prompt_dim=prompt_dim).to(device).eval()
    dev = torch.device(device)
    amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    n = max(1, min(scenes, len(dataset) - 1))
    # Warm-up on the last scene (spconv builds its tables, allocators fill), then the timed ones.
    evaluate(model, Subset(dataset, [len(dataset) - 1]), dev, tta=tta, voxel_size=voxel, amp_dtype=amp)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = evaluate(model, Subset(dataset, range(n)), dev, tta=tta, voxel_size=voxel, num_workers=workers,
                      amp_dtype=amp)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"model": model_name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "voxel_m": voxel, "tta": tta, "device": device, "scenes": result["scenes"], "points": result["points"],
            "seconds": round(seconds, 2), "scenes_per_s": round(result["scenes"] / seconds, 4),
            "points_per_s": round(result["points"] / seconds), "s_per_scene": round(seconds / result["scenes"], 2),
            "cpu_s_per_scene": round(cpu / result["scenes"], 2),
            "cpu_points_per_s": round(result["points"] / cpu) if workers == 0 and dev.type == "cpu" else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synthetic_study", help="synthetic data root (made if missing)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = CPU, then CUDA too when available")
    p.add_argument("--scenes", type=int, nargs=4, default=None,
                   help="scenes timed per row: demo, demo+TTA, default, default+TTA")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0,
                   help="scene-preparing processes (tools/test.py --workers); 0 keeps all work in this "
                        "process, so its CPU time is the whole cost")
    p.add_argument("--quick", action="store_true", help="smoke test: demo model, one scene, no TTA")
    p.add_argument("--out", default=str(RESULTS_DIR / "inference.json"))
    args = p.parse_args(argv)

    import torch

    from ppt.data.datasets import build_dataset

    torch.set_num_threads(args.threads)
    if not Path(args.data, "scannet", "val").is_dir():
        from ppt.data.synthetic import generate

        generate(args.data, 10 if args.quick else 30, seed=0, domains=("scannet",))
    dataset = build_dataset("scannet", args.data, "val")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    start = time.time()
    rows = []
    for device in devices:
        plan = zip(ROWS, args.scenes or (CUDA_SCENES if device == "cuda" else CPU_SCENES))
        if args.quick:
            plan = [(("demo", False), 1)]
        for (model_name, tta), scenes in plan:
            row = bench_row(model_name, tta, scenes, dataset, device, 0 if args.quick else args.workers)
            rows.append(row)
            print(f"{device} {model_name} tta={tta}: {row['scenes']} scenes in {row['seconds']:.1f} s, "
                  f"{row['points_per_s']:,} points/s", flush=True)
    table = format_table(rows, ["device", "model", "params_m", "voxel_m", "tta", "scenes", "s_per_scene",
                                "scenes_per_s", "points_per_s", "cpu_s_per_scene", "cpu_points_per_s"],
                         ["device", "model", "params (M)", "voxel (m)", "TTA", "scenes timed", "s/scene",
                          "scenes/s", "points/s", "CPU s/scene", "points/CPU s"])
    print(table)
    summary = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]), "data": args.data,
               "threads": args.threads, "workers": args.workers, "wall_s": round(time.time() - start, 1),
               "rows": rows, "markdown": table}
    save_json(summary, args.out)
    print(f"wrote {args.out} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
