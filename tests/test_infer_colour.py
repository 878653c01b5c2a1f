"""Clouds without colour: colour dropout in training (``data.color_drop``), and what inference
does with a colourless cloud (refuse it, or fill colour exactly as training dropped it)."""
from __future__ import annotations

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from ppt.config import ConfigError, load_config
from ppt.data.datasets import build_dataset
from ppt.data.transforms import DROPPED_COLOR, RandomColorDrop, build_transforms
from ppt.engine.predict import Predictor

from test_infer import save_experiment, tool  # noqa: E402  (tests/ is on sys.path under pytest)


def sample(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return {"coord": rng.random((n, 3)).astype(np.float32) * 3,
            "color": (rng.random((n, 3)) * 200 + 30).astype(np.float32),
            "normal": np.tile(np.float32([0, 0, 1]), (n, 1)), "segment": np.zeros(n, np.int64),
            "dataset": "scannet", "name": "toy"}


def test_colour_drop_blackens_whole_samples_at_rate_p():
    drop = RandomColorDrop(p=0.3, rng=np.random.default_rng(1))
    dropped = 0
    for i in range(400):
        s = sample(50, seed=i)
        before = s["color"].copy()
        out = drop(s)["color"]
        if (out == DROPPED_COLOR).all():
            dropped += 1
        else:  # a sample is dropped whole or not touched (no per-point drop)
            np.testing.assert_array_equal(out, before)
    assert 0.24 < dropped / 400 < 0.36
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        RandomColorDrop(p=1.5)


def test_a_dropped_training_sample_reaches_the_model_as_exactly_the_inference_fill():
    # Training pipeline with every sample dropped: the colour features the model sees must be
    # exactly what Predictor feeds for a colourless cloud after the same normalisation
    # (DROPPED_COLOR / 255). Dropping before the chromatic jitter would leave noise around it.
    out = build_transforms("scannet", "train", 0.05, color_drop=1.0, rng=np.random.default_rng(3))(sample(3000))
    assert (out["feat"][:, :3] == DROPPED_COLOR / 255.0).all()
    kept = build_transforms("scannet", "train", 0.05, rng=np.random.default_rng(3))(sample(3000))
    assert kept["feat"][:, :3].std() > 0.1  # without the key the colour is still there


def test_data_color_drop_reaches_every_training_pipeline(synthetic_root):
    from ppt.engine.build import build_train_loader

    def drops(*extra):
        cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1, s3dis: 1}",
                                 "data.batch_size=2", "data.num_workers=0", "data.check=false", *extra])
        loader = build_train_loader(cfg)
        return {name: [t.p for t in ds.transform.transforms if isinstance(t, RandomColorDrop)]
                for name, ds in loader.datasets.items()}

    assert drops() == {"scannet": [], "s3dis": []}  # default 0: the step is left out
    assert drops("data.color_drop=0.2") == {"scannet": [0.2], "s3dis": [0.2]}
    with pytest.raises(ConfigError, match="data.color_drop"):
        load_config(None, ["data.color_drop=1.5"])


def colourless_scene_ply(synthetic_root, path):
    """A synthetic val scene written as a PLY with coordinates only (no colour, no normals)."""
    scene = build_dataset("scannet", synthetic_root, "val").load(0)
    coord = scene["coord"]
    vertex = np.empty(len(coord), [("x", "f4"), ("y", "f4"), ("z", "f4")])
    for i, axis in enumerate("xyz"):
        vertex[axis] = coord[:, i]
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    return scene


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour_exp")
    return save_experiment(root / "plain"), save_experiment(root / "dropped", "data.color_drop=0.2")


def test_colourless_cloud_is_refused_by_a_colour_only_model(synthetic_root, experiments, tmp_path, capsys):
    plain, _ = experiments
    colourless = tmp_path / "scan.ply"
    colourless_scene_ply(synthetic_root, colourless)
    out = tmp_path / "out"
    rc = tool.main([str(colourless), "--exp", str(plain), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, captured.err  # a user error
    assert str(colourless) in errors[0] and "no colour" in errors[0] and "data.color_drop=0.2" in errors[0]
    assert "Traceback" not in captured.err
    assert not out.exists() or not any(out.iterdir())  # nothing written for a refused cloud


def test_colourless_cloud_is_labelled_with_colour_filled_as_training_dropped_it(synthetic_root, experiments,
                                                                              tmp_path, capsys):
    _, dropped = experiments
    colourless = tmp_path / "scan.ply"
    scene = colourless_scene_ply(synthetic_root, colourless)
    out = tmp_path / "out"
    rc = tool.main([str(colourless), "--exp", str(dropped), "--out", str(out), "--device", "cpu"])
    stdout = capsys.readouterr().out
    notes = [ln for ln in stdout.splitlines() if "no colour" in ln]
    assert rc == 0 and len(notes) == 1 and notes[0].strip().startswith("note: no colour: filled with 0")
    assert "data.color_drop=0.2" in notes[0]
    labels = np.load(out / "scan_pred.npy")
    # The fill is the training drop value: the same labels as the cloud given that colour
    # explicitly, and not those of another constant colour (so the comparison can fail).
    predictor = Predictor(dropped, device="cpu")
    coord = scene["coord"]
    filled = predictor.predict(coord, color=np.full_like(coord, DROPPED_COLOR))
    grey = predictor.predict(coord, color=np.full_like(coord, 128.0))
    np.testing.assert_array_equal(labels, filled.labels)
    assert (grey.labels != filled.labels).mean() > 0.01


def test_bench_colourless_copy_keeps_the_scenes_and_blanks_only_their_colour(synthetic_root, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_colourless",
                                                  Path(__file__).resolve().parents[1] / "bench" / "colourless.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    count = bench.colourless_copy(synthetic_root, tmp_path / "copy", ["scannet", "s3dis"])
    for name in ("scannet", "s3dis"):
        original, copy = build_dataset(name, synthetic_root, "val"), build_dataset(name, tmp_path / "copy", "val")
        assert len(copy) == len(original) > 0
        a, b = original.load(0), copy.load(0)
        np.testing.assert_array_equal(a["coord"], b["coord"])
        np.testing.assert_array_equal(a["segment"], b["segment"])
        assert a["color"].std() > 0 and (b["color"] == DROPPED_COLOR).all()
    assert count == sum(len(build_dataset(n, synthetic_root, "val")) for n in ("scannet", "s3dis"))
