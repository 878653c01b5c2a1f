"""Point-PEFT on SpUNet basic blocks (SPEC §8, "Point-PEFT stage").

Per basic block:
- geometry-aware adapter (every block): LayerNorm -> Linear(C_in -> r) -> GELU -> neighbourhood
  mixing -> GELU -> Linear(r -> C_out, zero-init), added to the block output. The mixing is a
  3x3x3 SubMConv3d on the block's own active set (it reuses the block's ``indice_key``, so
  spconv reuses the block's rulebook), or, with ``neighbour_attention``, a weight-free attention
  over the voxel's active 3x3x3 neighbours (its k <= 27 nearest voxels, itself included).
- point-prior prompts (encoder blocks): ``num_tokens`` learnable tokens (T, C_out), enriched per
  scene by a weight-free attention over the retrieved set (memory bank, see memory_bank.py)
  passed through a bottleneck adapter (zero-init, so the tokens start as the learnable ones);
  voxels read the tokens through the zero-gated weight-free attention of adapters.py.

The block with its adapters is recomputed in backward as a whole (``spunet_block.PeftBlock``); with
that off, both adapters are recomputed on their own (``adapters.recompute``) so their inner
activations are not kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import spconv.pytorch as spconv

from ppt.models.peft.adapters import (
    INIT_STD, BottleneckAdapter, GatedPromptReader, PeftContext, recompute,
)

NEIGHBOUR_RADIUS = 1  # 3x3x3 neighbourhood, as the block's own convolutions


def neighbour_edges(indices: torch.Tensor, radius: int = NEIGHBOUR_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges between active voxels at L-inf distance <= radius (self loops included).

    Args:
        indices: (N, 4) int (batch, x, y, z) of the active voxels.

    Returns:
        src, dst: (E,) long; voxel src is a neighbour of voxel dst.
    """
    idx = indices.long()
    span = idx[:, 1:].max(dim=0).values + 2 * radius + 1
    shifted = idx[:, 1:] + radius

    def encode(batch, xyz):
        return ((batch * span[0] + xyz[:, 0]) * span[1] + xyz[:, 1]) * span[2] + xyz[:, 2]

    keys = encode(idx[:, 0], shifted)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    r = torch.arange(-radius, radius + 1, device=idx.device)
    offsets = torch.cartesian_prod(r, r, r)
    src, dst = [], []
    for off in offsets:
        query = encode(idx[:, 0], shifted + off)
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=len(keys) - 1)
        hit = sorted_keys[pos] == query
        src.append(order[pos][hit])
        dst.append(torch.nonzero(hit).squeeze(1))
    return torch.cat(src), torch.cat(dst)


def neighbour_attention(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Weight-free attention of each voxel over its neighbours: h (N, r) -> (N, r)."""
    scores = (h[dst] * h[src]).sum(-1) / math.sqrt(h.shape[1])
    peak = torch.full_like(h[:, 0], float("-inf")).scatter_reduce(0, dst, scores, "amax")
    weights = torch.exp(scores - peak[dst])
    total = torch.zeros_like(h[:, 0]).index_add_(0, dst, weights)
    out = torch.zeros_like(h).index_add_(0, dst, weights[:, None] * h[src])
    return out / total[:, None]


def prior_prompt_tokens(tokens: torch.Tensor, prior: nn.Module, retrieved: torch.Tensor) -> torch.Tensor:
    """Learnable tokens (T, C) + weight-free attention of the tokens over the adapted retrieved
    set ``prior(retrieved)`` ((B, R, D) -> (B, R, C)) -> per-scene prompt tokens (B, T, C)."""
    items = prior(retrieved)  # (B, R, C)
    scores = torch.einsum("tc,brc->btr", tokens, items) / math.sqrt(items.shape[-1])
    return tokens[None] + torch.einsum("btr,brc->btc", scores.softmax(-1), items)


class GeometryAdapter(nn.Module):
    """Bottleneck adapter whose middle mixes each voxel with its spatial neighbours.

    Args:
        in_channels: block input channels C_in.
        out_channels: block output channels C_out.
        rank: bottleneck width r.
        indice_key: the block's spconv indice key (rulebook reuse).
        neighbour_attention: weight-free neighbour attention instead of the 3x3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, indice_key: str,
                 neighbour_attention: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.down = nn.Linear(in_channels, rank)
        nn.init.trunc_normal_(self.down.weight, std=INIT_STD)
        nn.init.zeros_(self.down.bias)
        self.conv = None
        if not neighbour_attention:
            self.conv = spconv.SubMConv3d(rank, rank, 3, padding=1, bias=False, indice_key=indice_key)
            nn.init.trunc_normal_(self.conv.weight, std=INIT_STD)
        self.up = nn.Linear(rank, out_channels)
        nn.init.zeros_(self.up.weight)  # silent at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, x: spconv.SparseConvTensor, out: spconv.SparseConvTensor,
                ctx: PeftContext) -> torch.Tensor:
        """Block input x (N, C_in), block output out (same active set) -> (N, C_out) delta."""
        h = F.gelu(self.down(self.norm(x.features)))
        if self.conv is not None:
            # `out` carries the block's rulebook under the shared indice_key: no new pairs
            h = self.conv(out.replace_feature(h)).features
        else:
            key = ("neighbours", out.indices.data_ptr(), out.indices.shape[0])
            if key not in ctx.cache:
                ctx.cache[key] = neighbour_edges(out.indices)
            h = neighbour_attention(h, *ctx.cache[key])
        return self.up(F.gelu(h))


