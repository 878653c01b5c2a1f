"""Multi-dataset loader: one dataset per batch, fixed batch ratios, rank sharding, exact resume.

Epoch rule (as the reference's ``MultiDatasetDataloader``): the FIRST dataset of the mix (the
order of ``data.mix`` / ``--datasets``) is the main dataset and defines the epoch; every other
dataset is re-iterated, reshuffled, whenever it runs out. With ``B`` main-dataset batches and
ratio ``r0`` the epoch is ``B // r0`` full cycles of the schedule plus the ``B % r0`` remaining
main batches: ``len = B // r0 * sum(ratios) + B % r0`` steps, the reference's length.

Seed and position contract:
- Turns: the integer ``ratios`` expand into a fixed, interleaved schedule (smooth weighted
  round-robin: 4:2:1 gives ``a b a c a b a``). The reference serves a cycle in blocks
  (``a a a a b b c``); the interleaved order changes nothing but which optimiser step sees which
  dataset inside a cycle, and keeps consecutive steps from coming from one dataset.
- Order: pass ``p`` over dataset ``d`` in ``epoch`` is the permutation
  ``default_rng([seed, epoch, crc32(d), p])``; the main dataset makes one pass per epoch, the
  others as many as the epoch needs (a pass is never cut short to make room for the next, and a
  new epoch starts every dataset at pass 0). Rank ``r`` of ``world_size`` takes every
  ``world_size``-th entry of a permutation from ``r`` (same count on every rank).
- Samples: sample ``i`` of pass ``p`` is transformed with ``default_rng([seed, epoch,
  crc32(d), p, i])`` and Mix3D of step ``k`` uses ``default_rng([seed, epoch, crc32(d), k,
  1 << 31])``, so batches are identical for any ``num_workers``.
- Position: ``state_dict()`` = ``{"epoch", "position"}`` (+ configuration checked on load):
  ``position`` counts the batches of ``epoch`` already handed out. Iterating resumes there;
  after the last batch of an epoch the loader moves to ``epoch + 1``, position 0.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
from torch.utils.data import DataLoader, Dataset

from ppt.data.collate import collate, mix3d

# Written into the loader state: a checkpoint of a loader with another epoch rule holds a
# position that means something else.
EPOCH_RULE = "first-dataset"


class PlannedBatch(NamedTuple):
    """One step of an epoch's plan: which dataset, which pass over it, which samples."""

    dataset: str
    indices: np.ndarray
    pass_index: int = 0


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

    def __init__(self, datasets, plan: list[PlannedBatch], first_step: int, seed: int, epoch: int,
                 mix3d_prob: float):
        self.datasets, self.plan, self.first_step = datasets, plan, first_step
        self.seed, self.epoch, self.mix3d_prob = seed, epoch, mix3d_prob

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        name, ids, p = self.plan[k]
        key, ds = _key(name), self.datasets[name]
        samples = [ds.get(int(i), rng=np.random.default_rng([self.seed, self.epoch, key, p, int(i)]))
                   for i in ids]
        if self.mix3d_prob > 0:
            rng = np.random.default_rng([self.seed, self.epoch, key, self.first_step + k, 1 << 31])
            samples = mix3d(samples, self.mix3d_prob, rng)
        return collate(samples)


class MultiDatasetLoader:
    """Batches from several datasets taking turns by integer ratios (contract: module docstring).

    Args:
        datasets: name -> dataset with ``__len__`` and ``get(index, rng)`` (``SceneDataset``).
        ratios: name -> batches per schedule cycle; keys must equal the keys of ``datasets``. The
            first key is the main dataset, whose one pass defines the epoch.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: base seed of shuffling, augmentation and Mix3D.
        rank, world_size: this process's shard of every dataset.
        mix3d_prob: probability of merging each consecutive pair of samples in a batch.
        drop_last: drop a dataset's last incomplete batch of each pass (else it is served smaller).
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
        self.main = next(iter(ratios))
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size = rank, world_size
        self.mix3d_prob, self.drop_last = mix3d_prob, drop_last
        for name, ds in datasets.items():
            if len(ds) < world_size * (batch_size if drop_last else 1):
                raise ValueError(f"dataset {name!r} has {len(ds)} samples: too few for {world_size} "
                                 f"rank(s) x batch size {batch_size}")
        self.epoch, self.position = 0, 0

    def batches_per_pass(self, name: str) -> int:
        """Batches one pass over dataset ``name`` gives this rank."""
        per_rank = len(self.datasets[name]) // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _pass(self, name: str, epoch: int, pass_index: int) -> list[np.ndarray]:
        """Sample indices of each batch of pass ``pass_index`` over ``name`` (this rank)."""
        ds = self.datasets[name]
        per_rank = len(ds) // self.world_size
        order = np.random.default_rng([self.seed, epoch, _key(name), pass_index]).permutation(len(ds))
        shard = order[self.rank::self.world_size][:per_rank]
        stop = self.batches_per_pass(name) * self.batch_size
        return [shard[s:s + self.batch_size] for s in range(0, min(stop, per_rank), self.batch_size)]

    def plan(self, epoch: int) -> list[PlannedBatch]:
        """The epoch's batches on this rank, in order."""
        main_batches = self._pass(self.main, epoch, 0)
        cycles, rest = divmod(len(main_batches), self.ratios[self.main])
        current = {self.main: main_batches}
        passes, used = dict.fromkeys(self.ratios, 0), dict.fromkeys(self.ratios, 0)
        plan = []
        for name in self.schedule * cycles + [self.main] * rest:
            if name not in current:
                current[name] = self._pass(name, epoch, 0)
            elif used[name] == len(current[name]):  # ran out: a new pass, reshuffled
                passes[name] += 1
                used[name] = 0
                current[name] = self._pass(name, epoch, passes[name])
            plan.append(PlannedBatch(name, current[name][used[name]], passes[name]))
            used[name] += 1
        return plan

    def __len__(self) -> int:
        cycles, rest = divmod(self.batches_per_pass(self.main), self.ratios[self.main])
        return cycles * len(self.schedule) + rest

    def epoch_summary(self) -> dict[str, dict]:
        """Per dataset: samples, batches per pass and per epoch (this rank), passes per epoch."""
        cycles, rest = divmod(self.batches_per_pass(self.main), self.ratios[self.main])
        out = {}
        for name, ratio in self.ratios.items():
            per_pass = self.batches_per_pass(name)
            per_epoch = cycles * ratio + (rest if name == self.main else 0)
            out[name] = {"samples": len(self.datasets[name]), "ratio": ratio,
                         "batches_per_pass": per_pass, "batches_per_epoch": per_epoch,
                         "passes_per_epoch": per_epoch / max(per_pass, 1)}
        return out

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op when already in it, so a resumed
        position survives the usual ``set_epoch`` call at the top of the epoch loop)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "ratios": dict(self.ratios), "main": self.main, "batch_size": self.batch_size,
                "world_size": self.world_size, "epoch_rule": EPOCH_RULE,
                "sizes": {k: len(v) for k, v in self.datasets.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch_rule") != EPOCH_RULE:
            raise ValueError("loader state comes from a version whose epoch ended at the smallest "
                             "dataset: its position cannot be mapped onto this loader (start a new "
                             "run from those weights with --weights)")
        mine = self.state_dict()
        for key in ("seed", "ratios", "main", "batch_size", "world_size", "sizes"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{mine[key]!r}: the saved position would not match")
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
