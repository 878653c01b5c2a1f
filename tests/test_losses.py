"""Losses: Lovasz-softmax against a hand-computed case and its defining property, and the
``train.loss`` choices of ``segmentation_loss``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppt.losses import lovasz_softmax, segmentation_loss
from ppt.models.heads import LanguageHead


def test_lovasz_softmax_hand_computed_case():
    # probabilities (class 0, class 1) of 3 labelled points and one ignored point
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1, -1])
    # class 0: errors |fg - p0| = 0.2, 0.6, 0.3 -> sorted 0.6 (fg 1), 0.3 (fg 0), 0.2 (fg 1);
    #   Jaccard along the order 1/2, 2/3, 1 -> increments 1/2, 1/6, 1/3; loss 0.3 + 0.05 + 1/15 = 5/12
    # class 1: errors 0.2, 0.6, 0.3 -> sorted 0.6 (fg 0), 0.3 (fg 1), 0.2 (fg 0);
    #   Jaccard 1/2, 1, 1 -> increments 1/2, 1/2, 0; loss 0.3 + 0.15 = 9/20
    # mean over the present classes: (5/12 + 9/20) / 2 = 13/30
    loss = lovasz_softmax(probs.log(), labels)
    assert loss.item() == pytest.approx(13 / 30, abs=1e-6)


def test_lovasz_on_hard_predictions_is_one_minus_miou_of_present_classes():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    pred = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2, 3])
    logits = F.one_hot(pred, 4).float() * 1e4  # softmax = one-hot; class 3 never labelled
    ious = []
    for c in range(3):  # classes present in the labels
        p, t = pred[:9] == c, labels[:9] == c
        ious.append((p & t).sum() / (p | t).sum())
    assert lovasz_softmax(logits, labels).item() == pytest.approx(1 - torch.stack(ious).mean().item(), abs=1e-5)


def test_lovasz_ignores_ignored_rows_and_handles_all_ignored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 5, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    base = lovasz_softmax(logits, labels)
    noisy = torch.cat([logits, 10 * torch.randn(15, 5, generator=g)])
    assert lovasz_softmax(noisy, torch.cat([labels, torch.full((15,), -1)])).item() == pytest.approx(base.item())
    empty = torch.randn(4, 5, requires_grad=True)
    loss = lovasz_softmax(empty, torch.full((4,), -1))
    loss.backward()
    assert loss.item() == 0.0 and (empty.grad == 0).all()


def test_ce_plus_lovasz_is_the_sum_and_trains_through_the_language_head():
    torch.manual_seed(0)
    text = {"scannet": F.normalize(torch.randn(6, 16), dim=-1)}
    head = LanguageHead(8, text)
    x = torch.randn(64, 8, requires_grad=True)
    labels = torch.randint(-1, 6, (64,))
    logits = head(x, "scannet")  # scale-100 cosine logits
    both = segmentation_loss(logits, labels, kind="ce+lovasz")
    ce = segmentation_loss(logits, labels, kind="ce")
    assert both.item() == pytest.approx(ce.item() + lovasz_softmax(logits, labels).item(), rel=1e-6)
    assert both.item() > ce.item()
    both.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(logits, labels, kind="lovasz")
