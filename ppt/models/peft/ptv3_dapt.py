"""DAPT on PTv3 blocks (SPEC §8, PTv3; Zhou et al., CVPR 2024, github.com/LMD0311/DAPT).

Per block (``ptv3_block.PeftPTv3Block``), as DAPT's transformer block:

    h     = LN2(x)                                                 the frozen MLP's input
    delta = BottleneckAdapter(h) * ReLU(Linear(C -> 1)(h))         (N, C), per-token dynamic scale
    x     = x + drop_path(MLP(h) + delta)                          adapter parallel to the MLP
    p_i   = per-scene mean of GELU(delta)                          (B, C) internal prompt

Prompts accumulate within a stage (its blocks share the width C): block i's attention reads
the prompts of the stage's earlier blocks as extra keys/values of its own scene
(``ptv3_block.PromptKV``, zero-gated per head), as DAPT inserts each block's prompt as a new
token that later blocks attend to. The backbone adds the per-scene mean of the last stage's
prompts to the features the head reads (``stages.PeftPTv3``; encoder-only models: each
encoder stage's mean prompt on that stage's slice of the concatenated output).

Deviations from the reference (stated): DAPT's prompt tokens are also updated by the later
blocks (they are tokens of the sequence) and its SSF-style scale-and-shift parameters after
every layer train too; here prompts are read-only keys/values and the backbone is frozen whole
(as the SpUNet stage), which keeps the trainable share and the memory small. The dynamic
scale's bias starts at 1 (weights ~N(0, 0.02)) so every token passes the adapter's gradient at
step 0 (the reference's Kaiming init with zero bias zeroes it for about half of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppt.models.peft.adapters import (
    INIT_STD, BottleneckAdapter, PeftContext, bottleneck_rank, recompute, scatter_mean,
)
from ppt.models.peft.ptv3_block import PromptKV, scene_index
from ppt.models.ptv3_layers import Level


class PTv3DaptAdapter(nn.Module):
    """DAPT module of one PTv3 block.

    Args:
        channels: block width C.
        num_heads: the block's attention heads (one prompt gate per head).
        stage: index of the block's stage (encoder then decoder, execution order).
        reduction: bottleneck r = max(min_rank, C // reduction).
        min_rank: smallest bottleneck width.
        dropout: dropout inside the bottleneck.
        reads_prompts: the block reads earlier prompts of its stage (False for a stage's first
            block: nothing to read, no gate).
    """

    def __init__(self, channels: int, num_heads: int, stage: int, reduction: int = 6,
                 min_rank: int = 8, dropout: float = 0.1, reads_prompts: bool = True):
        super().__init__()
        self.stage = stage
        self.adapter = BottleneckAdapter(channels, channels, bottleneck_rank(channels, reduction, min_rank), dropout)
        self.scale = nn.Linear(channels, 1)
        nn.init.trunc_normal_(self.scale.weight, std=INIT_STD)
        nn.init.ones_(self.scale.bias)
        self.reader = PromptKV(num_heads) if reads_prompts else None

    def prompt_tokens(self, ctx: PeftContext, level: Level) -> torch.Tensor | None:
        """(B, T, C) prompts of the stage's earlier blocks, or None for its first block."""
        prompts = ctx.prompts.get(self.stage)
        return torch.stack(prompts, dim=1) if prompts and self.reader is not None else None

    def mlp_delta(self, h: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        """(N, C) MLP input -> (N, C) adapter output; appends the block's internal prompt."""
        delta = recompute(self._delta, h, enabled=ctx.recompute_branches)
        prompt = scatter_mean(F.gelu(delta), scene_index(level.offset), len(level.offset))
        ctx.prompts.setdefault(self.stage, []).append(prompt)
        return delta

    def output(self, y: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        return y

    def _delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(h) * F.relu(self.scale(h))
