"""PEFT stages on PTv3: DAPT and Point-PEFT on transformer blocks (ppt/models/peft/ptv3_*.py),
every stage's trainable set, per-scene prompts, memory of the adapted blocks, encoder-only
models and stage checkpoints.

CPU, tiny widths (8-16 channels, one or two blocks per stage), two scenes of ~600 voxels.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ppt.config import load_config
from ppt.engine.peft_checkpoint import load_peft_checkpoint, save_peft_checkpoint
from ppt.losses import segmentation_loss
from ppt.models.peft.memory_bank import build_memory_bank
from ppt.models.peft.ptv3_block import PeftPTv3Block, PromptKV
from ppt.models.peft.stages import STAGES, PeftConfig, apply_stage, parameter_counts
from ppt.models.prompts import PDLayerNorm, PDNorm
from ppt.models.segmentor import Segmentor
from tests.test_peft import TARGET, TARGET_NAMES, adapt_and_predict, embeddings, make_batch

# two blocks in the first stages, so DAPT's internal prompts reach a later block's attention
TINY = dict(enc_depths=(2, 1, 1), enc_channels=(8, 16, 16), enc_heads=(2, 2, 2), dec_depths=(2, 1),
            dec_channels=(8, 16), dec_heads=(2, 2), patch_size=24, drop_path=0.0)
TINY_CONFIG = ["model.backbone=ptv3", "ptv3.enc_depths=[1,1]", "ptv3.enc_channels=[8,16]",
               "ptv3.enc_heads=[1,2]", "ptv3.dec_depths=[1]", "ptv3.dec_channels=[8]",
               "ptv3.dec_heads=[2]", "ptv3.patch_size=24"]


def ptv3_segmentor(seed: int = 0, enc_mode: bool = False) -> Segmentor:
    torch.manual_seed(seed)
    backbone = dict(TINY, enc_mode=True) if enc_mode else TINY
    model = Segmentor(TARGET_NAMES, backbone=backbone, backbone_type="ptv3", prompt="pdnorm", prompt_dim=16,
                      head="language", text_embeddings=embeddings(TARGET_NAMES))
    with torch.no_grad():  # non-trivial norms and modulations (zero-init ones would hide errors)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def batch(seed: int = 0) -> dict:
    return make_batch(TARGET, len(TARGET_NAMES[TARGET]), seed, n=1200, extent=12)


def staged(stage: str, enc_mode: bool = False, recompute_blocks: bool | None = None, **cfg):
    """(frozen base model, the same with `stage` applied)."""
    base = ptv3_segmentor(enc_mode=enc_mode)
    model = copy.deepcopy(base)
    bank = build_memory_bank(model, [batch(s) for s in range(3)], progress=False) if stage == "pointpeft" else None
    apply_stage(model, PeftConfig(stage=stage, **cfg), bank, domain=TARGET, recompute_blocks=recompute_blocks)
    return base, model


def open_zero_parameters(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Give the zero-initialised trainable parameters (up-projections, gates) random values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=g).abs())  # positive: DAPT's scale bias


def test_prompt_keys_values_are_read_per_scene():
    """PromptKV: a scene's rows read only its own tokens (catches a gather by the wrong scene
    index or scores over every scene's tokens)."""
    torch.manual_seed(0)
    reader = PromptKV(2)
    torch.nn.init.ones_(reader.gate)
    q, kv = torch.randn(7, 8), torch.randn(2, 3, 16)
    offset = torch.tensor([4, 7])
    out = reader(q, kv, offset)
    other = kv.clone()
    other[1] += 5.0  # scene 1's tokens change: scene 0's rows must not
    changed = reader(q, other, offset)
    torch.testing.assert_close(changed[:4], out[:4], rtol=0, atol=0)
    assert not torch.allclose(changed[4:], out[4:])
    k, v = kv[0, :, :8].reshape(3, 2, 4), kv[0, :, 8:].reshape(3, 2, 4)  # brute force, scene 0
    scores = torch.einsum("nhd,thd->nht", q[:4].reshape(4, 2, 4), k) / 2.0
    want = torch.einsum("nht,thd->nhd", scores.softmax(-1), v).reshape(4, 8)
    torch.testing.assert_close(out[:4], want)


@pytest.mark.parametrize("enc_mode", [False, True])
@pytest.mark.parametrize("stage,cfg", [("dapt", {}), ("pointpeft", {}), ("pointpeft", {"neighbour_attention": True})])
def test_adapters_are_silent_at_step_zero(stage, cfg, enc_mode):
    """Zero-initialised up-projections and prompt gates: the adapted model equals the base
    model (catches a prompt read without its gate, an adapter without zero init, a hook that
    changes PTv3's forward)."""
    base, model = staged(stage, enc_mode, **cfg)
    assert all(isinstance(b, PeftPTv3Block) for b in model.backbone.blocks())
    base.eval(), model.eval()
    b = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(b), base(b), rtol=0, atol=0)


