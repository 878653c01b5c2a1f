"""Shared PEFT pieces on concatenated voxel features (N, C) with a batch index (N,).

- :func:`scatter_mean`: per-scene mean of voxel features (the DAPT internal prompt).
- :class:`BottleneckAdapter`: [LayerNorm ->] Linear(C -> r) -> GELU -> dropout -> Linear(r -> C_out),
  the up-projection zero-initialised so the adapter starts silent (DAPT's adapter with its
  LayerNorm; Point-PEFT's without, with QuickGELU).
- :class:`ScaleShift`: DAPT's SSF, a per-channel ``x * scale + shift`` (identity at start).
- :func:`prompt_attention`: weight-free attention of every voxel over its own scene's prompt
  tokens (softmax of scaled dot products; keys = values = the tokens).
- :class:`GatedPromptReader`: that attention times one zero-initialised scalar gate.
- :func:`recompute`: activation checkpointing of an adapter branch.
- :func:`knn_on_grid`: exact k nearest voxels on the voxel grid (Point-PEFT's groups);
  :func:`grid_centres`: one voxel per occupied grid cell; :func:`neighbour_edges` /
  :func:`neighbour_attention`: the 3x3x3 active neighbours and a weight-free attention over them.
- :class:`PeftContext`: the per-forward state blocks share (internal prompts, retrieved set).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ppt.models.spunet import DomainContext

INIT_STD = 0.02  # as the backbone (SPEC §3)
MIN_RANK = 8
SEARCH_RADIUS = 8          # grid kNN: exact within this radius (voxels), brute force beyond
BRUTE_ELEMENTS = 1 << 22   # distances per chunk of the brute-force kNN


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``: the GELU approximation of Point-PEFT's adapters (CLIP's QuickGELU)."""
    return x * torch.sigmoid(1.702 * x)


