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


def toy_loader(**kw):
    datasets = {"structured3d": Toy("structured3d", 40), "scannet": Toy("scannet", 30), "s3dis": Toy("s3dis", 10)}
    return MultiDatasetLoader(datasets, RATIOS, **{"batch_size": 2, "mix3d_prob": 0.0, **kw})


def test_ratio_schedule_interleaves():
    assert ratio_schedule(RATIOS) == ["structured3d", "scannet", "structured3d", "s3dis",
                                      "structured3d", "scannet", "structured3d"]
    with pytest.raises(ValueError, match="positive integers"):
        ratio_schedule({"a": 0})


def test_epoch_respects_ratios_and_ends_at_first_exhaustion():
    loader = toy_loader()
    batches = list(loader)
    # structured3d has 20 batches = 5 cycles of 4; the 6th cycle's first turn finds it empty.
    assert len(batches) == len(toy_loader()) == 35
    names = [b["dataset"] for b in batches]
    assert names[:7] == ratio_schedule(RATIOS)
    assert [names.count(k) for k in RATIOS] == [20, 10, 5]
    for b in batches:
        assert all(n.startswith(b["dataset"] + "-") for n in b["name"])
        assert b["offset"][-1] == len(b["coord"]) and len(b["offset"]) == 2
    # No sample repeats within an epoch; each dataset is reshuffled next epoch.
    seen = [n for b in batches for n in b["name"]]
    assert len(seen) == len(set(seen))
    assert loader.epoch == 1 and loader.position == 0
    second = [n for b in loader for n in b["name"]]
    assert second != seen


def test_resume_yields_remaining_batches():
    loader = toy_loader(seed=5)
    loader.set_epoch(2)
    full = list(loader)
    loader = toy_loader(seed=5)
    loader.set_epoch(2)
    it = iter(loader)
    for _ in range(9):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["position"] == 9
    resumed = toy_loader(seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                 # the usual call at the top of the epoch loop keeps the position
    rest = list(resumed)
    assert len(rest) == len(full) - 9
    for a, b in zip(rest, full[9:]):
        assert a["name"] == b["name"] and torch.equal(a["coord"], b["coord"])
    with pytest.raises(ValueError, match="batch_size"):
        toy_loader(seed=5, batch_size=3).load_state_dict(state)


def test_rank_shards_are_disjoint_and_equal():
    shards = [toy_loader(rank=r, world_size=2).plan(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    for name in RATIOS:
        ids = [set(np.concatenate([i for d, i in s if d == name]).tolist()) for s in shards]
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
