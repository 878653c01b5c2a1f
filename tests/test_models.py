"""Backbone, prompts, heads, segmentor and loss (CPU, tiny widths, a few thousand voxels)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppt.data.classes import DATASETS, union_label_space
from ppt.losses import segmentation_loss
from ppt.models.heads import LanguageHead, UnionHead
from ppt.models.prompts import PDNorm, PromptCrossAttention, PromptInjection
from ppt.models.segmentor import Segmentor
from ppt.models.spunet import SPATIAL_MARGIN, BatchNorm, DomainContext, SpUNet, cuda_default_algo
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution

TINY = dict(channels=(8, 8, 16, 16, 16, 16, 8, 8), layers=(1,) * 8, stem_channels=8)
NAMES = {d: DATASETS[d].class_names for d in ("structured3d", "scannet", "s3dis")}
PROMPTS = ("none", "pdnorm", "inject", "xattn")
HEADS = ("language", "decoupled", "union")


def text_embeddings(dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {d: F.normalize(torch.randn(len(n), dim, generator=g), dim=-1) for d, n in NAMES.items()}


def make_batch(dataset: str = "scannet", n: int = 2000, seed: int = 0, extent: int = 24) -> dict:
    """Two scenes of ~n/2 unique random voxels each, labels of ``dataset`` with some ignored."""
    g = torch.Generator().manual_seed(seed)
    scenes = []
    for _ in range(2):
        grid = torch.unique(torch.randint(0, extent, (n // 2, 3), generator=g), dim=0)
        scenes.append(grid[torch.randperm(len(grid), generator=g)])
    grid = torch.cat(scenes).int()
    k = len(NAMES[dataset])
    segment = torch.randint(-1, k, (len(grid),), generator=g)
    return dict(grid_coord=grid, feat=torch.rand(len(grid), 6, generator=g), segment=segment,
                offset=torch.tensor([len(scenes[0]), len(grid)]), dataset=dataset)


def tiny_model(prompt: str = "pdnorm", head: str = "language", seed: int = 0, **kwargs) -> Segmentor:
    torch.manual_seed(seed)
    return Segmentor(NAMES, backbone=TINY, prompt=prompt, prompt_dim=32, head=head,
                     text_embeddings=text_embeddings(), **kwargs)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_forward_backward(prompt, head):
    model = tiny_model(prompt, head)
    batch = make_batch("s3dis")
    logits = model(batch)
    assert logits.shape == (len(batch["segment"]), len(NAMES["s3dis"]))
    assert torch.isfinite(logits).all()
    segmentation_loss(logits, batch["segment"]).backward()
    for name, p in model.backbone.named_parameters():
        if "norms." in name and ".s3dis." not in name:
            assert p.grad is None, name  # other datasets' norms stay idle
        elif "prompt_adapter." not in name:  # adapters start silent: see test_adapters_*
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def spunet_parameters(norm, in_channels: int = 6, channels=(32, 64, 128, 256, 256, 128, 96, 96),
                     layers=(2, 3, 4, 6, 2, 2, 2, 2), stem: int = 32, block_extra=lambda c: 0) -> int:
    """Parameters of SPEC §3's SpUNet counted from the architecture description, not the code.

    ``norm(C)``: parameters of one norm over C channels; ``block_extra(C_in)``: parameters a
    prompt adapter adds to a basic block with C_in input channels. Convs have no bias.
    """
    def conv(k, cin, cout):
        return k ** 3 * cin * cout

    def block(cin, cout):
        n = block_extra(cin) + conv(3, cin, cout) + norm(cout) + conv(3, cout, cout) + norm(cout)
        return n + (conv(1, cin, cout) + norm(cout) if cin != cout else 0)

    total = conv(5, in_channels, stem) + norm(stem)
    widths = [stem, *channels[:4]]
    for s in range(4):  # encoder: down conv k2, then blocks at the new width
        total += conv(2, widths[s], widths[s + 1]) + norm(widths[s + 1])
        total += layers[s] * block(widths[s + 1], widths[s + 1])
    coarse = channels[3]
    for i in range(4):  # decoder: inverse conv k2, concat the skip, first block maps it back
        out, skip = channels[4 + i], widths[3 - i]
        total += conv(2, coarse, out) + norm(out) + block(out + skip, out) + (layers[4 + i] - 1) * block(out, out)
        coarse = out
    return total


def test_default_parameter_counts_are_exact():
    """README: plain SpUNet 39,155,904; default PPT model (PDNorm, 256-d prompts, language head
    to 512-d CLIP space, three datasets) 43,648,704. Built on the meta device: shapes only."""
    bn = lambda c: 2 * c  # noqa: E731  affine weight + bias
    modulation = lambda c: 256 * 2 * c + 2 * c  # noqa: E731  Linear(256 -> 2C) after SiLU
    pdnorm = lambda c: 3 * bn(c) + modulation(c)  # noqa: E731  one BN per dataset + modulation
    inject = lambda c: 256 * c + c  # noqa: E731  Linear(256 -> C) per block

    def xattn(c, tokens=8, heads=4):
        inner = max(8, c // heads) * heads  # LayerNorm, query, key-value over 32-d tokens, out
        return 2 * c + (c * inner + inner) + (256 // tokens * 2 * inner + 2 * inner) + (inner * c + c)

    head = 96 * 512 + 512  # Linear(96 -> 512); the class embeddings are buffers, not parameters
    prompts = 3 * 256
    expected = {"pdnorm": spunet_parameters(pdnorm) + prompts + head,
                "inject": spunet_parameters(bn, block_extra=inject) + prompts + head,
                "xattn": spunet_parameters(bn, block_extra=xattn) + prompts + head}
    assert spunet_parameters(bn) == 39_155_904 and expected["pdnorm"] == 43_648_704
    with torch.device("meta"):
        backbone = SpUNet()
        emb = {d: torch.zeros(len(c), 512) for d, c in NAMES.items()}
        models = {prompt: Segmentor(NAMES, prompt=prompt, text_embeddings=emb) for prompt in expected}
    assert count(backbone) == 39_155_904
    assert sum(isinstance(m, BatchNorm) for m in backbone.modules()) == 59
    assert len(list(backbone.blocks())) == 23
    for prompt, model in models.items():
        assert count(model) == expected[prompt], prompt
    assert sum(isinstance(m, PDNorm) for m in models["pdnorm"].modules()) == 59
    # trained at the prompt lr: the table and every modulation, nothing else
    n_prompt = sum(p.numel() for p in models["pdnorm"].prompt_parameters())
    assert n_prompt == prompts + spunet_parameters(modulation) - spunet_parameters(lambda c: 0)


def test_output_rows_follow_input_and_spatial_shape():
    backbone = SpUNet(**TINY)
    batch = make_batch()
    x = backbone.sparse_input(batch)
    assert x.spatial_shape == (batch["grid_coord"].max(0).values + SPATIAL_MARGIN).tolist()
    first, total = batch["offset"].tolist()
    assert torch.equal(x.indices[:, 0], torch.tensor([0] * first + [1] * (total - first), dtype=torch.int32))
    out = backbone.forward_sparse(x, DomainContext())
    assert torch.equal(out.indices, x.indices)
    assert out.features.shape == (len(x.indices), TINY["channels"][-1])


def test_algorithm_follows_device():
    backbone = SpUNet(**TINY)
    convs = [m for m in backbone.modules() if isinstance(m, SparseConvolution)]
    backbone.set_algo_for(torch.device("cuda"))
    assert backbone.stem.conv.algo == ConvAlgo.Native  # k5: 125 offsets, too many for implicit GEMM
    assert backbone.encoder[0].blocks[0].conv1.algo == ConvAlgo.MaskImplicitGemm
    assert all(c.algo == cuda_default_algo(c) for c in convs)
    backbone(make_batch(n=400))  # the forward switches everything back to Native on CPU
    assert all(c.algo == ConvAlgo.Native for c in convs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu():
    model = tiny_model("pdnorm", "language").eval()
    batch = make_batch()
    with torch.no_grad():
        cpu = model(batch)
        gpu_batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        gpu = model.cuda()(gpu_batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = model(gpu_batch)
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-2)
    assert torch.isfinite(amp).all() and amp.dtype == torch.float32


def test_cpu_autocast_runs_and_keeps_language_logits_fp32():
    model = tiny_model("pdnorm", "language")
    batch = make_batch("scannet", n=600)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch)
        loss = segmentation_loss(logits, batch["segment"])
    loss.backward()
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    with torch.no_grad():
        assert torch.allclose(logits, model(batch), atol=0.5)  # backbone in fp32 either way


@pytest.mark.parametrize("decoupled", [True, False])
def test_zero_init_pdnorm_equals_plain(decoupled):
    plain = tiny_model("none", seed=1)
    ppt = tiny_model("pdnorm", seed=2, decoupled_bn=decoupled)
    shared = {k: v for k, v in plain.state_dict().items() if k in ppt.state_dict()}
    assert any(".conv." in k for k in shared)
    ppt.load_state_dict(shared, strict=False)
    batch = make_batch("scannet")
    # eval first: the running statistics are still equal (train-mode calls update them)
    for train in (False, True):
        plain.train(train), ppt.train(train)
        with torch.no_grad():
            expected = plain(batch)
            assert torch.allclose(expected, ppt(batch, prompt="mean"), atol=1e-5)  # no update
            assert torch.allclose(expected, ppt(batch), atol=1e-5)


def test_prompt_and_modulation_learn_over_two_steps():
    model = tiny_model("pdnorm")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    table = model.prompts.table.weight
    modulation = next(m for m in model.modules() if isinstance(m, PDNorm)).modulation[1].weight
    grads = []
    for step in range(2):
        batch = make_batch("scannet", seed=step)
        opt.zero_grad()
        segmentation_loss(model(batch), batch["segment"]).backward()
        grads.append((table.grad.clone(), modulation.grad.clone()))
        opt.step()
    (table0, mod0), (table1, mod1) = grads
    assert table0.abs().sum() == 0  # zero modulation: the prompt cannot matter yet
    assert mod0.abs().sum() > 0  # ... but the modulation itself learns at once
    scannet = model.prompts.names.index("scannet")
    assert table1[scannet].abs().sum() > 0 and mod1.abs().sum() > 0
    others = [i for i in range(len(model.prompts.names)) if i != scannet]
    assert table1[others].abs().sum() == 0


@pytest.mark.parametrize("prompt", ["inject", "xattn"])
def test_adapters_start_silent_and_learn(prompt):
    model = tiny_model(prompt)
    adapters = [m for m in model.modules() if isinstance(m, (PromptInjection, PromptCrossAttention))]
    assert len(adapters) == 8  # one per basic block of the tiny model
    batch = make_batch("structured3d")
    segmentation_loss(model(batch), batch["segment"]).backward()
    out = adapters[0].proj.weight if prompt == "inject" else adapters[0].out.weight
    assert out.abs().sum() == 0 and out.grad.abs().sum() > 0
    ids = {id(p) for p in model.prompt_parameters()}
    assert id(out) in ids and id(model.prompts.table.weight) in ids
    assert not any(id(p) in ids for p in model.head.parameters())


def test_mean_domain_uses_mixture_statistics():
    norm = PDNorm(4, ("a", "b"), prompt_dim=8).eval()
    norm.norms["a"].running_mean.fill_(1.0), norm.norms["b"].running_mean.fill_(3.0)
    norm.norms["a"].running_var.fill_(1.0), norm.norms["b"].running_var.fill_(1.0)
    x = torch.randn(10, 4)
    y = norm(x, DomainContext("mean", torch.zeros(1, 8)))
    expected = (x - 2.0) / torch.sqrt(torch.tensor(2.0 + 1e-3))  # mixture: mean 2, var 1 + 1
    assert torch.allclose(y, expected, atol=1e-5)
    with pytest.raises(KeyError, match="valid"):
        norm(x, DomainContext("c", torch.zeros(1, 8)))


def give_domains_their_own_behaviour(model: Segmentor, seed: int = 0) -> None:
    """Non-zero prompt modulation and distinct per-dataset BN statistics and affines.

    A fresh model has zero-initialised modulation and identical fresh BNs, so every prompt
    gives the same output and an ignored prompt override would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PDNorm):
                linear = m.modulation[1]
                linear.weight.copy_(0.3 * torch.randn(linear.weight.shape, generator=g))
                for bn in m.norms.values():
                    c = bn.num_features
                    bn.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                    bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
                    bn.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                    bn.bias.copy_(0.2 * torch.randn(c, generator=g))


