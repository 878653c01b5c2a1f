"""Evaluation on every original point, TTA voting (fast and fragments), streaming and batching,
with stand-in models.

The stand-ins map batch features to logits, so these tests check the mapping, voting and
batching logic independently of the real network (tests/test_test_tool.py runs the real one).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ppt.data.classes import SCANNET20
from ppt.data.datasets import build_dataset
from ppt.data.scene_io import write_scene
from ppt.data import grid
from ppt.engine import evaluate as evaluate_module
from ppt.data.grid import build_test_views, iter_test_views
from ppt.engine.evaluate import eval_prompt, evaluate, predict_scene
from ppt.engine.logging import confusion_image

VOXEL = 0.1
K = len(SCANNET20)


def make_scene(rng: np.random.Generator, clusters: int = 60) -> dict:
    """Tight clusters (radius 2 cm) on a 0.3 m lattice, 1-8 points each, one label per cluster.

    Clusters are far enough apart that no voxel of 0.1 m (after any TTA rotation or scale)
    mixes two clusters, so an oracle reading the label from the colour is exact per voxel.
    Colour red = 10 * label; ignored clusters are black.
    """
    cells = rng.choice(8 * 8 * 4, clusters, replace=False)
    centres = np.stack(np.unravel_index(cells, (8, 8, 4)), 1) * 0.3
    sizes = rng.integers(1, 9, clusters)
    labels = rng.integers(-1, 8, clusters)
    coord = np.repeat(centres, sizes, 0) + rng.uniform(-0.02, 0.02, (sizes.sum(), 3))
    segment = np.repeat(labels, sizes)
    color = np.zeros((len(coord), 3), np.uint8)
    color[:, 0] = np.where(segment >= 0, segment * 10, 0)
    normal = rng.normal(size=(len(coord), 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return {"coord": coord.astype(np.float32), "color": color, "normal": normal.astype(np.float32),
            "segment20": segment.astype(np.int16)}


@pytest.fixture
def scannet(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_scene(tmp_path / "scannet" / "val" / f"scene{i:04d}_00", make_scene(rng))
    return build_dataset("scannet", tmp_path, "val")


class Oracle(nn.Module):
    """Reads the label from the colour (red = 10 * label); records the modes it ran in."""

    def __init__(self, permutation: dict[str, list[int]] | None = None):
        super().__init__()
        self.permutation = permutation or {}
        self.calls: list[tuple[str, str | None, bool, int]] = []

    def forward(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        self.calls.append((batch["dataset"], prompt, self.training, len(batch["offset"])))
        label = torch.round(batch["feat"][:, 0] * 255 / 10).long()
        logits = 20.0 * nn.functional.one_hot(label, K).float()
        if batch["dataset"] in self.permutation:  # columns of another label set
            logits = logits[:, self.permutation[batch["dataset"]]]
        return logits


class ViewVoter(nn.Module):
    """Puts all the mass of each row on the class numbered like the row's view."""

    def forward(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        counts = torch.diff(batch["offset"], prepend=batch["offset"].new_zeros(1))
        view = torch.repeat_interleave(batch["view"], counts)
        return 100.0 * nn.functional.one_hot(view, K).float()


class ContextModel(nn.Module):
    """Logits depend on each sample's mean feature: wrong offsets would change the output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.point = nn.Parameter(torch.randn(6, K, generator=g))
        self.context = nn.Parameter(torch.randn(6, K, generator=g))

    def forward(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        counts = torch.diff(batch["offset"], prepend=batch["offset"].new_zeros(1))
        sample = torch.repeat_interleave(torch.arange(len(counts)), counts)
        mean = torch.zeros(len(counts), 6).index_add_(0, sample, batch["feat"]) / counts[:, None]
        return batch["feat"] @ self.point + mean[sample] @ self.context + batch["coord"][:, :1]


@pytest.fixture
def batching(monkeypatch):
    """Let CPU forwards hold several samples, as CUDA ones do (the CPU default is one)."""
    monkeypatch.setattr(evaluate_module, "SAMPLES_PER_FORWARD", {})


def scores_of(model, raw, tta, **kw) -> torch.Tensor:
    return predict_scene(model, raw, voxel_size=VOXEL, label_space="scannet", prompt=None, tta=tta,
                         device="cpu", **kw)


class ColourViewModel(nn.Module):
    """Logits = W[view] @ [colour, 1]: a different linear map per view; rows record batch sizes."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(13, K, 4, generator=torch.Generator().manual_seed(1)))
        self.rows: list[int] = []

    def forward(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        self.rows.append(len(batch["coord"]))
        counts = torch.diff(batch["offset"], prepend=batch["offset"].new_zeros(1))
        view = torch.repeat_interleave(batch["view"], counts)
        x = torch.cat([batch["feat"][:, :3], torch.ones(len(view), 1)], 1)
        return torch.einsum("nkc,nc->nk", self.weight[view], x)


def test_validation_maps_voxel_predictions_to_every_original_point(scannet):
    model = Oracle().train()
    result = evaluate(model, scannet, "cpu", voxel_size=VOXEL, keep_predictions=True)
    raw = [scannet.load(i) for i in range(3)]
    assert result["scenes"] == 3 and result["points"] == sum(len(s["coord"]) for s in raw)
    assert result["mIoU"] == pytest.approx(1.0) and result["allAcc"] == pytest.approx(1.0)
    for scene in raw:
        pred, seg = result["predictions"][scene["name"]], scene["segment"]
        assert pred.shape == seg.shape
        np.testing.assert_array_equal(pred[seg >= 0], seg[seg >= 0])
    # Labels 0..7 occur, others never: absent classes are n/a, not 0.
    assert result["per_class"]["wall"] == pytest.approx(1.0)
    assert result["per_class"]["bathtub"] is None
    assert model.training and not any(training for _, _, training, _ in model.calls)


def test_validation_batches_scenes_up_to_max_points(scannet, batching):
    one, many = Oracle(), Oracle()
    a = evaluate(one, scannet, "cpu", voxel_size=VOXEL, max_points=1, keep_predictions=True)
    b = evaluate(many, scannet, "cpu", voxel_size=VOXEL, max_points=10**6, keep_predictions=True)
    assert [c[3] for c in one.calls] == [1, 1, 1] and [c[3] for c in many.calls] == [3]
    for name in a["predictions"]:
        np.testing.assert_array_equal(a["predictions"][name], b["predictions"][name])
    np.testing.assert_array_equal(a["confusion"], b["confusion"])


def test_fast_tta_votes_are_the_weighted_sum_over_views_computed_by_hand(scannet, batching):
    # The votes of point p are sum over the 13 views v and the candidate rows r of its view
    # sample (its voxel and the 6 face neighbours) of w[p, r] * softmax(W[v] @ [colour(r), 1]),
    # recomputed here from the samples' own rows and weights, outside the voter.
    raw = scannet.load(0)
    model = ColourViewModel()
    scores = scores_of(model, raw, "fast", max_points=10**6)
    expected = torch.zeros_like(scores)
    for view in iter_test_views(raw, VOXEL, "fast", seed=0):
        x = torch.cat([torch.from_numpy(view["feat"][:, :3]), torch.ones(len(view["feat"]), 1)], 1)
        probs = torch.softmax(x @ model.weight[view["view"]].T, 1).detach()
        rows, weights = torch.from_numpy(view["vote_rows"]).long(), torch.from_numpy(view["vote_weights"])
        expected += (probs[rows] * weights[..., None]).sum(1)
        assert (weights[:, 0] >= grid.VOTE_FLOOR).all() and rows.shape[1] == 7
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # 13 views, each voxelised once: one forward holding one sample per view, rows = 13 x voxels.
    assert len(model.rows) == 1 and model.rows[0] < 13 * len(raw["coord"])
    # The reference protocol votes once per fragment appearance: more than 13 votes per point.
    fragments = scores_of(ColourViewModel(), raw, "fragments")
    appearances = np.bincount(np.concatenate([f["index"] for f in build_test_views(raw, VOXEL)]),
                              minlength=len(raw["coord"]))
    torch.testing.assert_close(fragments.sum(1), torch.from_numpy(appearances).float(), rtol=1e-5, atol=1e-4)
    assert appearances.max() > 13


def test_cpu_runs_one_sample_per_forward(scannet):
    # spconv's CPU algorithm pays batch x volume for its indice pairs: never batch on the CPU.
    model = Oracle()
    evaluate(model, scannet, "cpu", tta="fast", voxel_size=VOXEL, max_points=10**6)
    assert len(model.calls) == 3 * 13 and {c[3] for c in model.calls} == {1}


def test_fast_tta_gives_each_view_its_weighted_votes_per_point(scannet):
    raw = scannet.load(1)
    fast = scores_of(ViewVoter(), raw, "fast")
    weight = np.stack([v["vote_weights"].sum(1) for v in iter_test_views(raw, VOXEL, "fast", seed=0)], 1)
    torch.testing.assert_close(fast[:, :13], torch.from_numpy(weight), atol=1e-4, rtol=1e-5)
    assert (fast[:, :13] >= grid.VOTE_FLOOR).all() and fast[:, 13:].sum() < 1e-3  # every view reaches every point
    # Fragments: every point gets mass from every view (at least once).
    fragments = scores_of(ViewVoter(), raw, "fragments")
    assert (fragments[:, :13] >= 0.999).all() and fragments[:, 13:].sum() < 1e-3


def test_tta_fragments_cover_every_point_in_every_view(scannet):
    raw = scannet.load(0)
    fragments = build_test_views(raw, VOXEL)
    views = sorted({f["view"] for f in fragments})
    assert views == list(range(13))
    assert sum(f["view"] == 0 for f in fragments) > 1  # several fragments per view
    n = len(raw["coord"])
    for v in views:
        owned = np.zeros(n, int)
        seen = np.zeros(n, bool)
        for f in (f for f in fragments if f["view"] == v):
            seen[f["index"]] = True
            np.add.at(owned, f["index"][f["owned"]], 1)
        assert seen.all() and (owned == 1).all()


def test_fast_views_keep_a_seeded_random_point_per_voxel():
    # Points listed object by object: always keeping a voxel's first point would favour the
    # object written first. The kept point must vary within voxels and repeat for one seed.
    rng = np.random.default_rng(0)
    n = 4000
    ids = np.arange(n)
    raw = {"coord": rng.uniform(0, 1, (n, 3)).astype(np.float32),
           "color": np.stack([ids % 256, ids // 256, np.zeros(n)], 1).astype(np.float32),  # colour = point id
           "normal": np.tile(np.float32([0, 0, 1]), (n, 1)), "name": "box", "dataset": "scannet"}

    def kept(seed: int) -> tuple[np.ndarray, np.ndarray]:
        view = next(iter_test_views(raw, 0.25, "fast", seed=seed))
        colour = np.round(view["feat"][:, :3] * 255).astype(int)
        return colour[:, 0] + 256 * colour[:, 1], view["inverse"]

    point, inverse = kept(0)
    voxels = len(point)
    assert 64 <= voxels <= 125  # a 4^3 grid, shifted by a fraction of a voxel
    assert np.array_equal(inverse[point], np.arange(voxels))  # each row is a point of its voxel
    assert np.array_equal(kept(0)[0], point) and not np.array_equal(kept(1)[0], point)
    first = np.full(voxels, n)
    np.minimum.at(first, inverse, ids)
    counts = np.bincount(inverse)
    assert (point == first)[counts >= 20].mean() < 0.2  # many points per voxel: a random pick is rarely the first


def test_test_views_are_made_lazily(scannet, monkeypatch):
    # Streaming starts at the source: the first fragment comes out before the others are built.
    made = []
    real = grid.index_points
    monkeypatch.setattr(grid, "index_points", lambda sample, ids: made.append(len(ids)) or real(sample, ids))
    views = iter_test_views(scannet.load(0), VOXEL, "fragments")
    next(views)
    assert len(made) == 1
    assert len(list(views)) + 1 > 13  # while the whole scene has many fragments


@pytest.mark.parametrize("tta", ["fast", "fragments"])
def test_tta_streams_in_groups_bounded_by_the_point_budget(scannet, batching, tta):
    raw = scannet.load(2)
    largest = max(len(f["coord"]) for f in build_test_views(raw, VOXEL))
    budget = 2 * largest + 1
    model = ColourViewModel()
    rows, views = [], []
    streamed = scores_of(model, raw, tta, max_points=budget, on_forward=lambda r, v: (rows.append(r), views.append(v)))
    assert len(rows) > 3 and max(model.rows) <= budget and rows == model.rows
    assert sum(views) == 13  # every view reported finished once (progress bars)
    whole = scores_of(ColourViewModel(), raw, tta, max_points=10**7)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)


def test_tta_batched_equals_one_sample_at_a_time_with_context(scannet, batching):
    raw = scannet.load(1)
    model = ContextModel()  # logits depend on each sample's mean: wrong offsets change them
    for tta in ("fast", "fragments"):
        single = scores_of(model, raw, tta, max_points=1)
        batched = scores_of(model, raw, tta, max_points=10**6)
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tta", ["fast", "fragments"])
def test_evaluate_votes_like_predict_scene(scannet, batching, tta):
    # evaluate() streams samples of several scenes from two workers through shared forwards;
    # each scene's votes must be those predict_scene computes for it alone.
    model = ContextModel()
    result = evaluate(model, scannet, "cpu", tta=tta, voxel_size=VOXEL, max_points=700, keep_predictions=True,
                      num_workers=2)
    assert result["tta"] == tta
    for i in range(3):
        raw = scannet.load(i)
        expected = scores_of(model, raw, tta, seed=i).argmax(1).numpy()  # evaluate seeds by scene index
        np.testing.assert_array_equal(result["predictions"][raw["name"]], expected)


def test_tta_evaluate_is_exact_with_an_oracle(scannet, batching):
    for tta in ("fast", "fragments"):
        model = Oracle()
        result = evaluate(model, scannet, "cpu", tta=tta, voxel_size=VOXEL, max_points=5000)
        assert result["allAcc"] == pytest.approx(1.0) and result["mIoU"] == pytest.approx(1.0)
        assert all(c[3] > 1 for c in model.calls)  # samples were batched


def test_tta_true_means_fast_and_unknown_protocols_are_refused(scannet):
    assert evaluate(Oracle(), scannet, "cpu", tta=True, voxel_size=VOXEL)["tta"] == "fast"
    assert evaluate(Oracle(), scannet, "cpu", tta=False, voxel_size=VOXEL)["tta"] == "off"
    with pytest.raises(ValueError, match="fragments"):
        evaluate(Oracle(), scannet, "cpu", tta="slow", voxel_size=VOXEL)


def test_predict_scene_on_a_bare_cloud_returns_probabilities_on_cpu(scannet):
    raw = scannet.load(0)
    bare = {k: raw[k] for k in ("coord", "color", "normal")}  # no name, dataset or labels
    model = Oracle().train()
    scores = scores_of(model, bare, "off")
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (len(bare["coord"]), K)
    torch.testing.assert_close(scores.sum(1), torch.ones(len(scores)))
    seg = raw["segment"]
    np.testing.assert_array_equal(scores.argmax(1).numpy()[seg >= 0], seg[seg >= 0])
    assert model.training and not model.calls[0][2]  # ran in eval mode, mode restored


def test_eval_prompt_refuses_untrained_domains_and_falls_back_to_mean():
    trained = {"scannet", "structured3d"}
    assert eval_prompt("scannet", trained, None) == (None, "")
    assert eval_prompt("s3dis", trained, "scannet") == ("scannet", "")
    assert eval_prompt("s3dis", trained, "mean") == ("mean", "")
    prompt, note = eval_prompt("s3dis", trained, None)
    assert prompt == "mean" and "s3dis" in note and "mean" in note
    with pytest.raises(ValueError, match="--prompt mean"):
        eval_prompt("scannet", trained, "s3dis")


def test_open_vocabulary_label_map_and_default_prompt(scannet):
    # Label set "custom" = (chair, wall): its columns are the oracle's columns 4 and 0.
    model = Oracle({"custom": [4, 0]})
    label_map = np.full(K, -1)
    label_map[SCANNET20.index("chair")], label_map[SCANNET20.index("wall")] = 0, 1
    result = evaluate(model, scannet, "cpu", voxel_size=VOXEL, label_space="custom",
                      class_names=("chair", "wall"), label_map=label_map)
    assert {c[0] for c in model.calls} == {"custom"} and {c[1] for c in model.calls} == {"scannet"}
    assert list(result["per_class"]) == ["chair", "wall"]
    assert result["mIoU"] == pytest.approx(1.0)
    raw = [scannet.load(i)["segment"] for i in range(3)]
    assert sum(result["target"]) == sum(int(np.isin(s, (0, 4)).sum()) for s in raw)


def test_on_scene_gets_original_points(scannet):
    seen = []
    evaluate(Oracle(), scannet, "cpu", voxel_size=VOXEL, prompt="mean", on_scene=seen.append)
    assert len(seen) == 3
    for scene in seen:
        assert scene["coord"].shape == (len(scene["pred"]), 3) and scene["segment"].shape == scene["pred"].shape


def test_confusion_image():
    img = confusion_image(np.array([[5, 1], [0, 3]]), ("wall", "floor"))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 50
    other = confusion_image(np.array([[0, 6], [3, 0]]), ("wall", "floor"))
    assert img.shape == other.shape and not np.array_equal(img, other)
    with pytest.raises(ValueError, match="2 class names"):
        confusion_image(np.zeros((3, 3)), ("a", "b"))


def tiny_segmentor() -> nn.Module:
    from ppt.models.segmentor import Segmentor

    torch.manual_seed(0)
    model = Segmentor({"scannet": SCANNET20, "s3dis": ("ceiling", "floor")},
                      backbone=dict(channels=(8, 8, 16, 16, 16, 8, 8, 8), layers=(1,) * 8, stem_channels=8),
                      prompt="pdnorm", prompt_dim=16, head="decoupled")
    # Non-trivial running statistics, so eval-mode BN is not the identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_real_model_tta_batched_equals_one_view_at_a_time(scannet, batching):
    raw = scannet.load(2)
    model = tiny_segmentor()
    kw = dict(voxel_size=VOXEL, label_space="scannet", prompt="mean", tta="fast", device="cpu")
    single = predict_scene(model, raw, max_points=1, **kw)
    batched = predict_scene(model, raw, max_points=10**6, **kw)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(single[:, 0], single[:, 1])  # the model is not constant
