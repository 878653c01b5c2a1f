"""Shared PEFT pieces on concatenated voxel features (N, C) with a batch index (N,).

- :func:`scatter_mean`: per-scene mean of voxel features (the DAPT internal prompt).
- :class:`BottleneckAdapter`: LayerNorm -> Linear(C -> r) -> GELU -> dropout -> Linear(r -> C_out),
  the up-projection zero-initialised so the adapter starts silent.
- :func:`prompt_attention`: weight-free attention of every voxel over its own scene's prompt
  tokens (softmax of scaled dot products; keys = values = the tokens).
- :class:`GatedPromptReader`: that attention times one zero-initialised scalar gate.
- :func:`recompute`: activation checkpointing of an adapter branch.
- :class:`PeftContext`: the per-forward state blocks share (internal prompts, retrieved set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppt.models.spunet import DomainContext

INIT_STD = 0.02  # as the backbone (SPEC §3)
MIN_RANK = 8


def bottleneck_rank(channels: int, reduction: int = 6, min_rank: int = MIN_RANK) -> int:
    """Bottleneck width r = max(min_rank, channels // reduction)."""
    return max(min_rank, channels // reduction)


def scatter_mean(x: torch.Tensor, batch: torch.Tensor, num_scenes: int) -> torch.Tensor:
    """Per-scene mean: x (N, C), batch (N,) int in [0, B) -> (B, C); empty scenes give zeros."""
    out = x.new_zeros(num_scenes, x.shape[1]).index_add_(0, batch, x)
    count = torch.bincount(batch, minlength=num_scenes).clamp_(min=1).to(x.dtype)
    return out / count[:, None]


def scatter_max(x: torch.Tensor, batch: torch.Tensor, num_scenes: int) -> torch.Tensor:
    """Per-scene max: x (N, C), batch (N,) -> (B, C); empty scenes give zeros."""
    out = x.new_full((num_scenes, x.shape[1]), float("-inf"))
    out = out.scatter_reduce(0, batch[:, None].expand_as(x), x, reduce="amax", include_self=True)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def recompute(fn, *args, enabled: bool = True):
    """``fn(*args)``; while autograd records (and `enabled`), its inner activations are
    recomputed in backward instead of kept (non-reentrant activation checkpointing; dropout
    masks are replayed). `enabled` is False inside a region that is recomputed as a whole
    (``PeftContext.recompute_branches``), where a nested checkpoint would only add a third run."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def prompt_attention(x: torch.Tensor, tokens: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Weight-free attention of voxels over their scene's tokens.

    Args:
        x: (N, C) voxel features (queries).
        tokens: (B, T, C) prompt tokens of each scene (keys and values).
        batch: (N,) scene index of every voxel.

    Returns:
        (N, C): sum_t softmax_t(x . tokens[b, t] / sqrt(C)) tokens[b, t] with b = batch[n].
    """
    # Gathering tokens[batch] would be (N, T, C); scoring every voxel against every scene's
    # tokens is (N, B, T) and B is small, so that is the cheaper layout.
    scores = torch.einsum("nc,btc->nbt", x, tokens) / math.sqrt(x.shape[1])
    weights = scores.softmax(dim=-1) * F.one_hot(batch, tokens.shape[0]).to(x.dtype)[:, :, None]
    return torch.einsum("nbt,btc->nc", weights, tokens)


class BottleneckAdapter(nn.Module):
    """LayerNorm -> Linear(C_in -> r) -> GELU -> dropout -> Linear(r -> C_out), zero-init output.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        rank: bottleneck width r.
        dropout: dropout after the activation.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.down = nn.Linear(in_channels, rank)
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(rank, out_channels)
        nn.init.trunc_normal_(self.down.weight, std=INIT_STD)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # silent at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in) -> (N, C_out)."""
        return self.up(self.drop(F.gelu(self.down(self.norm(x)))))


class GatedPromptReader(nn.Module):
    """`gate * prompt_attention(x, tokens, batch)` with one zero-initialised scalar gate.

    The attention has no weights (queries, keys and values are the features themselves), so a
    block pays one parameter to read any number of prompts.
    """

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """x (N, C), tokens (B, T, C), batch (N,) -> (N, C) delta."""
        return self.gate * prompt_attention(x, tokens, batch)


@dataclass
class PeftContext(DomainContext):
    """The backbone's DomainContext plus per-forward PEFT state.

    Built fresh by the PEFT backbone at every forward and passed down with the domain context
    (never stored on a module), so the blocks of one forward share it and nothing leaks into the
    next forward.

    Attributes:
        enabled: False runs the plain base model (memory-bank features, silence checks).
        prompts: stage index -> internal prompts (B, C) appended by that stage's blocks (DAPT).
        retrieved: (B, R, D) point-prior set per scene (Point-PEFT), or None.
        cache: per-forward scratch shared by blocks of one level (neighbour lists).
        recompute_branches: adapters recompute their inner activations in backward; False
            while the whole block is recomputed (``spunet_block.PeftBlock``).
    """

    enabled: bool = True
    prompts: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    retrieved: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)
    recompute_branches: bool = True
