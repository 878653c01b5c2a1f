"""Layers of Point Transformer V3 (Wu et al., CVPR 2024): the point hierarchy, serialized
patch attention, the transformer block and grid pooling / unpooling.

A :class:`Level` is one resolution of the hierarchy: its rows are voxels in batch order, with
their serialization codes (one row of codes per order) and the sparse-conv index cache that the
conditional positional encodings of that resolution share. Features travel separately as
(N, C) tensors, so every layer is ``f(x, level, ctx) -> x``.

Patches (:class:`Patches`): a sample's voxels, sorted by code, are cut into patches of K
consecutive voxels. A sample of n >= K voxels is padded to a multiple of K by repeating, in its
last patch, the voxels at the same slots of its previous patch (real voxels of the same
sample, none twice in a patch; the reference's padding), so padding never mixes two samples
and needs no attention mask. A sample with n < K voxels is one patch of n voxels. All full
patches go to one ``scaled_dot_product_attention`` call; short patches are grouped by length.
Deviation from the reference: without flash-attn the reference shrinks K to the smallest
sample of the batch, which makes a sample's output depend on its batch; here it never does.

Drop path is per point, as the reference (timm's DropPath applied to (N, C) point features).

Serialization depth (bits per axis of the codes): fixed (``depth > 0``, this project's default,
so a sample's order never depends on its batch) or, as the reference, from the batch
(:func:`data_depth`: ``int(max grid coordinate + 1).bit_length()``). Pooling shifts the codes
(PT-v3m1's ``SerializedPooling``: depth - 1 per level) or re-serializes each coarse level from its
own coordinates (PT-v3m2's ``GridPooling``, ``reserialize=True``); with a data depth the two give
different Hilbert orders, so imported models keep their own rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import spconv.pytorch as spconv
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppt.models.serialization import encode
from ppt.models.spunet import SPATIAL_MARGIN, DomainContext, offset_to_batch

POOL_SHIFT = 3  # one code triple per halving of the grid (stride 2)
CPE_KERNEL = 3


class LayerNorm(nn.LayerNorm):
    """Plain LayerNorm over (N, C) in fp32 that accepts and ignores the domain context."""

    def forward(self, x: torch.Tensor, ctx: DomainContext | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


NormLayer = Callable[[int], nn.Module]  # num_features -> module called as norm(x (N, C), ctx)


@dataclass
class Patches:
    """Where each padded patch slot reads from, for one level and one patch size.

    Attributes:
        gather: (M,) serialized position (0..N-1) of every padded slot.
        scatter: (N,) padded slot of every serialized position (its first occurrence).
        groups: (start slot, number of patches, patch length) of runs of equal-length patches.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    groups: list[tuple[int, int, int]]


