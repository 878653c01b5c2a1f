"""Each benchmark's --quick path runs end to end, prints its table and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_bench(script: str, *args: str) -> str:
    """The script as a user runs it: a fresh interpreter (its start-up wiring included)."""
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture
def run_main(capsys, monkeypatch):
    """``run_main(module, *args) -> stdout``: a bench's ``main(argv)`` in this process, for the
    second and later calls of a test (the first one goes through ``run_bench``): a fresh
    interpreter costs ~5 s of torch + spconv imports. The suite's thread count and working
    folder are restored after the call (benches set their own)."""
    import importlib

    import torch

    def call(module: str, *args: str) -> str:
        monkeypatch.chdir(ROOT)
        threads = torch.get_num_threads()
        capsys.readouterr()
        try:
            code = importlib.import_module(f"bench.{module}").main(list(args))
        finally:
            torch.set_num_threads(threads)
        assert code in (0, None)
        return capsys.readouterr().out

    return call


def test_common_timing_and_table(tmp_path):
    from bench.common import format_table, save_json, time_call

    calls = []
    timing = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and timing["repeats"] == 3 and timing["min_s"] <= timing["median_s"] <= timing["max_s"]
    table = format_table([{"a": 1.23456, "b": None}, {"a": 12345.0, "b": "x"}], ["a", "b"])
    assert table.splitlines()[2] == "| 1.23 | - |" and "12,345" in table
    path = save_json({"x": np.arange(3)}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"x": [0, 1, 2]}
    assert not list(tmp_path.glob(".*.tmp"))


def test_synthetic_batch_has_the_requested_size():
    from bench.common import synthetic_batch

    batch = synthetic_batch(6000, scenes=2, seed=1)
    assert batch["offset"].tolist() == [3000, 6000]
    assert batch["feat"].shape == (6000, 6) and batch["grid_coord"].min() >= 0


def test_train_step_quick(tmp_path):
    out = tmp_path / "ts.json"
    stdout = run_bench("train_step.py", "--quick", "--out", str(out))
    assert "| model |" in stdout and "pdnorm_language" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["spunet", "pdnorm_language", "ptv3_pdnorm_language"]
    for r in rows:
        assert "error" not in r and r["finite_loss"] and r["step_s"] > 0 and r["actual_points"] == 4000


def test_inference_quick(tmp_path):
    out = tmp_path / "inf.json"
    stdout = run_bench("inference.py", "--quick", "--data", str(tmp_path / "data"), "--out", str(out))
    assert "points/s" in stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["scenes"] == 1 and row["points"] > 1000 and row["points_per_s"] > 0


def test_negative_transfer_quick_and_resume(tmp_path, run_main):
    args = ["--quick", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path), "--variants", "alone_scannet", "naive"]
    stdout = run_bench("negative_transfer.py", *args)
    assert "(b) naive joint" in stdout and "Δ vs alone" in stdout
    summary = json.loads((tmp_path / "negative_transfer.json").read_text())
    assert set(summary["table"]["naive"]) == {"scannet", "s3dis", "structured3d", "mean"}
    assert (tmp_path / "negative_transfer.png").stat().st_size > 1000
    assert not list((tmp_path / "runs").rglob("*.pth"))  # scores kept, weights dropped
    again = run_main("negative_transfer", *args)  # resumed: every run has its result
    assert again.count("cached") == 2 and "started" not in again


def test_peft_quick(synthetic_root, tmp_path):
    # The memory table of every stage and the transfer rows: a stage missing, or a memory probe
    # that measures nothing (peak 0), would leave the PEFT section of RESULTS.md unfounded.
    out = run_bench("peft.py", "--quick", "--results", str(tmp_path), "--out", str(tmp_path / "runs"),
                    "--data-root", str(synthetic_root))
    result = json.loads((tmp_path / "peft_quick.json").read_text())
    stages = [row["stage"] for row in result["cost"]]
    assert stages == ["full", "linear", "decoder", "bitfit", "lora", "dapt", "pointpeft"]
    full = result["cost"][0]
    assert full["peak_alloc_mb"] > 0 and full["trainable"] == full["total"]
    for row in result["cost"][1:]:
        assert 0 < row["trainable"] < row["total"] and row["peak_alloc_mb"] > 0
    assert "| dapt |" in out


def test_data_pipeline_quick(tmp_path):
    # Both pipelines profiled step by step on the same room: a step missing from either side,
    # or a throughput that is not points / time, would leave RESULTS.md §6 unfounded.
    out = tmp_path / "dp.json"
    stdout = run_bench("data_pipeline.py", "--sizes", "4000", "--repeats", "2", "--json", str(out))
    assert "| ElasticDistortion" in stdout and "speed-up" in stdout
    (row,) = json.loads(out.read_text()).values()
    for side in ("ours", "reference"):
        steps = row[f"{side}_ms_per_mpt"]
        assert {"GridSample", "ElasticDistortion", "SphereCrop", "ShufflePoints"} <= set(steps)
        assert abs(1e3 / sum(steps.values()) - row[f"{side}_mpts_per_s"]) < 1e-6 * row[f"{side}_mpts_per_s"] + 1e-9


def test_reference_pipeline_keeps_one_point_per_voxel():
    # The timing reference must do the reference's work: one point per voxel, keys aligned.
    from bench import data_pipeline, reference_pipeline

    sample = data_pipeline.scene(3000)
    rng = np.random.default_rng(0)
    for _, step in reference_pipeline.build(voxel=0.05):
        sample = step(sample, rng)
    n = len(sample["coord"])
    assert sample["feat"].shape == (n, 6) and len(sample["segment"]) == n
    assert len(np.unique(sample["grid_coord"], axis=0)) == n


def test_time_to_accuracy_quick_and_resume(synthetic_root, tmp_path, run_main):
    args = ["--quick", "--budgets", "0.1", "--setups", "scannet", "--data", str(synthetic_root),
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path)]
    stdout = run_bench("time_to_accuracy.py", *args)
    assert "| scannet | 0.1 |" in stdout
    runs = json.loads((tmp_path / "time_to_accuracy.json").read_text())["runs"]
    assert sorted(r["method"] for r in runs) == ["plain", "recipe"]
    for r in runs:
        assert r["steps"] > 0 and 0 <= r["mIoU"]["scannet"] <= 1 and r["minutes"] > 0
    plain = next(r for r in runs if r["method"] == "plain")
    assert 0.1 <= plain["minutes"] < 0.2  # stopped at the budget, training time only
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 1000
    again = run_main("time_to_accuracy", *args)  # every run has its result: nothing trains
    assert "recipe scannet" not in again and "plain scannet:" not in again


def _scenes(root, split: str) -> set[Path]:
    """The S3DIS scene folders a run with ``data.root=root`` reads for ``split``, resolved."""
    from ppt.data.datasets import build_dataset

    return {p.resolve() for p in build_dataset("s3dis", root, split).scenes}


def test_peft_study_quick_resumes_from_its_cache(synthetic_root, tmp_path, run_main):
    """The study's pipeline end to end at toy length: each budget's lr comes from its own sweep
    over the grid, every stage x budget x seed is a row, and a second call trains nothing (bugs
    caught: a run not cached, a sweep that does not choose, the all-label lr reused for the
    20-label runs, a budget or seed left out of the table). Every stage runs ONE recipe (bug
    caught: a stage keeping its config's optimiser, scheduler or loss: full's config is SGD +
    cosine + CE). The sweep picks each stage's BEST lr on a held-out area of the training split
    and never scores on the reported val area (bugs caught: the worst or the first lr chosen, the
    sweep validated on Area 5 or trained on its own val area); a choice at the grid's edge is
    marked."""
    from ppt.config import load_config

    args = ["--data", str(synthetic_root), "--base-steps", "2", "--steps", "2", "--sweep-steps", "1",
            "--lrs", "0.001,0.003,0.01", "--seeds", "0,1", "--budgets", "0,20", "--stages", "full,linear",
            "--out", str(tmp_path)]
    run_bench("peft_study.py", *args)
    result = json.loads((tmp_path / "study.json").read_text())
    assert len(result["sweep"]) == 12 and {(r["stage"], r["budget"]) for r in result["sweep"]} == {
        (s, b) for s in ("full", "linear") for b in (0, 20)}
    for budget in ("0", "20"):
        for stage, lr in result["lrs"][budget].items():
            tries = {r["lr"]: r["val_mIoU"] for r in result["sweep"] if r["stage"] == stage and r["budget"] == int(budget)}
            assert sorted(tries) == [0.001, 0.003, 0.01] and tries[lr] == max(tries.values())
    # where each run trained and scored, from its saved config: the sweep inside the reported
    # runs' training split, its val area held out of its own training; the runs on Area 5
    reported_train, reported_val = _scenes(synthetic_root, "train"), _scenes(synthetic_root, "val")
    sweeps = sorted(tmp_path.glob("sweep_*/config.yaml"))
    assert len(sweeps) == 12
    for config in sweeps:
        root = load_config(config, []).data.root
        train, val = _scenes(root, "train"), _scenes(root, "val")
        assert val and train and val <= reported_train and train <= reported_train and not val & train, config
    runs = sorted(tmp_path.glob("*_seed*/config.yaml"))
    assert len(runs) == 8
    recipes = set()
    for config in runs + sweeps:
        cfg = load_config(config, [])
        assert _scenes(cfg.data.root, "val") == reported_val or config in sweeps, config
        recipes.add((cfg.optim.name, cfg.optim.scheduler, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.train.loss,
                     cfg.data.batch_size))
    assert recipes == {("adamw", "onecycle", 0.01, 3.0, "ce+lovasz", 2)}
    assert result["recipe"]["optim"]["name"] == "adamw" and all(r["recipe"]["steps"] == 2 for r in result["runs"])
    assert sorted((r["stage"], r["budget"], r["seed"]) for r in result["runs"]) == sorted(
        (s, b, seed) for s in ("full", "linear") for b in (0, 20) for seed in (0, 1))
    assert all(t["n_0"] == 2 and t["n_20"] == 2 and t["peak_alloc_mb"] > 0 for t in result["table"])
    out = run_main("peft_study", *args)
    assert "started" not in out and "val mIoU" not in out.split("chosen lr")[0]  # all from the cache

    # A cached run made at another lr (a --sweep-steps 0 study before the sweep) is not reused.
    cached = tmp_path / "full_b0_seed0" / "result.json"
    row = json.loads(cached.read_text())
    cached.write_text(json.dumps({**row, "lr": row["lr"] * 3}))
    out = run_main("peft_study", *args)
    retrained = [line.split(":")[0].strip() for line in out.splitlines()
                 if line.startswith("  ") and ": val mIoU" in line]
    assert "full_b0_seed0: cached at lr" in out and retrained == ["full_b0_seed0"]
    assert json.loads(cached.read_text())["lr"] == row["lr"]

    # Planted sweep scores (grid ascending), different per budget: all labels, full's best is its
    # largest lr, linear's the middle one; 20 labels, full's best is its smallest lr, linear's
    # the largest. Choosing the worst, the first, the middle, or one budget's lr for both gets a
    # stage wrong; the edges are marked. --report chooses again from the cached sweep.
    scores = {("full", 0): (0.3, 0.2, 0.5), ("linear", 0): (0.1, 0.4, 0.2),
              ("full", 20): (0.5, 0.2, 0.3), ("linear", 20): (0.2, 0.1, 0.4)}
    for (stage, budget), planted in scores.items():
        files = sorted(tmp_path.glob(f"sweep_{stage}_b{budget}_lr*/result.json"),
                       key=lambda f: json.loads(f.read_text())["lr"])
        for f, score in zip(files, planted, strict=True):
            f.write_text(json.dumps({**json.loads(f.read_text()), "val_mIoU": score}))
    out = run_main("peft_study", *args, "--report")
    result = json.loads((tmp_path / "study.json").read_text())
    assert result["lrs"] == {"0": {"full": 0.01, "linear": 0.003}, "20": {"full": 0.001, "linear": 0.01}}
    assert result["edges"] == {"0": ["full"], "20": ["full", "linear"]}
    assert "full 0.01 (edge), linear 0.003," in out.replace("\n", ",") + ","


def test_peft_study_probe_shifts_the_target_colour_and_reuses_a_base(synthetic_root, tmp_path, run_main):
    """The probe target is the S3DIS scenes with colour 255 - (B, R, G), geometry and labels
    untouched, --base adapts a given checkpoint and --lrs-from takes a study's lrs (bugs caught: the
    shift not applied or applied to the wrong channels, labels or coordinates copied wrong, a base
    trained anyway, a sweep or the config's lr used instead of the given one). ``--recipe own``
    keeps the stage config's optimiser (bug caught: the one recipe applied anyway, so an
    own-recipe row would be mislabelled)."""
    from ppt.config import load_config

    base_dir = tmp_path / "study"
    run_bench("peft_study.py", "--data", str(synthetic_root), "--base-steps", "2", "--steps", "1", "--sweep-steps",
              "0", "--seeds", "0", "--budgets", "0", "--stages", "linear", "--out", str(base_dir))
    lrs = tmp_path / "lrs.json"  # --lrs-from: a study's chosen lrs (one no config has)
    lrs.write_text(json.dumps({"lrs": {"linear": 0.0123}}))
    probe = tmp_path / "probe"
    out = run_main("peft_study", "--data", str(synthetic_root), "--base",
                    str(base_dir / "base" / "model" / "model_last.pth"), "--target-shift", "colour", "--steps", "1",
                    "--lrs-from", str(lrs), "--seeds", "0", "--budgets", "0", "--stages", "linear", "--out", str(probe),
                    "--recipe", "own")
    assert not (probe / "base").exists() and "target colour (s3dis); recipe own" in out
    result = json.loads((probe / "study.json").read_text())
    assert result["lrs"] == {"0": {"linear": 0.0123}} and result["sweep"] == [] and result["runs"][0]["lr"] == 0.0123
    own = load_config(probe / "linear_b0_seed0" / "config.yaml", [])
    assert (own.optim.scheduler, own.train.loss) == ("cosine", "ce") and result["recipe"].startswith("each stage")
    scenes = sorted((synthetic_root / "s3dis").glob("Area_*/*"))
    assert scenes
    for scene in scenes:
        shifted = probe / "shifted_root" / "s3dis" / scene.parent.name / scene.name
        rgb = np.load(scene / "color.npy").astype(int)
        np.testing.assert_array_equal(np.load(shifted / "color.npy"), 255 - rgb[:, [2, 0, 1]])
        for name in ("coord.npy", "segment.npy"):
            np.testing.assert_array_equal(np.load(shifted / name), np.load(scene / name))