def test_prompt_override_selects_that_domain():
    model = tiny_model("pdnorm").eval()
    give_domains_their_own_behaviour(model)
    batch = make_batch("scannet")
    table = model.prompts.table.weight
    with torch.no_grad():
        logits = {p: model(batch, prompt=p) for p in (None, "s3dis", "structured3d", "mean")}
        for p, out in logits.items():
            assert out.shape == (len(batch["segment"]), len(NAMES["scannet"]))  # scannet's classes
            # the same as building the domain context by hand: that prompt row, those statistics
            domain = p or "scannet"
            prompt = table.mean(0, keepdim=True) if p == "mean" else table[model.prompts.names.index(domain)][None]
            by_hand = model.head(model.backbone(batch, DomainContext(domain, prompt)), "scannet")
            assert torch.allclose(out, by_hand, atol=1e-5), p
            if p not in (None, "mean"):  # = the backbone reading the points as that dataset's
                as_other = model.forward_features(dict(batch, dataset=p))
                assert torch.allclose(model.forward_features(batch, prompt=p), as_other, atol=1e-5)
    names = list(logits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (logits[a] - logits[b]).abs().max() > 1e-2, (a, b)  # every prompt matters


def test_prompt_errors():
    model = tiny_model("pdnorm").eval()
    batch = make_batch("scannet", n=400)
    with pytest.raises(KeyError, match="scannet, s3dis, mean"):
        model(batch, prompt="scanet")
    with pytest.raises(KeyError, match="valid prompts"):
        model(dict(batch, dataset="newset"))
    with pytest.raises(ValueError, match="pdnorm"):
        Segmentor(NAMES, backbone=TINY, prompt="pdn", text_embeddings=text_embeddings())
    with pytest.raises(ValueError, match="union"):
        Segmentor(NAMES, backbone=TINY, head="lang", text_embeddings=text_embeddings())
    with pytest.raises(ValueError, match="text_embeddings"):
        Segmentor(NAMES, backbone=TINY, head="language")


@pytest.mark.parametrize("head", HEADS)
def test_predictions_stay_in_dataset_classes(head):
    model = tiny_model("none", head).eval()
    for dataset, names in NAMES.items():
        with torch.no_grad():
            logits = model(make_batch(dataset, n=600))
        assert logits.shape[1] == len(names)
        assert logits.argmax(1).max() < len(names)


def test_union_head_columns():
    union, index = union_label_space(dict(NAMES))
    assert len(union) == len(set(union))
    assert {"ceiling", "wall", "otherprop", "board"} <= set(union)
    head = UnionHead(8, NAMES)
    x = torch.randn(5, 8)
    full = head.classifier(x)
    for dataset, names in NAMES.items():
        logits = head(x, dataset)
        for i, name in enumerate(names):  # every column is the union column of the same name
            assert torch.equal(logits[:, i], full[:, union.index(name)])
    assert union[index["s3dis"][0]] == "ceiling" == NAMES["s3dis"][0]
    head.set_label_space("sub", ["sofa", "ceiling"])
    assert torch.equal(head(x, "sub"), full[:, [union.index("sofa"), union.index("ceiling")]])
    with pytest.raises(KeyError, match="language head"):
        head.set_label_space("new", ["spaceship"])


@pytest.mark.parametrize("channels, dim", [(8, 32), (32, 16)])  # feature-width form / projected form
def test_language_head_equals_the_projected_form_with_gradients(channels, dim):
    """The head's logits and gradients (features, weight, bias) equal the reference's
    ``s * normalize(W x + b) @ T^T``; a non-zero bias, since a dropped bias term (b.t_k,
    2 x.W^T b or |b|^2) would go unseen at its zero initialisation. An all-zero projection
    (x = 0, b = 0) must give zero logits and finite gradients (the eps keeps 0 / 0 out)."""
    emb = text_embeddings(dim=dim)
    head = LanguageHead(channels, emb, logit_scale=100.0)
    with torch.no_grad():
        head.proj.bias.normal_(0.0, 0.5)
    x = torch.randn(40, channels, requires_grad=True)
    upstream = torch.randn(40, len(NAMES["scannet"]))
    logits = head(x, "scannet")
    grads = torch.autograd.grad((logits * upstream).sum(), [x, head.proj.weight, head.proj.bias])
    ref = 100.0 * F.normalize(F.linear(x, head.proj.weight, head.proj.bias), dim=-1) @ emb["scannet"].t()
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, head.proj.weight, head.proj.bias])
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        head.proj.bias.zero_()
    zero = torch.zeros(3, channels, requires_grad=True)
    out = head(zero, "scannet")
    (g,) = torch.autograd.grad(out.sum(), [zero])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(g).all()


