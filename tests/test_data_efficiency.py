"""Data-efficient protocols (``data.label_budget``, ``data.scene_fraction``): the selection is
seeded, independent of listing order, applied before the transforms, saved into the experiment
folder, and a resume on other lists is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ppt.config import load_config
from ppt.data.classes import IGNORE_INDEX
from ppt.data.datasets import build_dataset
from ppt.data.efficiency import apply_selection, scene_subset, select, selection_mismatch
from ppt.engine.build import build_train_loader, check_saved_selection, save_selection
from ppt.typed_config import ConfigError

BASE = ["data.mix={scannet: 1}", "data.num_workers=0", "data.check=false", "data.voxel_size=0.1"]


def datasets(root):
    return {"scannet": build_dataset("scannet", root, "train")}


def test_scene_subset_is_seeded_and_ignores_listing_order():
    """Bugs caught: an unseeded draw; a draw that depends on the order the files were listed."""
    names = [f"scene{i:04d}_00" for i in range(50)]
    a = scene_subset(names, 0.2, seed=1, dataset="scannet")
    assert len(a) == 10 and a == scene_subset(names, 0.2, 1, "scannet")
    assert sorted(scene_subset(names[::-1], 0.2, 1, "scannet")) == sorted(a)
    assert sorted(scene_subset(names, 0.2, 2, "scannet")) != sorted(a)
    assert scene_subset(names, 0.001, 1, "scannet") and len(scene_subset(names, 0.001, 1, "scannet")) == 1


def test_label_budget_keeps_exactly_n_labels_per_scene_before_transforms(synthetic_root):
    """Bugs caught: the budget applied after voxelisation (more or fewer labels than asked),
    unlabelled points drawn, other scenes' lists used."""
    ds = datasets(synthetic_root)
    sel = select(ds, label_budget=20, scene_fraction=1.0, seed=0)
    apply_selection(ds, sel)
    scene = ds["scannet"]
    for i in range(len(scene.scenes)):
        sample = scene.load(i)
        kept = np.flatnonzero(sample["segment"] != IGNORE_INDEX)
        assert len(kept) == 20
        assert np.array_equal(kept, sel.labels["scannet"][sample["name"]])
    again = select(datasets(synthetic_root), 20, 1.0, seed=0)
    other = select(datasets(synthetic_root), 20, 1.0, seed=1)
    name = next(iter(sel.labels["scannet"]))
    assert np.array_equal(again.labels["scannet"][name], sel.labels["scannet"][name])
    assert not np.array_equal(other.labels["scannet"][name], sel.labels["scannet"][name])


def test_loader_draws_only_kept_scenes_and_lists_are_saved(synthetic_root, tmp_path):
    cfg = load_config(None, [f"data.root={synthetic_root}", *BASE, "data.scene_fraction=0.5",
                             "data.label_budget=10", "data.batch_size=1"])
    loader = build_train_loader(cfg)
    kept = set(loader.selection.scenes["scannet"])
    assert len(kept) == 2  # of 4 training scenes
    seen = {name for batch in loader for name in batch["name"]}
    assert seen == kept
    save_selection(loader.selection, tmp_path)
    scenes = json.loads((tmp_path / "scenes.json").read_text())
    labels = json.loads((tmp_path / "label_budget.json").read_text())
    assert set(scenes["datasets"]["scannet"]["kept"]) == kept
    assert set(labels["datasets"]["scannet"]) == kept
    assert all(len(v) == 10 for v in labels["datasets"]["scannet"].values())
    check_saved_selection(loader.selection, tmp_path)  # same lists: no error


def test_resume_on_other_lists_is_refused(synthetic_root, tmp_path):
    """Bug caught: a resumed run silently training on scenes or labels it did not start with."""
    sel = select(datasets(synthetic_root), 10, 0.5, seed=0)
    save_selection(sel, tmp_path)
    other = select(datasets(synthetic_root), 10, 0.5, seed=3)
    assert selection_mismatch(other, json.loads((tmp_path / "scenes.json").read_text()),
                              json.loads((tmp_path / "label_budget.json").read_text())) is not None
    with pytest.raises(ValueError, match="scenes.json|label_budget.json"):
        check_saved_selection(other, tmp_path)
    (tmp_path / "label_budget.json").unlink()
    with pytest.raises(ValueError, match="label_budget.json is missing"):
        check_saved_selection(sel, tmp_path)


@pytest.mark.parametrize("override, key", [("data.label_budget=-1", "data.label_budget"),
                                           ("data.scene_fraction=0", "data.scene_fraction"),
                                           ("data.scene_fraction=1.5", "data.scene_fraction")])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_plan_states_the_selection(synthetic_root):
    """``--plan`` says what a data-efficient run trains on (scenes kept, labelled points)."""
    from ppt.engine.plan import format_plan, make_plan

    cfg = load_config(None, [f"data.root={synthetic_root}", *BASE, "data.scene_fraction=0.5", "data.label_budget=20",
                             "data.batch_size=1"])
    text = format_plan(make_plan(cfg))
    assert "2 of 4 training scenes" in text and "label budget 20" in text


def test_the_trainer_saves_the_lists_and_a_resume_checks_them(synthetic_root, tmp_path):
    """Call site: ``train()`` writes label_budget.json / scenes.json into the experiment and a
    resume on lists that no longer match stops with the file named (bugs caught: the trainer not
    saving the selection, or not checking it on --resume)."""
    from ppt.engine.trainer import SetupError, train

    cfg = load_config(None, [f"data.root={synthetic_root}", *BASE, "data.scene_fraction=0.5", "data.label_budget=10",
                             "data.batch_size=1", "model.channels=[8,8,16,16,16,16,8,8]",
                             "model.layers=[1,1,1,1,1,1,1,1]", "model.head=decoupled", "model.prompt=none",
                             "data.mix3d_prob=0.0", "train.device=cpu", "train.threads=1", "train.eval_every=0",
                             "train.epochs=1", "train.steps_per_epoch=1", "train.precise_bn=0"])
    exp = tmp_path / "exp"
    train(cfg, exp)
    labels = json.loads((exp / "label_budget.json").read_text())
    assert set(labels["datasets"]["scannet"]) == set(json.loads((exp / "scenes.json").read_text())
                                                     ["datasets"]["scannet"]["kept"])
    scene = next(iter(labels["datasets"]["scannet"]))
    labels["datasets"]["scannet"][scene] = labels["datasets"]["scannet"][scene][:-1]
    (exp / "label_budget.json").write_text(json.dumps(labels))
    cfg.train.epochs = 2
    with pytest.raises(SetupError, match="label_budget.json"):
        train(cfg, exp, resume=True)
