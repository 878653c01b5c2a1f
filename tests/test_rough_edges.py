"""Rough edges a new user hits, one test (or a few) per edge; each failed on the behaviour before
its fix.

- converted recipe: a model converted under the reference's PTv3 config fine-tuned with this
  project's SGD 0.05 + CE instead of the config's AdamW 0.006, OneCycle, CE + Lovasz, blocks at
  0.1x, 800 epochs, batch 12, and ``convert.json`` said nothing of it.
- checkpoint / config of two model types: ``checkpoint lacks reference key ...`` instead of
  saying that they do not match and what each looks like.
- exit status: user errors exited 1 (``convert.py``, ``infer.py`` inputs), a traceback
  (``make_synthetic.py``), 1 for a missing data root (``check_data.py``), while ``--help`` says 2.
- ``infer.py`` outputs: every run rewrote one ``labels.json`` beside older predictions of
  another label set.
- ``--plan``: "samples 48" next to "24 of 24 training scenes" with no word of ``data.loop``; the
  metrics footnote's count did not match the table's n/a rows.
- PTv3 inference: the CPE index pairs rebuilt by every block, and ``infer.py`` running torch on
  every core of a busy machine (the m1 vs m2 "9.6 s vs 0.8 s").
"""
from __future__ import annotations

import importlib.util
import json
import os
import pprint
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "pointcept"
CONFIGS = FIXTURES / "configs"
sys.path.insert(0, str(REPO))
from bench.pointcept_parity_ptv3 import unpack  # noqa: E402  (pack format of the fixtures)
from test_infer import room, save_experiment  # noqa: E402  (tests/ is on sys.path under pytest)


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"ppt_rough_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def errors_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


# --- 1. the converted model keeps the reference config's recipe ---------------------------------

def converted_config(config):
    from ppt.interop.pointcept import config_from_reference, load_reference_config, reference_model

    ref, _ = load_reference_config(config)
    return config_from_reference(ref, reference_model(ref), {})


def test_ptv3_reference_config_recipe_is_carried_over():
    """The reference's ScanNet200 PT-v3m1 config: AdamW lr 0.006 (OneCycle max_lr[0]) wd 0.05,
    OneCycle pct 0.05 / div 10 / final div 1000, blocks at 0.0006 = 0.1x, CE + Lovasz, 800 epochs
    evaluated 100 times, batch 12 (before: SGD 0.05, CE, block scale 1, 100 epochs, batch 12)."""
    cfg = converted_config(CONFIGS / "scannet200" / "semseg-pt-v3m1-0-base.py")
    o, t = cfg.optim, cfg.train
    assert (o.name, o.lr, o.weight_decay, tuple(o.betas)) == ("adamw", 0.006, 0.05, (0.9, 0.999))
    assert (o.scheduler, o.pct_start, o.div_factor, o.final_div_factor) == ("onecycle", 0.05, 10.0, 1000.0)
    assert o.block_lr_scale == pytest.approx(0.1) and o.grad_clip == 0.0
    assert (t.loss, t.epochs, t.eval_every, t.amp, t.sync_bn) == ("ce+lovasz", 800, 8, True, False)
    assert (cfg.data.batch_size, cfg.data.mix3d_prob) == (12, 0.8)


def test_ppt_spunet_reference_config_recipe_and_prompt_group():
    """The PPT SpUNet config: SGD 0.05 Nesterov, final div 1e4, 100 epochs, batch 24, and no
    param_dicts group for the prompts, so they train at lr (this project's default is 0.1x)."""
    cfg = converted_config(CONFIGS / "scannet" / "semseg-ppt-v1m1-0-sc-st-spunet.py")
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.05, 0.9, True, 1e-4)
    assert (o.final_div_factor, o.prompt_lr_scale, o.block_lr_scale) == (1e4, 1.0, 1.0)
    assert (cfg.train.loss, cfg.train.epochs, cfg.data.batch_size) == ("ce", 100, 24)


PRESET_FILES = {"spunet-scannet": "semseg-spunet-v1m1-0-base.py", "ppt-spunet-sc-st": "semseg-ppt-v1m1-0-sc-st-spunet.py",
                "ptv3-scannet": "semseg-pt-v3m1-0-base.py", "ppt-ptv3-extreme-scannet": "semseg-pt-v3m1-1-ppt-extreme.py"}


