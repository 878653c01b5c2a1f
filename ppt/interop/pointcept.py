"""Pointcept checkpoints in and out: ``tools/convert.py`` is a thin command line over this.

Import (:func:`import_checkpoint`): a Pointcept checkpoint (``{"state_dict": ...}``, keys with
or without ``module.``; a pretraining checkpoint's encoder under ``student.backbone.``) plus the
reference config it was trained with (a file, read safely by ``ppt.interop.pointcept_config``,
or a preset name of ``ppt.interop.pointcept_presets``) -> an experiment folder
``<exp_root>/<name>/`` (``config.yaml``, ``model/model_best.pth``, ``convert.json``) that
``tools/test.py``, ``tools/infer.py``, ``tools/train.py --weights`` and ``--peft`` use as one
trained here. The folder is written to a temp folder beside it and renamed into place. The
reference config's training recipe comes along (:func:`reference_recipe`: optimiser, OneCycle
schedule, loss, the "block" parameter group, epochs, batch); ``convert.json`` lists what was
carried over (``recipe``: key, value, reference key) and what has no counterpart here
(``not_mapped``). A checkpoint whose key names say another model type than the config (its stem:
SpUNet ``conv_input``, PT-v3m1 ``embedding.stem.conv``, PT-v3m2 ``embedding.stem.linear``; its
head: PPT ``embedding_table``, ``seg_head``, ...) is refused with both types named
(:func:`ppt.interop.pointcept_shared.checkpoint_model_type`).

Export (:func:`export_experiment`): an experiment of this project -> ``{"state_dict": ...}``
loadable with ``strict=True`` by the reference model built from the same reference config
(the one recorded in ``convert.json`` for a converted model, or ``--config``, or, for SpUNet
models, the reference model dict derived from this project's config, written next to the
checkpoint as ``<out>.model.py``).

Model families (picked by the reference backbone ``type``, :data:`FAMILIES`) live in their own
modules with three functions: ``config_sections(model_cfg) -> {"model": {...}, "ptv3": {...}}``,
``to_ours(state, model_cfg) -> state`` and ``to_pointcept(state, model_cfg) -> state``, where
``model_cfg`` is the reference's ``model`` dict with :data:`DATASETS_KEY` added (this project's
dataset names of the model's domains, in prompt-table order; :func:`datasets_of`). Every
reference key must be consumed and every key of this project's model produced; the result is
loaded with ``strict=True`` before anything is written.

Dataset names and PPT-v1m1's language head (shared with the families):
``ppt.interop.pointcept_shared``.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import pprint
import shutil
import tempfile
from pathlib import Path

import torch

from ppt.interop import ConversionError
from ppt.interop.pointcept_shared import (
    CLIP_ENCODERS, DATASET_TYPES, DATASETS_KEY, NAME_ALIASES, PRETRAIN_PREFIX, backbone_type, checkpoint_model_type,
    dataset_of_condition, datasets_of, model_mismatch,
)
from ppt.io import atomic_write

# reference backbone type -> family module
FAMILIES = {
    "SpUNet-v1m1": "ppt.interop.pointcept_spunet",
    "SpUNet-v1m3": "ppt.interop.pointcept_spunet",
    "PT-v3m1": "ppt.interop.pointcept_ptv3",
    "PT-v3m2": "ppt.interop.pointcept_ptv3",
}


def family_of(model_cfg: dict):
    """The family module that converts this reference model (by backbone type)."""
    kind = backbone_type(model_cfg)
    if kind not in FAMILIES:
        raise ConversionError(f"reference model type 'model.backbone.type={kind}' is not supported; "
                              f"supported: {', '.join(FAMILIES)}")
    try:
        return importlib.import_module(FAMILIES[kind])
    except ImportError as err:
        raise ConversionError(f"reference model type {kind}: its converter is not available ({err})") from None


# --- reading the reference's files ------------------------------------------------------------

def load_reference_config(config: str | os.PathLike) -> tuple[dict, str]:
    """(evaluated config dict, where it came from) for a config file path or a preset name."""
    from ppt.interop.pointcept_config import load_pointcept_config
    from ppt.interop.pointcept_presets import PRESETS

    if str(config) in PRESETS:  # a preset's "recipe" (optimizer, scheduler, epoch, ...) where it has one
        preset = PRESETS[str(config)]
        return {**copy.deepcopy(preset.get("recipe", {})), "model": copy.deepcopy(preset["model"]),
                "data": copy.deepcopy(preset["data"])}, f"preset {config} ({preset['source']})"
    path = Path(config)
    if not path.is_file():
        raise ConversionError(f"config {config} does not exist and is not a preset; presets: {', '.join(PRESETS)}")
    return load_pointcept_config(path), str(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(reference state dict without ``module.``, notes) of a Pointcept checkpoint file.

    A pretraining checkpoint (keys ``student.backbone.*``) gives its student encoder as
    ``backbone.*``; the rest of it (teacher, heads, mask token) is dropped and noted."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and tensor errors all mean "not a checkpoint we can read"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConversionError(f"checkpoint {path} is corrupt or not a torch checkpoint "
                              f"({type(err).__name__}: {reason[:200]})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ConversionError(f"checkpoint {path} holds no state dict (expected {{'state_dict': {{name: tensor}}}})")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items() if torch.is_tensor(v)}
    notes = []
    if any(k.startswith(PRETRAIN_PREFIX) for k in state):
        dropped = [k for k in state if not k.startswith(PRETRAIN_PREFIX)]
        state = {"backbone." + k[len(PRETRAIN_PREFIX):]: v for k, v in state.items() if k.startswith(PRETRAIN_PREFIX)}
        notes.append(f"pretraining checkpoint: took the {len(state)} tensors under {PRETRAIN_PREFIX}, "
                     f"dropped {len(dropped)} others (teacher, pretraining heads, mask token)")
    return state, notes


def _class_names_match(reference: list[str], ours: tuple[str, ...]) -> bool:
    return [NAME_ALIASES.get(n, n) for n in reference] == list(ours)


def single_dataset(ref: dict) -> str:
    """This project's dataset of a single-dataset reference config (its val, else train, type),
    checked against ``data.num_classes`` / ``data.names``."""
    from ppt.data.dataset_file import get_dataset_info

    data = ref.get("data") or {}
    kinds = [data.get(split, {}).get("type") for split in ("val", "train", "test") if isinstance(data.get(split), dict)]
    known = [DATASET_TYPES[k] for k in kinds if k in DATASET_TYPES]
    if not known:
        raise ConversionError(f"reference config key 'data.val.type' ({kinds[0] if kinds else 'missing'}) names no "
                              f"dataset known here; known: {', '.join(DATASET_TYPES)}")
    info = get_dataset_info(known[0])
    if "num_classes" in data and data["num_classes"] != info.num_classes:
        raise ConversionError(f"reference config key 'data.num_classes' is {data['num_classes']}; "
                              f"{info.name} has {info.num_classes} classes here")
    if "names" in data and not _class_names_match(list(data["names"]), info.class_names):
        raise ConversionError(f"reference config key 'data.names' differs from {info.name}'s class list here "
                              f"(same names in the same label order needed): {list(data['names'])}")
    return info.name


def _voxel_size(ref: dict) -> float:
    """The reference's grid size (test voxelize, else val GridSample); 0.02 when absent."""
    data = ref.get("data") or {}
    test = (data.get("test") or {}).get("test_cfg") or {}
    if isinstance(test.get("voxelize"), dict) and "grid_size" in test["voxelize"]:
        return float(test["voxelize"]["grid_size"])
    for t in (data.get("val") or {}).get("transform", []) or []:
        if isinstance(t, dict) and t.get("type") == "GridSample":
            return float(t["grid_size"])
    return 0.02


