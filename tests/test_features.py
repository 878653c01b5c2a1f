"""``data.features``: what ``feat`` holds (colour + normal by default; coord + colour + normal for
Sonata / Concerto encoders) reaches every pipeline: training, validation, test-time views and
prediction of users' clouds; wrong settings are config errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ppt.config import load_config
from ppt.data.grid import iter_test_views
from ppt.data.transforms import build_transforms
from ppt.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SONATA = ("coord", "color", "normal")


@pytest.mark.parametrize("split", ["train", "val"])
def test_feat_concatenates_the_named_keys_in_order(toy_sample, split):
    """Bug caught: a pipeline that builds ``feat`` from the default keys whatever was asked."""
    out = build_transforms("scannet", split, 0.05, features=SONATA)(dict(toy_sample))
    assert out["feat"].shape[1] == 9
    assert np.allclose(out["feat"][:, :3], out["coord"])            # centred, augmented coordinates
    assert out["feat"][:, 3:6].min() >= 0 and out["feat"][:, 3:6].max() <= 1  # colour, 0..1
    assert np.allclose(np.linalg.norm(out["feat"][:, 6:], axis=1), 1, atol=1e-4)  # unit normals
    default = build_transforms("scannet", split, 0.05)(dict(toy_sample))
    assert default["feat"].shape[1] == 6


def test_test_time_views_carry_the_features(toy_sample):
    views = list(iter_test_views(dict(toy_sample), 0.05, "fast", features=SONATA))
    assert views and all(v["feat"].shape[1] == 9 and np.allclose(v["feat"][:, :3], v["coord"]) for v in views)


@pytest.mark.parametrize("overrides, key", [
    (["data.features=[coord, color, normal]"], "model.in_channels"),          # 9 channels, model reads 6
    (["data.features=[color, depth]"], "data.features"),                      # unknown key
    (["data.features=[color, color]", "model.in_channels=6"], "data.features"),  # twice
    (["data.features=[]", "model.in_channels=0"], "data.features"),
])
def test_wrong_features_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"'{key}'" in str(err.value)


def test_a_nine_channel_model_trains_evaluates_and_labels_clouds(synthetic_root, tmp_path):
    """End to end with coord + colour + normal: the training loader, the trainer's validation,
    ``tools/test.py`` (plain and test-time augmented) and ``ppt.Predictor`` all feed 9 channels
    (a path left at 6 fails in the first conv)."""
    from ppt.engine.predict import Predictor
    from ppt.engine.trainer import train

    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", "data.val=[scannet]",
                             "data.features=[coord, color, normal]", "model.in_channels=9",
                             "model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]",
                             "model.prompt_dim=16", "model.head=decoupled", "data.voxel_size=0.1",
                             "data.num_workers=0", "data.mix3d_prob=0.0", "data.check=false", "data.batch_size=2",
                             "train.device=cpu", "train.threads=1", "train.epochs=1", "train.eval_every=1",
                             "train.precise_bn=0", "train.log_every=1"])
    summary = train(cfg, tmp_path / "exp")
    assert summary["val"]["scannet"]["mIoU"] >= 0
    spec = importlib.util.spec_from_file_location("ppt_test_tool", ROOT / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for tta in ("off", "fast"):
        assert tool.main(["--exp", str(tmp_path / "exp"), "--tta", tta, "--workers", "0", "--device", "cpu",
                          "--threads", "1"]) == 0
    saved = json.loads((tmp_path / "exp" / "result" / "metrics.json").read_text())["results"]["scannet"]
    assert {e["tta"] for e in saved.values()} == {"off", "fast"}
    rng = np.random.default_rng(0)
    coord = rng.uniform([0, 0, 0], [5, 4, 2.5], (3000, 3)).astype(np.float32)
    color = rng.integers(0, 256, (3000, 3)).astype(np.uint8)
    result = Predictor(tmp_path / "exp", device="cpu").predict(coord, color)
    assert result.labels.shape == (3000,) and (result.labels >= 0).all()
