"""Frozen sparse convolutions that compute only the input gradient.

spconv's autograd functions always save the input features of a convolution and always compute
the filter gradient in backward, even when the filter does not require grad. For a frozen
backbone with trainable modules inside it (adapters), the input gradient still has to flow
through every frozen convolution, but the filter gradient and the saved input are pure waste.

`freeze_sparse_conv(conv)` turns a spconv convolution module (SubMConv3d, SparseConv3d,
SparseInverseConv3d, ...) in place into its frozen variant: the filter (and bias) stop requiring
grad, and while autograd records, its forward routes the convolution through an autograd
function that saves the rulebook and the filter but not the input features, and whose backward
computes the input gradient only. One per spconv algorithm:

- Native (CPU; CUDA for kernels above 32 offsets, e.g. the k5 stem): `IndiceConvInputGrad`
  runs spconv's FORWARD rulebook kernel with the transposed filter on the transposed rulebook.
  For a kernel offset k with pairs (i -> o): out[o] += x[i] @ W_k^T, so dx[i] += dout[o] @ W_k,
  a convolution of dout with filter W_k^T from o to i (the same pairs read with the inverse
  flag flipped).
- implicit GEMM (spconv's CUDA default): `ImplicitGemmInputGrad` runs spconv's own forward and,
  in backward, only the dgrad kernel of spconv's ``implicit_gemm_backward`` (the tuned
  ``kBackwardInput`` op on ``pair_bwd`` with the same masks), not the wgrad kernel.

The class of the instance is swapped for a subclass instead of wrapping it in a new module, so
the module tree and state-dict keys stay those of the base model (checkpoints keep loading) and
`isinstance(conv, spconv.SubMConv3d)` still holds. spconv's ``algo`` attribute is untouched:
convolutions sharing an indice key must use one algorithm, and a trainable adapter conv may
share the key of a frozen block (Point-PEFT).

Tests: tests/test_peft.py compares input gradients with spconv's own backward on the Native
path (CPU) and, when a GPU is present, on the implicit-GEMM path.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from cumm import tensorview as tv
from spconv.pytorch.conv import SparseConvolution
from spconv.pytorch import functional as Fsp
from spconv.pytorch import ops

# as spconv's own functions: under CUDA autocast the convolution runs in fp16
_AMP_FWD = torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float16)
_AMP_BWD = torch.amp.custom_bwd(device_type="cuda")
_ACT_NONE = tv.gemm.Activation.None_  # spconv's "no fused activation"

__all__ = ["ImplicitGemmInputGrad", "IndiceConvInputGrad", "freeze_sparse_conv",
           "implicit_gemm_input_grad", "input_grad_only", "is_frozen_sparse_conv",
           "transpose_filter"]


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


def implicit_gemm_input_grad(grad_output: torch.Tensor, filters: torch.Tensor, num_in: int,
                             in_dtype: torch.dtype, pair_bwd: torch.Tensor,
                             pair_mask_fwd_splits: list[torch.Tensor],
                             pair_mask_bwd_splits: list[torch.Tensor],
                             mask_argsort_fwd_splits: list[torch.Tensor],
                             mask_argsort_bwd_splits: list[torch.Tensor], masks: list,
                             is_subm: bool, fp32_accum: bool | None = None) -> torch.Tensor:
    """Input gradient (num_in, C_in) of an implicit-GEMM sparse convolution, nothing else.

    The dgrad half of ``spconv.pytorch.ops.implicit_gemm_backward`` (spconv 2.3, its Python
    path): the same tuned ``kBackwardInput`` kernel on the same rulebook (``pair_bwd``; forward
    masks read in reverse for submanifold convs, backward masks otherwise), one run per mask
    split accumulating into ``din``. The filter-gradient kernel and the forward input it needs
    are left out.

    Args:
        grad_output: (N_out, C_out) gradient of the convolution output.
        filters: the filter as the forward used it, KRSC (C_out, *kernel, C_in).
        num_in, in_dtype: rows and dtype of the forward input.
        pair_bwd ... masks: the rulebook entries spconv passed to the forward.
        is_subm: submanifold convolution.
    """
    from cumm import tensorview as tv
    from cumm.conv.bases import KRSC, NHWC, ConvOpType
    from spconv import constants
    from spconv.algo import CONV
    from spconv.pytorch.cppcore import get_arch, get_current_stream, torch_tensor_to_tv

    grad_output = grad_output.contiguous()
    c_out, c_in = filters.shape[0], filters.shape[-1]
    alloc = torch.empty if is_subm else torch.zeros  # subm: every input row is written
    din = alloc((num_in, c_in), dtype=in_dtype, device=grad_output.device)
    filters = filters.reshape(c_out, -1, c_in).contiguous()
    din_tv, filters_tv, dout_tv = (torch_tensor_to_tv(t) for t in (din, filters, grad_output))
    pair_bwd_tv = torch_tensor_to_tv(pair_bwd)
    if is_subm:
        split_masks = [torch_tensor_to_tv(t, dtype=tv.uint32) for t in pair_mask_fwd_splits]
        argsorts = [torch_tensor_to_tv(t) for t in mask_argsort_fwd_splits]
    else:
        split_masks = [torch_tensor_to_tv(t, dtype=tv.uint32) for t in pair_mask_bwd_splits]
        argsorts = [torch_tensor_to_tv(t) for t in mask_argsort_bwd_splits]
    stream, arch = get_current_stream(), get_arch()
    tuned = CONV.get_tuned_algo(ConvOpType.kBackwardInput, din_tv.dtype, filters_tv.dtype,
                                dout_tv.dtype, c_out, c_in, arch,
                                need_dynamic_mask=filters.shape[1] > 32)
    if tuned is None:
        tuned, _ = CONV.tune_and_cache(
            ConvOpType.kBackwardInput, din_tv, filters_tv, dout_tv, NHWC, KRSC, NHWC, arch,
            mask=split_masks[0], mask_argsort=argsorts[0], indices=pair_bwd_tv,
            reverse_mask=is_subm, mask_filter=masks[0].item(), stream=stream,
            fp32_accum=fp32_accum, use_tf32=constants.SPCONV_ALLOW_TF32)
    for j, (mask, argsort) in enumerate(zip(split_masks, argsorts)):
        CONV.run_with_tuned_result(
            tuned, ConvOpType.kBackwardInput, din_tv, filters_tv, dout_tv, mask=mask,
            mask_argsort=argsort, mask_output=tv.Tensor(), indices=pair_bwd_tv,
            reverse_mask=is_subm, mask_filter=masks[j].item(), mask_width=-1,
            beta=0 if j == 0 else 1, stream=stream)
    return din


class ImplicitGemmInputGrad(Function):
    """spconv's implicit-GEMM convolution (CUDA) whose backward returns only d(features).

    Same forward as ``spconv.pytorch.functional.SparseImplicitGemmFunction``; saves the filter
    and the rulebook, not the features, and backward runs :func:`implicit_gemm_input_grad`.
    """

    @staticmethod
    @_AMP_FWD
    def forward(ctx, features, filters, pair_fwd, pair_bwd, pair_mask_fwd_splits,
                pair_mask_bwd_splits, mask_argsort_fwd_splits, mask_argsort_bwd_splits,
                num_activate_out, masks, is_train, is_subm, timer, fp32_accum):
        out, _, _ = ops.implicit_gemm(
            features, filters, pair_fwd, pair_mask_fwd_splits, mask_argsort_fwd_splits,
            num_activate_out, masks, is_train, is_subm, timer, fp32_accum)
        ctx.save_for_backward(filters, pair_bwd)
        ctx.num_in, ctx.in_dtype = features.shape[0], features.dtype
        ctx.rulebook = (pair_mask_fwd_splits, pair_mask_bwd_splits, mask_argsort_fwd_splits,
                        mask_argsort_bwd_splits, masks)
        ctx.is_subm, ctx.fp32_accum = is_subm, fp32_accum
        return out

    @staticmethod
    @once_differentiable
    @_AMP_BWD
    def backward(ctx, grad_output):
        filters, pair_bwd = ctx.saved_tensors
        grad_input = implicit_gemm_input_grad(grad_output, filters, ctx.num_in, ctx.in_dtype,
                                              pair_bwd, *ctx.rulebook, is_subm=ctx.is_subm,
                                              fp32_accum=ctx.fp32_accum)
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


def _frozen_implicit_gemm(*args):
    """Fsp.implicit_gemm(features, filters, pair_fwd, pair_bwd, 4 mask lists, num_out, masks,
    is_train, is_subm, timer, fp32_accum, bias, act_alpha, act_beta, act_type), as conv.py calls it."""
    filters = args[1]
    bias = args[14] if len(args) > 14 else None
    act_type = args[17] if len(args) > 17 else _ACT_NONE
    if filters.requires_grad or not torch.is_grad_enabled() or bias is not None or act_type != _ACT_NONE:
        return _ORIGINAL["implicit_gemm"](*args)
    timer, fp32_accum = (args[12:14] + (None, None))[:2]
    return ImplicitGemmInputGrad.apply(*args[:12], timer, fp32_accum)


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