def reference_features(ref: dict, model_cfg: dict) -> tuple[str, ...]:
    """The point attributes the reference model reads, in order (this project's
    ``data.features``): its val ``Collect(feat_keys=...)``, else what ``in_channels`` implies
    (6: color + normal as the SpUNet / PTv3 configs; 9: coord + color + normal as Sonata /
    Concerto). ConversionError when the keys are unknown here or disagree with ``in_channels``."""
    from ppt.data.sample_ops import FEATURE_KEYS

    keys = None
    for t in ((ref.get("data") or {}).get("val") or {}).get("transform", []) or []:
        if isinstance(t, dict) and t.get("type") == "Collect" and "feat_keys" in t:
            keys = tuple(t["feat_keys"])
    channels = (model_cfg.get("backbone") or {}).get("in_channels")
    if keys is None:
        keys = {6: ("color", "normal"), 9: ("coord", "color", "normal")}.get(channels if channels is not None else 6)
        if keys is None:
            raise ConversionError(f"reference config key 'model.backbone.in_channels' is {channels} and its val "
                                  f"Collect names no feat_keys; this project reads 3 channels from each of "
                                  f"{', '.join(FEATURE_KEYS)}")
    unknown = [k for k in keys if k not in FEATURE_KEYS]
    if unknown or len(set(keys)) != len(keys):
        raise ConversionError(f"reference config key 'data.val.transform.Collect.feat_keys' is {keys}; this project "
                              f"reads each of {', '.join(FEATURE_KEYS)} at most once")
    if channels is not None and channels != 3 * len(keys):
        raise ConversionError(f"reference config key 'model.backbone.in_channels' is {channels} but its feat_keys "
                              f"{keys} give {3 * len(keys)} channels")
    return keys


