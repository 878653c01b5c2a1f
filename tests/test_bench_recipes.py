"""The CPU-recipe and head benchmarks' own logic (bench/cpu_recipe.py, bench/heads_real.py,
bench/plain_baseline.py): what each run is set up to be, without training a model."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_plain_loop_schedule_is_pointcepts_onecycle():
    """lr/10 at the start, the peak at 5 % of the budget, cosine down to lr/1e5 at its end (bugs
    caught: final lr = peak / final_div instead of the start / final_div; warm-up as a fraction
    of something else; a schedule that rises again)."""
    from bench.plain_baseline import onecycle_factor

    assert onecycle_factor(0.0) == pytest.approx(0.1)
    assert onecycle_factor(0.05) == pytest.approx(1.0)
    assert onecycle_factor(1.0) == pytest.approx(1e-5)
    assert onecycle_factor(0.525) == pytest.approx((1 + 1e-5) / 2, rel=1e-6)  # halfway down the cosine
    after = [onecycle_factor(t) for t in np.linspace(0.05, 1.0, 50)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_plain_loop_turns_normals_with_the_scene():
    """A rotated, flipped, scaled scene keeps its normals on its surfaces: the normal columns go
    through the same map (renormalised), colour untouched (bug caught: normals left as read while
    the coordinates turn, so the baseline would learn from wrong normals)."""
    from bench.plain_baseline import make_batch

    rng = np.random.default_rng(0)
    n = 4000
    coord = np.c_[rng.random((n, 2)) * 4, np.zeros(n)]  # a floor: normal +z, any rotation keeps it
    wall = np.c_[np.zeros(n), rng.random(n) * 4, rng.random(n) * 2]  # a wall: normal +x, turns in xy
    feat = np.r_[np.c_[np.full((n, 3), 0.5), np.tile([0, 0, 1.0], (n, 1))],
                 np.c_[np.full((n, 3), 0.2), np.tile([1.0, 0, 0], (n, 1))]].astype(np.float32)
    scene = {"coord": np.r_[coord, wall], "color": feat, "segment": np.r_[np.zeros(n), np.ones(n)].astype(np.int64),
             "dataset": "scannet"}
    batch = make_batch([scene], {"scannet": 0}, 0.05, rng)
    f, seg = batch["feat"].numpy(), batch["segment"].numpy()
    np.testing.assert_allclose(np.linalg.norm(f[:, 3:], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(f[seg == 0, 3:], np.tile([0, 0, 1.0], ((seg == 0).sum(), 1)), atol=1e-5)
    turned = f[seg == 1, 3:]
    assert np.allclose(turned, turned[0], atol=1e-5) and abs(turned[0, 2]) < 1e-5
    assert not np.allclose(turned[0], [1.0, 0, 0], atol=1e-3)  # seed 0 turns the wall (angle != 0)
    grid, normal_xy = batch["grid_coord"].numpy()[seg == 1], turned[0, :2]
    along = (grid - grid.mean(0))[:, :2] @ normal_xy  # the wall's voxels lie across its normal
    assert np.abs(along).max() <= 2.0
    np.testing.assert_allclose(f[:, :3], np.where(seg[:, None] == 0, 0.5, 0.2) * np.ones((1, 3)), atol=1e-6)


def test_plain_baseline_is_the_reference_spunet_recipe(monkeypatch):
    """The baseline the CPU recipe is judged against is Pointcept's SpUNet-v1m1 recipe at 4 cm:
    full widths and depths, SGD 0.05, colour + normal, batch 2, for the candidate's measured wall
    time (bugs caught: the baseline run at demo widths, AdamW, colour only, or for another time)."""
    from bench import cpu_recipe, plain_baseline

    seen = {}

    def fake_run(root, datasets, minutes, marks, channels, layers, **kw):
        seen.update(root=root, datasets=datasets, minutes=minutes, channels=channels, layers=layers, **kw)
        return [{"minutes": minutes, "steps": 3, "mIoU": {"scannet": 0.25}}]

    monkeypatch.setattr(plain_baseline, "run", fake_run)
    args = cpu_recipe.main.__globals__["argparse"].Namespace(data="somewhere", quick=False)
    row = cpu_recipe.run_plain(123.0, 4, args)
    assert seen["channels"] == [32, 64, 128, 256, 256, 128, 96, 96] and seen["layers"] == [2, 3, 4, 6, 2, 2, 2, 2]
    assert (seen["optimizer"], seen["lr"], seen["normals"], seen["voxel"], seen["batch_size"], seen["seed"]) == (
        "sgd", 0.05, True, 0.04, 2, 4)
    assert seen["minutes"] == pytest.approx(123.0 / 60) and row["seconds"] == pytest.approx(123.0)
    assert row["mIoU"] == 0.25 and row["name"] == "plain"


@pytest.mark.parametrize("name", ["shipped", "demo4", "mid5", "ce", "sgd", "wide4"])
def test_cpu_recipe_candidates_change_what_they_say(name, tmp_path):
    """Each candidate is configs/cpu_scannet.yaml with its own change only, trained for exactly
    the planned steps in one evaluated epoch (bugs caught: a candidate's override lost, the step
    plan not applied, a candidate that differs in more than its named setting)."""
    from bench.cpu_recipe import config

    args = type("A", (), {"data": str(tmp_path), "quick": False})()
    base, cfg = config("shipped", 77, 0, args), config(name, 77, 0, args)
    assert (cfg.train.epochs, cfg.train.steps_per_epoch, cfg.train.eval_every) == (1, 77, 1)
    diff = {f"{s}.{k}" for s in ("data", "model", "optim", "train")
            for k, v in vars(getattr(cfg, s)).items() if v != vars(getattr(base, s))[k]}
    expected = {"shipped": set(), "demo4": {"data.voxel_size"}, "mid5": {"model.channels", "model.layers"},
                "ce": {"train.loss"}, "sgd": {"optim.name", "optim.lr", "optim.weight_decay"},
                "wide4": {"data.voxel_size", "model.channels", "model.layers"}}[name]
    assert diff == expected


def test_head_rows_change_one_thing(tmp_path):
    """Every row of bench/heads_real.py differs from its setup's language row in the head or one
    language-head setting only; the joint rows mix the three domains 1:1:1 with PDNorm, the
    alone rows train ScanNet alone without a prompt; evaluations after each third (bugs caught:
    rows differing in more than the named change, unequal steps per domain, a prompt alone)."""
    from bench.heads_real import ROWS, config

    def flat(cfg):
        return {f"{s}.{k}": v for s in ("data", "model", "optim", "train") for k, v in vars(getattr(cfg, s)).items()}

    for setup in ("alone", "joint"):
        ref = flat(config(f"{setup}_language", 0, 90, tmp_path, False))
        assert (ref["train.epochs"], ref["train.steps_per_epoch"], ref["train.eval_every"]) == (3, 30, 1)
        if setup == "joint":
            assert dict(ref["data.mix"]) == {"scannet": 1, "structured3d": 1, "s3dis": 1}
            assert ref["model.prompt"] == "pdnorm"
        else:
            assert dict(ref["data.mix"]) == {"scannet": 1} and ref["model.prompt"] == "none"
        for row in (r for r in ROWS if r.startswith(setup + "_")):
            diff = {k for k, v in flat(config(row, 0, 90, tmp_path, False)).items() if v != ref[k]}
            variant = row.split("_", 1)[1]
            expected = {"union": {"model.head"}, "decoupled": {"model.head"}, "language": set(),
                        "language_s20": {"model.logit_scale"}, "language_learnt": {"model.logit_scale_learnable"},
                        "language_bare": {"model.template"}, "language_random": set()}[variant]
            assert diff == expected, row  # language_random's one change is its embeddings (test below)


def test_head_study_reads_the_curve_from_train_log(tmp_path):
    """The ScanNet curve comes from the trainer's own val lines, per epoch and dataset (bugs
    caught: the last value read for every epoch; the datasets' values mixed up)."""
    from bench.heads_real import curve
    from ppt.engine.logging import ExperimentLogger

    logger = ExperimentLogger(tmp_path, enabled=True, tensorboard=False)
    try:
        for epoch, (a, b) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.3, 0.7)], start=1):
            results = {d: {"mIoU": v, "mAcc": v, "allAcc": v, "per_class": {"wall": v}, "confusion": np.eye(2)}
                       for d, v in (("scannet", a), ("s3dis", b))}
            logger.validation(results, epoch, epoch * 10)
    finally:
        logger.close()
    points = curve(tmp_path / "train.log")
    assert [p["epoch"] for p in points] == [1, 2, 3]
    assert [p["scannet"] for p in points] == [0.1, 0.2, 0.3] and [p["s3dis"] for p in points] == [0.5, 0.6, 0.7]
    assert math.isclose(points[-1]["s3dis"], 0.7)


def test_random_text_probe_replaces_the_embeddings_only_inside_its_block():
    """The ``language_random`` probe's class embeddings are seeded unit vectors, one per class
    name (the same name gets the same vector in every run), nearly orthogonal, and MiniLM's come
    back after the block (bugs caught: the patch left in place for the next row of the same
    process, vectors drawn per call so that a resumed or evaluated model reads other ones)."""
    import torch

    import ppt.text as text
    from bench.heads_real import random_text_embeddings

    real = text.class_embeddings
    names = ["wall", "floor", "chair", "table"]
    with random_text_embeddings():
        a = text.class_embeddings(names, "minilm", "a point of {}")
        b = text.class_embeddings(names[::-1], "minilm", "{}")
    assert text.class_embeddings is real
    assert a.shape == (4, 384) and torch.allclose(a.norm(dim=-1), torch.ones(4))
    assert torch.equal(a.flip(0), b)
    off = (a @ a.T)[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 0.3
