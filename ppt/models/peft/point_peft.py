"""Point-PEFT on SpUNet basic blocks and the geometry operators both backbones share (SPEC §8,
"Point-PEFT stage"; Tang et al., AAAI 2024, github.com/Ivan-Tang-3D/Point-PEFT).

The reference's block (its first half of blocks carry prompts):

    x = x + attn(LN1([prompts; x]))                    prompts = dropout(tokens) + prior
    f = MLP(LN2(x));  x = x + f + 0.7 * adapter(f)     adapter on the MLP output
    x = x + 0.3 * propagate(GELU(BN(maxpool(groups + attn'(LN'(groups))))) + 0.3 * centres)
    x = adapter1(x)                                    residual adapter
                                                       groups: k = 16 nearest tokens of sampled
                                                       centres; attn', LN' shared by all blocks

Here, per basic block (``PointPeftAdapter``; PTv3: ``ptv3_point_peft``):
- MLP-output adapter: the residual branch (conv-norm-ReLU-conv-norm, the block's counterpart of
  the MLP) f gets ``0.7 * adapter(f)`` added before the shortcut sum and the final ReLU
  (``spunet_block.PeftBlock`` calls :meth:`PointPeftAdapter.branch`). Adapters are the
  reference's: Linear(C -> 16) -> QuickGELU -> dropout 0.1 -> Linear(16 -> C), no LayerNorm,
  Xavier-initialised down-projection.
- geometry-aware operator (``peft.geo_operator``), on the block output:
  ``knn`` (default, :class:`KnnGeometry`): centres are sampled on the voxel grid (one voxel per
  occupied ``geo_stride``^3 cell), each groups its ``geo_k`` = 16 nearest voxels (exact kNN on
  the voxel grid, :func:`knn_on_grid`); a tiny attention (LayerNorm, qkv C -> 3 x 18, 6 heads,
  proj 18 -> C) shared by the blocks of one width runs inside every group with a residual,
  the group is max-pooled, BatchNorm + GELU, plus 0.3 x the centre's feature, and propagated
  back to every voxel by inverse squared distance weights over its 3 nearest centres, added
  with weight 0.3. ``conv`` (:class:`GeometryAdapter`): this project's earlier operator, a
  bottleneck whose middle is a 3x3x3 submanifold conv on the block's rulebook (or, with
  ``neighbour_attention``, a weight-free attention over the 3x3x3 neighbours).
- output adapter: ``y + adapter1(y)`` (zero-initialised up-projection).
- point-prior prompts (encoder blocks): ``num_tokens`` learnable tokens with prompt dropout
  (``peft.prompt_dropout``, the reference's 0.1; training only), enriched per scene by the
  retrieved set of the memory bank (``memory_bank.py``) through a bottleneck adapter; voxels
  read them through the zero-gated weight-free attention of ``adapters.py``.
- prompt coordinates (``peft.prompt_coords``): the reference's learnable ``prompt_cor``
  (T x 3, N(0, 0.02)) place its prompt tokens among the points, so its geometry operator can
  group and propagate them. Scenes are not normalised to a unit sphere as its objects are, so a
  coordinate is read in the scene's frame (:func:`prompt_positions`): position = scene centre +
  coordinate x half the scene's extent per axis (at the level's resolution). Each prompt token
  is then one more group centre of the ``knn`` operator: its group is the token and its
  ``geo_k - 1`` nearest voxels, and its pooled feature is propagated to every voxel of its scene
  with the same inverse-squared-distance weights as the voxel's nearest centres (normalised
  together), which is how the coordinates get a gradient (the reference's FPS always picks its
  first prompt point as a centre, and its propagation reads every centre). One table shared by
  all blocks, as the reference's.

What trains (``peft.train_biases``, the reference's fine-tuning set): the adapters, prompts,
prompt coordinates, geometry operators, the head, and the blocks' biases: norm1 / norm2 biases
(SpUNet: the target dataset's BatchNorm shifts; the convs have no bias) and, on PTv3, the
attention projection and MLP fc1 / fc2 biases. The reference also trains its final LayerNorm
(neither backbone has one) and its cls token / head.

The block with its adapters is recomputed in backward as a whole (``spunet_block.PeftBlock``);
with that off, each adapter is recomputed on its own (``adapters.recompute``). The grouped
attention runs in chunks of ``GROUP_CHUNK`` centres, each recomputed in backward, so its
(centres x k x C) tensors never exist whole.

Deviations from the reference (stated; both backbones):
1. Every new branch starts silent, so the adapted model starts as the base model (a
   requirement of every stage here): the adapters' up-projections are zero (reference: Xavier)
   and the geometry operator's delta is multiplied by a zero-initialised gate (the reference
   has a zero-initialised ``ad_gate`` per block that it trains but never uses).
2. Centres are one voxel per occupied ``geo_stride``^3 grid cell instead of farthest point
   sampling (64 of 128 tokens there; FPS over tens of thousands of voxels per level is too slow
   on a CPU); propagation reads each voxel's 3 nearest centres (PointNet++'s feature
   propagation, which the reference defines) instead of all 64 centres. The reference's
   stochastic depth inside the group attention is left out.
3. Prompt tokens are centres of their own groups only, not candidate members of the voxels'
   groups; on the SpUNet they are read by a zero-gated weight-free attention (no attention
   layer to insert them into) after the block, on PTv3 as zero-gated extra keys/values
   (``ptv3_block``); they are not updated by the block.
4. Prompts are built from the retrieved set by a bottleneck adapter (LayerNorm, Xavier,
   QuickGELU, ``prior_rank`` wide) whose output the tokens read by a weight-free attention
   (the reference: token i = learnable token i + item i + adapter(item i), for its 10 tokens =
   query, weighted sum, top-8); learnable tokens start at N(0, 1) (reference: N(0, 0.02)) so
   the weight-free reader's gate gets a usable gradient.
5. Retrieval masks the query's own scene (a training scene would otherwise retrieve itself,
   and a test scene never can; ``peft.exclude_own``) and its softmax has a temperature
   (``peft.temperature``; 1 gives the reference's weights).
6. Prompts sit in every encoder block (the reference: its first 6 of 12 blocks), and the
   shared group attention is one per channel width (the reference: one for its 12
   equal-width blocks); with ``recompute_blocks`` the adapter BatchNorm's running statistics
   are updated twice per step (forward and recomputation: the same batch statistics, so
   outputs and gradients are unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import spconv.pytorch as spconv

from ppt.models.peft.adapters import (
    INIT_STD, BottleneckAdapter, GatedPromptReader, PeftContext, brute_knn, grid_centres, knn_on_grid,
    neighbour_attention, neighbour_edges, quick_gelu, recompute, scatter_max, scatter_mean,
)

MLP_ADAPTER_WEIGHT = 0.7   # x + f + 0.7 * adapter(f)
CENTRE_WEIGHT = 0.3        # pooled group + 0.3 * centre feature
PROPAGATION_WEIGHT = 0.3   # x + 0.3 * propagated
GROUP_DIM, GROUP_HEADS = 18, 6  # the reference's shared group attention: qkv C -> 3 x 18, 6 heads
PROPAGATION_NEIGHBOURS = 3      # nearest centres each voxel reads
DIST_EPS = 1e-8            # inverse squared distance weights 1 / (d^2 + eps), as the reference
GROUP_CHUNK = 1024         # centres per chunk of the group attention
GROUP_CHECKPOINT = 1 << 22  # groups x k x C above this: each chunk is recomputed in backward


def xavier_init(weight: torch.Tensor) -> None:
    """The reference adapters' down-projection init."""
    nn.init.xavier_uniform_(weight)


