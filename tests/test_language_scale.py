"""The language head's logit scale: fixed (the reference) or learnt (model.logit_scale_learnable)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ppt.models.heads import LanguageHead


def _heads(scale: float):
    g = torch.Generator().manual_seed(0)
    text = {"a": F.normalize(torch.randn(5, 16, generator=g), dim=-1)}
    torch.manual_seed(0)
    fixed = LanguageHead(8, text, logit_scale=scale)
    torch.manual_seed(0)
    learnt = LanguageHead(8, text, logit_scale=scale, learnable_scale=True)
    return fixed, learnt


def test_fixed_scale_adds_no_parameter_and_keeps_the_state_dict():
    # bug caught: a log_scale parameter or buffer in every model (old checkpoints would not load)
    fixed, _ = _heads(100.0)
    assert "log_scale" not in dict(fixed.named_parameters()) and not any("log_scale" in k for k in fixed.state_dict())


def test_learnt_scale_starts_at_the_given_value_and_trains():
    # bugs caught: the learnt head starting from another scale than logit_scale (e.g. exp not
    # applied, or CLIP's 1/0.07 hard-coded); the scale not reached by the gradient
    fixed, learnt = _heads(30.0)
    x = torch.randn(64, 8)
    torch.testing.assert_close(learnt(x, "a"), fixed(x, "a"))
    assert float(learnt.scale().detach()) == pytest.approx(30.0)
    loss = F.cross_entropy(learnt(x, "a"), torch.randint(0, 5, (64,)))
    loss.backward()
    assert learnt.log_scale.grad is not None and float(learnt.log_scale.grad.abs()) > 0
    before = float(learnt.scale().detach())
    torch.optim.SGD(learnt.parameters(), lr=0.1).step()
    assert float(learnt.scale().detach()) != pytest.approx(before)


def test_learnt_scale_starting_at_the_cap_can_move():
    # bug caught: the cap as a clamp inside the graph, whose gradient is zero at exp(log 100)
    # = 100.00000x, so a scale that starts at the reference's 100 never trains
    _, learnt = _heads(100.0)
    x = torch.randn(64, 8)
    F.cross_entropy(learnt(x, "a"), torch.randint(0, 5, (64,))).backward()
    assert float(learnt.log_scale.grad.abs()) > 0


def test_learnt_scale_is_capped_at_100_in_both_forward_forms():
    # bug caught: no cap (CLIP's 100), so a long run can make the logits arbitrarily sharp;
    # the cap missing from one of the two forward forms (C < D and C >= D)
    for width in (8, 32):  # feature width below and above the text width 16
        g = torch.Generator().manual_seed(1)
        text = {"a": F.normalize(torch.randn(5, 16, generator=g), dim=-1)}
        torch.manual_seed(0)
        capped = LanguageHead(width, text, logit_scale=100.0)
        torch.manual_seed(0)
        learnt = LanguageHead(width, text, logit_scale=100.0, learnable_scale=True)
        with torch.no_grad():
            learnt.log_scale.fill_(math.log(1000.0))
        x = torch.randn(16, width)
        torch.testing.assert_close(learnt(x, "a"), capped(x, "a"))


def test_config_key_builds_a_learnt_scale(synthetic_root):
    # bug caught: the config key parsed but not passed on to the head
    from ppt.config import load_config
    from ppt.engine.build import build_model

    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", "model.text_encoder=minilm",
                             "model.channels=[8, 8, 8, 8, 8, 8, 8, 8]", "model.layers=[1, 1, 1, 1, 1, 1, 1, 1]",
                             "model.logit_scale=20", "model.logit_scale_learnable=true"])
    model = build_model(cfg)
    assert float(model.head.scale().detach()) == pytest.approx(20.0)
    assert "head.log_scale" in dict(model.named_parameters())
