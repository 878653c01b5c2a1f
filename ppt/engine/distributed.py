"""torchrun / DDP helpers and a BatchNorm synchronised over any backend (gloo included).

Processes are started by torchrun, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; without them everything runs as a single process.
Backend: nccl on CUDA, gloo on CPU. Only rank 0 writes files.

Why our own synchronised BN: ``torch.nn.SyncBatchNorm`` refuses CPU tensors ("expected input
tensor to be on GPU"), so CPU/gloo runs would silently normalise with per-process statistics
and drift from single-process training. :class:`SyncBatchNorm1d` all-reduces the batch sum,
count and squared deviations with a differentiable all-reduce, so
both the forward statistics and the backward gradient are those of the global batch. It runs
on its own process group so its collectives never interleave with DDP's gradient buckets.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun and pick this process's device.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
        timeout_s: collective timeout.

    Returns:
        (rank, world_size, device).
    """
    rank, world, local_rank = env_world()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available (use train.device=cpu)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return rank, world, dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (returns a new tensor; identity on one process)."""
    values = values.clone()
    if is_distributed():
        dist.all_reduce(values)
    return values


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (rank order)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over (N, C) features whose statistics span every process (any backend).

    Training with more than one process: mean and biased variance of the union of all
    processes' rows (two all-reduces: sum/count, then squared deviations, for accuracy), the
    unbiased variance feeds the running statistics, and gradients flow through the
    all-reduces. Otherwise (eval, one process) it is ``nn.BatchNorm1d``. Accepts and ignores
    the backbone's domain context, like ``ppt.models.spunet.BatchNorm``.

    Args:
        num_features: channels C.
        eps, momentum, affine: as ``nn.BatchNorm1d``.
        group: process group for the statistics (default: the world).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.group = group

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        """(N, C) -> (N, C) fp32."""
        x = x.float()
        if not (self.training and is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum(0), x.new_tensor([float(x.shape[0])])])
        total = _AllReduceSum.apply(local, self.group)
        count = total[c]
        mean = total[:c] / count
        centred = x - mean
        var = _AllReduceSum.apply(centred.pow(2).sum(0), self.group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out


def convert_sync_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` (plain BN and PDNorm's per-dataset BNs) in place by
    :class:`SyncBatchNorm1d` with the same parameters, buffers and state-dict keys."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, SyncBatchNorm1d):
            sync = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, group)
            sync.load_state_dict(child.state_dict())
            sync.to(next(iter(child.state_dict().values())).device)
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, group)
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main", "barrier",
           "all_reduce_sum", "all_gather_objects", "broadcast_object", "cleanup", "SyncBatchNorm1d",
           "convert_sync_batchnorm", "unwrap", "env_world"]
