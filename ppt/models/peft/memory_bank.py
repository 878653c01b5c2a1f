"""Point-prior memory bank for the Point-PEFT stage (SPEC §8).

One entry per training scene: the encoder-bottom features (N_4, 256 with the default SpUNet
widths; PTv3: the last encoder stage, 512) of the frozen base model, max-pooled over the scene's voxels and L2-normalised. No labels are used.
Built once with a progress bar (the engine feeds the training scenes and caches the bank next to
the experiment: ``ppt.engine.peft_checkpoint``), and stored in PEFT checkpoints (the bank is a
module: its features are a buffer, its scene names extra state).

Retrieval: cosine similarity of the query scene's pooled feature to every entry, the query's
own scene masked out by name (a Mix3D sample "a+b" masks both), top-k entries, softmax weights
at a temperature. The retrieved set per scene is (k + 2, D): [query, weighted sum, top-k].

Deviations from the reference (stated): it masks nothing (a training scene retrieves its own
entry first, which a test scene never can; ``exclude_own=False`` does the same) and its softmax
has no temperature (``temperature=1``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ppt.models.peft.adapters import PeftContext, scatter_max
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.ptv3_layers import pool_level
from ppt.models.spunet import offset_to_batch

MIX_SEPARATOR = "+"  # Mix3D joins the names of merged scenes with this (ppt.data.collate)


class MemoryBank(nn.Module):
    """Pooled, L2-normalised scene features with their scene names.

    Args:
        features: (M, D) entries (normalised here again).
        names: M scene names, unique.
    """

    def __init__(self, features: torch.Tensor, names: Sequence[str]):
        super().__init__()
        if features.ndim != 2 or len(features) != len(names):
            raise ValueError(f"memory bank: features {tuple(features.shape)} must be (M, D) with "
                             f"M = {len(names)} names")
        if len(set(names)) != len(names):
            raise ValueError("memory bank: scene names must be unique")
        self.register_buffer("features", F.normalize(features.float(), dim=-1))
        self.names = list(names)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return len(self.names)

    def get_extra_state(self) -> dict:
        return {"names": self.names}

    def set_extra_state(self, state: dict) -> None:
        self.names = list(state["names"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint's bank may hold a different number of scenes than the placeholder
        key = prefix + "features"
        if key in state_dict:
            self.features = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, names: Sequence[str]) -> torch.Tensor | None:
        """(B, D) stored entries of these scenes, or None if any is not in the bank."""
        index = {n: i for i, n in enumerate(self.names)}
        if not all(n in index for n in names):
            return None
        return self.features[[index[n] for n in names]]

    def exclusion_mask(self, names: Sequence[str]) -> torch.Tensor:
        """(B, M) bool, True where entry m belongs to query scene b (masked out)."""
        index = {n: i for i, n in enumerate(self.names)}
        mask = torch.zeros(len(names), len(self), dtype=torch.bool, device=self.features.device)
        for b, name in enumerate(names):
            for part in name.split(MIX_SEPARATOR):
                if part in index:
                    mask[b, index[part]] = True
        return mask

    def retrieve(self, query: torch.Tensor, names: Sequence[str], k: int = 8, temperature: float = 0.1,
                 exclude_own: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k entries of each query with its own scene masked out.

        Args:
            query: (B, D) pooled features of the batch's scenes.
            names: B scene names (their own entries are excluded).
            k: entries to retrieve (fewer when the bank is smaller).
            temperature: softmax temperature on the cosine similarities (1: the reference's).
            exclude_own: mask the query's own scene (False: the reference's retrieval).

        Returns:
            retrieved (B, k + 2, D) = [query, weighted sum, top-k entries], weights (B, k),
            index (B, k) of the entries.
        """
        query = F.normalize(query.float(), dim=-1)
        sims = query @ self.features.t()
        if exclude_own:
            sims = sims.masked_fill(self.exclusion_mask(names), float("-inf"))
        available = int(torch.isfinite(sims).sum(dim=1).min()) if len(self) else 0
        k = min(k, available)
        if k == 0:
            raise ValueError(f"memory bank of {len(self)} scenes has no entry left to retrieve "
                             f"for scenes {list(names)} once their own entries are excluded")
        top, index = sims.topk(k, dim=1)
        weights = (top / temperature).softmax(dim=1)
        entries = self.features[index]  # (B, k, D)
        summary = torch.einsum("bk,bkd->bd", weights, entries)
        return torch.cat([query[:, None], summary[:, None], entries], dim=1), weights, index


@torch.no_grad()
def pooled_bottom(backbone: nn.Module, x, ctx) -> torch.Tensor:
    """(B, D) max-pooled, L2-normalised encoder-bottom features of sparse input `x` through the
    base backbone (PEFT modules off). `ctx` is the batch's DomainContext."""
    ctx = PeftContext(domain=ctx.domain, prompt=ctx.prompt, enabled=False)
    backbone.set_algo_for(x.features.device)
    x = backbone.stem(x, ctx)
    for stage in backbone.encoder:
        x = stage(x, ctx)
    pooled = scatter_max(x.features, x.indices[:, 0].long(), x.batch_size)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def pooled_bottom_ptv3(backbone: PointTransformerV3, batch: dict, ctx) -> torch.Tensor:
    """(B, D) max-pooled, L2-normalised encoder-bottom features (D = the last encoder width) of
    a batch dict through the base PTv3 (PEFT modules off, orders not shuffled: a scene's entry
    never depends on the training RNG). `ctx` is the batch's DomainContext."""
    ctx = PeftContext(domain=ctx.domain, prompt=ctx.prompt, enabled=False)
    feat = batch["feat"].float()
    backbone.set_algo_for(feat.device)
    training = backbone.training
    backbone.train(False)  # level0 shuffles the orders in training mode
    try:
        with torch.autocast("cpu", enabled=torch.is_autocast_enabled("cpu") and feat.device.type != "cpu"):
            level = backbone.level0(batch)
            x = backbone.stem(feat, level, ctx)
            for stage in backbone.encoder:
                if stage.resample is not None:
                    level = pool_level(level, False, backbone.reserialize)
                    x = stage.resample(x, level, ctx)
                x = backbone._run_blocks(stage, x, level, ctx)
    finally:
        backbone.train(training)
    pooled = scatter_max(x.float(), offset_to_batch(level.offset), len(level.offset))
    return F.normalize(pooled, dim=-1)


def encoder_bottom(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, D) memory-bank features of the scenes of `batch`; `model` is a Segmentor."""
    if isinstance(model.backbone, PointTransformerV3):
        return pooled_bottom_ptv3(model.backbone, batch, model.domain_context(batch))
    return pooled_bottom(model.backbone, model.backbone.sparse_input(batch), model.domain_context(batch))


def build_memory_bank(model: nn.Module, batches: Iterable[dict], total: int | None = None,
                      device: torch.device | str = "cpu", progress: bool = True) -> MemoryBank:
    """Run the frozen base model over `batches` (training scenes, no augmentation, no Mix3D) and
    pool one entry per scene. Scenes seen twice keep their first entry."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    feats, names = [], []
    try:
        for batch in tqdm(batches, total=total, desc="memory bank", disable=not progress):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pooled = encoder_bottom(model, batch).cpu()
            for name, f in zip(batch["name"], pooled):
                if name not in names:
                    names.append(name)
                    feats.append(f)
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("memory bank: no training scenes to build it from")
    return MemoryBank(torch.stack(feats), names)
