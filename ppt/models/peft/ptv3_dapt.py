"""DAPT on PTv3 blocks (SPEC §8, PTv3; Zhou et al., CVPR 2024, github.com/LMD0311/DAPT).

Per block (``ptv3_block.PeftPTv3Block``), as DAPT's transformer block:

    h     = SSF(LN2(x))                                            the frozen MLP's input
    n     = LayerNorm(h)                                           the adapter's own norm
    delta = up(dropout(GELU(down(n)))) * ReLU(Linear(C -> 1)(n))   (N, C), per-token dynamic scale
    x     = x + drop_path(MLP(h) + delta)                          adapter parallel to the MLP
    p_i   = SSF(per-scene mean of GELU(delta))                     (B, C) internal prompt

(``dapt.DynamicAdapter``: the reference's init, dropout and scale-after-LayerNorm.) Prompts
accumulate within a stage (its blocks share the width C): block i's attention reads the prompts
of the stage's earlier blocks as extra keys/values of its own scene (``ptv3_block.PromptKV``,
zero-gated per head), as DAPT inserts each block's prompt as a new token that only later blocks
attend to. The backbone adds the per-scene mean of the last stage's prompts to the features the
head reads (``peft_backbones.PeftPTv3``; encoder-only models: each encoder stage's mean prompt on that
stage's slice of the concatenated output).

SSF (``peft.ssf``): as the reference's ``tfts``, a per-channel scale-and-shift after norm1, the
qkv Linear, the attention projection, norm2, fc1, fc2 and on each internal prompt (applied by
``ptv3_block.PeftPTv3Block``), plus one after the stem (the reference: after its patch
embedding) and one on the backbone output (the reference: after its final norm; PTv3 has none).
The xCPE layers, which the reference's transformer lacks, get none.

Deviations from the reference: the list in ``dapt.py``'s module docstring (prompts as
read-only, zero-gated keys/values accumulated per stage; SSF identity at start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppt.models.peft.adapters import PeftContext, ScaleShift, bottleneck_rank, recompute, scale_shift, scatter_mean
from ppt.models.peft.dapt import DynamicAdapter
from ppt.models.peft.ptv3_block import PromptKV, scene_index
from ppt.models.ptv3_layers import Level

# block layers an SSF follows on a PTv3 block (ptv3_block.PeftPTv3Block applies them)
PTV3_SSF_LAYERS = ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")


class PTv3DaptAdapter(DynamicAdapter):
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
        ssf: SSF after the block's layers (``PTV3_SSF_LAYERS``) and on the internal prompt.
        mlp_hidden: the MLP's hidden width (fc1's SSF).
        prompt_ssf: SSF on the internal prompt (with ``ssf``; False where no later block or
            head reads the prompt).
    """

    def __init__(self, channels: int, num_heads: int, stage: int, reduction: int = 6,
                 min_rank: int = 8, dropout: float = 0.2, reads_prompts: bool = True, ssf: bool = False,
                 mlp_hidden: int = 0, prompt_ssf: bool = True):
        super().__init__(channels, channels, bottleneck_rank(channels, reduction, min_rank), dropout)
        self.stage = stage
        self.reader = PromptKV(num_heads) if reads_prompts else None
        self.ssf = None
        if ssf:
            widths = {"qkv": 3 * channels, "fc1": mlp_hidden or 4 * channels}
            names = (*PTV3_SSF_LAYERS, *["prompt"] * prompt_ssf)
            self.ssf = nn.ModuleDict({n: ScaleShift(widths.get(n, channels)) for n in names})

    def prompt_tokens(self, ctx: PeftContext, level: Level) -> torch.Tensor | None:
        """(B, T, C) prompts of the stage's earlier blocks, or None for its first block."""
        prompts = ctx.prompts.get(self.stage)
        return torch.stack(prompts, dim=1) if prompts and self.reader is not None else None

    def mlp_delta(self, h: torch.Tensor, mlp_out: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        """(N, C) MLP input -> (N, C) adapter output; appends the block's internal prompt."""
        delta = recompute(super().forward, h, enabled=ctx.recompute_branches)
        prompt = scatter_mean(F.gelu(delta), scene_index(level.offset), len(level.offset))
        ctx.prompts.setdefault(self.stage, []).append(scale_shift(self.ssf, "prompt", prompt))
        return delta

    def output(self, y: torch.Tensor, level: Level, ctx: PeftContext) -> torch.Tensor:
        return y
