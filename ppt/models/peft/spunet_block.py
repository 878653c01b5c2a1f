"""PEFT on SpUNet basic blocks: the adapted block (SPEC §8).

A stage's per-block module (``peft``: ``dapt.DaptAdapter`` or ``point_peft.PointPeftAdapter``)
maps (block input, block output) to the adapted output; :class:`PeftBlock` runs the frozen
block, then that module, and recomputes both in backward so the block keeps only its input.
Two hooks reach inside the block: ``peft.ssf`` (DAPT's scale-and-shift after ``norm1``,
``norm2`` and the shortcut's ``proj_norm``, or None) and ``peft.branch(f, ctx)`` (Point-PEFT:
a delta added to the residual branch's output f before the shortcut sum and the final ReLU);
with neither, the base block's own forward runs.
The PTv3 counterpart is ``ptv3_block.PeftPTv3Block``; ``stages.BLOCK_ADAPTERS`` picks one by
block class.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppt.models.peft.adapters import PeftContext, scale_shift
from ppt.models.spunet import BasicBlock, DomainContext


class PeftBlock(BasicBlock):
    """A BasicBlock with a PEFT module ``peft`` applied to (block input, block output).

    With ``recompute`` (set by `apply_stage`), the block and its PEFT module run as one
    non-reentrant checkpoint while autograd records: only the block input's features are kept,
    everything inside is recomputed in backward. The recomputation is kept free of side effects:
    it runs on a private copy of the context's prompt lists (DAPT appends its internal prompt;
    a rerun would append again), and on the block's own rulebook as the first run left it
    (spconv reuses it instead of building it again). Only that rulebook is held for the rerun,
    not the sparse tensor's whole ``indice_dict`` (the k5 stem's rulebook alone is 2 x 125 x N
    int32 on the Native algorithm).
    """

    peft: nn.Module
    recompute: bool = False

    def forward(self, x, ctx: DomainContext):
        if not isinstance(ctx, PeftContext) or not ctx.enabled:
            return super().forward(x, ctx)
        if not (self.recompute and torch.is_grad_enabled()):
            return self._adapted(x, ctx)
        prompts = {k: list(v) for k, v in ctx.prompts.items()}
        key = self.conv1.indice_key  # conv2 and Point-PEFT's geometry conv share it; proj has none
        template = x.replace_feature(x.features)
        template.indice_dict = {}
        rulebooks = [x.indice_dict]  # the first run sees (and passes on) every rulebook of x

        def run(feats: torch.Tensor):
            local = dataclasses.replace(ctx, prompts={k: list(v) for k, v in prompts.items()},
                                        recompute_branches=False)
            xs = template.replace_feature(feats)
            xs.indice_dict = rulebooks[0]
            return self._adapted(xs, local), local.prompts

        out, ctx.prompts = checkpoint(run, x.features, use_reentrant=False)
        rulebooks[0] = {key: out.indice_dict[key]} if key in out.indice_dict else {}
        return out

    def _adapted(self, x, ctx: PeftContext):
        if self.peft.ssf is None and getattr(self.peft, "branch", None) is None:
            out = super().forward(x, ctx)
        else:
            out = self._hooked(x, ctx)
        return out.replace_feature(self.peft(x, out, ctx))

    def _hooked(self, x, ctx: PeftContext):
        """``BasicBlock.forward`` with the PEFT module's SSF and residual-branch delta."""
        ssf, branch = self.peft.ssf, getattr(self.peft, "branch", None)
        if self.prompt_adapter is not None:
            x = x.replace_feature(x.features + self.prompt_adapter(x.features, ctx))
        shortcut = x.features
        if self.proj is not None:
            shortcut = scale_shift(ssf, "proj_norm", self.proj_norm(self.proj(x).features, ctx))
        out = self.conv1(x)
        out = out.replace_feature(F.relu(scale_shift(ssf, "norm1", self.norm1(out.features, ctx))))
        out = self.conv2(out)
        f = scale_shift(ssf, "norm2", self.norm2(out.features, ctx))
        if branch is not None:
            f = f + branch(f, ctx)
        return out.replace_feature(F.relu(f + shortcut))
