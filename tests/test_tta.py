"""The fast test-time protocol's pieces: neighbour rows, vote weights, shifted grids, points that
share a voxel voting apart, and ``tools/test.py --tta`` running this protocol (not the previous
one, where every point of a voxel took the prediction of the voxel's kept point)."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ppt.data import grid
from ppt.data.grid import TestGrid, iter_test_views, neighbour_rows, vote_weights
from ppt.data.scene_io import write_scene
from ppt.engine import evaluate as evaluate_module
from ppt.engine.evaluate import predict_scene

ROOT = Path(__file__).resolve().parents[1]
K = 20  # scannet classes
RED, BLUE = 0, 2  # classes the colour model gives red and blue points
PREVIOUS_FAST = {"sigma": None, "shift": False}  # every point takes its voxel's vote, fixed grid


class ColourModel(nn.Module):
    """Class = the brightest colour channel (red -> 0, green -> 1, blue -> 2), nothing else."""

    domains = ("scannet",)

    def forward(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        return 20.0 * nn.functional.one_hot(batch["feat"][:, :3].argmax(1), K).float()


def test_neighbour_rows_on_a_hand_made_grid():
    # Rows in lexicographic order: (0,0,0) (0,0,1) (0,1,0) (1,0,0) (2,2,2).
    cells = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [2, 2, 2]])
    rows = neighbour_rows(cells)
    # Columns: self, +x, -x, +y, -y, +z, -z.
    np.testing.assert_array_equal(rows, [
        [0, 3, -1, 2, -1, 1, -1],
        [1, -1, -1, -1, -1, -1, 0],
        [2, -1, -1, -1, 0, -1, -1],
        [3, -1, 0, -1, -1, -1, -1],
        [4, -1, -1, -1, -1, -1, -1],    # isolated: no neighbour, and no wrap-around to (2,2,1) etc.
    ])
    with pytest.raises(ValueError, match="lexicographic"):
        neighbour_rows(cells[::-1])
    assert neighbour_rows(np.zeros((0, 3), int)).shape == (0, 7)


def test_vote_weights_by_hand():
    feat = np.float32([[1, 0, 0], [0, 0, 1]])             # a red point and a blue point
    row_feat = np.float32([[1, 0, 0], [0.9, 0, 0], [0, 0, 1]])
    rows = np.array([[2, 0, 1, -1], [2, 0, 1, -1]])
    w = vote_weights(feat, row_feat, rows, sigma=0.5, floor=1e-3)
    red_to_blue = np.exp(-2 / 0.25)                        # |(1,0,0) - (0,0,1)|^2 = 2
    np.testing.assert_allclose(w, [
        [max(red_to_blue, 1e-3), 1, np.exp(-0.01 / 0.25), 0],   # own voxel (column 0) floored
        [1, red_to_blue, np.exp(-(0.81 + 1) / 0.25), 0],        # no voxel (-1): weight 0
    ], rtol=1e-5)
    # Far apart in features: exactly 0 (not a subnormal float), except the own voxel's floor.
    far = vote_weights(np.float32([[0, 0, 0]]), np.float32([[10, 0, 0]]), np.array([[0, 0]]), sigma=0.1)
    assert far[0, 0] == grid.VOTE_FLOOR and far[0, 1] == 0


def row_scene() -> dict:
    """Three 10 cm voxels along x: red points, then one red and one blue point, then blue points.

    Points sit near the voxel centres (x = 0.05, 0.15, 0.25), so no voxel border is close.
    """
    red, blue = [255, 0, 0], [0, 0, 255]
    coord = [[0.05, 0.05, 0.05], [0.04, 0.06, 0.05],      # voxel 0: red
             [0.14, 0.05, 0.05], [0.16, 0.05, 0.05],      # voxel 1: red, blue
             [0.25, 0.05, 0.05], [0.26, 0.04, 0.05]]      # voxel 2: blue
    color = [red, red, red, blue, blue, blue]
    return {"coord": np.float32(coord), "color": np.float32(color) / 255,
            "normal": np.tile(np.float32([0, 0, 1]), (6, 1))}


def votes(sample: dict) -> torch.Tensor:
    """Scores of every original point from one fast view, as the evaluation voter sums them."""
    probs = ColourModel()({"feat": torch.from_numpy(sample["color"])}).softmax(1)
    return nn.functional.embedding_bag(torch.from_numpy(sample["vote_rows"]), probs, mode="sum",
                                       per_sample_weights=torch.from_numpy(sample["vote_weights"]))


def test_points_sharing_a_voxel_each_take_the_vote_of_the_neighbour_they_look_like():
    kept = set()
    for seed in range(20):  # both choices of the shared voxel's kept point
        sample = TestGrid(0.1, rng=np.random.default_rng(seed), shift=False)(row_scene())
        assert len(sample["coord"]) == 3 and sample["inverse"][2] == sample["inverse"][3]
        kept.add(int(np.argmax(sample["color"][1])))   # colour of the shared voxel's kept point
        np.testing.assert_array_equal(votes(sample).argmax(1).numpy(), [RED, RED, RED, BLUE, BLUE, BLUE])
        # Column 0 is the point's own voxel, and only the two outer voxels are its neighbours.
        np.testing.assert_array_equal(sample["vote_rows"][:, 0], sample["inverse"])
        assert (sample["vote_weights"][:, 3:] == 0).all()  # no voxel at +-y, +-z
    assert kept == {0, 2}
    # The previous protocol gives the two points of the shared voxel one prediction: one is wrong.
    old = TestGrid(0.1, rng=np.random.default_rng(0), sigma=None, shift=False)(row_scene())
    assert "vote_rows" not in old and old["inverse"][2] == old["inverse"][3]


def test_shifted_grids_move_voxel_borders_and_repeat_per_seed():
    rng = np.random.default_rng(0)
    scene = {"coord": rng.uniform(0, 1, (3000, 3)).astype(np.float32),
             "color": rng.uniform(0, 1, (3000, 3)).astype(np.float32),
             "normal": np.tile(np.float32([0, 0, 1]), (3000, 1))}

    def partition(seed: int, shift: bool = True) -> np.ndarray:
        return TestGrid(0.25, rng=np.random.default_rng(seed), shift=shift)(dict(scene))["inverse"]

    fixed = partition(0, shift=False)
    assert len(np.unique(fixed)) == 64                        # a 4^3 grid without the shift
    assert len(np.unique(partition(0))) > 64                  # borders fall elsewhere
    np.testing.assert_array_equal(partition(0), partition(0))  # seeded
    assert not np.array_equal(partition(0), partition(1))


def test_fast_views_carry_votes_and_fragments_do_not():
    scene = dict(row_scene(), color=row_scene()["color"] * 255)
    fast = list(iter_test_views(scene, 0.1, "fast"))
    assert len(fast) == 13
    for view in fast:
        assert view["vote_rows"].shape == view["vote_weights"].shape == (6, 7)
        assert view["vote_rows"].max() < len(view["coord"])
    assert all("vote_rows" not in f for f in iter_test_views(scene, 0.1, "fragments"))
    old = list(iter_test_views(scene, 0.1, "fast", fast_options=PREVIOUS_FAST))
    assert all("vote_rows" not in v and "inverse" in v for v in old)


def striped_scene(n: int = 40) -> dict:
    """A 1 m x 1 m plate at 2.5 cm spacing in 5 cm stripes, red and blue in turn along x: every
    10 cm voxel holds points of both colours. Labels = the colour's class."""
    xs = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(xs, xs, indexing="ij")
    coord = np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], 1).astype(np.float32)
    red = np.floor(coord[:, 0] / 0.05) % 2 == 0
    color = np.where(red[:, None], [255, 0, 0], [0, 0, 255]).astype(np.uint8)
    return {"coord": coord, "color": color, "normal": np.tile(np.float32([0, 0, 1]), (n * n, 1)),
            "segment20": np.where(red, RED, BLUE).astype(np.int16)}


