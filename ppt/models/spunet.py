"""SpUNet: the sparse-convolution U-Net backbone of PPT (SPEC §3), on spconv.

Layout (defaults; ``channels = (32, 64, 128, 256, 256, 128, 96, 96)``,
``layers = (2, 3, 4, 6, 2, 2, 2, 2)``)::

    stem     subm k5, in -> 32, norm, ReLU                          (level 0)
    encoder  4 x [sparse conv k2 s2 -> norm -> ReLU, BasicBlock x layers[s]]   (levels 1..4)
    decoder  4 x [inverse conv k2 (encoder indices) -> norm -> ReLU,
                  concat skip, BasicBlock x layers[4 + s]]           (levels 3..0)

Every norm layer is built by one ``norm_layer(num_features)`` callable and called as
``norm(features, ctx)`` with a :class:`DomainContext`, so PDNorm (``ppt.models.prompts``) can
replace all 59 of them and see which dataset the batch comes from. Every :class:`BasicBlock`
has one ``prompt_adapter`` slot (``None`` by default) that adds a prompt-dependent delta to the
block input; PEFT modules hook into the same blocks (``SpUNet.blocks()`` lists them in order).

spconv algorithm: convs are built with spconv's default algorithm (implicit GEMM on CUDA; the
k5 stem has 125 kernel offsets, above spconv's implicit-GEMM limit of 32, so spconv itself
keeps it Native, as in Pointcept). At each forward, :meth:`SpUNet.forward_sparse` switches
every conv to ``ConvAlgo.Native`` when the features are on the CPU and back to its CUDA default
otherwise
(spconv 2.2+ stores weights in one layout for all algorithms, so switching is free).

Mixed precision: spconv has no bf16 kernels. Under CUDA autocast (fp16 or bf16) spconv's own
``custom_fwd`` runs every sparse conv in fp16; the norms here compute in fp32 and return fp32,
so features travel between layers in fp32 and the fp16 range only matters inside one conv.
spconv's CPU path takes fp32 only, so CPU autocast is switched off inside the backbone (the
head still runs under it).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():
    # spconv 2.3 decorates its autograd functions with torch.cuda.amp.custom_fwd/bwd, deprecated
    # since torch 2.4: eight FutureWarnings at import that no user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv(\.|$)")
    import spconv.pytorch as spconv
from spconv.core import ConvAlgo

# spconv's modules ask torch.fx.is_fx_tracing(), which logs a deprecation notice (once per
# process, so once per loader worker) that no user can act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
from spconv.pytorch.conv import SparseConvolution

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
INIT_STD = 0.02
IMPLICIT_GEMM_MAX_KV = 32  # spconv's limit for implicit GEMM kernels
SPATIAL_MARGIN = 96  # spatial shape = per-axis max grid coordinate + this margin (reference)


@dataclass
class DomainContext:
    """What every norm layer and prompt adapter gets to know about the current batch.

    Attributes:
        domain: dataset name whose normalisation statistics apply, or ``"mean"`` (unknown
            domain); empty for a model without prompts.
        prompt: (1, prompt_dim) domain prompt, or ``None`` for a model without prompts.
    """

    domain: str = ""
    prompt: torch.Tensor | None = None


NormLayer = Callable[[int], nn.Module]  # num_features -> module called as norm(x (N, C), ctx)
AdapterLayer = Callable[[int], nn.Module]  # channels -> module called as adapter(x (N, C), ctx) -> delta


class BatchNorm(nn.BatchNorm1d):
    """Plain BatchNorm1d (eps 1e-3, momentum 0.01) that accepts and ignores the domain context.

    Args:
        num_features: channels C of the (N, C) input.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor, ctx: DomainContext | None = None) -> torch.Tensor:
        return super().forward(x.float())


