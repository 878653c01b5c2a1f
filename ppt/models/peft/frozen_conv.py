"""Frozen sparse convolutions that compute only the input gradient.

spconv's autograd functions always save the input features of a convolution and always compute
the filter gradient in backward, even when the filter does not require grad. For a frozen
backbone with trainable modules inside it (adapters), the input gradient still has to flow
through every frozen convolution, but the filter gradient and the saved input are pure waste.

`freeze_sparse_conv(conv)` turns a spconv convolution module (SubMConv3d, SparseConv3d,
SparseInverseConv3d, ...) in place into its frozen variant:
- the filter (and bias) stop requiring grad;
- its forward routes the convolution through `IndiceConvInputGrad`, which saves only the
  rulebook and the filter, and computes the input gradient by running spconv's FORWARD kernel
  with the transposed filter on the transposed rulebook (swap the in/out rows of the pairs).
  For a kernel offset k with pairs (i -> o): out[o] += x[i] @ W_k^T, so
  dx[i] += dout[o] @ W_k, i.e. a convolution of dout with filter W_k^T from o to i.

The class of the instance is swapped for a subclass instead of wrapping it in a new module, so
the module tree and state-dict keys stay those of the base model (checkpoints keep loading) and
`isinstance(conv, spconv.SubMConv3d)` still holds.

Scope: the Native algorithm (CPU, and CUDA when configured) gets the input-grad-only path. The
implicit-GEMM algorithm (spconv's CUDA default) keeps spconv's own backward op and drops the
filter gradient: correct, but it saves no compute. A dgrad-only implicit-GEMM call (flipped,
transposed filter on pair_fwd for submanifold convs) could not be verified without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from spconv.pytorch.conv import SparseConvolution
from spconv.pytorch import functional as Fsp
from spconv.pytorch import ops

# as spconv's own functions: under CUDA autocast the convolution runs in fp16
_AMP_FWD = torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float16)
_AMP_BWD = torch.amp.custom_bwd(device_type="cuda")

__all__ = ["IndiceConvInputGrad", "freeze_sparse_conv", "is_frozen_sparse_conv",
           "input_grad_only", "transpose_filter"]


def transpose_filter(filters: torch.Tensor) -> torch.Tensor:
    """Swap the input and output channel axes of a spconv filter, keeping the offset axes.

    spconv 2.x stores filters as (C_out, *kernel, C_in) ("KRSC") or, in older layouts,
    (*kernel, C_in, C_out) / (*kernel, C_out, C_in); the swap is the same transpose of the two
    channel axes in every layout.
    """
    if ops.ALL_WEIGHT_IS_KRSC:
        return filters.transpose(0, -1).contiguous()
    return filters.transpose(-1, -2).contiguous()


class IndiceConvInputGrad(Function):
    """Rulebook (Native algorithm) sparse convolution whose backward returns only d(features).

    forward(features (N_in, C_in), filters, indice_pairs (2, K, P), indice_pair_num (K,),
    num_out, algo, inverse, subm) -> (N_out, C_out). Saves the rulebook and the filter, not the
    features.
    """

    @staticmethod
    @_AMP_FWD
    def forward(ctx, features, filters, indice_pairs, indice_pair_num, num_activate_out, algo,
                inverse: bool, subm: bool):
        ctx.save_for_backward(indice_pairs, indice_pair_num, filters)
        ctx.num_in = features.shape[0]
        ctx.algo, ctx.inverse, ctx.subm = algo, inverse, subm
        return ops.indice_conv(features, filters, indice_pairs, indice_pair_num,
                               num_activate_out, inverse, subm, algo=algo)

    @staticmethod
    @once_differentiable
    @_AMP_BWD
    def backward(ctx, grad_output):
        indice_pairs, indice_pair_num, filters = ctx.saved_tensors
        # Transposed rulebook = the same pairs read the other way round (inverse flag flipped).
        grad_input = ops.indice_conv(grad_output.contiguous(), transpose_filter(filters),
                                     indice_pairs, indice_pair_num, ctx.num_in,
                                     not ctx.inverse, ctx.subm, algo=ctx.algo)
        return grad_input, None, None, None, None, None, None, None


class _ImplicitGemmDropFilterGrad(Function):
    """spconv's implicit-GEMM convolution with the filter gradient discarded (CUDA fallback)."""

    @staticmethod
    @_AMP_FWD
    def forward(ctx, features, filters, pair_fwd, pair_bwd, pair_mask_fwd_splits,
                pair_mask_bwd_splits, mask_argsort_fwd_splits, mask_argsort_bwd_splits,
                num_activate_out, masks, is_train, is_subm, timer, fp32_accum):
        out, mask_out, mask_width = ops.implicit_gemm(
            features, filters, pair_fwd, pair_mask_fwd_splits, mask_argsort_fwd_splits,
            num_activate_out, masks, is_train, is_subm, timer, fp32_accum)
        ctx.save_for_backward(features, filters, pair_fwd, pair_bwd)
        ctx.extra = (pair_mask_fwd_splits, pair_mask_bwd_splits, mask_argsort_fwd_splits,
                     mask_argsort_bwd_splits, mask_out, masks, mask_width, is_subm, timer,
                     fp32_accum)
        return out

    @staticmethod
    @once_differentiable
    @_AMP_BWD
    def backward(ctx, grad_output):
        features, filters, pair_fwd, pair_bwd = ctx.saved_tensors
        (mf, mb, af, ab, mask_out, masks, mask_width, is_subm, timer, fp32) = ctx.extra
        grad_input, _ = ops.implicit_gemm_backward(
            features, filters, grad_output, pair_fwd, pair_bwd, mf, mb, af, ab,
            mask_output_fwd=mask_out, masks=masks, mask_width=mask_width, is_subm=is_subm,
            timer=timer, fp32_accum=fp32)
        return (grad_input,) + (None,) * 13


