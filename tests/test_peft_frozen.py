"""Frozen sparse convolutions and norms (the PEFT stages' memory path): same outputs and input
gradients as spconv's / BatchNorm's own, without keeping inputs or computing filter gradients.

CPU; the implicit-GEMM frozen conv test runs only where a GPU is present.
"""
from __future__ import annotations

import copy

import pytest
import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from spconv.pytorch import ops

from ppt.models.peft.frozen_conv import freeze_sparse_conv, is_frozen_sparse_conv
from ppt.models.peft.frozen_norm import freeze_norms, is_frozen_norm
from ppt.models.prompts import PDNorm
from ppt.models.spunet import DomainContext


# --- frozen sparse convolutions -------------------------------------------------------------

def _sparse_net() -> spconv.SparseSequential:
    native = dict(bias=False, algo=ConvAlgo.Native)
    return spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, padding=1, indice_key="s1", **native),
        spconv.SubMConv3d(8, 8, 3, padding=1, indice_key="s1", **native),
        spconv.SparseConv3d(8, 16, 2, stride=2, indice_key="d1", **native),
        spconv.SubMConv3d(16, 16, 3, padding=1, indice_key="s2", **native),
        spconv.SparseInverseConv3d(16, 8, 2, indice_key="d1", **native),
    )


def test_frozen_conv_input_grad_equals_spconv_and_skips_filter_grad(monkeypatch):
    g = torch.Generator().manual_seed(0)
    idx = torch.unique(torch.cat([torch.randint(0, 2, (800, 1), generator=g),
                                  torch.randint(0, 12, (800, 3), generator=g)], 1), dim=0).int()
    x = torch.randn(len(idx), 4, generator=g)
    weight = torch.randn(len(idx), 8, generator=g)
    ref = _sparse_net()
    frozen = copy.deepcopy(ref)
    for conv in frozen:
        freeze_sparse_conv(conv)
    backward_calls = []
    original = ops.indice_conv_backward
    monkeypatch.setattr(ops, "indice_conv_backward",
                        lambda *a, **k: backward_calls.append(1) or original(*a, **k))

    def run(net):
        feats = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = net(spconv.SparseConvTensor(feats, idx, [24, 24, 24], 2))
        (out.features * weight).sum().backward()
        return out.features.detach(), feats.grad, sum(saved)

    out_ref, grad_ref, saved_ref = run(ref)
    assert len(backward_calls) == 5
    backward_calls.clear()
    out_frozen, grad_frozen, saved_frozen = run(frozen)
    assert backward_calls == []  # spconv's filter+input backward never ran
    torch.testing.assert_close(out_frozen, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_frozen, grad_ref, rtol=1e-5, atol=1e-6)
    assert all(c.weight.grad is None and not c.weight.requires_grad for c in frozen)
    assert all(is_frozen_sparse_conv(c) and isinstance(c, type(r)) for c, r in zip(frozen, ref))
    assert list(frozen.state_dict()) == list(ref.state_dict())
    assert saved_frozen < saved_ref  # inputs are no longer kept


def test_frozen_conv_dispatch_takes_spconv_implicit_gemm_arguments(monkeypatch):
    """conv.py calls Fsp.implicit_gemm with 18 positional arguments; the frozen dispatcher
    routes a frozen filter to the input-grad-only function with the first 14 of them, and
    anything it cannot serve (trainable filter, bias, fused activation) to spconv."""
    from ppt.models.peft import frozen_conv as fc

    calls = {}
    monkeypatch.setattr(fc.ImplicitGemmInputGrad, "apply", lambda *a: calls.setdefault("ours", a))
    monkeypatch.setitem(fc._ORIGINAL, "implicit_gemm", lambda *a: calls.setdefault("spconv", a))
    features = torch.zeros(5, 4)
    frozen, trainable = torch.zeros(8, 3, 3, 3, 4), torch.zeros(8, 3, 3, 3, 4, requires_grad=True)
    args = lambda w, bias=None, act=fc._ACT_NONE: (features, w, *range(2, 12), "timer", True,
                                                   bias, 0.0, 0.0, act)
    same = lambda got, want: len(got) == len(want) and all(a is b for a, b in zip(got, want))
    call = args(frozen)
    fc._frozen_implicit_gemm(*call)
    assert same(calls.pop("ours"), call[:14]) and not calls
    for call in (args(trainable), args(frozen, bias=torch.zeros(8)),
                 args(frozen, act=fc.tv.gemm.Activation.ReLU)):
        fc._frozen_implicit_gemm(*call)
        assert same(calls.pop("spconv"), call) and not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="spconv's implicit GEMM runs on CUDA only")
