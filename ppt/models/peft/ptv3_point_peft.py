"""Point-PEFT on PTv3 blocks (SPEC §8, PTv3; Tang et al., AAAI 2024,
github.com/Ivan-Tang-3D/Point-PEFT).

Per block (``ptv3_block.PeftPTv3Block``):
- point-prior prompts (encoder blocks, as the SpUNet stage; the reference: the first half of
  its 12 blocks): ``num_tokens`` learnable tokens (T, C) enriched per scene by the retrieved
  set of the memory bank (``memory_bank.py``; ``point_peft.prior_prompt_tokens``: a bottleneck
  adapter of the retrieved features, read by a weight-free attention of the tokens). They enter
  the block's attention as extra keys/values of their own scene (``ptv3_block.PromptKV``,
  zero-gated per head), as the reference inserts them as tokens before its attention.
- geometry-aware adapter (every block) on the block output, as the reference's neighbourhood
  aggregation and adapter follow its MLP: LayerNorm -> Linear(C -> r) -> GELU -> neighbourhood
  mixing -> GELU -> Linear(r -> C, zero-init), added to the output. The mixing is a 3x3x3
  submanifold conv on the level's sparse tensor with the xCPE conv's ``indice_key``, so spconv
  reuses the xCPE rulebook (a point's spatial neighbours at the block's resolution), or, with
  ``neighbour_attention``, a weight-free attention over those neighbours
  (``point_peft.GeometryAdapter``).

Deviation from the reference (stated): its neighbourhoods are k = 16 nearest tokens around
sampled centres, max-pooled and propagated back with weight 0.3; on voxels the xCPE
neighbourhood is the natural one and costs no neighbour search.
"""

from __future__ import annotations

import torch
from torch import nn

from ppt.models.peft.adapters import BottleneckAdapter, PeftContext, recompute
from ppt.models.peft.point_peft import GeometryAdapter, prior_prompt_tokens
from ppt.models.peft.ptv3_block import PromptKV
from ppt.models.ptv3_layers import Level


class PTv3PointPeftAdapter(nn.Module):
    """Point-PEFT module of one PTv3 block.

    Args:
        channels: block width C.
        num_heads: the block's attention heads (one prompt gate per head).
        indice_key: the block's xCPE indice key (rulebook reuse).
        prior_dim: width D of the memory-bank features (the encoder-bottom width).
        num_tokens: learnable prompt tokens; 0 disables the prompts (decoder blocks).
        prior_rank: bottleneck width of the retrieved-set adapter.
        geo_reduction: geometry adapter r = max(min_rank, C // geo_reduction).
        min_rank: smallest bottleneck width.
        neighbour_attention: see ``point_peft.GeometryAdapter``.
    """

    def __init__(self, channels: int, num_heads: int, indice_key: str, prior_dim: int, num_tokens: int = 10,
                 prior_rank: int = 16, geo_reduction: int = 12, min_rank: int = 8,
                 neighbour_attention: bool = False):
        super().__init__()
        rank = max(min_rank, channels // geo_reduction)
        self.geometry = GeometryAdapter(channels, channels, rank, indice_key, neighbour_attention)
        self.tokens = self.prior = self.reader = None
        if num_tokens > 0:
            # N(0, 1) as the SpUNet stage; the block's LN1 normalises them before qkv anyway
            self.tokens = nn.Parameter(torch.randn(num_tokens, channels))
            self.prior = BottleneckAdapter(prior_dim, channels, prior_rank)
            self.reader = PromptKV(num_heads)

    def prompt_tokens(self, ctx: PeftContext, level: Level) -> torch.Tensor | None:
        """(B, T, C) point-prior prompts of each scene, or None (decoder blocks)."""
        if self.tokens is None:
            return None
        if ctx.retrieved is None:
            raise ValueError("Point-PEFT prompts need the retrieved set (ctx.retrieved); "
                             "apply the stage with a memory bank")
        return prior_prompt_tokens(self.tokens, self.prior, ctx.retrieved.to(self.tokens.dtype))

    def mlp_delta(self, h: torch.Tensor, level: Level, ctx: PeftContext) -> None:
        return None

    def output(self, y: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        """(N, C) block output -> (N, C) with the geometry-aware adapter added."""
        sparse = level.sparse
        return y + recompute(lambda feats: self.geometry(sparse.replace_feature(feats), sparse, ctx),
                             y, enabled=ctx.recompute_branches)
