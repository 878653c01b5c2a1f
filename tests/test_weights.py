"""ppt.engine.weights: a checkpoint mapped onto another model by key and by dataset name.

The base models are made non-trivial before mapping (random prompts, non-zero modulation,
per-dataset BN affines and running statistics far from the defaults), so any wrong mapping
(wrong prompt row, another dataset's statistics, unfolded modulation) changes the outputs.
CPU, tiny widths, one batch of two ~600-voxel scenes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ppt.data.classes import DATASETS
from ppt.engine.checkpoint import CheckpointError, atomic_save
from ppt.engine.weights import (
    BY_CLASS, BY_NAME, FOLDED, FRESH, FROM_MEAN, OWN, PROMPT_TABLE, load_weights, map_weights,
)
from ppt.models.segmentor import Segmentor

REPO = Path(__file__).resolve().parents[1]
TINY = dict(channels=(8, 8, 16, 16, 16, 16, 8, 8), layers=(1,) * 8, stem_channels=8)
JOINT = ("structured3d", "scannet", "s3dis")
STEM = "backbone.stem.norm"


def embeddings(datasets) -> dict[str, torch.Tensor]:
    """One fixed embedding per class NAME, so a class has the same text in every dataset."""
    out = {}
    for d in datasets:
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(sum(map(ord, c))))
                for c in DATASETS[d].class_names]
        out[d] = F.normalize(torch.stack(rows), dim=-1)
    return out


def model(datasets, prompt: str = "pdnorm", head: str = "language", decoupled: bool = True,
          seed: int = 0) -> Segmentor:
    torch.manual_seed(seed)
    return Segmentor({d: DATASETS[d].class_names for d in datasets}, backbone=TINY, prompt=prompt,
                     prompt_dim=16, decoupled_bn=decoupled, head=head, zero_init=False,
                     text_embeddings=embeddings(datasets) if head == "language" else None)


def trained_like(m: Segmentor, seed: int = 1) -> Segmentor:
    """Every parameter moved, every BN given its own running statistics (non-default)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.running_mean.copy_(0.5 * torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.num_batches_tracked.fill_(7)
    return m.eval()


def batch(dataset: str, seed: int = 0, n: int = 1200, extent: int = 14) -> dict:
    g = torch.Generator().manual_seed(seed)
    scenes = [torch.unique(torch.randint(0, extent, (n // 2, 3), generator=g), dim=0) for _ in range(2)]
    grid = torch.cat(scenes).int()
    return dict(grid_coord=grid, feat=torch.randn(len(grid), 6, generator=g),
                offset=torch.tensor([len(scenes[0]), len(grid)]), dataset=dataset)


def save(m: Segmentor, path: Path, datasets) -> Path:
    atomic_save({"model": m.state_dict(), "config": {"data": {"mix": {d: 1 for d in datasets}}}}, path)
    return path


# Rounding, amplified by the language head's logit scale 100: a folded affine rounds differently
# from BN-then-modulate (measured <= 7e-4), and the "mean" domain's mixture variance
# E[var + mean^2] - E[mean]^2 cancels, in fp32 in PDNorm, in fp64 in the mapping (<= 2e-3).
# A wrong statistic or prompt moves logits by units.
TOL = dict(rtol=1e-3, atol=1e-2)


@torch.no_grad()
def logits(m: Segmentor, dataset: str, prompt: str | None = None) -> torch.Tensor:
    return m.eval()(batch(dataset), prompt=prompt)


@pytest.fixture(scope="module")
def joint(tmp_path_factory) -> tuple[dict[str, Segmentor], dict[str, Path]]:
    """Joint PPT models over structured3d + scannet + s3dis, one per head, and their files."""
    folder = tmp_path_factory.mktemp("joint")
    models = {h: trained_like(model(JOINT, head=h)) for h in ("language", "decoupled", "union")}
    return models, {h: save(m, folder / f"{h}.pth", JOINT) for h, m in models.items()}


# --- (a) one dataset of a joint model -------------------------------------------------------

@pytest.mark.parametrize("head", ["language", "decoupled", "union"])
def test_fine_tuning_on_one_dataset_starts_from_its_prompt_statistics_and_head(joint, head):
    base, path = joint[0][head], joint[1][head]
    target = model(["scannet"], head=head, seed=5)
    report = load_weights(target, path)
    state, ref = target.state_dict(), base.state_dict()
    torch.testing.assert_close(state[PROMPT_TABLE][0], ref[PROMPT_TABLE][JOINT.index("scannet")])
    for p in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(state[f"{STEM}.norms.scannet.{p}"], ref[f"{STEM}.norms.scannet.{p}"])
    # the whole model: the fine-tuned start computes what the joint model computed for scannet
    torch.testing.assert_close(logits(target, "scannet"), logits(base, "scannet"))
    assert "scannet<-scannet" in report and "dropped base datasets: structured3d, s3dis" in report


# --- (b) a dataset the base never saw -------------------------------------------------------

def test_new_dataset_starts_from_the_base_mean_domain(tmp_path):
    base = trained_like(model(["structured3d", "scannet"]))
    target = model(["scannet", "s3dis"], seed=5)
    report = map_weights(target, save(base, tmp_path / "base.pth", ["structured3d", "scannet"]))
    state, ref = target.state_dict(), base.state_dict()
    torch.testing.assert_close(state[PROMPT_TABLE][1], ref[PROMPT_TABLE].mean(0))
    means = torch.stack([ref[f"{STEM}.norms.{d}.running_mean"] for d in ("structured3d", "scannet")])
    variances = torch.stack([ref[f"{STEM}.norms.{d}.running_var"] for d in ("structured3d", "scannet")])
    torch.testing.assert_close(state[f"{STEM}.norms.s3dis.running_mean"], means.mean(0))
    torch.testing.assert_close(state[f"{STEM}.norms.s3dis.running_var"],
                               (variances + means ** 2).mean(0) - means.mean(0) ** 2)
    # end to end: the new dataset computes the base's "mean" domain with s3dis's class names
    base.set_label_space("s3dis", DATASETS["s3dis"].class_names, embeddings(["s3dis"])["s3dis"])
    torch.testing.assert_close(logits(target, "s3dis"), logits(base, "s3dis", prompt="mean"), **TOL)
    torch.testing.assert_close(logits(target, "scannet"), logits(base, "scannet"))
    assert report.datasets == {"scannet": "scannet", "s3dis": "mean"}
    assert f"{STEM}.norms.s3dis.running_var" in report.keys(FROM_MEAN)
    assert set(report.keys(OWN)) == {"head.text_scannet", "head.text_s3dis"}


def test_datasets_the_base_only_validated_are_never_a_source(tmp_path):
    """A base trained on structured3d + scannet with s3dis in data.val only: its s3dis prompt and
    statistics are untrained, so s3dis starts from the mean of the two trained datasets."""
    base = trained_like(model(JOINT))
    path = tmp_path / "base.pth"
    atomic_save({"model": base.state_dict(),
                 "config": {"data": {"mix": {"structured3d": 4, "scannet": 2}, "val": ["s3dis"]}}}, path)
    target = model(["s3dis"], seed=5)
    report = map_weights(target, path)
    state, ref = target.state_dict(), base.state_dict()
    torch.testing.assert_close(state[PROMPT_TABLE][0], ref[PROMPT_TABLE][:2].mean(0))
    weights = torch.stack([ref[f"{STEM}.norms.{d}.weight"] for d in ("structured3d", "scannet")])
    torch.testing.assert_close(state[f"{STEM}.norms.s3dis.weight"], weights.mean(0))
    assert report.datasets == {"s3dis": "mean"} and report.trained == ["structured3d", "scannet"]
    assert "untrained in the base (validated only), not used: s3dis" in report.summary()


def test_new_dataset_classifier_rows_come_by_class_name(tmp_path):
    base = trained_like(model(["structured3d", "scannet"], head="decoupled"))
    target = model(["s3dis"], head="decoupled", seed=5)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = map_weights(target, save(base, tmp_path / "base.pth", ["structured3d", "scannet"]))
    weight, ref = target.state_dict()["head.classifiers.s3dis.weight"], base.state_dict()
    names = DATASETS["s3dis"].class_names
    for i, name in enumerate(names):
        holders = [d for d in ("structured3d", "scannet") if name in DATASETS[d].class_names]
        if holders:  # the first base dataset that has the class
            row = DATASETS[holders[0]].class_names.index(name)
            torch.testing.assert_close(weight[i], ref[f"head.classifiers.{holders[0]}.weight"][row])
        else:  # beam, column, bookcase, board, clutter: kept initialised
            torch.testing.assert_close(weight[i], fresh["head.classifiers.s3dis.weight"][i])
    assert report.sources["head.classifiers.s3dis.weight"] == BY_CLASS


# --- (c) a prompt-free model from a PDNorm base ---------------------------------------------

@pytest.mark.parametrize("decoupled", [True, False])
def test_prompt_free_model_folds_the_datasets_prompt_into_its_bn(joint, tmp_path, decoupled):
    base = joint[0]["language"] if decoupled else trained_like(model(JOINT, decoupled=False))
    path = joint[1]["language"] if decoupled else save(base, tmp_path / "shared.pth", JOINT)
    target = model(["scannet"], prompt="none", seed=5)
    report = map_weights(target, path)
    torch.testing.assert_close(logits(target, "scannet"), logits(base, "scannet"), **TOL)
    assert f"{STEM}.weight" in report.keys(FOLDED) and report.shared_domain == "scannet"
    assert "scannet statistics with its prompt folded" in report.summary()
    if decoupled:  # the statistics are scannet's own, unchanged by the fold
        torch.testing.assert_close(target.state_dict()[f"{STEM}.running_var"],
                                   base.state_dict()[f"{STEM}.norms.scannet.running_var"])


def test_prompt_free_model_on_several_datasets_uses_the_mean_domain(joint):
    base = joint[0]["language"]
    target = model(["scannet", "s3dis"], prompt="none", seed=5)
    report = map_weights(target, joint[1]["language"])
    assert report.shared_domain == "mean"
    for d in ("scannet", "s3dis"):
        torch.testing.assert_close(logits(target, d), logits(base, d, prompt="mean"), **TOL)


# --- (d) the report ------------------------------------------------------------------------

def test_report_lists_mapped_fresh_and_dropped(tmp_path):
    base = trained_like(model(["structured3d", "scannet"], head="language"))
    target = model(["scannet", "s3dis"], head="decoupled", seed=5)
    report = map_weights(target, save(base, tmp_path / "base.pth", ["structured3d", "scannet"]))
    own = target.state_dict()
    assert report.datasets == {"scannet": "scannet", "s3dis": "mean"}
    assert report.dropped == ["structured3d"]
    assert report.sources[PROMPT_TABLE] == BY_NAME
    assert report.sources[f"{STEM}.norms.scannet.running_mean"] == BY_NAME
    assert report.sources[f"{STEM}.norms.s3dis.running_mean"] == FROM_MEAN
    # a language-head base has no classifiers: the decoupled head is all that starts fresh
    assert set(report.keys(FRESH)) == {k for k in own if k.startswith("head.classifiers.")}
    assert set(report.unused) == {k for k in base.state_dict() if k.startswith("head.")}
    assert report.loaded == len(own) - len(report.keys(FRESH))
    line = report.summary()
    for part in ("scannet<-scannet", "s3dis<-mean of structured3d+scannet",
                 "dropped base datasets: structured3d", "4 initialised fresh (head.classifiers.",
                 "unexpected ignored (1 of datasets not taken; head."):
        assert part in line, line


def test_unreadable_or_unfitting_checkpoints_are_errors_naming_the_file(tmp_path):
    target = model(["scannet"])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupt"):
        load_weights(target, bad)
    other = tmp_path / "other.pth"
    atomic_save({"state_dict": {"module.encoder.weight": torch.ones(3)}}, other)
    with pytest.raises(CheckpointError, match=f"checkpoint {other}: nothing in it fits this model"):
        load_weights(target, other)
    empty = tmp_path / "empty.pth"
    atomic_save({"epoch": 3}, empty)
    with pytest.raises(CheckpointError, match=f"checkpoint {empty} holds no model state dict"):
        load_weights(target, empty)


def test_pointcept_state_dict_with_ddp_prefix_loads(joint, tmp_path):
    base = joint[0]["decoupled"]
    path = tmp_path / "pointcept.pth"
    atomic_save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in base.state_dict().items()}}, path)
    target = model(JOINT, head="decoupled", seed=5)
    map_weights(target, path)
    torch.testing.assert_close(logits(target, "s3dis"), logits(base, "s3dis"))


# --- (e) import direction ------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_models_never_import_the_engine_and_engine_checkpoints_form_no_circle():
    files = sorted((REPO / "ppt" / "models").rglob("*.py"))
    assert len(files) > 5
    upward = {str(f.relative_to(REPO)): sorted(n for n in _imports(f) if n.startswith("ppt.engine"))
              for f in files}
    assert {f: n for f, n in upward.items() if n} == {}
    # ppt.engine.weights and peft_checkpoint build on ppt.engine.checkpoint, never the reverse
    below = _imports(REPO / "ppt" / "engine" / "checkpoint.py")
    assert not any(n.startswith(("ppt.engine.weights", "ppt.engine.peft_checkpoint")) for n in below)
    assert "ppt.engine.checkpoint" in _imports(REPO / "ppt" / "engine" / "weights.py")
