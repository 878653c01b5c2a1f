"""Pointcept SpUNet-family conversion against the reference's own outputs (fixtures).

tests/fixtures/pointcept/spunet/ holds tiny reference models, an input batch and the reference's
logits (made by ``bench/pointcept_parity.py --write-fixtures``; README there). No test here
imports the reference. Each test names the mapping bug it catches.
"""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo

from ppt.engine.build import build_model, text_embeddings_from_state
from ppt.interop import ConversionError
from ppt.interop import pointcept as interop
from ppt.interop.pointcept_config import load_pointcept_config
from ppt.interop.pointcept_shared import DATASETS_KEY
from ppt.interop.pointcept_spunet import final_to_linear, linear_to_final

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pointcept" / "spunet"
CASES = ("spunet_v1m1", "ppt_v1m1_spunet_v1m3", "ppt_v1m1_spunet_v1m3_plain_norm")
REL_TOL = 1e-5  # fp32: the language head's feature-width form rounds differently (~1e-6)


def fixture(case: str) -> dict:
    return torch.load(FIXTURES / f"{case}.pth", weights_only=True)


def convert(case: str, mutate=None, domains=None):
    """(converted model in eval mode, fixture, reference model_cfg, our state); ``domains``
    forces this project's domain (prompt-table) order."""
    fx = fixture(case)
    ref = load_pointcept_config(FIXTURES / f"{case}.py")
    if domains is not None:
        ref["model"][DATASETS_KEY] = list(domains)
    model_cfg = interop.reference_model(ref)
    state = dict(fx["state_dict"])
    if mutate is not None:
        mutate(state)
    cfg = interop.config_from_reference(ref, model_cfg, state)
    ours = interop.convert_state(state, model_cfg, cfg)
    model = build_model(cfg, text_embeddings_from_state(ours))
    model.load_state_dict(ours)
    return model.eval(), fx, model_cfg, ours


def max_rel_diff(model, fx) -> float:
    worst = 0.0
    with torch.no_grad():
        for dataset, expected in fx["outputs"].items():
            got = model(dict(fx["batch"], dataset=dataset))
            worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    return worst


@pytest.mark.parametrize("case", CASES)
def test_converted_logits_equal_reference(case):
    """The converted model computes the reference's logits on every dataset (any wrong key,
    order, transpose, condition mapping or text row shows up here)."""
    model, fx, _, _ = convert(case)
    assert max_rel_diff(model, fx) < REL_TOL


@pytest.mark.parametrize("case", CASES[1:])
def test_domain_order_differs_from_reference_tables(case):
    """With this project's domains in another order than PPT's conditions (and the backbone's),
    prompt rows, BN statistics and text rows still follow the dataset NAMES (bug caught: any of
    the three tables taken by position, which the conditions order would hide)."""
    model, fx, _, ours = convert(case, domains=["s3dis", "scannet", "structured3d"])
    assert model.domains == ("s3dis", "scannet", "structured3d")
    assert max_rel_diff(model, fx) < REL_TOL
    ref = fx["state_dict"]  # PPT conditions: Structured3D, ScanNet, S3DIS
    assert torch.equal(ours["prompts.table.weight"][0], ref["embedding_table.weight"][2])


def test_final_conv_read_as_spconv_computes():
    """spconv's kernel-size-1 path computes ``x @ w.view(in, out)``: the Linear must be
    ``w.reshape(C, K).t()`` (bug caught: the plain ``w.reshape(K, C)`` "transpose")."""
    torch.manual_seed(0)
    grid = torch.unique(torch.randint(0, 8, (60, 3)), dim=0).int()
    indices = torch.cat([torch.zeros(len(grid), 1, dtype=torch.int32), grid], 1)
    x = spconv.SparseConvTensor(torch.randn(len(grid), 6), indices, [10, 10, 10], 1)
    conv = spconv.SubMConv3d(6, 5, kernel_size=1, padding=1, bias=True, algo=ConvAlgo.Native)
    torch.nn.init.normal_(conv.weight)
    with torch.no_grad():
        expected = conv(x).features
        linear = final_to_linear(conv.weight)
        assert torch.allclose(x.features @ linear.t() + conv.bias, expected, atol=1e-5)
        assert not torch.allclose(x.features @ conv.weight.reshape(5, 6).t() + conv.bias, expected, atol=1e-3)
    assert torch.equal(linear_to_final(linear), conv.weight)


