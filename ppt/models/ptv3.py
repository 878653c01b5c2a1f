"""Point Transformer V3 backbone (Wu et al., CVPR 2024; reference: Pointcept ``PT-v3m1``).

Layout (paper defaults, about 46.2 M parameters; see :data:`PTV3_DEFAULT_PARAMS`)::

    stem     subm conv k5 (in -> 32), norm, GELU                            (level 0)
    encoder  5 stages: [grid pooling stride 2 (stages 1..4)] + blocks x (2, 2, 2, 6, 2),
             channels (32, 64, 128, 256, 512), heads (2, 4, 8, 16, 32)      (levels 0..4)
    decoder  4 stages: grid unpooling with the encoder skip + blocks x (2, 2, 2, 2),
             channels (64, 64, 128, 256), heads (4, 4, 8, 16)               (levels 3..0)

Each block (``ppt.models.ptv3_layers.Block``) attends inside patches of ``patch_size`` voxels
serialized by one space-filling curve; block ``i`` of a stage uses order ``i % len(orders)``
(the reference's cycling); in training the order list is shuffled at every forward and at
every pooling ("shuffle order"). Deviation from the reference: orders are not shuffled in
eval mode, so evaluation (and test-time augmentation) is deterministic.

Switches for imported Pointcept models (``ppt.interop.pointcept_ptv3``; defaults = this
project's model, which is PT-v3m1 except where noted):

- ``unpool_cpe``: "sum" (the first decoder block's CPE conv reads the unpooled sum, as PT-v3m2)
  or "skip" (PT-v3m1: it reads only the projected skip features).
- ``serial_depth``: bits per axis of the serialization codes; 0 = from the batch's largest grid
  coordinate, as the reference (exact reference orders; a sample's order then depends on its
  batch). ``pooling``: "serialized" (codes shifted, PT-v3m1) or "grid" (each coarse level
  serialized again at its own depth, PT-v3m2's GridPooling; differs from "serialized" only with
  ``serial_depth`` 0).
- ``stem``: "conv" (subm conv k5, no bias; PT-v3m1) or "linear" (PT-v3m2's Linear embedding).
  ``resample_norm``: "batch" (stem, pooling and unpooling normalised by ``norm_layer``; PT-v3m1)
  or "layer" (by ``ln_layer``; PT-v3m2 has LayerNorm everywhere).
- ``layer_scale``: LayerScale on both branches of every block (PT-v3m2's ``layer_scale``; 0 = off).
- ``enc_mode``: encoder only; every stage's output is brought back to full resolution through
  the pooling clusters and concatenated (finest first), as Pointcept's ``pooling_parent`` walk
  in DefaultSegmentorV2 / PPT-v1m3: ``out_channels = sum(enc_channels)``.

Same contract as :class:`ppt.models.spunet.SpUNet`: ``forward(batch, ctx) -> (N, out_channels)``
with rows in batch order; every norm is built by ``norm_layer`` (the batch norms of stem,
pooling and unpooling) or ``ln_layer`` (the LayerNorms of the blocks) and called as
``norm(x, ctx)``, so PDNorm / PDLayerNorm make every norm prompt-driven.

Mixed precision: linear layers and attention follow CUDA autocast (bf16 where supported);
spconv runs its convs in fp16 under any CUDA autocast; norms compute in fp32. CPU autocast is
switched off inside the backbone (spconv's CPU kernels take fp32 only), as in SpUNet.
Weights keep PyTorch's / spconv's default initialisation, as the reference.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import spconv.pytorch as spconv
import torch
import torch.nn as nn
import torch.nn.functional as F
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution

from ppt.models.ptv3_layers import (
    Block, GridPooling, GridUnpooling, LayerNorm, Level, NormLayer, data_depth, make_level, pool_level,
)
from ppt.models.serialization import DEFAULT_DEPTH, MAX_DEPTH, ORDERS
from ppt.models.spunet import BatchNorm, DomainContext, cuda_default_algo

PTV3_DEFAULT_PARAMS = 46_166_272  # PointTransformerV3() with plain norms, as the reference PT-v3m1 (paper: 46.2 M)
STEM_KERNEL = 5
REFERENCE_MAX_DEPTH = 16  # Point.serialization asserts a data depth <= 16
STEMS = ("conv", "linear")
RESAMPLE_NORMS = ("batch", "layer")
POOLINGS = ("serialized", "grid")
UNPOOL_CPE = ("sum", "skip")


class Stem(nn.Module):
    """Embedding: subm conv k5 (no bias; ``conv``) or Linear (``linear``, PT-v3m2) -> norm ->
    GELU, on level 0.

    Args:
        in_channels: input feature channels.
        channels: embedding channels.
        norm_layer: builds the norm.
        kind: "conv" or "linear".
    """

    def __init__(self, in_channels: int, channels: int, norm_layer: NormLayer, kind: str = "conv"):
        super().__init__()
        if kind == "conv":
            self.conv = spconv.SubMConv3d(in_channels, channels, kernel_size=STEM_KERNEL, padding=1,
                                          bias=False, indice_key="stem")
        else:
            self.linear = nn.Linear(in_channels, channels)
        self.kind = kind
        self.norm = norm_layer(channels)

    def forward(self, feat: torch.Tensor, level: Level, ctx: DomainContext) -> torch.Tensor:
        """(N, C_in) -> (N, channels)."""
        x = self.conv(level.sparse.replace_feature(feat)).features if self.kind == "conv" else self.linear(feat)
        return F.gelu(self.norm(x, ctx))


class Stage(nn.Module):
    """An encoder stage (optional pooling, then blocks) or a decoder stage (unpooling, then blocks).

    Args:
        resample: ``GridPooling`` / ``GridUnpooling`` or None (first encoder stage).
        blocks: the stage's blocks.
    """

    def __init__(self, resample: nn.Module | None, blocks: list[Block]):
        super().__init__()
        self.resample = resample
        self.blocks = nn.ModuleList(blocks)


class PointTransformerV3(nn.Module):
    """PTv3 backbone over voxelised batches.

    Args:
        in_channels: input feature channels (colour + normal = 6).
        enc_depths, enc_channels, enc_heads: blocks, widths and heads of the encoder stages.
        dec_depths, dec_channels, dec_heads: the same for the decoder stages, finest first
            (one stage fewer than the encoder).
        patch_size: voxels per attention patch.
        mlp_ratio: MLP hidden width / channels.
        drop_path: largest stochastic-depth rate (linear from 0 over the encoder blocks, and
            over the decoder blocks from the finest stage's last block up to the deepest).
        orders: serialization orders (``ppt.models.serialization.ORDERS``), cycled over blocks.
        shuffle_orders: shuffle the order list at each forward / pooling in training.
        norm_layer: builds the batch norms (stem, pooling, unpooling).
        ln_layer: builds the LayerNorms of the blocks.
        adapter_layer: optional builder of each block's prompt adapter.
        serial_depth, pooling, stem, resample_norm, unpool_cpe, layer_scale, enc_mode: the switches
            of the module docstring (defaults: this project's model).
    """

    def __init__(
        self,
        in_channels: int = 6,
        enc_depths: Sequence[int] = (2, 2, 2, 6, 2),
        enc_channels: Sequence[int] = (32, 64, 128, 256, 512),
        enc_heads: Sequence[int] = (2, 4, 8, 16, 32),
        dec_depths: Sequence[int] = (2, 2, 2, 2),
        dec_channels: Sequence[int] = (64, 64, 128, 256),
        dec_heads: Sequence[int] = (4, 4, 8, 16),
        patch_size: int = 1024,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.3,
        orders: Sequence[str] = ORDERS,
        shuffle_orders: bool = True,
        norm_layer: NormLayer = BatchNorm,
        ln_layer: NormLayer = LayerNorm,
        adapter_layer: Callable[[int], nn.Module] | None = None,
        serial_depth: int = DEFAULT_DEPTH,
        pooling: str = "serialized",
        stem: str = "conv",
        resample_norm: str = "batch",
        unpool_cpe: str = "sum",
        layer_scale: float = 0.0,
        enc_mode: bool = False,
    ):
        super().__init__()
        stages = len(enc_depths)
        for name, value, valid in (("pooling", pooling, POOLINGS), ("stem", stem, STEMS),
                                   ("resample_norm", resample_norm, RESAMPLE_NORMS),
                                   ("unpool_cpe", unpool_cpe, UNPOOL_CPE)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        if not 0 <= serial_depth <= MAX_DEPTH:
            raise ValueError(f"serial_depth must be in [0, {MAX_DEPTH}] (0 = from the data), got {serial_depth}")
        if not (len(enc_channels) == len(enc_heads) == stages and (enc_mode or
                len(dec_depths) == len(dec_channels) == len(dec_heads) == stages - 1)):
            raise ValueError(f"PTv3 needs equally long enc_depths/enc_channels/enc_heads and one entry "
                             f"fewer for dec_*, got enc {len(enc_depths)}/{len(enc_channels)}/"
                             f"{len(enc_heads)}, dec {len(dec_depths)}/{len(dec_channels)}/{len(dec_heads)}")
        if not orders or any(o not in ORDERS for o in orders):
            raise ValueError(f"orders must be a non-empty list of {', '.join(ORDERS)}; got {list(orders)}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.in_channels = in_channels
        self.enc_mode = enc_mode
        self.out_channels = sum(enc_channels) if enc_mode else dec_channels[0]
        self.orders = tuple(orders)
        self.shuffle_orders = shuffle_orders
        self.depth = serial_depth
        self.reserialize = pooling == "grid"
        self.unpool_cpe = unpool_cpe
        resample_layer = ln_layer if resample_norm == "layer" else norm_layer

        def blocks(channels: int, heads: int, rates: list[float], level: int) -> list[Block]:
            return [Block(channels, heads, patch_size, mlp_ratio, rate, ln_layer, f"stage{level}", adapter_layer,
                          layer_scale) for rate in rates]

        self.stem = Stem(in_channels, enc_channels[0], resample_layer, stem)
        rates = torch.linspace(0, drop_path, sum(enc_depths)).tolist()
        self.encoder = nn.ModuleList()
        for s in range(stages):
            down = GridPooling(enc_channels[s - 1], enc_channels[s], resample_layer) if s > 0 else None
            own = rates[sum(enc_depths[:s]):sum(enc_depths[:s + 1])]
            self.encoder.append(Stage(down, blocks(enc_channels[s], enc_heads[s], own, s)))
        self.decoder = nn.ModuleList()  # execution order: deepest stage first
        if enc_mode:
            return
        rates = torch.linspace(0, drop_path, sum(dec_depths)).tolist()
        widths = [*dec_channels, enc_channels[-1]]
        for s in reversed(range(stages - 1)):
            up = GridUnpooling(widths[s + 1], enc_channels[s], widths[s], resample_layer)
            own = rates[sum(dec_depths[:s]):sum(dec_depths[:s + 1])][::-1]
            self.decoder.append(Stage(up, blocks(widths[s], dec_heads[s], own, s)))

    def blocks(self) -> Iterator[Block]:
        """All transformer blocks in execution order (14 encoder + 8 decoder with the defaults)."""
        for stage in [*self.encoder, *self.decoder]:
            yield from stage.blocks

    def set_algo_for(self, device: torch.device) -> None:
        """Native spconv algorithm on CPU, spconv's own default on CUDA (as SpUNet)."""
        for m in self.modules():
            if isinstance(m, SparseConvolution):
                m.algo = ConvAlgo.Native if device.type == "cpu" else cuda_default_algo(m)

    def level0(self, batch: dict) -> Level:
        """Batch dict (``grid_coord`` (N, 3) non-negative ints, ``offset`` (B,)) -> level 0."""
        grid = batch["grid_coord"]
        if grid.ndim != 2 or grid.shape[1] != 3 or (grid.numel() and grid.min() < 0):
            raise ValueError(f"batch['grid_coord'] must be (N, 3) non-negative ints, got shape {tuple(grid.shape)}")
        depth, limit = (self.depth, self.depth) if self.depth else (data_depth(grid), REFERENCE_MAX_DEPTH)
        if grid.numel() and (depth > limit or int(grid.max()) >= 1 << depth):
            raise ValueError(f"batch['grid_coord'] reaches {int(grid.max())}; PTv3 serializes at most "
                             f"{1 << limit} voxels per axis (use a larger voxel size)")
        offset = batch["offset"].to(grid.device).long()
        return make_level(grid, offset, self.orders, depth, self.training and self.shuffle_orders)

    def forward(self, batch: dict, ctx: DomainContext | None = None) -> torch.Tensor:
        """Batch dict (``grid_coord``, ``feat`` (N, C_in), ``offset``) -> (N, out_channels)
        per-voxel features, rows in batch order."""
        ctx = ctx if ctx is not None else DomainContext()
        feat = batch["feat"].float()
        device = feat.device
        self.set_algo_for(device)
        shuffle = self.training and self.shuffle_orders
        # spconv's CPU kernels take fp32 only: CPU autocast (bf16) stays outside the backbone
        with torch.autocast("cpu", enabled=torch.is_autocast_enabled("cpu") and device.type != "cpu"):
            level = self.level0(batch)
            x = self.stem(feat, level, ctx)
            levels, skips = [], []
            for stage in self.encoder:
                if stage.resample is not None:
                    level = pool_level(level, shuffle, self.reserialize)
                    x = stage.resample(x, level, ctx)
                x = self._run_blocks(stage, x, level, ctx)
                levels.append(level)
                skips.append(x)
            if self.enc_mode:  # the pooling_parent walk: deepest first, concatenated finest first
                for fine in reversed(range(len(levels) - 1)):
                    x = torch.cat([skips[fine], x[levels[fine + 1].cluster]], dim=1)
                return x
            for stage in self.decoder:
                coarse = levels.pop()
                skips.pop()
                x, skip = stage.resample(x, skips[-1], coarse, ctx)
                x = self._run_blocks(stage, x, levels[-1], ctx, skip if self.unpool_cpe == "skip" else None)
        return x

    def _run_blocks(self, stage: Stage, x: torch.Tensor, level: Level, ctx: DomainContext,
                    cpe_input: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(stage.blocks):
            x = block(x, level, ctx, i % len(self.orders), cpe_input if i == 0 else None)
        return x
