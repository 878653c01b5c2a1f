"""Point Prompt Training: domain prompts and the layers that read them (SPEC §4).

- :class:`DomainPrompts`: one learnable ``prompt_dim`` vector per dataset, plus the ``"mean"``
  prompt (mean of the trained rows, :func:`set_mean_domains`) for a domain never trained on.
- :class:`PDNorm`: prompt-driven normalisation, the paper's default adapter. It replaces every
  norm of the backbone: ``y = BN_d(x) * (1 + scale) + shift`` with
  ``(shift, scale) = Linear(SiLU(prompt))``; BN statistics and affine are kept per dataset
  (decoupled) unless ``decoupled=False``. The modulation is zero-initialised by default, so at
  step 0 the model equals the plain network (the paper's choice; the reference configs ship
  with zero-init off).
- :class:`PDLayerNorm`: the same over LayerNorm (per-dataset LN affine, zero-initialised
  modulation), for the LayerNorms of the PTv3 backbone; its BatchNorms use :class:`PDNorm`.
- :class:`PromptInjection` and :class:`PromptCrossAttention`: the paper's ablation adapters,
  placed in each basic block's ``prompt_adapter`` slot; both return a delta added to the block
  input and start silent (zero-initialised output layer).

Unknown domain (``"mean"``) in PDNorm: in eval mode the BN uses the mixture of the trained
datasets' running statistics (mean of means; variance of the mixture = mean of (var + mean^2) - mean^2)
and the mean of their affine parameters; in train mode it normalises with batch statistics and
the mean affine (running statistics are never updated for ``"mean"``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ppt.models.spunet import BN_EPS, BN_MOMENTUM, INIT_STD, DomainContext

MEAN_PROMPT = "mean"


def check_domain_names(names: Sequence[str]) -> tuple[str, ...]:
    """Dataset names become module keys: non-empty, unique, no dots, not the reserved "mean"."""
    names = tuple(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"dataset names must be non-empty and unique, got {names}")
    for name in names:
        if not name or "." in name or name == MEAN_PROMPT:
            raise ValueError(f"invalid dataset name {name!r}: must be non-empty, without '.', "
                             f"and not the reserved {MEAN_PROMPT!r}")
    return names


class DomainPrompts(nn.Module):
    """Embedding table of domain prompts.

    Args:
        names: dataset names, one prompt each (table row order).
        dim: prompt length (256 in the paper).
    """

    def __init__(self, names: Sequence[str], dim: int = 256):
        super().__init__()
        self.names = check_domain_names(names)
        self.dim = dim
        self.table = nn.Embedding(len(self.names), dim)  # N(0, 1) init, as the reference

    def forward(self, domain: str) -> torch.Tensor:
        """Dataset name or ``"mean"`` (mean of the trained rows) -> (1, dim) prompt."""
        if domain == MEAN_PROMPT:
            rows = [self.names.index(d) for d in mean_domains(self)]
            return self.table.weight[rows].mean(dim=0, keepdim=True)
        if domain not in self.names:
            raise KeyError(f"unknown prompt {domain!r}; valid prompts: {', '.join(self.names)}, {MEAN_PROMPT}")
        return self.table.weight[self.names.index(domain)][None]


def mean_domains(module: nn.Module) -> tuple[str, ...]:
    """The domains the ``"mean"`` prompt of ``module`` averages: those :func:`set_mean_domains`
    named (the trained ones), else all of the module's domains."""
    names = getattr(module, "mean_over", None)
    return names if names else (module.names if isinstance(module, DomainPrompts) else module.domains)


def set_mean_domains(model: nn.Module, trained: Sequence[str]) -> None:
    """Make the ``"mean"`` prompt of every prompt table and prompt-driven norm of ``model``
    average over the ``trained`` domains only.

    A domain that is in the model but was never trained (a ``data.val`` dataset outside
    ``data.mix``) has a random prompt row and BN statistics of mean 0 / var 1; averaging it in
    at weight 1/K pulls the unknown-domain answer towards noise. ``ppt.engine.build.build_model``
    calls this with the config's trained datasets, so training-time validation, ``tools/test.py
    --prompt mean`` and ``tools/infer.py`` all use the same mean. Domains of ``trained`` the
    model lacks are ignored; when none is left, the mean is over all domains.
    """
    for module in model.modules():
        if isinstance(module, DomainPrompts):
            known = module.names
        elif isinstance(module, (PDNorm, PDLayerNorm)):
            known = module.domains
        else:
            continue
        module.mean_over = tuple(d for d in known if d in set(trained))