def point_adapter(channels: int, rank: int, dropout: float) -> BottleneckAdapter:
    """The reference's adapter: Linear(C -> r) -> QuickGELU -> dropout -> Linear(r -> C), no
    LayerNorm; up-projection zero-initialised here (deviation 1)."""
    return BottleneckAdapter(channels, channels, rank, dropout, norm=False, activation=quick_gelu,
                             init_down=xavier_init)


@dataclass
class LevelGroups:
    """The ``knn`` operator's groups of one resolution (shared by its blocks, cached per forward).

    Attributes:
        centres: (S,) rows of the centres.
        members: (S, k) rows of each centre's k nearest voxels (the centre first).
        near: (N, P) index into ``centres`` of each voxel's P nearest centres.
        inv_dist: (N, P) 1 / (squared distance + eps) to them (0 for a missing one).
    """

    centres: torch.Tensor
    members: torch.Tensor
    near: torch.Tensor
    inv_dist: torch.Tensor


def level_groups(coords: torch.Tensor, batch: torch.Tensor, k: int, stride: int) -> LevelGroups:
    """Centres, groups and propagation neighbours of voxels ``coords`` (N, 3) int, ``batch`` (N,)."""
    centres = grid_centres(coords, batch, stride)
    members, _ = knn_on_grid(coords[centres], batch[centres], coords, batch, k)
    near, d2 = knn_on_grid(coords, batch, coords[centres], batch[centres], PROPAGATION_NEIGHBOURS)
    return LevelGroups(centres, members, near, 1.0 / (d2 + DIST_EPS))


