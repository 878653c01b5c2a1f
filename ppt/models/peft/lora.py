"""LoRA (Hu et al., ICLR 2022) on the backbone's encoder: the `lora` PEFT stage (SPEC §8).

Reference setting (Pointcept ``DefaultLORASegmentorV2`` + Concerto's ``*-ft-lora`` configs):
HF ``peft`` ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["qkv"],
bias="none")`` wrapped around ``backbone.enc`` of an encoder-only PT-v3m2 built with
``freeze_encoder=True`` (embedding AND encoder frozen: only LoRA and the linear seg head train;
the ``block`` keyword param group puts LoRA at lr x 0.1).

Why a small module of our own instead of HF ``peft``: ``peft`` is not a dependency of this
project (requirements.txt stays as it is), and it does not fit both backbones. Our PTv3 blocks
hold plain ``nn.Linear`` qkv layers, which ``peft`` could wrap, but it renames the base weights
(``qkv.base_layer.weight``), so base checkpoints and PEFT checkpoints would need key rewriting;
SpUNet has only spconv convolutions, which ``peft`` does not know at all. Here the layer's class
is swapped for a subclass (as ``frozen_conv`` does): base state-dict keys stay, the update lives
under ``<layer>.lora_A`` / ``<layer>.lora_B``.

The update is merge-free and computed per forward, as HF LoRA's unmerged path:
``y = base(x) + (alpha / r) * B(A(dropout(x)))`` with A Kaiming-uniform (HF's default) and B
zero, so a fresh stage computes exactly the base model and the frozen W never gets a gradient.

- PTv3 (``LoraLinear``): the encoder blocks' ``attn.qkv`` (target ``qkv``), optionally
  ``attn.proj`` (``proj``) and ``mlp.fc1`` / ``mlp.fc2`` (``mlp``).
- SpUNet (``LoraSparseConv``), our adaptation (SpUNet has no qkv): target ``qkv`` names the
  encoder blocks' token-mixing weights, their two 3x3x3 submanifold convs. ``A`` is a sparse conv
  of the same kernel (C_in -> r, same rulebook via the same ``indice_key``) and ``B`` a 1x1
  projection (r -> C_out), HF peft's conv-LoRA form: ``B . A`` is a low-rank update of the
  filter flattened over (kernel offsets x C_in), i.e. the output equals the conv with filter
  ``W + scale * (B @ A).reshape(W.shape)`` when dropout is off (:func:`merged_weight`). Running
  A as its own conv rather than merging the filter keeps ``lora_dropout`` on the input, as LoRA,
  and lets the frozen W keep the input-gradient-only path (``frozen_conv``: no filter gradient,
  no saved input).

Export and inference: :func:`merge_lora` folds every update into its base weight and removes
the branch (the base model's layers and state-dict keys again); ``ppt.engine.predict.load_experiment``
does it when it loads a LoRA run, so ``tools/test.py``, ``tools/infer.py`` and
``tools/convert.py --to pointcept`` see a plain model with the adapted weights.
Tests: tests/test_peft_lora.py (both backbones: trainable set, step-0 identity, gradients,
merged == unmerged output, export).

Decoder of our full U-Net: frozen (no LoRA), see ``ppt.models.peft.stages``.
"""
from __future__ import annotations

import math
from typing import Iterator

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from ppt.config import LORA_TARGETS  # noqa: F401  (valid targets per backbone; the config checks them)
from ppt.models.ptv3 import PointTransformerV3

_PTV3_LAYERS = {"qkv": ("attn.qkv",), "proj": ("attn.proj",), "mlp": ("mlp.fc1", "mlp.fc2")}
_SPUNET_LAYERS = {"qkv": ("conv1", "conv2")}


