"""Apply a fine-tuning stage to a trained Segmentor (SPEC §8).

Stages (what trains; everything else is frozen):

| stage       | trains                                                            |
|-------------|-------------------------------------------------------------------|
| `full`      | every parameter (BN statistics update as in normal training)       |
| `linear`    | the head only (linear probing)                                     |
| `decoder`   | decoder + head (decoder probing; stem and encoder frozen)          |
| `bitfit`    | norm affine parameters + head                                      |
| `lora`      | LoRA updates of the encoder blocks (lora.py) + head                |
| `dapt`      | DAPT adapters and internal prompts (dapt.py) + head; with          |
|             | ``peft.ssf`` also SSF scale-and-shift parameters                   |
| `pointpeft` | Point-PEFT adapters, prompt tokens and coordinates, geometry       |
|             | operators (point_peft.py) + head; with ``peft.train_biases``       |
|             | (default, as the reference) also the blocks' biases                |

DAPT and Point-PEFT follow their reference code (github.com/LMD0311/DAPT,
github.com/Ivan-Tang-3D/Point-PEFT); what differs, and why, is listed in ``dapt.py`` /
``ptv3_dapt.py`` and ``point_peft.py`` (and ``memory_bank.py`` for the retrieval).

DAPT freezes the whole backbone, norms included, as its paper does (the reference trains the
adapters, prompts, head and new SSF scale-and-shift parameters, ``peft.ssf`` here, never the
pre-trained norms). SPEC §8 had our DAPT train the norm affines instead; that kept every norm input alive for
backward (DAPT measured +8% peak memory over full fine-tuning), so the default now freezes them
and ``train_norms=True`` (config ``peft.train_norms`` once it exists) restores the old
behaviour: the target dataset's norm affines train too.

For every stage but `full`, memory follows from what is frozen:
- the base model's BatchNorm running statistics are frozen (norm layers stay in eval mode;
  Point-PEFT's own BatchNorm, ``point_peft.AdapterBatchNorm``, trains as in the reference);
- frozen sparse convolutions compute only their input gradient and keep no input
  (frozen_conv.py, every spconv algorithm);
- frozen norms (BatchNorm, PDNorm with its prompt modulation) run as a constant per-channel
  scale-and-shift that keeps no input (frozen_norm.py);
- each adapted block (``spunet_block.PeftBlock``, ``ptv3_block.PeftPTv3Block``) is recomputed
  in backward as a whole, so it keeps only its input: the price is one more forward of the block (its frozen convolutions skip the
  filter gradient, which pays back part of it; bench/peft.py measures the step time both ways).
  ``recompute_blocks=False`` recomputes only the adapter branches: faster, more memory;
- the longest prefix of the backbone (stem, down-sampling layers, blocks, in execution order)
  that has nothing trainable runs under ``torch.no_grad`` (no activations kept for it at all).
The domain prompts stay frozen, PDNorm modulations too.

Both backbones take every stage. dapt and pointpeft adapt each block of the backbone through
one loop (``stage_blocks`` + :data:`BLOCK_ADAPTERS`, keyed by the block class): a SpUNet basic
block becomes a ``spunet_block.PeftBlock`` (dapt.py / point_peft.py), a PTv3 transformer block a
``ptv3_block.PeftPTv3Block`` (ptv3_dapt.py / ptv3_point_peft.py: adapters beside / on the MLP,
prompts as per-scene keys/values of the attention, geometry operator on the level's voxels);
both are recomputed in backward as a whole. `decoder` and `lora` follow Sonata / Concerto's ``-dec`` and ``-ft-lora`` configs,
whose ``freeze_encoder=True`` freezes the embedding (stem) with the encoder (``train_stem``
trains it). `decoder`: the decoder's norms update their statistics, as any trained layer (the
frozen encoder's stay frozen). `lora` on our full U-Net: LoRA on the encoder only, as the
reference (whose encoder-only model has no decoder), and the decoder frozen with the rest of the
backbone, so the stage trains what the reference's does (LoRA + head) and stays the small one;
decoder probing is its own stage.

The stage is applied in place without changing the base model's module names (state-dict keys
of the base weights stay valid): the backbone's class becomes :class:`PeftSpUNet` (:class:`PeftPTv3`) and each adapted
block's ``PeftBlock`` (``PeftPTv3Block``); the new modules live under ``<block>.peft``, ``backbone.memory_bank``,
``backbone.peft`` (Point-PEFT's prompt coordinates, DAPT's output SSF), ``backbone.stem.peft``
(DAPT's stem SSF) and, for LoRA, ``<layer>.lora_A`` / ``<layer>.lora_B``.
"""

