"""PEFT on PTv3 blocks: the adapted block and the per-scene prompt keys/values (SPEC §8, PTv3).

A PTv3 block (``ptv3_layers.Block``) is ``x += xCPE(x); x += attn(LN1(x)); x += MLP(LN2(x))``,
attention inside serialized patches. A stage's per-block module (``peft``: ``ptv3_dapt`` or
``ptv3_point_peft``) hooks into it in three places, the interface :class:`PeftPTv3Block` calls:

- ``prompt_tokens(ctx, level) -> (B, T, C) | None``: prompt tokens of each scene. They enter
  the block's attention as extra keys and values: ``k, v = qkv(LN1(token))`` through the
  block's own frozen LN1 and qkv (a token is handled like a point, as the papers insert
  prompts as tokens), and every point's query reads its OWN scene's tokens. A patch never
  spans two scenes (``ptv3_layers.Patches``), so this equals giving every patch its scene's
  prompt keys/values; prompts never mix scenes of a batch.
- ``mlp_delta(h, mlp_out, level, ctx) -> (N, C) | None``: added to the MLP branch, inside the
  same drop path; ``h`` is the MLP's input, ``mlp_out`` its output (DAPT's adapter reads ``h``,
  beside the frozen MLP; Point-PEFT's reads ``mlp_out``, ``0.7 * adapter(MLP(h))``).
- ``output(y, level, ctx) -> (N, C)``: applied to the block output (Point-PEFT's
  geometry-aware operator and output adapter).
- ``ssf``: None, or DAPT's scale-and-shift modules by layer name (``ptv3_dapt.PTV3_SSF_LAYERS``):
  applied after norm1, the qkv Linear, the attention projection, norm2, fc1 and fc2.

Deviation from the papers (stated, deliberate): prompt keys/values are read by a separate
softmax whose output is multiplied by a zero-initialised per-head gate and added to the patch
attention (LLaMA-Adapter's zero-init attention), instead of one softmax over patch and prompt
keys. One joint softmax would change the base model's output at step 0 (a prompt key is never
"absent": LN1 of a zero token is LN1's bias), and a zero-init start equal to the base model is
a requirement of every stage here. The gated form keeps the base attention exact at step 0 and
still lets every point attend to its scene's prompts once the gate opens.

Memory: with ``recompute`` (default) the block and its PEFT module run as one non-reentrant
checkpoint while autograd records: only the block input (N, C) is kept, everything inside
(qkv, attention, MLP hidden, adapters) is recomputed in backward, as ``spunet_block.PeftBlock`` does
for SpUNet. DAPT's internal prompts are appended to a private copy of the context's prompt
lists inside the checkpoint, so the recomputation does not append them twice.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppt.models.peft.adapters import PeftContext, scale_shift
from ppt.models.ptv3_layers import Block, Level
from ppt.models.spunet import DomainContext


class PromptKV(nn.Module):
    """Zero-gated attention of every point over its scene's prompt keys/values.

    Args:
        num_heads: H of the block's attention (one gate per head, zero-initialised).
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """q (N, C) queries in batch order, kv (B, T, 2C) prompt keys and values, offset (B,)
        cumulative end row of each scene -> (N, C) gated attention output.

        A loop over the B scenes of the batch: each scene's rows attend to its own T tokens
        only (no (N, T, C) gather, no cross-scene scores)."""
        n, c = q.shape
        h = self.gate.numel()
        k, v = kv.reshape(kv.shape[0], kv.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d)
        outs, start = [], 0
        for b, end in enumerate(offset.tolist()):
            qs = q[start:end].reshape(end - start, h, c // h).transpose(0, 1)  # (H, n_b, d)
            outs.append(F.scaled_dot_product_attention(qs, k[b].to(qs.dtype), v[b].to(qs.dtype)).transpose(0, 1))
            start = end
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (N, H, d)
        return (out * self.gate[:, None].to(out.dtype)).reshape(n, c)


class PeftPTv3Block(Block):
    """A PTv3 Block with a PEFT module ``peft`` (see the module docstring for its interface).

    With ``ctx`` not a :class:`PeftContext` or ``ctx.enabled`` False the block is the base block.
    """

    peft: nn.Module
    recompute: bool = False

    def forward(self, x: torch.Tensor, level: Level, ctx: DomainContext, order_index: int,
                cpe_input: torch.Tensor | None = None) -> torch.Tensor:
        if not _active(ctx):
            return super().forward(x, level, ctx, order_index, cpe_input)
        if not (self.recompute and torch.is_grad_enabled()):
            return self._adapted(x, level, ctx, order_index, cpe_input)
        prompts = {k: list(v) for k, v in ctx.prompts.items()}

        def run(feats: torch.Tensor, cpe: torch.Tensor | None):
            local = dataclasses.replace(ctx, prompts={k: list(v) for k, v in prompts.items()},
                                        recompute_branches=False)
            return self._adapted(feats, level, local, order_index, cpe), local.prompts

        out, ctx.prompts = checkpoint(run, x, cpe_input, use_reentrant=False)
        return out

    def _adapted(self, x, level, ctx, order_index, cpe_input):
        out = super().forward(x, level, ctx, order_index, cpe_input)
        return self.peft.output(out, level, ctx)

    def attention(self, h: torch.Tensor, level: Level, ctx: DomainContext, order_index: int) -> torch.Tensor:
        tokens = self.peft.prompt_tokens(ctx, level) if _active(ctx) else None
        ssf = self.peft.ssf if _active(ctx) else None
        if tokens is None and ssf is None:
            return super().attention(h, level, ctx, order_index)
        c = self.attn.channels
        qkv = scale_shift(ssf, "qkv", self.attn.qkv(scale_shift(ssf, "norm1", h)))
        out = self.attn.attend(qkv, level, order_index)
        if tokens is not None:
            b, t, _ = tokens.shape
            normed = scale_shift(ssf, "norm1", self.norm1(tokens.reshape(b * t, c), ctx))
            kv = scale_shift(ssf, "qkv", self.attn.qkv(normed))[:, c:].reshape(b, t, 2 * c)
            out = out + self.peft.reader(qkv[:, :c], kv, level.offset)
        return scale_shift(ssf, "proj", self.attn.proj(out))

    def feed_forward(self, h: torch.Tensor, level: Level, ctx: DomainContext) -> torch.Tensor:
        if not _active(ctx):
            return super().feed_forward(h, level, ctx)
        ssf = self.peft.ssf
        if ssf is None:
            out = super().feed_forward(h, level, ctx)
        else:  # the MLP with SSF after norm2 (its input, the adapter's too), fc1 and fc2
            h = scale_shift(ssf, "norm2", h)
            mlp = self.mlp
            out = self.ls2(scale_shift(ssf, "fc2", mlp.fc2(F.gelu(scale_shift(ssf, "fc1", mlp.fc1(h))))))
        delta = self.peft.mlp_delta(h, out, level, ctx)
        return out if delta is None else out + delta


def _active(ctx) -> bool:
    return isinstance(ctx, PeftContext) and ctx.enabled


def scene_index(offset: torch.Tensor) -> torch.Tensor:
    """(B,) cumulative ends -> (N,) scene index of every row."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts)
