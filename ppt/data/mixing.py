"""Multi-dataset loader: one dataset per batch, fixed batch ratios, rank sharding, exact resume.

Seed and position contract:
- Turns: the integer ``ratios`` expand into a fixed, interleaved schedule (smooth weighted
  round-robin: 4:2:1 gives ``a b a c a b a``), repeated until the dataset whose turn it is has
  no full batch left: that ends the epoch. ``len(loader)`` = steps in the epoch.
- Order: dataset ``d`` is shuffled by ``default_rng([seed, epoch, crc32(d)])``; rank ``r`` of
  ``world_size`` takes every ``world_size``-th entry from ``r`` (same count on every rank).
- Samples: sample ``i`` of ``d`` is transformed with ``default_rng([seed, epoch, crc32(d), i])``
  and Mix3D of step ``k`` uses ``default_rng([seed, epoch, crc32(d), k, 1 << 31])``, so
  batches are identical for any ``num_workers``.
- Position: ``state_dict()`` = ``{"epoch", "position"}`` (+ configuration checked on load):
  ``position`` counts the batches of ``epoch`` already handed out. Iterating resumes there;
  after the last batch of an epoch the loader moves to ``epoch + 1``, position 0.
"""
from __future__ import annotations

import zlib

import numpy as np
from torch.utils.data import DataLoader, Dataset

from ppt.data.collate import collate, mix3d


def ratio_schedule(ratios: dict[str, int]) -> list[str]:
    """Interleaved turns for integer batch ratios (length = sum of ratios)."""
    bad = {k: v for k, v in ratios.items() if not isinstance(v, (int, np.integer)) or v < 1}
    if bad:
        raise ValueError(f"ratios must be positive integers, got {bad}")
    total, credit, turns = sum(ratios.values()), dict.fromkeys(ratios, 0), []
    for _ in range(total):
        for k in ratios:
            credit[k] += ratios[k]
        best = max(ratios, key=lambda k: credit[k])
        credit[best] -= total
        turns.append(best)
    return turns


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def _identity(batch):
    return batch


class _Steps(Dataset):
    """Loads and collates the planned batches (picklable: runs in DataLoader workers)."""

    def __init__(self, datasets, plan, first_step: int, seed: int, epoch: int, mix3d_prob: float):
        self.datasets, self.plan, self.first_step = datasets, plan, first_step
        self.seed, self.epoch, self.mix3d_prob = seed, epoch, mix3d_prob

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        name, ids = self.plan[k]
        key, ds = _key(name), self.datasets[name]
        samples = [ds.get(int(i), rng=np.random.default_rng([self.seed, self.epoch, key, int(i)]))
                   for i in ids]
        if self.mix3d_prob > 0:
            rng = np.random.default_rng([self.seed, self.epoch, key, self.first_step + k, 1 << 31])
            samples = mix3d(samples, self.mix3d_prob, rng)
        return collate(samples)


class MultiDatasetLoader:
    """Batches from several datasets taking turns by integer ratios (contract: module docstring).

    Args:
        datasets: name -> dataset with ``__len__`` and ``get(index, rng)`` (``SceneDataset``).
        ratios: name -> batches per schedule cycle; keys must equal the keys of ``datasets``.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: base seed of shuffling, augmentation and Mix3D.
        rank, world_size: this process's shard of every dataset.
        mix3d_prob: probability of merging each consecutive pair of samples in a batch.
        drop_last: drop a dataset's last incomplete batch (else it is served smaller).
    """

    def __init__(self, datasets: dict, ratios: dict[str, int], batch_size: int, num_workers: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, mix3d_prob: float = 0.8,
                 drop_last: bool = True):
        if set(datasets) != set(ratios):
            raise ValueError(f"ratios {sorted(ratios)} must name exactly the datasets "
                             f"{sorted(datasets)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.datasets, self.ratios, self.schedule = datasets, dict(ratios), ratio_schedule(ratios)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size = rank, world_size
        self.mix3d_prob, self.drop_last = mix3d_prob, drop_last
        for name, ds in datasets.items():
            if len(ds) < world_size * (batch_size if drop_last else 1):
                raise ValueError(f"dataset {name!r} has {len(ds)} samples: too few for {world_size} "
                                 f"rank(s) x batch size {batch_size}")
        self.epoch, self.position = 0, 0

    def plan(self, epoch: int) -> list[tuple[str, np.ndarray]]:
        """The epoch's batches on this rank: ``[(dataset name, sample indices), ...]``."""
        batches = {}
        for name, ds in self.datasets.items():
            per_rank = len(ds) // self.world_size
            order = np.random.default_rng([self.seed, epoch, _key(name)]).permutation(len(ds))
            shard = order[self.rank::self.world_size][:per_rank]
            stop = per_rank - per_rank % self.batch_size if self.drop_last else per_rank
            batches[name] = [shard[s:s + self.batch_size] for s in range(0, stop, self.batch_size)]
        plan, used = [], dict.fromkeys(self.datasets, 0)
        while True:
            for name in self.schedule:
                if used[name] == len(batches[name]):
                    return plan
                plan.append((name, batches[name][used[name]]))
                used[name] += 1

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op when already in it, so a resumed
        position survives the usual ``set_epoch`` call at the top of the epoch loop)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "ratios": dict(self.ratios), "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "ratios", "batch_size", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}: the saved position would not match")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        epoch, start = self.epoch, self.position
        steps = _Steps(self.datasets, self.plan(epoch)[start:], start, self.seed, epoch, self.mix3d_prob)
        if self.num_workers > 0:
            batches = DataLoader(steps, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                 collate_fn=_identity)
        else:
            batches = (steps[k] for k in range(len(steps)))
        for batch in batches:
            self.position += 1
            yield batch
        self.epoch, self.position = epoch + 1, 0


class _SeededSamples(Dataset):
    def __init__(self, dataset, seed: int, indices):
        self.dataset, self.seed, self.indices = dataset, seed, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        return self.dataset.get(i, rng=np.random.default_rng([self.seed, i]))


def build_val_loader(dataset, num_workers: int = 0, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> DataLoader:
    """Batches of ONE sample (keeping ``inverse``/``origin_segment``) in scene order; rank
    ``r`` gets scenes ``r, r + world_size, ...``; sample ``i`` is seeded ``[seed, i]``."""
    return DataLoader(_SeededSamples(dataset, seed, range(rank, len(dataset), world_size)),
                      batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=collate)