from __future__ import annotations

import torch
from torch import nn

from ppt.config import PEFT_STAGES, PeftConfig
from ppt.models.peft.adapters import ScaleShift
from ppt.models.peft.dapt import DaptAdapter
from ppt.models.peft.frozen_conv import freeze_sparse_convs
from ppt.models.peft.frozen_norm import freeze_norms
from ppt.models.peft.lora import apply_lora
from ppt.models.peft.memory_bank import MemoryBank
from ppt.models.peft.peft_backbones import PeftPTv3, PeftSpUNet
from ppt.models.peft.point_peft import GroupAttention, PointPeftAdapter
from ppt.models.peft.ptv3_block import PeftPTv3Block
from ppt.models.peft.ptv3_dapt import PTv3DaptAdapter
from ppt.models.peft.ptv3_point_peft import PTv3PointPeftAdapter
from ppt.models.peft.selection import (_output_width, _stem_width, backbone_units, block_biases,
                                       norm_affine_parameters, own_parameters, stage_blocks)
from ppt.models.peft.spunet_block import PeftBlock
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.ptv3_layers import Block
from ppt.models.spunet import BasicBlock

STAGES = tuple(s for s in PEFT_STAGES if s != "none")
PROMPT_COORD_STD = 0.02  # the reference's prompt_cor init (trunc_normal_, std 0.02)


class _NoGrad:
    """Mixin: the module's forward runs without autograd (frozen prefix)."""

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return super().forward(*args, **kwargs)


_SWAPPED: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type, prefix: str) -> None:
    """Give `module` a subclass of its class with `mixin` first (names and state unchanged)."""
    base = type(module)
    if (mixin, base) not in _SWAPPED:
        _SWAPPED[mixin, base] = type(f"{prefix}{base.__name__}", (mixin, base), {})
    module.__class__ = _SWAPPED[mixin, base]


def _run_without_grad(module: nn.Module) -> None:
    _swap_class(module, _NoGrad, "NoGrad")


class _OutputSSF:
    """Mixin for the stem: its frozen forward without autograd, then DAPT's SSF ``self.peft``
    on its output (the reference's SSF after its patch embedding; the stem keeps no input)."""

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            out = super().forward(*args, **kwargs)
        if torch.is_tensor(out):
            return self.peft(out)
        return out.replace_feature(self.peft(out.features))


def _point_peft_options(cfg: PeftConfig, channels: int, is_encoder: bool, memory_bank: MemoryBank,
                        shared: dict[int, GroupAttention]) -> dict:
    """Point-PEFT module arguments both backbones share; the ``knn`` operator's group attention
    is one per channel width (``shared``), as the reference's is one for its blocks."""
    attention = None
    if cfg.geo_operator == "knn":
        attention = shared.setdefault(channels, GroupAttention(channels))
    return dict(prior_dim=memory_bank.dim, num_tokens=cfg.num_tokens if is_encoder else 0,
                prior_rank=cfg.prior_rank, adapter_rank=cfg.adapter_rank, dropout=cfg.adapter_dropout,
                prompt_dropout=cfg.prompt_dropout, geo_attention=attention, geo_k=cfg.geo_k,
                geo_stride=cfg.geo_stride, geo_reduction=cfg.geo_reduction, min_rank=cfg.min_rank,
                neighbour_attention=cfg.neighbour_attention)


