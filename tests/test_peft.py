"""PEFT stages: adapters, memory bank, stage application, block recomputation, checkpoints
(frozen sparse convs and norms: tests/test_peft_frozen.py; LoRA: tests/test_peft_lora.py).

CPU, tiny widths (8-16 channels, one block per stage), two scenes of ~1000 voxels.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppt.config import ConfigError, load_config
from ppt.losses import segmentation_loss
from ppt.engine.checkpoint import CheckpointError
from ppt.engine.peft_checkpoint import (
    file_fingerprint, load_memory_bank, load_peft_checkpoint, save_memory_bank, save_peft_checkpoint,
)
from ppt.engine.weights import BY_KEY, BY_NAME, FROM_MEAN, OWN, map_state, map_weights
from ppt.models.peft.adapters import prompt_attention, scatter_max, scatter_mean
from ppt.models.peft.frozen_norm import is_frozen_norm
from ppt.models.peft.memory_bank import MemoryBank, build_memory_bank
from ppt.models.peft.point_peft import neighbour_edges
from ppt.models.peft.spunet_block import PeftBlock
from ppt.models.peft.stages import PeftConfig, apply_stage, backbone_units, parameter_counts
from ppt.models.prompts import PDNorm
from ppt.models.segmentor import Segmentor

TINY = dict(channels=(8, 8, 16, 16, 16, 16, 8, 8), layers=(1,) * 8, stem_channels=8)
BASE_NAMES = {"alpha": ("wall", "floor", "chair"), "beta": ("wall", "floor", "table", "sofa")}
TARGET = "gamma"
TARGET_NAMES = {TARGET: ("floor", "wall", "lamp", "bed", "door")}


def embeddings(names: dict, dim: int = 16) -> dict[str, torch.Tensor]:
    """Deterministic per-class-name embedding, so a class has the same text in every dataset."""
    out = {}
    for d, classes in names.items():
        rows = [torch.randn(dim, generator=torch.Generator().manual_seed(sum(map(ord, c)))) for c in classes]
        out[d] = F.normalize(torch.stack(rows), dim=-1)
    return out


def segmentor(names: dict, seed: int = 0) -> Segmentor:
    torch.manual_seed(seed)
    return Segmentor(names, backbone=TINY, prompt="pdnorm", prompt_dim=16, head="language",
                     text_embeddings=embeddings(names))


def make_batch(dataset: str, num_classes: int, seed: int = 0, n: int = 1200, extent: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    scenes = [torch.unique(torch.randint(0, extent, (n // 2, 3), generator=g), dim=0) for _ in range(2)]
    grid = torch.cat(scenes).int()
    return dict(grid_coord=grid, feat=torch.rand(len(grid), 6, generator=g),
                segment=torch.randint(-1, num_classes, (len(grid),), generator=g),
                offset=torch.tensor([len(scenes[0]), len(grid)]), dataset=dataset,
                name=[f"scene{seed}_0", f"scene{seed}_1"])


def target_batch(seed: int = 0) -> dict:
    return make_batch(TARGET, len(TARGET_NAMES[TARGET]), seed)


@pytest.fixture(scope="module")
def base_state() -> dict:
    """A base model with non-trivial BN statistics and weights (two training datasets)."""
    model = segmentor(BASE_NAMES)
    model.train()
    with torch.no_grad():
        for d, classes in BASE_NAMES.items():
            model(make_batch(d, len(classes), seed=7))
        for p in model.parameters():  # zero-init modulations etc. would hide mapping errors
            p.add_(0.01 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def target_model(base_state: dict) -> Segmentor:
    model = segmentor(TARGET_NAMES, seed=1)
    state, _ = map_state(base_state, model)
    model.load_state_dict(state, strict=False)
    return model


def memory_bank(model: Segmentor) -> MemoryBank:
    return build_memory_bank(model, [target_batch(s) for s in range(3)], progress=False)


def staged(base_state: dict, stage: str, train_norms: bool | None = None,
           recompute_blocks: bool | None = None, **cfg) -> tuple[Segmentor, Segmentor]:
    """(frozen copy of the target base model, the same with `stage` applied)."""
    base = target_model(base_state)
    model = copy.deepcopy(base)
    bank = memory_bank(model) if stage == "pointpeft" else None
    apply_stage(model, PeftConfig(stage=stage, **cfg), bank, domain=TARGET, train_norms=train_norms,
                recompute_blocks=recompute_blocks)
    return base, model


# --- shared pieces ---------------------------------------------------------------------------

def test_scatter_and_prompt_attention_are_per_scene():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    batch = torch.tensor([0, 0, 1])
    torch.testing.assert_close(scatter_mean(x, batch, 3), torch.tensor([[2.0, 1.0], [5.0, 5.0], [0.0, 0.0]]))
    torch.testing.assert_close(scatter_max(x, batch, 2), torch.tensor([[3.0, 2.0], [5.0, 5.0]]))
    tokens = torch.stack([torch.ones(1, 2), -torch.ones(1, 2)])  # one token per scene
    out = prompt_attention(x, tokens, batch)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]))


def test_recomputed_adapter_gives_the_same_gradients():
    from ppt.models.peft.adapters import BottleneckAdapter, recompute

    torch.manual_seed(0)
    adapter = BottleneckAdapter(8, 8, 4, dropout=0.5)
    torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(30, 8)
    grads = []
    for run in (adapter, lambda t: recompute(adapter, t)):
        adapter.zero_grad()
        torch.manual_seed(1)  # same dropout mask; recompute replays it in backward
        (run(x) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in adapter.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_neighbour_edges_match_brute_force():
    g = torch.Generator().manual_seed(3)
    idx = torch.unique(torch.cat([torch.randint(0, 2, (150, 1), generator=g),
                                  torch.randint(0, 6, (150, 3), generator=g)], 1), dim=0)
    src, dst = neighbour_edges(idx)
    got = set(zip(src.tolist(), dst.tolist()))
    diff = (idx[:, None, 1:] - idx[None, :, 1:]).abs().amax(-1)
    same = idx[:, None, 0] == idx[None, :, 0]
    want = {(i, j) for i, j in torch.nonzero((diff <= 1) & same).tolist()}
    assert got == want


# --- memory bank -----------------------------------------------------------------------------

def test_memory_bank_excludes_the_query_scene(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 8, generator=g)
    names = ["a", "b", "c", "d", "e", "f"]
    bank = MemoryBank(feats, names)
    query = bank.features[[0, 2]]  # scenes a and c query with their own features
    retrieved, weights, index = bank.retrieve(query, ["a", "c+d"], k=3)
    assert retrieved.shape == (2, 5, 8)
    assert 0 not in index[0].tolist() and not {2, 3} & set(index[1].tolist())
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    torch.testing.assert_close(retrieved[:, 0], query)
    sims = query @ bank.features.t()
    sims[0, 0] = sims[1, 2] = sims[1, 3] = -2
    assert index[:, 0].tolist() == sims.argmax(1).tolist()  # best remaining entry comes first
    # k shrinks to what is left; nothing left is an error
    assert bank.retrieve(query, ["a", "c"], k=10)[1].shape == (2, 5)
    with pytest.raises(ValueError, match="no entry left"):
        MemoryBank(feats[:1], ["a"]).retrieve(query[:1], ["a"])
    save_memory_bank(bank, tmp_path / "bank.pt", "sha256:x")
    assert load_memory_bank(tmp_path / "bank.pt", "sha256:other") is None
    loaded = load_memory_bank(tmp_path / "bank.pt", "sha256:x")
    assert loaded.names == names
    torch.testing.assert_close(loaded.features, bank.features)


# --- stages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,cfg", [("dapt", {}), ("pointpeft", {}),
                                       ("pointpeft", {"neighbour_attention": True})])
def test_adapters_are_silent_at_step_zero(base_state, stage, cfg):
    base, model = staged(base_state, stage, **cfg)
    base.eval()
    model.eval()
    batch = target_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch), rtol=0, atol=0)
    model.train()  # BN statistics stay frozen: training mode reads the same statistics
    model(batch)
    assert torch.equal(model.state_dict()["backbone.stem.norm.norms.gamma.running_mean"],
                       base.state_dict()["backbone.stem.norm.norms.gamma.running_mean"])


# TINY's norms, by hand: stem 1, per encoder stage the down-sampling layer + two in its block
# (4 x 3), per decoder stage the up-sampling layer + two in its block + the block's shortcut
# (its first block changes the width: 4 x 4)
NORMS = 1 + 4 * 3 + 4 * 4


def target_norm_affines(model: Segmentor) -> set[str]:
    """Names of the target dataset's norm affines, from the module types: each PDNorm's
    ``norms.<target>`` BatchNorm and every BatchNorm / LayerNorm outside a PDNorm."""
    names = set()
    for name, m in model.backbone.named_modules():
        if ".peft." in f".{name}.":
            continue  # the adapters' own LayerNorms are the adapter stages' parameters
        if isinstance(m, PDNorm):
            names |= {f"backbone.{name}.norms.{TARGET}.weight", f"backbone.{name}.norms.{TARGET}.bias"}
        elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and name.split(".")[-2:-1] != ["norms"]:
            names |= {f"backbone.{name}.weight", f"backbone.{name}.bias"}
    assert len(names) == 2 * NORMS
    return names


def _expected_trainable(model: Segmentor, stage: str) -> set[str]:
    names = {n for n, _ in model.head.named_parameters(prefix="head")}
    norms = target_norm_affines(model) if stage in ("bitfit", "dapt+norms") else set()
    adapters = {n for n, _ in model.named_parameters() if ".peft." in n}
    decoder = {n for n, _ in model.named_parameters() if n.startswith("backbone.decoder.") and "modulation" not in n}
    return {"linear": names, "bitfit": names | norms, "dapt": names | adapters, "decoder": names | decoder,
            "dapt+norms": names | norms | adapters, "pointpeft": names | adapters | pointpeft_biases(model)}[stage]


def pointpeft_biases(model: Segmentor) -> set[str]:
    """Point-PEFT's reference also trains the blocks' biases: here their norm1 / norm2 shifts."""
    ends = (f"norm1.norms.{TARGET}.bias", f"norm2.norms.{TARGET}.bias")
    return {n for n, _ in model.named_parameters() if ".blocks." in n and n.endswith(ends)}


# lora: tests/test_peft_lora.py (both backbones)
@pytest.mark.parametrize("stage", ("full", "linear", "decoder", "bitfit", "dapt", "pointpeft"))
def test_only_the_stage_parameters_train(base_state, stage):
    base, model = staged(base_state, stage)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_trainable, total = parameter_counts(model)
    if stage == "full":
        assert n_trainable == total == parameter_counts(base)[1]
        return
    assert trainable == _expected_trainable(model, stage)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert not any("prompts." in n or "modulation" in n for n in trainable)
    blocks = list(model.backbone.blocks())
    assert all(isinstance(b, PeftBlock) for b in blocks) == (stage in ("dapt", "pointpeft"))
    if stage == "dapt":  # per block: LayerNorm(C_in), C_in -> r -> C_out with r = max(8, C_in // 6),
        # scale Linear(C_in, 1), one gate; on top of linear probing's parameters (the head)
        adapters = 0
        for block in base.backbone.blocks():
            c_in, c_out = block.conv1.in_channels, block.conv1.out_channels
            r = max(8, c_in // 6)
            adapters += 2 * c_in + (c_in * r + r) + (r * c_out + c_out) + (c_in + 1)  # no gate: a
            # stage's first (here only) block reads no earlier prompt
        params = dict(model.named_parameters())
        assert n_trainable == sum(params[n].numel() for n in _expected_trainable(model, "linear")) + adapters
    # the frozen prefix runs without autograd: the whole backbone for linear probing, the stem
    # and the first down-sampling layer for the adapter stages (their first block adapts)
    no_grad = [type(u).__name__.startswith("NoGrad") for u in backbone_units(model.backbone)]
    assert no_grad[:2] == [stage != "bitfit"] * 2
    assert all(no_grad) == (stage == "linear")
    frozen_norms = [is_frozen_norm(m) for m in model.backbone.modules() if isinstance(m, PDNorm)]
    assert frozen_norms and all(frozen_norms)
    model.train()  # BN statistics update where the norms train: the decoder's under decoder probing
    bns = {n: m for n, m in model.backbone.named_modules()  # (Point-PEFT's own BatchNorms train: not the base's)
           if isinstance(m, nn.BatchNorm1d) and ".peft." not in f".{n}."}
    want = {n for n in bns if n.startswith("decoder.")} if stage == "decoder" else set()
    assert {n for n, m in bns.items() if m.training} == want


def test_dapt_can_still_train_the_norm_affines(base_state):
    """``train_norms`` restores DAPT's former setting: the target dataset's norm affines train
    on top of the adapters (the other datasets' norms stay frozen), and they get gradients."""
    _, model = staged(base_state, "dapt", train_norms=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model, "dapt+norms")
    assert any(".norms.gamma." in n for n in trainable) and not any(".norms.alpha." in n for n in trainable)
    model.train()
    batch = target_batch(0)
    segmentation_loss(model(batch), batch["segment"]).backward()
    norm_grads = [p.grad for n, p in model.named_parameters() if ".norms.gamma." in n]
    assert all(grad is not None and grad.any() for grad in norm_grads)


@pytest.mark.parametrize("stage", ["dapt", "pointpeft", "bitfit"])
def test_gradients_reach_every_trainable_parameter(base_state, stage):
    _, model = staged(base_state, stage)
    model.train()
    batch = target_batch(0)
    segmentation_loss(model(batch), batch["segment"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # step 0: the silent adapters' first links learn (up-projections; Point-PEFT's gates)
    suffixes = {"bitfit": (), "dapt": ("adapter.up.weight",),
                "pointpeft": ("mlp_adapter.up.weight", "out_adapter.up.weight", "geometry.gate", "reader.gate")}
    opening = [n for n in grads if n.endswith(suffixes[stage])]
    assert len(opening) == {"bitfit": 0, "dapt": 8, "pointpeft": 3 * 8 + 4}[stage]
    # DAPT's dynamic scale (the reference's zero-bias init) can be 0 on every voxel of a toy block
    assert (any if stage == "dapt" else all)(grads[n] is not None and grads[n].any() for n in opening)
    # once the zero-initialised parts have moved, the gradient reaches every trainable parameter
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not p.any():  # positive: DAPT's dynamic-scale bias opens it
                p.copy_(0.5 * torch.randn(p.shape, generator=g).abs())
    model.zero_grad()
    segmentation_loss(model(batch), batch["segment"]).backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("stage", ["dapt", "pointpeft"])
def test_recomputed_blocks_give_the_same_gradients_and_keep_nothing_inside(base_state, stage, saved_numel):
    """Block recomputation changes memory, not the function: same loss and gradients (DAPT's
    dropout masks replayed, its internal prompts not appended twice), and no tensor of an
    adapted block is kept for backward outside its checkpoint."""
    grads, saved, losses = {}, {}, {}
    for recompute in (False, True):
        _, model = staged(base_state, stage, recompute_blocks=recompute)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # open the zero-initialised parts so every path carries gradient
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        model.train()
        batch = target_batch(0)
        torch.manual_seed(3)
        logits, saved[recompute] = saved_numel(lambda: model(batch))
        loss = segmentation_loss(logits, batch["segment"])
        loss.backward()
        losses[recompute] = loss.detach()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(losses[True], losses[False])
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    blocks = sum(1 for _ in target_model(base_state).backbone.blocks())
    assert saved[True] < saved[False] - blocks * 1000  # at least a relu output per block less


def test_stage_errors(base_state):
    with pytest.raises(ValueError, match="unknown PEFT stage"):
        apply_stage(target_model(base_state), PeftConfig(stage="adapter"))
    with pytest.raises(ConfigError, match="peft.stage"):
        load_config(None, ["peft.stage=adapter"])
    with pytest.raises(ConfigError, match="needs base weights"):
        load_config(None, ["peft.stage=dapt"])
    with pytest.raises(ValueError, match="memory bank"):
        apply_stage(target_model(base_state), PeftConfig(stage="pointpeft"))
    _, model = staged(base_state, "dapt")
    with pytest.raises(ValueError, match="already applied"):
        apply_stage(model, PeftConfig(stage="bitfit"))


# --- base mapping and checkpoints -------------------------------------------------------------

def test_base_weights_map_by_dataset_name(base_state, tmp_path):
    """The PEFT base goes through ppt.engine.weights, the mapping --weights uses (tested in
    tests/test_weights.py); here the two-dataset base of these tests onto beta + a new dataset."""
    path = tmp_path / "base.pth"
    torch.save({"model": base_state, "epoch": 3}, path)
    model = segmentor({"beta": BASE_NAMES["beta"], **TARGET_NAMES}, seed=2)
    report = map_weights(model, path)
    state = model.state_dict()
    table = base_state["prompts.table.weight"]  # rows: alpha, beta
    torch.testing.assert_close(state["prompts.table.weight"][0], table[1])  # beta by name
    torch.testing.assert_close(state["prompts.table.weight"][1], table.mean(0))  # new: mean prompt
    key = "backbone.stem.norm.norms.{}.weight"
    torch.testing.assert_close(state[key.format("beta")], base_state[key.format("beta")])
    want = (base_state[key.format("alpha")] + base_state[key.format("beta")]) / 2
    torch.testing.assert_close(state[key.format(TARGET)], want)
    torch.testing.assert_close(state["head.proj.weight"], base_state["head.proj.weight"])
    assert report.sources[key.format("beta")] == BY_NAME and report.sources[key.format(TARGET)] == FROM_MEAN
    assert report.sources["head.proj.weight"] == BY_KEY and report.sources["head.text_gamma"] == OWN
    assert report.datasets == {"beta": "beta", TARGET: "mean"} and report.dropped == ["alpha"]


def adapt_and_predict(model, base_path, stage: str, make_bank, make_batch_at):
    """Map the base file into ``model``, apply ``stage`` (``make_bank(model)`` for Point-PEFT),
    train two SGD steps on ``make_batch_at(0)``, ``(1)``, then predict ``make_batch_at(5)`` in
    eval mode; returns (stage config, that batch, the logits). Shared by the SpUNet and PTv3
    checkpoint round-trip tests."""
    map_weights(model, base_path)
    bank = make_bank(model) if stage == "pointpeft" else None
    cfg = PeftConfig(stage=stage)
    apply_stage(model, cfg, bank, domain=TARGET)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        batch = make_batch_at(step)
        segmentation_loss(model(batch), batch["segment"]).backward()
        opt.step()
    model.eval()
    batch = make_batch_at(5)
    with torch.no_grad():
        return cfg, batch, model(batch)


@pytest.mark.parametrize("stage", ["dapt", "pointpeft", "full"])
def test_peft_checkpoint_reloads_and_reproduces_predictions(base_state, tmp_path, stage):
    base_path = tmp_path / "base.pth"
    torch.save({"model": base_state}, base_path)
    model = segmentor(TARGET_NAMES, seed=1)
    cfg, batch, want = adapt_and_predict(model, base_path, stage, memory_bank, target_batch)
    ckpt = tmp_path / "model_best.pth"
    save_peft_checkpoint(ckpt, model, cfg, base_path, extra={"epoch": 1}, domain=TARGET)
    data = torch.load(ckpt, weights_only=False)
    assert data["base"]["fingerprint"] == file_fingerprint(base_path) and data["epoch"] == 1
    if stage != "full":
        stored = sum(v.numel() for v in data["model"].values() if torch.is_tensor(v))
        assert stored < parameter_counts(model)[1] / 2
    fresh = segmentor(TARGET_NAMES, seed=9)  # different init: everything must come from files
    load_peft_checkpoint(ckpt, fresh).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), want)
    torch.save({"model": {k: v + 1 if v.is_floating_point() else v for k, v in base_state.items()}}, base_path)
    with pytest.raises(CheckpointError, match="changed since fine-tuning"):
        load_peft_checkpoint(ckpt, segmentor(TARGET_NAMES))


def test_engine_checkpoints_of_a_peft_run_hold_the_trainable_part(base_state, tmp_path):
    """The hooks in ppt.engine.checkpoint: save writes the trainable part + base reference,
    a resumed/evaluated run rebuilds base + stage and loads it (weights_only file)."""
    from types import SimpleNamespace

    from ppt.engine import checkpoint as ckpt_io
    from ppt.engine.peft_checkpoint import peft_run_overrides, prepare_peft_model

    base_path = tmp_path / "base.pth"
    torch.save({"model": base_state, "config": {"model": {"channels": list(TINY["channels"])},
                                                "data": {"voxel_size": 0.05}}}, base_path)
    overrides = peft_run_overrides("dapt", base_path)
    assert "model.channels=[8, 8, 16, 16, 16, 16, 8, 8]" in overrides and "data.voxel_size=0.05" in overrides
    cfg = SimpleNamespace(peft=PeftConfig(stage="dapt", base=str(base_path)), data=SimpleNamespace(mix={TARGET: 1}))
    model = segmentor(TARGET_NAMES, seed=1)
    report = prepare_peft_model(model, cfg, tmp_path)
    assert "dapt" in report and "parameters train" in report
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    batch = target_batch(0)
    segmentation_loss(model(batch), batch["segment"]).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(target_batch(3))
    path = tmp_path / "model_last.pth"
    ckpt_io.save_checkpoint(path, model=model, optimizer=opt,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                            scaler=torch.amp.GradScaler("cpu", enabled=False),
                            loader=SimpleNamespace(state_dict=lambda: {}), epoch=1, step=1, best_metric=0.0,
                            best_epoch=1, nonfinite_steps=0, config={}, rng=[])
    ckpt = ckpt_io.load_checkpoint(path)  # weights_only load
    assert ckpt["base"]["fingerprint"] == file_fingerprint(base_path) and ckpt["peft"]["stage"] == "dapt"
    assert len(ckpt["model"]) < len(model.state_dict()) / 2
    fresh = segmentor(TARGET_NAMES, seed=5)
    prepare_peft_model(fresh, cfg, tmp_path, ckpt=ckpt)
    ckpt_io.load_model_state(fresh, ckpt["model"], path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(target_batch(3)), want)
    del ckpt["model"]["head.proj.weight"]  # a trainable tensor missing: a clear error
    other = segmentor(TARGET_NAMES)
    prepare_peft_model(other, cfg, tmp_path, ckpt=ckpt)
    with pytest.raises(ckpt_io.CheckpointError, match="1 missing keys"):
        ckpt_io.load_model_state(other, ckpt["model"], path)
