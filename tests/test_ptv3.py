"""PTv3 backbone: serialization, patches, pooling, batch independence, prompt-driven norms (CPU;
the CUDA flash-vs-math test runs only where a GPU is present)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppt.config import LOSSES as CONFIG_LOSSES
from ppt.config import load_config
from ppt.config_ptv3 import PTV3_ORDERS
from ppt.data.classes import DATASETS
from ppt.losses import LOSSES, segmentation_loss
from ppt.models.prompts import PDLayerNorm, PDNorm
from ppt.models.ptv3 import PTV3_DEFAULT_PARAMS, PointTransformerV3
from ppt.models.ptv3_layers import SerializedAttention, build_patches, make_level, pool_level
from ppt.models.segmentor import Segmentor
from ppt.models.serialization import ORDERS, decode, encode
from ppt.models.spunet import DomainContext

NAMES = {d: DATASETS[d].class_names for d in ("structured3d", "scannet", "s3dis")}
# Config overrides of a tiny PTv3 with a decoupled head (tests that build through the config).
TINY_PTV3_CONFIG = ["model.backbone=ptv3", "model.head=decoupled", "ptv3.enc_depths=[1,1]",
                    "ptv3.enc_channels=[8,16]", "ptv3.enc_heads=[1,2]", "ptv3.dec_depths=[1]",
                    "ptv3.dec_channels=[8]", "ptv3.dec_heads=[2]", "ptv3.patch_size=24"]
TINY = dict(enc_depths=(1, 2, 1), enc_channels=(8, 16, 16), enc_heads=(1, 2, 2),
            dec_depths=(1, 1), dec_channels=(8, 16), dec_heads=(2, 2), patch_size=32, drop_path=0.0)


def text_embeddings(dim: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {d: F.normalize(torch.randn(len(n), dim, generator=g), dim=-1) for d, n in NAMES.items()}


def tiny_model(prompt: str = "pdnorm", head: str = "language", seed: int = 0, **kwargs) -> Segmentor:
    torch.manual_seed(seed)
    return Segmentor(NAMES, backbone={**TINY, **kwargs}, backbone_type="ptv3", prompt=prompt, prompt_dim=16,
                     head=head, text_embeddings=text_embeddings())


def scene(n: int, extent: int, seed: int) -> torch.Tensor:
    """(<= n, 3) unique random voxels in [0, extent)^3, shuffled."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.unique(torch.randint(0, extent, (n, 3), generator=g), dim=0)
    return grid[torch.randperm(len(grid), generator=g)].int()


def make_batch(scenes: list[torch.Tensor], feats: list[torch.Tensor] | None = None, dataset: str = "scannet") -> dict:
    g = torch.Generator().manual_seed(1)
    feats = feats or [torch.rand(len(s), 6, generator=g) for s in scenes]
    grid = torch.cat(scenes)
    return dict(grid_coord=grid, feat=torch.cat(feats), offset=torch.cumsum(torch.tensor([len(s) for s in scenes]), 0),
                segment=torch.randint(-1, len(NAMES[dataset]), (len(grid),), generator=g), dataset=dataset)


# --- serialization ------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("depth", [3, 10, 16])
def test_encode_decode_round_trip(order, depth):
    g = torch.Generator().manual_seed(depth)
    grid = torch.randint(0, 1 << depth, (3000, 3), generator=g)
    batch = torch.randint(0, 9, (3000,), generator=g)
    back, b = decode(encode(grid, batch, depth, order), depth, order)
    assert torch.equal(back, grid) and torch.equal(b, batch)


@pytest.mark.parametrize("order", ORDERS)
def test_codes_are_a_bijection_on_the_grid(order):
    depth = 3
    grid = torch.tensor(list(itertools.product(range(1 << depth), repeat=3)))
    code = encode(grid, None, depth, order)
    assert torch.equal(torch.sort(code).values, torch.arange(1 << 3 * depth))


@pytest.mark.parametrize("depth", [2, 4])
def test_consecutive_hilbert_codes_are_grid_neighbours(depth):
    grid = torch.tensor(list(itertools.product(range(1 << depth), repeat=3)))
    for order in ("hilbert", "hilbert-trans"):
        walk = grid[torch.argsort(encode(grid, None, depth, order))]
        assert ((walk[1:] - walk[:-1]).abs().sum(1) == 1).all(), order
    z_walk = grid[torch.argsort(encode(grid, None, depth, "z"))]
    assert ((z_walk[1:] - z_walk[:-1]).abs().sum(1) > 1).any()  # the property is Hilbert's, not Z's