def test_pdnorm_statistics_and_prompts_by_condition_name():
    """BN ``bns.<i>`` follow the BACKBONE's conditions (ScanNet, S3DIS, Structured3D) and prompt
    rows PPT's own conditions (Structured3D, ScanNet, S3DIS), both mapped by name (bug caught:
    either table taken by position, or the two orders confused)."""
    _, fx, _, ours = convert("ppt_v1m1_spunet_v1m3")
    ref = fx["state_dict"]
    for i, d in enumerate(("scannet", "s3dis", "structured3d")):
        assert torch.equal(ours[f"backbone.stem.norm.norms.{d}.running_mean"],
                           ref[f"backbone.conv_input.bn.bns.{i}.running_mean"])
    for i, d in enumerate(("structured3d", "scannet", "s3dis")):
        assert torch.equal(ours["prompts.table.weight"][["structured3d", "scannet", "s3dis"].index(d)],
                           ref["embedding_table.weight"][i])


def test_text_rows_follow_reference_valid_index_incl_s3dis_quirk():
    """Each label space's text rows are ``class_embedding[valid_index[c]]`` in label order,
    including S3DIS's row 0 ("ceiling" here) = the text of "wall", as the reference computed
    (bug caught: rows re-picked by this project's class names, or ScanNet's rows for S3DIS)."""
    _, fx, model_cfg, ours = convert("ppt_v1m1_spunet_v1m3")
    emb = fx["state_dict"]["class_embedding"]
    names = model_cfg["class_name"]
    assert torch.equal(ours["head.text_s3dis"][0], emb[names.index("wall")])
    assert torch.equal(ours["head.text_s3dis"][2], emb[names.index("chair")])  # S3DIS label 2 is "wall"
    assert torch.equal(ours["head.text_scannet"][14], emb[names.index("refrigerator")])


def test_decoder_stages_reversed_and_blocks_in_order():
    """The reference's ``up[s]`` / ``dec[s]`` run from s = 3 down: ours ``decoder[3 - s]``; and
    block i stays block i (bug caught: decoder taken in list order, which has the same shapes
    at these widths, or blocks swapped)."""
    _, fx, _, ours = convert("spunet_v1m1")
    ref = fx["state_dict"]
    assert torch.equal(ours["backbone.decoder.0.up.conv.weight"], ref["backbone.up.3.0.weight"])
    assert torch.equal(ours["backbone.decoder.3.up.conv.weight"], ref["backbone.up.0.0.weight"])
    assert torch.equal(ours["backbone.encoder.1.blocks.1.conv2.weight"], ref["backbone.enc.1.block1.conv2.weight"])
    assert torch.equal(ours["backbone.decoder.0.blocks.1.norm1.running_var"], ref["backbone.dec.3.block1.bn1.running_var"])


@pytest.mark.parametrize("case", CASES)
def test_export_inverts_import(case):
    """to_pointcept(to_ours(state)) gives the reference's state dict back bit for bit (bug
    caught: an asymmetric key map, or a final-conv layout written back transposed)."""
    _, fx, model_cfg, ours = convert(case)
    back = interop.family_of(model_cfg).to_pointcept(dict(ours), model_cfg)
    ref = {k: v for k, v in fx["state_dict"].items() if k != "logit_scale"}
    assert set(back) == set(ref)
    emb_rows = sorted({r for row in model_cfg.get("valid_index", ()) for r in row})
    for k, v in ref.items():
        if k == "class_embedding":  # rows no valid_index entry reads are not kept
            assert torch.equal(back[k][emb_rows], v[emb_rows])
        else:
            assert torch.equal(back[k], v), k


