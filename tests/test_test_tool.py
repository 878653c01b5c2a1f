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
        "train.epochs=1", "train.steps_per_epoch=1", "train.device=cpu", "train.threads=1"])
    train(cfg, exp)
    assert (exp / "model" / "model_best.pth").is_file()
    return exp


def run_tool(capsys, *args, workers: int = 0) -> tuple[int, str, str]:
    rc = tool.main([*map(str, args), "--workers", str(workers), "--device", "cpu", "--threads", "0"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def results(exp: Path) -> dict:
    return json.loads((exp / "result" / "metrics.json").read_text())["results"]


def only_entry(exp: Path, dataset: str, **mode) -> dict:
    """The one entry of ``dataset`` whose fields match ``mode`` (e.g. tta="fast")."""
    found = [e for e in results(exp)[dataset].values() if all(e[k] == v for k, v in mode.items())]
    assert len(found) == 1, found
    return found[0]


def independent_mious(preds: list[np.ndarray], segments: list[np.ndarray], k: int) -> tuple[float, float]:
    """(mean IoU over classes present, mean IoU over all k classes) by counting points per class."""
    pred, gt = np.concatenate(preds).astype(int), np.concatenate(segments).astype(int)
    pred, gt = pred[gt >= 0], gt[gt >= 0]
    ious = []
    for c in range(k):
        inter = int(((pred == c) & (gt == c)).sum())
        union = int(((pred == c) | (gt == c)).sum())
        ious.append(inter / union if union else None)
    present = [v for v in ious if v is not None]
    return float(np.mean(present)), float(sum(present) / k)


def test_end_to_end_metrics_predictions_and_ply(experiment, synthetic_root, capsys):
    from plyfile import PlyData

    from ppt.data.datasets import build_dataset

    rc, out, err = run_tool(capsys, "--exp", experiment, "--save-pred", "--ply")
    assert rc == 0, err
    metrics = json.loads((experiment / "result" / "metrics.json").read_text())
    assert "classes present" in metrics["conventions"]["mIoU"] and "ALL" not in metrics["conventions"]["mIoU"]
    assert "all classes" in metrics["conventions"]["mIoU_ref"]
    assert set(metrics["results"]) >= {"scannet", "s3dis"}
    for name, classes in (("scannet", SCANNET20), ("s3dis", S3DIS13)):
        entry = metrics["results"][name]["split=val; tta=off; prompt=%s; classes=%s" % (name, name)]
        assert list(entry["per_class"]) == list(classes)
        assert 0 <= entry["mIoU"] <= 1 and 0 <= entry["allAcc"] <= 1
        out_dir = experiment / "result" / name
        assert f"predictions (1 scenes, _pred.npy and _pred.ply) written to {out_dir}" in out
        dataset = build_dataset(name, synthetic_root, "val")
        preds, segments = [], []
        for i in range(len(dataset.scenes)):
            scene = dataset.load(i)
            pred = np.load(out_dir / f"{scene['name']}_pred.npy")
            assert pred.shape == (len(scene["coord"]),) and pred.min() >= 0 and pred.max() < len(classes)
            ply = PlyData.read(str(out_dir / f"{scene['name']}_pred.ply"))["vertex"]
            np.testing.assert_array_equal(ply["pred"], pred)
            np.testing.assert_array_equal(ply["gt"], scene["segment"])
            np.testing.assert_allclose(ply["x"], scene["coord"][:, 0])
            preds.append(pred)
            segments.append(scene["segment"])
            assert f"{name} {i + 1}/{len(dataset.scenes)} {scene['name']}: " in out  # a line per scene
        # Both mIoUs, recomputed from the written predictions and the ground truth.
        ours, ref = independent_mious(preds, segments, len(classes))
        assert entry["mIoU"] == pytest.approx(ours) and entry["mIoU_ref"] == pytest.approx(ref)
        assert entry["mIoU_ref"] < entry["mIoU"]  # some classes are absent from one small val scene
        assert f"{name}: mIoU {100 * ours:.2f} (classes present)  mIoU_ref {100 * ref:.2f}" in out
    assert "wall" in out and "mAcc" in out
    # The trainer validated the same weights on the same scenes: the tool must agree with it
    # (a checkpoint not loaded, or loaded into the wrong places, would not).
    best = torch.load(experiment / "model" / "model_best.pth", weights_only=True)["best_metric"]
    plain = [only_entry(experiment, d, tta="off", prompt=d, label_set=None, split="val") for d in ("scannet", "s3dis")]
    assert plain[0]["mIoU"] == pytest.approx(best)  # train.best_on "first": the first dataset of data.mix


def test_metrics_file_keeps_every_mode(experiment, capsys):
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "s3dis")
    assert rc == 0, err
    own = only_entry(experiment, "s3dis", prompt="s3dis", tta="off", label_set=None, split="val")
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "s3dis", "--prompt", "mean")
    assert rc == 0, err
    assert "prompt mean" in out
    mean = only_entry(experiment, "s3dis", prompt="mean", tta="off", label_set=None, split="val")
    assert only_entry(experiment, "s3dis", prompt="s3dis", tta="off", label_set=None, split="val") == own
    assert mean["evaluated_at"] >= own["evaluated_at"] and mean["prompt_note"] is None
    before = results(experiment)
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet")
    after = results(experiment)
    assert after["s3dis"] == before["s3dis"]
    assert not list((experiment / "result").glob(".*tmp"))  # atomic write left no temp file