def test_transposed_orders_swap_x_and_y():
    grid = scene(500, 64, 0).long()
    for curve in ("z", "hilbert"):
        assert torch.equal(encode(grid, None, 6, f"{curve}-trans"), encode(grid[:, [1, 0, 2]], None, 6, curve))
        assert not torch.equal(encode(grid, None, 6, f"{curve}-trans"), encode(grid, None, 6, curve))


@pytest.mark.parametrize("order", ORDERS)
def test_code_shift_is_the_parent_cell(order):
    grid = scene(3000, 200, 1).long()  # pooling relies on code >> 3 == code of grid >> 1
    assert torch.equal(encode(grid, None, 8, order) >> 3, encode(grid >> 1, None, 7, order))


def test_batch_index_sorts_first_and_leaves_the_sample_order_alone():
    grid = scene(400, 50, 2).long()
    for order in ORDERS:
        alone = torch.argsort(encode(grid, torch.zeros(len(grid), dtype=torch.long), 16, order))
        third = torch.argsort(encode(grid, torch.full((len(grid),), 2), 16, order))
        assert torch.equal(alone, third)
    both = encode(torch.cat([grid, grid]), torch.tensor([1] * len(grid) + [0] * len(grid)), 16, "hilbert")
    assert (both[:len(grid)].min() > both[len(grid):].max()).item()


def test_out_of_range_coordinates_are_refused():
    with pytest.raises(ValueError, match="grid coordinates"):
        encode(torch.tensor([[0, 0, 8]]), None, 3, "z")
    with pytest.raises(ValueError, match="unknown serialization order"):
        encode(torch.tensor([[0, 0, 1]]), None, 3, "peano")


# --- patches and pooling --------------------------------------------------------------------------

def test_patches_stay_inside_one_sample_and_invert():
    counts, k = [70, 5, 32, 40, 5, 0], 16
    p = build_patches(counts, k, torch.device("cpu"))
    sample = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for start, num, length in p.groups:
        for i in range(num):
            slots = p.gather[start + i * length:start + (i + 1) * length]
            assert len(set(sample[slots].tolist())) == 1          # never two samples in a patch
            assert len(set(slots.tolist())) == length             # no voxel twice in a patch
    assert torch.equal(p.gather[p.scatter], torch.arange(sum(counts)))
    assert sorted(length for _, num, length in p.groups for _ in range(num)) == [5, 5] + [16] * (5 + 2 + 3)


def test_pooling_merges_each_samples_2x2x2_cells():
    scenes = [scene(600, 30, 3), scene(300, 30, 4)]
    offset = torch.tensor([len(scenes[0]), len(scenes[0]) + len(scenes[1])])
    level = make_level(torch.cat(scenes).long(), offset, ORDERS, 16, shuffle=False)
    coarse = pool_level(level, shuffle=False)
    for b, s in enumerate(scenes):
        lo = 0 if b == 0 else int(coarse.offset[0])
        cells = coarse.grid[lo:int(coarse.offset[b])]
        assert torch.equal(torch.unique(cells, dim=0), torch.unique(s.long() >> 1, dim=0))
    fine_batch = torch.repeat_interleave(torch.arange(2), torch.tensor([len(s) for s in scenes]))
    coarse_counts = torch.diff(coarse.offset, prepend=torch.zeros(1, dtype=torch.long))
    coarse_batch = torch.repeat_interleave(torch.arange(2), coarse_counts)
    assert torch.equal(coarse.grid[coarse.cluster], level.grid >> 1)
    assert torch.equal(coarse_batch[coarse.cluster], fine_batch)


# --- the backbone ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,head", [("pdnorm", "language"), ("none", "language"), ("pdnorm", "decoupled"),
                                         ("inject", "union"), ("xattn", "language")])
def test_forward_backward(prompt, head):
    model = tiny_model(prompt, head)
    batch = make_batch([scene(700, 20, 5), scene(300, 20, 6)], dataset="s3dis")
    logits = model(batch)
    assert logits.shape == (len(batch["feat"]), len(NAMES["s3dis"])) and torch.isfinite(logits).all()
    segmentation_loss(logits, batch["segment"], kind="ce+lovasz").backward()
    for name, p in model.backbone.named_parameters():
        if "norms." in name and ".s3dis." not in name:
            assert p.grad is None, name  # other datasets' norms stay idle
        elif "prompt_adapter." not in name:  # adapters start silent
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_parameter_count_is_the_papers():
    n = sum(p.numel() for p in PointTransformerV3().parameters())
    assert abs(n - PTV3_DEFAULT_PARAMS) / PTV3_DEFAULT_PARAMS < 0.01, n
    assert abs(PTV3_DEFAULT_PARAMS - 46.2e6) / 46.2e6 < 0.01


