"""Evaluate a trained experiment on every original point of one or more datasets.

    python tools/test.py --exp exp/demo                        # val split, all config datasets
    python tools/test.py --exp exp/demo --dataset scannet --tta --save-pred --ply
    python tools/test.py --exp exp/demo --dataset scannet --tta fragments  # reference TTA protocol
    python tools/test.py --exp exp/demo --dataset s3dis --prompt mean     # unknown-domain prompt
    python tools/test.py --exp exp/demo --dataset scannet --classes "wall,floor,chair,table"

Reads ``exp/<name>/config.yaml`` and ``exp/<name>/model/model_best.pth`` (``--weights`` picks
another file) and checks the scene files first, as the trainer does (one ``error:`` line naming
a bad file). Shows a progress bar over scenes (views with TTA) on a terminal, a line per scene
otherwise; prints a per-class IoU table and mIoU / mAcc / allAcc per dataset.

Test-time augmentation: ``--tta`` (= ``--tta fast``) runs 13 views (4 z-rotations x 3 scales +
a flip), each voxelised once, votes carried to every point: about 13x a plain pass.
``--tta fragments`` is the reference protocol (each view split into fragments covering every
point; many times slower), for comparisons with published numbers.

Two mIoUs: ``mIoU`` averages the classes present (labelled or predicted; ``n/a`` rows, JSON
null, are left out); ``mIoU_ref`` is the reference's (Pointcept) convention, the mean over ALL
classes of the label set with absent classes counting 0. They agree when every class occurs.
A dataset with class groups (ScanNet200: head / common / tail) also gets both means per group,
printed as ``scannet200 head 41.20 / common 30.10 / tail 12.30`` and written under ``groups``
(only in the dataset's own label set: not with ``--classes``).

Results: ``exp/<name>/result/metrics.json`` = {"conventions": {...}, "results": {dataset:
{mode: entry}}}, where mode names the split, the TTA protocol, the prompt, the label set and a
non-default checkpoint (e.g. ``split=val; tta=fast; prompt=scannet; classes=scannet``). An
evaluation replaces only the entry of its own dataset and mode (atomic write).

Prompts: a dataset the model was trained on uses its own prompt. A domain that is in the model
but was never trained (in ``data.val``, not in ``data.mix``), or a dataset unknown to the model,
is evaluated with the ``mean`` prompt, and the output says so; ``--prompt`` naming an untrained
domain is refused.

Open vocabulary (``--classes``, language head only): the names are embedded with the config's
text encoder and template and become the label set the model predicts in. The data's labels
are mapped BY NAME: a dataset class whose name equals one of the given names (compared
lower-case, with '_' and '-' read as spaces) is scored as that class; points of every other
class are ignored. Listed names that the dataset does not have (a warning lists its names) can
still be predicted: they count as false positives of the classes they take points from.

Outputs of ``--save-pred`` / ``--ply`` go to ``exp/<name>/result/<dataset>/`` for the default
mode (val split, no TTA, own prompt and classes), else to a sub-folder named after the mode
(e.g. ``result/scannet/tta-fast/``): ``<scene>_pred.npy`` (int16 labels, one per original
point, in the label order of the evaluated label set) and ``<scene>_pred.ply`` (points
coloured by prediction, with ``pred`` and ``gt`` properties). The folder is printed.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.engine.eval_outputs import Progress, mode_folder, mode_key, scene_writer, write_metrics  # noqa: E402

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
    p.add_argument("--tta", nargs="?", const="fast", default="off", choices=("off", "fast", "fragments"),
                   help="13-view test-time augmentation: fast (default when given: each view voxelised once) "
                        "or fragments (the reference protocol, many times slower)")
    p.add_argument("--prompt", default=None, help="domain prompt: a training dataset name or 'mean'")
    p.add_argument("--classes", default=None, help='open-vocabulary label set, e.g. "wall,floor,chair"')
    p.add_argument("--save-pred", action="store_true", help="write <scene>_pred.npy per scene")
    p.add_argument("--ply", action="store_true", help="write <scene>_pred.ply coloured by prediction")
    p.add_argument("--data-root", default="", help="override data.root of the config")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-points", type=int, default=0, help="points per forward (default: evaluate's)")
    p.add_argument("--workers", type=int, default=2, help="processes preparing scenes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the experiment's train.threads; 0 = one per free core)")
    return p.parse_args(argv)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def label_map_by_name(data_classes: tuple[str, ...], label_set: list[str]) -> np.ndarray:
    """int (K_data,): dataset label -> position of the same-named class in ``label_set``, or -1."""
    position = {_norm(n): i for i, n in enumerate(label_set)}
    return np.array([position.get(_norm(n), -1) for n in data_classes], np.int64)


def load_experiment(exp: Path, weights: str, device):
    """(config, model on ``device``, checkpoint path): ``ppt.engine.predict.load_experiment``
    (``model_best.pth``, else ``model_last.pth``), errors as usage errors."""
    from ppt.engine.predict import ExperimentError
    from ppt.engine.predict import load_experiment as load

    try:
        return load(exp, weights or None, device)
    except ExperimentError as err:
        raise UsageError(str(err)) from None


def _finite(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def embed(class_names, cfg):
    """(K, D) class-name embeddings with the experiment's text encoder and template."""
    from ppt.text import TextEncoderUnavailable, class_embeddings

    try:
        return class_embeddings(list(class_names), cfg.model.text_encoder, cfg.model.template)
    except TextEncoderUnavailable as err:
        raise UsageError(str(err)) from None