def prompt_positions(coords: torch.Tensor, batch: torch.Tensor, num_scenes: int,
                     prompt_coords: torch.Tensor) -> torch.Tensor:
    """Prompt coordinates (T, 3) read in each scene's frame -> (B, T, 3) positions on the level's
    grid: scene centre + coordinate x half the scene's extent per axis."""
    xyz = coords.float()
    centre = scatter_mean(xyz, batch, num_scenes)
    half = (scatter_max(xyz, batch, num_scenes) + scatter_max(-xyz, batch, num_scenes)) / 2
    return centre[:, None] + half[:, None] * prompt_coords[None].to(xyz.dtype)


# --- the reference's geometry operator (knn) ---------------------------------------------------

class AdapterBatchNorm(nn.BatchNorm1d):
    """A BatchNorm of a PEFT module: it trains with batch statistics in training mode (the
    stages keep the base model's BatchNorms on their running statistics, not this one)."""


class GroupAttention(nn.Module):
    """The reference's attention inside a group (``attn1`` / ``norm3``), shared by blocks.

    LayerNorm -> qkv Linear(C -> 3 x 18, no bias) -> 6 heads of 3 -> softmax(q k / sqrt(18)) v
    -> proj Linear(18 -> C); nn.Linear's own init, as the reference's new layers.

    Args:
        channels: C.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * GROUP_DIM, bias=False)
        self.proj = nn.Linear(GROUP_DIM, channels)

    def pool(self, feats: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """feats (M, C), members (G, k) rows -> (G, C): max over each group of
        ``member + attention(group)``, in chunks of ``GROUP_CHUNK`` groups. While autograd
        records, the per-row qkv is recomputed in backward (its LayerNorm output is not kept),
        and so is every chunk when the groups hold more than ``GROUP_CHECKPOINT`` values (also
        nested in a recomputed block: one chunk's (chunk, k, C) tensors exist at a time)."""
        grad = torch.is_grad_enabled()
        qkv = checkpoint(self._qkv, feats, use_reentrant=False) if grad else self._qkv(feats)
        chunked = grad and members.numel() * feats.shape[1] > GROUP_CHECKPOINT
        out = []
        for start in range(0, len(members), GROUP_CHUNK):
            idx = members[start:start + GROUP_CHUNK]
            out.append(checkpoint(self._pool, feats, qkv, idx, use_reentrant=False) if chunked
                       else self._pool(feats, qkv, idx))
        return torch.cat(out) if len(out) != 1 else out[0]

    def _qkv(self, feats: torch.Tensor) -> torch.Tensor:
        return self.qkv(self.norm(feats))  # per row; gathered per group by _pool

    def _pool(self, feats: torch.Tensor, qkv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g, k = idx.shape
        q, key, v = qkv[idx].reshape(g, k, 3, GROUP_HEADS, GROUP_DIM // GROUP_HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, key, v, scale=1 / math.sqrt(GROUP_DIM))  # (g, H, k, d)
        grouped = feats[idx] + self.proj(attended.transpose(1, 2).reshape(g, k, GROUP_DIM))
        return grouped.max(1).values  # (max keeps only its indices for backward; amax keeps its input)


class KnnGeometry(nn.Module):
    """The reference's geometry-aware operator on one block (see the module docstring).

    Args:
        channels: C.
        attention: the :class:`GroupAttention` shared by the blocks of this width.
        k: voxels per group (the reference's 16).
        stride: centre sampling cell, in voxels of the level.
    """

    def __init__(self, channels: int, attention: GroupAttention, k: int = 16, stride: int = 2):
        super().__init__()
        self.attention = attention
        self.norm = AdapterBatchNorm(channels)  # the reference's out_transform: BN + GELU
        self.gate = nn.Parameter(torch.zeros(1))  # deviation 1: silent at step 0
        self.k, self.stride = k, stride

    def forward(self, y: torch.Tensor, coords: torch.Tensor, batch: torch.Tensor, num_scenes: int,
                ctx: PeftContext, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Block output y (N, C), voxel coords (N, 3) int, scene index batch (N,), the block's
        prompt tokens (B, T, C) or None -> (N, C) delta to add."""
        key = ("knn", coords.data_ptr(), len(coords), self.k, self.stride)
        if key not in ctx.cache:
            ctx.cache[key] = level_groups(coords, batch, self.k, self.stride)
        groups = ctx.cache[key]
        table, members, centres = y, groups.members, groups.centres
        prompt = tokens is not None and ctx.prompt_coords is not None
        if prompt:  # each prompt token: one more centre, grouped with its k - 1 nearest voxels
            b, t, c = tokens.shape
            pos = prompt_positions(coords, batch, num_scenes, ctx.prompt_coords)  # (B, T, 3)
            rows = len(y) + torch.arange(b * t, device=y.device)
            near = _prompt_members(coords, batch, pos.detach(), self.k - 1)
            table = torch.cat([y, tokens.reshape(b * t, c).to(y.dtype)])
            members = torch.cat([members, torch.cat([rows[:, None], near], 1)])
            centres = torch.cat([centres, rows])
        pooled = self.attention.pool(table, members)
        # the gate and the weight 0.3 on the centres' features: propagation is linear in them
        vis = (self.gate * PROPAGATION_WEIGHT) * (F.gelu(self.norm(pooled)) + CENTRE_WEIGHT * table[centres])
        num = sum(groups.inv_dist[:, j, None] * vis[groups.near[:, j]] for j in range(groups.near.shape[1]))
        den = groups.inv_dist.sum(1, keepdim=True)
        if prompt:  # every voxel reads its scene's prompt centres, weighted as its nearest centres
            d2 = ((coords.float()[:, None] - pos[batch]) ** 2).sum(-1)  # (N, T), gradient to the coords
            weights = (1.0 / (d2 + DIST_EPS))[:, None] * F.one_hot(batch, b).to(d2.dtype)[:, :, None]  # (N, B, T)
            num = num + torch.einsum("nbt,btc->nc", weights, vis[len(groups.centres):].reshape(b, t, c))
            den = den + weights.sum((1, 2))[:, None]
        return num / den


def _prompt_members(coords: torch.Tensor, batch: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """(B * T, k) rows of the k nearest voxels of every prompt position (B, T, 3), per scene."""
    b, t, _ = pos.shape
    out = []
    for s in range(b):
        rows = torch.nonzero(batch == s).squeeze(1)
        out.append(brute_knn(pos[s], coords[rows].float(), k, rows)[0])
    return torch.cat(out)


# --- this project's earlier operator (conv) ----------------------------------------------------

class GeometryAdapter(nn.Module):
    """Bottleneck adapter whose middle mixes each voxel with its spatial neighbours.

    Args:
        in_channels: block input channels C_in.
        out_channels: block output channels C_out.
        rank: bottleneck width r.
        indice_key: the block's spconv indice key (rulebook reuse).
        neighbour_attention: weight-free neighbour attention instead of the 3x3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, indice_key: str,
                 neighbour_attention: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.down = nn.Linear(in_channels, rank)
        nn.init.trunc_normal_(self.down.weight, std=INIT_STD)
        nn.init.zeros_(self.down.bias)
        self.conv = None
        if not neighbour_attention:
            self.conv = spconv.SubMConv3d(rank, rank, 3, padding=1, bias=False, indice_key=indice_key)
            nn.init.trunc_normal_(self.conv.weight, std=INIT_STD)
        self.up = nn.Linear(rank, out_channels)
        nn.init.zeros_(self.up.weight)  # silent at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, x: spconv.SparseConvTensor, out: spconv.SparseConvTensor,
                ctx: PeftContext) -> torch.Tensor:
        """Block input x (N, C_in), block output out (same active set) -> (N, C_out) delta."""
        h = F.gelu(self.down(self.norm(x.features)))
        if self.conv is not None:
            # `out` carries the block's rulebook under the shared indice_key: no new pairs
            h = self.conv(out.replace_feature(h)).features
        else:
            key = ("neighbours", out.indices.data_ptr(), out.indices.shape[0])
            if key not in ctx.cache:
                ctx.cache[key] = neighbour_edges(out.indices)
            h = neighbour_attention(h, *ctx.cache[key])
        return self.up(F.gelu(h))


def prior_prompt_tokens(tokens: torch.Tensor, prior: nn.Module, retrieved: torch.Tensor) -> torch.Tensor:
    """Learnable tokens (T, C) + weight-free attention of the tokens over the adapted retrieved
    set ``prior(retrieved)`` ((B, R, D) -> (B, R, C)) -> per-scene prompt tokens (B, T, C)."""
    items = prior(retrieved)  # (B, R, C)
    scores = torch.einsum("tc,brc->btr", tokens, items) / math.sqrt(items.shape[-1])
    return tokens[None] + torch.einsum("btr,brc->btc", scores.softmax(-1), items)


class PointPeftParts(nn.Module):
    """What a Point-PEFT module holds on either backbone: MLP-output adapter, geometry operator,
    output adapter, prompt tokens (see the module docstring).

    Args:
        channels: block output channels C.
        prior_dim: width D of the memory-bank features.
        num_tokens: learnable prompt tokens; 0 disables the prompts (decoder blocks).
        prior_rank: bottleneck width of the retrieved-set adapter.
        adapter_rank: width of the MLP-output and output adapters (the reference's 16).
        dropout: the adapters' dropout (the reference's 0.1).
        prompt_dropout: dropout on the learnable tokens (the reference's 0.1).
        geometry: the block's geometry operator (:class:`KnnGeometry` or :class:`GeometryAdapter`).
    """

    def __init__(self, channels: int, prior_dim: int, num_tokens: int, prior_rank: int, adapter_rank: int,
                 dropout: float, prompt_dropout: float, geometry: nn.Module):
        super().__init__()
        self.mlp_adapter = point_adapter(channels, adapter_rank, dropout)
        self.geometry = geometry
        self.out_adapter = point_adapter(channels, adapter_rank, dropout)
        self.ssf = None
        self.tokens = self.prior = self.prompt_drop = None
        if num_tokens > 0:
            # N(0, 1) like the domain prompt table (deviation 4)
            self.tokens = nn.Parameter(torch.randn(num_tokens, channels))
            self.prior = BottleneckAdapter(prior_dim, channels, prior_rank, activation=quick_gelu,
                                           init_down=xavier_init)
            self.prompt_drop = nn.Dropout(prompt_dropout)

    def prompt_tokens_of(self, ctx: PeftContext) -> torch.Tensor:
        """Retrieved set of ``ctx`` (B, R, D) -> per-scene prompt tokens (B, T, C) (prompt
        dropout in training)."""
        if ctx.retrieved is None:
            raise ValueError("Point-PEFT prompts need the retrieved set (ctx.retrieved); "
                             "apply the stage with a memory bank")
        tokens = self.prompt_drop(self.tokens)
        return prior_prompt_tokens(tokens, self.prior, ctx.retrieved.to(tokens.dtype))

    def mlp_output_delta(self, f: torch.Tensor, ctx: PeftContext) -> torch.Tensor:
        """(N, C) MLP (residual branch) output -> ``0.7 * adapter(f)``."""
        return MLP_ADAPTER_WEIGHT * recompute(self.mlp_adapter, f, enabled=ctx.recompute_branches)

    def knn_then_adapter(self, y: torch.Tensor, coords: torch.Tensor, batch: torch.Tensor, num_scenes: int,
                         ctx: PeftContext, tokens: torch.Tensor | None) -> torch.Tensor:
        """Block output (N, C) -> + kNN geometry delta, then + output adapter."""
        y = y + recompute(lambda feats, toks: self.geometry(feats, coords, batch, num_scenes, ctx, toks),
                          y, tokens, enabled=ctx.recompute_branches)
        return y + recompute(self.out_adapter, y, enabled=ctx.recompute_branches)


class PointPeftAdapter(PointPeftParts):
    """Point-PEFT module of one basic block.

    Args:
        in_channels: block input channels C_in.
        out_channels: block output channels C_out.
        indice_key: the block's spconv indice key (``conv`` operator).
        prior_dim, num_tokens, prior_rank, adapter_rank, dropout, prompt_dropout: see
            :class:`PointPeftParts`.
        geo_attention: the shared group attention of this width (``knn`` operator), or None
            for the ``conv`` operator.
        geo_k, geo_stride: see :class:`KnnGeometry`.
        geo_reduction: ``conv`` operator r = max(min_rank, C_out // geo_reduction).
        min_rank: smallest bottleneck width of the ``conv`` operator.
        neighbour_attention: see :class:`GeometryAdapter`.
    """

    def __init__(self, in_channels: int, out_channels: int, indice_key: str, prior_dim: int = 256,
                 num_tokens: int = 10, prior_rank: int = 8, adapter_rank: int = 16, dropout: float = 0.1,
                 prompt_dropout: float = 0.1, geo_attention: GroupAttention | None = None, geo_k: int = 16,
                 geo_stride: int = 2, geo_reduction: int = 12, min_rank: int = 8, neighbour_attention: bool = False):
        if geo_attention is not None:
            geometry = KnnGeometry(out_channels, geo_attention, geo_k, geo_stride)
        else:  # C_out: a decoder block's concat input is wide
            rank = max(min_rank, out_channels // geo_reduction)
            geometry = GeometryAdapter(in_channels, out_channels, rank, indice_key, neighbour_attention)
        super().__init__(out_channels, prior_dim, num_tokens, prior_rank, adapter_rank, dropout, prompt_dropout,
                         geometry)
        self.reader = GatedPromptReader() if num_tokens > 0 else None

    def branch(self, f: torch.Tensor, ctx: PeftContext) -> torch.Tensor:
        """The residual branch's output f (N, C_out) -> delta added to it (``PeftBlock``)."""
        return self.mlp_output_delta(f, ctx)

    def forward(self, x: spconv.SparseConvTensor, out: spconv.SparseConvTensor,
                ctx: PeftContext) -> torch.Tensor:
        """Block input x (N, C_in), block output out (N, C_out) -> adapted (N, C_out) features."""
        batch = out.indices[:, 0].long()
        tokens = self.prompt_tokens_of(ctx) if self.tokens is not None else None
        y = out.features
        if isinstance(self.geometry, KnnGeometry):
            y = self.knn_then_adapter(y, out.indices[:, 1:], batch, out.batch_size, ctx, tokens)
        else:
            y = y + recompute(lambda feats: self.geometry(x.replace_feature(feats), out, ctx),
                              x.features, enabled=ctx.recompute_branches)
            y = y + recompute(self.out_adapter, y, enabled=ctx.recompute_branches)
        if tokens is None:
            return y
        return y + recompute(self.reader, y, tokens, batch, enabled=ctx.recompute_branches)
