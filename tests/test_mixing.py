"""Multi-dataset loader: ratios, single-dataset batches, resume, workers, sharding; collate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ppt.data.collate import collate, mix3d
from ppt.data.datasets import build_dataset
from ppt.data.mixing import MultiDatasetLoader, build_val_loader, ratio_schedule
from ppt.data.transforms import build_transforms


class Toy:
    """In-memory dataset: sample ``i`` has 3 + i % 4 points drawn from the given rng."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self):
        return self.size

    def get(self, i, rng=None):
        n = 3 + i % 4
        return {"coord": rng.random((n, 3)).astype(np.float32), "grid_coord": np.zeros((n, 3), np.int32),
                "feat": np.zeros((n, 6), np.float32), "segment": np.full(n, i, np.int64),
                "dataset": self.name, "name": f"{self.name}-{i}"}


RATIOS = {"structured3d": 4, "scannet": 2, "s3dis": 1}


def toy_loader(sizes=(40, 30, 10), **kw):
    datasets = {name: Toy(name, n) for name, n in zip(RATIOS, sizes)}
    return MultiDatasetLoader(datasets, RATIOS, **{"batch_size": 2, "mix3d_prob": 0.0, **kw})


def test_ratio_schedule_interleaves():
    assert ratio_schedule(RATIOS) == ["structured3d", "scannet", "structured3d", "s3dis",
                                      "structured3d", "scannet", "structured3d"]
    with pytest.raises(ValueError, match="positive integers"):
        ratio_schedule({"a": 0})


def test_first_dataset_defines_the_epoch_and_the_others_cycle():
    # 40 / 10 / 4 samples, batch 2: the main dataset has 20 batches (5 cycles of 7 steps) while
    # scannet (5 batches a pass) and s3dis (2 a pass) run out first. A loader that ends the epoch
    # at the first exhausted dataset stops after 17 steps.
    loader = toy_loader(sizes=(40, 10, 4))
    plan = loader.plan(0)
    batches = list(loader)
    assert len(batches) == len(plan) == len(loader) == 35
    names = [b["dataset"] for b in batches]
    assert names[:7] == ratio_schedule(RATIOS)
    assert [names.count(k) for k in RATIOS] == [20, 10, 5]
    for b in batches:
        assert all(n.startswith(b["dataset"] + "-") for n in b["name"])
        assert b["offset"][-1] == len(b["coord"]) and len(b["offset"]) == 2
    samples = {k: [n for b in batches if b["dataset"] == k for n in b["name"]] for k in RATIOS}
    assert len(set(samples["structured3d"])) == 40          # one pass of the main dataset
    # scannet: two full passes, each covering every sample once, in two different orders.
    first, second = samples["scannet"][:10], samples["scannet"][10:]
    assert sorted(first) == sorted(second) == sorted(f"scannet-{i}" for i in range(10))
    assert first != second
    assert [p.pass_index for p in plan if p.dataset == "scannet"] == [0] * 5 + [1] * 5
    # s3dis: passes of 2 batches (4 samples) -> passes 0, 0, 1, 1, 2.
    assert [p.pass_index for p in plan if p.dataset == "s3dis"] == [0, 0, 1, 1, 2]
    assert sorted(samples["s3dis"][:4]) == sorted(samples["s3dis"][4:8])
    assert loader.epoch == 1 and loader.position == 0
    assert [n for b in loader for n in b["name"]] != [n for b in batches for n in b["name"]]