def test_every_norm_is_prompt_driven_with_pdnorm():
    model = tiny_model("pdnorm")
    inside = {id(m) for pd in model.backbone.modules() if isinstance(pd, (PDNorm, PDLayerNorm)) for m in pd.modules()}
    plain = [n for n, m in model.backbone.named_modules()
             if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and id(m) not in inside]
    assert not plain
    layer_norms = sum(isinstance(m, PDLayerNorm) for m in model.backbone.modules())
    assert layer_norms == 3 * len(list(model.backbone.blocks()))  # cpe, norm1, norm2 of each block
    assert sum(isinstance(m, PDNorm) for m in model.backbone.modules()) == 1 + 2 + 2 * 2  # stem, pools, unpools


def test_a_sample_is_the_same_alone_and_in_a_batch():
    # the small scene is shorter than a patch (a batch-wide patch size would change the others);
    # the big and mid scenes need padded patches and code depths 6 and 4 (a batch-wide depth
    # would reorder the mid scene's Hilbert curve, hence its patches)
    scenes = [scene(900, 40, 7), scene(80, 12, 8), scene(20, 5, 16)]
    g = torch.Generator().manual_seed(2)
    feats = [torch.rand(len(s), 6, generator=g) for s in scenes]
    model = tiny_model("pdnorm", orders=("hilbert", "z-trans")).eval()  # first blocks use Hilbert
    with torch.no_grad():
        both = model(make_batch(scenes, feats)).split([len(s) for s in scenes])
        swapped = model(make_batch(scenes[::-1], feats[::-1])).split([len(s) for s in scenes[::-1]])[::-1]
        for i, (s, f) in enumerate(zip(scenes, feats)):
            alone = model(make_batch([s], [f]))
            assert torch.allclose(both[i], alone, atol=1e-4), i
            assert torch.allclose(swapped[i], alone, atol=1e-4), i


def test_attention_never_crosses_samples():
    scenes = [scene(300, 12, 9), scene(150, 12, 10), scene(20, 12, 11)]
    batch = make_batch(scenes)
    offset = batch["offset"]
    level = make_level(batch["grid_coord"].long(), offset, ORDERS, 16, shuffle=False)
    torch.manual_seed(0)
    attn = SerializedAttention(8, 2, patch_size=64)
    x = torch.randn(len(batch["feat"]), 8, requires_grad=True)
    for order_index in range(len(ORDERS)):
        x.grad = None
        attn(x, level, order_index)[:offset[0]].sum().backward()
        assert x.grad[:offset[0]].abs().sum() > 0
        assert (x.grad[offset[0]:] == 0).all()
    # the whole backbone in eval: sample 0's output does not depend on the other samples' input
    model = tiny_model("pdnorm").eval()
    batch["feat"].requires_grad_(True)
    model(batch)[:offset[0]].sum().backward()
    assert (batch["feat"].grad[offset[0]:] == 0).all() and batch["feat"].grad[:offset[0]].abs().sum() > 0


def test_orders_are_shuffled_in_training_only():
    batch = make_batch([scene(600, 20, 12)])
    model = tiny_model("none", patch_size=16).train()
    torch.manual_seed(0)
    outs = [model(batch).detach() for _ in range(4)]
    assert any(not torch.allclose(outs[0], o, atol=1e-5) for o in outs[1:])
    frozen = tiny_model("none", patch_size=16, shuffle_orders=False).train()
    assert torch.equal(frozen(batch).detach(), frozen(batch).detach())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))


def test_mean_prompt_and_prompt_override_run():
    model = tiny_model("pdnorm").eval()
    batch = make_batch([scene(300, 15, 13)])
    with torch.no_grad():
        for prompt in ("mean", "s3dis"):
            assert torch.isfinite(model(batch, prompt=prompt)).all()


# --- PDNorm over LayerNorm --------------------------------------------------------------------------

