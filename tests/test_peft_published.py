"""DAPT and Point-PEFT as their reference code builds them (github.com/LMD0311/DAPT,
github.com/Ivan-Tang-3D/Point-PEFT): each published part has a test that fails without it.

- Point-PEFT: the adapter on the MLP output (``0.7 * adapter(MLP(h))``), prompt dropout in
  training only, the kNN geometry operator (groups, shared attention, max-pool, inverse-distance
  propagation x 0.3, prompt tokens as centres at learnable coordinates) against a brute-force
  reference on a hand-made cloud, the reference's trainable set (blocks' biases).
- DAPT: the dynamic scale after the adapter's LayerNorm, the reference's init, a block never
  reads its own internal prompt (only later blocks do), SSF present, silent at start, trained.
- The trainable set of every configuration, on both backbones.

Expected values are written out here (names, formulas, a loop-based reference), never read from
the code under test. CPU, the tiny models of tests/test_peft.py and tests/test_peft_ptv3.py.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ppt.config import ConfigError, PeftConfig, load_config
from ppt.losses import segmentation_loss
from ppt.models.peft.adapters import PeftContext, knn_on_grid
from ppt.models.peft.dapt import DynamicAdapter
from ppt.models.peft.frozen_norm import freeze_norms
from ppt.models.peft.point_peft import GroupAttention, KnnGeometry, grid_centres
from ppt.models.peft.stages import apply_stage
from ppt.models.segmentor import Segmentor
from tests.test_peft import TARGET, TARGET_NAMES, base_state, embeddings, target_batch  # noqa: F401 (fixture)
from tests.test_peft import staged as spunet_staged
from tests.test_peft_ptv3 import batch as ptv3_batch
from tests.test_peft_ptv3 import open_zero_parameters
from tests.test_peft_ptv3 import staged as ptv3_staged

# tests/test_peft.py's TINY SpUNet: (stage, C_in, C_out, has shortcut) of its one block per stage
SPUNET_BLOCKS = ((0, 8, 8, False), (1, 8, 8, False), (2, 16, 16, False), (3, 16, 16, False),
                 (4, 32, 16, True), (5, 24, 16, True), (6, 16, 8, True), (7, 16, 8, True))
# tests/test_peft_ptv3.py's TINY PTv3: (stage, block, C) of every block (encoder 2+1+1, decoder 2+1)
PTV3_BLOCKS = ((0, 0, 8), (0, 1, 8), (1, 0, 16), (2, 0, 16), (3, 0, 16), (4, 0, 8), (4, 1, 8))


def spunet_block_name(s: int) -> str:
    return f"backbone.encoder.{s}.blocks.0" if s < 4 else f"backbone.decoder.{s - 4}.blocks.0"


def ptv3_block_name(s: int, b: int) -> str:
    return f"backbone.encoder.{s}.blocks.{b}" if s < 3 else f"backbone.decoder.{s - 3}.blocks.{b}"


def staged_on(backbone: str, base_state: dict, stage: str, **cfg):
    """(base model, the same with `stage` applied) on tests/test_peft.py's SpUNet or
    tests/test_peft_ptv3.py's PTv3."""
    return spunet_staged(base_state, stage, **cfg) if backbone == "spunet" else ptv3_staged(stage, **cfg)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- Point-PEFT: the adapter on the MLP output -------------------------------------------------

def test_spunet_block_adds_the_adapter_to_its_residual_branch_output(base_state):
    """Block 0's residual branch f = norm2(conv2(relu(norm1(conv1 x)))) gets 0.7 * adapter(f)
    added before the shortcut sum and the ReLU (catches an adapter never called, or fed the
    block input or output instead of f)."""
    base, model = spunet_staged(base_state, "pointpeft")
    block = model.backbone.encoder[0].blocks[0]
    adapter = block.peft.mlp_adapter
    with torch.no_grad():
        adapter.up.weight.normal_()
    model.eval()
    x = model.backbone.sparse_input(target_batch(1))
    ctx = PeftContext(domain=TARGET, prompt=model.domain_context(target_batch(1)).prompt)
    x = model.backbone.encoder[0].down(model.backbone.stem(x, ctx), ctx)
    with torch.no_grad():
        got = block._hooked(x, ctx).features
        h = F.relu(block.norm1(block.conv1(x).features, ctx))
        f = block.norm2(block.conv2(x.replace_feature(h)).features, ctx)
        up = adapter.up(adapter.drop(adapter.activation(adapter.down(f))))
        want = F.relu(f + 0.7 * up + x.features)
        plain = F.relu(f + x.features)
    torch.testing.assert_close(got, want)
    assert (got - plain).abs().max() > 1e-3
    with torch.no_grad():  # and the whole model's output moves with it
        assert not torch.allclose(model(target_batch(1)), base.eval()(target_batch(1)))


