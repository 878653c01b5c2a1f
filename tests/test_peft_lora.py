"""The `lora` PEFT stage on both backbones (ppt/models/peft/lora.py): what trains, the step-0
identity, gradients, the merge for export / inference, and ``tools/convert.py --to pointcept`` of
a LoRA run.

SpUNet: conv-LoRA on the encoder blocks' two 3x3x3 convs; PTv3: the encoder blocks' ``attn.qkv``
(``proj`` / ``mlp`` with ``lora_targets``). The expected parameters are written out here from
the tiny widths and the rank, never read from the code under test. CPU, tiny widths (the
models of tests/test_peft.py and tests/test_peft_ptv3.py).
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from ppt.losses import segmentation_loss
from ppt.models.peft.lora import is_lora, merge_lora
from tests.test_peft import BASE_NAMES, make_batch, segmentor, target_batch
from tests.test_peft import staged as spunet_staged
from tests.test_peft_ptv3 import batch as ptv3_batch
from tests.test_peft_ptv3 import staged as ptv3_staged

REPO = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 12.0  # not the config defaults (8, 16): a rank or scale that ignores the config shows
LORA = dict(lora_rank=RANK, lora_alpha=ALPHA)
KERNEL = 27  # 3x3x3 submanifold convs of a SpUNet basic block

# tests/test_peft.py's TINY SpUNet (and the export test's): encoder widths channels[:4], one
# basic block per stage
SPUNET_ENCODER = (8, 8, 16, 16)
# tests/test_peft_ptv3.py's TINY PTv3: enc_depths (2, 1, 1), enc_channels (8, 16, 16); MLP
# hidden width 4 C (PTv3's default mlp_ratio, which TINY keeps)
PTV3_ENCODER_BLOCKS = ((0, 0, 8), (0, 1, 8), (1, 0, 16), (2, 0, 16))  # (stage, block, C)
MLP_RATIO = 4


def spunet_lora_names() -> set[str]:
    return {f"backbone.encoder.{s}.blocks.0.{conv}.lora_{ab}.weight"
            for s in range(len(SPUNET_ENCODER)) for conv in ("conv1", "conv2") for ab in "AB"}


def ptv3_lora_names(layers: tuple[str, ...]) -> set[str]:
    return {f"backbone.encoder.{s}.blocks.{b}.{layer}.lora_{ab}.weight"
            for s, b, _ in PTV3_ENCODER_BLOCKS for layer in layers for ab in "AB"}


def spunet_lora_count() -> int:
    """A (C -> r, 3x3x3, no bias) + B (r -> C, no bias) for conv1 and conv2 of every block."""
    return sum(2 * (KERNEL * c * RANK + RANK * c) for c in SPUNET_ENCODER)


def ptv3_lora_count(layers: tuple[str, ...]) -> int:
    """A (C_in -> r) + B (r -> C_out), no biases, per adapted Linear."""
    shapes = {"attn.qkv": lambda c: (c, 3 * c), "attn.proj": lambda c: (c, c),
              "mlp.fc1": lambda c: (c, MLP_RATIO * c), "mlp.fc2": lambda c: (MLP_RATIO * c, c)}
    return sum(RANK * (c_in + c_out) for _, _, c in PTV3_ENCODER_BLOCKS for layer in layers
               for c_in, c_out in [shapes[layer](c)])


@pytest.fixture(scope="module")
def base_state() -> dict:
    """tests/test_peft.py's two-dataset SpUNet base, with BN statistics measured exactly over a
    few batches of each dataset (test_peft's base keeps running variances near 1 against
    activations of ~0.01: its convolutions, hence LoRA's updates, barely reach the output)."""
    model = segmentor(BASE_NAMES)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for d, classes in BASE_NAMES.items():
            for seed in range(3):
                model(make_batch(d, len(classes), seed=seed))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def lora_model(backbone: str, base_state=None, targets: tuple[str, ...] = ("qkv",)):
    """(frozen base, the same with the lora stage, a batch maker) on ``backbone``."""
    if backbone == "spunet":
        base, model = spunet_staged(base_state, "lora", **LORA)
        return base, model, target_batch
    base, model = ptv3_staged("lora", lora_targets=list(targets), **LORA)
    return base, model, ptv3_batch


def head_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("head.")}