@pytest.mark.parametrize("preset", list(PRESET_FILES))
def test_a_preset_carries_the_recipe_of_its_reference_file(preset):
    """``--config <preset>`` fine-tunes as ``--config <the reference file>`` would: the same
    optimiser, schedule, parameter groups, loss, epochs, evaluation interval, batch, Mix3D, AMP and
    clipping, read from the real config files (bugs caught: a preset without its recipe, as
    before, so a converted model fell back to SGD 0.05 + CE; a value copied wrong, e.g. the
    PTv3 block lr, the PPT-extreme clipping or ScanNet's 800 epochs / eval every 8)."""
    from ppt.interop.pointcept import load_reference_config, reference_model, reference_recipe
    from ppt.interop.pointcept_presets import PRESETS

    assert set(PRESET_FILES) == set(PRESETS)
    recipes = []
    for config in (preset, CONFIGS / "scannet" / PRESET_FILES[preset]):
        ref, _ = load_reference_config(config)
        recipes.append(reference_recipe(ref, reference_model(ref)))
    assert recipes[0].sections == recipes[1].sections and recipes[0].mapped == recipes[1].mapped
    assert not any("no training recipe" in line for line in recipes[0].not_mapped)
    cfg = converted_config(preset)
    expected = {"spunet-scannet": ("sgd", 0.05, 1.0, "ce", 800, 12), "ppt-spunet-sc-st": ("sgd", 0.05, 1.0, "ce", 100, 24),
                "ptv3-scannet": ("adamw", 0.006, 0.1, "ce+lovasz", 800, 12),
                "ppt-ptv3-extreme-scannet": ("adamw", 0.005, 0.1, "ce+lovasz", 100, 24)}[preset]
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.block_lr_scale, cfg.train.loss, cfg.train.epochs,
            cfg.data.batch_size) == pytest.approx(expected)