@pytest.mark.parametrize("algo", [ConvAlgo.MaskImplicitGemm, ConvAlgo.Native])
def test_frozen_conv_input_grad_equals_spconv_on_cuda(monkeypatch, algo, saved_numel):
    """The same check as on the CPU, on spconv's CUDA algorithms (implicit GEMM: the dgrad-only
    backward of frozen_conv.ImplicitGemmInputGrad against spconv's dgrad + wgrad backward)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.unique(torch.cat([torch.randint(0, 2, (4000, 1), generator=g),
                                  torch.randint(0, 24, (4000, 3), generator=g)], 1), dim=0).int().cuda()
    x = torch.randn(len(idx), 16, generator=g).cuda()
    layers = [(spconv.SubMConv3d, 16, 32, 3, dict(padding=1, indice_key="s1")),
              (spconv.SubMConv3d, 32, 32, 3, dict(padding=1, indice_key="s1")),
              (spconv.SparseConv3d, 32, 64, 2, dict(stride=2, indice_key="d1")),
              (spconv.SubMConv3d, 64, 64, 3, dict(padding=1, indice_key="s2")),
              (spconv.SparseInverseConv3d, 64, 32, 2, dict(indice_key="d1"))]
    torch.manual_seed(0)
    ref = spconv.SparseSequential(*[kind(i, o, k, bias=False, algo=algo, **kw) for kind, i, o, k, kw in layers]).cuda()
    frozen = copy.deepcopy(ref)
    for conv in frozen:
        freeze_sparse_conv(conv)
    weight = torch.randn(len(idx), 32, generator=g).cuda()
    spconv_backward = []
    for name in ("implicit_gemm_backward", "indice_conv_backward"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _o=original, **k: spconv_backward.append(1) or _o(*a, **k))

    def run(net):
        feats = x.clone().requires_grad_()
        out, saved = saved_numel(lambda: net(spconv.SparseConvTensor(feats, idx, [48, 48, 48], 2)))
        (out.features * weight).sum().backward()
        return out.features.detach(), feats.grad, saved

    out_ref, grad_ref, saved_ref = run(ref)
    assert len(spconv_backward) == 5
    spconv_backward.clear()
    out_frozen, grad_frozen, saved_frozen = run(frozen)
    assert spconv_backward == []  # no filter gradient computed anywhere
    torch.testing.assert_close(out_frozen, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_frozen, grad_ref, rtol=2e-3, atol=2e-3)
    assert grad_frozen.abs().sum() > 0
    assert saved_frozen < saved_ref


def _random_bn(num: int, g: torch.Generator) -> torch.nn.BatchNorm1d:
    bn = torch.nn.BatchNorm1d(num, eps=1e-3)
    with torch.no_grad():
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.copy_(torch.randn(num, generator=g))
        bn.running_var.copy_(torch.rand(num, generator=g) + 0.5)
    return bn


def _norm_outputs(saved_numel, norm, x: torch.Tensor, weight: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor, int]:
    xi = x.clone().requires_grad_()
    y, saved = saved_numel(lambda: norm(xi, *args))
    (y * weight).sum().backward()
    return y.detach(), xi.grad, saved


def test_frozen_norm_matches_batch_norm_without_keeping_its_input(saved_numel):
    g = torch.Generator().manual_seed(0)
    bn = _random_bn(6, g).requires_grad_(False).eval()
    frozen = copy.deepcopy(bn)
    assert freeze_norms(frozen) == 1 and is_frozen_norm(frozen) and isinstance(frozen, torch.nn.BatchNorm1d)
    x, w = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g)
    y_ref, grad_ref, saved_ref = _norm_outputs(saved_numel, bn, x, w)
    y, grad, saved = _norm_outputs(saved_numel, frozen, x, w)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert saved < x.numel() <= saved_ref
    with torch.no_grad():  # evaluation runs BatchNorm's own kernel: bit-identical to the base
        assert torch.equal(frozen(x), bn(x))


def test_frozen_pdnorm_folds_statistics_affine_and_prompt_modulation(saved_numel):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    norm = PDNorm(6, ["a", "b"], prompt_dim=5, zero_init=False)
    for d in ("a", "b"):
        norm.norms[d] = _random_bn(6, g)
    with torch.no_grad():
        norm.modulation[1].weight.mul_(30)  # a modulation far from identity
    norm.requires_grad_(False).eval()
    frozen = copy.deepcopy(norm)
    assert freeze_norms(frozen) == 3 and is_frozen_norm(frozen)  # PDNorm + its two BNs
    ctx = DomainContext(domain="b", prompt=torch.randn(1, 5, generator=g))
    x, w = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    y_ref, grad_ref, saved_ref = _norm_outputs(saved_numel, norm, x, w, ctx)
    y, grad, saved = _norm_outputs(saved_numel, frozen, x, w, ctx)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert saved < x.numel() <= saved_ref
    assert not torch.allclose(y, norm.norms["b"](x))  # the modulation is in the folded form
    # unknown domain and a trainable modulation keep PDNorm's own path
    mean_ctx = DomainContext(domain="mean", prompt=ctx.prompt)
    torch.testing.assert_close(_norm_outputs(saved_numel, frozen, x, w, mean_ctx)[0], _norm_outputs(saved_numel, norm, x, w, mean_ctx)[0])
    frozen.modulation.requires_grad_(True)
    frozen(x, ctx).sum().backward()
    assert frozen.modulation[1].weight.grad is not None