def test_old_flat_metrics_file_is_kept_under_its_mode(experiment, tmp_path, capsys):
    exp = tmp_path / "exp"
    shutil.copytree(experiment, exp, ignore=shutil.ignore_patterns("result", "events.*"))
    (exp / "result").mkdir()
    (exp / "result" / "metrics.json").write_text(json.dumps(
        {"scannet": {"mIoU": 0.5, "split": "val", "tta": True, "prompt": "scannet", "label_set": None}}))
    rc, out, err = run_tool(capsys, "--exp", exp, "--dataset", "scannet")
    assert rc == 0, err
    modes = results(exp)["scannet"]
    assert modes["split=val; tta=fragments; prompt=scannet; classes=scannet"]["mIoU"] == 0.5
    assert "split=val; tta=off; prompt=scannet; classes=scannet" in modes


def test_open_vocabulary_classes_map_labels_by_name(experiment, capsys):
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet",
                            "--classes", "Wall, floor,lamp")
    assert rc == 0, err
    entry = only_entry(experiment, "scannet", label_set=["Wall", "floor", "lamp"])
    assert list(entry["per_class"]) == ["Wall", "floor", "lamp"]
    assert entry["per_class"]["lamp"] is None or entry["per_class"]["lamp"] == 0.0  # not in ScanNet's labels
    assert entry["per_class_acc"]["lamp"] is None
    # A listed name the dataset lacks: one warning that lists the dataset's names.
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'lamp'" in warnings[0] and "'Wall'" not in warnings[0]
    assert ", ".join(SCANNET20) in warnings[0]


def test_misspelt_classes_warn_instead_of_scoring_silently(experiment, capsys):
    rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet", "--classes", "wal,floor")
    assert rc == 0, err
    assert "warning: --classes 'wal' not among scannet's classes" in err and "wall, floor, cabinet" in err


def test_label_map_by_name():
    m = tool.label_map_by_name(("wall", "shower curtain", "otherfurniture"), ["Shower_Curtain", "wall"])
    np.testing.assert_array_equal(m, [1, 0, -1])


def test_tta_protocols_on_a_small_scene(experiment, tmp_path, capsys):
    # Fragment TTA costs 13 views x fragments: give it one small scene through --data-root.
    rng = np.random.default_rng(0)
    n = 400
    coord = rng.uniform(0, 2, (n, 3)).astype(np.float32)
    write_scene(tmp_path / "scannet" / "val" / "scene0100_00", {
        "coord": coord, "color": rng.integers(0, 255, (n, 3)).astype(np.uint8),
        "normal": np.tile(np.float32([0, 0, 1]), (n, 1)), "segment20": rng.integers(-1, 20, n).astype(np.int16)})
    for flag, protocol in ((["--tta"], "fast"), (["--tta", "fragments"], "fragments")):
        rc, out, err = run_tool(capsys, "--exp", experiment, "--dataset", "scannet", "--data-root", tmp_path,
                                *flag, "--save-pred", "--max-points", "3000")
        assert rc == 0, err
        entry = only_entry(experiment, "scannet", tta=protocol, split="val", label_set=None)
        assert entry["scenes"] == 1 and entry["points"] == n
        folder = experiment / "result" / "scannet" / f"tta-{protocol}"
        assert np.load(folder / "scene0100_00_pred.npy").shape == (n,)
        assert f"written to {folder}" in out and f"tta {protocol}" in out
        assert "scannet 1/1 scene0100_00: 400 points" in out


