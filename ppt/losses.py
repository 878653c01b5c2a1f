"""Training losses (the loss lives outside the model).

- cross-entropy over the dataset's classes (with the language head's scaled cosine logits this
  is the paper's InfoNCE criterion);
- Lovasz-softmax (Berman et al., CVPR 2018), the convex surrogate of 1 - IoU that the PTv3
  recipe adds to cross-entropy with equal weight.

``train.loss`` chooses among :data:`LOSSES`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ppt.data.classes import IGNORE_INDEX

LOSSES = ("ce", "ce+lovasz")


def _check(logits: torch.Tensor, segment: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(N,) mask of the labelled rows; raises on shape or label-range mistakes."""
    if logits.shape[0] != segment.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but segment has {segment.shape[0]}")
    valid = segment != ignore_index
    if bool(valid.any()):
        top = int(segment[valid].max())
        if top >= logits.shape[1] or int(segment[valid].min()) < 0:
            raise ValueError(f"segment labels must be in [0, {logits.shape[1]}) or {ignore_index}; found {top}")
    return valid


def lovasz_softmax(logits: torch.Tensor, segment: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Lovasz-softmax over the classes present in ``segment`` (the reference's "present").

    For each present class c the errors ``|[y = c] - p_c|`` are sorted in decreasing order and
    weighted by the discrete gradient of the Jaccard loss along that order; the loss is the
    mean over present classes. On one-hot probabilities it equals 1 - mean IoU of those classes.

    Args:
        logits: (N, K) scores (softmax is taken here, in fp32).
        segment: (N,) labels in [0, K) or ``ignore_index``.

    Returns:
        Scalar loss; 0 (connected to the graph) when every label is ignored.
    """
    valid = _check(logits, segment, ignore_index)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    probs = logits[valid].float().softmax(dim=1)
    labels = segment[valid]
    present = torch.unique(labels)                                  # (P,)
    # class-major (P, N') rows: sorting contiguous rows is several times faster than columns
    fg = (present[:, None] == labels[None]).float()                 # (P, N')
    errors = (fg - probs.t()[present]).abs()
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    fg_sorted = fg.gather(1, perm)
    total = fg_sorted.sum(1, keepdim=True)
    intersection = total - fg_sorted.cumsum(1)
    union = total + (1.0 - fg_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union                           # (P, N'), non-decreasing
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (errors_sorted * grad).sum(1).mean()


def segmentation_loss(logits: torch.Tensor, segment: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      kind: str = "ce") -> torch.Tensor:
    """Training loss over the dataset's classes, ignoring ``ignore_index``.

    Args:
        logits: (N, K) scores in the dataset's label order.
        segment: (N,) labels in [0, K) or ``ignore_index``.
        kind: "ce" (cross-entropy) or "ce+lovasz" (cross-entropy + Lovasz-softmax, weights 1, 1).

    Returns:
        Scalar loss (fp32); 0 (still connected to the graph) when every label is ignored.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
    valid = _check(logits, segment, ignore_index)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.float(), segment, ignore_index=ignore_index)
    if kind == "ce+lovasz":
        loss = loss + lovasz_softmax(logits, segment, ignore_index)
    return loss