def reference_model(ref: dict) -> dict:
    """The reference ``model`` dict with this project's dataset names added (:data:`DATASETS_KEY`)."""
    if not isinstance(ref.get("model"), dict):
        raise ConversionError("reference config has no 'model' dict")
    model_cfg = copy.deepcopy(ref["model"])
    if DATASETS_KEY not in model_cfg:
        if "conditions" in model_cfg:
            model_cfg[DATASETS_KEY] = [dataset_of_condition(c) for c in model_cfg["conditions"]]
        else:
            model_cfg[DATASETS_KEY] = [single_dataset(ref)]
    return model_cfg


def reference_recipe(ref: dict, model_cfg: dict):
    """The reference config's training recipe in this project's keys
    (:func:`ppt.interop.pointcept_recipe.training_recipe`; what does not map is listed there)."""
    from ppt.interop.pointcept_recipe import training_recipe

    model = family_of(model_cfg).config_sections(model_cfg).get("model", {})
    prompts = model.get("prompt", "none") != "none"
    return training_recipe(ref, prompts=prompts, adaptive=prompts and bool(model.get("prompt_adaptive", True)))


def config_from_reference(ref: dict, model_cfg: dict, state: dict):
    """This project's :class:`ppt.config.Config` for a reference config (+ the state's logit
    scale): model and data from the reference's model and val data, the training recipe
    (optimiser, schedule, loss, parameter groups, epochs, batch) by :func:`reference_recipe`."""
    from ppt.config import config_from_dict

    family = family_of(model_cfg)
    sections = family.config_sections(model_cfg)
    recipe = reference_recipe(ref, model_cfg)
    datasets = datasets_of(model_cfg)
    val_types = [(ref.get("data") or {}).get("val", {}).get("type")] if isinstance((ref.get("data") or {}).get("val"), dict) else []
    val = [DATASET_TYPES[t] for t in val_types if t in DATASET_TYPES and DATASET_TYPES[t] in datasets]
    cfg = {"data": {"mix": {d: 1 for d in datasets}, "val": val, "voxel_size": _voxel_size(ref),
                    "features": list(reference_features(ref, model_cfg))},
           **{k: dict(v) for k, v in sections.items()}}
    cfg["data"].update(recipe.sections["data"])
    for section in ("optim", "train"):
        cfg.setdefault(section, {}).update(recipe.sections[section])
    model = cfg.setdefault("model", {})
    if "logit_scale" in state:  # PPT: exp of the reference's (CLIP's) learned log scale
        model["logit_scale"] = float(math.exp(float(state["logit_scale"])))
    if "clip_model" in model_cfg and model.get("head") == "language":
        model["text_encoder"] = CLIP_ENCODERS.get(model_cfg["clip_model"], "clip:" + model_cfg["clip_model"].replace("/", "-") + ":openai")
        model["template"] = model_cfg.get("template", "[x]").replace("[x]", "{}")
    try:
        return config_from_dict(cfg, " (converted from the reference config)")
    except ValueError as err:
        raise ConversionError(str(err)) from None


# --- import -----------------------------------------------------------------------------------

