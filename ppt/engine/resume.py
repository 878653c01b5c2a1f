"""What a resumed run may change, and how a longer schedule is re-planned.

A resumed run continues the checkpoint's run exactly, so most settings are frozen: a different
lr, batch size, dataset mix, model or seed would silently make another experiment out of half
of this one. The settings below only change how the rest of the run is watched, stored or fed,
or extend it; anything else is refused before a file is touched (``tools/train.py --resume``
prints one ``error:`` line naming the key, the checkpoint's value and the new one).

``train.epochs`` may grow (or shrink, down to the epochs already done): the lr schedule is then
re-planned over the new total from the current step (a OneCycle run that had annealed to its
final lr climbs back to where the longer schedule stands at that step), and the log says so
with the lr before and after.
"""
from __future__ import annotations

import warnings

from ppt.config import Config, OptimConfig, config_from_dict
from ppt.engine.build import build_scheduler

RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.eval_every", "train.checkpoint_every", "train.log_every",
    "train.max_nonfinite", "train.threads", "train.precise_bn", "train.device",
    "data.root", "data.num_workers", "data.check",
})


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and prefix == "":
            out.update(_flat(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, cfg: Config, epochs_done: int) -> dict[str, tuple]:
    """Settings that differ between the checkpoint's config and ``cfg``.

    Args:
        saved: the config stored in the checkpoint (plain dict).
        cfg: the config the run is resumed with.
        epochs_done: epochs the checkpoint has finished.

    Returns:
        {dotted key: (checkpoint value, new value)} of the allowed changes.

    Raises:
        ValueError: a change that a resume cannot honour (message names the key and values).
    """
    old = _flat(config_from_dict(saved).to_dict())
    new = _flat(cfg.to_dict())
    changes = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
    refused = [k for k in changes if k not in RESUME_MAY_CHANGE]
    if refused:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise ValueError(f"--resume cannot change {shown}{more}: the checkpoint was trained with the "
                         f"first values. Drop the override, or start a new run from these weights "
                         f"(--weights ... --name NEW). Resumable changes: {', '.join(sorted(RESUME_MAY_CHANGE))}")
    if "train.epochs" in changes and cfg.train.epochs < epochs_done:
        raise ValueError(f"--resume: train.epochs={cfg.train.epochs} is below the {epochs_done} epochs "
                         f"the checkpoint has already trained")
    return changes


def replan_schedule(optimizer, cfg: OptimConfig, scheduler, new_total_steps: int):
    """A scheduler over ``new_total_steps`` standing where the restored ``scheduler`` stands.

    OneCycleLR keeps its phase boundaries in its state, so a restored one would keep the old
    total (and refuse to step past it): a new one is built over the new total, moved to the
    current step, and the optimiser's lr (and cycled momentum) set to that step's values.

    Returns:
        the new scheduler.
    """
    step = scheduler.last_epoch
    new = build_scheduler(optimizer, cfg, new_total_steps)
    new.last_epoch, new._step_count = step, step + 1
    with warnings.catch_warnings():  # get_lr outside step() warns; here it is the point
        warnings.simplefilter("ignore", UserWarning)
        lrs = new.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    new._last_lr = list(lrs)
    return new
