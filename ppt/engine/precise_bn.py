"""Precise BatchNorm statistics: recompute running statistics from training batches.

BatchNorm's running statistics are an exponential average with momentum 0.01 (SPEC §3): after
a short run, or for a dataset that gets a small share of the steps (PDNorm keeps one BN per
dataset), they still carry the early weights' activations and evaluation suffers. This pass
replaces them with the plain average of the batch statistics of ``num_batches`` training
batches per dataset under the CURRENT weights (as fvcore's ``update_bn_stats``):

- every BatchNorm runs with momentum 1.0, so after a forward its running buffers hold that
  batch's statistics (global over processes for the synchronised BN); they are averaged over the
  batches that went through THAT BN — a per-dataset BN of PDNorm only sees its dataset's batches;
- the rest of the model is in eval mode (no dropout / drop path), no gradients, weights untouched;
- batches come from each training dataset with its training transform, seeded apart from
  training (pass ``PRECISE_PASS`` of the loader's seed contract) and without Mix3D: merged scene
  pairs are a training-time regulariser, evaluation sees single scenes;
- with several processes each takes its shard, and the averages are averaged across processes.

The training loader's position and the global RNG are not touched, so exact resume holds.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ppt.data.mixing import PlannedBatch, _key, _Steps
from ppt.engine import distributed as dist_utils

PRECISE_PASS = 1 << 20  # pass index of the seed contract reserved for this pass


def _as_is(batch):
    return batch


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm with running statistics (plain, per-dataset PDNorm, synchronised)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def precise_bn_plan(loader, num_batches: int, epoch: int) -> list[PlannedBatch]:
    """``num_batches`` batches of each training dataset on this rank, dataset after dataset."""
    plan = []
    for name, ds in loader.datasets.items():
        rng = np.random.default_rng([loader.seed, epoch, _key(name), PRECISE_PASS])
        needed = num_batches * loader.batch_size * loader.world_size
        order = np.concatenate([rng.permutation(len(ds)) for _ in range(-(-needed // len(ds)))])
        shard = order[:needed][loader.rank::loader.world_size]
        plan += [PlannedBatch(name, shard[s:s + loader.batch_size], PRECISE_PASS)
                 for s in range(0, len(shard), loader.batch_size)]
    return plan


@torch.no_grad()
def update_bn_stats(model: nn.Module, loader, num_batches: int, device: torch.device,
                    epoch: int = 0, amp_dtype: torch.dtype | None = None) -> dict:
    """Recompute the running statistics of every BatchNorm of ``model`` (see module docstring).

    Args:
        model: the segmentor (a DDP wrapper is unwrapped).
        loader: the training ``MultiDatasetLoader`` (its datasets, seed, batch size and shard).
        num_batches: batches per dataset.
        device: where the model runs.
        epoch: seeds the batches (a different draw each epoch).
        amp_dtype: autocast dtype on CUDA, as training.

    Returns:
        {"batches": batches forwarded, "norms": BNs updated, "seconds": time taken}.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    norms = batch_norms(model)
    plan = precise_bn_plan(loader, num_batches, epoch)
    if not norms or not plan:
        return {"batches": 0, "norms": 0, "seconds": 0.0}
    start, was_training = time.perf_counter(), model.training
    saved_momentum = [bn.momentum for bn in norms]
    means = [torch.zeros_like(bn.running_mean) for bn in norms]
    variances = [torch.zeros_like(bn.running_var) for bn in norms]
    counts = [0] * len(norms)
    model.eval()
    for bn in norms:
        bn.train()
        bn.momentum = 1.0
    steps = _Steps(loader.datasets, plan, 0, loader.seed, epoch, mix3d_prob=0.0)
    batches = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False,
                                          num_workers=loader.num_workers, collate_fn=_as_is)
    try:
        for batch in batches:
            before = [int(bn.num_batches_tracked) for bn in norms]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                model(batch)
            for i, bn in enumerate(norms):
                if int(bn.num_batches_tracked) != before[i]:  # this BN saw the batch
                    counts[i] += 1
                    means[i] += (bn.running_mean - means[i]) / counts[i]
                    variances[i] += (bn.running_var - variances[i]) / counts[i]
    finally:
        for bn, momentum in zip(norms, saved_momentum):
            bn.momentum = momentum
        model.train(was_training)
    updated = 0
    for i, bn in enumerate(norms):
        if counts[i] == 0:
            continue  # e.g. the BN of a dataset that is only evaluated: left as it was
        world = dist_utils.get_world_size()
        bn.running_mean.copy_(dist_utils.all_reduce_sum(means[i]) / world)
        bn.running_var.copy_(dist_utils.all_reduce_sum(variances[i]) / world)
        updated += 1
    return {"batches": len(plan), "norms": updated, "seconds": time.perf_counter() - start}