# TINY's encoder blocks (stage, block) and its norms, by hand: 7 blocks (encoder 2 + 1 + 1,
# decoder 2 + 1) with three PDLayerNorms each (cpe_norm, norm1, norm2); PDNorm (BatchNorm) in
# the stem, the two pooling layers and the two unpooling layers (norm, norm_skip)
ENCODER_BLOCKS = ((0, 0), (0, 1), (1, 0), (2, 0))
NORMS = 7 * 3 + 1 + 2 + 2 * 2


def target_norm_affines(model: Segmentor) -> set[str]:
    """Names of the target dataset's norm affines, from the module types: each PDNorm's /
    PDLayerNorm's ``norms.<target>`` and every BatchNorm / LayerNorm outside them (bitfit)."""
    names = set()
    for name, m in model.backbone.named_modules():
        if isinstance(m, (PDNorm, PDLayerNorm)):
            names |= {f"backbone.{name}.norms.{TARGET}.weight", f"backbone.{name}.norms.{TARGET}.bias"}
        elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and name.split(".")[-2:-1] != ["norms"]:
            names |= {f"backbone.{name}.weight", f"backbone.{name}.bias"}
    assert len(names) == 2 * NORMS
    return names


def _expected_trainable(model: Segmentor, stage: str) -> set[str]:
    names = {n for n, p in model.named_parameters()}
    head = {n for n in names if n.startswith("head.")}
    norms = target_norm_affines(model) if stage == "bitfit" else set()  # (adapters have LayerNorms too)
    lora = {f"backbone.encoder.{s}.blocks.{b}.attn.qkv.lora_{ab}.weight" for s, b in ENCODER_BLOCKS for ab in "AB"}
    decoder = {n for n in names if n.startswith("backbone.decoder.") and "modulation" not in n
               and ".norms." not in n or n.startswith("backbone.decoder.") and f".norms.{TARGET}." in n}
    return {"full": names, "linear": head, "bitfit": head | norms, "decoder": head | decoder,
            "lora": head | lora,  # qkv of every encoder block (tests/test_peft_lora.py: counts, merge)
            "dapt": head | {n for n in names if ".peft." in n},
            "pointpeft": head | {n for n in names if ".peft." in n} | {  # + the reference's block biases
                n for n in names if ".blocks." in n and ".peft." not in n and n.endswith(
                    (f"norm1.norms.{TARGET}.bias", f"norm2.norms.{TARGET}.bias", "attn.proj.bias", "mlp.fc1.bias",
                     "mlp.fc2.bias"))}}[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_only_what_it_says(stage):
    """Parameter names per stage (catches a stage that leaves backbone weights, prompts or
    PDNorm modulations trainable, or adapters on the wrong blocks)."""
    base, model = staged(stage)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model, stage)
    if stage != "full":
        assert not any("prompts." in n or "modulation" in n for n in trainable)
    if stage == "dapt":  # per block: LN(C), C -> r -> C (r = max(8, C // 6)), scale C -> 1, and
        adapters = 0  # H gates unless first in its stage (no earlier prompt to read)
        for stage_ in [*base.backbone.encoder, *base.backbone.decoder]:
            for i, block in enumerate(stage_.blocks):
                c, h = block.attn.channels, block.attn.num_heads
                r = max(8, c // 6)
                adapters += 2 * c + (c * r + r) + (r * c + c) + (c + 1) + (h if i else 0)
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
        assert parameter_counts(model)[0] == head + adapters
    if stage == "pointpeft":  # prompts on encoder blocks only
        with_tokens = {n.split(".peft.")[0] for n in trainable if n.endswith(".peft.tokens")}
        assert with_tokens == {f"backbone.encoder.{s}.blocks.{i}" for s, stage_ in enumerate(model.backbone.encoder)
                               for i in range(len(stage_.blocks))}


@pytest.mark.parametrize("stage", ["dapt", "pointpeft"])
def test_prompts_never_cross_scenes(stage):
    """With every adapter and gate open, changing scene 1's points leaves scene 0's outputs
    bit-identical (catches prompts pooled over the batch, a patch reading another scene's
    prompt keys/values, a retrieval that mixes scenes)."""
    base, model = staged(stage)
    open_zero_parameters(model)
    model.eval(), base.eval()
    a = batch(0)
    b = copy.deepcopy(a)
    n0 = int(a["offset"][0])
    g = torch.Generator().manual_seed(5)
    b["feat"][n0:] = torch.rand(len(b["feat"]) - n0, 6, generator=g)
    b["grid_coord"][n0:] = b["grid_coord"][n0:].flip(1)  # other geometry, same voxel count
    with torch.no_grad():
        out_a, out_b, plain = model(a), model(b), base(a)
    torch.testing.assert_close(out_b[:n0], out_a[:n0], rtol=0, atol=0)
    assert not torch.allclose(out_b[n0:], out_a[n0:])
    assert (out_a[:n0] - plain[:n0]).abs().max() > 1e-3  # the adapters do act on scene 0


@pytest.mark.parametrize("enc_mode", [False, True])
def test_dapt_head_reads_the_last_stage_prompts_of_its_scene(enc_mode):
    """The head prompt: the last block's internal prompt is read by no later block, only by the
    head (the per-scene mean of the last stage's prompts added to the output features). Shifting
    scene 0's copy of it moves every point of scene 0 by one vector, in the last stage's
    channels (encoder-only: the deepest stage's slice), and leaves scene 1 bit-identical (bugs
    caught: the head prompt dropped from ``PeftPTv3.forward``, taken from another scene, or
    added to the wrong slice)."""
    _, model = staged("dapt", enc_mode)
    open_zero_parameters(model)
    model.eval()
    stages = model.backbone.encoder if enc_mode else model.backbone.decoder
    last = stages[-1].blocks[-1]
    shift = {}

    def perturb(block, args, out):  # ctx = the block's third argument
        if "row" in shift:
            prompts = args[2].prompts[max(args[2].prompts)]  # the last stage run so far: this block's
            prompts[-1] = prompts[-1] + shift["row"]

    b = batch(0)
    n0 = int(b["offset"][0])
    handle = last.register_forward_hook(perturb)
    try:
        with torch.no_grad():
            plain = model.forward_features(b)
            c = last.attn.channels
            shift["row"] = torch.zeros(2, c)
            shift["row"][0] = torch.linspace(0.5, 1.5, c)
            moved = model.forward_features(b)
    finally:
        handle.remove()
    diff = moved - plain
    assert torch.equal(diff[n0:], torch.zeros_like(diff[n0:]))
    channels = slice(diff.shape[1] - c, diff.shape[1]) if enc_mode else slice(0, c)
    assert diff[:n0, channels].abs().min() > 1e-3
    torch.testing.assert_close(diff[:n0], diff[:1].expand(n0, -1), rtol=1e-5, atol=1e-5)
    if enc_mode:
        assert not diff[:, :diff.shape[1] - c].any()


@pytest.mark.parametrize("stage", ["dapt", "pointpeft"])
def test_frozen_parts_get_no_gradient_and_keep_no_input(stage, saved_numel):
    """Block recomputation: same loss and gradients as without it, every trainable parameter
    gets a gradient, frozen ones none, and autograd keeps a small part of what full
    fine-tuning keeps (catches frozen blocks that save their activations)."""
    grads, saved, losses = {}, {}, {}
    for recompute in (False, True):
        _, model = staged(stage, recompute_blocks=recompute)
        open_zero_parameters(model)
        model.train()
        b = batch(0)
        torch.manual_seed(3)  # DAPT's dropout: the same masks in both runs
        logits, saved[recompute] = saved_numel(lambda: model(b))
        loss = segmentation_loss(logits, b["segment"])
        loss.backward()
        losses[recompute] = loss.detach()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert all(g is not None and g.any() for g in grads[recompute].values()), stage
    torch.testing.assert_close(losses[True], losses[False])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    _, full = staged("full")
    full.train()
    _, saved_full = saved_numel(lambda: full(batch(0)))
    assert saved[True] < 0.25 * saved_full
    assert saved[True] < 0.5 * saved[False]


@pytest.mark.parametrize("stage", ["dapt", "pointpeft"])
def test_encoder_only_model_is_adapted_and_trains(stage):
    """enc_mode (Sonata / Concerto layout): every block adapted, DAPT's head prompt lands on
    each stage's slice of the concatenated output, gradients reach the adapters."""
    _, model = staged(stage, enc_mode=True)
    assert all(isinstance(b, PeftPTv3Block) for b in model.backbone.blocks())
    open_zero_parameters(model)
    model.train()
    b = batch(0)
    segmentation_loss(model(b), b["segment"]).backward()
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if ".peft." in n)