def write_text_cache(folder: Path, model_cfg: dict, state: dict, cfg) -> list[str]:
    """Training embeds each dataset's class names with the model's text encoder (``ppt.text``).
    The reference's ``class_embedding`` holds that encoder's text of every name of its table
    (CLIP, template ``[x]``): the rows picked by NAME (not by ``valid_index``) are exactly what
    ``ppt.text.class_embeddings`` would compute for a dataset whose names all appear there. They
    are written as text-embedding cache files into the shared cache (``$PPT_CACHE``, where every
    tool looks: a converted PPT model fine-tunes without the CLIP weights on the machine) and
    into ``folder/text_embeddings/`` (a copy that travels with the experiment). Returns the
    datasets written."""
    from ppt.data.dataset_file import get_dataset_info
    from ppt.text import cache_path, save_embeddings

    emb, table = state.get("class_embedding"), model_cfg.get("class_name")
    if emb is None or table is None or cfg.model.head != "language":
        return []
    rows = {NAME_ALIASES.get(n, n): i for i, n in enumerate(table)}
    done = []
    for d in datasets_of(model_cfg):
        names = get_dataset_info(d).class_names
        if all(n in rows for n in names):
            for where in (None, folder / "text_embeddings"):
                try:
                    path = cache_path(names, cfg.model.text_encoder, cfg.model.template, where)
                except ValueError:  # an encoder name open_clip does not know: no cache key
                    return done
                save_embeddings(path, emb[[rows[n] for n in names]].float(), names, cfg.model.text_encoder,
                                cfg.model.template)
            done.append(d)
    return done


