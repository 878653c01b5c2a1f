"""DAPT on SpUNet basic blocks (SPEC §8, "DAPT stage"; Zhou et al., CVPR 2024,
github.com/LMD0311/DAPT).

Per basic block, a dynamic adapter runs parallel to the block on the block input and is added
to the block output, as the reference's adapter runs parallel to its MLP:

    n     = LayerNorm(x)                                              the adapter's own norm
    delta = up(dropout(GELU(down(n)))) * ReLU(Linear(C_in -> 1)(n))   (N, C_out), dynamic scale
    y     = block(x) + delta
    y     = y + gate_i * attention(y, [p_1 .. p_{i-1}] of this stage)  weight-free, gate zero-init
    p_i   = SSF(scatter_mean(GELU(delta), batch))                     (B, C_out) internal prompt

As the reference: the dynamic scale reads the adapter's LayerNorm output; the down-projection
and the scale are nn.Linear's own (Kaiming-uniform) init with zero biases, the up-projection is
zero (the adapter starts silent); dropout (``peft.dropout``, the reference's
``drop_adapter_rate``, 0.2 on ScanObjectNN PB_T50_RS) after the GELU; the internal prompt is the
per-scene mean of GELU(delta); a block's prompt is read by the LATER blocks only (the
reference inserts it as a token after the block has run), so the first block of a stage reads
nothing and has no gate.

Prompts accumulate within a U-Net stage (its blocks share the output width); the backbone adds
the per-scene mean of the last stage's prompts to the voxel features the head reads (added, not
concatenated, so the head input width and the base head weights stay valid; zero while the
adapters are silent).

SSF (``ssf``, ``peft.ssf``): the reference also trains a per-channel scale-and-shift after each
of its layers (``tfts``: after norm1, qkv, proj, norm2, fc1, fc2, on each internal prompt, after
the patch embedding and after the final norm). On a basic block they follow the block's norms:
a frozen conv followed by a frozen BatchNorm is one linear map, so one SSF after the pair is the
reference's SSF after its linear layer and after its norm folded into one (``norm1``, ``norm2``,
``proj_norm`` of the shortcut); one on the internal prompt; the backbone adds one after the stem
and one on its output (``stages.apply_stage``). ``spunet_block.PeftBlock`` runs the block with
them.

Memory: the block with its adapter is recomputed in backward as a whole (``spunet_block.PeftBlock``),
so only the block input is kept; with that off, the adapter and the prompt reader are recomputed
on their own (``adapters.recompute``).

What trains: the adapters, their dynamic scales, prompt gates, SSF (with ``ssf``) and the head;
the backbone is frozen whole, norms included, as in the DAPT paper (``train_norms`` of
``stages.apply_stage`` also trains the norm affines, SPEC §8's first design).

Deviations from the reference (stated; both backbones, ``ptv3_dapt.py`` for PTv3's mapping):
1. Internal prompts are read, not processed: the reference inserts each block's prompt as a
   token that later blocks' attention, MLP and adapter update; here later blocks read them
   through a zero-gated weight-free attention (SpUNet: no attention layer to insert them into)
   or as zero-gated extra keys/values with their own softmax (PTv3: one joint softmax would
   change the base model at step 0), and they are never updated.
2. Prompts accumulate per stage (U-Net / PTv3 stage: widths differ), not over the whole
   network; the head adds the per-scene mean of the last stage's prompts to every voxel's
   feature (the reference concatenates cls token, mean prompt and max-pooled tokens).
3. The adapter sits beside the whole basic block on the SpUNet (its input: the block input,
   its output added after the block's final ReLU); the reference's beside the MLP (PTv3: as
   the reference).
4. SSF is an option (``peft.ssf``, off by default; the reference always trains it, about 10 %
   of its trainable parameters) and starts as the identity (the reference: scale N(1, 0.02),
   shift N(0, 0.02), so its model starts off the base model); on the SpUNet one SSF follows
   each conv + norm pair; PTv3's xCPE and the pooling / unpooling layers, which the reference
   lacks, get none.

Note: with the reference's zero-bias dynamic scale, a block whose tokens all look alike (a toy
model) can have a scale of 0 on every token and learn nothing until its input changes; on real
features about half the tokens pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import spconv.pytorch as spconv

from ppt.models.peft.adapters import (
    BottleneckAdapter, GatedPromptReader, PeftContext, ScaleShift, bottleneck_rank, kaiming_init, recompute,
    scale_shift, scatter_mean,
)

# block layers an SSF follows on a SpUNet basic block (spunet_block.PeftBlock applies them)
SPUNET_SSF_LAYERS = ("norm1", "norm2", "proj_norm")


class DynamicAdapter(nn.Module):
    """DAPT's dynamic adapter: ``BottleneckAdapter(n) * ReLU(Linear(C_in -> 1)(n))``, n = LN(x).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        rank: bottleneck width r.
        dropout: dropout after the GELU.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, dropout: float = 0.2):
        super().__init__()
        self.adapter = BottleneckAdapter(in_channels, out_channels, rank, dropout)
        self.scale = nn.Linear(in_channels, 1)
        kaiming_init(self.scale.weight)
        nn.init.zeros_(self.scale.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in) -> (N, C_out)."""
        n = self.adapter.norm(x)
        return self.adapter.project(n) * F.relu(self.scale(n))


class DaptAdapter(DynamicAdapter):
    """DAPT module of one basic block.

    Args:
        in_channels: block input channels C_in.
        out_channels: block output channels C_out.
        stage: index of the U-Net stage of the block (prompts accumulate per stage).
        reduction: bottleneck r = max(min_rank, C_in // reduction).
        min_rank: smallest bottleneck width.
        dropout: dropout inside the bottleneck.
        reads_prompts: the block reads the prompts of the stage's earlier blocks (False for a
            stage's first block: nothing to read, no gate).
        ssf: SSF after the block's norms and on the internal prompt.
        shortcut: the block has a shortcut projection (C_in != C_out; one more SSF, after its norm).
        prompt_ssf: SSF on the internal prompt (with ``ssf``; False where no later block or
            head reads the prompt).
    """

    def __init__(self, in_channels: int, out_channels: int, stage: int, reduction: int = 6,
                 min_rank: int = 8, dropout: float = 0.2, reads_prompts: bool = True, ssf: bool = False,
                 shortcut: bool = False, prompt_ssf: bool = True):
        super().__init__(in_channels, out_channels, bottleneck_rank(in_channels, reduction, min_rank), dropout)
        self.stage = stage
        self.reader = GatedPromptReader() if reads_prompts else None
        self.ssf = None
        if ssf:
            names = [*SPUNET_SSF_LAYERS[:2], *SPUNET_SSF_LAYERS[2:] * shortcut, *["prompt"] * prompt_ssf]
            self.ssf = nn.ModuleDict({n: ScaleShift(out_channels) for n in names})

    def forward(self, x: spconv.SparseConvTensor, out: spconv.SparseConvTensor,
                ctx: PeftContext) -> torch.Tensor:
        """Block input x (N, C_in), block output out (N, C_out) -> adapted (N, C_out) features."""
        batch = out.indices[:, 0].long()
        delta = recompute(super().forward, x.features, enabled=ctx.recompute_branches)
        y = out.features + delta
        prompts = ctx.prompts.setdefault(self.stage, [])
        if self.reader is not None and prompts:  # the stage's earlier blocks' prompts only
            y = y + recompute(self.reader, y, torch.stack(prompts, dim=1), batch, enabled=ctx.recompute_branches)
        prompts.append(scale_shift(self.ssf, "prompt", scatter_mean(F.gelu(delta), batch, out.batch_size)))
        return y


def head_prompt(ctx: PeftContext, stage: int, batch: torch.Tensor) -> torch.Tensor | None:
    """Per-voxel copy of the scene's mean prompt of `stage` (N, C), or None without prompts."""
    prompts = ctx.prompts.get(stage)
    if not prompts:
        return None
    return torch.stack(prompts, dim=1).mean(dim=1)[batch]