def test_ptv3_mlp_branch_is_mlp_plus_0_7_adapter_of_its_output():
    """PTv3 block: feed_forward(h) = MLP(h) + 0.7 * adapter(MLP(h)) (catches mlp_delta
    returning nothing or reading the MLP input)."""
    _, model = ptv3_staged("pointpeft")
    block = model.backbone.encoder[0].blocks[0]
    adapter = block.peft.mlp_adapter
    with torch.no_grad():
        adapter.up.weight.normal_()
    model.eval()
    h = torch.randn(50, 8)
    with torch.no_grad():
        got = block.feed_forward(h, None, PeftContext(domain=TARGET))
        m = block.mlp(h)
        want = m + 0.7 * adapter.up(adapter.activation(adapter.down(m)))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, m)


# --- Point-PEFT: prompt dropout --------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_prompt_dropout_acts_in_training_only(base_state, backbone):
    """peft.prompt_dropout drops learnable prompt-token entries in training and is the identity
    in evaluation (catches the dropout missing, or active at test time)."""
    cfg = dict(prompt_dropout=0.5)
    _, model = staged_on(backbone, base_state, "pointpeft", **cfg)
    peft = model.backbone.encoder[0].blocks[0].peft
    ctx = PeftContext(retrieved=torch.randn(2, 10, model.backbone.memory_bank.dim))
    peft.eval()
    with torch.no_grad():
        evaluated = peft.prompt_tokens_of(ctx)
        items = peft.prior(ctx.retrieved)
        scores = torch.einsum("tc,brc->btr", peft.tokens, items) / math.sqrt(items.shape[-1])
        want = peft.tokens + torch.einsum("btr,brc->btc", scores.softmax(-1), items)
    torch.testing.assert_close(evaluated, want)
    peft.train()
    torch.manual_seed(0)
    with torch.no_grad():
        trained = [peft.prompt_tokens_of(ctx) for _ in range(2)]
    assert not torch.allclose(trained[0], evaluated) and not torch.allclose(trained[0], trained[1])


# --- Point-PEFT: the kNN geometry operator ---------------------------------------------------