def resolve_datasets(text: str, cfg, root: str) -> dict:
    """``{name: DatasetInfo}`` of ``--dataset`` (default: the model's datasets): built in,
    described by the experiment's config, or a folder of ``root`` with a ``dataset.yaml``."""
    from ppt.data.dataset_file import get_dataset_info
    from ppt.data.dataset_file import DatasetFileError
    from ppt.engine.build import model_datasets

    names = [n.strip() for n in text.split(",") if n.strip()] if text else model_datasets(cfg)
    try:
        return {n: get_dataset_info(n, root, cfg.datasets) for n in names}
    except DatasetFileError as err:
        raise UsageError(f"--dataset: {err}") from None


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    label_set = [n.strip() for n in text.split(",") if n.strip()]
    if not label_set:
        raise UsageError(f"--classes {text!r} lists no class name; give names like \"wall,floor,chair\"")
    if len({_norm(n) for n in label_set}) != len(label_set):
        raise UsageError(f"--classes lists a name twice: {text!r}")
    return label_set


def check_scenes(root: str, name: str, split: str, described: dict) -> None:
    """The trainer's start-up check of the scene files (headers only); one line per problem set."""
    from ppt.data.check import check_data_root

    report = check_data_root(root, [name], [split], quick=True, raise_on_error=False, described=described)
    if report.problems:
        more = len(report.problems) - 1
        tail = f" (and {more} more problem(s): python tools/check_data.py {root})" if more else ""
        raise UsageError(report.problems[0] + tail)


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Evaluate as the command line asks; returns ``{dataset: {mode: entry}}`` as written."""
    import torch

    from ppt.data.datasets import SceneDataset
    from ppt.engine.build import trained_domains
    from ppt.engine.evaluate import MAX_POINTS, eval_prompt, evaluate, views_per_scene
    from ppt.engine.threads import choose_threads, loader_workers
    from ppt.metrics import format_groups, format_table, group_metrics

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    label_set = parse_classes(args.classes)
    exp = Path(args.exp)
    cfg, model, ckpt_path = load_experiment(exp, args.weights, device)
    # as in training: one thread per free core (more spin instead of working on a busy machine)
    args.workers = loader_workers(args.workers)
    threads, _ = choose_threads(cfg.train.threads if args.threads is None else args.threads,
                                workers=args.workers)
    torch.set_num_threads(threads)
    root = args.data_root or cfg.data.root
    datasets = resolve_datasets(args.dataset, cfg, root)
    domains, trained = set(getattr(model, "domains", ())), set(trained_domains(cfg))
    if args.prompt is not None and args.prompt not in (*domains, "mean"):
        raise UsageError(f"unknown prompt {args.prompt!r}; valid: {', '.join(sorted(domains))}, mean")
    if label_set is not None and cfg.model.head != "language":
        raise UsageError(f"--classes needs the language head; this model's head is {cfg.model.head!r}")

    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    # Check every dataset (prompt, label set, data) before spending time on any of them.
    plans = {}
    for name, info in datasets.items():
        try:
            prompt, note = eval_prompt(name, trained, args.prompt)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if label_set is None and name not in trained and cfg.model.head != "language":
            why = "has no classes for" if name not in domains else "never trained its classifier of"
            raise UsageError(f"the {cfg.model.head} head {why} {name!r} (trained: {', '.join(sorted(trained))}); "
                             f"evaluate a trained dataset or use a language-head model")
        if label_set is not None:
            known = {_norm(c) for c in info.class_names}
            unknown = [n for n in label_set if _norm(n) not in known]
            if unknown:
                scored = "nothing will be scored" if len(unknown) == len(label_set) else \
                    "they are predicted but never scored as correct"
                print(f"warning: --classes {', '.join(repr(n) for n in unknown)} not among {name}'s classes "
                      f"({scored}); {name} classes: {', '.join(info.class_names)}", file=sys.stderr)
        check_scenes(root, name, args.split, cfg.datasets)
        try:
            dataset = SceneDataset(Path(root) / info.folder_name, info, args.split)
        except (KeyError, FileNotFoundError) as err:
            raise UsageError(err.args[0] if err.args else str(err)) from None
        plans[name] = (dataset, prompt, note)

    if label_set is not None:
        model.set_label_space(OPEN_VOCAB, label_set, embed(label_set, cfg).to(device))
    weights_tag = "" if not args.weights else Path(args.weights).name
    entries: dict[str, dict] = {}
    for name, (dataset, prompt, note) in plans.items():
        info = dataset.info
        if label_set is None and name not in domains:
            # Zero-shot on a dataset the model never saw: embed its class names.
            model.set_label_space(name, info.class_names, embed(info.class_names, cfg).to(device))
        shown_prompt = prompt or name
        if note:
            print(f"note: {note}", flush=True)
        out_dir = exp / "result" / name / mode_folder(args.split, args.tta, shown_prompt, name, label_set)
        saving = args.save_pred or args.ply
        writer = scene_writer(out_dir, args.save_pred, args.ply, len(label_set or info.class_names)) if saving else None
        progress = Progress(name, len(dataset.scenes), views_per_scene(args.tta))

        def on_scene(scene: dict, writer=writer, progress=progress) -> None:
            if writer is not None:
                writer(scene)
            progress.scene(scene)

        tic = time.perf_counter()
        try:
            result = evaluate(
                model, dataset, device, prompt=prompt, tta=args.tta, voxel_size=cfg.data.voxel_size,
                max_points=args.max_points or MAX_POINTS,
                label_space=OPEN_VOCAB if label_set else None, class_names=label_set,
                label_map=label_map_by_name(info.class_names, label_set) if label_set else None,
                on_scene=on_scene, num_workers=args.workers, amp_dtype=amp_dtype, on_forward=progress.forward,
                features=tuple(cfg.data.features))
        finally:
            progress.close()
        seconds = time.perf_counter() - tic
        if info.groups and label_set is None:
            result["groups"] = group_metrics(result, info.groups)
        classes = ",".join(label_set) if label_set else name
        print(format_table(result, title=f"{name} {args.split}: {result['scenes']} scenes, prompt {shown_prompt}, "
                                         f"tta {args.tta}, classes {classes}"))
        print(f"{name}: mIoU {_pct(result['mIoU'])} (classes present)  mIoU_ref {_pct(result['mIoU_ref'])} "
              f"(all {len(result['per_class'])} classes, reference)  mAcc {_pct(result['mAcc'])}  "
              f"allAcc {_pct(result['allAcc'])}  ({result['scenes'] / seconds:.2f} scenes/s, "
              f"{result['points'] / seconds:.0f} points/s)", flush=True)
        if result.get("groups"):
            print(f"{name} {format_groups(result['groups'])} (mIoU, classes present)\n"
                  f"{name} {format_groups(result['groups'], 'mIoU_ref')} (mIoU_ref, all classes of each group, "
                  f"reference)", flush=True)
        if saving:
            kinds = " and ".join(k for k, on in (("_pred.npy", args.save_pred), ("_pred.ply", args.ply)) if on)
            print(f"predictions ({result['scenes']} scenes, {kinds}) written to {out_dir}", flush=True)
        print()
        key = mode_key(args.split, args.tta, shown_prompt, classes, weights_tag)
        entries[name] = {key: {
            "mIoU": _finite(result["mIoU"]), "mIoU_ref": _finite(result["mIoU_ref"]),
            "mAcc": _finite(result["mAcc"]), "mAcc_ref": _finite(result["mAcc_ref"]),
            "allAcc": _finite(result["allAcc"]),
            "classes_present": result["classes_present"], "num_classes": result["num_classes"],
            "per_class": result["per_class"], "per_class_acc": result["per_class_acc"],
            "split": args.split, "tta": args.tta, "prompt": shown_prompt, "prompt_note": note or None,
            "label_set": label_set, "weights": str(ckpt_path), "scenes": result["scenes"],
            "points": result["points"], "seconds": round(seconds, 3),
            "predictions": str(out_dir) if saving else None,
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }}
        if result.get("groups"):
            entries[name][key]["groups"] = {g: {k: _finite(v) for k, v in values.items()}
                                            for g, values in result["groups"].items()}
    path = exp / "result" / "metrics.json"
    merged = write_metrics(path, entries)
    total = sum(len(modes) for modes in merged["results"].values())
    print(f"metrics written to {path} ({total} evaluation(s) kept: {', '.join(merged['results'])})")
    return entries


def _one_line(err: Exception) -> str:
    """A scene error raised in a loader worker arrives wrapped in its traceback: keep the reason."""
    text = str(err).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    from ppt.data.scene_io import SceneError

    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, SceneError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
