"""DAPT on SpUNet basic blocks (SPEC §8, "DAPT stage").

Per basic block, a bottleneck adapter runs parallel to the block on the block input and is
added to the block output:

    delta = BottleneckAdapter(x) * ReLU(Linear(C_in -> 1)(x))       (N, C_out), dynamic scale
    y     = block(x) + delta
    p_i   = scatter_mean(delta, batch)                                (B, C_out) internal prompt
    y     = y + gate_i * attention(y, [p_1 .. p_i] of this stage)     weight-free, gate zero-init

The adapter is added after the block's final ReLU (the block itself is untouched, so the base
model is exactly recovered while the adapter is silent). Prompts accumulate within a U-Net
stage (all blocks of a stage share the output width); the backbone adds the per-scene mean of
the last stage's prompts to the voxel features the head reads (added, not concatenated, so the
head input width and the base head weights stay valid; it is zero while the adapters are
silent).

Memory: the block with its adapter is recomputed in backward as a whole (``spunet_block.PeftBlock``),
so only the block input is kept; with that off, the adapter and the prompt reader are recomputed
on their own (``adapters.recompute``): their inner activations (LayerNorm output, bottleneck,
attention output, ...) would otherwise double what a block keeps for backward.

What trains: the adapters, their dynamic scales and prompt gates, and the head; the backbone is
frozen whole, norms included, as in the DAPT paper (SPEC §8 had the norm affines train; that kept
every norm input alive for backward and cost more memory than full fine-tuning; ``train_norms``
of ``stages.apply_stage`` restores it).

The dynamic scale's bias starts at 1 (weights ~N(0, 0.02)), so at step 0 every voxel passes the
adapter's gradient (ReLU of a centred Linear would zero it for about half the voxels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import spconv.pytorch as spconv

from ppt.models.peft.adapters import (
    INIT_STD, BottleneckAdapter, GatedPromptReader, PeftContext, bottleneck_rank, recompute,
    scatter_mean,
)


class DaptAdapter(nn.Module):
    """DAPT module of one basic block.

    Args:
        in_channels: block input channels C_in.
        out_channels: block output channels C_out.
        stage: index of the U-Net stage of the block (prompts accumulate per stage).
        reduction: bottleneck r = max(min_rank, C_in // reduction).
        min_rank: smallest bottleneck width.
        dropout: dropout inside the bottleneck.
    """

    def __init__(self, in_channels: int, out_channels: int, stage: int, reduction: int = 6,
                 min_rank: int = 8, dropout: float = 0.1):
        super().__init__()
        self.stage = stage
        self.adapter = BottleneckAdapter(in_channels, out_channels,
                                         bottleneck_rank(in_channels, reduction, min_rank), dropout)
        self.scale = nn.Linear(in_channels, 1)
        nn.init.trunc_normal_(self.scale.weight, std=INIT_STD)
        nn.init.ones_(self.scale.bias)
        self.reader = GatedPromptReader()

    def forward(self, x: spconv.SparseConvTensor, out: spconv.SparseConvTensor,
                ctx: PeftContext) -> torch.Tensor:
        """Block input x (N, C_in), block output out (N, C_out) -> adapted (N, C_out) features."""
        batch = out.indices[:, 0].long()
        delta = recompute(self._delta, x.features, enabled=ctx.recompute_branches)
        prompts = ctx.prompts.setdefault(self.stage, [])
        prompts.append(scatter_mean(delta, batch, out.batch_size))
        y = out.features + delta
        return y + recompute(self.reader, y, torch.stack(prompts, dim=1), batch,
                             enabled=ctx.recompute_branches)

    def _delta(self, feats: torch.Tensor) -> torch.Tensor:
        return self.adapter(feats) * F.relu(self.scale(feats))


def head_prompt(ctx: PeftContext, stage: int, batch: torch.Tensor) -> torch.Tensor | None:
    """Per-voxel copy of the scene's mean prompt of `stage` (N, C), or None without prompts."""
    prompts = ctx.prompts.get(stage)
    if not prompts:
        return None
    return torch.stack(prompts, dim=1).mean(dim=1)[batch]