def test_convert_writes_the_recipe_and_what_did_not_map(tmp_path, capsys):
    """tools/convert.py under the real ScanNet200 config (model scaled down to the tiny PT-v3m1
    fixture) writes the recipe into config.yaml, lists it in convert.json (recipe / not_mapped)
    and prints both; a param_dicts group without a counterpart is named."""
    from ppt.config import load_config

    fixture = torch.load(FIXTURES / "ptv3" / "pt-v3m1.pth", weights_only=False)
    state = unpack(fixture["state"])
    state["seg_head.weight"] = torch.cat([state["seg_head.weight"], torch.zeros(180, 8)])
    state["seg_head.bias"] = torch.cat([state["seg_head.bias"], torch.zeros(180)])
    torch.save({"state_dict": state}, tmp_path / "model_best.pth")
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS / "_base_", configs / "_base_")
    text = (CONFIGS / "scannet200" / "semseg-pt-v3m1-0-base.py").read_text()
    start = text.index("model = dict(")
    end = text.index("\n)\n", start) + 3
    model = {**fixture["case"]["model"], "num_classes": 200,
             "criteria": [dict(type="CrossEntropyLoss", loss_weight=1.0, ignore_index=-1),
                          dict(type="LovaszLoss", mode="multiclass", loss_weight=1.0, ignore_index=-1)]}
    text = text[:start] + f"model = {pprint.pformat(model)}\n" + text[end:]
    text = text.replace('param_dicts = [dict(keyword="block", lr=0.0006)]',
                        'param_dicts = [dict(keyword="block", lr=0.0006), dict(keyword="modulation", lr=0.001)]')
    config = configs / "scannet200" / "tiny.py"
    config.parent.mkdir()
    config.write_text(text)

    assert tool("convert").main([str(tmp_path / "model_best.pth"), "--config", str(config), "--name", "conv",
                                 "--exp-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(tmp_path / "conv" / "config.yaml", [])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.block_lr_scale) == ("adamw", 0.006, pytest.approx(0.1))
    assert (cfg.train.loss, cfg.train.epochs, cfg.data.batch_size) == ("ce+lovasz", 800, 12)
    record = json.loads((tmp_path / "conv" / "convert.json").read_text())
    mapped = {m["key"]: m for m in record["recipe"]}
    assert mapped["optim.lr"]["value"] == 0.006 and "max_lr" in mapped["optim.lr"]["from"]
    assert mapped["optim.block_lr_scale"]["from"].startswith("param_dicts[0] keyword 'block'")
    assert any("'modulation'" in line for line in record["not_mapped"])
    assert any("transform" in line for line in record["not_mapped"])
    assert "  optim.name = adamw  (optimizer.type)" in out and "  train.loss = ce+lovasz" in out
    assert re.search(r"^not mapped: param_dicts keyword 'modulation'", out, re.M)


# --- 2. a checkpoint of another model type than --config ---------------------------------------

def ptv3_files(case: str, folder: Path) -> tuple[Path, Path]:
    """(checkpoint, config) of a PTv3 conversion fixture as a user has them."""
    fixture = torch.load(FIXTURES / "ptv3" / f"{case}.pth", weights_only=False)
    ckpt, config = folder / f"{case}.pth", folder / f"{case}.py"
    torch.save({"state_dict": unpack(fixture["state"])}, ckpt)
    config.write_text(f"model = {pprint.pformat(fixture['case']['model'])}\n"
                      f"data = {pprint.pformat(fixture['case']['data'])}\n")
    return ckpt, config


@pytest.mark.parametrize("checkpoint, config, looks, describes", [
    ("spunet_v1m1", "scannet200", "SpUNet-v1m1 under DefaultSegmentor", "PT-v3m1 under DefaultSegmentorV2"),
    ("pt-v3m1", "ppt-v1m1_over_pt-v3m1", "PT-v3m1 under DefaultSegmentorV2", "PT-v3m1 under PPT-v1m1"),
    ("pt-v3m2_decoder", "pt-v3m1", "PT-v3m2 under DefaultSegmentorV2", "PT-v3m1 under DefaultSegmentorV2"),
])
def test_checkpoint_and_config_of_other_model_types_are_named(tmp_path, capsys, checkpoint, config, looks,
                                                                describes):
    """Before: ``error: checkpoint lacks reference key 'backbone.conv_input.0.weight'`` (or a
    PDNorm / head key), exit 1. Now: they do not match, and what each looks like."""
    if checkpoint == "spunet_v1m1":
        ckpt = FIXTURES / "spunet" / "spunet_v1m1.pth"
    else:
        ckpt, _ = ptv3_files(checkpoint, tmp_path)
    if config == "scannet200":
        cfg = CONFIGS / "scannet200" / "semseg-pt-v3m1-0-base.py"
    else:
        _, cfg = ptv3_files(config, tmp_path)
    rc = tool("convert").main([str(ckpt), "--config", str(cfg), "--name", "x", "--exp-root", str(tmp_path / "exp")])
    errors = errors_of(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1, errors
    assert "the checkpoint and --config do not match" in errors[0]
    assert f"the checkpoint looks like {looks}" in errors[0] and f"describes {describes}" in errors[0]
    assert not (tmp_path / "exp" / "x").exists()


def test_checkpoint_model_type_from_key_names():
    from ppt.interop.pointcept_shared import checkpoint_model_type

    spunet = torch.load(FIXTURES / "spunet" / "ppt_v1m1_spunet_v1m3.pth", weights_only=False)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in spunet.items()}
    assert checkpoint_model_type(state)[:2] == ("PPT-v1m1", "SpUNet-v1m3")
    for case, expected in (("ppt-v1m2_over_pt-v3m1", ("PPT-v1m2", "PT-v3m1")),
                           ("ppt-v1m3_over_pt-v3m2", ("PPT-v1m3", "PT-v3m2")),
                           ("pt-v3m2_encoder_mode", ("DefaultSegmentorV2", "PT-v3m2"))):
        state = unpack(torch.load(FIXTURES / "ptv3" / f"{case}.pth", weights_only=False)["state"])
        assert checkpoint_model_type(state)[:2] == expected, case
    encoder = {k: v for k, v in state.items() if k.startswith("backbone.")}
    assert checkpoint_model_type(encoder)[:2] == (None, "PT-v3m2")  # a pretraining encoder: no head said


# --- 3. exit status 2 for user errors, in every tool, and --help says so ------------------------

@pytest.mark.parametrize("name", ["convert", "infer", "check_data", "embed_classes", "make_synthetic"])
def test_help_states_the_exit_status(name, capsys):
    with pytest.raises(SystemExit) as stop:
        tool(name).main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"exit status:? .*2 (for )?a user error", text, re.I), text[-600:]


def test_user_errors_exit_2_with_one_error_line(tmp_path, capsys):
    """Before: convert 1, check_data 1 (missing root), make_synthetic a traceback."""
    (tmp_path / "file").write_text("x")
    cases = [
        ("convert", [str(tmp_path / "x.pth"), "--config", "spunet-scannet", "--name", "x",
                     "--exp-root", str(tmp_path)], "does not exist"),
        ("check_data", [str(tmp_path / "no_data")], "is not a folder"),
        ("make_synthetic", ["--out", str(tmp_path / "file" / "data"), "--scenes", "1"], "cannot write"),
        ("embed_classes", ["--classes", " , "], "empty"),
    ]
    for name, args, message in cases:
        rc = tool(name).main(args)
        errors = errors_of(capsys.readouterr().err)
        assert rc == 2 and len(errors) == 1 and message in errors[0], (name, rc, errors)


def test_infer_input_that_cannot_be_labelled_exits_2(tmp_path, capsys):
    """Before: 1. The other input is still labelled."""
    exp = save_experiment(tmp_path / "exp")
    np.save(tmp_path / "a.npy", np.concatenate(room(300), 1))
    (tmp_path / "empty.txt").write_text("")
    rc = tool("infer").main([str(tmp_path / "a.npy"), str(tmp_path / "empty.txt"), "--exp", str(exp),
                             "--device", "cpu"])
    errors = errors_of(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and "empty.txt" in errors[0]
    assert (exp / "infer" / "latest" / "a_pred.npy").is_file()


# --- 4. one folder per infer run, its labels.json beside its predictions ------------------------

def test_each_infer_run_keeps_its_own_labels(tmp_path, capsys):
    """A default run (the union label set) and a ``--prompt s3dis`` run (13 classes): before,
    both wrote exp/infer/ and the second labels.json described the first run's ids."""
    exp = save_experiment(tmp_path / "exp")
    np.save(tmp_path / "a.npy", np.concatenate(room(400), 1))
    infer = tool("infer")
    runs = []
    for args in ([], ["--prompt", "s3dis"]):
        assert infer.main([str(tmp_path / "a.npy"), "--exp", str(exp), "--device", "cpu", *args]) == 0
        out = capsys.readouterr().out
        runs.append(exp / "infer" / os.readlink(exp / "infer" / "latest"))
        assert f"into {runs[-1]}" in out  # the run's folder is printed
    assert runs[0] != runs[1] and runs[0].parent == runs[1].parent == exp / "infer"
    sizes = []
    for run in runs:
        names = json.loads((run / "labels.json").read_text())["class_names"]
        pred = np.load(run / "a_pred.npy")
        assert pred.max() < len(names)
        sizes.append(len(names))
    assert sizes[1] == 13 and sizes[0] > 13


def test_infer_out_folder_of_another_label_set_is_refused(tmp_path, capsys):
    exp = save_experiment(tmp_path / "exp")
    np.save(tmp_path / "a.npy", np.concatenate(room(300), 1))
    out = tmp_path / "out"
    infer = tool("infer")
    assert infer.main([str(tmp_path / "a.npy"), "--exp", str(exp), "--out", str(out), "--device", "cpu"]) == 0
    before = (out / "labels.json").read_text()
    capsys.readouterr()
    rc = infer.main([str(tmp_path / "a.npy"), "--exp", str(exp), "--out", str(out), "--prompt", "s3dis",
                     "--device", "cpu"])
    errors = errors_of(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and "another label set" in errors[0]
    assert (out / "labels.json").read_text() == before


# --- 5. --plan says the loop; the metrics footnote counts the rows shown -------------------------

def test_plan_says_why_samples_are_twice_the_scenes():
    from ppt.config import load_config
    from ppt.engine.plan import format_plan, make_plan

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.label_budget=20"])
    assert cfg.data.loop == 2
    text = format_plan(make_plan(cfg, sizes={"structured3d": (24, 6), "scannet": (24, 6), "s3dis": (25, 5)}))
    assert re.search(r"^structured3d\s+4\s+48\s", text, re.M)
    assert "structured3d: 48 samples = 24 training scenes x data.loop 2" in text


def test_metrics_footnote_counts_match_the_table():
    """Classes 0-1 labelled, 2-3 only predicted (IoU 0, Acc n/a), 4 absent (both n/a): the
    footnote says 4 classes with an IoU (1 n/a row) and 2 with an accuracy (3 n/a rows)."""
    from ppt.metrics import ConfusionMeter, format_table

    meter = ConfusionMeter(5)
    meter.update(torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1]))
    table = format_table(meter.summary(list("abcde")))
    rows = [ln.split() for ln in table.splitlines() if ln[:1] in "abcde" and len(ln.split()) == 4]
    iou_na = sum(r[1] == "n/a" for r in rows)
    acc_na = sum(r[2] == "n/a" for r in rows)
    assert (iou_na, acc_na) == (1, 3)
    note = table.splitlines()[-1]
    assert f"mIoU over the {5 - iou_na} classes labelled or predicted ({iou_na} IoU n/a rows left out)" in note
    assert f"mAcc over the {5 - acc_na} classes labelled ({acc_na} Acc n/a rows left out)" in note


# --- 6. PTv3 inference cost -----------------------------------------------------------------

def test_ptv3_builds_each_levels_cpe_index_pairs_once(monkeypatch):
    """Every block's CPE conv reuses its level's index pairs (before: rebuilt by each of the 9
    blocks; a paper-size model rebuilt them 22 times for its 5 levels)."""
    import spconv.pytorch.ops as ops

    from ppt.models.ptv3 import PointTransformerV3

    model = PointTransformerV3(enc_depths=(1, 1, 3, 1), enc_channels=(8, 8, 8, 16), enc_heads=(1, 2, 2, 2),
                               dec_depths=(1, 1, 1), dec_channels=(8, 8, 8), dec_heads=(1, 2, 2), patch_size=8,
                               drop_path=0.0, stem="conv").eval()
    calls = []
    original = ops.get_indice_pairs
    monkeypatch.setattr(ops, "get_indice_pairs", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    grid = torch.unique(torch.randint(0, 40, (3000, 3), generator=g), dim=0)
    batch = {"grid_coord": grid, "feat": torch.randn(len(grid), 6, generator=g), "offset": torch.tensor([len(grid)])}
    with torch.no_grad():
        model(batch)
    assert len(calls) == 1 + 4  # the k5 stem, then one per level (4 levels, 9 blocks)


def test_infer_uses_the_free_cores_only(tmp_path, capsys, monkeypatch):
    """On 2 cores with one kept busy by another job, infer.py runs 1 torch thread, as training
    and tools/test.py do (before: every core; OpenMP threads stalled on the busy one), and gives
    an in-process caller its own count back."""
    import ppt.engine.threads as threads

    exp = save_experiment(tmp_path / "exp")
    np.save(tmp_path / "a.npy", np.concatenate(room(300), 1))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda *a, **k: 1.0)
    counts, original = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: counts.append(n) or original(n))
    before = torch.get_num_threads()
    assert tool("infer").main([str(tmp_path / "a.npy"), "--exp", str(exp), "--device", "cpu"]) == 0
    assert counts[0] == 1 and torch.get_num_threads() == before
    assert "1 torch thread(s) (--threads 0 = auto: 2 cores, 1.0 busy with other work)" in capsys.readouterr().out