def test_language_head_uses_its_datasets_embeddings():
    emb = text_embeddings(dim=16)
    head = LanguageHead(8, emb, logit_scale=100.0)
    x = torch.randn(7, 8)
    feat = F.normalize(head.proj(x), dim=-1)
    for dataset in NAMES:
        assert torch.allclose(head(x, dataset), 100.0 * feat @ emb[dataset].t(), atol=1e-4)
    perm = torch.randperm(len(NAMES["scannet"]), generator=torch.Generator().manual_seed(0))
    head.set_label_space("shuffled", None, emb["scannet"][perm])
    assert torch.allclose(head(x, "shuffled"), head(x, "scannet")[:, perm], atol=1e-5)
    # label spaces added later travel in the state dict and load into a fresh head
    state = head.state_dict()
    fresh = LanguageHead(8, text_embeddings(dim=16, seed=1))
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(x, "shuffled"), head(x, "shuffled"))
    assert torch.allclose(fresh.embeddings("s3dis"), emb["s3dis"])
    with pytest.raises(ValueError, match="embeddings must be"):
        head.set_label_space("bad", ["a"], torch.randn(1, 5))
    with pytest.raises(KeyError, match="valid"):
        head(x, "missing")


def test_open_vocabulary_label_space_on_segmentor():
    model = tiny_model("pdnorm", "language").eval()
    model.set_label_space("newset", ["lamp", "bed", "floor"], torch.randn(3, 16))
    with torch.no_grad():
        logits = model(make_batch("scannet", n=600) | {"dataset": "newset"}, prompt="mean")
    assert logits.shape[1] == 3
    with pytest.raises(NotImplementedError, match="language head"):
        tiny_model("none", "decoupled").set_label_space("newset", ["lamp"], None)


