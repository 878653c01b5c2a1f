"""The PEFT study's real target splits and its one-recipe check (bench/peft_targets.py,
bench/peft_study.py), on folders only: no training."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peft_study import one_recipe_check  # noqa: E402
from bench.peft_targets import build_target, rooms  # noqa: E402

TRAIN = ["scene0000_00", "scene0000_01", "scene0000_02", "scene0001_00", "scene0002_00", "scene0002_01",
         "scene0003_00", "scene0004_00", "scene0004_01", "scene0005_00", "scene0006_00", "scene0006_01"]
VAL = ["scene0008_00", "scene0009_00"]


def _fake_real(tmp_path: Path) -> tuple[Path, Path]:
    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    for split, scans in (("train", TRAIN), ("val", VAL)):
        for scan in scans:
            (real / "scannet" / split / scan).mkdir(parents=True)
    for name in ("structured3d", "s3dis"):
        (synthetic / name).mkdir(parents=True)
    return real, synthetic


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_rooms_keep_rescans_together_in_id_order():
    assert rooms(["scene0002_00", "scene0000_01", "scene0000_00", "scene0010_00"]) == [
        ["scene0000_00", "scene0000_01"], ["scene0002_00"], ["scene0010_00"]]


def test_real_target_splits_by_room_and_never_leaks(tmp_path):
    """Bugs caught: a room's rescans on both sides of a split (the base or the sweep would have
    seen the rescanned room it is scored on), the sweep scoring on the reported val scans, the
    base training on the rooms the stages adapt to, the synthetic domains missing from the base."""
    real, synthetic = _fake_real(tmp_path)
    target = build_target("real", synthetic, real, tmp_path / "out")
    base = _names(target.base_root / "scannet" / "train")
    adapt, reported = _names(target.root / "scannet" / "train"), _names(target.root / "scannet" / "val")
    sweep_train = _names(target.held_out / "scannet" / "train")
    sweep_val = _names(target.held_out / "scannet" / "val")
    assert base == set(TRAIN[:6])  # rooms 0000-0002: the first three rooms, every rescan
    assert sweep_val == {"scene0005_00", "scene0006_00", "scene0006_01"}  # the last two rooms
    assert sweep_train == {"scene0003_00", "scene0004_00", "scene0004_01"}
    assert adapt == sweep_train | sweep_val and reported == set(VAL)
    assert not base & adapt and not (base | adapt) & reported
    assert {"scannet", "structured3d", "s3dis"} <= _names(target.base_root) and target.dataset == "scannet"
    room = {scan.rsplit("_", 1)[0] for scan in base}
    assert not room & {scan.rsplit("_", 1)[0] for scan in adapt | reported}
    assert target.splits["reported_val"] == VAL
    again = build_target("real", synthetic, real, tmp_path / "out")  # made once, reused
    assert _names(again.root / "scannet" / "train") == adapt


def test_real_target_without_scans_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no real ScanNet scans"):
        build_target("real", tmp_path, tmp_path / "missing", tmp_path / "out")


def _row(**recipe) -> dict:
    base = {"optim": {"name": "adamw", "weight_decay": 0.01}, "loss": "ce+lovasz", "batch_size": 2, "steps": 150}
    return {"recipe": {**base, **recipe}}


def test_one_recipe_check_names_what_differs():
    """The sweep's own step count is allowed; anything else that differs between runs (an
    optimiser, a loss, a step count inside the runs) is named (bug caught: a study whose stages
    kept their own recipes reported as one recipe)."""
    runs, sweep = [_row(), _row()], [_row(steps=80)]
    assert one_recipe_check(runs, sweep) is None
    assert "optim" in one_recipe_check(runs + [_row(optim={"name": "sgd", "weight_decay": 0.01})], sweep)
    assert one_recipe_check(runs + [_row(loss="ce")], sweep) == "the runs do not share one recipe: loss differ"
    assert "steps" in one_recipe_check(runs + [_row(steps=300)], sweep)