def _spunet_block_module(block: BasicBlock, stage: str, s: int, index: int, is_encoder: bool, prompt_read: bool,
                         cfg: PeftConfig, memory_bank: MemoryBank | None, shared: dict) -> nn.Module:
    """The stage's module of SpUNet basic block `block`, block `index` of U-Net stage `s`;
    DAPT's first block of a stage has no earlier prompt to read (no gate), and a prompt no
    later block or head reads gets no SSF (``prompt_read``)."""
    c_in, c_out = block.conv1.in_channels, block.conv1.out_channels
    if stage == "dapt":
        return DaptAdapter(c_in, c_out, s, cfg.reduction, cfg.min_rank, cfg.dropout, reads_prompts=index > 0,
                           ssf=cfg.ssf, shortcut=block.proj is not None, prompt_ssf=prompt_read)
    return PointPeftAdapter(c_in, c_out, block.conv1.indice_key,
                            **_point_peft_options(cfg, c_out, is_encoder, memory_bank, shared))


def _ptv3_block_module(block: Block, stage: str, s: int, index: int, is_encoder: bool, prompt_read: bool,
                       cfg: PeftConfig, memory_bank: MemoryBank | None, shared: dict) -> nn.Module:
    """The stage's module of PTv3 block `block`, block `index` of stage `s` (encoder then
    decoder); as the SpUNet's."""
    c, heads = block.attn.channels, block.attn.num_heads
    if stage == "dapt":
        return PTv3DaptAdapter(c, heads, s, cfg.reduction, cfg.min_rank, cfg.dropout, reads_prompts=index > 0,
                               ssf=cfg.ssf, mlp_hidden=block.mlp.fc1.out_features, prompt_ssf=prompt_read)
    return PTv3PointPeftAdapter(c, heads, block.cpe_conv.conv.indice_key,
                                **_point_peft_options(cfg, c, is_encoder, memory_bank, shared))


# block class -> (its adapted class, builder of a stage's module for it): the one place where
# the dapt / pointpeft stages know the backbone
BLOCK_ADAPTERS = {BasicBlock: (PeftBlock, _spunet_block_module), Block: (PeftPTv3Block, _ptv3_block_module)}


