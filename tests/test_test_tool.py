"""tools/test.py end to end on a tiny trained experiment, plus its failure cases."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ppt.data.classes import S3DIS13, SCANNET20
from ppt.data.scene_io import write_scene

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ppt_test_tool", ROOT / "tools" / "test.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.fixture(scope="module")
def experiment(synthetic_root, tmp_path_factory):
    """A tiny PPT model (scannet + s3dis, language head) trained for 1 step, then validated."""
    from ppt.config import load_config
    from ppt.engine.trainer import train

    exp = tmp_path_factory.mktemp("exp") / "tiny"
    cfg = load_config(None, [
        f"data.root={synthetic_root}", "data.mix={scannet: 1, s3dis: 1}", "data.voxel_size=0.1",
        "data.batch_size=2", "data.num_workers=0", "data.check=false",
        "model.channels=[8,8,16,16,16,8,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "train.epochs=1", "train.steps_per_epoch=1", "train.device=cpu", "train.threads=2"])
    train(cfg, exp)
    assert (exp / "model" / "model_best.pth").is_file()
    return exp


def run_tool(capsys, *args) -> tuple[int, str, str]:
    rc = tool.main([*map(str, args), "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_end_to_end_metrics_predictions_and_ply(experiment, synthetic_root, capsys):
    from plyfile import PlyData

    from ppt.data.datasets import build_dataset

    rc, out, err = run_tool(capsys, "--exp", experiment, "--save-pred", "--ply")
    assert rc == 0, err
    metrics = json.loads((experiment / "result" / "metrics.json").read_text())
    assert set(metrics) == {"scannet", "s3dis"}
    for name, classes in (("scannet", SCANNET20), ("s3dis", S3DIS13)):
        entry = metrics[name]
        assert list(entry["per_class"]) == list(classes)
        assert 0 <= entry["mIoU"] <= 1 and 0 <= entry["allAcc"] <= 1
        ious = [v for v in entry["per_class"].values() if v is not None]
        assert entry["mIoU"] == pytest.approx(np.mean(ious))
        assert f"{name}: mIoU {100 * entry['mIoU']:.2f}" in out
        dataset = build_dataset(name, synthetic_root, "val")
        for i in range(len(dataset.scenes)):
            scene = dataset.load(i)
            pred = np.load(experiment / "result" / name / f"{scene['name']}_pred.npy")
            assert pred.shape == (len(scene["coord"]),) and pred.min() >= 0 and pred.max() < len(classes)
            ply = PlyData.read(str(experiment / "result" / name / f"{scene['name']}_pred.ply"))["vertex"]
            np.testing.assert_array_equal(ply["pred"], pred)
            np.testing.assert_array_equal(ply["gt"], scene["segment"])
            np.testing.assert_allclose(ply["x"], scene["coord"][:, 0])
    assert "wall" in out and "mAcc" in out
    # The trainer validated the same weights on the same scenes: the tool must agree with it
    # (a checkpoint not loaded, or loaded into the wrong places, would not).
    best = torch.load(experiment / "model" / "model_best.pth", weights_only=True)["best_metric"]
    assert np.mean([metrics[d]["mIoU"] for d in metrics]) == pytest.approx(best)


def test_mean_prompt_and_merged_metrics_file(experiment, capsys):
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "s3dis", "--prompt", "mean")
    assert rc == 0, err
    metrics = json.loads((experiment / "result" / "metrics.json").read_text())
    assert metrics["s3dis"]["prompt"] == "mean" and "prompt mean" in out
    assert "scannet" in metrics  # entries of other datasets are kept
    assert not list((experiment / "result").glob(".*tmp"))  # atomic write left no temp file


def test_open_vocabulary_classes_map_labels_by_name(experiment, capsys):
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet",
                            "--classes", "Wall, floor,lamp")
    assert rc == 0, err
    entry = json.loads((experiment / "result" / "metrics.json").read_text())["scannet"]
    assert list(entry["per_class"]) == ["Wall", "floor", "lamp"]
    assert entry["label_set"] == ["Wall", "floor", "lamp"]
    assert entry["per_class"]["lamp"] is None or entry["per_class"]["lamp"] == 0.0  # not in ScanNet's labels
    assert entry["per_class_acc"]["lamp"] is None


def test_label_map_by_name():
    m = tool.label_map_by_name(("wall", "shower curtain", "otherfurniture"), ["Shower_Curtain", "wall"])
    np.testing.assert_array_equal(m, [1, 0, -1])


def test_tta_on_a_small_scene(experiment, tmp_path, capsys):
    # TTA costs 13 views x fragments: give it one small scene through --data-root.
    rng = np.random.default_rng(0)
    n = 400
    coord = rng.uniform(0, 2, (n, 3)).astype(np.float32)
    write_scene(tmp_path / "scannet" / "val" / "scene0100_00", {
        "coord": coord, "color": rng.integers(0, 255, (n, 3)).astype(np.uint8),
        "normal": np.tile(np.float32([0, 0, 1]), (n, 1)), "segment20": rng.integers(-1, 20, n).astype(np.int16)})
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet", "--data-root", tmp_path,
                            "--tta", "--save-pred", "--max-points", "3000")
    assert rc == 0, err
    entry = json.loads((experiment / "result" / "metrics.json").read_text())["scannet"]
    assert entry["tta"] is True and entry["scenes"] == 1 and entry["points"] == n
    assert np.load(experiment / "result" / "scannet" / "scene0100_00_pred.npy").shape == (n,)
    assert "tta on" in out


@pytest.mark.parametrize("case, message", [
    ("no_exp", "experiment folder"),
    ("no_config", "config.yaml is missing"),
    ("no_checkpoint", "model_best.pth does not exist"),
    ("bad_weights", "is corrupt or not a PPT checkpoint"),
    ("unknown_dataset", "unknown dataset 'nyu'; valid: scannet, s3dis, structured3d"),
    ("unknown_prompt", "unknown prompt 'kitchen'; valid: s3dis, scannet, mean"),
    ("unseen_no_prompt", "not trained on 'structured3d'"),
])
def test_bad_input_gives_one_error_line(experiment, tmp_path, capsys, case, message):
    exp = tmp_path / "exp"
    args = ["--exp", exp]
    if case == "no_exp":
        pass
    elif case == "no_config":
        exp.mkdir()
    else:
        shutil.copytree(experiment, exp, ignore=shutil.ignore_patterns("result", "events.*"))
        if case == "no_checkpoint":
            (exp / "model" / "model_best.pth").unlink()
        elif case == "bad_weights":
            (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
            args += ["--weights", tmp_path / "junk.pth"]
        elif case == "unknown_dataset":
            args += ["--dataset", "nyu"]
        elif case == "unknown_prompt":
            args += ["--prompt", "kitchen"]
        elif case == "unseen_no_prompt":
            args += ["--dataset", "structured3d"]
    rc, out, err = run_tool(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (exp / "result" / "metrics.json").exists()


def test_unlabelled_scenes_are_predicted_not_scored(experiment, tmp_path, capsys):
    rng = np.random.default_rng(1)
    n = 300
    write_scene(tmp_path / "scannet" / "test" / "scene0707_00", {
        "coord": rng.uniform(0, 2, (n, 3)).astype(np.float32),
        "color": rng.integers(0, 255, (n, 3)).astype(np.uint8),
        "normal": np.tile(np.float32([0, 0, 1]), (n, 1))})
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet", "--split", "test",
                            "--data-root", tmp_path, "--save-pred")
    assert rc == 0, err
    entry = json.loads((experiment / "result" / "metrics.json").read_text())["scannet"]
    assert entry["mIoU"] is None and entry["split"] == "test" and entry["points"] == n
    assert "scannet: mIoU n/a" in out
    assert np.load(experiment / "result" / "scannet" / "scene0707_00_pred.npy").shape == (n,)
