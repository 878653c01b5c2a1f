"""What a PEFT stage reads of a backbone: its units and blocks in execution order, its widths, and
the parameter sets the stages train (norm affines, Point-PEFT's block biases, a module's own
parameters without the prompt machinery)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ppt.models.prompts import PDLayerNorm, PDNorm
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.ptv3_layers import Block
from ppt.models.spunet import SpUNet


def _stem_width(backbone: SpUNet | PointTransformerV3) -> int:
    stem = backbone.stem
    return stem.conv.out_channels if getattr(stem, "conv", None) is not None else stem.linear.out_features


def _output_width(backbone: SpUNet | PointTransformerV3) -> int:
    if isinstance(backbone, PointTransformerV3):
        return backbone.out_channels
    return backbone.decoder[-1].blocks[-1].conv2.out_channels


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


BIAS_LAYERS = ("attn.proj", "mlp.fc1", "mlp.fc2")  # PTv3 layers whose bias Point-PEFT trains


def block_biases(block: nn.Module, domain: str | None = None) -> Iterator[nn.Parameter]:
    """The biases Point-PEFT's reference trains in a block (``peft.train_biases``): norm1 /
    norm2 biases (the `domain`'s norm of a PDNorm / PDLayerNorm) and, on PTv3, the attention
    projection's and the MLP's (fc1, fc2). The SpUNet's convs have no bias."""
    for name in ("norm1", "norm2"):
        yield from list(norm_affine_parameters(getattr(block, name), domain))[1::2]
    for name in BIAS_LAYERS:
        layer = block.get_submodule(name) if isinstance(block, Block) else None
        if layer is not None and layer.bias is not None:
            yield layer.bias


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
