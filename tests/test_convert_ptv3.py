"""The PTv3 family converter against fixtures made by ``bench/pointcept_parity_ptv3.py`` from the
reference itself (tiny models with random weights and non-trivial norm statistics, a batch, the
reference's logits; tests/fixtures/pointcept/ptv3/README.md). No reference code is needed here.

What each test catches:
- ``test_converted_model_computes_the_references_logits``: any wrong key mapping (e.g. norm1 and
  norm2 swapped, a decoder stage mapped to the wrong depth, PDNorm slots mapped to the wrong
  dataset), a transposed tensor (qkv rows in another (3, heads, dim) order, a spconv weight with
  in / out swapped), a wrong switch (PT-v3m1 without ``unpool_cpe: skip``, a fixed serialization
  depth, PT-v3m2 without per-level re-serialization) or a wrong head mapping.
- ``test_export_then_import_returns_the_same_tensors``: an export that drops, renames or
  reorders a tensor.
- the remaining tests: a reference key silently dropped or a setting silently ignored.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from ppt.interop import ConversionError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pointcept" / "ptv3"
sys.path.insert(0, str(ROOT))
from bench.pointcept_parity_ptv3 import DATASETS, unpack  # noqa: E402  (pack format of the fixtures)

CASES = sorted(p.stem for p in FIXTURES.glob("*.pth") if p.stem != "batch")
TOLERANCE = 1e-5  # relative; the bench measures <= 1e-6 on these fixtures, a broken mapping >= 1e-4


def load(name: str) -> tuple[dict, dict, torch.Tensor]:
    """(case, reference state, reference logits) of a fixture."""
    fixture = torch.load(FIXTURES / f"{name}.pth", weights_only=False)
    return fixture["case"], unpack(fixture["state"]), fixture["logits"]


def convert(case: dict, state: dict):
    """(our model in eval mode, our state, the reference model dict with our dataset names)."""
    from ppt.engine.build import build_model, text_embeddings_from_state
    from ppt.interop.pointcept import config_from_reference, convert_state, reference_model

    ref = {"model": copy.deepcopy(case["model"]), "data": case["data"]}
    model_cfg = reference_model(ref)
    cfg = config_from_reference(ref, model_cfg, state)
    ours = convert_state(dict(state), model_cfg, cfg)
    model = build_model(cfg, text_embeddings_from_state(ours))
    model.load_state_dict(ours, strict=True)
    return model.eval(), ours, model_cfg


def test_fixtures_are_present():
    assert {"pt-v3m1", "ppt-v1m2_over_pt-v3m1", "ppt-v1m1_over_pt-v3m1", "pt-v3m2_encoder_mode",
            "pt-v3m2_decoder", "ppt-v1m3_over_pt-v3m2"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_converted_model_computes_the_references_logits(name):
    case, state, expected = load(name)
    batch = torch.load(FIXTURES / "batch.pth", weights_only=False)
    model, _, _ = convert(case, state)
    with torch.no_grad():
        got = model({**batch, "dataset": DATASETS[case["condition"]]})
    assert got.shape == expected.shape
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel <= TOLERANCE, rel


@pytest.mark.parametrize("name", CASES)
def test_export_then_import_returns_the_same_tensors(name):
    from ppt.interop import pointcept_ptv3

    case, state, _ = load(name)
    _, ours, model_cfg = convert(case, state)
    exported = pointcept_ptv3.to_pointcept(dict(ours), model_cfg)
    reference_keys = set(state) - {"class_embeddings"}  # PPT-v1m3: a non-persistent buffer there
    assert set(exported) == reference_keys
    if "class_embeddings" in state:  # the reference recomputes it; the bench hands it over
        exported["class_embeddings"] = state["class_embeddings"]
    back = pointcept_ptv3.to_ours(exported, model_cfg)
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_every_reference_key_is_consumed_or_named():
    from ppt.interop import pointcept_ptv3
    from ppt.interop.pointcept import reference_model

    case, state, _ = load("pt-v3m1")
    model_cfg = reference_model({"model": case["model"], "data": case["data"]})
    with pytest.raises(ConversionError, match="backbone.enc.enc0.block0.extra"):
        pointcept_ptv3.to_ours({**state, "backbone.enc.enc0.block0.extra": torch.zeros(1)}, model_cfg)
    missing = dict(state)
    del missing["backbone.dec.dec0.block0.norm2.0.weight"]
    with pytest.raises(ConversionError, match=r"backbone\.dec\.dec0\.block0\.norm2\.0\.weight"):
        pointcept_ptv3.to_ours(missing, model_cfg)


def test_pretraining_mask_token_is_dropped_and_a_headless_encoder_gets_a_fresh_head():
    from ppt.interop import pointcept_ptv3
    from ppt.interop.pointcept import reference_model

    case, state, _ = load("pt-v3m2_encoder_mode")
    assert "backbone.embedding.mask_token" in state
    model_cfg = reference_model({"model": case["model"], "data": case["data"]})
    ours = pointcept_ptv3.to_ours(state, model_cfg)
    assert not any("mask_token" in k for k in ours)
    headless = {k: v for k, v in state.items() if not k.startswith("seg_head.")}
    fresh = pointcept_ptv3.to_ours(headless, model_cfg)
    head = fresh["head.classifiers.scannet.weight"]
    assert head.shape == state["seg_head.weight"].shape and 0 < head.std() < 0.05


def test_a_pretraining_encoder_under_a_decoder_config_gets_a_fresh_decoder():
    """Sonata / Concerto decoder probing and fine-tuning start from an encoder-only checkpoint:
    the encoder's tensors load exactly, the decoder and head start fresh and the same on every
    conversion (bugs caught: a refusal for the missing decoder, encoder tensors left at their
    initialisation, an unseeded decoder)."""
    case, state, _ = load("pt-v3m2_decoder")
    encoder_only = {k: v for k, v in state.items() if k.startswith(("backbone.embedding.", "backbone.enc."))}
    _, a, _ = convert(case, dict(encoder_only))
    _, b, _ = convert(case, dict(encoder_only))
    _, full, _ = convert(case, state)
    enc = [k for k in full if k.startswith(("backbone.encoder.", "backbone.stem."))]
    dec = [k for k in full if k.startswith("backbone.decoder.")]
    assert enc and dec
    assert all(torch.equal(a[k], full[k]) for k in enc)
    assert all(torch.equal(a[k], b[k]) for k in dec)
    assert any(not torch.equal(a[k], full[k]) for k in dec if k.endswith("weight"))
    partial = {k: v for k, v in state.items() if k != "backbone.dec.dec0.block0.norm2.0.weight"}
    with pytest.raises(ConversionError, match="dec0.block0.norm2"):
        convert(case, partial)  # a decoder with a hole is still an error


@pytest.mark.parametrize("key,value,match", [
    ("enable_rpe", True, "model.backbone.enable_rpe"), ("pre_norm", False, "model.backbone.pre_norm"),
    ("enc_patch_size", (8, 8, 16, 8), "model.backbone.enc_patch_size"),
    ("pdnorm_decouple", False, "model.backbone.pdnorm_decouple"), ("rpe_table", 1, "model.backbone.rpe_table"),
    ("stride", (2, 4, 2), "model.backbone.stride"),
])
def test_settings_this_project_cannot_represent_are_named(key, value, match):
    from ppt.interop import pointcept_ptv3
    from ppt.interop.pointcept import reference_model

    case, _, _ = load("ppt-v1m2_over_pt-v3m1")
    model = copy.deepcopy(case["model"])
    model["backbone"][key] = value
    with pytest.raises(ConversionError, match=match):
        pointcept_ptv3.config_sections(reference_model({"model": model, "data": case["data"]}))


def test_variant_switches_come_from_the_reference_type():
    from ppt.interop import pointcept_ptv3
    from ppt.interop.pointcept import reference_model

    m1 = pointcept_ptv3.config_sections(reference_model({"model": load("pt-v3m1")[0]["model"],
                                                         "data": load("pt-v3m1")[0]["data"]}))["ptv3"]
    assert (m1["unpool_cpe"], m1["serial_depth"], m1["pooling"], m1["stem"], m1["resample_norm"]) == \
        ("skip", 0, "serialized", "conv", "batch")
    case = load("pt-v3m2_encoder_mode")[0]
    m2 = pointcept_ptv3.config_sections(reference_model({"model": case["model"], "data": case["data"]}))["ptv3"]
    assert (m2["unpool_cpe"], m2["serial_depth"], m2["pooling"], m2["stem"], m2["resample_norm"], m2["enc_mode"]) == \
        ("sum", 0, "grid", "linear", "layer", True)
    assert m2["layer_scale"] == 0.5
