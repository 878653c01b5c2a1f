"""Config files and overrides: every shipped config loads; mistakes name the key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ppt.config import Config, ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_round_trips(path, tmp_path):
    # fine-tuning stages name their base weights on the command line (tools/train.sh --weights)
    needs_base = (yaml.safe_load(path.read_text()).get("peft") or {}).get("stage", "none") != "none"
    cfg = load_config(path, ["peft.base=exp/base/model/model_best.pth"] if needs_base else [])
    assert isinstance(cfg, Config)
    assert len(cfg.model.channels) == 8 and cfg.data.mix
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg  # the resolved config reloads unchanged


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "scannet_spunet", "s3dis_spunet", "structured3d_spunet", "joint_naive", "ppt_joint"} <= names


def test_ppt_joint_is_the_paper_recipe():
    cfg = load_config(Path(CONFIGS[0]).parent / "ppt_joint.yaml")
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.05, 0.9, True, 1e-4)
    assert (o.scheduler, o.pct_start, o.div_factor, o.final_div_factor) == ("onecycle", 0.05, 10.0, 1e4)
    assert o.prompt_lr_scale == 0.1 and cfg.train.epochs == 100 and cfg.data.batch_size == 24 and cfg.train.amp
    assert cfg.data.mix == {"structured3d": 4, "scannet": 2, "s3dis": 1}
    assert cfg.model.text_encoder.startswith("clip:ViT-B-16") and cfg.model.prompt == "pdnorm"


def test_unknown_key_in_file_names_file_and_nearest_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"unknown config key 'optim.lrr' in {path}; did you mean 'optim.lr'?"


def test_unknown_section_suggests_section(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'\?"):
        load_config(path)


@pytest.mark.parametrize("text, match", [
    ("train:\n  epochs: ten\n", r"'train.epochs' in .* must be int, got str \('ten'\)"),
    ("train:\n  amp: 1\n", r"'train.amp' .* must be bool, got int"),
    ("model:\n  channels: [8, x]\n", r"'model.channels\[1\]' .* must be int"),
    ("data:\n  mix: [scannet]\n", r"'data.mix' .* must be dict"),
    ("optim: 3\n", r"section 'optim' .* must be a mapping"),
])
def test_wrong_type_names_key_and_type(tmp_path, text, match):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_overrides_set_typed_values():
    cfg = load_config(None, ["optim.lr=0.01", "model.channels=[8,8,16,16,16,16,8,8]",
                             "data.mix={scannet: 2, s3dis: 1}", "train.amp=false", "data.voxel_size=1"])
    assert cfg.optim.lr == 0.01
    assert cfg.model.channels == (8, 8, 16, 16, 16, 16, 8, 8)
    assert cfg.data.mix == {"scannet": 2, "s3dis": 1}
    assert cfg.train.amp is False
    assert cfg.data.voxel_size == 1.0 and isinstance(cfg.data.voxel_size, float)  # int accepted for float


def test_override_replaces_file_value_and_keeps_the_rest(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lr: 0.2\n  momentum: 0.5\n")
    cfg = load_config(path, ["optim.lr=0.3"])
    assert cfg.optim.lr == 0.3 and cfg.optim.momentum == 0.5


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr' \(command-line override\); did you mean 'optim.lr'\?"),
    ("lr=1", r"did you mean 'optim.lr'\?"),
    ("train.epochs=1.5", r"'train.epochs' .* must be int, got float"),
    ("optim.lr", r"must look like key=value"),
    ("data.mix={foo: 1}", r"unknown dataset 'foo'; valid: scannet, s3dis, structured3d"),
    ("data.mix={scannet: 0}", r"positive integer"),
    ("optim.name=adam", r"'optim.name' .* valid: sgd, adamw"),
    ("model.channels=[8,8]", r"8 entries"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_save_config_is_atomic_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=0.5"])
    out = tmp_path / "sub" / "config.yaml"
    save_config(cfg, out)
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == 0.5
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
