"""Evaluate a trained experiment on every original point of one or more datasets.

    python tools/test.py --exp exp/demo                        # val split, all config datasets
    python tools/test.py --exp exp/demo --dataset scannet --tta --save-pred --ply
    python tools/test.py --exp exp/demo --dataset s3dis --prompt mean     # unknown-domain prompt
    python tools/test.py --exp exp/demo --dataset scannet --classes "wall,floor,chair,table"

Reads ``exp/<name>/config.yaml`` and ``exp/<name>/model/model_best.pth`` (``--weights`` picks
another file). Prints a per-class IoU table and mIoU / mAcc / allAcc per dataset and writes
``exp/<name>/result/metrics.json`` = {dataset: {mIoU, mAcc, allAcc, per_class: {class: IoU},
...}} atomically; entries of datasets not evaluated in this run are kept. ``n/a`` (JSON null)
marks classes absent from both labels and predictions; they are left out of mIoU (see
``ppt.metrics``).

Open vocabulary (``--classes``, language head only): the names are embedded with the config's
text encoder and template and become the label set the model predicts in. The data's labels
are mapped BY NAME: a dataset class whose name equals one of the given names (compared
lower-case, with '_' and '-' read as spaces) is scored as that class; points of every other
class are ignored. Listed names that the dataset does not have can still be predicted: they
count as false positives of the classes they take points from.

Outputs of ``--save-pred`` / ``--ply`` go to ``exp/<name>/result/<dataset>/<scene>_pred.npy``
(int16 labels, one per original point, in the label order of the evaluated label set) and
``<scene>_pred.ply`` (points coloured by prediction, with ``pred`` and ``gt`` properties).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.io import atomic_write  # noqa: E402

OPEN_VOCAB = "open_vocab"  # label-set name of --classes inside the model


class UsageError(Exception):
    """Bad command-line input; printed as one ``error:`` line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment folder exp/<name>")
    p.add_argument("--dataset", default="", help="comma-separated datasets (default: all of the config)")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--weights", default="", help="checkpoint (default <exp>/model/model_best.pth)")
    p.add_argument("--tta", action="store_true", help="13-view test-time augmentation over covering fragments")
    p.add_argument("--prompt", default=None, help="domain prompt: a training dataset name or 'mean'")
    p.add_argument("--classes", default="", help='open-vocabulary label set, e.g. "wall,floor,chair"')
    p.add_argument("--save-pred", action="store_true", help="write <scene>_pred.npy per scene")
    p.add_argument("--ply", action="store_true", help="write <scene>_pred.ply coloured by prediction")
    p.add_argument("--data-root", default="", help="override data.root of the config")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-points", type=int, default=0, help="points per forward (default: evaluate's)")
    p.add_argument("--workers", type=int, default=2, help="processes preparing scenes")
    return p.parse_args(argv)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def label_map_by_name(data_classes: tuple[str, ...], label_set: list[str]) -> np.ndarray:
    """int (K_data,): dataset label -> position of the same-named class in ``label_set``, or -1."""
    position = {_norm(n): i for i, n in enumerate(label_set)}
    return np.array([position.get(_norm(n), -1) for n in data_classes], np.int64)


def load_experiment(exp: Path, weights: str, device):
    """(config, model on ``device``, checkpoint path) of an experiment folder."""
    from ppt.config import ConfigError, load_config
    from ppt.engine.build import build_model, text_embeddings_from_state
    from ppt.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state

    if not exp.is_dir():
        raise UsageError(f"experiment folder {exp} does not exist")
    config_path = exp / "config.yaml"
    if not config_path.is_file():
        raise UsageError(f"{config_path} is missing: is {exp} an experiment folder written by tools/train.py?")
    ckpt_path = Path(weights) if weights else exp / "model" / "model_best.pth"
    if not ckpt_path.is_file():
        hint = ""
        if not weights and (exp / "model" / "model_last.pth").is_file():
            hint = f" (training has not validated yet? pass --weights {exp / 'model' / 'model_last.pth'})"
        raise UsageError(f"checkpoint {ckpt_path} does not exist{hint}")
    try:
        cfg = load_config(config_path)
        ckpt = load_checkpoint(ckpt_path)
        state = ckpt.get("model", ckpt)
        # The class embeddings travel in the checkpoint: no text encoder needed here.
        model = build_model(cfg, text_embeddings_from_state(state))
        if cfg.peft.stage != "none":  # PEFT run: base weights + stage, then its trainable part
            from ppt.models.peft.checkpoint import prepare_peft_model

            prepare_peft_model(model, cfg, exp, ckpt=ckpt)
        load_model_state(model, state, ckpt_path)
    except (ConfigError, CheckpointError) as err:
        raise UsageError(str(err)) from None
    return cfg, model.to(device).eval(), ckpt_path


def _finite(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def write_metrics(path: Path, entries: dict[str, dict]) -> dict:
    """Merge ``{dataset: entry}`` into the JSON file at ``path`` (atomic); returns the whole file."""
    merged = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            merged = {}  # a broken old file is replaced, not fatal
    merged.update(entries)
    text = json.dumps(merged, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return merged


def palette(num_classes: int) -> np.ndarray:
    """uint8 (K + 1, 3) distinct colours (golden-ratio hues); the last row (label -1) is grey."""
    import colorsys

    rows = [colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
            for i in range(num_classes)]
    return np.round(np.array(rows + [(0.5, 0.5, 0.5)]) * 255).astype(np.uint8)


def write_ply(path: Path, coord: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, num_classes: int) -> None:
    """Binary PLY: x, y, z, red, green, blue (colour of the prediction), pred, gt (-1 = none)."""
    from plyfile import PlyData, PlyElement

    colours = palette(num_classes)[pred]
    gt = gt if gt is not None else np.full(len(pred), -1)
    vertex = np.empty(len(pred), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                  ("blue", "u1"), ("pred", "i2"), ("gt", "i2")])
    for i, axis in enumerate("xyz"):
        vertex[axis] = coord[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = colours[:, i]
    vertex["pred"], vertex["gt"] = pred, gt
    atomic_write(path, PlyData([PlyElement.describe(vertex, "vertex")]).write)


def scene_writer(out_dir: Path, save_pred: bool, ply: bool, num_classes: int):
    """``on_scene`` callback of ``evaluate`` saving predictions and/or PLY files."""
    def save(scene: dict) -> None:
        stem = scene["name"].replace("/", "-")
        if save_pred:
            atomic_write(out_dir / f"{stem}_pred.npy", lambda f: np.save(f, scene["pred"].astype(np.int16)))
        if ply:
            write_ply(out_dir / f"{stem}_pred.ply", scene["coord"], scene["pred"], scene["segment"], num_classes)
    return save


def embed(class_names, cfg):
    """(K, D) class-name embeddings with the experiment's text encoder and template."""
    from ppt.text import TextEncoderUnavailable, class_embeddings

    try:
        return class_embeddings(list(class_names), cfg.model.text_encoder, cfg.model.template)
    except TextEncoderUnavailable as err:
        raise UsageError(str(err)) from None


def resolve_datasets(text: str, cfg) -> list[str]:
    from ppt.data.classes import DATASETS
    from ppt.engine.build import model_datasets

    names = [n.strip() for n in text.split(",") if n.strip()] if text else model_datasets(cfg)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise UsageError(f"unknown dataset {unknown[0]!r}; valid: {', '.join(DATASETS)}")
    return names


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Evaluate as the command line asks; returns the metrics entries written."""
    import torch

    from ppt.data.classes import get_dataset_info
    from ppt.data.datasets import build_dataset
    from ppt.engine.evaluate import MAX_POINTS, evaluate
    from ppt.metrics import format_table

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    exp = Path(args.exp)
    cfg, model, ckpt_path = load_experiment(exp, args.weights, device)
    datasets = resolve_datasets(args.dataset, cfg)
    domains = set(getattr(model, "domains", ()))
    if args.prompt is not None and args.prompt not in (*domains, "mean"):
        raise UsageError(f"unknown prompt {args.prompt!r}; valid: {', '.join(sorted(domains))}, mean")

    label_set: list[str] | None = None
    if args.classes:
        label_set = [n.strip() for n in args.classes.split(",") if n.strip()]
        if len({_norm(n) for n in label_set}) != len(label_set):
            raise UsageError(f"--classes lists a name twice: {args.classes!r}")
        if cfg.model.head != "language":
            raise UsageError(f"--classes needs the language head; this model's head is {cfg.model.head!r}")
        model.set_label_space(OPEN_VOCAB, label_set, embed(label_set, cfg).to(device))

    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    # Check every dataset (prompt, label set, data root) before spending time on any of them.
    built = {}
    for name in datasets:
        info = get_dataset_info(name)
        if name not in domains and args.prompt is None:
            raise UsageError(f"the model was not trained on {name!r} (domains: {', '.join(sorted(domains))}); "
                             f"pass --prompt NAME or --prompt mean")
        if label_set is None and name not in domains and cfg.model.head != "language":
            raise UsageError(f"the {cfg.model.head} head has no classes for {name!r}; evaluate a trained "
                             f"dataset or use a language-head model")
        try:
            built[name] = build_dataset(name, args.data_root or cfg.data.root, args.split)
        except (KeyError, FileNotFoundError) as err:
            raise UsageError(err.args[0] if err.args else str(err)) from None

    entries = {}
    for name, dataset in built.items():
        info = dataset.info
        if label_set is None and name not in domains:
            # Zero-shot on a dataset the model never saw: embed its class names.
            model.set_label_space(name, info.class_names, embed(info.class_names, cfg).to(device))
        out_dir = exp / "result" / name
        on_scene = scene_writer(out_dir, args.save_pred, args.ply, len(label_set or info.class_names)) \
            if args.save_pred or args.ply else None
        tic = time.perf_counter()
        result = evaluate(
            model, dataset, device, prompt=args.prompt, tta=args.tta, voxel_size=cfg.data.voxel_size,
            max_points=args.max_points or MAX_POINTS,
            label_space=OPEN_VOCAB if label_set else None, class_names=label_set,
            label_map=label_map_by_name(info.class_names, label_set) if label_set else None,
            on_scene=on_scene, num_workers=args.workers, amp_dtype=amp_dtype)
        seconds = time.perf_counter() - tic
        prompt = args.prompt or name
        print(format_table(result, title=f"{name} {args.split}: {result['scenes']} scenes, "
                                         f"prompt {prompt}, tta {'on' if args.tta else 'off'}"))
        print(f"{name}: mIoU {_pct(result['mIoU'])}  mAcc {_pct(result['mAcc'])}  "
              f"allAcc {_pct(result['allAcc'])}  ({result['scenes'] / seconds:.2f} scenes/s, "
              f"{result['points'] / seconds:.0f} points/s)\n", flush=True)
        entries[name] = {
            "mIoU": _finite(result["mIoU"]), "mAcc": _finite(result["mAcc"]), "allAcc": _finite(result["allAcc"]),
            "per_class": result["per_class"], "per_class_acc": result["per_class_acc"],
            "split": args.split, "tta": args.tta, "prompt": prompt, "label_set": label_set,
            "weights": str(ckpt_path), "scenes": result["scenes"], "points": result["points"],
            "seconds": round(seconds, 3),
        }
    merged = write_metrics(exp / "result" / "metrics.json", entries)
    print(f"metrics written to {exp / 'result' / 'metrics.json'} ({', '.join(merged)})")
    return entries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