def apply_stage(model: nn.Module, cfg: PeftConfig, memory_bank: MemoryBank | None = None,
                domain: str | None = None, *, train_norms: bool | None = None,
                recompute_blocks: bool | None = None) -> nn.Module:
    """Freeze `model` (a Segmentor) and add the stage's modules in place; returns the model.

    Args:
        model: a trained Segmentor (base weights already loaded).
        cfg: the stage settings (``ppt.config.PeftConfig``, the config's ``peft`` section).
        memory_bank: required by `pointpeft` (see memory_bank.py).
        domain: the target dataset; when given, only its PDNorm norms train (bitfit, and dapt
            with `train_norms`).
        train_norms: DAPT also trains the norm affines (the behaviour before the backbone was
            frozen whole); default ``cfg.train_norms`` when the config has it, else False.
        recompute_blocks: adapted blocks are recomputed in backward as a whole (see module
            docstring); default ``cfg.recompute_blocks`` when the config has it, else
            ``cfg.input_grad_only`` (recomputing is only cheap when frozen convs skip the
            filter gradient).
    """
    backbone = model.backbone
    is_ptv3 = isinstance(backbone, PointTransformerV3)
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown PEFT stage {cfg.stage!r}; valid: {', '.join(STAGES)}")
    if is_staged(backbone):
        raise ValueError(f"a PEFT stage ({backbone.peft_stage}) is already applied to this model")
    if cfg.stage == "full":
        model.requires_grad_(True)
        return model
    if cfg.stage == "pointpeft" and memory_bank is None:
        raise ValueError("the pointpeft stage needs a memory bank (build_memory_bank)")
    # ppt.config.PeftConfig may not carry these keys (yet): the stage's defaults apply
    train_norms = getattr(cfg, "train_norms", False) if train_norms is None else train_norms
    if recompute_blocks is None:
        recompute_blocks = getattr(cfg, "recompute_blocks", cfg.input_grad_only)

    model.requires_grad_(False)
    if cfg.input_grad_only:
        freeze_sparse_convs(backbone)  # before adding adapters: their convs train
    for p in model.head.parameters():
        p.requires_grad_(True)
    if cfg.stage == "bitfit" or (cfg.stage == "dapt" and train_norms):
        for p in norm_affine_parameters(backbone, domain):
            p.requires_grad_(True)
    if cfg.stage == "pointpeft" and cfg.train_biases:
        for _, _, block in stage_blocks(backbone):
            for p in block_biases(block, domain):
                p.requires_grad_(True)
    trained = [backbone.decoder] if cfg.stage == "decoder" else []
    if cfg.stage in ("decoder", "lora") and getattr(cfg, "train_stem", False):
        trained.append(backbone.stem)
    for module in trained:
        for p in own_parameters(module, domain):
            p.requires_grad_(True)
    if cfg.stage == "lora":
        apply_lora(backbone, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.input_grad_only:
        freeze_norms(backbone)  # norms whose weight trains keep their own forward

    seen: dict[int, int] = {}  # stage -> blocks adapted so far
    depth = {s: len(stage.blocks) for s, stage in enumerate([*backbone.encoder, *backbone.decoder])}
    head_stages = set(range(len(backbone.encoder))) if getattr(backbone, "enc_mode", False) else {len(depth) - 1}
    shared: dict[int, GroupAttention] = {}  # width -> Point-PEFT's shared group attention
    device = next(backbone.parameters()).device
    for s, is_encoder, block in stage_blocks(backbone) if cfg.stage in ("dapt", "pointpeft") else ():
        adapted_class, build = next(v for k, v in BLOCK_ADAPTERS.items() if isinstance(block, k))
        read = seen.get(s, 0) < depth[s] - 1 or s in head_stages  # DAPT: a later block or the head reads its prompt
        module = build(block, cfg.stage, s, seen.get(s, 0), is_encoder, read, cfg, memory_bank, shared)
        seen[s] = seen.get(s, 0) + 1
        block.__class__ = adapted_class
        block.peft = module.to(device)
        block.recompute = recompute_blocks
    extras = nn.Module()  # backbone-level parameters of the stage
    if cfg.stage == "pointpeft" and cfg.geo_operator == "knn" and cfg.prompt_coords and cfg.num_tokens > 0:
        extras.prompt_coords = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.num_tokens, 3), std=PROMPT_COORD_STD))
    if cfg.stage == "dapt" and cfg.ssf:
        extras.ssf_out = ScaleShift(_output_width(backbone))
        backbone.stem.peft = ScaleShift(_stem_width(backbone)).to(device)
        _swap_class(backbone.stem, _OutputSSF, "SSF")
    if len(list(extras.parameters())):
        backbone.peft = extras.to(device)

    backbone.__class__ = PeftPTv3 if is_ptv3 else PeftSpUNet
    backbone.peft_stage = cfg.stage
    backbone.memory_bank = memory_bank.to(next(backbone.parameters()).device) if memory_bank is not None else None
    backbone.top_k, backbone.temperature, backbone.exclude_own = cfg.top_k, cfg.temperature, cfg.exclude_own

    prompts_train = model.prompts is not None and any(p.requires_grad for p in model.prompts.parameters())
    if cfg.no_grad_prefix and not prompts_train:
        for unit in backbone_units(backbone):
            if any(p.requires_grad for p in unit.parameters()):
                break
            _run_without_grad(unit)
    model.train(model.training)  # re-apply the frozen-statistics rule
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def is_staged(backbone: nn.Module) -> bool:
    """Whether a stage other than `full` is applied to this backbone."""
    return isinstance(backbone, (PeftSpUNet, PeftPTv3))


def stage_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys a stage's checkpoint keeps: trainable parameters, the memory bank, the
    head's label spaces and the running statistics of norms that train (stage `decoder`)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stats = {f"{name}.{b}" for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in trainable
             for b, _ in m.named_buffers()}
    return {k for k in model.state_dict() if k in trainable or k in stats
            or k.startswith(("backbone.memory_bank.", "head.text_"))}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`stage_state_keys` names, detached copies."""
    keys = stage_state_keys(model)
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items() if k in keys}
