"""What a mapping of base weights onto a model did, tensor by tensor (``ppt.engine.weights``).

:class:`WeightsReport` is returned by ``map_state`` / ``map_weights`` and printed as one line of
the training log; the source tags (``BY_KEY`` ...) are what ``WeightsReport.sources`` holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from ppt.engine.checkpoint import summarize_keys
from ppt.models.heads import TEXT_PREFIX
from ppt.models.prompts import MEAN_PROMPT

MAX_LISTED = 3

# how a model tensor was set (WeightsReport.sources)
BY_KEY, BY_NAME, FROM_MEAN, FOLDED, BY_CLASS, OWN, FRESH = (
    "key", "name", "mean", "folded", "class", "own", "fresh")
_LOADED = {BY_KEY: "by key", BY_NAME: "by dataset name", FROM_MEAN: "from the base datasets' mean",
           FOLDED: "folded (norm + prompt)", BY_CLASS: "by class name"}


@dataclass
class WeightsReport:
    """What ``ppt.engine.weights.map_state`` did to every tensor of the model.

    Attributes:
        path: the checkpoint file ("" when mapped from memory).
        sources: model state key -> how it was set: "key", "name", "mean", "folded" (a shared
            BN given a base domain's statistics with its prompt folded in), "class" (classifier
            rows by class name), "own" (class embeddings of the model's class names), "fresh".
        datasets: model dataset -> the base dataset its state came from, or "mean".
        base_datasets: the base's datasets in prompt-table order.
        trained: those the base trained on (its ``data.mix``); the others (validated only) have
            untrained prompts and statistics and are never a source.
        shared_domain: base domain whose statistics the model's shared BNs took (None: none).
        mismatched: model key -> "(base shape)->(model shape)" of tensors kept initialised.
        unused: base tensors nothing was made from.
    """

    path: str
    sources: dict[str, str]
    datasets: dict[str, str]
    base_datasets: list[str]
    trained: list[str]
    shared_domain: str | None
    mismatched: dict[str, str]
    unused: list[str]

    def keys(self, source: str) -> list[str]:
        return [k for k, s in self.sources.items() if s == source]

    @property
    def loaded(self) -> int:
        return sum(s in _LOADED for s in self.sources.values())

    @property
    def dropped(self) -> list[str]:
        """Base datasets the model does not have."""
        return [d for d in self.base_datasets if d not in self.datasets]

    def summary(self) -> str:
        """One line for the training log."""
        counts = ", ".join(f"{len(self.keys(s))} {what}" for s, what in _LOADED.items() if self.keys(s))
        parts = [f"loaded {self.loaded}/{len(self.sources)} tensors from {self.path} ({counts})"]
        if self.base_datasets:
            mean = "mean of " + "+".join(self.trained)
            parts.append("datasets by name: " + ", ".join(
                f"{d}<-{mean if s == MEAN_PROMPT else s}" for d, s in self.datasets.items()))
        else:
            parts.append("the base names no datasets: nothing mapped by dataset name")
        if self.keys(FOLDED):
            domain = self.shared_domain if self.shared_domain != MEAN_PROMPT else "the mean domain's"
            parts.append(f"prompt-free norms <- {domain} statistics with its prompt folded into the affine")
        if self.keys(OWN):
            parts.append(f"class embeddings of {len(self.keys(OWN))} dataset(s) from the model's class names")
        untrained = [d for d in self.base_datasets if d not in self.trained]
        if untrained:
            parts.append(f"untrained in the base (validated only), not used: {', '.join(untrained)}")
        if self.dropped:
            parts.append(f"dropped base datasets: {', '.join(self.dropped)}")
        if self.mismatched:
            shapes = [f"{k} {shape}" for k, shape in self.mismatched.items()]
            parts.append(f"{len(shapes)} shape mismatches kept initialised ({summarize_keys(shapes, MAX_LISTED)})")
        fresh = [k for k in self.keys(FRESH) if k not in self.mismatched]
        if fresh:
            parts.append(f"{len(fresh)} initialised fresh ({summarize_keys(fresh, MAX_LISTED)})")
        if self.unused:  # tensors of the datasets not taken are counted, the others named
            skipped = {*self.dropped, *untrained}
            counted = [k for k in self.unused if (dataset_of(k) or ("", ""))[1] in skipped]
            others = [k for k in self.unused if k not in set(counted)]
            what = [f"{len(counted)} of datasets not taken"] if counted else []
            what += [summarize_keys(others, MAX_LISTED)] if others else []
            parts.append(f"{len(self.unused)} unexpected ignored ({'; '.join(what)})")
        return "; ".join(parts)


def dataset_of(key: str) -> tuple[str, str] | None:
    """(kind, dataset) of a per-dataset key: PDNorm norms, decoupled classifiers, text embeddings."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-3] == "norms":
        return "norms", parts[-2]
    if key.startswith("head.classifiers.") and len(parts) == 4:
        return "classifiers", parts[2]
    if key.startswith("head." + TEXT_PREFIX) and len(parts) == 2:
        return "text", parts[1][len(TEXT_PREFIX):]
    return None
