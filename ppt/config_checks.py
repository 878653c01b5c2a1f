"""Checks across the keys of a :class:`ppt.config.Config` (names, choices, shapes, settings
that contradict each other); every failure is one ``ConfigError`` naming the key and the fix.

Kept apart from the dataclasses so each file reads on its own; ``ppt.config`` calls
:func:`validate` after every load and re-exports the choice tuples below.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ppt.config_ptv3 import validate_ptv3
from ppt.typed_config import ConfigError

if TYPE_CHECKING:
    from ppt.config import Config

LOSSES = ("ce", "ce+lovasz")  # = ppt.losses.LOSSES
PEFT_STAGES = ("none", "full", "linear", "decoder", "bitfit", "lora", "dapt", "pointpeft")
LORA_TARGETS = {"spunet": ("qkv",), "ptv3": ("qkv", "proj", "mlp")}  # = ppt.models.peft.lora
GEO_OPERATORS = ("knn", "conv")  # Point-PEFT's geometry operator (ppt.models.peft.point_peft)


def describe_datasets(cfg: Config, bad) -> None:
    """Every dataset name the config uses is built in or described: descriptions missing from
    ``cfg.datasets`` are read from ``<data.root>/<name>/dataset.yaml`` (and kept there)."""
    from ppt.data.classes import DATASETS
    from ppt.data.dataset_file import DatasetFileError, check_name, read_dataset_file, unknown_dataset_message

    for name, spec in cfg.datasets.items():
        if name in DATASETS:
            raise bad(f"datasets.{name}", f"describes the built-in dataset {name!r}; give your own data "
                                          f"another name")
        spec.check(f"config key 'datasets.{check_name(name)}'")
        folder = Path(cfg.data.root) / name
        try:
            on_disk = read_dataset_file(folder)
        except (FileNotFoundError, DatasetFileError):
            continue  # no data here (a trained model run elsewhere): the description stands
        if (on_disk.classes, on_disk.label_file) != (spec.classes, spec.label_file):
            raise bad(f"datasets.{name}", f"(classes {spec.classes}, {spec.label_file}) differs from "
                                          f"{folder}/dataset.yaml (classes {on_disk.classes}, "
                                          f"{on_disk.label_file}): this run's model was made for the "
                                          f"former; point data.root at that data or use another name")
    used = {"data.mix": list(cfg.data.mix), "data.val": list(cfg.data.val),
            "data.crop_points": [n for n in cfg.data.crop_points if n not in DATASETS]}
    for key, names in used.items():
        for name in names:
            if name in DATASETS or name in cfg.datasets:
                continue
            try:
                cfg.datasets[name] = read_dataset_file(Path(cfg.data.root) / check_name(name))
            except FileNotFoundError:
                raise bad(key, f"names an {unknown_dataset_message(name, cfg.data.root)}") from None
            except DatasetFileError as err:
                raise bad(key, f"names dataset {name!r}, whose description is not valid: {err}") from None


def validate(cfg: Config, where: str = "") -> Config:
    """Checks across keys (names, choices, shapes); raises ConfigError."""
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"config key '{key}'{where} {msg}")

    choices = {"optim.name": (cfg.optim.name, ("sgd", "adamw")),
               "optim.scheduler": (cfg.optim.scheduler, ("onecycle", "cosine")),
               "model.prompt": (cfg.model.prompt, ("none", "pdnorm", "inject", "xattn")),
               "model.head": (cfg.model.head, ("language", "decoupled", "union")),
               "model.backbone": (cfg.model.backbone, ("spunet", "ptv3")),
               "train.loss": (cfg.train.loss, LOSSES),
               "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
               "peft.stage": (cfg.peft.stage, PEFT_STAGES),
               "peft.geo_operator": (cfg.peft.geo_operator, GEO_OPERATORS)}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise bad(key, f"is {value!r}; valid: {', '.join(valid)}")
    if not cfg.data.mix:
        raise bad("data.mix", "is empty; name at least one dataset, e.g. {scannet: 1}")
    describe_datasets(cfg, bad)
    for name, ratio in cfg.data.mix.items():
        if ratio < 1:
            raise bad(f"data.mix.{name}", f"must be a positive integer batch ratio, got {ratio}")
    for name, cap in cfg.data.crop_points.items():
        if cap < 0:
            raise bad(f"data.crop_points.{name}", f"must be >= 0 points (0 = no cap), got {cap}")
    cfg.data.crop_points = {**type(cfg.data)().crop_points, **cfg.data.crop_points}  # unnamed: default
    if len(cfg.model.channels) != 8 or len(cfg.model.layers) != 8:
        raise bad("model.channels", "and model.layers need 8 entries each (4 encoder + 4 decoder stages)")
    positive = {"data.voxel_size": cfg.data.voxel_size, "data.batch_size": cfg.data.batch_size,
                "optim.lr": cfg.optim.lr, "train.epochs": cfg.train.epochs, "data.loop": cfg.data.loop,
                "train.max_nonfinite": cfg.train.max_nonfinite, "train.log_every": cfg.train.log_every,
                "model.stem_channels": cfg.model.stem_channels}
    for key, value in positive.items():
        if value <= 0:
            raise bad(key, f"must be > 0, got {value}")
    if not 0.0 <= cfg.data.mix3d_prob <= 1.0:
        raise bad("data.mix3d_prob", f"must be in [0, 1], got {cfg.data.mix3d_prob}")
    if not 0.0 <= cfg.data.color_drop <= 1.0:
        raise bad("data.color_drop", f"must be a probability in [0, 1], got {cfg.data.color_drop}")
    if not 0.0 < cfg.optim.pct_start < 1.0:
        raise bad("optim.pct_start", f"must be in (0, 1), got {cfg.optim.pct_start}")
    if cfg.peft.stage != "none" and not cfg.peft.base:
        raise bad("peft.base", f"is empty; stage {cfg.peft.stage!r} needs base weights (--weights FILE)")
    if cfg.data.label_budget < 0:
        raise bad("data.label_budget", f"must be >= 0 labelled points per scene (0 = all), got {cfg.data.label_budget}")
    if not 0.0 < cfg.data.scene_fraction <= 1.0:
        raise bad("data.scene_fraction", f"must be in (0, 1] (1 = every scene), got {cfg.data.scene_fraction}")
    valid = LORA_TARGETS[cfg.model.backbone]
    if not cfg.peft.lora_targets or any(t not in valid for t in cfg.peft.lora_targets):
        raise bad("peft.lora_targets", f"is {cfg.peft.lora_targets}; valid on {cfg.model.backbone}: {', '.join(valid)}")
    if cfg.peft.lora_alpha <= 0 or not 0.0 <= cfg.peft.lora_dropout < 1.0:
        raise bad("peft.lora_alpha", f"must be > 0 and peft.lora_dropout in [0, 1), got "
                                     f"{cfg.peft.lora_alpha}, {cfg.peft.lora_dropout}")
    for key in ("reduction", "min_rank", "prior_rank", "geo_reduction", "top_k", "lora_rank", "adapter_rank",
                "geo_k", "geo_stride"):
        if getattr(cfg.peft, key) < 1:
            raise bad(f"peft.{key}", f"must be >= 1, got {getattr(cfg.peft, key)}")
    for key in ("dropout", "adapter_dropout", "prompt_dropout"):
        if not 0.0 <= getattr(cfg.peft, key) < 1.0:
            raise bad(f"peft.{key}", f"must be a probability in [0, 1), got {getattr(cfg.peft, key)}")
    if cfg.peft.temperature <= 0:
        raise bad("peft.temperature", f"must be > 0 (1: the Point-PEFT reference's weights), "
                                      f"got {cfg.peft.temperature}")
    from ppt.data.sample_ops import FEATURE_KEYS

    bad_features = [f for f in cfg.data.features if f not in FEATURE_KEYS]
    if not cfg.data.features or bad_features or len(set(cfg.data.features)) != len(cfg.data.features):
        raise bad("data.features", f"is {list(cfg.data.features)}; name each of {', '.join(FEATURE_KEYS)} at most once")
    if cfg.model.in_channels != 3 * len(cfg.data.features):
        raise bad("model.in_channels", f"is {cfg.model.in_channels} but data.features {list(cfg.data.features)} "
                                       f"give {3 * len(cfg.data.features)} channels")
    if cfg.peft.stage == "decoder" and cfg.model.backbone == "ptv3" and cfg.ptv3.enc_mode:
        raise bad("peft.stage", "is 'decoder' but the model is encoder-only (ptv3.enc_mode): it has no decoder "
                                "to probe; use 'linear', or convert the encoder with a decoder config (Pointcept's "
                                "'-dec' configs: the decoder starts fresh)")
    untrained = [d for d in cfg.data.val if d not in cfg.data.mix]
    if untrained and cfg.model.head != "language":
        raise bad("data.val", f"names {', '.join(untrained)}, not in data.mix: the {cfg.model.head} head's "
                              f"classifier for it would never be trained; add it to data.mix, drop it from "
                              f"data.val, or use model.head=language (scores any dataset by its class names)")
    evaluated = cfg.data.val or list(cfg.data.mix)
    if cfg.train.best_on not in ("first", "mean", *evaluated):
        raise bad("train.best_on", f"is {cfg.train.best_on!r}; valid: first, mean or an evaluated "
                                   f"dataset ({', '.join(evaluated)})")
    if cfg.train.precise_bn < 0:
        raise bad("train.precise_bn", f"must be >= 0 batches, got {cfg.train.precise_bn}")
    if cfg.train.precise_bn > 0 and cfg.peft.stage not in ("none", "full"):
        raise bad("train.precise_bn", f"must be 0 with peft.stage {cfg.peft.stage!r}: the stage keeps the "
                                      f"base model's BN statistics frozen")
    if not 0.0 <= cfg.optim.base_momentum <= cfg.optim.max_momentum < 1.0:
        raise bad("optim.base_momentum", f"and optim.max_momentum must satisfy 0 <= base <= max < 1, "
                                         f"got {cfg.optim.base_momentum}, {cfg.optim.max_momentum}")
    if cfg.model.template.count("{}") != 1:
        raise bad("model.template", f"must contain exactly one '{{}}', got {cfg.model.template!r}")
    validate_ptv3(cfg, bad)
    return cfg