def test_infer_rejects_negative_threads_in_one_line(tmp_path, capsys):
    """``--threads -1`` means "re-check during the run" to training only; infer.py chooses once
    (through the Predictor) and says so instead of printing a follower note it does not honour
    (bug caught: -1 accepted and reported as "re-checked every 30 s")."""
    exp = save_experiment(tmp_path / "exp")
    np.save(tmp_path / "a.npy", np.concatenate(room(300), 1))
    assert tool("infer").main([str(tmp_path / "a.npy"), "--exp", str(exp), "--device", "cpu", "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --threads -1: must be >= 0") and "Traceback" not in err
    assert not (exp / "infer").exists()  # nothing half-written


def test_predictor_uses_the_free_cores_only_and_gives_the_count_back(tmp_path, monkeypatch):
    """ppt.Predictor (the Python entry point) chooses its threads as infer.py does: on 2 cores
    with one busy, the model runs on 1 thread (before: every core), the caller's count is back
    after each call, and threads=3 / None are taken as asked (bugs caught: the choice not made,
    made but not applied during the forward, or left applied after the call)."""
    import ppt.engine.threads as threads
    from ppt.engine.predict import Predictor

    exp = save_experiment(tmp_path / "exp")
    points = np.concatenate(room(300), 1)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda *a, **k: 1.0)
    torch.set_num_threads(2)
    try:
        for asked, expected in ((0, 1), (3, 3), (None, 2)):
            predictor = Predictor(exp, device="cpu", threads=asked)
            seen = []
            original = predictor._score
            monkeypatch.setattr(predictor, "_score", lambda scene: seen.append(torch.get_num_threads()) or original(scene))
            predictor.predict(points)
            assert seen and set(seen) == {expected}, (asked, seen)
            assert torch.get_num_threads() == 2
        assert "2 cores, 1.0 busy with other work" in Predictor(exp, device="cpu").threads_note
    finally:
        torch.set_num_threads(1)  # the suite's setting (tests/conftest.py)
