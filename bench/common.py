"""Helpers shared by the benchmarks: timing, peak memory, machine description, tables, JSON.

Timing follows one rule everywhere: ``warmup`` untimed calls (spconv builds its index tables
and torch allocates its caches on the first calls), then ``repeats`` timed calls, and the
MEDIAN is reported (robust to the other processes of a shared machine).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ppt.io import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    """Wait for queued CUDA work so wall-clock time covers it (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Median wall time of ``fn`` after ``warmup`` untimed calls.

    Also records this process's CPU time per call (``cpu_median_s``): with one torch thread
    it is what the call costs on an idle core, even when other processes share the machine.

    Returns:
        dict(median_s, min_s, max_s, cpu_median_s, repeats, warmup, times_s list).
    """
    for _ in range(warmup):
        fn()
        sync(device)
    times, cpu = [], []
    for _ in range(max(1, repeats)):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "cpu_median_s": statistics.median(cpu), "repeats": len(times), "warmup": warmup,
            "times_s": [round(t, 4) for t in times]}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set size (MiB), from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def reset_cuda_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mb(device: str) -> float | None:
    """Peak CUDA memory allocated since the last reset (MiB), None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def machine_info() -> dict:
    """CPU model, core count, torch/spconv versions and GPU (if any): the header of every result."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import spconv

        spconv_version = getattr(spconv, "__version__", "unknown")
    except ImportError:
        spconv_version = "missing"
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "spconv": spconv_version, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def format_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Markdown table of ``rows`` (dicts) over ``columns``; floats printed with 3 significant
    decimals, None as ``-``."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename)."""
    text = json.dumps(data, indent=1, default=_jsonable) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Models and batches of the compute benchmarks

DEFAULT_CHANNELS = (32, 64, 128, 256, 256, 128, 96, 96)
DEFAULT_LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)
DEMO_CHANNELS = (16, 32, 48, 64, 64, 48, 32, 32)
DEMO_LAYERS = (1, 1, 1, 1, 1, 1, 1, 1)
TEXT_DIM = 512  # CLIP ViT-B/16 text width, the paper's setting

# Benchmark model name -> (prompt adapter, head, datasets). "spunet" is the plain network on
# one dataset (its single linear head); the others are PPT models over the three datasets.
BENCH_MODELS = {
    "spunet": ("none", "decoupled", ("scannet",)),
    "pdnorm_language": ("pdnorm", "language", ("scannet", "s3dis", "structured3d")),
    "pdnorm_decoupled": ("pdnorm", "decoupled", ("scannet", "s3dis", "structured3d")),
    "pdnorm_union": ("pdnorm", "union", ("scannet", "s3dis", "structured3d")),
    "ptv3": ("none", "decoupled", ("scannet",)),
    "ptv3_pdnorm_language": ("pdnorm", "language", ("scannet", "s3dis", "structured3d")),
}
# A demo-size PTv3 for smoke tests (the paper-size one is ppt.config_ptv3.PTv3Config's defaults).
DEMO_PTV3 = dict(enc_depths=(1, 1, 1, 1, 1), enc_channels=(16, 16, 32, 32, 64), enc_heads=(1, 1, 2, 2, 4),
                 dec_depths=(1, 1, 1, 1), dec_channels=(16, 16, 32, 32), dec_heads=(1, 1, 2, 2),
                 patch_size=128)


def build_bench_model(name: str, channels=DEFAULT_CHANNELS, layers=DEFAULT_LAYERS, prompt_dim: int = 256,
                      seed: int = 0, tiny: bool = False):
    """A randomly initialised Segmentor (compute does not depend on the weights).

    The language head gets random unit (K, 512) class embeddings: the width of CLIP ViT-B/16's
    text features, without loading a text encoder.
    """
    import torch

    from ppt.data.dataset_file import get_dataset_info
    from ppt.models.segmentor import Segmentor

    if name not in BENCH_MODELS:
        raise KeyError(f"unknown benchmark model {name!r}; valid: {', '.join(BENCH_MODELS)}")
    prompt, head, datasets = BENCH_MODELS[name]
    names = {d: get_dataset_info(d).class_names for d in datasets}
    g = torch.Generator().manual_seed(seed)
    text = None
    if head == "language":
        text = {d: torch.nn.functional.normalize(torch.randn(len(c), TEXT_DIM, generator=g), dim=1)
                for d, c in names.items()}
    torch.manual_seed(seed)
    if name.startswith("ptv3"):  # Point Transformer V3, the paper's widths unless tiny
        from dataclasses import asdict

        from ppt.config_ptv3 import PTv3Config

        settings = {**asdict(PTv3Config()), **(DEMO_PTV3 if tiny else {})}
        return Segmentor(names, backbone=dict(in_channels=6, **settings), backbone_type="ptv3", prompt=prompt,
                         prompt_dim=prompt_dim, head=head, text_embeddings=text)
    return Segmentor(names, backbone=dict(channels=tuple(channels), layers=tuple(layers)), prompt=prompt,
                     prompt_dim=prompt_dim, head=head, text_embeddings=text)


def synthetic_batch(total_points: int, scenes: int = 2, voxel_size: float = 0.02, seed: int = 0) -> dict:
    """A training batch of ``scenes`` synthetic ScanNet-style rooms with about
    ``total_points`` voxels in all (grid-sampled at ``voxel_size``, sphere-cropped to size).

    Returns the collated batch (``ppt.data.collate``) on the CPU.
    """
    import numpy as np

    from ppt.data.collate import collate
    from ppt.data.grid import GridSample
    from ppt.data.synthetic import make_scene
    from ppt.data.transforms import CenterShift, Collect, Compose, NormalizeColor, SphereCrop

    per_scene = total_points // scenes
    samples = []
    for i in range(scenes):
        rng = np.random.default_rng([seed, i])
        raw = make_scene("scannet", rng, num_points=int(per_scene * 2.5))
        raw["segment"] = raw.pop("segment20").astype(np.int64)
        raw.pop("instance", None)
        pipeline = Compose([CenterShift(apply_z=True), GridSample(voxel_size), SphereCrop(point_max=per_scene),
                            CenterShift(apply_z=False), NormalizeColor(), Collect()])
        pipeline.set_rng(rng)
        sample = pipeline(raw)
        sample.update(dataset="scannet", name=f"bench_{i}")
        samples.append(sample)
    return collate(samples)


def fresh_run(cfg, run_dir: Path) -> tuple[dict, float]:
    """Train ``cfg`` (``ppt.engine.trainer.train``, what tools/train.py runs) into ``run_dir``
    emptied first (a run cut short starts over), then delete its checkpoints (the benchmarks
    keep scores and logs, not weights). Returns (the trainer's summary, wall seconds of the call)."""
    import shutil

    from ppt.engine.trainer import train

    shutil.rmtree(run_dir, ignore_errors=True)
    tic = time.perf_counter()
    summary = train(cfg, run_dir)
    seconds = time.perf_counter() - tic
    for ckpt in (Path(run_dir) / "model").glob("*.pth"):
        ckpt.unlink()
    return summary, seconds


def unknown_names(flag: str, given: Sequence[str], known: Sequence[str]) -> str | None:
    """An ``error:`` line for the names of ``given`` that ``known`` lacks, else None."""
    unknown = [n for n in given if n not in known]
    return f"error: {flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})" if unknown else None
