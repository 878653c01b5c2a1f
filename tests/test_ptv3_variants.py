"""PTv3 switches for the reference's variants (PT-v3m1 / PT-v3m2): each test fails when its
switch is ignored (same weights, different function) or wired to the wrong tensor."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppt.config import ConfigError, load_config
from ppt.models.prompts import PDLayerNorm, PDNorm
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.ptv3_layers import LayerScale, data_depth, make_level, pool_level
from ppt.models.serialization import encode
from ppt.models.spunet import DomainContext
from test_ptv3 import TINY, make_batch, scene, tiny_model  # noqa: E402  (tests/ is on sys.path)


def twin(seed: int = 0, **switches) -> tuple[PointTransformerV3, PointTransformerV3]:
    """Two tiny backbones with the same weights: the default one and one with ``switches``."""
    torch.manual_seed(seed)
    base = PointTransformerV3(**TINY).eval()
    other = PointTransformerV3(**TINY, **switches).eval()
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".ls" in k for k in missing), (missing, unexpected)  # LayerScale starts at init
    return base, other


def randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affines, so a norm that reads the wrong input shows."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


BATCH = make_batch([scene(900, 40, 21), scene(500, 30, 22)])


def test_unpool_cpe_skip_feeds_the_first_decoder_block_the_projected_skip_only():
    # PT-v3m1: the first decoder block's CPE conv reads GELU(norm(proj_skip(skip))), not the sum
    base, m1 = twin(unpool_cpe="skip")
    seen: dict[str, list[torch.Tensor]] = {"skip": [], "cpe": [], "sum": []}
    for model in (base, m1):
        for stage in model.decoder:
            stage.resample.register_forward_hook(lambda m, i, o: seen["sum"].append(o[0]) or seen["skip"].append(o[1]))
            stage.blocks[0].cpe_conv.conv.register_forward_pre_hook(lambda m, i: seen["cpe"].append(i[0].features))
    with torch.no_grad():
        out_base, out_m1 = base(BATCH), m1(BATCH)
    n = len(base.decoder)
    for k in range(n):
        assert torch.equal(seen["cpe"][k], seen["sum"][k])                 # default: the sum
        assert torch.equal(seen["cpe"][n + k], seen["skip"][n + k])         # m1: the skip alone
    assert not torch.allclose(out_base, out_m1, atol=1e-4)


def test_data_depth_is_the_references_rule():
    assert data_depth(torch.tensor([[0, 0, 255]])) == 9   # int(255 + 1).bit_length()
    assert data_depth(torch.tensor([[0, 0, 254]])) == 8
    assert data_depth(torch.tensor([[0, 0, 0]])) == 1


def test_serial_depth_from_data_changes_hilbert_orders_not_z_orders():
    grid = scene(2000, 200, 23).long()                   # max < 256: data depth 8
    depth = data_depth(grid)
    assert depth == 8
    for order in ("hilbert", "hilbert-trans"):
        assert not torch.equal(torch.argsort(encode(grid, None, depth, order)), torch.argsort(encode(grid, None, 16, order)))
    for order in ("z", "z-trans"):
        assert torch.equal(torch.argsort(encode(grid, None, depth, order)), torch.argsort(encode(grid, None, 16, order)))
    batch = make_batch([scene(1500, 200, 24)])
    for orders, differ in ((("hilbert",), True), (("z", "z-trans"), False)):
        fixed, data = twin(orders=orders, serial_depth=16)[1], twin(orders=orders, serial_depth=0)[1]
        with torch.no_grad():
            assert differ != torch.allclose(fixed(batch), data(batch), atol=1e-5), orders


def test_grid_pooling_serializes_each_level_at_its_own_depth():
    grid = scene(3000, 127, 25).long()                    # max 126: depth 7; coarse max 63: depth 6 = 7 - 1
    grid = torch.cat([grid, torch.tensor([[254, 3, 3]])])  # max 254: depth 8; coarse 127: depth 8 != 7
    offset = torch.tensor([len(grid)])
    level = make_level(grid, offset, ("hilbert", "z"), data_depth(grid), shuffle=False)
    shifted, regrid = pool_level(level, False), pool_level(level, False, reserialize=True)
    assert torch.equal(shifted.grid, regrid.grid) and torch.equal(shifted.cluster, regrid.cluster)
    assert (shifted.depth, regrid.depth) == (7, 8)
    batch = torch.zeros(len(regrid.grid), dtype=torch.long)
    assert torch.equal(regrid.code[0], encode(regrid.grid, batch, 8, "hilbert"))
    assert not torch.equal(shifted.order[0], regrid.order[0])  # Hilbert at depth 7 vs 8
    assert torch.equal(shifted.order[1], regrid.order[1])      # Z-order does not care


def test_linear_stem_and_layer_norms_everywhere():
    model = PointTransformerV3(**TINY, stem="linear", resample_norm="layer")
    assert isinstance(model.stem.linear, nn.Linear) and not hasattr(model.stem, "conv")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    pd = tiny_model("pdnorm", stem="linear", resample_norm="layer").backbone
    assert not any(isinstance(m, PDNorm) for m in pd.modules())
    assert isinstance(pd.stem.norm, PDLayerNorm) and isinstance(pd.decoder[0].resample.norm_skip, PDLayerNorm)
    grid = scene(50, 10, 26).long()
    level = make_level(grid, torch.tensor([len(grid)]), ("z",), 16, shuffle=False)
    x = torch.randn(len(grid), 6)
    expected = F.gelu(F.layer_norm(model.stem.linear(x), (TINY["enc_channels"][0],),
                                   model.stem.norm.weight, model.stem.norm.bias))
    assert torch.allclose(model.stem(x, level, DomainContext()), expected, atol=1e-6)


def test_layer_scale_scales_both_branches():
    base, scaled = twin(layer_scale=0.5)
    assert sum(isinstance(m, LayerScale) for m in scaled.modules()) == 2 * len(list(scaled.blocks()))
    with torch.no_grad():
        assert not torch.allclose(base(BATCH), scaled(BATCH), atol=1e-4)
        for branch, silenced in (("ls1", "proj"), ("ls2", "fc2")):  # gamma 0 on one branch = that branch off
            for block, ref in zip(scaled.blocks(), base.blocks()):
                block.ls1.gamma.fill_(0.0 if branch == "ls1" else 1.0)
                block.ls2.gamma.fill_(0.0 if branch == "ls2" else 1.0)
            off = twin(layer_scale=0.0)[0]
            for block in off.blocks():
                layer = block.attn.proj if silenced == "proj" else block.mlp.fc2
                layer.weight.zero_()
                layer.bias.zero_()
            assert torch.allclose(off(BATCH), scaled(BATCH), atol=1e-5), branch


def test_enc_mode_concatenates_every_stage_at_full_resolution():
    torch.manual_seed(0)
    model = PointTransformerV3(**TINY, enc_mode=True).eval()
    assert model.out_channels == sum(TINY["enc_channels"]) and len(model.decoder) == 0
    outs, levels = [], []
    for stage in model.encoder:
        stage.blocks[-1].register_forward_hook(lambda m, i, o: outs.append(o) or levels.append(i[1]))
    with torch.no_grad():
        feat = model(BATCH)
    assert feat.shape == (len(BATCH["feat"]), model.out_channels)
    rows = torch.arange(len(BATCH["feat"]))
    start = 0
    for s, out in enumerate(outs):
        width = out.shape[1]
        assert torch.equal(feat[:, start:start + width], out[rows]), s  # stage s at its voxel's cell
        start += width
        if s + 1 < len(outs):
            rows = levels[s + 1].cluster[rows]


@pytest.mark.parametrize("override,match", [("ptv3.stem=mlp", "ptv3.stem"), ("ptv3.pooling=max", "ptv3.pooling"),
                                            ("ptv3.unpool_cpe=both", "ptv3.unpool_cpe"),
                                            ("ptv3.resample_norm=group", "ptv3.resample_norm"),
                                            ("ptv3.serial_depth=22", "ptv3.serial_depth"),
                                            ("ptv3.layer_scale=-1", "ptv3.layer_scale")])
def test_bad_variant_settings_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.backbone=ptv3", override])


def test_enc_mode_config_ignores_the_decoder_keys(synthetic_root):
    from ppt.engine.build import build_model

    cfg = load_config(None, [f"data.root={synthetic_root}", "model.backbone=ptv3", "model.head=decoupled",
                             "model.prompt=none", "ptv3.enc_depths=[1,1]", "ptv3.enc_channels=[8,16]",
                             "ptv3.enc_heads=[1,2]", "ptv3.dec_depths=[]", "ptv3.dec_channels=[]",
                             "ptv3.dec_heads=[]", "ptv3.enc_mode=true", "ptv3.stem=linear",
                             "ptv3.resample_norm=layer", "ptv3.serial_depth=0", "ptv3.pooling=grid"])
    model = build_model(cfg).eval()
    assert model.backbone.out_channels == 24
    with torch.no_grad():
        logits = model(make_batch([scene(300, 20, 27)]))
    assert logits.shape[1] == 20 and torch.isfinite(logits).all()
