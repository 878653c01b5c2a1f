"""Config files and overrides: every shipped config loads; mistakes name the key and the fix."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ppt.config import Config, ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def schema_keys(cls=Config) -> set[str]:
    """``section.key`` of every leaf of the config schema, from the dataclasses themselves
    (``datasets``, a dict of dataset descriptions, has no fixed keys)."""
    return {f"{section.name}.{leaf.name}" for section in dataclasses.fields(cls)
            if dataclasses.is_dataclass(section.default_factory())
            for leaf in dataclasses.fields(section.default_factory())}


def flat(cfg: Config) -> dict:
    """{"section.key": value} of a config."""
    return {f"{section}.{key}": value for section, leaves in cfg.to_dict().items() if section != "datasets"
            for key, value in leaves.items()}


def shipped(path: Path, overrides: tuple[str, ...] = ()) -> Config:
    # fine-tuning stages name their base weights on the command line (tools/train.sh --weights)
    needs_base = (yaml.safe_load(path.read_text()).get("peft") or {}).get("stage", "none") != "none"
    return load_config(path, [*(["peft.base=exp/base/model/model_best.pth"] if needs_base else []), *overrides])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = shipped(path)
    assert isinstance(cfg, Config)
    # what the file sets is what the config holds; every other key holds its default
    written = {f"{section}.{key}": value for section, leaves in yaml.safe_load(path.read_text()).items()
               for key, value in leaves.items()}
    assert set(written) <= schema_keys()
    default, resolved = flat(Config()), flat(cfg)
    for key in schema_keys():
        if key in written and key != "peft.base":
            assert resolved[key] == written[key], key
        elif key != "peft.base":
            assert resolved[key] == default[key], key
    # saved (as every run saves it): complete, reloads equal, and saving again is byte-identical
    out, again = tmp_path / "config.yaml", tmp_path / "again.yaml"
    save_config(cfg, out)
    saved = yaml.safe_load(out.read_text())
    assert {f"{s}.{k}" for s, leaves in saved.items() for k in leaves} == schema_keys()
    reloaded = load_config(out)
    assert reloaded == cfg
    save_config(reloaded, again)
    assert again.read_bytes() == out.read_bytes()


OVERRIDES = ["optim.lr=0.0123", "train.epochs=7", "model.prompt_dim=48", "data.voxel_size=0.07",
             "model.channels=[8, 8, 16, 16, 16, 16, 8, 8]", "train.amp=false", "train.amp=true"]


@pytest.mark.parametrize("name", ["demo", "ppt_joint", "scannet_spunet"])
def test_an_override_changes_exactly_its_key(name):
    path = CONFIGS[0].parent / f"{name}.yaml"
    base = flat(shipped(path))
    ratios = dict(shipped(path).data.mix)
    ratios[next(iter(ratios))] += 1  # one ratio changes, the same datasets (best_on stays valid)
    mix = "data.mix={" + ", ".join(f"{k}: {v}" for k, v in ratios.items()) + "}"
    for override in [*OVERRIDES, mix]:
        key, text = override.split("=", 1)
        changed = flat(shipped(path, (override,)))
        diff = {k for k in base if changed[k] != base[k]}
        assert diff <= {key}, override  # nothing else moves
        value = yaml.safe_load(text)
        assert changed[key] == (list(value) if isinstance(value, list) else value), override
        assert (diff == {key}) == (base[key] != changed[key])


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "scannet_spunet", "s3dis_spunet", "structured3d_spunet", "joint_naive", "ppt_joint"} <= names


def test_ppt_joint_trains_with_the_reference_schedule():
    """SPEC §6, as the trainer applies it: SGD (Nesterov, momentum 0.9, wd 1e-4) and OneCycle
    from lr/10 up to 0.05 at 5 % of the steps, down to lr/(10 * 1e4), the prompt group at 0.1x."""
    from ppt.engine.build import build_optimizer, build_scheduler

    cfg = load_config(CONFIGS[0].parent / "ppt_joint.yaml")
    assert cfg.data.mix == {"structured3d": 4, "scannet": 2, "s3dis": 1} and cfg.data.batch_size == 24
    assert cfg.train.epochs == 100 and cfg.train.amp and cfg.model.prompt == "pdnorm"
    assert cfg.model.text_encoder.startswith("clip:ViT-B-16")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.prompt = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))

        def prompt_parameters(self):
            yield self.prompt

    optimizer = build_optimizer(Model(), cfg.optim)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {(g["momentum"] > 0, g["nesterov"], g["weight_decay"]) for g in optimizer.param_groups} == {(True, True, 1e-4)}
    total = 1000
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    lrs = []
    for _ in range(total):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    lrs = np.array(lrs)  # (steps, groups: base, prompt)
    assert np.allclose(lrs[0], [0.005, 0.0005])
    assert int(lrs[:, 0].argmax()) == pytest.approx(0.05 * total, abs=1)
    assert np.allclose(lrs.max(0), [0.05, 0.005])
    assert np.allclose(lrs[-1], [0.05 / 1e5, 0.005 / 1e5], rtol=0.05)
    assert np.allclose(lrs[:, 1], 0.1 * lrs[:, 0])


def test_adapter_ablation_compares_adapters_with_one_bn_choice():
    """bench/negative_transfer.py: PDNorm, injection and cross-attention rows normalise alike."""
    import sys

    from ppt.engine.build import build_model
    from ppt.models.prompts import PDNorm, PromptCrossAttention, PromptInjection
    from ppt.models.spunet import BatchNorm

    sys.path.insert(0, str(CONFIGS[0].parents[1]))
    from bench.negative_transfer import ADAPTER_ABLATION, run_config

    emb = {d: torch.eye(30)[:k] for d, k in (("scannet", 20), ("s3dis", 13), ("structured3d", 25))}
    kinds = {}
    for variant in ADAPTER_ABLATION:
        model = build_model(run_config(variant, 0, "data", 10, []), emb)
        norms = [m for m in model.backbone.modules() if isinstance(m, (BatchNorm, PDNorm))]
        # statistics sets per norm layer: 1 when shared, one per dataset when decoupled
        kinds[variant] = {len(m.norms) if isinstance(m, PDNorm) and m.decoupled else 1 for m in norms}
        adapters = {type(m) for m in model.modules() if isinstance(m, (PromptInjection, PromptCrossAttention))}
        modulated = any(isinstance(m, PDNorm) and m.modulation is not None for m in norms)
        assert len(adapters) + modulated == 1, variant  # exactly one way for the prompt in
    assert all(k == {1} for k in kinds.values()), kinds  # one shared BN in all three


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
    ("data.mix={foo: 1}", r"unknown dataset 'foo': not built in .*data/foo/ does not exist.*dataset.yaml"),
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


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_joint_configs_keep_the_best_of_a_named_dataset(path):
    """A joint run keeps model_best by a dataset it names, ScanNet when it trains on ScanNet (the
    reference); "first" would pick Structured3D in a 4:2:1 mix and report ScanNet from it."""
    cfg = shipped(path)
    if len(cfg.data.mix) > 1:
        assert cfg.train.best_on != "first", path.name
        if "scannet" in cfg.data.mix:
            assert cfg.train.best_on == "scannet", path.name


def test_untrained_val_dataset_is_refused_without_a_language_head():
    """A decoupled / union head has no trained classifier for a val dataset outside the mix."""
    for head in ("decoupled", "union"):
        with pytest.raises(ConfigError, match=r"data.val.*names s3dis, not in data.mix.*never be trained"):
            load_config(None, ["data.mix={scannet: 1}", "data.val=[scannet, s3dis]", f"model.head={head}"])
    load_config(None, ["data.mix={scannet: 1}", "data.val=[scannet, s3dis]", "model.head=language"])
