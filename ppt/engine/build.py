"""Builders from a :class:`ppt.config.Config`: model, data, optimiser and scheduler.

Each builder is a plain function of the config section it reads, so ``tools/train.py`` and
the tests build exactly the same objects.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ppt.config import Config, DataConfig, ModelConfig, OptimConfig
from ppt.engine.threads import loader_workers, local_processes
from ppt.io import atomic_write
from ppt.models.heads import TEXT_PREFIX


def model_datasets(cfg: Config) -> list[str]:
    """The model's domains / label spaces: the training mix, then any extra val datasets."""
    names = list(cfg.data.mix)
    return names + [d for d in cfg.data.val if d not in names]


def trained_domains(cfg: Config) -> list[str]:
    """Domains whose prompt and normalisation were trained: the datasets of ``data.mix``
    (``data.val`` datasets outside the mix are in the model but untrained)."""
    return list(cfg.data.mix)


def build_text_embeddings(cfg: ModelConfig, class_names: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """(K_d, D) frozen class-name embeddings per dataset (disk-cached by ``ppt.text``).

    Args:
        cfg: the model section (text encoder, template).
        class_names: dataset -> class names in label order (``Config.dataset_info``).
    """
    from ppt.text import class_embeddings

    return {d: class_embeddings(names, cfg.text_encoder, cfg.template) for d, names in class_names.items()}


def text_embeddings_from_state(state: dict) -> dict[str, torch.Tensor]:
    """Class embeddings stored in a checkpoint's model state (no text encoder needed to resume)."""
    key = "head." + TEXT_PREFIX
    return {k[len(key):]: v for k, v in state.items() if k.startswith(key)}


def build_model(cfg: Config, text_embeddings: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The Segmentor of ``cfg.model`` over the config's datasets.

    The backbone is ``model.backbone``: SpUNet from ``model.channels`` / ``model.layers``, or
    PTv3 from the ``ptv3`` section.

    Args:
        cfg: full config (model section + dataset names).
        text_embeddings: precomputed embeddings (e.g. from a checkpoint); default: encode the
            class names with ``cfg.model.text_encoder`` (language head only).
    """
    from dataclasses import asdict

    from ppt.models.prompts import set_mean_domains
    from ppt.models.segmentor import Segmentor

    m = cfg.model
    datasets = model_datasets(cfg)
    class_names = {d: cfg.dataset_info(d).class_names for d in datasets}
    if m.head == "language" and (text_embeddings is None or any(d not in text_embeddings for d in datasets)):
        text_embeddings = build_text_embeddings(m, class_names)
    if m.backbone == "ptv3":
        backbone = dict(in_channels=m.in_channels, **asdict(cfg.ptv3))
    else:
        backbone = dict(in_channels=m.in_channels, channels=tuple(m.channels), layers=tuple(m.layers),
                        stem_channels=m.stem_channels)
    model = Segmentor(
        class_names=class_names,
        backbone=backbone, backbone_type=m.backbone,
        prompt=m.prompt, prompt_dim=m.prompt_dim, decoupled_bn=m.decoupled_bn, head=m.head,
        text_embeddings=text_embeddings if m.head == "language" else None,
        logit_scale=m.logit_scale, learnable_scale=m.logit_scale_learnable,
        zero_init=m.zero_init, prompt_adaptive=m.prompt_adaptive,
    )
    set_mean_domains(model, trained_domains(cfg))  # "mean" = the trained datasets only
    return model


def per_rank_batch_size(data: DataConfig, world_size: int) -> int:
    if data.batch_size % world_size:
        raise ValueError(f"data.batch_size={data.batch_size} (total over processes) is not divisible "
                         f"by the {world_size} processes")
    return data.batch_size // world_size


def build_train_loader(cfg: Config, rank: int = 0, world_size: int = 1):
    """MultiDatasetLoader over the train splits of ``cfg.data.mix`` (this rank's shard).

    ``data.loop`` repeats the first (main) dataset only: it sets the epoch length, and the
    other datasets are re-iterated by the loader whenever they run out (as the reference).

    With ``data.label_budget`` / ``data.scene_fraction`` the datasets keep only the selected
    scenes and labels (``ppt.data.efficiency``); the selection is ``loader.selection`` (None
    without them), which the trainer writes into the experiment folder (:func:`save_selection`)."""
    from ppt.data.datasets import build_dataset
    from ppt.data.mixing import MultiDatasetLoader
    from ppt.data.transforms import build_transforms

    d = cfg.data
    main = next(iter(d.mix))
    datasets = {name: build_dataset(name, d.root, "train",
                                    build_transforms(name, "train", d.voxel_size, augment=d.augment,
                                                     elastic=d.elastic, color_drop=d.color_drop,
                                                     crop_points=d.crop_points.get(name),
                                                     features=tuple(d.features)),
                                    loop=d.loop if name == main else 1, described=cfg.datasets)
                for name in d.mix}
    selection = data_selection(cfg, datasets)
    loader = MultiDatasetLoader(datasets, dict(d.mix), per_rank_batch_size(d, world_size),
                                num_workers=loader_workers(d.num_workers, local_processes()), seed=cfg.train.seed,
                                rank=rank, world_size=world_size, mix3d_prob=d.mix3d_prob)
    loader.selection = selection
    return loader


SCENES_FILE, LABELS_FILE = "scenes.json", "label_budget.json"


def data_selection(cfg: Config, datasets: dict):
    """Draw and apply the data-efficient selection to the training ``datasets`` (in place);
    returns the ``ppt.data.efficiency.Selection``, or None when neither setting is on."""
    if cfg.data.label_budget == 0 and cfg.data.scene_fraction >= 1.0:
        return None
    from ppt.data.efficiency import apply_selection, select

    selection = select(datasets, cfg.data.label_budget, cfg.data.scene_fraction, cfg.train.seed)
    apply_selection(datasets, selection)
    return selection


def save_selection(selection, exp_dir: str | Path) -> None:
    """Write ``scenes.json`` (with a scene fraction) and ``label_budget.json`` (with a label
    budget) into ``exp_dir``, each atomically."""
    files = {SCENES_FILE: selection.scenes_json() if selection.scene_fraction < 1.0 else None,
             LABELS_FILE: selection.labels_json() if selection.label_budget > 0 else None}
    for name, data in files.items():
        if data is not None:
            text = json.dumps(data, separators=(",", ":")).encode()
            atomic_write(Path(exp_dir) / name, lambda f, t=text: f.write(t))


def check_saved_selection(selection, exp_dir: str | Path) -> None:
    """A resumed run trains on the lists it started with: ValueError naming the file when the
    saved lists differ from what the data and config give now."""
    from ppt.data.efficiency import selection_mismatch

    def read(name: str):
        path = Path(exp_dir) / name
        return json.loads(path.read_text()) if path.is_file() else None

    why = selection_mismatch(selection, read(SCENES_FILE), read(LABELS_FILE))
    if why is not None:
        raise ValueError(f"--resume: {Path(exp_dir)}/{why} (was the data changed?); the run cannot "
                         f"continue on other scenes or labels")


def build_val_datasets(cfg: Config) -> dict:
    """Val split of each evaluated dataset (raw scenes: ``evaluate`` applies the val pipeline)."""
    from ppt.data.datasets import build_dataset

    return {name: build_dataset(name, cfg.data.root, "val", described=cfg.datasets)
            for name in (cfg.data.val or list(cfg.data.mix))}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Base group at ``lr``, prompt group (``model.prompt_parameters()``) at ``lr *
    prompt_lr_scale`` and, when ``block_lr_scale != 1``, a block group
    (``model.block_parameters()``: the backbone blocks' weights, the PTv3 recipe's "block"
    keyword) at ``lr * block_lr_scale``; each group carries its own peak lr (``max_lr``)."""
    prompt_ids = {id(p) for p in model.prompt_parameters()} if hasattr(model, "prompt_parameters") else set()
    block_ids = set()
    if cfg.block_lr_scale != 1.0 and hasattr(model, "block_parameters"):
        block_ids = {id(p) for p in model.block_parameters()} - prompt_ids
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in prompt_ids | block_ids], "lr": cfg.lr,
               "max_lr": cfg.lr, "name": "base"}]
    for name, ids, scale in (("prompt", prompt_ids, cfg.prompt_lr_scale), ("block", block_ids, cfg.block_lr_scale)):
        params = [p for p in trainable if id(p) in ids]
        if params:
            groups.append({"params": params, "lr": cfg.lr * scale, "max_lr": cfg.lr * scale, "name": name})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over :func:`param_groups`."""
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Per-step schedule with one peak lr PER GROUP (the group's ``max_lr``).

    "onecycle": ``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing; with
    ``cycle_momentum`` SGD's momentum / AdamW's beta1 runs from ``max_momentum`` down to
    ``base_momentum`` while the lr rises and back, as the reference recipe). "cosine": linear
    warm-up over ``pct_start`` of the steps from ``max_lr / div_factor``, then cosine down to
    ``max_lr / final_div_factor`` (momentum fixed).
    """
    total_steps = max(1, total_steps)
    max_lrs = [g["max_lr"] for g in optimizer.param_groups]
    if cfg.scheduler == "onecycle":
        # OneCycleLR divides by its warm-up length in steps minus one: a warm-up of one step or
        # less (pct_start 0.05 of a 20-step run) raised ZeroDivisionError. Such short runs
        # warm up for 1.5 steps instead.
        pct = cfg.pct_start if cfg.pct_start * total_steps > 1 else min(0.99, 1.5 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=pct,
            anneal_strategy="cos", cycle_momentum=cfg.cycle_momentum and _has_momentum(optimizer),
            base_momentum=cfg.base_momentum, max_momentum=cfg.max_momentum, div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = group["max_lr"]
    warmup = max(1, int(cfg.pct_start * total_steps))
    start, end = 1.0 / cfg.div_factor, 1.0 / cfg.final_div_factor

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """OneCycleLR can cycle SGD's momentum (when > 0) or Adam-style beta1."""
    defaults = optimizer.defaults
    return "betas" in defaults or defaults.get("momentum", 0) > 0
