"""Start a model from a checkpoint's weights, mapped by key AND by dataset name.

One implementation for every start from weights: ``tools/train.py --weights`` (fine-tuning,
:func:`load_weights`) and the base of a ``--peft`` run (``ppt.engine.peft_checkpoint``). Reads a
PPT checkpoint (``model``), a Pointcept one (``state_dict``) or a bare state dict (``module.``
stripped). How the base lands on the model (a Segmentor):

- Per-dataset state by dataset NAME, never by position: prompt-table rows, PDNorm's per-dataset
  BN (affine and running statistics), the decoupled head's classifier. A dataset the base never
  saw starts from the base's ``"mean"`` domain: mean prompt, mean affine, mixture statistics (as
  PDNorm's ``"mean"`` in eval mode). Base datasets the model lacks are dropped.
- A classifier without a counterpart in the base (union head; a decoupled head's new dataset)
  takes its rows by class NAME from the base's union or decoupled classifiers (the first base
  dataset with the name); unmatched rows keep their initialisation.
- The language head's class embeddings are the model's own (its class names), never the base's.
- Shared norms (``prompt: none``, or ``decoupled_bn: false``) take the statistics of the model's
  dataset when it has one the base knows, else of the ``"mean"`` domain. A norm without a prompt
  also absorbs the base's modulation for that domain: PDNorm computes
  ``y = BN_d(x) * (1 + scale) + shift``, ``(shift, scale) = Linear(SiLU(prompt_d))``, so
  ``gamma' = gamma * (1 + scale)``, ``beta' = beta * (1 + scale) + shift`` give the plain BN the
  same ``y`` (eval mode: identical; train mode: the same function of the batch statistics).
  PDLayerNorm / LayerNorm the same way, affine only.
- Everything else by key when the shape fits; the rest keeps its initialisation.

Deviation from the reference: Pointcept's ``CheckpointLoader`` copies by key (strict=False), so a
model over other datasets silently keeps random prompts and untrained statistics; "PPT, then
fine-tuned" starts from the dataset's own prompt and statistics (SPEC §6), hence the names.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ppt.data.classes import DATASETS, union_label_space
from ppt.data.dataset_file import DatasetFileError, DatasetSpec
from ppt.engine.checkpoint import CheckpointError, load_checkpoint, strip_ddp_prefix, summarize_keys
from ppt.engine.weights_report import (
    BY_CLASS, BY_KEY, BY_NAME, FOLDED, FRESH, FROM_MEAN, MAX_LISTED, OWN, WeightsReport, dataset_of,
)
from ppt.models.heads import TEXT_PREFIX, DecoupledHead, UnionHead
from ppt.models.prompts import MEAN_PROMPT, PDLayerNorm, PDNorm

PROMPT_TABLE = "prompts.table.weight"
PROMPT_NORMS = (PDNorm, PDLayerNorm)  # per-dataset norms (``norms.<dataset>``) or one (``norm``)
PLAIN_NORMS = (nn.BatchNorm1d, nn.LayerNorm)  # spunet's BatchNorm is a BatchNorm1d
TRACKED = "num_batches_tracked"  # taken when present, never required
MODULATION = "modulation.1"  # PDNorm.modulation = Sequential(SiLU, Linear)


def read_base(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, the checkpoint's resolved config or {}) of a checkpoint file.

    Raises:
        CheckpointError: missing or unreadable file, or no tensors in it (names the file).
    """
    ckpt = load_checkpoint(path)
    state = ckpt
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            state = ckpt[key]
            break
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no model state dict "
                              f"(expected a 'model' or 'state_dict' entry of tensors)")
    tensors = strip_ddp_prefix(tensors)
    config = ckpt.get("config")
    return tensors, config if isinstance(config, dict) else {}


