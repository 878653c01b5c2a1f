"""Apply a fine-tuning stage to a trained Segmentor (SPEC §8).

Stages (what trains; everything else is frozen):

| stage       | trains                                                            |
|-------------|-------------------------------------------------------------------|
| `full`      | every parameter (BN statistics update as in normal training)       |
| `linear`    | the head only (linear probing)                                     |
| `decoder`   | decoder + head (decoder probing; stem and encoder frozen)          |
| `bitfit`    | norm affine parameters + head                                      |
| `lora`      | LoRA updates of the encoder blocks (lora.py) + head                |
| `dapt`      | DAPT adapters and internal prompts (dapt.py) + head                |
| `pointpeft` | Point-PEFT adapters and prompt tokens (point_peft.py) + head        |

DAPT freezes the whole backbone, norms included, as its paper does (the reference trains the
adapters, prompts, head and new SSF-style scale-and-shift parameters, never the pre-trained
norms). SPEC §8 had our DAPT train the norm affines instead; that kept every norm input alive for
backward (DAPT measured +8% peak memory over full fine-tuning), so the default now freezes them
and ``train_norms=True`` (config ``peft.train_norms`` once it exists) restores the old
behaviour: the target dataset's norm affines train too.

For every stage but `full`, memory follows from what is frozen:
- BatchNorm running statistics are frozen (norm layers stay in eval mode);
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
``ptv3_block.PeftPTv3Block`` (ptv3_dapt.py / ptv3_point_peft.py: adapter beside the MLP,
prompts as per-scene keys/values of the attention, geometry adapter on the xCPE neighbourhood);
both are recomputed in backward as a whole. `decoder` and `lora` follow Sonata / Concerto's ``-dec`` and ``-ft-lora`` configs,
whose ``freeze_encoder=True`` freezes the embedding (stem) with the encoder (``train_stem``
trains it). `decoder`: the decoder's norms update their statistics, as any trained layer (the
frozen encoder's stay frozen). `lora` on our full U-Net: LoRA on the encoder only, as the
reference (whose encoder-only model has no decoder), and the decoder frozen with the rest of the
backbone, so the stage trains what the reference's does (LoRA + head) and stays the small one;
decoder probing is its own stage.

The stage is applied in place without changing the base model's module names (state-dict keys
of the base weights stay valid): the backbone's class becomes :class:`PeftSpUNet` (:class:`PeftPTv3`) and each adapted
block's ``PeftBlock`` (``PeftPTv3Block``); the new modules live under ``<block>.peft``, ``backbone.memory_bank``
and, for LoRA, ``<layer>.lora_A`` / ``<layer>.lora_B``.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ppt.config import PEFT_STAGES, PeftConfig
from ppt.models.peft.adapters import PeftContext
from ppt.models.peft.dapt import DaptAdapter, head_prompt
from ppt.models.peft.frozen_conv import freeze_sparse_convs
from ppt.models.peft.frozen_norm import freeze_norms
from ppt.models.peft.lora import apply_lora
from ppt.models.peft.memory_bank import MemoryBank, pooled_bottom, pooled_bottom_ptv3
from ppt.models.peft.point_peft import PointPeftAdapter
from ppt.models.peft.ptv3_block import PeftPTv3Block
from ppt.models.peft.ptv3_dapt import PTv3DaptAdapter
from ppt.models.peft.ptv3_point_peft import PTv3PointPeftAdapter
from ppt.models.peft.spunet_block import PeftBlock
from ppt.models.prompts import PDLayerNorm, PDNorm
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.ptv3_layers import Block
from ppt.models.spunet import BasicBlock, DomainContext, SpUNet, offset_to_batch

STAGES = tuple(s for s in PEFT_STAGES if s != "none")


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
                                                    backbone.top_k, backbone.temperature)
    return retrieved


class PeftSpUNet(SpUNet):
    """SpUNet with a stage applied: builds the per-forward PeftContext (retrieval for
    Point-PEFT), adds DAPT's mean prompt to the output features, keeps BN statistics frozen."""

    peft_stage: str
    memory_bank: MemoryBank | None
    top_k: int
    temperature: float

    def forward(self, batch: dict, ctx: DomainContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else DomainContext()
        x = self.sparse_input(batch)
        pctx = PeftContext(domain=ctx.domain, prompt=ctx.prompt,
                           retrieved=retrieved_set(self, batch, lambda: pooled_bottom(self, x, ctx)))
        out = self.forward_sparse(x, pctx)
        feats = out.features
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

    def forward(self, batch: dict, ctx: DomainContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else DomainContext()
        pctx = PeftContext(domain=ctx.domain, prompt=ctx.prompt,
                           retrieved=retrieved_set(self, batch, lambda: pooled_bottom_ptv3(self, batch, ctx)))
        feats = super().forward(batch, pctx)
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
    """BatchNorms run on their running statistics, except (stage `decoder`) the trained ones."""
    for m in backbone.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        trained = m.affine and m.weight.requires_grad
        if not (backbone.peft_stage == "decoder" and trained):
            m.eval()


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


def backbone_units(backbone: SpUNet | PointTransformerV3) -> Iterator[nn.Module]:
    """Stem, down/up-sampling layers and blocks of the backbone in execution order."""
    yield backbone.stem
    for stage in [*backbone.encoder, *backbone.decoder]:
        for name in ("down", "up", "resample"):  # SpUNet's down / up, PTv3's resample
            if getattr(stage, name, None) is not None:
                yield getattr(stage, name)
        yield from stage.blocks


def stage_blocks(backbone: SpUNet | PointTransformerV3) -> Iterator[tuple[int, bool, nn.Module]]:
    """(stage index, is encoder, block) for every block, in execution order (both backbones:
    ``encoder`` / ``decoder`` lists of stages with ``blocks``)."""
    for s, stage in enumerate([*backbone.encoder, *backbone.decoder]):
        for block in stage.blocks:
            yield s, s < len(backbone.encoder), block


def norm_affine_parameters(module: nn.Module, domain: str | None = None) -> Iterator[nn.Parameter]:
    """Affine parameters of every BatchNorm and LayerNorm (PTv3's); with `domain`, PDNorm's /
    PDLayerNorm's per-dataset norms of other datasets are skipped (they never see the target's
    batches)."""
    for name, m in module.named_modules():
        is_norm = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
        if not (is_norm or (isinstance(m, nn.LayerNorm) and m.elementwise_affine)):
            continue
        parts = name.split(".")
        if domain is not None and len(parts) >= 2 and parts[-2] == "norms" and parts[-1] != domain:
            continue
        yield m.weight
        yield m.bias


def _spunet_block_module(block: BasicBlock, stage: str, s: int, index: int, is_encoder: bool,
                         cfg: PeftConfig, memory_bank: MemoryBank | None) -> nn.Module:
    """The stage's module of SpUNet basic block `block`, block `index` of U-Net stage `s`."""
    c_in, c_out = block.conv1.in_channels, block.conv1.out_channels
    if stage == "dapt":
        return DaptAdapter(c_in, c_out, s, cfg.reduction, cfg.min_rank, cfg.dropout)
    return PointPeftAdapter(c_in, c_out, block.conv1.indice_key, prior_dim=memory_bank.dim,
                            num_tokens=cfg.num_tokens if is_encoder else 0, prior_rank=cfg.prior_rank,
                            geo_reduction=cfg.geo_reduction, min_rank=cfg.min_rank,
                            neighbour_attention=cfg.neighbour_attention)


def _ptv3_block_module(block: Block, stage: str, s: int, index: int, is_encoder: bool,
                       cfg: PeftConfig, memory_bank: MemoryBank | None) -> nn.Module:
    """The stage's module of PTv3 block `block`, block `index` of stage `s` (encoder then
    decoder); DAPT's first block of a stage has no earlier prompt to read (no gate)."""
    c, heads = block.attn.channels, block.attn.num_heads
    if stage == "dapt":
        return PTv3DaptAdapter(c, heads, s, cfg.reduction, cfg.min_rank, cfg.dropout, reads_prompts=index > 0)
    return PTv3PointPeftAdapter(c, heads, block.cpe_conv.conv.indice_key, prior_dim=memory_bank.dim,
                                num_tokens=cfg.num_tokens if is_encoder else 0, prior_rank=cfg.prior_rank,
                                geo_reduction=cfg.geo_reduction, min_rank=cfg.min_rank,
                                neighbour_attention=cfg.neighbour_attention)


# block class -> (its adapted class, builder of a stage's module for it): the one place where
# the dapt / pointpeft stages know the backbone
BLOCK_ADAPTERS = {BasicBlock: (PeftBlock, _spunet_block_module), Block: (PeftPTv3Block, _ptv3_block_module)}


def own_parameters(module: nn.Module, domain: str | None = None) -> Iterator[nn.Parameter]:
    """Parameters of `module` a target-dataset stage trains: not the prompt machinery (PDNorm /
    PDLayerNorm modulations, prompt adapters) and, with `domain`, not other datasets' norms."""
    skip = {id(p) for m in module.modules() if isinstance(m, (PDNorm, PDLayerNorm)) and m.modulation is not None
            for p in m.modulation.parameters()}
    skip |= {id(p) for m in module.modules() if getattr(m, "prompt_adapter", None) is not None
             for p in m.prompt_adapter.parameters()}
    for name, p in module.named_parameters():
        parts = name.split(".")
        other = domain is not None and len(parts) >= 3 and parts[-3] == "norms" and parts[-2] != domain
        if id(p) not in skip and not other:
            yield p


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
    trained = [backbone.decoder] if cfg.stage == "decoder" else []
    if cfg.stage in ("decoder", "lora") and getattr(cfg, "train_stem", False):
        trained.append(backbone.stem)
    for module in trained:
        for p in own_parameters(module, domain):
            p.requires_grad_(True)
    if cfg.stage == "lora":
        apply_lora(backbone, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.input_grad_only:
        freeze_norms(backbone)  # norms that train keep their own forward

    seen: dict[int, int] = {}  # stage -> blocks adapted so far
    for s, is_encoder, block in stage_blocks(backbone) if cfg.stage in ("dapt", "pointpeft") else ():
        adapted_class, build = next(v for k, v in BLOCK_ADAPTERS.items() if isinstance(block, k))
        module = build(block, cfg.stage, s, seen.get(s, 0), is_encoder, cfg, memory_bank)
        seen[s] = seen.get(s, 0) + 1
        block.__class__ = adapted_class
        block.peft = module.to(next(block.parameters()).device)
        block.recompute = recompute_blocks

    backbone.__class__ = PeftPTv3 if is_ptv3 else PeftSpUNet
    backbone.peft_stage = cfg.stage
    backbone.memory_bank = memory_bank.to(next(backbone.parameters()).device) if memory_bank is not None else None
    backbone.top_k, backbone.temperature = cfg.top_k, cfg.temperature

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
