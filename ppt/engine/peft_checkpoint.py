"""PEFT runs in the engine: base weights + stage on a fresh model, PEFT checkpoint files, the
Point-PEFT memory bank built from the training scenes, and the config of a PEFT run.

A PEFT checkpoint holds only the trainable part of the model (plus the memory bank and the head's
label spaces) and a reference to the base weights: their path and a SHA-256 fingerprint of the
file. Loading rebuilds the model the other way round: base weights (mapped onto the target
model by key and dataset name, ``ppt.engine.weights``) -> stage applied -> trainable part
loaded. A base file whose content changed is refused, naming both fingerprints.

The memory bank is built once from the training scenes of ``data.mix`` and cached next to the
experiment (``exp/<name>/memory_bank.pt``, written atomically, keyed by the base fingerprint).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ppt.config import PeftConfig
from ppt.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, peft_model_state
from ppt.engine.weights import map_weights
from ppt.models.peft.memory_bank import MemoryBank, build_memory_bank
from ppt.models.peft.stages import apply_stage, parameter_counts

MEMORY_BANK_FILE = "memory_bank.pt"
BANK_PREFIX = "backbone.memory_bank."
_CHUNK = 1 << 20


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file's bytes, as "sha256:<hex>"."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# --- memory bank from the training scenes ------------------------------------------------------

def save_memory_bank(bank: MemoryBank, path: str | Path, fingerprint: str) -> None:
    """Atomic write (temp file + rename) of {features, names, fingerprint} to `path`."""
    atomic_save({"features": bank.features.cpu(), "names": bank.names, "fingerprint": fingerprint}, path)


def load_memory_bank(path: str | Path, fingerprint: str | None = None) -> MemoryBank | None:
    """The cached bank at `path`, or None when absent or built from other base weights."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt cache is rebuilt, not fatal
        print(f"memory bank cache {path} unreadable ({err}); rebuilding")
        return None
    if fingerprint is not None and data.get("fingerprint") != fingerprint:
        return None
    return MemoryBank(data["features"], data["names"])


def training_scene_batches(cfg) -> tuple[Iterable[dict], int]:
    """(batches, count): every training scene of ``cfg.data.mix`` once, one scene per batch,
    through the deterministic validation pipeline (no augmentation, no Mix3D). `cfg` is a
    ``ppt.config.Config``."""
    from ppt.data.collate import collate
    from ppt.data.datasets import build_dataset
    from ppt.data.transforms import build_transforms

    from ppt.engine.build import data_selection

    named = {name: build_dataset(name, cfg.data.root, "train", build_transforms(name, "val", cfg.data.voxel_size,
                                                                           features=tuple(cfg.data.features)),
                                 described=cfg.datasets)
             for name in cfg.data.mix}
    data_selection(cfg, named)  # with data.scene_fraction, only the kept scenes (no labels are read)
    datasets = list(named.values())

    def batches():
        for ds in datasets:
            for i in range(len(ds)):
                yield collate([ds[i]])

    return batches(), sum(len(ds) for ds in datasets)


def _bank_from_state(state: dict) -> MemoryBank | None:
    if BANK_PREFIX + "features" not in state:
        return None
    return MemoryBank(state[BANK_PREFIX + "features"], state[BANK_PREFIX + "_extra_state"]["names"])


# --- PEFT checkpoint files ---------------------------------------------------------------------

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
    payload = peft_payload(model, cfg, base_path, base_fingerprint, domain)
    atomic_save({**(extra or {}), **payload}, Path(path))


def is_peft_checkpoint(data: dict) -> bool:
    return isinstance(data, dict) and "peft" in data and "base" in data


def _check_base(path: Path, expected: str, what: str) -> str:
    """The fingerprint of the base file, which must exist and match ``expected``."""
    if not path.is_file():
        raise CheckpointError(f"{what} refers to base weights {path}, which do not exist "
                              f"(pass the base weights' new location)")
    found = file_fingerprint(path)
    if found != expected:
        raise CheckpointError(f"base weights {path} changed since fine-tuning: fingerprint {found}, "
                              f"{what} expects {expected}")
    return found