class PointPeftAdapter(nn.Module):
    """Point-PEFT module of one basic block.

    Args:
        in_channels: block input channels C_in.
        out_channels: block output channels C_out.
        indice_key: the block's spconv indice key.
        prior_dim: width D of the memory-bank features (encoder-bottom width).
        num_tokens: learnable prompt tokens; 0 disables the prompts (decoder blocks).
        prior_rank: bottleneck width of the retrieved-set adapter.
        geo_reduction: geometry adapter r = max(min_rank, C_out // geo_reduction).
        min_rank: smallest bottleneck width.
        neighbour_attention: see :class:`GeometryAdapter`.
    """

    def __init__(self, in_channels: int, out_channels: int, indice_key: str, prior_dim: int = 256,
                 num_tokens: int = 10, prior_rank: int = 16, geo_reduction: int = 12,
                 min_rank: int = 8, neighbour_attention: bool = False):
        super().__init__()
        rank = max(min_rank, out_channels // geo_reduction)  # C_out: a decoder block's concat input is wide
        self.geometry = GeometryAdapter(in_channels, out_channels, rank, indice_key, neighbour_attention)
        self.tokens = self.prior = self.reader = None
        if num_tokens > 0:
            # N(0, 1) like the domain prompt table: at the scale of normalised voxel features,
            # so the zero-init gate gets a usable gradient at step 0
            self.tokens = nn.Parameter(torch.randn(num_tokens, out_channels))
            self.prior = BottleneckAdapter(prior_dim, out_channels, prior_rank)
            self.reader = GatedPromptReader()

    def prompt_tokens(self, retrieved: torch.Tensor) -> torch.Tensor:
        """Retrieved set (B, R, D) -> per-scene prompt tokens (B, T, C_out)."""
        return prior_prompt_tokens(self.tokens, self.prior, retrieved)

    def forward(self, x: spconv.SparseConvTensor, out: spconv.SparseConvTensor,
                ctx: PeftContext) -> torch.Tensor:
        """Block input x (N, C_in), block output out (N, C_out) -> adapted (N, C_out) features."""
        y = out.features + recompute(lambda feats: self.geometry(x.replace_feature(feats), out, ctx),
                                     x.features, enabled=ctx.recompute_branches)
        if self.tokens is None:
            return y
        if ctx.retrieved is None:
            raise ValueError("Point-PEFT prompts need the retrieved set (ctx.retrieved); "
                             "apply the stage with a memory bank")
        batch = out.indices[:, 0].long()
        tokens = self.prompt_tokens(ctx.retrieved.to(y.dtype))
        return y + recompute(self.reader, y, tokens, batch, enabled=ctx.recompute_branches)