def open_b(model, std: float = 0.02) -> None:
    """Give every LoRA B a random value, as a long run would (a few SGD steps move the deeper
    blocks' B of these tiny models by little: a merge error there would not show)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(std * torch.randn(p.shape, generator=g))


def train_steps(model, make_batch, steps: int = 3, lr: float = 0.1) -> None:
    """A few SGD steps on the trainable parameters (LoRA's B leaves zero after the first)."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        b = make_batch(step)
        segmentation_loss(model(b), b["segment"]).backward()
        opt.step()


@pytest.mark.parametrize("backbone,targets,layers", [
    ("spunet", ("qkv",), ("conv1", "conv2")),
    ("ptv3", ("qkv",), ("attn.qkv",)),
    ("ptv3", ("proj", "mlp"), ("attn.proj", "mlp.fc1", "mlp.fc2")),
])
def test_lora_trains_exactly_its_updates_and_the_head(base_state, backbone, targets, layers):
    """The trainable set is the head plus A and B of exactly the targeted encoder layers, and
    the count is the hand-computed one (bugs caught: LoRA not applied, on decoder blocks or on
    layers the targets do not name, the rank ignored, biases or base weights left trainable)."""
    _, model, _ = lora_model(backbone, base_state, targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = spunet_lora_names() if backbone == "spunet" else ptv3_lora_names(layers)
    assert trainable == head_names(model) | want
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    count = spunet_lora_count() if backbone == "spunet" else ptv3_lora_count(layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == head + count
    assert sum(is_lora(m) for m in model.modules()) == len(want) // 2


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_lora_starts_as_the_base_model_and_both_factors_learn(base_state, backbone):
    """Step 0: B = 0, so the output is the base model's bit for bit, only B gets a gradient (A's
    is exactly zero); after one step every A and every B gets a non-zero gradient and no frozen
    parameter any (bugs caught: B not zero-initialised, the update not in the forward or cut
    from autograd, a factor frozen)."""
    base, model, make_batch = lora_model(backbone, base_state)
    base.eval(), model.eval()
    b = make_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(b), base(b), rtol=0, atol=0)

    model.train()
    segmentation_loss(model(make_batch(0)), make_batch(0)["segment"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}
    assert len(grads) == (16 if backbone == "spunet" else 8)
    assert all(g is not None and g.any() for n, g in grads.items() if ".lora_B." in n)
    assert all(g is not None and not g.any() for n, g in grads.items() if ".lora_A." in n)

    train_steps(model, make_batch, steps=1)
    model.zero_grad()
    b = make_batch(2)
    segmentation_loss(model(b), b["segment"]).backward()
    silent = [n for n, p in model.named_parameters() if ".lora_" in n and (p.grad is None or not p.grad.any())]
    assert silent == []
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_lora_linear_is_the_low_rank_update_scaled_by_alpha_over_rank():
    """A LoRA qkv layer computes ``x W^T + b + (alpha / r) x A^T B^T`` (eval: no dropout), by
    hand (bugs caught: scale alpha instead of alpha / r, A and B swapped, bias dropped)."""
    _, model, _ = lora_model("ptv3")
    layer = model.backbone.encoder[1].blocks[0].attn.qkv  # C = 16
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    model.eval()
    x = torch.randn(10, 16, generator=g)
    a, b_ = layer.lora_A.weight, layer.lora_B.weight
    want = x @ layer.weight.t() + layer.bias + (ALPHA / RANK) * (x @ a.t()) @ b_.t()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_merged_weights_give_the_unmerged_output(base_state, backbone):
    """With B != 0 (opened, then a few steps), ``merge_lora`` folds every update into its base
    weight and removes the branch: the model has the base model's keys and shapes again and
    computes the unmerged model's output (bugs caught: the conv filter's (C_out, kernel, C_in)
    layout reshaped wrong, the scale left out, the base weight written, a branch left in place,
    a layer missed)."""
    base, model, make_batch = lora_model(backbone, base_state)
    open_b(model)
    train_steps(model, make_batch, steps=2, lr=0.01)
    model.eval(), base.eval()
    b = make_batch(5)
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == (8 if backbone == "spunet" else 4)
    assert not any(is_lora(m) for m in merged.modules())
    state, base_state_ = merged.state_dict(), base.state_dict()
    assert set(state) == set(base_state_)
    assert all(state[k].shape == v.shape for k, v in base_state_.items())
    changed = {k for k in state if not torch.equal(state[k], base_state_[k])}
    assert changed == {n.replace(".lora_A.", ".").replace(".lora_B.", ".")
                       for n, _ in model.named_parameters() if ".lora_" in n} | head_names(model)
    with torch.no_grad():
        features, plain = model.forward_features(b), base.forward_features(b)
        merged_features = merged.forward_features(b)
        want, got = model(b), merged(b)
    assert (features - plain).abs().max() > 0.02 * plain.abs().max()  # LoRA moved the features
    torch.testing.assert_close(merged_features, features, rtol=1e-5, atol=1e-5 * features.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    assert merge_lora(merged) == 0  # nothing left to merge


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"ppt_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAST = ["data.voxel_size=0.1", "data.num_workers=0", "data.mix3d_prob=0.0", "data.check=false", "data.batch_size=2",
        "train.device=cpu", "train.threads=1", "train.epochs=1", "train.steps_per_epoch=2", "train.eval_every=0",
        "train.amp=false", "data.crop_points={s3dis: 4000}"]


def test_export_of_a_lora_run_computes_its_logits(synthetic_root, tmp_path):
    """A SpUNet LoRA run (tools/train.py --peft lora on a base trained here) exported with
    ``tools/convert.py --to pointcept`` and imported back computes the unmerged LoRA model's
    logits, and ``load_experiment`` (tools/test.py, infer.py) gives the merged model (bugs
    caught: an export that drops or chokes on the LoRA keys or writes the base weights)."""
    from ppt.config import load_config
    from ppt.engine.build import build_model, text_embeddings_from_state
    from ppt.engine.checkpoint import load_checkpoint, load_model_state
    from ppt.engine.peft_checkpoint import prepare_peft_model
    from ppt.engine.predict import load_experiment

    convert, train = _tool("convert"), _tool("train")
    common = ["--datasets", "s3dis", "--exp-root", str(tmp_path), "--data-root", str(synthetic_root), *FAST]
    # the reference's SpUNet-v1m1 (no prompt, one head); exact BN statistics (precise BN), so
    # the encoder's convolutions, hence LoRA's updates, reach the output
    assert train.main(["--config", str(REPO / "configs" / "demo.yaml"), "--name", "base", *common,
                       "model.prompt=none", "model.head=decoupled", "model.channels=[8,8,16,16,16,16,8,8]",
                       "model.layers=[1,1,1,1,1,1,1,1]", "model.stem_channels=8", "train.precise_bn=4"]) == 0
    assert train.main(["--peft", "lora", "--weights", str(tmp_path / "base" / "model" / "model_last.pth"),
                       "--name", "lora", *common, "optim.lr=0.01"]) == 0
    exp = tmp_path / "lora"
    ckpt_path = exp / "model" / "model_last.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["model"].items():  # as after a longer run (see open_b)
        if key.endswith(".lora_B.weight"):
            assert value.any()  # trained
            ckpt["model"][key] = value + 0.02 * torch.randn(value.shape, generator=g)
    torch.save(ckpt, ckpt_path)

    # the run's model as trained: base + stage + its checkpoint, LoRA branches in place
    cfg = load_config(exp / "config.yaml", [])
    ckpt = load_checkpoint(ckpt_path)
    unmerged = build_model(cfg, text_embeddings_from_state(ckpt["model"]))
    prepare_peft_model(unmerged, cfg, exp, ckpt=ckpt)
    load_model_state(unmerged, ckpt["model"], ckpt_path)
    assert sum(is_lora(m) for m in unmerged.modules()) == 8
    no_lora = copy.deepcopy(unmerged)
    for m in no_lora.modules():
        if is_lora(m):
            torch.nn.init.zeros_(m.lora_B.weight)
    b = target_batch(5)
    b["dataset"] = "s3dis"
    unmerged.eval(), no_lora.eval()
    with torch.no_grad():
        want, plain = unmerged(b), no_lora(b)
    assert (want - plain).abs().max() > 0.02 * want.abs().max()  # the updates move the logits
    tol = dict(rtol=1e-5, atol=1e-5 * want.abs().max())

    _, loaded, _ = load_experiment(exp)
    assert not any(is_lora(m) for m in loaded.modules())
    out = tmp_path / "lora_pointcept.pth"
    assert convert.main([str(exp), "--to", "pointcept", "--out", str(out)]) == 0
    assert not any("lora" in k for k in torch.load(out, weights_only=True)["state_dict"])
    assert convert.main([str(out), "--config", str(out) + ".model.py", "--name", "back",
                         "--exp-root", str(tmp_path)]) == 0
    _, back, _ = load_experiment(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(b), want, **tol)
        torch.testing.assert_close(back(b), want, **tol)
