"""Train a PPT / SpUNet model from a YAML config (single process or under torchrun).

    python tools/train.py --config configs/demo.yaml --name demo [key=value ...]
    torchrun --nproc_per_node 8 tools/train.py --config configs/ppt_joint.yaml --name ppt

Flags:
    --config FILE         YAML config (configs/*.yaml)
    --name NAME           experiment folder exp/NAME (default: the config's file name)
    --datasets LIST       dataset mix with batch ratios, e.g. structured3d:4,scannet:2,s3dis:1
                          (replaces data.mix; the same datasets are validated). The FIRST one
                          defines the epoch: one pass over it; the others are reshuffled and
                          re-iterated whenever they run out (as the reference). A name is a
                          built-in dataset (scannet, scannet200, s3dis, structured3d) or any
                          folder <data root>/NAME/ with a dataset.yaml (your own labelled scans:
                          tools/preprocess.py labelled writes one), e.g. mydata:1,scannet:1
    --data-root DIR       replaces data.root
    --weights FILE        initialise the model from a checkpoint (fine-tuning)
    --peft STAGE          parameter-efficient fine-tuning of --weights: full, linear, decoder,
                          bitfit, lora, dapt or pointpeft, on a SpUNet or PTv3 base (config
                          default configs/peft_STAGE.yaml; the model section, voxel size and input
                          features come from the base checkpoint; ppt.models.peft)
    --resume              continue exp/NAME from model/model_last.pth, exactly (without --config:
                          exp/NAME/config.yaml). Only how the rest is run may change
                          (train.epochs re-plans the lr schedule, eval/checkpoint/log intervals,
                          workers, data.root, ...); any other change is refused.
    --plan                print the run's cost and exit: datasets, sizes, steps per epoch, total
                          steps, evaluation volume (no model, no GPU, nothing written)
    --world-size N        --plan: processes the run will use (GPUs x machines; default 1)
    --sizes LIST          --plan without the data: scene counts name:TRAIN[/VAL],...
                          e.g. structured3d:18000/1700,scannet:1201/312,s3dis:204/68
    --exp-root DIR        parent of experiment folders (default exp)
    key=value ...         config overrides (dotted keys, YAML values): optim.lr=0.01

Input problems print ONE line ``error: ...`` and exit with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.config import ConfigError, load_config  # noqa: E402


class InputError(ValueError):
    pass


def parse_mix(text: str) -> dict[str, int]:
    """"scannet:2,s3dis:1" -> {"scannet": 2, "s3dis": 1} (ratio defaults to 1)."""
    mix: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, ratio = item.partition(":")  # the name is checked with the config (data root known)
        ratio = ratio or "1"
        if not ratio.isdigit() or int(ratio) < 1:
            raise InputError(f"--datasets: ratio of {name} must be a positive integer, got {ratio!r}")
        if name in mix:
            raise InputError(f"--datasets: {name} is listed twice")
        mix[name] = int(ratio)
    if not mix:
        raise InputError("--datasets is empty; e.g. --datasets scannet:2,s3dis:1")
    return mix


def check_data_folders(root: Path, names: list[str]) -> None:
    """Raise InputError unless ``root`` holds a folder for each dataset; when a child folder of
    ``root`` does (``data/`` vs ``data/synthetic``), the message names it."""
    from ppt.data.check import data_root_hint

    if not root.is_dir():
        raise InputError(f"data root {root} does not exist (set --data-root, or make the synthetic "
                         f"demo data: python tools/make_synthetic.py --out data/synthetic)")
    from ppt.data.dataset_file import described_datasets

    missing = [d for d in dict.fromkeys(names) if not (root / d).is_dir()]
    if missing:
        present = described_datasets(root)
        hint = data_root_hint(root, missing) or "; see datasets/README.md"
        raise InputError(f"data root {root} has no {', '.join(missing)} folder (found: "
                         f"{', '.join(present) or 'none'}){hint}")


def config_best_on(path: str, overrides: list[str]) -> str:
    """``train.best_on`` of a config file and its overrides, read without validating the rest
    (the file's own ``data.mix`` is about to be replaced by ``--datasets``)."""
    import yaml

    from ppt.typed_config import parse_overrides

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        data = {}  # load_config reports the file properly
    value = ((data.get("train") if isinstance(data, dict) else None) or {}).get("best_on", "first")
    return str((parse_overrides(overrides).get("train") or {}).get("best_on", value))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--peft", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--exp-root", default="exp")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace):
    """Validate everything that needs no model: config, mix, data root, weights, resume."""
    overrides = list(args.overrides)
    if args.peft is not None:
        from ppt.config import PEFT_STAGES

        stages = [s for s in PEFT_STAGES if s != "none"]
        if args.peft not in stages:
            raise InputError(f"--peft: unknown stage {args.peft!r}; valid: {', '.join(stages)}")
        if args.weights is None or not Path(args.weights).is_file():
            raise InputError(f"--peft {args.peft} needs the base model: --weights FILE (got {args.weights})")
        from ppt.engine.checkpoint import CheckpointError
        from ppt.engine.peft_checkpoint import peft_run_overrides

        try:
            overrides = peft_run_overrides(args.peft, args.weights) + overrides
        except CheckpointError as err:
            raise InputError(str(err)) from None
        args.config = args.config or f"configs/peft_{args.peft}.yaml"
    if args.config is None and args.resume:
        if not args.name:
            raise InputError("--resume needs --name NAME (the experiment to continue) or --config")
        args.config = str(Path(args.exp_root) / args.name / "config.yaml")
        if not Path(args.config).is_file():
            raise InputError(f"--resume: no {args.config} (is --name right? train without --resume first)")
    if args.config is None:
        raise InputError("--config is required (or --peft STAGE, which defaults to configs/peft_STAGE.yaml)")
    if args.data_root is not None:  # first: dataset names resolve against the data root
        overrides.append(f"data.root={args.data_root!r}" if "'" not in args.data_root else f"data.root={args.data_root}")
    notes = []  # said once the config is known to be valid
    if args.datasets is not None:
        mix = parse_mix(args.datasets)
        best_on = config_best_on(args.config, overrides)
        overrides += ["data.mix={" + ", ".join(f"{k}: {v}" for k, v in mix.items()) + "}", "data.val=[]"]
        if best_on not in ("first", "mean", *mix) and not any(o.startswith("train.best_on=") for o in overrides):
            # e.g. ppt_joint.yaml (best by scannet) fine-tuned onto --datasets s3dis
            overrides.append("train.best_on=first")
            notes.append(f"note: --datasets leaves out {best_on}, which train.best_on of {args.config} names: "
                         f"model_best.pth is kept by {next(iter(mix))} (the first dataset); set "
                         f"train.best_on=NAME to choose")
    cfg = load_config(args.config, overrides)
    for note in notes:
        print(note, file=sys.stderr)
    colourless = [d for d in cfg.data.mix if not cfg.dataset_info(d).has_color]
    if colourless and "color" in cfg.data.features and len(colourless) < len(cfg.data.mix) and cfg.data.color_drop == 0:
        print(f"note: {', '.join(colourless)} has no colour (dataset.yaml color: false; its colour is 0) while "
              f"the other datasets have: data.color_drop=0.2 teaches the model to label from geometry too",
              file=sys.stderr)
    name = args.name or Path(args.config).stem
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"--name {name!r} must be a plain folder name")
    exp_dir = Path(args.exp_root) / name
    if args.plan and args.sizes is not None:
        return cfg, exp_dir
    check_data_folders(Path(cfg.data.root), [cfg.dataset_info(d).folder_name for d in [*cfg.data.mix, *cfg.data.val]])
    if args.plan:
        return cfg, exp_dir
    if args.weights is not None and not Path(args.weights).is_file():
        raise InputError(f"--weights file {args.weights} does not exist")
    last = exp_dir / "model" / "model_last.pth"
    if args.resume and not last.is_file():
        raise InputError(f"--resume: no checkpoint {last} (train without --resume first)")
    if not args.resume and last.is_file():
        raise InputError(f"{exp_dir} already holds a run; pass --resume to continue it or choose "
                         f"another --name")
    if cfg.data.check:
        from ppt.data.check import check_data_root

        splits = ("train", "val") if cfg.train.eval_every > 0 else ("train",)
        check_data_root(Path(cfg.data.root), sorted({*cfg.data.mix, *cfg.data.val}), splits, quick=True)
    return cfg, exp_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))

    def fail(err: Exception, status: int = 2) -> int:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return status

    from ppt.data.scene_io import SceneError

    try:  # cheap checks first: a typo fails in a second, before torch is imported
        cfg, exp_dir = prepare(args)
        if args.plan:
            from ppt.engine.plan import format_plan, make_plan, parse_sizes

            sizes = parse_sizes(args.sizes) if args.sizes is not None else None
            if args.world_size < 1:
                raise InputError(f"--world-size must be >= 1, got {args.world_size}")
            plan = make_plan(cfg, args.world_size, sizes)
            print(f"plan for {args.config} ({', '.join(f'{k}:{v}' for k, v in cfg.data.mix.items())}):")
            print(format_plan(plan))
            return 0
    except (InputError, ConfigError, SceneError, ValueError) as err:
        return fail(err)

    from ppt.engine.checkpoint import CheckpointError
    from ppt.engine.distributed import cleanup
    from ppt.engine.trainer import NonFiniteError, SetupError, train
    from ppt.text import TextEncoderUnavailable

    try:
        summary = train(cfg, exp_dir, resume=args.resume, weights=args.weights)
    except (SetupError, CheckpointError, SceneError, TextEncoderUnavailable) as err:
        return fail(err)
    except NonFiniteError as err:
        return fail(err, 1)
    finally:
        cleanup()
    if rank == 0:
        val = " ".join(f"{k} {v['mIoU']:.4f}" for k, v in summary["val"].items())
        best_on = cfg.train.best_on if cfg.train.best_on != "first" else (cfg.data.val or list(cfg.data.mix))[0]
        best = (f"best {best_on} mIoU {summary['best_metric']:.4f} (epoch {summary['best_epoch']})"
                if summary["best_epoch"] >= 0 else "not evaluated")
        if val:
            best += f"; last val mIoU: {val}"
        print(f"done: {summary['epochs']} epochs, {summary['steps']} steps in {summary['seconds']:.0f} s; "
              f"{best}; {exp_dir}")
        board = ".venv/bin/tensorboard" if Path(".venv/bin/tensorboard").exists() else "tensorboard"
        print(f"watch it: {board} --logdir {exp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