def restore_peft_model(model: nn.Module, data: dict, base_path: str | Path | None = None,
                       where: str = "PEFT checkpoint") -> nn.Module:
    """Rebuild a fine-tuned model from a PEFT checkpoint's contents.

    Args:
        model: a fresh target Segmentor built from the run's config (no stage applied).
        data: the loaded PEFT checkpoint.
        base_path: the base weights (default: the path recorded in the checkpoint).
        where: the checkpoint's name in error messages.
    """
    cfg = PeftConfig(**data["peft"])
    path = Path(base_path or data["base"]["path"])
    _check_base(path, data["base"]["fingerprint"], where)
    map_weights(model, path)
    state = data["model"]
    bank = None
    if cfg.stage == "pointpeft":
        bank = _bank_from_state(state)
        if bank is None:
            raise CheckpointError(f"{where}: a pointpeft checkpoint without its memory bank")
    apply_stage(model, cfg, bank, domain=data.get("peft_domain"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lacking = sorted(trainable & set(missing))
    if unexpected or lacking:
        raise CheckpointError(f"{where} does not fit the model: unexpected keys {unexpected[:5]}, "
                              f"missing trainable keys {lacking[:5]}")
    return model


def load_peft_checkpoint(path: str | Path, model: nn.Module,
                         base_path: str | Path | None = None) -> nn.Module:
    """Load a PEFT checkpoint file into a fresh target model (see `restore_peft_model`)."""
    data = load_checkpoint(path)
    if not is_peft_checkpoint(data):
        raise CheckpointError(f"{path} is not a PEFT checkpoint (no 'peft' and 'base' entries)")
    return restore_peft_model(model, data, base_path, where=f"PEFT checkpoint {path}")


# --- a PEFT run of the trainer (tools/train.py --peft) and of tools/test.py -------------------

def prepare_peft_model(model: nn.Module, cfg, exp_dir: str | Path, device: torch.device | str = "cpu",
                       ckpt: dict | None = None) -> str:
    """Base weights (mapped by key and dataset name) + ``cfg.peft`` stage on a fresh model;
    returns the report line the trainer logs.

    Args:
        model: the target Segmentor built from ``cfg`` (``ppt.config.Config``).
        cfg: the run's config; ``cfg.peft.base`` names the base weights.
        exp_dir: experiment folder (the memory bank is cached there).
        device: where the memory bank is built.
        ckpt: a checkpoint of this run being resumed or evaluated: its base fingerprint must
            match the base file, and its memory bank is used as is.
    """
    p = cfg.peft
    base = Path(p.base)
    if not base.is_file():
        raise CheckpointError(f"peft.base: base weights {base} do not exist")
    fingerprint = file_fingerprint(base)
    if ckpt is not None and "base" in ckpt and ckpt["base"]["fingerprint"] != fingerprint:
        raise CheckpointError(f"base weights {base} changed since this PEFT run started: fingerprint "
                              f"{fingerprint}, the checkpoint expects {ckpt['base']['fingerprint']}")
    report = map_weights(model, base)
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
    return (f"peft {p.stage}: base {report.summary()}; {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.2f}%)")


def peft_run_overrides(stage: str, weights: str | Path) -> list[str]:
    """Config overrides of a PEFT run (``tools/train.py --peft STAGE --weights FILE``): the
    stage, the base weights and the base model's ``model`` section (widths, prompt, head and
    text encoder must match the weights), voxel size and input features, read from the config
    stored in the base checkpoint."""
    data = load_checkpoint(weights)  # CheckpointError naming the file when unreadable
    base_cfg = data.get("config") or {} if isinstance(data, dict) else {}
    overrides = [f"{section}.{k}={json.dumps(v)}" for section in ("model", "ptv3")
                 for k, v in base_cfg.get(section, {}).items()]
    if "voxel_size" in base_cfg.get("data", {}):  # the base's features are for its voxel size
        overrides.append(f"data.voxel_size={base_cfg['data']['voxel_size']}")
    if "features" in base_cfg.get("data", {}):  # and its input channels (Sonata: coord + color + normal)
        overrides.append(f"data.features={json.dumps(list(base_cfg['data']['features']))}")
    return overrides + [f"peft.stage={stage}", f"peft.base={json.dumps(str(weights))}"]
