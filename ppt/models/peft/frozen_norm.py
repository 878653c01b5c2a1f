"""Frozen normalisation layers run as a constant per-channel scale-and-shift.

A BatchNorm with frozen running statistics and a frozen affine is the function
``y = x * a + b`` with per-channel constants

    a = weight / sqrt(running_var + eps)        b = bias - running_mean * a

and PDNorm (``ppt.models.prompts``) with a frozen prompt, frozen modulation and frozen
per-dataset BN adds its prompt modulation ``y * (1 + scale) + shift`` on top, which folds into
the same form: ``a' = a * (1 + scale)``, ``b' = b * (1 + scale) + shift``.

While autograd records, ``F.batch_norm`` keeps its (N, C) input for backward and PDNorm's
modulation keeps another (N, C) intermediate; ``torch.addcmul(b, x, a)`` with constant a and b
keeps only ``a`` (C values): the input gradient is ``grad * a``. So a frozen norm inside a
backbone that still passes gradients to adapters costs no activation memory at all.

The constants are recomputed at every forward from the module's current state (a handful of
C-length operations and, for PDNorm, one Linear on the (1, D) prompt), so loading other weights
later needs no cache invalidation. Without autograd, or as soon as the norm's weight trains
(or its statistics are in training mode), the module's own forward runs unchanged: evaluation
outputs of a frozen model stay bit-identical to the base model's. A trainable bias alone (the
blocks' biases Point-PEFT trains) keeps the constant path: ``b`` then carries its gradient,
which needs no input.

`freeze_norms(module)` swaps the class of every BatchNorm and PDNorm inside `module` for a
subclass with this behaviour (module names, state-dict keys and ``isinstance`` checks unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from ppt.models.prompts import MEAN_PROMPT, PDNorm

__all__ = ["FrozenNorm", "FrozenPDNorm", "bn_scale_shift", "freeze_norms", "is_frozen_norm"]


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (C,) fp32, with ``bn(x) == x * a + b`` in eval mode."""
    a = torch.rsqrt(bn.running_var.float() + bn.eps)
    b = -bn.running_mean.float() * a
    if bn.affine:
        a, b = a * bn.weight.float(), b * bn.weight.float() + bn.bias.float()
    return a, b


def _bn_frozen(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Running statistics in use (eval mode, not batch statistics) and a frozen weight (the
    bias may train)."""
    return not bn.training and bn.running_var is not None and not (bn.affine and bn.weight.requires_grad)


def _scale_shift(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C) -> x * a + b in fp32; backward keeps only `a` (b's gradient, where a trainable
    bias gives it one, is the sum of the output gradient)."""
    return torch.addcmul(b, x.float(), a.detach())


class FrozenNorm:
    """Mixin for a BatchNorm: constant scale-and-shift while autograd records (module doc)."""

    def forward(self, x, *args, **kwargs):
        if not torch.is_grad_enabled() or not _bn_frozen(self):
            return super().forward(x, *args, **kwargs)
        return _scale_shift(x, *bn_scale_shift(self))


class FrozenPDNorm:
    """Mixin for PDNorm: per-dataset BN and prompt modulation folded into one constant
    scale-and-shift while autograd records and everything it reads is frozen (module doc).
    The unknown-domain prompt ("mean") keeps PDNorm's own path."""

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.decoupled:
            bn = self.norms[ctx.domain] if ctx.domain in self.norms else None
        else:
            bn = self.norm
        mod = self.modulation
        frozen = (torch.is_grad_enabled() and ctx.domain != MEAN_PROMPT and bn is not None
                  and _bn_frozen(bn)
                  and (mod is None or (ctx.prompt is not None and not ctx.prompt.requires_grad
                                       and not any(p.requires_grad for p in mod.parameters()))))
        if not frozen:
            return super().forward(x, ctx)
        a, b = bn_scale_shift(bn)
        if mod is not None:
            shift, scale = mod(ctx.prompt).float().chunk(2, dim=-1)  # (1, C) each
            a, b = a * (1.0 + scale[0]), b * (1.0 + scale[0]) + shift[0]
        return _scale_shift(x, a, b)


_SWAPPED: dict[type, type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    base = type(module)
    if issubclass(base, mixin):
        return
    if base not in _SWAPPED:
        _SWAPPED[base] = type(f"Frozen{base.__name__}", (mixin, base), {})
    module.__class__ = _SWAPPED[base]


def is_frozen_norm(module: nn.Module) -> bool:
    return isinstance(module, (FrozenNorm, FrozenPDNorm))


def freeze_norms(module: nn.Module) -> int:
    """Give every BatchNorm and PDNorm inside `module` the frozen behaviour (in place; their
    parameters' ``requires_grad`` is left as it is: a norm that trains keeps its own forward).
    Returns how many modules were swapped."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _swap(m, FrozenNorm)
            count += 1
        elif isinstance(m, PDNorm):
            _swap(m, FrozenPDNorm)
            count += 1
    return count