def test_unmapped_reference_key_is_an_error():
    """A reference key nothing consumes is named (bug caught: a silent partial load)."""
    def add(state):
        state["backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="'backbone.extra.weight' is not mapped"):
        convert("spunet_v1m1", add)


def test_missing_and_misshapen_keys_are_errors():
    with pytest.raises(ConversionError, match="lacks reference key 'backbone.final.bias'"):
        convert("spunet_v1m1", lambda s: s.pop("backbone.final.bias"))

    def wrong(state):
        state["backbone.enc.0.block0.conv1.weight"] = torch.zeros(4, 3, 3, 3, 5)
    with pytest.raises(ConversionError, match=r"'backbone.enc.0.block0.conv1.weight' has shape \(4, 3, 3, 3, 5\)"):
        convert("spunet_v1m1", wrong)


def test_logit_scale_is_read_from_the_checkpoint():
    """exp(logit_scale) of the checkpoint becomes model.logit_scale (bug caught: CLIP's 100
    assumed; the fixture holds ln 80)."""
    model, _, _, _ = convert("ppt_v1m1_spunet_v1m3")
    assert model.head.logit_scale == pytest.approx(80.0, rel=1e-6)


# --- the command line ---------------------------------------------------------------------

def cli():
    spec = importlib.util.spec_from_file_location("convert_cli", ROOT / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_import_export_roundtrip(tmp_path):
    """convert -> experiment folder -> export: the reference's tensors come back exactly, and
    the folder loads as an experiment (config.yaml + model/model_best.pth)."""
    from ppt.engine.predict import load_experiment

    main = cli()
    case = "ppt_v1m1_spunet_v1m3"
    assert main([str(FIXTURES / f"{case}.pth"), "--config", str(FIXTURES / f"{case}.py"), "--name", "ref",
                 "--exp-root", str(tmp_path)]) == 0
    cfg, model, _ = load_experiment(tmp_path / "ref")
    assert max_rel_diff(model, fixture(case)) < REL_TOL
    assert main([str(tmp_path / "ref"), "--to", "pointcept", "--out", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    ref = fixture(case)["state_dict"]
    assert set(back) == set(ref)
    assert math.isclose(back["logit_scale"].item(), ref["logit_scale"].item(), rel_tol=1e-6)
    assert all(torch.equal(back[k], ref[k]) for k in ref if k not in ("class_embedding", "logit_scale"))


def test_text_cache_by_name_for_offline_fine_tuning(tmp_path):
    """The import writes each dataset's CLIP text, picked from the reference's table by class
    NAME, as text-embedding cache files: ``ppt.text.class_embeddings`` then returns them with no
    encoder (bug caught: rows picked by valid_index, which would give S3DIS's "ceiling" the text
    of "wall" when fine-tuning)."""
    from ppt.data.classes import S3DIS13
    from ppt.text import class_embeddings

    case = "ppt_v1m1_spunet_v1m3"
    assert cli()([str(FIXTURES / f"{case}.pth"), "--config", str(FIXTURES / f"{case}.py"), "--name", "ref",
                  "--exp-root", str(tmp_path)]) == 0
    fx = fixture(case)
    table, emb = list(fx["model"]["class_name"]), fx["state_dict"]["class_embedding"]
    got = class_embeddings(S3DIS13, "clip:ViT-B-16:openai", "{}", cache_dir=tmp_path / "ref" / "text_embeddings")
    assert torch.allclose(got, emb[[table.index(n) for n in S3DIS13]])


@pytest.mark.parametrize("case", ["spunet_v1m1", "ppt_v1m1_spunet_v1m3"])
def test_export_of_a_model_trained_here(tmp_path, case):
    """An experiment without convert.json (trained here) exports with a reference model dict
    derived from its config, written as <out>.model.py; importing the export with that file
    gives the same weights back (bug caught: a derived table or order that does not invert)."""
    from ppt.engine.predict import load_experiment

    main = cli()
    args = ["--exp-root", str(tmp_path)]
    assert main([str(FIXTURES / f"{case}.pth"), "--config", str(FIXTURES / f"{case}.py"), "--name", "a", *args]) == 0
    (tmp_path / "a" / "convert.json").unlink()
    # a model trained here embeds each class NAME once (the text encoder's output): one random
    # vector per name, shared across datasets, in place of the imported (quirky) rows
    from ppt.data.dataset_file import get_dataset_info

    ckpt_path = tmp_path / "a" / "model" / "model_best.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    gen, by_name = torch.Generator().manual_seed(0), {}
    for key, emb in ckpt["model"].items():
        if key.startswith("head.text_"):
            names = get_dataset_info(key.removeprefix("head.text_")).class_names
            rows = [by_name.setdefault(n, torch.randn(emb.shape[1], generator=gen)) for n in names]
            ckpt["model"][key] = torch.nn.functional.normalize(torch.stack(rows), dim=1).to(emb.dtype)
    torch.save(ckpt, ckpt_path)
    out = tmp_path / "a.pth"
    assert main([str(tmp_path / "a"), "--to", "pointcept", "--out", str(out)]) == 0
    assert main([str(out), "--config", str(out) + ".model.py", "--name", "b", *args]) == 0
    _, a, _ = load_experiment(tmp_path / "a")
    _, b, _ = load_experiment(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("what, expected", [
    ("missing_checkpoint", "checkpoint {tmp}/nope.pth does not exist"),
    ("corrupt_checkpoint", "is corrupt or not a torch checkpoint"),
    ("missing_config", "config {tmp}/nope.py does not exist and is not a preset"),
    ("unknown_type", "'model.backbone.type=PT-v2m2' is not supported"),
    ("shape_mismatch", "has shape"),
    ("unmapped_key", "is not mapped"),
    ("exists", "already exists"),
])
def test_cli_errors_one_line_nothing_written(tmp_path, capsys, what, expected):
    main = cli()
    case = "spunet_v1m1"
    ckpt, config = FIXTURES / f"{case}.pth", FIXTURES / f"{case}.py"
    text = config.read_text()
    if what == "missing_checkpoint":
        ckpt = tmp_path / "nope.pth"
    elif what == "corrupt_checkpoint":
        ckpt = tmp_path / "bad.pth"
        ckpt.write_bytes(b"not a checkpoint")
    elif what == "missing_config":
        config = tmp_path / "nope.py"
    elif what in ("unknown_type", "shape_mismatch"):
        config = tmp_path / "cfg.py"
        config.write_text(text.replace("'SpUNet-v1m1'", "'PT-v2m2'") if what == "unknown_type"
                          else text.replace("'base_channels': 4", "'base_channels': 6"))
    elif what == "unmapped_key":
        fx = fixture(case)
        fx["state_dict"]["module.backbone.extra.weight"] = torch.zeros(1)
        ckpt = tmp_path / "extra.pth"
        torch.save({"state_dict": {"module." + k if not k.startswith("module.") else k: v
                                   for k, v in fx["state_dict"].items()}}, ckpt)
    root = tmp_path / "exp"
    if what == "exists":
        (root / "out").mkdir(parents=True)
    before = sorted(p.name for p in root.rglob("*")) if root.exists() else []
    assert main([str(ckpt), "--config", str(config), "--name", "out", "--exp-root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert expected.format(tmp=tmp_path) in err[0]
    after = sorted(p.name for p in root.rglob("*")) if root.exists() else []
    assert after == before  # nothing half-written, no temp folder left


def test_cli_process_has_no_traceback(tmp_path):
    """The real command line: one error line, exit 2 (a user error, as every tool), no traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), str(tmp_path / "x.pth"),
                             "--config", "spunet-scannet", "--name", "x", "--exp-root", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'x.pth'} does not exist"]