def test_knn_on_grid_is_exact_against_brute_force():
    """Shell search with the brute-force fallback (isolated voxels beyond the search radius):
    the k nearest of every query in its own scene, by squared distance."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randint(0, 6, (120, 3), generator=g)
    far = torch.tensor([[40, 0, 0], [0, 40, 3], [25, 25, 25]])  # nothing within the radius
    coords, batch = [], []
    for s in range(2):
        c = torch.unique(torch.cat([dense + 3 * s, far]), dim=0)
        coords.append(c)
        batch.append(torch.full((len(c),), s))
    coords, batch = torch.cat(coords), torch.cat(batch)
    query = torch.arange(0, len(coords), 3)
    k = 7
    index, dist2 = knn_on_grid(coords[query], batch[query], coords, batch, k)
    for i, q in enumerate(query.tolist()):
        same = torch.nonzero(batch == batch[q]).squeeze(1)
        d = ((coords[same] - coords[q]) ** 2).sum(1).float()
        want = d.sort().values[:k]
        torch.testing.assert_close(dist2[i], want)
        torch.testing.assert_close(((coords[index[i]] - coords[q]) ** 2).sum(1).float(), want)
        assert (batch[index[i]] == batch[q]).all()


def test_grid_centres_take_one_voxel_per_occupied_cell():
    coords = torch.tensor([[0, 0, 0], [1, 1, 0], [2, 0, 0], [3, 1, 1], [0, 0, 0], [5, 5, 5]])
    batch = torch.tensor([0, 0, 0, 0, 1, 1])
    # stride 2 cells: scene 0 rows 0, 1 -> (0,0,0); rows 2, 3 -> (1,0,0); scene 1: rows 4, 5
    assert sorted(grid_centres(coords, batch, 2).tolist()) == [0, 2, 4, 5]


def reference_geometry(y, coords, batch, attention, k, stride, tokens=None, prompt_xyz=None):
    """Loop-by-loop reference of the operator (gate 1, BatchNorm as the identity): independent
    of the code under test except ``attention``'s weights. prompt_xyz: (B, T, 3) positions."""
    n = len(y)
    cells = {}
    for i in range(n):
        key = (int(batch[i]), *(int(v) // stride for v in coords[i]))
        cells.setdefault(key, i)
    centres = sorted(cells.values())
    xyz = coords.float()
    table, groups, centre_rows, centre_xyz, centre_scene = [y[i] for i in range(n)], [], [], [], []
    for c in centres:
        same = [j for j in range(n) if batch[j] == batch[c]]
        same.sort(key=lambda j: float(((xyz[j] - xyz[c]) ** 2).sum()))
        groups.append(same[:k])
        centre_rows.append(c)
        centre_xyz.append(xyz[c])
        centre_scene.append(int(batch[c]))
    if tokens is not None:
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                same = [j for j in range(n) if batch[j] == b]
                same.sort(key=lambda j: float(((xyz[j] - prompt_xyz[b, t]) ** 2).sum()))
                table.append(tokens[b, t])
                groups.append([len(table) - 1] + same[:k - 1])
                centre_rows.append(len(table) - 1)
                centre_xyz.append(prompt_xyz[b, t])
                centre_scene.append(b)
    table = torch.stack(table)
    vis = []
    for members, row in zip(groups, centre_rows):
        feats = table[members]
        q, kk, v = attention.qkv(attention.norm(feats)).reshape(len(members), 3, 6, 3).permute(1, 2, 0, 3)
        att = ((q @ kk.transpose(-1, -2)) / math.sqrt(18)).softmax(-1) @ v  # (6, k, 3)
        pooled = (feats + attention.proj(att.permute(1, 0, 2).reshape(len(members), 18))).max(0).values
        vis.append(F.gelu(pooled / math.sqrt(1 + 1e-5)) + 0.3 * table[row])
    out = torch.zeros_like(y)
    grid_centres_ = len(centres)
    for i in range(n):
        mine = [j for j in range(grid_centres_) if centre_scene[j] == int(batch[i])]
        mine.sort(key=lambda j: float(((centre_xyz[j] - xyz[i]) ** 2).sum()))
        sources = mine[:3] + [j for j in range(grid_centres_, len(vis)) if centre_scene[j] == int(batch[i])]
        w = torch.stack([1 / (((centre_xyz[j] - xyz[i]) ** 2).sum() + 1e-8) for j in sources])
        out[i] = 0.3 * sum(wj * vis[j] for wj, j in zip(w, sources)) / w.sum()
    return out


@pytest.mark.parametrize("with_prompts", [False, True])
def test_knn_geometry_groups_pools_and_propagates_as_the_reference(with_prompts):
    """Hand-made cloud, two scenes; distances without ties. Scene 0 is a line x = 0, 1, 3, 7, 15
    (stride 4 cells: centres x = 0, 7, 15; x = 15 has no voxel within the search radius, so the
    brute-force path runs); with prompts, one token per scene at its coordinate in the scene's
    frame (centre + coordinate x half extent), grouped with its k - 1 nearest voxels and read by
    every voxel of its scene."""
    torch.manual_seed(0)
    line = torch.tensor([[0, 0, 0], [1, 0, 0], [3, 0, 0], [7, 0, 0], [15, 0, 0]])
    other = torch.tensor([[2, 2, 2], [2, 3, 5], [6, 2, 2], [9, 9, 1]])
    coords = torch.cat([line, other])
    batch = torch.tensor([0] * 5 + [1] * 4)
    c, k, stride = 8, 3, 4
    attention = GroupAttention(c)
    geometry = KnnGeometry(c, attention, k=k, stride=stride).eval()
    with torch.no_grad():
        geometry.gate.fill_(1.0)
        attention.norm.weight.normal_()
    y = torch.randn(len(coords), c)
    tokens = prompt_coords = prompt_xyz = None
    if with_prompts:
        tokens = torch.randn(2, 1, c)
        prompt_coords = torch.tensor([[0.5, 0.0, -0.5]])
        xyz = coords.float()
        for_scene = []
        for s in range(2):
            pts = xyz[batch == s]
            centre, half = pts.mean(0), (pts.max(0).values - pts.min(0).values) / 2
            for_scene.append(centre + half * prompt_coords[0])
        prompt_xyz = torch.stack(for_scene)[:, None]
    ctx = PeftContext(prompt_coords=prompt_coords)
    with torch.no_grad():
        got = geometry(y, coords, batch, 2, ctx, tokens)
        want = reference_geometry(y, coords, batch, attention, k, stride, tokens, prompt_xyz)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_group_attention_in_recomputed_chunks_equals_one_pass(monkeypatch):
    """Large levels run the group attention in chunks, each recomputed in backward: the same
    pooled features and gradients as one pass (catches a chunk dropped or misaligned)."""
    import ppt.models.peft.point_peft as point_peft

    torch.manual_seed(0)
    attention = GroupAttention(8)
    feats = torch.randn(40, 8, requires_grad=True)
    members = torch.randint(0, 40, (23, 5))
    results = []
    for chunk, limit in ((1 << 20, 1 << 30), (7, 0)):  # one pass; chunks of 7, all recomputed
        monkeypatch.setattr(point_peft, "GROUP_CHUNK", chunk)
        monkeypatch.setattr(point_peft, "GROUP_CHECKPOINT", limit)
        out = attention.pool(feats, members)
        results.append((out, torch.autograd.grad(out.square().sum(), [feats, *attention.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want)


def test_prompt_coordinates_get_a_gradient(base_state):
    """The learnable prompt coordinates reach the loss through the propagation weights."""
    _, model = spunet_staged(base_state, "pointpeft")
    open_zero_parameters(model)
    model.train()
    batch = target_batch(0)
    segmentation_loss(model(batch), batch["segment"]).backward()
    coords = model.backbone.peft.prompt_coords
    assert coords.shape == (10, 3) and coords.grad is not None and coords.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_conv_geometry_operator_stays_an_option(base_state, backbone):
    """peft.geo_operator=conv: the 3x3x3 submanifold-conv bottleneck, no group attention, no
    prompt coordinates; silent at start."""
    cfg = dict(geo_operator="conv")
    base, model = staged_on(backbone, base_state, "pointpeft", **cfg)
    names = trainable(model)
    assert any(n.endswith("geometry.conv.weight") for n in names)
    assert not any(".attention." in n or "prompt_coords" in n for n in names)
    b = target_batch(1) if backbone == "spunet" else ptv3_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(b), base.eval()(b), rtol=0, atol=0)


# --- DAPT --------------------------------------------------------------------------------------

def test_dynamic_scale_reads_the_adapter_layernorm_output():
    """LayerNorm is invariant to a per-token affine map of the input (x -> a x + b): so is the
    whole adapter, dynamic scale included, only if the scale reads LN(x) (catches a scale
    computed on the raw input)."""
    torch.manual_seed(0)
    adapter = DynamicAdapter(12, 12, 4, dropout=0.0)
    with torch.no_grad():
        adapter.adapter.up.weight.normal_()
        adapter.adapter.norm.weight.normal_()
    x = torch.randn(40, 12)
    a, b = torch.rand(40, 1) * 3 + 0.5, torch.randn(40, 1) * 4
    torch.testing.assert_close(adapter(a * x + b), adapter(x), rtol=1e-4, atol=1e-5)
    n = adapter.adapter.norm(x)
    want = adapter.adapter.up(F.gelu(adapter.adapter.down(n))) * F.relu(adapter.scale(n))
    torch.testing.assert_close(adapter(x), want)


def test_dapt_init_and_dropout_are_the_reference_s():
    """Down-projection and scale: nn.Linear's Kaiming-uniform weights (bound 1/sqrt(C)) with
    zero biases; up-projection zero; dropout p 0.2 by default (``peft.dropout``)."""
    assert PeftConfig().dropout == 0.2
    torch.manual_seed(0)
    adapter = DynamicAdapter(64, 64, 10)
    bound = 1 / math.sqrt(64)
    for linear in (adapter.adapter.down, adapter.scale):
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.8 * bound
        assert not linear.bias.any()
    assert not adapter.adapter.up.weight.any() and adapter.adapter.drop.p == 0.2


def spunet_two_blocks(seed: int = 0) -> Segmentor:
    """A SpUNet with two blocks in its first encoder stage (TINY otherwise)."""
    torch.manual_seed(seed)
    backbone = dict(channels=(8, 8, 16, 16, 16, 16, 8, 8), layers=(2, 1, 1, 1, 1, 1, 1, 1), stem_channels=8)
    return Segmentor(TARGET_NAMES, backbone=backbone, prompt="pdnorm", prompt_dim=16, head="language",
                     text_embeddings=embeddings(TARGET_NAMES))


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_dapt_block_reads_only_earlier_blocks_prompts(backbone):
    """The first block of a stage reads no prompt (no gate); the second reads exactly the first
    block's prompt, never its own (catches a block that appends before it reads)."""
    if backbone == "spunet":
        model = spunet_two_blocks()
        apply_stage(model, PeftConfig(stage="dapt"), domain=TARGET)
        b = target_batch(0)
    else:
        _, model = ptv3_staged("dapt")
        b = ptv3_batch(0)
    first, second = model.backbone.encoder[0].blocks[:2]
    assert first.peft.reader is None and second.peft.reader is not None
    seen = []
    reader = second.peft.reader
    original = reader.forward

    def spy(*args):
        seen.append(args[1].detach().clone())  # the prompts: (B, T, C) or (B, T, 2C) keys/values
        return original(*args)

    reader.forward = spy
    model.eval()
    with torch.no_grad():
        model(b)
    assert len(seen) == 1 and seen[0].shape[1] == 1  # one prompt: the first block's


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_dapt_ssf_is_present_silent_at_start_and_trained(base_state, backbone):
    """peft.ssf: scale-and-shift after the block layers the reference puts them after, on the
    prompts later blocks or the head read, after the stem and on the output; the stage starts
    as the base model; every SSF parameter gets a gradient and moves in one step."""
    if backbone == "spunet":
        base, model = spunet_staged(base_state, "dapt", ssf=True)
        b = target_batch(0)
        want = {"backbone.stem.peft", "backbone.peft.ssf_out"}
        for s, _, _, shortcut in SPUNET_BLOCKS:
            layers = ["norm1", "norm2"] + ["proj_norm"] * shortcut + ["prompt"] * (s == 7)  # the head reads stage 7's
            want |= {f"{spunet_block_name(s)}.peft.ssf.{n}" for n in layers}
    else:
        base, model = ptv3_staged("dapt", ssf=True)
        b = ptv3_batch(0)
        want = {"backbone.stem.peft", "backbone.peft.ssf_out"}
        last = {0: 1, 1: 0, 2: 0, 3: 0, 4: 1}
        for s, i, _ in PTV3_BLOCKS:
            layers = ["norm1", "qkv", "proj", "norm2", "fc1", "fc2"] + ["prompt"] * (i < last[s] or s == 4)
            want |= {f"{ptv3_block_name(s, i)}.peft.ssf.{n}" for n in layers}
    names = {n.rsplit(".", 1)[0] for n in trainable(model) if n.endswith((".scale", ".shift")) and ".ssf" in n
             or n.startswith(("backbone.stem.peft.", "backbone.peft.ssf_out."))}
    assert names == want
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(b), base.eval()(b), rtol=0, atol=0)
    open_zero_parameters(model)
    with torch.no_grad():  # every dynamic scale open: on these toy features the reference's
        for m in model.backbone.blocks():  # zero-bias scale can be 0 on a whole block
            m.peft.scale.bias.fill_(1.0)
    model.train()
    segmentation_loss(model(b), b["segment"]).backward()
    ssf = {n: p for n, p in model.named_parameters() if n.rsplit(".", 2)[0] + "." + n.rsplit(".", 2)[1] in want}
    assert len(ssf) == 2 * len(want)
    assert [n for n, p in ssf.items() if p.grad is None or not p.grad.any()] == []
    before = {n: p.detach().clone() for n, p in ssf.items()}
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01).step()  # moves any non-zero grad
    assert all(not torch.equal(before[n], p) for n, p in ssf.items())


# --- trainable sets ----------------------------------------------------------------------------

def spunet_pointpeft_biases() -> set[str]:
    return {f"{spunet_block_name(s)}.{n}.norms.{TARGET}.bias" for s, *_ in SPUNET_BLOCKS for n in ("norm1", "norm2")}


def ptv3_pointpeft_biases() -> set[str]:
    layers = ("norm1.norms.gamma.bias", "norm2.norms.gamma.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")
    return {f"{ptv3_block_name(s, i)}.{n}" for s, i, _ in PTV3_BLOCKS for n in layers}


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
@pytest.mark.parametrize("stage,cfg", [("dapt", {}), ("dapt", {"ssf": True}), ("pointpeft", {}),
                                       ("pointpeft", {"train_biases": False}),
                                       ("pointpeft", {"prompt_coords": False})])
def test_trainable_set_per_configuration(base_state, backbone, stage, cfg):
    """Head + the stage's modules (under ``.peft.``, the backbone's ``peft`` included) + what
    the configuration adds: Point-PEFT's reference trains the blocks' biases; nothing else of
    the backbone trains (no norm weights, no PDNorm modulation, no other dataset's norm)."""
    if backbone == "spunet":
        _, model = spunet_staged(base_state, stage, **cfg)
        biases = spunet_pointpeft_biases()
    else:
        _, model = ptv3_staged(stage, **cfg)
        biases = ptv3_pointpeft_biases()
    names = trainable(model)
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    modules = {n for n, _ in model.named_parameters() if ".peft." in n}
    want = head | modules
    if stage == "pointpeft" and cfg.get("train_biases", True):
        want |= biases
    assert names == want
    assert ("backbone.peft.prompt_coords" in names) == (stage == "pointpeft" and cfg.get("prompt_coords", True))
    assert any(".ssf." in n for n in names) == bool(cfg.get("ssf"))
    if stage == "pointpeft":  # the reference's adapters (rank 16) and, shared per width, one group attention
        peft = model.backbone.encoder[0].blocks[0].peft
        assert peft.mlp_adapter.up.in_features == 16 and peft.out_adapter.up.in_features == 16
        attentions = {id(m.peft.geometry.attention) for m in model.backbone.blocks()}
        widths = {m.peft.geometry.norm.num_features for m in model.backbone.blocks()}
        assert len(attentions) == len(widths)


def test_frozen_norm_trains_a_bias_without_keeping_its_input(saved_numel):
    """A frozen BatchNorm whose bias alone trains (Point-PEFT's block biases) stays a constant
    scale-and-shift: the same output and gradients as BatchNorm, its input not kept (catches the
    norm's own forward, which keeps the (N, C) input, coming back)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()
    bn.eval().weight.requires_grad_(False)
    frozen = copy.deepcopy(torch.nn.Sequential(bn))
    freeze_norms(frozen)
    x = torch.randn(50, 6, requires_grad=True)
    out, saved = saved_numel(lambda: frozen(x))
    assert saved < x.numel()
    want = bn(x)
    torch.testing.assert_close(out, want)
    grads = [torch.autograd.grad(o.square().sum(), [x, b]) for o, b in ((out, frozen[0].bias), (want, bn.bias))]
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref)


def test_config_checks_the_new_options():
    cfg = load_config(None, ["peft.stage=pointpeft", "peft.base=b.pth", "peft.geo_operator=conv", "peft.ssf=true"])
    assert cfg.peft.geo_operator == "conv" and cfg.peft.ssf
    defaults = PeftConfig()
    assert (defaults.geo_operator, defaults.geo_k, defaults.prompt_dropout, defaults.adapter_rank,
            defaults.prior_rank, defaults.train_biases) == ("knn", 16, 0.1, 16, 8, True)
    for bad, key in (("peft.geo_operator=fps", "peft.geo_operator"), ("peft.geo_k=0", "peft.geo_k"),
                     ("peft.prompt_dropout=1.0", "peft.prompt_dropout"), ("peft.temperature=0", "peft.temperature")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_recomputed_knn_blocks_give_the_same_gradients(base_state):
    """The kNN operator's chunked, recomputed group attention inside a recomputed block: same
    loss and gradients as without block recomputation (prompt dropout masks replayed)."""
    grads = {}
    for recompute in (False, True):
        _, model = spunet_staged(base_state, "pointpeft", recompute_blocks=recompute)
        open_zero_parameters(model)
        model.train()
        b = copy.deepcopy(target_batch(0))
        torch.manual_seed(3)
        segmentation_loss(model(b), b["segment"]).backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
