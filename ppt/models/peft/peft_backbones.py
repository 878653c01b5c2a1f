"""The backbone classes a PEFT stage gives a trained SpUNet / PTv3 (``stages.apply_stage``).

The stage swaps the backbone's class for :class:`PeftSpUNet` / :class:`PeftPTv3` (module names
and state unchanged): their forward builds the per-forward :class:`~ppt.models.peft.adapters.PeftContext`
(Point-PEFT's retrieved set and prompt coordinates, the domain), applies DAPT's output SSF and
adds DAPT's mean prompt to the output features; in training mode the frozen BatchNorms keep
their running statistics.
"""
from __future__ import annotations

import torch
from torch import nn

from ppt.models.peft.adapters import PeftContext
from ppt.models.peft.dapt import head_prompt
from ppt.models.peft.memory_bank import MemoryBank, pooled_bottom, pooled_bottom_ptv3
from ppt.models.peft.point_peft import AdapterBatchNorm
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.spunet import DomainContext, SpUNet, offset_to_batch


def retrieved_set(backbone: nn.Module, batch: dict, pooled) -> torch.Tensor | None:
    """Point-PEFT's retrieved set (B, R, D) of the batch's scenes, or None without a memory bank.

    ``pooled()`` gives the scenes' bank queries by a frozen pass, for scenes the bank does not
    hold (validation, Mix3D pairs)."""
    if backbone.memory_bank is None:
        return None
    names = batch["name"]
    query = backbone.memory_bank.lookup(names)
    if query is None:
        query = pooled()
    retrieved, _, _ = backbone.memory_bank.retrieve(query.to(batch["feat"].device), names,
                                                    backbone.top_k, backbone.temperature, backbone.exclude_own)
    return retrieved


def peft_context(backbone: nn.Module, batch: dict, ctx: DomainContext, pooled) -> PeftContext:
    """The forward's PeftContext: domain, Point-PEFT's retrieved set and prompt coordinates."""
    extras = getattr(backbone, "peft", None)
    return PeftContext(domain=ctx.domain, prompt=ctx.prompt, retrieved=retrieved_set(backbone, batch, pooled),
                       prompt_coords=getattr(extras, "prompt_coords", None))


def output_ssf(backbone: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """DAPT's SSF on the backbone output (``peft.ssf``), else feats unchanged."""
    ssf = getattr(getattr(backbone, "peft", None), "ssf_out", None)
    return feats if ssf is None else ssf(feats)


class PeftSpUNet(SpUNet):
    """SpUNet with a stage applied: builds the per-forward PeftContext (retrieval for
    Point-PEFT), adds DAPT's mean prompt to the output features, keeps BN statistics frozen.
    ``peft`` (when the stage has any): backbone-level parameters, Point-PEFT's
    ``prompt_coords`` and DAPT's ``ssf_out``."""

    peft_stage: str
    memory_bank: MemoryBank | None
    top_k: int
    temperature: float
    exclude_own: bool

    def forward(self, batch: dict, ctx: DomainContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else DomainContext()
        x = self.sparse_input(batch)
        pctx = peft_context(self, batch, ctx, lambda: pooled_bottom(self, x, ctx))
        out = self.forward_sparse(x, pctx)
        feats = output_ssf(self, out.features)
        prompt = head_prompt(pctx, len(self.encoder) + len(self.decoder) - 1, out.indices[:, 0].long())
        return feats if prompt is None else feats + prompt

    def train(self, mode: bool = True):
        super().train(mode)
        _freeze_statistics(self)
        return self


class PeftPTv3(PointTransformerV3):
    """PTv3 with a stage applied: PTv3's forward with a fresh PeftContext (Point-PEFT's
    retrieval; DAPT's prompts, whose per-scene mean is added to the output features); frozen
    BatchNorm statistics stay frozen in training mode."""

    peft_stage: str
    memory_bank: MemoryBank | None
    top_k: int
    temperature: float
    exclude_own: bool

    def forward(self, batch: dict, ctx: DomainContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else DomainContext()
        pctx = peft_context(self, batch, ctx, lambda: pooled_bottom_ptv3(self, batch, ctx))
        feats = output_ssf(self, super().forward(batch, pctx))
        if not pctx.prompts:
            return feats
        scene = offset_to_batch(batch["offset"].to(feats.device).long())
        if not self.enc_mode:
            prompt = head_prompt(pctx, len(self.encoder) + len(self.decoder) - 1, scene)
            return feats if prompt is None else feats + prompt
        # encoder only: the output concatenates the stages (finest first); each stage's slice
        # gets that stage's mean prompt
        parts = [head_prompt(pctx, s, scene) for s in range(len(self.encoder))]
        widths = [stage.blocks[0].attn.channels for stage in self.encoder]
        prompt = torch.cat([p if p is not None else feats.new_zeros(len(feats), c) for p, c in zip(parts, widths)], 1)
        return feats + prompt

    def train(self, mode: bool = True):
        super().train(mode)
        _freeze_statistics(self)
        return self


def _freeze_statistics(backbone: nn.Module) -> None:
    """BatchNorms run on their running statistics, except (stage `decoder`) the trained ones and
    the PEFT modules' own (``AdapterBatchNorm``)."""
    for m in backbone.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, AdapterBatchNorm):
            continue
        trained = m.affine and m.weight.requires_grad
        if not (backbone.peft_stage == "decoder" and trained):
            m.eval()
