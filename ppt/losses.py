"""Training losses (the loss lives outside the model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ppt.data.classes import IGNORE_INDEX


def segmentation_loss(logits: torch.Tensor, segment: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over the dataset's classes, ignoring ``ignore_index``.

    With the language head the logits are scaled cosine similarities to the class texts, so
    this is the InfoNCE criterion of the paper.

    Args:
        logits: (N, K) scores in the dataset's label order.
        segment: (N,) labels in [0, K) or ``ignore_index``.

    Returns:
        Scalar loss (fp32); 0 (still connected to the graph) when every label is ignored.
    """
    if logits.shape[0] != segment.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but segment has {segment.shape[0]}")
    valid = segment != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    top = int(segment[valid].max())
    if top >= logits.shape[1] or int(segment[valid].min()) < 0:
        raise ValueError(f"segment labels must be in [0, {logits.shape[1]}) or {ignore_index}; found {top}")
    return F.cross_entropy(logits.float(), segment, ignore_index=ignore_index)