# --- dispatch: conv.py calls `Fsp.<name>(...)` at run time, so swapping these attributes while a
# frozen conv runs routes exactly that call through the input-grad-only functions.
_ORIGINAL = {name: getattr(Fsp, name) for name in
             ("indice_subm_conv", "indice_conv", "indice_inverse_conv", "implicit_gemm")}
_LOCK = threading.RLock()


def _frozen_rulebook(inverse: bool, subm: bool, original):
    def call(features, filters, indice_pairs, indice_pair_num, num_activate_out, algo,
             timer=None, bias=None, *unused):
        if filters.requires_grad or not torch.is_grad_enabled() or bias is not None:
            args = (features, filters, indice_pairs, indice_pair_num, num_activate_out, algo)
            return original(*args, *(() if timer is None else (timer, bias, *unused)))
        return IndiceConvInputGrad.apply(features, filters, indice_pairs, indice_pair_num,
                                         num_activate_out, algo, inverse, subm)
    return call


def _frozen_implicit_gemm(features, filters, pair_fwd, pair_bwd, mf, mb, af, ab,
                          num_activate_out, masks, is_train, is_subm, timer=None,
                          fp32_accum=None, bias=None, *unused):
    if filters.requires_grad or not torch.is_grad_enabled() or bias is not None:
        return _ORIGINAL["implicit_gemm"](features, filters, pair_fwd, pair_bwd, mf, mb, af, ab,
                                          num_activate_out, masks, is_train, is_subm, timer,
                                          fp32_accum, bias, *unused)
    return _ImplicitGemmDropFilterGrad.apply(features, filters, pair_fwd, pair_bwd, mf, mb, af,
                                             ab, num_activate_out, masks, is_train, is_subm,
                                             timer, fp32_accum)


_FROZEN = {
    "indice_subm_conv": _frozen_rulebook(False, True, _ORIGINAL["indice_subm_conv"]),
    "indice_conv": _frozen_rulebook(False, False, _ORIGINAL["indice_conv"]),
    "indice_inverse_conv": _frozen_rulebook(True, False, _ORIGINAL["indice_inverse_conv"]),
    "implicit_gemm": _frozen_implicit_gemm,
}
_depth = 0


@contextlib.contextmanager
def input_grad_only() -> Iterator[None]:
    """Inside this context, spconv convolutions whose filter does not require grad skip the
    filter gradient and do not save their input. Re-entrant; guarded by a lock because it swaps
    module attributes of spconv.pytorch.functional."""
    global _depth
    with _LOCK:
        if _depth == 0:
            for name, fn in _FROZEN.items():
                setattr(Fsp, name, fn)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                for name, fn in _ORIGINAL.items():
                    setattr(Fsp, name, fn)


class _FrozenConvMixin:
    """Forward of a frozen spconv convolution: spconv's forward under `input_grad_only`."""

    def forward(self, input, *args, **kwargs):
        with input_grad_only():
            return super().forward(input, *args, **kwargs)


_FROZEN_CLASSES: dict[type, type] = {}


def is_frozen_sparse_conv(module: nn.Module) -> bool:
    return isinstance(module, _FrozenConvMixin)


def freeze_sparse_conv(conv: nn.Module) -> nn.Module:
    """Freeze a spconv convolution in place (see module docstring) and return it.

    Args:
        conv: a `spconv.pytorch.SparseConvolution` instance (SubMConv3d, SparseConv3d,
            SparseInverseConv3d, ...).
    """
    if not isinstance(conv, SparseConvolution):
        raise TypeError(f"freeze_sparse_conv expects a spconv convolution, got {type(conv)}")
    for p in conv.parameters():
        p.requires_grad_(False)
    if is_frozen_sparse_conv(conv):
        return conv
    base = type(conv)
    if base not in _FROZEN_CLASSES:
        _FROZEN_CLASSES[base] = type(f"Frozen{base.__name__}", (_FrozenConvMixin, base), {})
    conv.__class__ = _FROZEN_CLASSES[base]
    return conv


def freeze_sparse_convs(module: nn.Module) -> int:
    """Freeze every spconv convolution inside `module`; returns how many were frozen."""
    convs = [m for m in module.modules() if isinstance(m, SparseConvolution)]
    for conv in convs:
        freeze_sparse_conv(conv)
    return len(convs)
