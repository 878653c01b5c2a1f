"""The training loop: ``train()`` reads top to bottom and calls step, evaluation, checkpointing
and logging explicitly (no hooks).

Precision: one code path. On CUDA with ``train.amp``: bf16 autocast where supported, else fp16,
and in both cases a GradScaler (see ``ppt.engine.precision``); on CPU fp32 (autocast and scaler
disabled, same calls). A step whose loss or gradient is not finite is skipped and counted
(``train/skipped_steps`` in TensorBoard, a warning line in train.log).

Distributed (torchrun): DDP with unused-parameter detection (the norms and head of the other
datasets are idle in a batch), BatchNorm synchronised across processes
(:class:`ppt.engine.distributed.SyncBatchNorm1d`), and a loss that is the mean over the valid
points of the GLOBAL batch, so N processes make the single-process update.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ppt.config import Config, save_config
from ppt.data.classes import IGNORE_INDEX
from ppt.engine import checkpoint as ckpt_io
from ppt.engine import distributed as dist_utils
from ppt.engine.precise_bn import update_bn_stats
from ppt.engine.precision import amp_description, amp_settings
from ppt.engine.resume import replan_schedule, resume_changes
from ppt.engine.threads import ThreadFollower, loader_workers, local_processes
from ppt.engine.build import (
    build_model, build_optimizer, build_scheduler, build_train_loader, build_val_datasets,
    check_saved_selection, save_selection, text_embeddings_from_state,
)
from ppt.engine.weights import load_weights
from ppt.io import atomic_write
from ppt.losses import lovasz_softmax, segmentation_loss


class SetupError(RuntimeError):
    """Bad input found before training starts (data, weights, resume state)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Counters saved in checkpoints."""

    epoch: int = 0                 # epoch being trained (0-based)
    step: int = 0                  # optimiser steps attempted (skipped ones included)
    best_metric: float = -1.0      # best val mIoU by ``train.best_on``
    best_epoch: int = -1
    nonfinite_steps: int = 0       # skipped steps in total
    consecutive_nonfinite: int = 0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, grad_clip: float,
               loss_kind: str = "ce") -> dict:
    """One optimisation step on one batch (all processes call it together).

    ``loss_kind`` is ``train.loss``: "ce" or "ce+lovasz" (+ Lovasz-softmax of this rank's
    points, weight 1).

    The local loss is rescaled to ``sum of this rank's point losses / global valid points *
    world_size`` so that DDP's gradient average equals the gradient of the global mean loss.
    A non-finite loss or gradient norm skips the update (same decision on every rank: the
    loss is all-reduced and DDP has averaged the gradients).

    Returns:
        dict(loss: global mean loss (float), finite: bool, grad_norm: float, points: voxels in
        the global batch).
    """
    world = dist_utils.get_world_size()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(batch["feat"].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(batch)
    loss = segmentation_loss(logits.float(), batch["segment"])  # cross-entropy
    stats = torch.stack([(batch["segment"] != IGNORE_INDEX).sum().float(),
                         torch.tensor(float(len(batch["segment"])), device=loss.device)])
    if world > 1:
        stats = dist_utils.all_reduce_sum(stats.detach())
        local_valid = (batch["segment"] != IGNORE_INDEX).sum().float()
        loss = loss * (local_valid * world / stats[0].clamp(min=1))
    if loss_kind == "ce+lovasz":  # a per-rank loss averaged over ranks by DDP, as the reference
        loss = loss + lovasz_softmax(logits.float(), batch["segment"])
    if world > 1:
        global_loss = dist_utils.all_reduce_sum(loss.detach()[None])[0] / world
    else:
        global_loss = loss.detach()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    finite = bool(torch.isfinite(global_loss)) and bool(torch.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()  # lowers the fp16 scale after an overflow; no-op when disabled
    return {"loss": float(global_loss), "finite": finite, "grad_norm": float(grad_norm),
            "points": int(stats[1])}


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, scaler,
                    amp_dtype: torch.dtype | None, state: TrainState, cfg: Config, device: torch.device,
                    logger, save_last: Callable[[], None] | None = None,
                    threads: ThreadFollower | None = None) -> dict:
    """Train until the loader's epoch ends (or ``train.steps_per_epoch``).

    Args:
        save_last: writes ``model_last.pth``; called every ``train.checkpoint_every`` steps.
        threads: re-checked after every step (moves torch's thread count with ``train.threads: -1``).

    Returns:
        {"loss": mean loss, "loss_<dataset>": ..., "skipped": skipped steps} of the epoch.
    """
    t = cfg.train
    total = min(len(loader), t.steps_per_epoch) if t.steps_per_epoch > 0 else len(loader)
    remaining = total - loader.position
    model.train()
    bar = logger.progress(total, f"epoch {state.epoch + 1}/{t.epochs}")
    bar.update(loader.position)
    sums: dict[str, list[float]] = {}   # dataset -> [loss sum, steps] over the epoch
    window: dict[str, list[float]] = {}  # same, since the last log line
    points, tic, skipped = 0, time.perf_counter(), 0
    batches = iter(loader)
    for _ in range(remaining):
        batch = to_device(next(batches), device)
        out = train_step(model, batch, optimizer, scaler, amp_dtype, cfg.optim.grad_clip, cfg.train.loss)
        scheduler.step()
        state.step += 1
        if threads is not None:
            threads.recheck(logger, state.step)
        name = batch["dataset"]
        if out["finite"]:
            state.consecutive_nonfinite = 0
            for acc in (sums, window):
                acc.setdefault(name, [0.0, 0])
                acc[name][0] += out["loss"]
                acc[name][1] += 1
        else:
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            skipped += 1
            scale = f", loss scale {scaler.get_scale():g} lowered" if scaler.is_enabled() else ""
            logger.info(f"warning: non-finite loss/gradient at step {state.step} ({name}, loss "
                        f"{out['loss']}, grad norm {out['grad_norm']}{scale}): step skipped")
            if state.consecutive_nonfinite >= t.max_nonfinite:
                raise NonFiniteError(
                    f"stopping: {state.consecutive_nonfinite} consecutive steps had a non-finite loss or "
                    f"gradient (last: epoch {state.epoch + 1}, step {state.step}, dataset {name}); lower "
                    f"optim.lr, set optim.grad_clip, or check the data with tools/check_data.py")
        points += out["points"]
        lrs = [g["lr"] for g in optimizer.param_groups]
        speed = points / max(time.perf_counter() - tic, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{lrs[0]:.2e}", data=name, pts_s=f"{speed:.3g}")
        if state.step % t.log_every == 0 or loader.position == total:
            _log_window(logger, window, optimizer, state, total, loader.position, speed, tic, cfg, scaler)
            window = {}
        if save_last is not None and t.checkpoint_every > 0 and state.step % t.checkpoint_every == 0 \
                and loader.position < total:
            save_last()
    bar.close()
    del batches  # stop DataLoader workers of an epoch cut short by steps_per_epoch
    result = {f"loss_{k}": s / max(n, 1) for k, (s, n) in sums.items()}
    steps = sum(n for _, n in sums.values())
    result["loss"] = sum(s for s, _ in sums.values()) / max(steps, 1)
    result["skipped"] = skipped
    return result


def _log_window(logger, window, optimizer, state: TrainState, total: int, position: int, speed: float,
                tic: float, cfg: Config, scaler=None) -> None:
    if not window:
        return
    losses = {k: s / n for k, (s, n) in window.items()}
    mean = sum(s for s, _ in window.values()) / sum(n for _, n in window.values())
    scalars = {"train/loss": mean, "train/points_per_s": speed, "train/skipped_steps": state.nonfinite_steps}
    scalars.update({f"train/loss_{k}": v for k, v in losses.items()})
    scalars.update({f"train/lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
    if scaler is not None and scaler.is_enabled():
        scalars["train/loss_scale"] = scaler.get_scale()
    logger.scalars(scalars, state.step)
    elapsed = time.perf_counter() - tic
    done_epochs = state.epoch + position / max(total, 1)
    eta = elapsed / max(position, 1) * (cfg.train.epochs * total - state.epoch * total - position)
    per = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
    lr = "/".join(f"{g['lr']:.2e}" for g in optimizer.param_groups)
    logger.info(f"epoch {done_epochs:.2f}/{cfg.train.epochs} step {state.step} loss {mean:.4f} ({per}) "
                f"lr {lr} {speed:.0f} pts/s eta {time.strftime('%H:%M:%S', time.gmtime(max(eta, 0)))}")


def evaluate_all(model: nn.Module, val_sets: dict, cfg: Config, device: torch.device,
                 amp_dtype: torch.dtype | None, scenes=None) -> dict[str, dict]:
    """Validation metrics per dataset (every process takes its shard; counts are all-reduced);
    ``scenes`` (a ``ValScenes``, or None) keeps each dataset's first scene for TensorBoard.

    A dataset that is evaluated but not trained (in ``data.val``, not in ``data.mix``) has a
    random prompt and untouched BN statistics in the model: it is evaluated through the
    "mean" prompt (the unknown-domain answer), and its result says so (``prompt``).
    """
    from ppt.engine.evaluate import eval_prompt, evaluate

    results = {}
    for name, ds in val_sets.items():
        prompt, note = eval_prompt(name, cfg.data.mix, None)
        results[name] = evaluate(model, ds, device, prompt=prompt, voxel_size=cfg.data.voxel_size,
                                 features=tuple(cfg.data.features),
                                 on_scene=scenes.hook(name) if scenes else None,
                                 amp_dtype=amp_dtype, num_workers=loader_workers(min(cfg.data.num_workers, 2), local_processes()))
        results[name].update(prompt=prompt or name, prompt_note=note)
    return results


def best_metric(results: dict[str, dict], best_on: str) -> tuple[float, str]:
    """(value, description) that ``model_best.pth`` is chosen by (``train.best_on``)."""
    if best_on == "mean":
        return float(np.nanmean([r["mIoU"] for r in results.values()])), "mean val mIoU"
    name = next(iter(results)) if best_on == "first" else best_on
    return float(results[name]["mIoU"]), f"{name} val mIoU"


def train(cfg: Config, exp_dir: str | Path, resume: bool = False, weights: str | None = None,
          on_ready: Callable[[], None] | None = None) -> dict:
    """Train ``cfg`` into ``exp_dir`` (torchrun-aware). Returns the final summary.

    Everything that can be wrong with the input (data, weights, checkpoint) is checked
    before ``exp_dir`` is created; such problems raise ``SetupError``/``CheckpointError``.

    Args:
        cfg: validated config.
        exp_dir: experiment folder (``exp/<name>``).
        resume: continue from ``exp_dir/model/model_last.pth`` (exact: weights, optimiser,
            scheduler, scaler, loader position, RNG states).
        weights: initialise the model from this checkpoint (fine-tuning).
        on_ready: called once set-up is validated, before anything is written.
    """
    exp_dir = Path(exp_dir)
    rank, world, device = dist_utils.init_distributed(cfg.train.device)
    threads = ThreadFollower(cfg.train.threads, local_processes(),  # sets torch's thread count
                             workers=loader_workers(cfg.data.num_workers, local_processes()))
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    last_path = exp_dir / "model" / "model_last.pth"

    # ---- set-up and validation: nothing is written before this block passes
    resume_ckpt, changes, notes = None, {}, []
    if resume:
        resume_ckpt = ckpt_io.load_checkpoint(last_path)
        ckpt_io.check_resumable(resume_ckpt, last_path)
        try:
            changes = resume_changes(resume_ckpt["config"], cfg, int(resume_ckpt["epoch"]))
        except ValueError as err:
            raise SetupError(f"{err} (checkpoint {last_path})") from None
    try:
        loader = build_train_loader(cfg, rank, world)
        if resume and loader.selection is not None:  # same scenes and labels as the run began with
            check_saved_selection(loader.selection, exp_dir)
        val_sets = build_val_datasets(cfg) if cfg.train.eval_every > 0 else {}
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SetupError(err.args[0] if err.args else str(err)) from None
    stored_text = text_embeddings_from_state(resume_ckpt["model"]) if resume_ckpt else None
    model = build_model(cfg, stored_text).to(device)
    if cfg.peft.stage != "none":  # base weights mapped by name, then the stage (ppt.engine.peft_checkpoint)
        from ppt.engine.peft_checkpoint import prepare_peft_model

        weights_report = prepare_peft_model(model, cfg, exp_dir, device, resume_ckpt)
    else:
        weights_report = load_weights(model, weights) if weights else None
    if world > 1 and cfg.train.sync_bn:
        import torch.distributed as dist

        dist_utils.convert_sync_batchnorm(model, dist.new_group(backend=dist.get_backend()))
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = min(len(loader), cfg.train.steps_per_epoch) if cfg.train.steps_per_epoch > 0 else len(loader)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.epochs * steps_per_epoch)
    amp_dtype, scaler = amp_settings(device, cfg.train.amp)
    state = TrainState()
    if resume_ckpt is not None:
        ckpt_io.restore(resume_ckpt, last_path, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, loader=loader, rank=rank)
        state = TrainState(resume_ckpt["epoch"], resume_ckpt["step"], resume_ckpt["best_metric"],
                           resume_ckpt["best_epoch"], resume_ckpt["nonfinite_steps"])
        if "train.epochs" in changes:
            before = optimizer.param_groups[0]["lr"]
            scheduler = replan_schedule(optimizer, cfg.optim, scheduler, cfg.train.epochs * steps_per_epoch)
            notes.append(f"train.epochs {changes['train.epochs'][0]} -> {cfg.train.epochs}: lr schedule "
                         f"re-planned over {cfg.train.epochs * steps_per_epoch} steps from step {state.step} "
                         f"(base lr {before:.3g} -> {optimizer.param_groups[0]['lr']:.3g})")
        notes += [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items() if k != "train.epochs"]
    if on_ready is not None:
        on_ready()

    # ---- experiment folder, logging
    from ppt.engine.logging import ExperimentLogger, ValScenes

    main = rank == 0
    if main:
        (exp_dir / "model").mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp_dir / "config.yaml")
        if loader.selection is not None:
            save_selection(loader.selection, exp_dir)
    dist_utils.barrier()
    logger = ExperimentLogger(exp_dir, enabled=main)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{'resumed' if resume else 'started'} {exp_dir} on {world} process(es), device {device}, "
                f"{amp_description(device, amp_dtype, scaler)}; {n_params / 1e6:.2f} M parameters; "
                f"{steps_per_epoch} steps/epoch (one pass over {next(iter(cfg.data.mix))}); "
                f"datasets {dict(cfg.data.mix)}; {threads.note}")
    if weights_report:
        logger.info(weights_report)
    for line in loader.selection.summary() if loader.selection is not None else ():
        logger.info(f"data efficiency: {line}")
    if resume_ckpt is not None:
        where = (f"at epoch {state.epoch + 1} step {state.step} (loader position {loader.position})"
                 if state.epoch < cfg.train.epochs else f"a finished run ({state.epoch} epochs, step {state.step})")
        logger.info(f"resuming {where}, best mIoU {state.best_metric:.4f}")
        for note in notes:
            logger.info(f"resume changes {note}")
    import yaml

    logger.text("config", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    scenes = ValScenes(val_sets) if logger.writer is not None else None  # rank 0, TensorBoard on
    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)

    def save_last() -> None:
        rng = dist_utils.all_gather_objects(ckpt_io.rng_state())  # every rank takes part
        if main:
            ckpt_io.save_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, loader=loader, epoch=state.epoch, step=state.step,
                                    best_metric=state.best_metric, best_epoch=state.best_epoch,
                                    nonfinite_steps=state.nonfinite_steps, config=cfg.to_dict(), rng=rng)
            logger.info(f"saved {last_path} (step {state.step}, {state.epoch} epochs done)")
        dist_utils.barrier()

    if changes:  # the checkpoint takes the new settings at once: it never disagrees with config.yaml
        save_last()

    # ---- the loop
    results: dict[str, dict] = {}
    start = time.perf_counter()
    try:
        while state.epoch < cfg.train.epochs:
            loader.set_epoch(state.epoch)
            epoch_stats = train_one_epoch(train_model, loader, optimizer, scheduler, scaler, amp_dtype,
                                          state, cfg, device, logger, save_last, threads)
            logger.info(f"epoch {state.epoch + 1}/{cfg.train.epochs}: loss {epoch_stats['loss']:.4f}, "
                        f"{epoch_stats['skipped']} skipped steps, {time.perf_counter() - start:.0f} s")
            state.epoch += 1
            is_best, last_epoch = False, state.epoch == cfg.train.epochs
            evaluating = cfg.train.eval_every > 0 and (state.epoch % cfg.train.eval_every == 0 or last_epoch)
            if cfg.train.precise_bn > 0 and (evaluating or last_epoch):
                info = update_bn_stats(model, loader, cfg.train.precise_bn, device, epoch=state.epoch,
                                       amp_dtype=amp_dtype)
                logger.info(f"precise BN: recomputed {info['norms']} BatchNorms from {info['batches']} "
                            f"training batches ({cfg.train.precise_bn} per dataset) in {info['seconds']:.1f} s")
            if evaluating:
                results = evaluate_all(model, val_sets, cfg, device, amp_dtype, scenes)
                logger.validation(results, state.epoch, state.step, scenes)
                for r in results.values():
                    if r["prompt_note"]:
                        logger.info(f"note: {r['prompt_note']}")
                value, what = best_metric(results, cfg.train.best_on)
                mean = float(np.nanmean([r["mIoU"] for r in results.values()]))
                if value > state.best_metric:
                    state.best_metric, state.best_epoch, is_best = value, state.epoch, True
                logger.info(f"epoch {state.epoch}: mean val mIoU {mean:.4f}; {what} {value:.4f} (best "
                            f"{state.best_metric:.4f} at epoch {state.best_epoch})")
            save_last()
            if is_best and main:
                _copy_atomic(last_path, exp_dir / "model" / "model_best.pth")
                logger.info(f"new best {what} {state.best_metric:.4f}: wrote model_best.pth")
    finally:
        logger.close()
    return {"epochs": state.epoch, "steps": state.step, "best_metric": state.best_metric,
            "best_epoch": state.best_epoch, "skipped_steps": state.nonfinite_steps, "val": results,
            "seconds": time.perf_counter() - start, "exp_dir": str(exp_dir)}


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through ``ppt.io.atomic_write`` (temp file, fsync, rename)."""
    import shutil

    with open(src, "rb") as f_in:
        atomic_write(dst, lambda f_out: shutil.copyfileobj(f_in, f_out))