def _batch_norm(num_features: int, affine: bool = True) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, affine=affine)


def _modulation(prompt_dim: int, num_features: int, zero_init: bool) -> nn.Sequential:
    """SiLU -> Linear(prompt_dim, 2C): the prompt's (shift, scale) of a prompt-driven norm."""
    linear = nn.Linear(prompt_dim, 2 * num_features)
    if zero_init:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.trunc_normal_(linear.weight, std=INIT_STD)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


def _modulate(x: torch.Tensor, modulation: nn.Module | None, ctx: DomainContext) -> torch.Tensor:
    """(N, C) normalised features -> ``x * (1 + scale) + shift`` from the prompt (fp32)."""
    if modulation is None:
        return x
    if ctx.prompt is None:
        raise ValueError("PDNorm needs a domain prompt (ctx.prompt is None)")
    shift, scale = modulation(ctx.prompt).float().chunk(2, dim=-1)  # (1, C) each
    return x * (1.0 + scale) + shift


def _init_domain_norms(module: nn.Module, make_norm, num_features: int, domains: Sequence[str],
                       prompt_dim: int, decoupled: bool, adaptive: bool, zero_init: bool) -> None:
    """The frame PDNorm and PDLayerNorm share: ``norms`` (one per dataset) or one shared
    ``norm``, and the prompt ``modulation`` (None when not adaptive)."""
    module.domains = check_domain_names(domains)
    module.decoupled = decoupled
    if decoupled:
        module.norms = nn.ModuleDict({d: make_norm(num_features) for d in module.domains})
    else:
        module.norm = make_norm(num_features)
    module.modulation = _modulation(prompt_dim, num_features, zero_init) if adaptive else None


def _own_norm(module: nn.Module, domain: str) -> nn.Module | None:
    """The norm ``domain`` normalises with, or None for the "mean" domain (a mixture)."""
    if not module.decoupled:
        return module.norm
    if domain in module.norms:
        return module.norms[domain]
    if domain != MEAN_PROMPT:
        raise KeyError(f"{type(module).__name__} has no norm for domain {domain!r}; "
                       f"valid: {', '.join(module.domains)}, {MEAN_PROMPT}")
    return None


class PDNorm(nn.Module):
    """Prompt-driven BatchNorm for (N, C) voxel features.

    Args:
        num_features: channels C.
        domains: dataset names (one BN each when ``decoupled``).
        prompt_dim: length of the domain prompt.
        decoupled: keep BN statistics and affine per dataset (reference default).
        adaptive: modulate with the prompt; ``False`` leaves decoupled BN only.
        zero_init: zero-initialise the modulation Linear so training starts from plain BN.
    """

    def __init__(self, num_features: int, domains: Sequence[str], prompt_dim: int = 256,
                 decoupled: bool = True, adaptive: bool = True, zero_init: bool = True):
        super().__init__()
        _init_domain_norms(self, _batch_norm, num_features, domains, prompt_dim, decoupled, adaptive, zero_init)

    def _normalise(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        norm = _own_norm(self, domain)
        if norm is not None:
            return norm(x)
        bns = [self.norms[d] for d in mean_domains(self)]
        weight = torch.stack([bn.weight for bn in bns]).mean(0)
        bias = torch.stack([bn.bias for bn in bns]).mean(0)
        if self.training:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=BN_EPS)
        mean = torch.stack([bn.running_mean for bn in bns]).mean(0)
        var = torch.stack([bn.running_var + bn.running_mean ** 2 for bn in bns]).mean(0) - mean ** 2
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=BN_EPS)

    def forward(self, x: torch.Tensor, ctx: DomainContext) -> torch.Tensor:
        """(N, C) features -> (N, C) fp32 normalised and modulated features."""
        return _modulate(self._normalise(x.float(), ctx.domain), self.modulation, ctx)