def test_epoch_length_matches_reference_formula():
    # len = B // r0 * sum(ratios) + B % r0 with B main batches (reference MultiDatasetDataloader).
    for main_samples in (40, 42, 46, 8):
        loader = toy_loader(sizes=(main_samples, 10, 4))
        b = main_samples // 2
        assert len(loader) == len(loader.plan(3)) == b // 4 * 7 + b % 4
        tail = [p.dataset for p in loader.plan(3)][b // 4 * 7:]
        assert tail == ["structured3d"] * (b % 4)   # the remainder is main batches only
    # The main dataset is the FIRST of the mix, not the largest.
    datasets = {"s3dis": Toy("s3dis", 4), "structured3d": Toy("structured3d", 40)}
    loader = MultiDatasetLoader(datasets, {"s3dis": 1, "structured3d": 4}, batch_size=2, mix3d_prob=0.0)
    assert loader.main == "s3dis" and len(loader) == 2 * 5
    summary = loader.epoch_summary()
    assert summary["structured3d"]["batches_per_epoch"] == 8
    assert summary["structured3d"]["passes_per_epoch"] == pytest.approx(0.4)


def test_repeated_samples_get_new_augmentation():
    # s3dis sample i appears in passes 0 and 1 of one epoch: its random draw must differ.
    batches = list(toy_loader(sizes=(40, 10, 4)))
    coords = {}
    for b in batches:
        if b["dataset"] == "s3dis":
            for name, lo, hi in zip(b["name"], [0, *b["offset"][:-1].tolist()], b["offset"].tolist()):
                coords.setdefault(name, []).append(b["coord"][lo:hi])
    assert all(len(v) >= 2 for v in coords.values())
    assert all(not torch.equal(v[0], v[1]) for v in coords.values())


def test_resume_yields_remaining_batches():
    loader = toy_loader(sizes=(40, 10, 4), seed=5)
    loader.set_epoch(2)
    full = list(loader)
    loader = toy_loader(sizes=(40, 10, 4), seed=5)
    loader.set_epoch(2)
    it = iter(loader)
    for _ in range(19):   # inside scannet's and s3dis's second pass
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["position"] == 19
    resumed = toy_loader(sizes=(40, 10, 4), seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                 # the usual call at the top of the epoch loop keeps the position
    rest = list(resumed)
    assert len(rest) == len(full) - 19
    for a, b in zip(rest, full[19:]):
        assert a["name"] == b["name"] and torch.equal(a["coord"], b["coord"])
    with pytest.raises(ValueError, match="batch_size"):
        toy_loader(sizes=(40, 10, 4), seed=5, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="sizes"):   # scenes added since: the plan moved
        toy_loader(sizes=(40, 12, 4), seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="smallest"):  # a checkpoint of the old epoch rule
        toy_loader(sizes=(40, 10, 4), seed=5).load_state_dict({k: v for k, v in state.items()
                                                               if k != "epoch_rule"})


def test_resume_repeats_the_mix3d_merges_of_an_uninterrupted_run():
    # Mix3D draws per step of the epoch: a resumed loader that seeded its merges by the batches
    # it has served since the restart (or from an RNG the checkpoint does not hold) merges other
    # pairs than the run that was never stopped.
    def loader():
        return toy_loader(sizes=(40, 10, 4), seed=5, batch_size=4, mix3d_prob=0.5)

    full = loader()
    full.set_epoch(1)
    full = list(full)
    killed = loader()
    killed.set_epoch(1)
    it = iter(killed)
    for _ in range(9):
        next(it)
    state = killed.state_dict()
    np.random.seed(123)                  # a new process: other global RNG state
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == len(full) - 9 == 7
    assert [b["name"] for b in rest] == [b["name"] for b in full[9:]]
    for a, b in zip(rest, full[9:]):
        assert torch.equal(a["coord"], b["coord"]) and torch.equal(a["offset"], b["offset"])
    merged = [sum("+" in n for n in b["name"]) for b in rest]   # merged pairs per batch (of 2)
    assert 0 < sum(merged) < 2 * len(rest) and len(set(merged)) > 1  # the draws matter here


def test_rank_shards_are_disjoint_and_equal():
    shards = [toy_loader(rank=r, world_size=2).plan(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    for name in RATIOS:
        ids = [set(np.concatenate([p.indices for p in s if p.dataset == name and p.pass_index == 0]).tolist())
               for s in shards]
        assert ids[0] and not ids[0] & ids[1]
    with pytest.raises(ValueError, match="rank"):
        toy_loader(rank=2, world_size=2)


def test_mix3d_and_collate():
    rng = np.random.default_rng(0)
    samples = [Toy("scannet", 10).get(i, rng) for i in range(5)]
    mixed = mix3d(samples, 1.0, rng)
    assert [s["name"] for s in mixed] == ["scannet-0+scannet-1", "scannet-2+scannet-3", "scannet-4"]
    batch = collate(mixed)
    sizes = [3 + 4, 5 + 6, 3]
    assert batch["offset"].tolist() == np.cumsum(sizes).tolist()
    assert batch["coord"].dtype == torch.float32 and batch["grid_coord"].dtype == torch.int32
    assert mix3d(samples, 0.0, rng) == samples
    with pytest.raises(ValueError, match="one dataset"):
        collate([samples[0], Toy("s3dis", 2).get(0, rng)])


def real_loader(root, workers):
    datasets = {name: build_dataset(name, root, "train", build_transforms(name, "train", voxel_size=0.1))
                for name in ("scannet", "s3dis")}
    return MultiDatasetLoader(datasets, {"scannet": 2, "s3dis": 1}, batch_size=2,
                              num_workers=workers, seed=1, mix3d_prob=0.5)


def test_identical_for_any_worker_count(synthetic_root):
    a, b = list(real_loader(synthetic_root, 0)), list(real_loader(synthetic_root, 2))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["name"] == y["name"] and x["dataset"] == y["dataset"]
        for k in ("coord", "grid_coord", "feat", "segment", "offset"):
            assert torch.equal(x[k], y[k])
    assert a[0]["feat"].shape[1] == 6


def test_val_loader_keeps_inverse(synthetic_root):
    ds = build_dataset("s3dis", synthetic_root, "val", build_transforms("s3dis", "val", voxel_size=0.1))
    batch = next(iter(build_val_loader(ds)))
    assert len(batch["offset"]) == 1 and batch["name"] == ["Area_5-room_004"]
    assert len(batch["inverse"]) == len(batch["origin_segment"]) > len(batch["coord"])
    assert int(batch["inverse"].max()) == len(batch["coord"]) - 1