def sparse_conv(kind: type, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Module:
    """Build a bias-free spconv layer with truncated-normal (std 0.02) weights."""
    conv = kind(in_channels, out_channels, kernel_size=kernel_size, bias=False, **kwargs)
    nn.init.trunc_normal_(conv.weight, std=INIT_STD)
    return conv


class ConvNormAct(nn.Module):
    """Sparse conv -> norm -> ReLU (stem, down-sampling and up-sampling layers).

    Args:
        conv: an spconv layer.
        norm_layer: builds the norm for ``conv.out_channels`` features.
    """

    def __init__(self, conv: nn.Module, norm_layer: NormLayer):
        super().__init__()
        self.conv = conv
        self.norm = norm_layer(conv.out_channels)

    def forward(self, x: spconv.SparseConvTensor, ctx: DomainContext) -> spconv.SparseConvTensor:
        x = self.conv(x)
        return x.replace_feature(F.relu(self.norm(x.features, ctx)))


class BasicBlock(nn.Module):
    """Residual block: subm k3 -> norm -> ReLU -> subm k3 -> norm, + shortcut, ReLU.

    The shortcut is a 1x1 subm conv + norm when the channel count changes, else identity.
    ``prompt_adapter`` (optional) adds ``adapter(x, ctx)`` to the block input first.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm_layer: norm builder (see module docstring).
        indice_key: spconv key shared by all subm convs of one resolution level.
        adapter_layer: optional builder of the prompt adapter for ``in_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: NormLayer,
        indice_key: str,
        adapter_layer: AdapterLayer | None = None,
    ):
        super().__init__()
        self.prompt_adapter = adapter_layer(in_channels) if adapter_layer is not None else None
        self.conv1 = sparse_conv(spconv.SubMConv3d, in_channels, out_channels, 3, padding=1, indice_key=indice_key)
        self.norm1 = norm_layer(out_channels)
        self.conv2 = sparse_conv(spconv.SubMConv3d, out_channels, out_channels, 3, padding=1, indice_key=indice_key)
        self.norm2 = norm_layer(out_channels)
        if in_channels != out_channels:
            self.proj = sparse_conv(spconv.SubMConv3d, in_channels, out_channels, 1)
            self.proj_norm = norm_layer(out_channels)
        else:
            self.proj = self.proj_norm = None

    def forward(self, x: spconv.SparseConvTensor, ctx: DomainContext) -> spconv.SparseConvTensor:
        if self.prompt_adapter is not None:
            x = x.replace_feature(x.features + self.prompt_adapter(x.features, ctx))
        shortcut = x.features
        if self.proj is not None:
            shortcut = self.proj_norm(self.proj(x).features, ctx)
        out = self.conv1(x)
        out = out.replace_feature(F.relu(self.norm1(out.features, ctx)))
        out = self.conv2(out)
        return out.replace_feature(F.relu(self.norm2(out.features, ctx) + shortcut))


class EncoderStage(nn.Module):
    """Down-sample by 2 (sparse conv k2 s2, ``indice_key`` ``spconv{level}``), then blocks.

    Args:
        in_channels: channels of the finer level.
        channels: channels of this level.
        depth: number of basic blocks.
        level: resolution level 1..4 (names the spconv indice keys).
        norm_layer: norm builder.
        adapter_layer: optional prompt-adapter builder for each block.
    """

    def __init__(self, in_channels: int, channels: int, depth: int, level: int,
                 norm_layer: NormLayer, adapter_layer: AdapterLayer | None = None):
        super().__init__()
        conv = sparse_conv(spconv.SparseConv3d, in_channels, channels, 2, stride=2, indice_key=f"spconv{level}")
        self.down = ConvNormAct(conv, norm_layer)
        self.blocks = nn.ModuleList(
            BasicBlock(channels, channels, norm_layer, f"subm{level}", adapter_layer) for _ in range(depth)
        )

    def forward(self, x: spconv.SparseConvTensor, ctx: DomainContext) -> spconv.SparseConvTensor:
        x = self.down(x, ctx)
        for block in self.blocks:
            x = block(x, ctx)
        return x


class DecoderStage(nn.Module):
    """Up-sample to level ``level - 1`` with the inverse of encoder conv ``spconv{level}``
    (restores the finer active set in its original row order), concat the skip, then blocks.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder skip at the finer level.
        channels: output channels.
        depth: number of basic blocks (the first one maps ``channels + skip`` -> ``channels``).
        level: the coarse level 1..4 this stage leaves.
        norm_layer: norm builder.
        adapter_layer: optional prompt-adapter builder for each block.
    """

    def __init__(self, in_channels: int, skip_channels: int, channels: int, depth: int, level: int,
                 norm_layer: NormLayer, adapter_layer: AdapterLayer | None = None):
        super().__init__()
        conv = sparse_conv(spconv.SparseInverseConv3d, in_channels, channels, 2, indice_key=f"spconv{level}")
        self.up = ConvNormAct(conv, norm_layer)
        self.blocks = nn.ModuleList(
            BasicBlock(channels + skip_channels if i == 0 else channels, channels, norm_layer,
                       f"subm{level - 1}", adapter_layer)
            for i in range(depth)
        )

    def forward(self, x: spconv.SparseConvTensor, skip: spconv.SparseConvTensor,
                ctx: DomainContext) -> spconv.SparseConvTensor:
        x = self.up(x, ctx)
        x = x.replace_feature(torch.cat([x.features, skip.features], dim=1))
        for block in self.blocks:
            x = block(x, ctx)
        return x


def cuda_default_algo(conv: nn.Module) -> ConvAlgo:
    """spconv's constructor default: implicit GEMM up to 32 kernel offsets, Native above (k5 stem)."""
    return ConvAlgo.MaskImplicitGemm if math.prod(conv.kernel_size) <= IMPLICIT_GEMM_MAX_KV else ConvAlgo.Native


def offset_to_batch(offset: torch.Tensor) -> torch.Tensor:
    """(B,) cumulative end indices -> (N,) batch id of every row."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(offset), device=offset.device), counts)


class SpUNet(nn.Module):
    """Sparse U-Net backbone (SPEC §3); about 39.2 M parameters with the defaults.

    Args:
        in_channels: input feature channels (colour + normal = 6).
        channels: 4 encoder widths followed by 4 decoder widths.
        layers: basic blocks per stage, 4 encoder then 4 decoder stages.
        stem_channels: width of the k5 stem (level 0).
        norm_layer: builds every norm; default plain :class:`BatchNorm`.
        adapter_layer: builds the optional prompt adapter of every basic block.
    """

    def __init__(
        self,
        in_channels: int = 6,
        channels: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96),
        layers: Sequence[int] = (2, 3, 4, 6, 2, 2, 2, 2),
        stem_channels: int = 32,
        norm_layer: NormLayer = BatchNorm,
        adapter_layer: AdapterLayer | None = None,
    ):
        super().__init__()
        if len(channels) != 8 or len(layers) != 8:
            raise ValueError(f"SpUNet needs 8 channels and 8 layers (4 encoder + 4 decoder stages), "
                             f"got channels={tuple(channels)}, layers={tuple(layers)}")
        self.in_channels = in_channels
        self.out_channels = channels[-1]
        stem = sparse_conv(spconv.SubMConv3d, in_channels, stem_channels, 5, padding=1, indice_key="stem")
        self.stem = ConvNormAct(stem, norm_layer)

        widths = [stem_channels, *channels[:4]]  # width at levels 0..4
        self.encoder = nn.ModuleList(
            EncoderStage(widths[s], widths[s + 1], layers[s], s + 1, norm_layer, adapter_layer) for s in range(4)
        )
        # decoder[i] leaves level 4 - i; its input is the encoder bottom or the previous decoder
        dec_in = [channels[3], *channels[4:7]]
        self.decoder = nn.ModuleList(
            DecoderStage(dec_in[i], widths[3 - i], channels[4 + i], layers[4 + i], 4 - i, norm_layer, adapter_layer)
            for i in range(4)
        )

    def blocks(self) -> Iterator[BasicBlock]:
        """All basic blocks in execution order (15 encoder + 8 decoder with the defaults)."""
        for stage in [*self.encoder, *self.decoder]:
            yield from stage.blocks

    def set_algo_for(self, device: torch.device) -> None:
        """Native spconv algorithm on CPU, spconv's own default on CUDA.

        Walks the modules at every call (cheap) so convs added or replaced later (PEFT) follow.
        """
        for m in self.modules():
            if isinstance(m, SparseConvolution):
                m.algo = ConvAlgo.Native if device.type == "cpu" else cuda_default_algo(m)

    @staticmethod
    def sparse_input(batch: dict) -> spconv.SparseConvTensor:
        """Batch dict (``grid_coord`` (N, 3) int, ``feat`` (N, C), ``offset`` (B,)) -> sparse tensor
        with indices (batch id, grid_coord) and spatial shape max(grid_coord) + 96."""
        grid = batch["grid_coord"].int()
        if grid.ndim != 2 or grid.shape[1] != 3 or (grid.numel() and grid.min() < 0):
            raise ValueError(f"batch['grid_coord'] must be (N, 3) non-negative ints, got shape {tuple(grid.shape)}")
        batch_id = offset_to_batch(batch["offset"].to(grid.device)).int()
        spatial_shape = (grid.max(dim=0).values + SPATIAL_MARGIN).tolist()
        indices = torch.cat([batch_id[:, None], grid], dim=1).contiguous()
        return spconv.SparseConvTensor(batch["feat"].float(), indices, spatial_shape, len(batch["offset"]))

    def forward_sparse(self, x: spconv.SparseConvTensor, ctx: DomainContext) -> spconv.SparseConvTensor:
        """Run the U-Net on a sparse tensor; output rows are aligned with the input rows."""
        device = x.features.device
        self.set_algo_for(device)
        # spconv's CPU kernels take fp32 only: CPU autocast (bf16) stays outside the backbone
        with torch.autocast("cpu", enabled=torch.is_autocast_enabled("cpu") and device.type != "cpu"):
            x = self.stem(x, ctx)
            skips = [x]
            for stage in self.encoder:
                x = stage(x, ctx)
                skips.append(x)
            skips.pop()  # the encoder bottom is the decoder input, not a skip
            for stage in self.decoder:
                x = stage(x, skips.pop(), ctx)
        return x

    def forward(self, batch: dict, ctx: DomainContext | None = None) -> torch.Tensor:
        """Batch dict -> (N, channels[-1]) per-voxel features, rows in batch order."""
        ctx = ctx if ctx is not None else DomainContext()
        return self.forward_sparse(self.sparse_input(batch), ctx).features