class _Lora:
    """Mixin state shared by both LoRA layers: ``lora_A``, ``lora_B``, ``lora_dropout``,
    ``lora_scale`` (= alpha / r)."""

    lora_A: nn.Module
    lora_B: nn.Linear
    lora_dropout: nn.Module
    lora_scale: float

    def _init_lora(self, a: nn.Module, c_out: int, rank: int, alpha: float, dropout: float) -> None:
        device = next(self.parameters()).device
        self.lora_A = a.to(device)
        self.lora_B = nn.Linear(rank, c_out, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # HF peft's init of A
        nn.init.zeros_(self.lora_B.weight)  # the update starts at zero: the base model exactly
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_scale = alpha / rank


class LoraLinear(_Lora):
    """``nn.Linear`` + low-rank update: (N, C_in) -> (N, C_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_scale * self.lora_B(self.lora_A(self.lora_dropout(x)))


class LoraSparseConv(_Lora):
    """spconv convolution + low-rank update through a rank-r conv on the same rulebook."""

    def forward(self, x: spconv.SparseConvTensor, *args, **kwargs) -> spconv.SparseConvTensor:
        out = super().forward(x, *args, **kwargs)
        low = self.lora_A(x.replace_feature(self.lora_dropout(x.features)))
        return out.replace_feature(out.features + self.lora_scale * self.lora_B(low.features))


_CLASSES: dict[tuple[type, type], type] = {}  # (mixin, base class) -> the LoRA class


def _swap(module: nn.Module, mixin: type) -> None:
    base = type(module)
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(f"Lora{base.__name__}", (mixin, base), {})
    module.__class__ = _CLASSES[mixin, base]


def add_lora_linear(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> nn.Linear:
    """Give ``linear`` a LoRA update in place (base weights untouched, keys unchanged)."""
    if is_lora(linear):
        raise ValueError("this layer already has a LoRA update")
    _swap(linear, LoraLinear)
    linear._init_lora(nn.Linear(linear.in_features, rank, bias=False), linear.out_features, rank, alpha, dropout)
    return linear


def add_lora_conv(conv: SparseConvolution, rank: int, alpha: float, dropout: float) -> SparseConvolution:
    """Give a spconv convolution a LoRA update in place: A = the same kind of conv (kernel,
    stride, padding, indice key) C_in -> r, B = Linear(r -> C_out)."""
    if is_lora(conv):
        raise ValueError("this layer already has a LoRA update")
    # the spconv class itself, also under a frozen-conv subclass (ppt.models.peft.frozen_conv)
    kind = next(c for c in type(conv).__mro__ if issubclass(c, SparseConvolution)
                and not c.__module__.startswith("ppt."))
    a = kind(conv.in_channels, rank, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
             dilation=conv.dilation, bias=False, indice_key=conv.indice_key, algo=conv.algo)
    _swap(conv, LoraSparseConv)
    conv._init_lora(a, conv.out_channels, rank, alpha, dropout)
    return conv


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, _Lora)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def lora_layers(backbone: nn.Module, targets: tuple[str, ...] | list[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name under the backbone, layer) of every layer ``targets`` selects in the ENCODER
    blocks (``backbone.encoder[s].blocks[i]``); ValueError for a target the backbone lacks."""
    is_ptv3 = isinstance(backbone, PointTransformerV3)
    layers = _PTV3_LAYERS if is_ptv3 else _SPUNET_LAYERS
    unknown = [t for t in targets if t not in layers]
    if unknown or not targets:
        kind = "ptv3" if is_ptv3 else "spunet"
        raise ValueError(f"LoRA targets {list(targets)} on {kind}: valid {', '.join(layers)}")
    for s, stage in enumerate(backbone.encoder):
        for b, block in enumerate(stage.blocks):
            for target in targets:
                for path in layers[target]:
                    yield f"encoder.{s}.blocks.{b}.{path}", _get(block, path)


def apply_lora(backbone: nn.Module, targets, rank: int, alpha: float, dropout: float) -> int:
    """Add LoRA to the encoder layers ``targets`` selects; returns how many layers got one.
    The new ``lora_A`` / ``lora_B`` parameters require grad; nothing else is touched."""
    count = 0
    for _, layer in list(lora_layers(backbone, targets)):
        if isinstance(layer, SparseConvolution):
            add_lora_conv(layer, rank, alpha, dropout)
        else:
            add_lora_linear(layer, rank, alpha, dropout)
        count += 1
    return count


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight plus the LoRA update as one tensor (``W + scale * B @ A``, for a spconv
    filter (C_out, *kernel, C_in) reshaped over kernel offsets x C_in): what :func:`merge_lora` writes."""
    a = layer.lora_A.weight
    delta = layer.lora_B.weight @ a.reshape(a.shape[0], -1)
    return layer.weight + layer.lora_scale * delta.reshape(layer.weight.shape)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update inside ``model`` into its base layer and remove the branch; returns
    how many layers were merged (0 for a model without LoRA).

    Each layer's weight becomes :func:`merged_weight`, ``lora_A`` / ``lora_B`` / ``lora_dropout``
    go and the layer is its base class again (a frozen conv stays frozen), so the state dict has
    the base model's keys and shapes: a model to export or to infer with. It computes the
    unmerged model's eval-mode output (LoRA dropout off) up to float rounding; it is no longer a
    LoRA stage (its checkpoint is a full model, not a PEFT checkpoint).
    """
    bases = {cls: base for (_, base), cls in _CLASSES.items()}
    layers = [m for m in model.modules() if is_lora(m)]
    for layer in layers:
        if type(layer) not in bases:
            raise TypeError(f"cannot merge LoRA into {type(layer).__name__}: its class was changed after "
                            f"LoRA was added")
        with torch.no_grad():
            layer.weight.copy_(merged_weight(layer))
        del layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_scale
        layer.__class__ = bases[type(layer)]
    return len(layers)
