"""Point-PEFT on PTv3 blocks (SPEC §8, PTv3; Tang et al., AAAI 2024,
github.com/Ivan-Tang-3D/Point-PEFT). The method, its mapping to voxels and every deviation
from the reference: ``point_peft.py``'s module docstring.

Per block (``ptv3_block.PeftPTv3Block``), as the reference's transformer block:
- point-prior prompts (encoder blocks): learnable tokens with prompt dropout, enriched per scene
  by the retrieved set (``point_peft.PointPeftParts.prompt_tokens_of``), enter the block's
  attention as extra keys/values of their own scene (``ptv3_block.PromptKV``, zero-gated per
  head), as the reference inserts them as tokens before its attention.
- MLP-output adapter: ``MLP(h) + 0.7 * adapter(MLP(h))`` inside the MLP branch (``mlp_delta``).
- on the block output (``output``): the geometry-aware operator, then the output adapter
  ``y + adapter1(y)``. ``knn`` (default): ``point_peft.KnnGeometry`` on the level's voxel grid
  (``level.grid``), the prompt tokens of the block as extra centres at the shared learnable
  prompt coordinates; ``conv``: a bottleneck whose middle is a 3x3x3 submanifold conv on the
  level's sparse tensor with the xCPE conv's ``indice_key`` (spconv reuses the xCPE rulebook),
  or, with ``neighbour_attention``, a weight-free attention over those neighbours.

The prompt tokens a block's attention reads are the ones its geometry operator groups (one
prompt-dropout draw per block and forward, kept in ``ctx.cache`` between the two).
"""

from __future__ import annotations

import torch

from ppt.models.peft.adapters import PeftContext, recompute
from ppt.models.peft.point_peft import GeometryAdapter, GroupAttention, KnnGeometry, PointPeftParts
from ppt.models.peft.ptv3_block import PromptKV, scene_index
from ppt.models.ptv3_layers import Level


class PTv3PointPeftAdapter(PointPeftParts):
    """Point-PEFT module of one PTv3 block.

    Args:
        channels: block width C.
        num_heads: the block's attention heads (one prompt gate per head).
        indice_key: the block's xCPE indice key (``conv`` operator: rulebook reuse).
        prior_dim: width D of the memory-bank features (the encoder-bottom width).
        num_tokens, prior_rank, adapter_rank, dropout, prompt_dropout: see
            ``point_peft.PointPeftParts``.
        geo_attention: the shared group attention of this width (``knn``), or None (``conv``).
        geo_k, geo_stride: see ``point_peft.KnnGeometry``.
        geo_reduction: ``conv`` operator r = max(min_rank, C // geo_reduction).
        min_rank: smallest bottleneck width of the ``conv`` operator.
        neighbour_attention: see ``point_peft.GeometryAdapter``.
    """

    def __init__(self, channels: int, num_heads: int, indice_key: str, prior_dim: int, num_tokens: int = 10,
                 prior_rank: int = 8, adapter_rank: int = 16, dropout: float = 0.1, prompt_dropout: float = 0.1,
                 geo_attention: GroupAttention | None = None, geo_k: int = 16, geo_stride: int = 2,
                 geo_reduction: int = 12, min_rank: int = 8, neighbour_attention: bool = False):
        if geo_attention is not None:
            geometry = KnnGeometry(channels, geo_attention, geo_k, geo_stride)
        else:
            rank = max(min_rank, channels // geo_reduction)
            geometry = GeometryAdapter(channels, channels, rank, indice_key, neighbour_attention)
        super().__init__(channels, prior_dim, num_tokens, prior_rank, adapter_rank, dropout, prompt_dropout,
                         geometry)
        self.reader = PromptKV(num_heads) if num_tokens > 0 else None

    def prompt_tokens(self, ctx: PeftContext, level: Level) -> torch.Tensor | None:
        """(B, T, C) point-prior prompts of each scene, or None (decoder blocks)."""
        if self.tokens is None:
            return None
        tokens = self.prompt_tokens_of(ctx)
        ctx.cache[("prompt_tokens", id(self))] = tokens  # the same draw for the geometry operator
        return tokens

    def mlp_delta(self, h: torch.Tensor, mlp_out: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        """(N, C) MLP output -> ``0.7 * adapter(MLP output)``."""
        return self.mlp_output_delta(mlp_out, ctx)

    def output(self, y: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        """(N, C) block output -> with the geometry operator's delta and the output adapter."""
        tokens = ctx.cache.pop(("prompt_tokens", id(self)), None)
        if isinstance(self.geometry, KnnGeometry):
            offset = level.offset
            return self.knn_then_adapter(y, level.grid, scene_index(offset), len(offset), ctx, tokens)
        sparse = level.sparse
        y = y + recompute(lambda feats: self.geometry(sparse.replace_feature(feats), sparse, ctx),
                          y, enabled=ctx.recompute_branches)
        return y + recompute(self.out_adapter, y, enabled=ctx.recompute_branches)