def build_patches(counts: Sequence[int], patch_size: int, device: torch.device) -> Patches:
    """Patches of ``patch_size`` over samples of ``counts`` voxels (serialized, batch order)."""
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    gather, scatter = [], torch.empty(starts[-1], dtype=torch.long, device=device)
    slot = 0
    for start, n in zip(starts, counts):  # full patches first: one attention call
        if n >= patch_size:
            padded = -(-n // patch_size) * patch_size
            idx = torch.arange(padded, device=device)
            idx[n:] -= patch_size  # last patch: repeat the previous patch's slots
            gather.append(start + idx)
            scatter[start:start + n] = slot + torch.arange(n, device=device)
            slot += padded
    full = [(0, slot // patch_size, patch_size)] if slot else []
    groups: list[tuple[int, int, int]] = []
    short = sorted((n, start) for start, n in zip(starts, counts) if 0 < n < patch_size)
    for n, start in short:  # one patch per small sample, grouped by length
        if groups and groups[-1][2] == n:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1, n)
        else:
            groups.append((slot, 1, n))
        gather.append(start + torch.arange(n, device=device))
        scatter[start:start + n] = slot + torch.arange(n, device=device)
        slot += n
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Patches(torch.cat(gather) if gather else empty, scatter, full + groups)


@dataclass
class Level:
    """One resolution of the point hierarchy.

    Attributes:
        grid: (N, 3) int64 voxel coordinates at this resolution.
        offset: (B,) cumulative end row of each sample.
        code: (O, N) int64 serialization codes, one row per order (the block's order index).
        order: (O, N) rows sorted by each code (serialized position -> row).
        inverse: (O, N) serialized position of each row.
        depth: bits per axis of the codes.
        orders: the order name of each code row (rows are permuted when orders are shuffled).
        sparse: sparse tensor (indices = batch id, grid) whose index cache the conditional
            positional encodings of this resolution share; its features are a placeholder.
        cluster: (N_finer,) row of this level holding each row of the finer level (None at 0).
    """

    grid: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    depth: int
    orders: tuple[str, ...]
    sparse: spconv.SparseConvTensor
    cluster: torch.Tensor | None = None
    _patches: dict[int, Patches] = field(default_factory=dict)

    def patches(self, patch_size: int) -> Patches:
        if patch_size not in self._patches:
            counts = torch.diff(self.offset, prepend=self.offset.new_zeros(1)).tolist()
            self._patches[patch_size] = build_patches(counts, patch_size, self.grid.device)
        return self._patches[patch_size]


def data_depth(grid: torch.Tensor) -> int:
    """The reference's serialization depth of a batch: ``int(grid.max() + 1).bit_length()``
    (``Point.serialization`` with ``depth=None``), computed per level by PT-v3m2."""
    return int(grid.max() + 1).bit_length() if grid.numel() else 1


def _sorted(code: torch.Tensor, orders: tuple[str, ...],
            shuffle: bool) -> tuple[torch.Tensor, tuple[str, ...], torch.Tensor, torch.Tensor]:
    """(O, N) codes -> (code, orders, order, inverse), the O rows permuted when ``shuffle``."""
    if shuffle:
        perm = torch.randperm(code.shape[0])
        code, orders = code[perm.to(code.device)], tuple(orders[i] for i in perm.tolist())
    order = torch.argsort(code, dim=1, stable=True)
    positions = torch.arange(code.shape[1], device=code.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)
    return code, orders, order, inverse


def _sparse(grid: torch.Tensor, offset: torch.Tensor) -> spconv.SparseConvTensor:
    batch = offset_to_batch(offset).int()
    indices = torch.cat([batch[:, None], grid.int()], dim=1).contiguous()
    shape = (grid.max(dim=0).values + SPATIAL_MARGIN).tolist()
    return spconv.SparseConvTensor(grid.new_zeros(len(grid), 1, dtype=torch.float32), indices, shape, len(offset))


def _codes(grid: torch.Tensor, batch: torch.Tensor, depth: int, orders: Sequence[str]) -> torch.Tensor:
    """(O, N) codes of (N, 3) grid coordinates, one row per order name."""
    return torch.stack([encode(grid, batch, depth, o) for o in orders])


def make_level(grid: torch.Tensor, offset: torch.Tensor, orders: Sequence[str], depth: int,
               shuffle: bool) -> Level:
    """Level 0 from (N, 3) non-negative grid coordinates and (B,) offsets; ``depth`` bits per
    axis (``data_depth(grid)`` for the reference's rule)."""
    batch = offset_to_batch(offset)
    code, names, order, inverse = _sorted(_codes(grid, batch, depth, orders), tuple(orders), shuffle)
    return Level(grid.long(), offset, code, order, inverse, depth, names, _sparse(grid, offset))


def pool_level(level: Level, shuffle: bool, reserialize: bool = False) -> Level:
    """The level of half the resolution: voxels merged by ``code >> 3`` (their 2x2x2 cell).

    Coarse rows are sorted by the first order's code, hence in batch order. Codes: the fine
    codes shifted (depth - 1; PT-v3m1), or with ``reserialize`` encoded again from the coarse
    grid at its own data depth (PT-v3m2's GridPooling). A level of depth 0 (every coordinate 0)
    is not merged further, as PT-v3m1 (its pooling depth falls to 0 there).
    """
    shift = 1 if level.depth >= 1 else 0
    code = level.code >> (POOL_SHIFT * shift)
    _, cluster, counts = torch.unique(code[0], sorted=True, return_inverse=True, return_counts=True)
    first = torch.argsort(cluster, stable=True)[torch.cumsum(counts, 0) - counts]  # a voxel per cell
    grid = level.grid[first] >> shift
    batch = offset_to_batch(level.offset)[first]
    offset = torch.cumsum(torch.bincount(batch, minlength=len(level.offset)), 0)
    depth, code = level.depth - shift, code[:, first]
    if reserialize:
        depth = data_depth(grid)
        code = _codes(grid, batch, depth, level.orders)
    code, names, order, inverse = _sorted(code, level.orders, shuffle)
    return Level(grid, offset, code, order, inverse, depth, names, _sparse(grid, offset), cluster)


class DropPath(nn.Module):
    """Stochastic depth per point: zero a residual branch's rows with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class SerializedAttention(nn.Module):
    """Multi-head self-attention inside the patches of one serialization order.

    ``torch.nn.functional.scaled_dot_product_attention`` picks the kernel: flash or
    memory-efficient on CUDA (softmax accumulated in fp32 inside the kernel even for bf16/fp16
    inputs), the CPU flash kernel or the math path on CPU (fp32 inputs on CPU; torch's math path
    upcasts half inputs to fp32 by default), so the softmax is fp32 on every path.

    Args:
        channels: C (divisible by ``num_heads``).
        num_heads: H.
        patch_size: K voxels per patch.
    """

    def __init__(self, channels: int, num_heads: int, patch_size: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels, self.num_heads, self.patch_size = channels, num_heads, patch_size
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, level: Level, order_index: int) -> torch.Tensor:
        """(N, C) features of ``level`` -> (N, C) attended features, same rows."""
        return self.proj(self.attend(self.qkv(x), level, order_index))

    def attend(self, qkv: torch.Tensor, level: Level, order_index: int) -> torch.Tensor:
        """(N, 3C) rows of q, k, v -> (N, C) patch attention before ``proj``, same rows (the
        PEFT stages add their prompt attention here, ``ppt.models.peft.ptv3_block``)."""
        patches = level.patches(self.patch_size)
        h, c = self.num_heads, self.channels
        qkv = qkv[level.order[order_index][patches.gather]]  # (M, 3C) padded serialized
        outs = []
        for start, num, length in patches.groups:
            chunk = qkv[start:start + num * length]
            q, k, v = chunk.reshape(num, length, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)  # (num, H, length, C / H)
            outs.append(out.transpose(1, 2).reshape(num * length, c))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out[patches.scatter[level.inverse[order_index]]]


class MLP(nn.Module):
    """Linear -> GELU -> Linear on (N, C) features, hidden width ``ratio * C``."""

    def __init__(self, channels: int, ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(channels, int(channels * ratio))
        self.fc2 = nn.Linear(int(channels * ratio), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SubmConvBias(nn.Module):
    """Submanifold conv with its bias added outside spconv (spconv 2.3's CPU kernels take no
    bias); parameters and initialisation are spconv's own.

    Args:
        channels: input and output channels.
        kernel_size: kernel edge.
        indice_key: spconv index-cache key.
    """

    def __init__(self, channels: int, kernel_size: int, indice_key: str):
        super().__init__()
        self.conv = spconv.SubMConv3d(channels, channels, kernel_size=kernel_size, bias=True, indice_key=indice_key)
        self.bias = self.conv.bias
        self.conv.bias = None

    def forward(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        """Sparse tensor with (N, C) features -> (N, C) features.

        spconv keeps the index pairs it computes in a COPY of the input's index cache (on the
        output tensor); they are handed back to ``x``'s cache, which ``replace_feature`` shares
        with the level's tensor, so the other convs of the level with this ``indice_key`` (every
        block's CPE, encoder and decoder) reuse them instead of rebuilding them per block."""
        out = self.conv(x)
        key = self.conv.indice_key
        if key is not None and key not in x.indice_dict and key in out.indice_dict:
            x.indice_dict[key] = out.indice_dict[key]
        return out.features + self.bias


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (PT-v3m2's LayerScale): ``x * gamma``, ``gamma``
    initialised to ``init``."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """PTv3 block, pre-norm: x += xCPE(x); x += attn(LN(x)); x += MLP(LN(x)).

    xCPE (conditional positional encoding): 3x3x3 submanifold conv (bias) -> Linear -> LN.
    ``prompt_adapter`` (optional) adds ``adapter(x, ctx)`` to the block input first. With
    ``layer_scale > 0`` both branches are scaled by a LayerScale (``ls1``, ``ls2``; PT-v3m2).

    Args:
        channels: C.
        num_heads: attention heads.
        patch_size: voxels per attention patch.
        mlp_ratio: hidden width of the MLP / C.
        drop_path: stochastic-depth probability of both residual branches.
        ln_layer: builds the block's LayerNorms (called as ``norm(x, ctx)``).
        indice_key: spconv key of the resolution (CPE convs of a level share their indices).
        adapter_layer: optional builder of the prompt adapter.
        layer_scale: initial LayerScale value; 0 = no LayerScale.
    """

    def __init__(self, channels: int, num_heads: int, patch_size: int, mlp_ratio: float, drop_path: float,
                 ln_layer: NormLayer, indice_key: str, adapter_layer: Callable[[int], nn.Module] | None = None,
                 layer_scale: float = 0.0):
        super().__init__()
        self.prompt_adapter = adapter_layer(channels) if adapter_layer is not None else None
        self.cpe_conv = SubmConvBias(channels, CPE_KERNEL, indice_key)
        self.cpe_linear = nn.Linear(channels, channels)
        self.cpe_norm = ln_layer(channels)
        self.norm1 = ln_layer(channels)
        self.attn = SerializedAttention(channels, num_heads, patch_size)
        self.norm2 = ln_layer(channels)
        self.mlp = MLP(channels, mlp_ratio)
        self.drop_path = DropPath(drop_path)
        self.ls1 = LayerScale(channels, layer_scale) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(channels, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, level: Level, ctx: DomainContext, order_index: int,
                cpe_input: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) -> (N, C) features of ``level``.

        ``cpe_input``: (N, C) features the CPE conv reads instead of ``x`` (PT-v3m1's first
        decoder block sees only the projected skip features there; see ``GridUnpooling``).
        """
        if self.prompt_adapter is not None:
            x = x + self.prompt_adapter(x, ctx)
        cpe = self.cpe_conv(level.sparse.replace_feature(x if cpe_input is None else cpe_input))
        x = x + self.cpe_norm(self.cpe_linear(cpe), ctx)
        x = x + self.drop_path(self.ls1(self.attention(self.norm1(x, ctx), level, ctx, order_index)))
        return x + self.drop_path(self.feed_forward(self.norm2(x, ctx), level, ctx))

    # the two branches, hooks of the PEFT stages (``ppt.models.peft.ptv3_block``)
    def attention(self, h: torch.Tensor, level: Level, ctx: DomainContext, order_index: int) -> torch.Tensor:
        """(N, C) normalised features -> (N, C) attention branch (before LayerScale)."""
        return self.attn(h, level, order_index)

    def feed_forward(self, h: torch.Tensor, level: Level, ctx: DomainContext) -> torch.Tensor:
        """(N, C) normalised features -> (N, C) MLP branch (LayerScale included)."""
        return self.ls2(self.mlp(h))


class GridPooling(nn.Module):
    """Stride-2 grid pooling: Linear, max over each 2x2x2 cell, norm, GELU.

    Args:
        in_channels: channels of the finer level.
        out_channels: channels of the coarser level.
        norm_layer: builds the (batch) norm.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor, coarse: Level, ctx: DomainContext) -> torch.Tensor:
        """(N_fine, C_in) -> (N_coarse, C_out); ``coarse.cluster`` maps fine rows to cells."""
        x = self.proj(x)
        index = coarse.cluster[:, None].expand_as(x)
        pooled = x.new_zeros(len(coarse.grid), x.shape[1]).scatter_reduce(0, index, x, "amax", include_self=False)
        return F.gelu(self.norm(pooled, ctx))


class GridUnpooling(nn.Module):
    """Back to the finer level: GELU(norm(Linear(skip))) + GELU(norm(Linear(x)))[cluster].

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder features at the finer level.
        out_channels: output channels.
        norm_layer: builds the (batch) norms.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm_layer: NormLayer):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = norm_layer(out_channels)
        self.proj_skip = nn.Linear(skip_channels, out_channels)
        self.norm_skip = norm_layer(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, coarse: Level,
                ctx: DomainContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_coarse, C_in), (N_fine, C_skip) -> ((N_fine, C_out) output, (N_fine, C_out) the
        projected skip alone: what PT-v3m1's first decoder block reads in its CPE conv, because
        its ``SerializedUnpooling`` adds the coarse features to ``feat`` but not to the sparse
        tensor the conv reads; PT-v3m2's ``GridUnpooling`` refreshes it)."""
        up = F.gelu(self.norm(self.proj(x), ctx))
        skip = F.gelu(self.norm_skip(self.proj_skip(skip), ctx))
        return skip + up[coarse.cluster], skip