def test_untrained_domain_gets_the_mean_prompt_and_cannot_be_asked_for(experiment, tmp_path, capsys):
    import yaml

    # Same weights, but the config says s3dis was only validated, never trained (data.val).
    exp = tmp_path / "exp"
    shutil.copytree(experiment, exp, ignore=shutil.ignore_patterns("result", "events.*"))
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    cfg["data"]["mix"], cfg["data"]["val"] = {"scannet": 1}, ["scannet", "s3dis"]
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = run_tool(capsys, "--exp", exp, "--prompt", "s3dis")
    assert rc == 2 and err.startswith("error: ") and "--prompt mean" in err and "'s3dis'" in err
    assert len(err.strip().splitlines()) == 1 and not (exp / "result").exists()
    rc, out, err = run_tool(capsys, "--exp", exp, "--dataset", "s3dis")
    assert rc == 0, err
    assert "note: s3dis was not trained: evaluated with the mean prompt" in out and "prompt mean" in out
    entry = only_entry(exp, "s3dis")
    assert entry["prompt"] == "mean" and "not trained" in entry["prompt_note"]


@pytest.mark.parametrize("case, message", [
    ("no_exp", "experiment folder"),
    ("no_config", "config.yaml is missing"),
    ("no_checkpoint", "model_best.pth does not exist"),
    ("bad_weights", "is corrupt or not a PPT checkpoint"),
    ("unknown_dataset", "unknown dataset 'nyu': not built in (scannet, scannet200, s3dis, structured3d)"),
    ("unknown_prompt", "unknown prompt 'kitchen'; valid: s3dis, scannet, mean"),
    ("empty_classes", "--classes ' , ' lists no class name"),
    ("truncated_scene", "not a readable .npy file"),
    ("nan_scene", "points have NaN or inf coordinates"),  # found while loading, in a loader worker
])
def test_bad_input_gives_one_error_line(experiment, synthetic_root, tmp_path, capsys, case, message):
    exp = tmp_path / "exp"
    args = ["--exp", exp]
    if case == "no_exp":
        pass
    elif case == "no_config":
        exp.mkdir()
    else:
        shutil.copytree(experiment, exp, ignore=shutil.ignore_patterns("result", "events.*"))
        if case == "no_checkpoint":
            (exp / "model" / "model_best.pth").unlink()   # model_last.pth would be used instead
            (exp / "model" / "model_last.pth").unlink()
        elif case == "bad_weights":
            (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
            args += ["--weights", tmp_path / "junk.pth"]
        elif case == "unknown_dataset":
            args += ["--dataset", "nyu"]
        elif case == "unknown_prompt":
            args += ["--prompt", "kitchen"]
        elif case == "empty_classes":
            args += ["--classes", " , "]
        elif case == "truncated_scene":
            data = tmp_path / "data"
            shutil.copytree(synthetic_root / "scannet", data / "scannet")
            bad = sorted((data / "scannet").glob("val/*/coord.npy"))[0]
            bad.write_bytes(bad.read_bytes()[:200])  # header intact, data cut short
            args += ["--dataset", "scannet", "--data-root", data]
            message = f"{bad}: {message}"
        elif case == "nan_scene":
            data = tmp_path / "data"
            shutil.copytree(synthetic_root / "scannet", data / "scannet")
            bad = sorted((data / "scannet").glob("val/*/coord.npy"))[0]
            coord = np.load(bad)
            coord[5] = np.nan
            np.save(bad, coord)
            args += ["--dataset", "scannet", "--data-root", data]
            message = f"{bad}: 1 {message}"
    rc, out, err = run_tool(capsys, *args, workers=1 if case == "nan_scene" else 0)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in err + out
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
    entry = only_entry(experiment, "scannet", split="test")
    assert entry["mIoU"] is None and entry["mIoU_ref"] is None and entry["points"] == n
    assert "scannet: mIoU n/a" in out
    assert np.load(experiment / "result" / "scannet" / "test" / "scene0707_00_pred.npy").shape == (n,)
