"""Checkpoints: atomic writes, exact resume, the checkpoints of PEFT runs.

A checkpoint (``exp/<name>/model/model_last.pth`` / ``model_best.pth``) is a dict::

    version, model, optimizer, scheduler, scaler, loader (MultiDatasetLoader.state_dict()),
    epoch, step (optimizer steps done), best_metric, best_epoch, nonfinite_steps,
    rng (one entry per rank: python, numpy, torch, cuda), config (resolved, plain dict)

Everything is plain containers and tensors, so it loads with ``torch.load(weights_only=True)``.
Resuming restores all of it: a run killed at any point and resumed from its last checkpoint
ends with exactly the weights of an uninterrupted run (same seed, CPU).

A PEFT run's checkpoint (a model set up by ``ppt.engine.peft_checkpoint.prepare_peft_model``)
holds only the trainable part as ``model``, plus ``peft``, ``peft_domain`` and ``base`` (path
and fingerprint of the base weights). Starting a model from another checkpoint's weights
(fine-tuning, PEFT base) is ``ppt.engine.weights``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ppt.io import atomic_write

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "loader", "epoch", "step", "rng", "config")
MAX_LISTED = 6


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model (message names the file)."""


def summarize_keys(keys, limit: int = MAX_LISTED) -> str:
    """The first ``limit`` keys, then the total count: "a, b, ... (12 in all)"."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` (never half-written)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    """This process's RNG states as plain containers and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    state = {"python": [version, list(internal), gauss_py],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`atomic_save` (CPU tensors).

    Raises:
        CheckpointError: missing file, unreadable/corrupt file, or missing entries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and tensor errors all mean "not a usable checkpoint"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PPT checkpoint "
                              f"({type(err).__name__}: {reason[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def check_resumable(ckpt: dict, path: str | os.PathLike) -> None:
    """Raise CheckpointError when ``ckpt`` lacks what exact resume needs."""
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed from: it lacks {summarize_keys(missing)} "
                              f"(a weights-only file? use --weights to fine-tune from it)")


def strip_ddp_prefix(state: dict) -> dict:
    """A state dict saved from a DDP wrapper (every key "module.") with the prefix removed."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` was set up by ``ppt.engine.peft_checkpoint.prepare_peft_model``."""
    return getattr(model, "peft_base", None) is not None


def peft_model_state(model: nn.Module) -> dict:
    """What a PEFT checkpoint stores of the model: the trainable part (plus memory bank and label
    spaces) once a stage is applied, the whole state dict for full fine-tuning (no stage)."""
    from ppt.models.peft.stages import is_staged, trainable_state_dict

    if is_staged(model.backbone):
        return trainable_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_checkpoint_keys(model: nn.Module) -> set[str]:
    """State-dict keys the checkpoint of a PEFT run holds (see :func:`peft_model_state`)."""
    from ppt.models.peft.stages import is_staged, stage_state_keys

    if not is_staged(model.backbone):
        return set(model.state_dict())
    return stage_state_keys(model)


def peft_checkpoint_entries(model: nn.Module) -> dict:
    """The model entries of a PEFT run's checkpoint: "model" (trainable part), "peft",
    "peft_domain" and "base" (path + fingerprint of the base weights)."""
    return {"model": peft_model_state(model), "peft": dict(model.peft_config),
            "peft_domain": model.peft_domain, "base": dict(model.peft_base)}


def load_model_state(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """Strict load with a readable summary of what does not fit."""
    state = strip_ddp_prefix(state)
    own = model.state_dict()
    peft = is_peft_model(model)
    if peft:  # a PEFT run's checkpoint holds only its trainable part
        keys = peft_checkpoint_keys(model)
        own = {k: v for k, v in own.items() if k in keys}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({summarize_keys(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({summarize_keys(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({summarize_keys(shapes, 3)})")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(problems)} "
                              f"(was it trained with another config?)")
    model.load_state_dict(state, strict=not peft)


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer, scheduler, scaler, loader,
                    epoch: int, step: int, best_metric: float, best_epoch: int, nonfinite_steps: int,
                    config: dict, rng: list[dict]) -> None:
    """Write the full training state (see module docstring) atomically."""
    model_entries = peft_checkpoint_entries(model) if is_peft_model(model) else {"model": model.state_dict()}
    atomic_save({
        "version": CHECKPOINT_VERSION,
        **model_entries,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "loader": loader.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "nonfinite_steps": nonfinite_steps,
        "config": config,
        "rng": rng,
    }, path)


def restore(ckpt: dict, path: str | os.PathLike, *, model: nn.Module, optimizer, scheduler, scaler,
            loader, rank: int = 0) -> None:
    """Put a resumable checkpoint's state back into the training objects (model on its device)."""
    check_resumable(ckpt, path)
    load_model_state(model, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} does not match this run: {err}") from None
    rng = ckpt["rng"]
    if len(rng) <= rank:
        raise CheckpointError(f"checkpoint {path} holds RNG states of {len(rng)} processes; "
                              f"this is rank {rank} (resume with the same number of processes)")
    set_rng_state(rng[rank])