def base_class_names(config: dict, domains: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Base dataset -> class names in label order: the built-in lists, and a user's datasets as
    the base's config describes them (its ``datasets`` section, saved with every run)."""
    described = (config or {}).get("datasets") or {}
    classes: dict[str, tuple[str, ...]] = {}
    for d in domains:
        if d in DATASETS:
            classes[d] = DATASETS[d].class_names
        elif isinstance(described.get(d), dict):
            try:
                classes[d] = tuple(DatasetSpec(**described[d]).check(f"datasets.{d}").classes)
            except (TypeError, DatasetFileError):
                continue  # an unreadable description: its classifier rows cannot be named
    return classes


def base_datasets(state: dict[str, torch.Tensor], config: dict | None = None) -> list[str]:
    """A base model's datasets in prompt-table order: from its per-dataset keys (the Segmentor
    registers PDNorm's norms, the decoupled classifiers and the text embeddings in that order),
    else from its config (``ppt.engine.build.model_datasets``: the mix, then extra val datasets)."""
    for kind in ("norms", "classifiers", "text"):
        names: list[str] = []
        for key in state:
            found = dataset_of(key)
            if found and found[0] == kind and found[1] not in names:
                names.append(found[1])
        if names:
            return names
    data = (config or {}).get("data", {})
    mix = list(data.get("mix", {}))
    return mix + [d for d in data.get("val", []) if d not in mix]


class _Mapper:
    """One mapping of ``base`` onto ``model``: fills ``out`` and ``sources`` (see map_state)."""

    def __init__(self, base: dict[str, torch.Tensor], model: nn.Module, domains: list[str],
                 trained: list[str], classes: dict[str, Sequence[str]]):
        self.base, self.model, self.domains, self.classes = base, model, domains, classes
        self.trained = trained  # the sources by name and of the mean (a subset of domains)
        self.own = model.state_dict()
        self.out: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}
        self.used: set[str] = set()
        self.mismatched: dict[str, str] = {}

    def take(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.base[key]

    def put(self, key: str, value: torch.Tensor, source: str) -> None:
        """Set model tensor ``key``; a shape that does not fit keeps the initialisation (listed)."""
        target = self.own[key]
        if tuple(value.shape) != tuple(target.shape):
            self.mismatched[key] = f"{tuple(value.shape)}->{tuple(target.shape)}"
            self.sources[key] = FRESH
            return
        self.out[key] = value.detach().to(target.dtype)
        self.sources[key] = source

    # --- prompts -----------------------------------------------------------------------------
    def base_prompt(self, domain: str) -> torch.Tensor | None:
        """(prompt_dim,) base prompt of a base dataset or "mean"; None when rows cannot be named."""
        table = self.base.get(PROMPT_TABLE)
        if table is None or len(table) != len(self.domains):
            return None
        self.used.add(PROMPT_TABLE)
        if domain == MEAN_PROMPT:
            return table[[self.domains.index(d) for d in self.trained]].mean(0)
        return table[self.domains.index(domain)]

    def prompts(self) -> None:
        if PROMPT_TABLE not in self.own or PROMPT_TABLE not in self.base:
            return
        rows = [self.base_prompt(d if d in self.trained else MEAN_PROMPT) for d in self.model.domains]
        if any(r is None for r in rows):  # the base's rows have no names: fresh prompts
            self.mismatched[PROMPT_TABLE] = f"({len(self.base[PROMPT_TABLE])} unnamed rows)"
            self.sources[PROMPT_TABLE] = FRESH
            return
        known = any(d in self.trained for d in self.model.domains)
        self.put(PROMPT_TABLE, torch.stack(rows), BY_NAME if known else FROM_MEAN)

    # --- norms -------------------------------------------------------------------------------
    def _has(self, prefix: str, params: Sequence[str]) -> bool:
        return all(prefix + p in self.base for p in params)

    def _norm(self, prefix: str, params: Sequence[str]) -> dict[str, torch.Tensor]:
        norm = {p: self.take(prefix + p) for p in params}
        if prefix + TRACKED in self.base:
            norm[TRACKED] = self.take(prefix + TRACKED)
        return norm

    def base_norm(self, layer: str, domain: str,
                  params: Sequence[str]) -> tuple[dict[str, torch.Tensor], str] | None:
        """(norm state, source) the base applies at norm ``layer`` for a base dataset or "mean";
        ``params``: the state the model's norm needs (BN: affine + running statistics, LN: affine)."""
        per = [d for d in self.trained if self._has(f"{layer}.norms.{d}.", params)]
        if per and domain in per:
            return self._norm(f"{layer}.norms.{domain}.", params), BY_NAME
        if per:  # the "mean" domain of PDNorm / PDLayerNorm: mean affine, mixture statistics
            norms = [self._norm(f"{layer}.norms.{d}.", params) for d in per]

            def mean(p: str) -> torch.Tensor:
                return torch.stack([n[p].double() for n in norms]).mean(0)

            mixed = {p: mean(p) for p in params}
            if "running_var" in params:  # variance of the mixture (float64, cast on load)
                second = torch.stack([n["running_var"].double() + n["running_mean"].double() ** 2
                                      for n in norms]).mean(0)
                mixed["running_var"] = second - mixed["running_mean"] ** 2
            if all(TRACKED in n for n in norms):
                mixed[TRACKED] = torch.stack([n[TRACKED] for n in norms]).max()
            return mixed, FROM_MEAN
        for prefix in (f"{layer}.norm.", f"{layer}."):  # one shared prompt-driven norm / plain norm
            if self._has(prefix, params):
                return self._norm(prefix, params), BY_KEY
        return None

    def fold(self, layer: str, norm: dict[str, torch.Tensor], domain: str) -> dict[str, torch.Tensor] | None:
        """``norm`` with the base's prompt modulation of ``domain`` at ``layer`` folded into the
        affine; ``norm`` itself when the base does not modulate there; None when it does but the
        prompt cannot be named."""
        weight, bias = f"{layer}.{MODULATION}.weight", f"{layer}.{MODULATION}.bias"
        if weight not in self.base or "weight" not in norm:
            return norm
        prompt = self.base_prompt(domain)
        if prompt is None:
            return None
        out = F.linear(F.silu(prompt.double()), self.take(weight).double(), self.take(bias).double())
        shift, scale = out.chunk(2, dim=-1)  # PDNorm's order
        return {**norm, "weight": norm["weight"].double() * (1.0 + scale),
                "bias": norm["bias"].double() * (1.0 + scale) + shift}

    def set_norm(self, dest: str, layer: str, domain: str, plain: bool) -> None:
        """Set the model's norm state under ``dest`` (``plain``: no prompt there, fold it in)."""
        keys = [k for k in self.own if k.startswith(dest) and "." not in k[len(dest):]]
        for key in keys:
            self.sources[key] = FRESH  # unless set below: never copied by key from another domain
        params = [k[len(dest):] for k in keys if not k.endswith(TRACKED)]
        found = self.base_norm(layer, domain, params) if params else None
        if found is not None and plain:
            folded = self.fold(layer, found[0], domain)
            found = None if folded is None else (folded, FOLDED if folded is not found[0] else found[1])
        if found is not None:
            for param, value in found[0].items():
                if dest + param in self.own:
                    self.put(dest + param, value, found[1])

    def norms(self) -> str | None:
        """Map every norm layer; returns the base domain the shared norms took (None: none)."""
        model_domains = self.model.domains
        shared = (model_domains[0] if len(model_domains) == 1 and model_domains[0] in self.trained
                  else MEAN_PROMPT)
        used_shared, inside = False, []
        for layer, module in self.model.named_modules():
            if isinstance(module, PROMPT_NORMS):
                inside.append(layer + ".")
                if module.decoupled:
                    for d in module.domains:
                        self.set_norm(f"{layer}.norms.{d}.", layer, d if d in self.trained else MEAN_PROMPT,
                                      plain=False)
                else:
                    self.set_norm(f"{layer}.norm.", layer, shared, plain=False)
                    used_shared = True
            elif isinstance(module, PLAIN_NORMS) and not layer.startswith(tuple(inside)):
                self.set_norm(f"{layer}.", layer, shared, plain=True)
                used_shared = True
        return shared if used_shared else None

    # --- heads -------------------------------------------------------------------------------
    def base_class_rows(self) -> dict[str, tuple[str, int]]:
        """Class name -> (base classifier key, row): the base's union classifier, then its
        decoupled classifiers in dataset order (first holder of a name wins)."""
        rows: dict[str, tuple[str, int]] = {}
        key = "head.classifier.weight"
        if key in self.base and self.domains and all(d in self.classes for d in self.domains):
            union, _ = union_label_space({d: tuple(self.classes[d]) for d in self.domains})
            learnt = {n for d in self.trained for n in self.classes[d]}
            if len(union) == len(self.base[key]):
                rows.update({n: (key, i) for i, n in enumerate(union) if n in learnt})
        for d in self.trained:
            key = f"head.classifiers.{d}.weight"
            if key in self.base and d in self.classes and len(self.classes[d]) == len(self.base[key]):
                for i, n in enumerate(self.classes[d]):
                    rows.setdefault(n, (key, i))
        return rows

    def class_rows(self, prefix: str, names: Sequence[str], lookup: dict[str, tuple[str, int]]) -> None:
        weight, bias = self.own[prefix + "weight"].clone(), self.own[prefix + "bias"].clone()
        hits = 0
        for i, name in enumerate(names):
            if name in lookup:
                key, row = lookup[name]
                if self.base[key].shape[1:] == weight.shape[1:]:
                    weight[i] = self.take(key)[row]
                    bias[i] = self.take(key[:-len("weight")] + "bias")[row]
                    hits += 1
        source = BY_CLASS if hits else FRESH
        self.put(prefix + "weight", weight, source)
        self.put(prefix + "bias", bias, source)

    def heads(self) -> None:
        head = self.model.head
        for key in self.own:
            if key.startswith("head." + TEXT_PREFIX):
                self.sources[key] = OWN  # the model's class names decide its embeddings
                self.used.add(key)  # the base's of the same dataset is replaced, not ignored
        lookup = self.base_class_rows()
        if isinstance(head, DecoupledHead):
            for d, names in head.class_names.items():
                prefix = f"head.classifiers.{d}."
                if d in self.trained and prefix + "weight" in self.base and prefix + "bias" in self.base:
                    self.put(prefix + "weight", self.take(prefix + "weight"), BY_NAME)
                    self.put(prefix + "bias", self.take(prefix + "bias"), BY_NAME)
                elif lookup:
                    self.class_rows(prefix, names, lookup)
                else:  # nothing learnt for it in the base (not even by key from an untrained dataset)
                    self.sources[prefix + "weight"] = self.sources[prefix + "bias"] = FRESH
        elif isinstance(head, UnionHead) and lookup:  # without class names: by key, below
            self.class_rows("head.classifier.", head.union_names, lookup)

    def by_key(self) -> None:
        for key in self.own:
            if key in self.sources:
                continue
            if key in self.base:
                self.put(key, self.take(key), BY_KEY)
            else:
                self.sources[key] = FRESH


def map_state(base: dict[str, torch.Tensor], model: nn.Module, domains: Sequence[str] | None = None,
              trained: Sequence[str] | None = None, classes: dict[str, Sequence[str]] | None = None,
              path: str | os.PathLike = "") -> tuple[dict[str, torch.Tensor], WeightsReport]:
    """Map a base state dict onto ``model`` (a Segmentor) by key and by dataset name.

    Args:
        base: the base model's state dict.
        model: the target model (no PEFT stage applied yet).
        domains: the base's datasets in prompt-table order (default: :func:`base_datasets`).
        trained: the base datasets it trained on (default: all of ``domains``).
        classes: base dataset -> class names in label order (default: the built-in datasets').
        path: where ``base`` came from (for the report).

    Returns:
        (state dict for ``model.load_state_dict(..., strict=False)``, report).
    """
    domains = list(domains) if domains is not None else base_datasets(base)
    trained = [d for d in domains if trained is None or d in trained]
    if classes is None:
        classes = {d: DATASETS[d].class_names for d in domains if d in DATASETS}
    mapper = _Mapper(base, model, domains, trained, classes)
    mapper.prompts()
    shared = mapper.norms()
    mapper.heads()
    mapper.by_key()
    datasets = {d: d if d in trained else MEAN_PROMPT for d in model.domains}
    report = WeightsReport(str(path), mapper.sources, datasets, domains, trained, shared, mapper.mismatched,
                           [k for k in base if k not in mapper.used])
    return mapper.out, report


def map_weights(model: nn.Module, path: str | os.PathLike) -> WeightsReport:
    """Load a checkpoint file into ``model``, mapped by key and by dataset name.

    Raises:
        CheckpointError: unreadable file, or nothing in it fits the model (names the file).
    """
    base, config = read_base(path)
    domains = base_datasets(base, config)
    mix = list((config.get("data") or {}).get("mix") or {})  # the datasets it trained on
    trained = mix if mix and set(mix) & set(domains) else None
    state, report = map_state(base, model, domains, trained, base_class_names(config, domains), path=path)
    if not report.loaded:
        raise CheckpointError(f"checkpoint {path}: nothing in it fits this model by key or by dataset name "
                              f"({len(base)} tensors, e.g. {summarize_keys(base, MAX_LISTED)}; "
                              f"{len(report.mismatched)} shape mismatches)")
    model.load_state_dict(state, strict=False)
    return report


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Initialise ``model`` from a checkpoint for fine-tuning (see the module docstring);
    returns the one-line report the trainer logs."""
    return map_weights(model, path).summary()