def test_pd_layernorm_prompts_differ_once_modulated():
    torch.manual_seed(0)
    norm = PDLayerNorm(8, ("a", "b"), prompt_dim=4)
    prompts = {"a": torch.randn(1, 4), "b": torch.randn(1, 4)}
    x = torch.randn(50, 8)
    out = {d: norm(x, DomainContext(d, prompts[d])) for d in prompts}
    assert torch.allclose(out["a"], out["b"])  # zero-init: both start as the same plain LayerNorm
    assert torch.allclose(out["a"], F.layer_norm(x, (8,)))
    nn.init.normal_(norm.modulation[1].weight)
    out = {d: norm(x, DomainContext(d, prompts[d])) for d in prompts}
    assert not torch.allclose(out["a"], out["b"], atol=1e-3)
    shift, scale = norm.modulation(prompts["a"]).chunk(2, dim=-1)
    assert torch.allclose(out["a"], F.layer_norm(x, (8,)) * (1 + scale) + shift, atol=1e-6)


def test_pd_layernorm_mean_domain_averages_the_affines():
    norm = PDLayerNorm(6, ("a", "b"), prompt_dim=4, adaptive=False)
    with torch.no_grad():
        norm.norms["a"].weight.fill_(1.0)
        norm.norms["b"].weight.fill_(3.0)
        norm.norms["b"].bias.fill_(2.0)
    x = torch.randn(10, 6)
    assert torch.allclose(norm(x, DomainContext("mean")), F.layer_norm(x, (6,)) * 2.0 + 1.0, atol=1e-6)
    with pytest.raises(KeyError, match="has no norm for domain"):
        norm(x, DomainContext("c"))


# --- config and build ---------------------------------------------------------------------------------

def test_config_builds_the_ptv3_it_names(synthetic_root):
    from ppt.engine.build import build_model

    cfg = load_config(None, [f"data.root={synthetic_root}", *TINY_PTV3_CONFIG, "ptv3.orders=[hilbert]",
                             "train.loss=ce+lovasz"])
    model = build_model(cfg)
    assert isinstance(model.backbone, PointTransformerV3)
    assert model.backbone.orders == ("hilbert",) and model.backbone.out_channels == 8
    assert all(b.attn.patch_size == 24 for b in model.backbone.blocks())
    blocks = {id(p) for p in model.block_parameters()}
    assert blocks and not blocks & {id(p) for p in model.prompt_parameters()}
    assert CONFIG_LOSSES == LOSSES and PTV3_ORDERS == ORDERS


@pytest.mark.parametrize("override,match", [("ptv3.dec_depths=[1,1]", "ptv3.dec_depths"),
                                            ("ptv3.enc_heads=[2,4,8,16,30]", "must divide"),
                                            ("ptv3.orders=[z,peano]", "ptv3.orders"),
                                            ("train.loss=lovasz", "train.loss")])
def test_bad_ptv3_settings_name_the_key(override, match):
    from ppt.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.backbone=ptv3", override])


# --- CUDA ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flash_path_matches_math_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    batch = make_batch([scene(3000, 30, 14), scene(500, 30, 15)])
    level = make_level(batch["grid_coord"].to(dev).long(), batch["offset"].to(dev), ORDERS, 16, shuffle=False)
    torch.manual_seed(0)
    attn = SerializedAttention(64, 4, patch_size=128).to(dev)
    x = torch.randn(len(batch["feat"]), 64, device=dev)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            ref = attn(x, level, 2)                                # fp32 math path
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            flash = attn(x, level, 2).float()                      # bf16 flash kernel
    assert torch.allclose(flash, ref, atol=3e-2, rtol=3e-2), (flash - ref).abs().max()
    model = tiny_model("pdnorm").to(dev).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cuda_batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        assert torch.isfinite(model(cuda_batch)).all()


def test_block_parameters_get_their_own_lr_group(synthetic_root):
    # The PTv3 recipe trains the blocks at 0.1x: a missing group, or one that swallows the
    # prompt parameters or the stem/head, would train them at the wrong lr.
    from ppt.engine.build import build_model, build_optimizer

    cfg = load_config(None, [f"data.root={synthetic_root}", *TINY_PTV3_CONFIG, "model.prompt=pdnorm",
                             "optim.block_lr_scale=0.1"])
    model = build_model(cfg)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    assert set(groups) == {"base", "prompt", "block"}
    assert groups["block"]["max_lr"] == pytest.approx(0.1 * cfg.optim.lr)
    block = {id(p) for p in model.block_parameters()}
    assert {id(p) for p in groups["block"]["params"]} == block
    assert not block & {id(p) for p in groups["base"]["params"]}
    assert {id(p) for p in groups["prompt"]["params"]} == {id(p) for p in model.prompt_parameters()}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in model.parameters() if p.requires_grad])
    cfg.optim.block_lr_scale = 1.0
    assert [g["name"] for g in build_optimizer(model, cfg.optim).param_groups] == ["base", "prompt"]