def convert_state(state: dict, model_cfg: dict, cfg) -> dict:
    """Reference state -> this project's state, checked by a strict load into the built model."""
    from ppt.engine.build import build_model, text_embeddings_from_state

    family = family_of(model_cfg)
    ours = family.to_ours(dict(state), model_cfg)
    torch.manual_seed(0)  # a fresh decoder / head is the same on every conversion
    model = build_model(cfg, text_embeddings_from_state(ours))
    own = model.state_dict()
    fresh = getattr(family, "FRESH_DECODER", None)
    if fresh and not any(k.startswith(fresh) for k in ours):  # a pretraining encoder under a decoder config
        ours.update({k: v for k, v in own.items() if k.startswith(fresh)})
    missing = [k for k in own if k not in ours]
    unexpected = [k for k in ours if k not in own]
    shapes = [f"{k} {tuple(ours[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in ours and tuple(ours[k].shape) != tuple(v.shape)]
    for what, keys in (("produced no value for", missing), ("produced keys the model lacks:", unexpected),
                       ("shape mismatch:", shapes)):
        if keys:
            raise ConversionError(f"conversion {what} {', '.join(keys[:4])}" + (f" ({len(keys)} in all)" if len(keys) > 4 else ""))
    model.load_state_dict(ours, strict=True)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def import_checkpoint(checkpoint: str | os.PathLike, config: str | os.PathLike, name: str,
                      exp_root: str | os.PathLike = "exp") -> Path:
    """Convert a Pointcept checkpoint into ``<exp_root>/<name>/``; returns the folder.

    Raises:
        ConversionError: missing/corrupt checkpoint or config, unsupported model type, a
            checkpoint of another model type than the config, unmapped key, shape mismatch,
            existing target folder. Nothing is written then.
    """
    from ppt.config import save_config

    if not name or "/" in name or name.startswith("."):
        raise ConversionError(f"--name {name!r} must be a plain folder name")
    target = Path(exp_root) / name
    if target.exists():
        raise ConversionError(f"{target} already exists; choose another --name or remove it")
    ref, source = load_reference_config(config)
    state, notes = read_checkpoint(checkpoint)
    model_cfg = reference_model(ref)
    family_of(model_cfg)  # a config type this converter has no family for is said as such first
    mismatch = model_mismatch(state, model_cfg, source)
    _, backbone, _ = checkpoint_model_type(state)
    if mismatch and backbone is not None and backbone != backbone_type(model_cfg):
        raise ConversionError(mismatch)  # another backbone: no key can map; say so before building anything
    try:
        cfg = config_from_reference(ref, model_cfg, state)
        ours = convert_state(state, model_cfg, cfg)
    except ConversionError as err:
        if mismatch:  # another head type: the missing / unmapped key is a symptom
            raise ConversionError(f"{mismatch} ({err})") from None
        raise
    recipe = reference_recipe(ref, model_cfg)
    if cfg.model.backbone == "ptv3" and not cfg.ptv3.enc_mode and not any(k.startswith("backbone.dec.") for k in state):
        notes.append("the checkpoint has no decoder (a pretraining encoder): the decoder starts from a fresh "
                     "initialisation, as the reference's decoder-probing / fine-tuning configs start it")
    if cfg.model.backbone == "ptv3" and not any(k.startswith(("seg_head.", "seg_heads.", "proj_head.")) for k in state):
        notes.append("the checkpoint has no segmentation head: the head starts fresh (train it before use)")
    record = {"pointcept_checkpoint": str(checkpoint), "pointcept_config": source, "notes": notes,
              "recipe": recipe.mapped, "not_mapped": recipe.not_mapped,
              "reference_keys": len(state), "keys": len(ours), "pointcept_model": _plain(model_cfg)}
    Path(exp_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=exp_root, prefix=f".{name}.", suffix=".tmp"))
    try:
        (tmp / "model").mkdir()
        save_config(cfg, tmp / "config.yaml")
        torch.save({"version": 1, "model": ours, "config": cfg.to_dict(), "epoch": 0, "pointcept": record},
                   tmp / "model" / "model_best.pth")
        cached = write_text_cache(tmp, model_cfg, state, cfg)
        if cached:
            from ppt.text import default_cache_dir

            record["notes"].append(f"text embeddings of {', '.join(cached)} by class name from the reference's "
                                   f"class_embedding written to the text-embedding cache ({default_cache_dir()}; "
                                   f"a copy in {target}/text_embeddings): fine-tuning needs no CLIP weights")
        (tmp / "convert.json").write_text(json.dumps(record, indent=1) + "\n")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _plain(value):
    """Tuples -> lists, recursively (JSON); the checkpoint stores plain containers only."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- export -----------------------------------------------------------------------------------

def export_experiment(exp: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """Write ``{"state_dict": ...}`` for the reference model of ``config`` (default: the one
    recorded by the import, else derived from this project's config) to ``out`` atomically."""
    from ppt.engine.checkpoint import CheckpointError, atomic_save
    from ppt.engine.predict import ExperimentError, load_experiment

    try:
        cfg, model, ckpt_path = load_experiment(exp)
    except (ExperimentError, CheckpointError) as err:
        raise ConversionError(str(err)) from None
    record_path = Path(exp) / "convert.json"
    if config is not None:
        ref, _ = load_reference_config(config)
        model_cfg = reference_model(ref)
    elif record_path.is_file():
        model_cfg = json.loads(record_path.read_text())["pointcept_model"]
    else:
        from ppt.interop import pointcept_spunet

        if cfg.model.backbone != "spunet":
            raise ConversionError(f"{exp} was not converted from Pointcept: pass --config with the reference config "
                                  f"of a {cfg.model.backbone} model")
        model_cfg = pointcept_spunet.pointcept_model(cfg)
        from ppt.data.dataset_file import get_dataset_info

        reference = {k: v for k, v in model_cfg.items() if k != DATASETS_KEY}
        main = get_dataset_info(model_cfg[DATASETS_KEY][0])
        data = dict(num_classes=main.num_classes, names=list(main.class_names),
                    val=dict(type={v: k for k, v in DATASET_TYPES.items()}[main.name]))
        atomic_write(str(out) + ".model.py", lambda f: f.write(
            f"# reference model of {exp} and its label space, for a Pointcept config\n"
            f"model = {pprint.pformat(reference, sort_dicts=False)}\n"
            f"data = {pprint.pformat(data, sort_dicts=False)}\n".encode()))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    learnt = state.pop("head.log_scale", None)  # model.logit_scale_learnable: log s, capped at log 100 as used
    ref_state = family_of(model_cfg).to_pointcept(state, model_cfg)
    if model_cfg.get("type") in ("PPT-v1m1", "PPT-v1m3"):  # the reference learns log(scale); ours is a config value
        ref_state["logit_scale"] = (learnt.float().clamp(max=math.log(100.0)) if learnt is not None
                                    else torch.tensor(math.log(cfg.model.logit_scale)))
    atomic_save({"state_dict": ref_state, "epoch": 0, "ppt_experiment": str(exp)}, out)
    return Path(out)