def test_fast_tta_labels_every_stripe_finer_than_a_voxel():
    scene = striped_scene()
    scene["color"] = scene["color"].astype(np.float32)
    kw = dict(voxel_size=0.1, label_space="scannet", prompt=None, tta="fast", device="cpu")
    pred = predict_scene(ColourModel(), scene, **kw).argmax(1).numpy()
    np.testing.assert_array_equal(pred, scene["segment20"])
    old = functools.partial(evaluate_module.iter_test_views, fast_options=PREVIOUS_FAST)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate_module, "iter_test_views", old)
        pred = predict_scene(ColourModel(), scene, **kw).argmax(1).numpy()
    assert 0.2 < (pred != scene["segment20"]).mean() < 0.8  # one vote per voxel: about half wrong


@pytest.fixture
def colour_experiment(tmp_path, monkeypatch):
    """tools/test.py with a colour-reading stand-in model on one scannet scene, ``striped_scene``."""
    from ppt.config import load_config

    spec = importlib.util.spec_from_file_location("ppt_test_tool_tta", ROOT / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root, exp = tmp_path / "data", tmp_path / "exp"
    exp.mkdir()
    write_scene(root / "scannet" / "val" / "scene0000_00", striped_scene())
    cfg = load_config(None, [f"data.root={root}", "data.mix={scannet: 1}", "data.voxel_size=0.1"])
    monkeypatch.setattr(tool, "load_experiment", lambda exp, weights, device: (cfg, ColourModel(), exp / "x.pth"))

    def run(*flags: str) -> np.ndarray:
        argv = ["--exp", str(exp), "--dataset", "scannet", *flags, "--save-pred", "--device", "cpu",
                "--workers", "0", "--threads", "0"]
        assert tool.main(argv) == 0
        return np.load(exp / "result" / "scannet" / "tta-fast" / "scene0000_00_pred.npy")

    return run, striped_scene()["segment20"]


def test_tools_test_tta_runs_the_vote_protocol(colour_experiment, monkeypatch):
    run, truth = colour_experiment
    np.testing.assert_array_equal(run("--tta"), truth)  # every point of every stripe
    # The same call site with the previous fast protocol gives both stripes of a voxel one label:
    # this test fails if tools/test.py --tta stops running the vote protocol.
    monkeypatch.setattr(evaluate_module, "iter_test_views",
                        functools.partial(evaluate_module.iter_test_views, fast_options=PREVIOUS_FAST))
    assert (run("--tta") != truth).mean() > 0.2
