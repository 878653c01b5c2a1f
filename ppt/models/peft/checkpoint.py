"""PEFT checkpoints and base-weight mapping.

A PEFT checkpoint holds only the trainable part of the model (plus the memory bank and the head's
label spaces) and a reference to the base weights: their path and a SHA-256 fingerprint of the
file. Loading rebuilds the model the other way round: base weights (mapped onto the target
model by name) -> stage applied -> trainable part loaded. A base file whose content changed is
refused, naming both fingerprints.

Base -> target mapping (`map_base_state`): every key present in both with the same shape is
copied. Per-dataset entries are matched by dataset NAME: the domain prompt table row by row, and
PDNorm's per-dataset BatchNorms; a dataset the base never saw starts from the base datasets'
mean (prompt = mean prompt; BN affine = mean, statistics = the mixture of the base statistics,
as PDNorm's "mean" domain). The language head's class embeddings come from the target's class
names; other heads' classifiers of a new dataset keep their fresh initialisation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ppt.models.peft.memory_bank import (
    MemoryBank, build_memory_bank, load_memory_bank, save_memory_bank, training_scene_batches,
)
from ppt.models.peft.stages import (
    PeftConfig, PeftSpUNet, apply_stage, parameter_counts, trainable_state_dict,
)

PROMPT_TABLE = "prompts.table.weight"
_NORM_KEY = re.compile(r"^(?P<prefix>.*\.norms\.)(?P<domain>[^.]+)\.(?P<param>[^.]+)$")
_CHUNK = 1 << 20


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file's bytes, as "sha256:<hex>"."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Model state dict from a checkpoint file ({"model": ...}, {"state_dict": ...} or a bare
    state dict); a DDP "module." prefix is stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base weights {path} not found")
    data = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"{path}: no model state dict found (expected a 'model' entry)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in data.items()}


def base_domains(state: dict[str, torch.Tensor]) -> list[str]:
    """Dataset names of a base state dict in prompt-table order (PDNorm's per-dataset norms and
    the language head's label spaces are registered in that order)."""
    names: list[str] = []
    for key in state:
        m = _NORM_KEY.match(key)
        if m and m["domain"] not in names:
            names.append(m["domain"])
    if not names:
        names = [k[len("head.text_"):] for k in state if k.startswith("head.text_")]
    return names


def _mean_norm(state: dict, prefix: str, domains: list[str], param: str) -> torch.Tensor | None:
    values = [state.get(f"{prefix}{d}.{param}") for d in domains]
    if not values or any(v is None for v in values):
        return None
    if param == "num_batches_tracked":
        return torch.stack(values).max()
    if param == "running_var":
        means = torch.stack([state[f"{prefix}{d}.running_mean"] for d in domains])
        second = (torch.stack(values) + means ** 2).mean(0)
        return second - means.mean(0) ** 2
    return torch.stack(values).mean(0)


def map_base_state(base: dict[str, torch.Tensor], model: nn.Module,
                   domains: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map a base state dict onto `model` (a Segmentor) by key and by dataset name.

    Args:
        base: the base model's state dict.
        model: the target model.
        domains: base dataset names in prompt-table order (inferred when None).

    Returns:
        (state dict for ``model.load_state_dict(strict=False)``, report with the keys
        "copied", "derived" (from the base datasets' mean) and "kept" (target init)).
    """
    domains = domains if domains is not None else base_domains(base)
    target = model.state_dict()
    out, report = {}, {"copied": [], "derived": [], "kept": []}
    for key, value in target.items():
        src = base.get(key)
        if src is not None and src.shape == value.shape and key != PROMPT_TABLE:
            out[key] = src
            report["copied"].append(key)
            continue
        derived = None
        if key == PROMPT_TABLE and PROMPT_TABLE in base and domains:
            table = base[PROMPT_TABLE]
            rows = [table[domains.index(d)] if d in domains else table.mean(0) for d in model.domains]
            derived = torch.stack(rows)
        elif (m := _NORM_KEY.match(key)) is not None:
            derived = _mean_norm(base, m["prefix"], domains, m["param"])
        if derived is not None and derived.shape == value.shape:
            out[key] = derived.to(value.dtype)
            report["copied" if key == PROMPT_TABLE and set(model.domains) <= set(domains)
                   else "derived"].append(key)
        else:
            report["kept"].append(key)
    return out, report


def load_base_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load base weights from `path` into `model`, mapped by name; returns the mapping report."""
    state, report = map_base_state(read_model_state(path), model)
    model.load_state_dict(state, strict=False)
    return report


def peft_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a PEFT checkpoint stores of the model: the trainable part for a PEFT stage, the
    whole state dict for full fine-tuning (no stage applied)."""
    if isinstance(model.backbone, PeftSpUNet):
        return trainable_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_payload(model: nn.Module, cfg: PeftConfig, base_path: str | Path,
                 base_fingerprint: str | None = None, domain: str | None = None) -> dict:
    """The PEFT entries of a checkpoint: {"model", "peft", "peft_domain", "base": {"path",
    "fingerprint"}}; `domain` is the target dataset given to `apply_stage`."""
    return {"model": peft_model_state(model), "peft": asdict(cfg), "peft_domain": domain,
            "base": {"path": str(base_path),
                     "fingerprint": base_fingerprint or file_fingerprint(base_path)}}


def save_peft_checkpoint(path: str | Path, model: nn.Module, cfg: PeftConfig,
                         base_path: str | Path, extra: dict | None = None,
                         base_fingerprint: str | None = None, domain: str | None = None) -> None:
    """Atomically write a PEFT checkpoint (plus `extra` entries, e.g. optimiser, epoch)."""
    from ppt.engine.checkpoint import atomic_save

    payload = peft_payload(model, cfg, base_path, base_fingerprint, domain)
    atomic_save({**(extra or {}), **payload}, Path(path))


def is_peft_checkpoint(data: dict) -> bool:
    return isinstance(data, dict) and "peft" in data and "base" in data


def restore_peft_model(model: nn.Module, data: dict, base_path: str | Path | None = None) -> nn.Module:
    """Rebuild a fine-tuned model from a PEFT checkpoint's contents.

    Args:
        model: a fresh target Segmentor built from the run's config (no stage applied).
        data: the loaded PEFT checkpoint.
        base_path: the base weights (default: the path recorded in the checkpoint).
    """
    cfg = PeftConfig(**data["peft"])
    path = Path(base_path or data["base"]["path"])
    if not path.is_file():
        raise FileNotFoundError(f"PEFT checkpoint refers to base weights {path}, which do not exist "
                                f"(pass the base weights' new location)")
    found, expected = file_fingerprint(path), data["base"]["fingerprint"]
    if found != expected:
        raise ValueError(f"base weights {path} changed since fine-tuning: fingerprint {found}, "
                         f"checkpoint expects {expected}")
    load_base_weights(model, path)
    state = data["model"]
    bank = None
    if cfg.stage == "pointpeft":
        names = state.get("backbone.memory_bank._extra_state", {}).get("names")
        if names is None:
            raise ValueError("pointpeft checkpoint lacks its memory bank")
        bank = MemoryBank(state["backbone.memory_bank.features"], names)
    apply_stage(model, cfg, bank, domain=data.get("peft_domain"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lacking = sorted(trainable & set(missing))
    if unexpected or lacking:
        raise ValueError(f"PEFT checkpoint does not fit the model: unexpected keys {unexpected[:5]}, "
                         f"missing trainable keys {lacking[:5]}")
    return model


def load_peft_checkpoint(path: str | Path, model: nn.Module,
                         base_path: str | Path | None = None) -> nn.Module:
    """Load a PEFT checkpoint file into a fresh target model (see `restore_peft_model`)."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not is_peft_checkpoint(data):
        raise ValueError(f"{path} is not a PEFT checkpoint (no 'peft' and 'base' entries)")
    return restore_peft_model(model, data, base_path)


# --- engine glue: tools/train.py (through ppt.engine.trainer) and tools/test.py -------------

MEMORY_BANK_FILE = "memory_bank.pt"


def _bank_from_state(state: dict) -> MemoryBank | None:
    key = "backbone.memory_bank."
    if key + "features" not in state:
        return None
    return MemoryBank(state[key + "features"], state[key + "_extra_state"]["names"])


def prepare_peft_model(model: nn.Module, cfg, exp_dir: str | Path, device: torch.device | str = "cpu",
                       ckpt: dict | None = None) -> str:
    """Base weights (mapped by name) + ``cfg.peft`` stage on a fresh model; returns a report line.

    Args:
        model: the target Segmentor built from ``cfg`` (``ppt.config.Config``).
        cfg: the run's config; ``cfg.peft.base`` names the base weights.
        exp_dir: experiment folder (the memory bank is cached there).
        device: where the memory bank is built.
        ckpt: a checkpoint of this run being resumed or evaluated: its base fingerprint must
            match the base file, and its memory bank is used as is.
    """
    from ppt.engine.checkpoint import CheckpointError

    p = cfg.peft
    base = Path(p.base)
    if not base.is_file():
        raise CheckpointError(f"peft.base: base weights {base} do not exist")
    fingerprint = file_fingerprint(base)
    if ckpt is not None and "base" in ckpt and ckpt["base"]["fingerprint"] != fingerprint:
        raise CheckpointError(f"base weights {base} changed since this PEFT run started: fingerprint "
                              f"{fingerprint}, the checkpoint expects {ckpt['base']['fingerprint']}")
    report = load_base_weights(model, base)
    bank = _bank_from_state(ckpt["model"]) if ckpt is not None else None
    if p.stage == "pointpeft" and bank is None:
        cache = Path(exp_dir) / MEMORY_BANK_FILE
        bank = load_memory_bank(cache, fingerprint)
        if bank is None:
            batches, total = training_scene_batches(cfg)
            bank = build_memory_bank(model.to(device), batches, total, device)
            save_memory_bank(bank, cache, fingerprint)
    domain = next(iter(cfg.data.mix)) if len(cfg.data.mix) == 1 else None
    apply_stage(model, p, bank, domain=domain)
    model.peft_base = {"path": str(base), "fingerprint": fingerprint}
    model.peft_domain = domain
    model.peft_config = asdict(p)
    trainable, total = parameter_counts(model)
    return (f"peft {p.stage} from {base}: {len(report['copied'])} tensors copied, {len(report['derived'])} "
            f"derived from the base datasets' mean, {len(report['kept'])} initialised; "
            f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")


def is_peft_model(model: nn.Module) -> bool:
    return getattr(model, "peft_base", None) is not None


def checkpoint_entries(model: nn.Module) -> dict:
    """The engine checkpoint's model entries for a model set up by `prepare_peft_model`: the
    trainable part as "model", plus "peft", "peft_domain" and "base" (path + fingerprint)."""
    return {"model": peft_model_state(model), "peft": dict(model.peft_config),
            "peft_domain": model.peft_domain, "base": dict(model.peft_base)}


def checkpoint_keys(model: nn.Module) -> set[str]:
    """State-dict keys a PEFT checkpoint of `model` holds."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(model.backbone, PeftSpUNet):
        return set(model.state_dict())
    return {k for k in model.state_dict() if k in trainable or k.startswith(("backbone.memory_bank.", "head.text_"))}


def peft_run_overrides(stage: str, weights: str | Path) -> list[str]:
    """Config overrides of a PEFT run (``tools/train.py --peft STAGE --weights FILE``): the
    stage, the base weights and the base model's ``model`` section (widths, prompt, head and
    text encoder must match the weights), read from the config stored in the base checkpoint."""
    import json

    data = torch.load(weights, map_location="cpu", weights_only=False)
    base_cfg = data.get("config") or {} if isinstance(data, dict) else {}
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in base_cfg.get("model", {}).items()]
    if "voxel_size" in base_cfg.get("data", {}):  # the base's features are for its voxel size
        overrides.append(f"data.voxel_size={base_cfg['data']['voxel_size']}")
    return overrides + [f"peft.stage={stage}", f"peft.base={json.dumps(str(weights))}"]
