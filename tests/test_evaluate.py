"""Evaluation on every original point, TTA voting and fragment batching, with stand-in models.

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
from ppt.data.grid import build_test_views
from ppt.engine.evaluate import chunk_by_points, confusion_image, evaluate, predict_scene_tta

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


def test_chunk_by_points_bounds_groups_and_keeps_order():
    assert chunk_by_points([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert chunk_by_points([2, 2, 2], 100) == [[0, 1, 2]]


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


def test_validation_batches_scenes_up_to_max_points(scannet):
    one, many = Oracle(), Oracle()
    a = evaluate(one, scannet, "cpu", voxel_size=VOXEL, max_points=1, keep_predictions=True)
    b = evaluate(many, scannet, "cpu", voxel_size=VOXEL, max_points=10**6, keep_predictions=True)
    assert [c[3] for c in one.calls] == [1, 1, 1] and [c[3] for c in many.calls] == [3]
    for name in a["predictions"]:
        np.testing.assert_array_equal(a["predictions"][name], b["predictions"][name])
    np.testing.assert_array_equal(a["confusion"], b["confusion"])


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
    # Every original point receives softmax mass from every one of the 13 views.
    scores = predict_scene_tta(ViewVoter(), fragments, n, K, "scannet", None, torch.device("cpu"))
    assert (scores[:, :13] >= 0.999).all() and scores[:, 13:].sum() < 1e-3


def test_tta_batched_equals_one_fragment_at_a_time(scannet):
    raw = scannet.load(1)
    fragments = build_test_views(raw, VOXEL)
    model, n = ContextModel(), len(raw["coord"])
    single = predict_scene_tta(model, fragments, n, K, "scannet", None, torch.device("cpu"), max_points=1)
    batched = predict_scene_tta(model, fragments, n, K, "scannet", None, torch.device("cpu"), max_points=10**6)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    # The votes sum to one per appearance of a point in a fragment.
    appearances = np.bincount(np.concatenate([f["index"] for f in fragments]), minlength=n)
    torch.testing.assert_close(single.sum(1), torch.from_numpy(appearances).float(), rtol=1e-5, atol=1e-4)


def test_tta_streamed_views_vote_like_all_fragments_at_once(scannet):
    # evaluate() streams one view per loader item and batches across views; the votes must be
    # those of all 13 views' fragments of the scene together.
    model = ContextModel()
    result = evaluate(model, scannet, "cpu", tta=True, voxel_size=VOXEL, max_points=700, keep_predictions=True,
                      num_workers=2)
    for i in range(3):
        raw = scannet.load(i)
        scores = predict_scene_tta(model, build_test_views(raw, VOXEL), len(raw["coord"]), K, "scannet",
                                   None, torch.device("cpu"))
        np.testing.assert_array_equal(result["predictions"][raw["name"]], scores.argmax(1).numpy())


def test_tta_evaluate_is_exact_with_an_oracle(scannet):
    model = Oracle()
    result = evaluate(model, scannet, "cpu", tta=True, voxel_size=VOXEL, max_points=5000)
    assert result["allAcc"] == pytest.approx(1.0) and result["mIoU"] == pytest.approx(1.0)
    assert all(c[3] > 1 for c in model.calls)  # fragments were batched


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


def test_real_model_tta_batched_equals_one_fragment_at_a_time(scannet):
    raw = scannet.load(2)
    fragments = build_test_views(raw, VOXEL)[:4]
    model, n = tiny_segmentor(), len(raw["coord"])
    with torch.inference_mode():
        single = predict_scene_tta(model, fragments, n, K, "scannet", "mean", torch.device("cpu"), max_points=1)
        batched = predict_scene_tta(model, fragments, n, K, "scannet", "mean", torch.device("cpu"), max_points=10**6)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(single[:, 0], single[:, 1])  # the model is not constant