@pytest.mark.parametrize("stage", ["dapt", "pointpeft"])
def test_stage_checkpoint_reloads_and_reproduces_predictions(tmp_path, stage):
    """A PTv3 stage checkpoint (trainable part + memory bank + base fingerprint) rebuilds the
    fine-tuned model from the base file (catches PTv3 adapter keys missing from the
    checkpoint, or a bank not restored)."""
    base_path = tmp_path / "base.pth"
    torch.save({"model": ptv3_segmentor(seed=3).state_dict()}, base_path)
    model = ptv3_segmentor(seed=1)
    cfg, b, want = adapt_and_predict(
        model, base_path, stage, lambda m: build_memory_bank(m, [batch(s) for s in range(3)], progress=False), batch)
    ckpt = tmp_path / "model_best.pth"
    save_peft_checkpoint(ckpt, model, cfg, base_path, domain=TARGET)
    fresh = ptv3_segmentor(seed=9)
    load_peft_checkpoint(ckpt, fresh).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(b), want)


def test_config_accepts_dapt_and_pointpeft_on_ptv3():
    """The config no longer refuses the adapter stages on PTv3."""
    for stage in ("dapt", "pointpeft"):
        cfg = load_config(None, [*TINY_CONFIG, f"peft.stage={stage}", "peft.base=base.pth"])
        assert cfg.peft.stage == stage and cfg.model.backbone == "ptv3"