def kaiming_init(weight: torch.Tensor) -> None:
    """nn.Linear's own weight init, ``kaiming_uniform_(a=sqrt(5))`` (DAPT's down-projection and
    dynamic scale)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def bottleneck_rank(channels: int, reduction: int = 6, min_rank: int = MIN_RANK) -> int:
    """Bottleneck width r = max(min_rank, channels // reduction)."""
    return max(min_rank, channels // reduction)


def scatter_mean(x: torch.Tensor, batch: torch.Tensor, num_scenes: int) -> torch.Tensor:
    """Per-scene mean: x (N, C), batch (N,) int in [0, B) -> (B, C); empty scenes give zeros."""
    out = x.new_zeros(num_scenes, x.shape[1]).index_add_(0, batch, x)
    count = torch.bincount(batch, minlength=num_scenes).clamp_(min=1).to(x.dtype)
    return out / count[:, None]


def scatter_max(x: torch.Tensor, batch: torch.Tensor, num_scenes: int) -> torch.Tensor:
    """Per-scene max: x (N, C), batch (N,) -> (B, C); empty scenes give zeros."""
    out = x.new_full((num_scenes, x.shape[1]), float("-inf"))
    out = out.scatter_reduce(0, batch[:, None].expand_as(x), x, reduce="amax", include_self=True)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def recompute(fn, *args, enabled: bool = True):
    """``fn(*args)``; while autograd records (and `enabled`), its inner activations are
    recomputed in backward instead of kept (non-reentrant activation checkpointing; dropout
    masks are replayed). `enabled` is False inside a region that is recomputed as a whole
    (``PeftContext.recompute_branches``), where a nested checkpoint would only add a third run."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def prompt_attention(x: torch.Tensor, tokens: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Weight-free attention of voxels over their scene's tokens.

    Args:
        x: (N, C) voxel features (queries).
        tokens: (B, T, C) prompt tokens of each scene (keys and values).
        batch: (N,) scene index of every voxel.

    Returns:
        (N, C): sum_t softmax_t(x . tokens[b, t] / sqrt(C)) tokens[b, t] with b = batch[n].
    """
    # Gathering tokens[batch] would be (N, T, C); scoring every voxel against every scene's
    # tokens is (N, B, T) and B is small, so that is the cheaper layout.
    scores = torch.einsum("nc,btc->nbt", x, tokens) / math.sqrt(x.shape[1])
    weights = scores.softmax(dim=-1) * F.one_hot(batch, tokens.shape[0]).to(x.dtype)[:, :, None]
    return torch.einsum("nbt,btc->nc", weights, tokens)


class BottleneckAdapter(nn.Module):
    """[LayerNorm ->] Linear(C_in -> r) -> activation -> dropout -> Linear(r -> C_out), zero-init output.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        rank: bottleneck width r.
        dropout: dropout after the activation.
        norm: LayerNorm on the input (DAPT's adapter has it, Point-PEFT's have not).
        activation: GELU (DAPT) or :func:`quick_gelu` (Point-PEFT).
        init_down: initialises the down-projection weight (its bias starts at zero); default
            ``kaiming_init`` (DAPT's, nn.Linear's own).
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, dropout: float = 0.0,
                 norm: bool = True, activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu,
                 init_down: Callable[[torch.Tensor], None] = kaiming_init):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels) if norm else nn.Identity()
        self.down = nn.Linear(in_channels, rank)
        self.activation = activation
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(rank, out_channels)
        init_down(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # silent at step 0
        nn.init.zeros_(self.up.bias)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(N, C_in) already normalised -> (N, C_out): the adapter after its LayerNorm."""
        return self.up(self.drop(self.activation(self.down(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in) -> (N, C_out)."""
        return self.project(self.norm(x))


class ScaleShift(nn.Module):
    """SSF (scale-and-shift features; DAPT's ``tfts`` parameters): ``x * scale + shift`` per channel.

    Starts as the identity (scale 1, shift 0), so the adapted model starts as the base model;
    the reference draws them from N(1, 0.02) and N(0, 0.02).

    Args:
        channels: C of the (..., C) input.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def scale_shift(ssf: nn.ModuleDict | None, name: str, x: torch.Tensor) -> torch.Tensor:
    """``ssf[name](x)``, or x unchanged without SSF (or without that entry)."""
    return ssf[name](x) if ssf is not None and name in ssf else x


class GatedPromptReader(nn.Module):
    """`gate * prompt_attention(x, tokens, batch)` with one zero-initialised scalar gate.

    The attention has no weights (queries, keys and values are the features themselves), so a
    block pays one parameter to read any number of prompts.
    """

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """x (N, C), tokens (B, T, C), batch (N,) -> (N, C) delta."""
        return self.gate * prompt_attention(x, tokens, batch)


def _keys(batch: torch.Tensor, xyz: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Hash of (batch, x, y, z): batch (...), xyz (..., 3) -> (...) int64."""
    xyz = xyz - lo
    return ((batch * span[0] + xyz[..., 0]) * span[1] + xyz[..., 1]) * span[2] + xyz[..., 2]


@functools.lru_cache(maxsize=4)
def _shells(radius: int) -> tuple[tuple[int, torch.Tensor], ...]:
    """Integer offsets with |o|^2 <= radius^2, grouped by |o|^2 ascending: ((d2, (m, 3)), ...)."""
    r = torch.arange(-radius, radius + 1)
    offsets = torch.cartesian_prod(r, r, r)
    d2 = (offsets ** 2).sum(1)
    return tuple((int(v), offsets[d2 == v]) for v in torch.unique(d2) if v <= radius ** 2)


def knn_on_grid(query: torch.Tensor, query_batch: torch.Tensor, ref: torch.Tensor, ref_batch: torch.Tensor,
                k: int, radius: int = SEARCH_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest reference voxels of every query voxel of the same scene, exact.

    Offsets are scanned shell by shell (equal |o|^2, ascending) on a hash of the reference
    voxels; a query is done once it has k hits, which are then its k nearest (every voxel not
    yet scanned is farther). Queries short of k within ``radius`` get a brute-force search over
    their scene (chunks of ``BRUTE_ELEMENTS`` distances). Memory: O(Q k) besides the hash.

    Args:
        query: (Q, 3) integer coordinates; query_batch: (Q,) scene index.
        ref: (R, 3) integer coordinates of the same grid, unique per scene; ref_batch: (R,).
        k: neighbours per query.

    Returns:
        index (Q, k) long rows of ``ref`` and squared distances (Q, k) float, nearest first; a
        scene with fewer than k reference voxels repeats its nearest one at distance inf.
    """
    q, r, qb, rb = query.long(), ref.long(), query_batch.long(), ref_batch.long()
    n = len(q)
    index = q.new_zeros(n, k)
    dist2 = torch.full((n, k), float("inf"), device=q.device)
    count = q.new_zeros(n)
    if n == 0:
        return index, dist2
    lo = torch.minimum(q.min(0).values, r.min(0).values) - radius
    span = torch.maximum(q.max(0).values, r.max(0).values) + radius + 1 - lo
    sorted_keys, order = torch.sort(_keys(rb, r, lo, span))
    active = torch.arange(n, device=q.device)
    for d2, offsets in _shells(radius):  # one shell at a time: (active, offsets) lookups
        offsets = offsets.to(q.device)
        key = _keys(qb[active, None], q[active, None] + offsets[None], lo, span)  # (A, m)
        pos = torch.searchsorted(sorted_keys, key).clamp_(max=len(sorted_keys) - 1)
        hit = sorted_keys[pos] == key
        slot = count[active, None] + hit.cumsum(1) - 1  # hits fill the free slots in offset order
        take = hit & (slot < k)
        rows = active[:, None].expand_as(take)[take]
        index[rows, slot[take]] = order[pos[take]]
        dist2[rows, slot[take]] = float(d2)
        count[active] = torch.clamp(count[active] + hit.sum(1), max=k)
        active = active[count[active] < k]
        if len(active) == 0:
            return index, dist2
    for b in torch.unique(qb[active]).tolist():  # short of k within the radius: brute force
        rows, cand = active[qb[active] == b], torch.nonzero(rb == b).squeeze(1)
        index[rows], dist2[rows] = brute_knn(q[rows].float(), r[cand].float(), k, cand)
    return index, dist2


def brute_knn(query: torch.Tensor, ref: torch.Tensor, k: int,
              ref_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, 3), (R, 3) float -> (Q, k) rows (``ref_rows[j]``) and squared distances, nearest first;
    short of k: the nearest repeated at distance inf."""
    if len(ref) == 0:
        raise ValueError("kNN: a scene has no reference points")
    kk = min(k, len(ref))
    index, dist2 = [], []
    step = max(1, BRUTE_ELEMENTS // len(ref))
    for start in range(0, len(query), step):
        d = torch.cdist(query[start:start + step], ref, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        top = d.topk(kk, dim=1, largest=False)
        index.append(ref_rows[top.indices])
        dist2.append(top.values)
    index, dist2 = torch.cat(index), torch.cat(dist2)
    if kk < k:
        index = torch.cat([index, index[:, :1].expand(-1, k - kk)], 1)
        dist2 = torch.cat([dist2, dist2.new_full((len(dist2), k - kk), float("inf"))], 1)
    return index, dist2


def grid_centres(coords: torch.Tensor, batch: torch.Tensor, stride: int) -> torch.Tensor:
    """(S,) rows of the group centres: the first voxel (lowest row) of every occupied
    ``stride``^3 cell of each scene (the voxel grid's farthest point sampling)."""
    cell = torch.div(coords.long(), stride, rounding_mode="floor")
    lo = cell.min(0).values
    _, inverse = torch.unique(_keys(batch.long(), cell, lo, cell.max(0).values - lo + 1), return_inverse=True)
    rows = torch.arange(len(coords), device=coords.device)
    return rows.new_full((int(inverse.max()) + 1,), len(coords)).scatter_reduce(0, inverse, rows, "amin")


NEIGHBOUR_RADIUS = 1  # 3x3x3 neighbourhood, as the block's own convolutions


def neighbour_edges(indices: torch.Tensor, radius: int = NEIGHBOUR_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges between active voxels at L-inf distance <= radius (self loops included).

    Args:
        indices: (N, 4) int (batch, x, y, z) of the active voxels.

    Returns:
        src, dst: (E,) long; voxel src is a neighbour of voxel dst.
    """
    idx = indices.long()
    span = idx[:, 1:].max(dim=0).values + 2 * radius + 1
    shifted = idx[:, 1:] + radius

    def encode(batch, xyz):
        return ((batch * span[0] + xyz[:, 0]) * span[1] + xyz[:, 1]) * span[2] + xyz[:, 2]

    keys = encode(idx[:, 0], shifted)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    r = torch.arange(-radius, radius + 1, device=idx.device)
    offsets = torch.cartesian_prod(r, r, r)
    src, dst = [], []
    for off in offsets:
        query = encode(idx[:, 0], shifted + off)
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=len(keys) - 1)
        hit = sorted_keys[pos] == query
        src.append(order[pos][hit])
        dst.append(torch.nonzero(hit).squeeze(1))
    return torch.cat(src), torch.cat(dst)


def neighbour_attention(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Weight-free attention of each voxel over its neighbours: h (N, r) -> (N, r)."""
    scores = (h[dst] * h[src]).sum(-1) / math.sqrt(h.shape[1])
    peak = torch.full_like(h[:, 0], float("-inf")).scatter_reduce(0, dst, scores, "amax")
    weights = torch.exp(scores - peak[dst])
    total = torch.zeros_like(h[:, 0]).index_add_(0, dst, weights)
    out = torch.zeros_like(h).index_add_(0, dst, weights[:, None] * h[src])
    return out / total[:, None]


@dataclass
class PeftContext(DomainContext):
    """The backbone's DomainContext plus per-forward PEFT state.

    Built fresh by the PEFT backbone at every forward and passed down with the domain context
    (never stored on a module), so the blocks of one forward share it and nothing leaks into the
    next forward.

    Attributes:
        enabled: False runs the plain base model (memory-bank features, silence checks).
        prompts: stage index -> internal prompts (B, C) appended by that stage's blocks (DAPT).
        retrieved: (B, R, D) point-prior set per scene (Point-PEFT), or None.
        prompt_coords: (T, 3) learnable prompt coordinates shared by every block (Point-PEFT's
            ``prompt_cor``; ``point_peft.prompt_positions``), or None.
        cache: per-forward scratch shared by blocks of one level (neighbour lists).
        recompute_branches: adapters recompute their inner activations in backward; False
            while the whole block is recomputed (``spunet_block.PeftBlock``).
    """

    enabled: bool = True
    prompts: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    retrieved: torch.Tensor | None = None
    prompt_coords: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)
    recompute_branches: bool = True