def test_loss_ignores_and_checks_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    segment = torch.tensor([0, -1, 2, -1])
    expected = F.cross_entropy(logits[[0, 2]], segment[[0, 2]])
    assert torch.allclose(segmentation_loss(logits, segment), expected)
    empty = segmentation_loss(logits, torch.full((4,), -1))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        segmentation_loss(logits, torch.tensor([0, 1, 2, 3]))


def test_overfits_one_tiny_batch():
    model = tiny_model("pdnorm", "language")
    batch = make_batch("scannet", n=400, extent=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = segmentation_loss(model(batch), batch["segment"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("backbone", ["spunet", "ptv3"])
def test_mean_prompt_averages_trained_domains_only(backbone):
    """A val dataset outside data.mix is in the model but untrained (random prompt row, BN
    statistics 0 / 1). build_model makes "mean" average the trained domains only: with one
    trained domain "mean" is that domain; averaging the untrained one in at weight 1/2 is not."""
    from ppt.config import load_config
    from ppt.engine.build import build_model

    tiny = (["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]"] if backbone == "spunet" else
            ["model.backbone=ptv3", "ptv3.enc_depths=[1,1]", "ptv3.enc_channels=[8,16]", "ptv3.enc_heads=[1,2]",
             "ptv3.dec_depths=[1]", "ptv3.dec_channels=[8]", "ptv3.dec_heads=[1]", "ptv3.patch_size=64",
             "ptv3.drop_path=0.0", "ptv3.shuffle_orders=false"])
    cfg = load_config(None, ["data.mix={scannet: 1}", "data.val=[scannet, s3dis]",
                             "model.head=language", "model.prompt_dim=16", "model.zero_init=false", *tiny])
    torch.manual_seed(0)
    model = build_model(cfg, text_embeddings(16)).eval()
    with torch.no_grad():  # a trained scannet domain: statistics and prompt of its own
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    batch = make_batch("scannet", n=1500)
    with torch.no_grad():
        mean, own = model(batch, prompt="mean"), model(batch, prompt="scannet")
        assert torch.allclose(mean, own, atol=1e-4, rtol=1e-4)
        from ppt.models.prompts import set_mean_domains

        set_mean_domains(model, ["scannet", "s3dis"])  # what "mean over every domain" computed
        assert not torch.allclose(model(batch, prompt="mean"), own, atol=1e-2)