class PDLayerNorm(nn.Module):
    """Prompt-driven LayerNorm for (N, C) point features (every LayerNorm of PTv3).

    ``y = LN_d(x) * (1 + scale) + shift`` with ``(shift, scale) = Linear(SiLU(prompt))``, as
    :class:`PDNorm`: one LayerNorm affine per dataset when ``decoupled`` (LayerNorm has no
    running statistics, so only the affine is per dataset), modulation zero-initialised by
    default. Unknown domain (``"mean"``): normalise, then the mean of the datasets' affines.

    Args:
        num_features: channels C.
        domains: dataset names (one LayerNorm each when ``decoupled``).
        prompt_dim: length of the domain prompt.
        decoupled: keep the LayerNorm affine per dataset (reference default).
        adaptive: modulate with the prompt; ``False`` leaves the decoupled LayerNorms only.
        zero_init: zero-initialise the modulation Linear so training starts from plain LN.
    """

    def __init__(self, num_features: int, domains: Sequence[str], prompt_dim: int = 256,
                 decoupled: bool = True, adaptive: bool = True, zero_init: bool = True):
        super().__init__()
        _init_domain_norms(self, nn.LayerNorm, num_features, domains, prompt_dim, decoupled, adaptive, zero_init)

    def _normalise(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        norm = _own_norm(self, domain)
        if norm is not None:
            return norm(x)
        lns = [self.norms[d] for d in mean_domains(self)]
        weight = torch.stack([ln.weight for ln in lns]).mean(0)
        bias = torch.stack([ln.bias for ln in lns]).mean(0)
        return F.layer_norm(x, lns[0].normalized_shape, weight, bias, lns[0].eps)

    def forward(self, x: torch.Tensor, ctx: DomainContext) -> torch.Tensor:
        """(N, C) features -> (N, C) fp32 normalised and modulated features."""
        with torch.autocast(x.device.type, enabled=False):  # LayerNorm statistics in fp32
            return _modulate(self._normalise(x.float(), ctx.domain), self.modulation, ctx)


class PromptInjection(nn.Module):
    """Direct injection: ``delta = Linear(prompt)`` added to every voxel of the block input.

    Args:
        channels: block input channels C.
        prompt_dim: length of the domain prompt.
    """

    def __init__(self, channels: int, prompt_dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(prompt_dim, channels)
        nn.init.zeros_(self.proj.weight)  # starts silent
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, ctx: DomainContext) -> torch.Tensor:
        """(N, C) features -> (1, C) delta (broadcast over voxels)."""
        return self.proj(ctx.prompt).float()


class PromptCrossAttention(nn.Module):
    """Cross-attention adapter: voxels attend to the prompt split into ``num_tokens`` tokens.

    The prompt (1, prompt_dim) is viewed as (num_tokens, prompt_dim / num_tokens) so every
    adapter reads the same table as PDNorm (prompt length means the same in all ablations).

    Args:
        channels: block input channels C.
        prompt_dim: length of the domain prompt.
        num_tokens: tokens the prompt is split into (must divide ``prompt_dim``).
        num_heads: attention heads, each of width max(8, C // num_heads).
    """

    def __init__(self, channels: int, prompt_dim: int = 256, num_tokens: int = 8, num_heads: int = 4):
        super().__init__()
        if prompt_dim % num_tokens:
            raise ValueError(f"num_tokens={num_tokens} must divide prompt_dim={prompt_dim}")
        self.num_tokens, self.num_heads = num_tokens, num_heads
        self.head_dim = max(8, channels // num_heads)
        inner = self.head_dim * num_heads
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, inner)
        self.key_value = nn.Linear(prompt_dim // num_tokens, 2 * inner)
        self.out = nn.Linear(inner, channels)
        for linear in (self.query, self.key_value):
            nn.init.trunc_normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.out.weight)  # starts silent
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, ctx: DomainContext) -> torch.Tensor:
        """(N, C) features -> (N, C) delta."""
        n, h, d = x.shape[0], self.num_heads, self.head_dim
        tokens = ctx.prompt.reshape(self.num_tokens, -1)
        k, v = self.key_value(tokens).reshape(self.num_tokens, 2, h, d).unbind(1)  # (T, h, d)
        q = self.query(self.norm(x)).reshape(n, h, d)
        attn = torch.einsum("nhd,thd->nht", q, k).mul(1.0 / math.sqrt(d)).softmax(dim=-1)
        return self.out(torch.einsum("nht,thd->nhd", attn, v).reshape(n, h * d)).float()


# prompt adapter name -> what it adds to the backbone (used by the Segmentor and the CLI)
PROMPT_ADAPTERS = ("none", "pdnorm", "inject", "xattn")
