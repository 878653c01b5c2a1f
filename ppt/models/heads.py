"""Category alignment heads (SPEC §5).

Every head maps (N, C) voxel features of a batch from dataset ``d`` to (N, K_d) logits whose
columns follow ``d``'s own label order, so predictions never leave the dataset's class set and
the loss is a plain cross-entropy over that set.

- :class:`DecoupledHead`: one Linear per dataset.
- :class:`UnionHead`: one Linear over the union of all class names; a dataset reads its columns.
- :class:`LanguageHead` (default): ``logits = s * cos(Linear(x), text embedding of each class)``
  with frozen text embeddings stored as buffers (they travel in the checkpoint, so a trained
  model needs no text encoder); ``set_label_space`` adds a label set never trained on.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ppt.data.classes import union_label_space
from ppt.models.spunet import INIT_STD

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's logit scale, fixed (reference)
TEXT_PREFIX = "text_"  # buffer name prefix of the language head's class embeddings
NORM_EPS = 1e-12  # F.normalize's default


def _linear(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    nn.init.trunc_normal_(linear.weight, std=INIT_STD)
    nn.init.zeros_(linear.bias)
    return linear


def _unknown(name: str, valid: Sequence[str]) -> KeyError:
    return KeyError(f"no label space {name!r} in this head; valid: {', '.join(valid)}")


class DecoupledHead(nn.Module):
    """One linear classifier per dataset.

    Args:
        in_channels: voxel feature channels C.
        class_names: dataset name -> class names in label order.
    """

    def __init__(self, in_channels: int, class_names: dict[str, Sequence[str]]):
        super().__init__()
        self.class_names = {d: tuple(n) for d, n in class_names.items()}
        self.classifiers = nn.ModuleDict({d: _linear(in_channels, len(n)) for d, n in self.class_names.items()})

    def forward(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """(N, C) -> (N, K_d) logits."""
        if dataset not in self.classifiers:
            raise _unknown(dataset, list(self.classifiers))
        return self.classifiers[dataset](x)

    def set_label_space(self, name: str, class_names: Sequence[str], embeddings: torch.Tensor | None = None) -> None:
        raise NotImplementedError("the decoupled head cannot classify a label set it was not trained on; "
                                  "use the language head for open-vocabulary evaluation")


class UnionHead(nn.Module):
    """One linear classifier over the union label space; dataset ``d`` reads its own columns.

    Args:
        in_channels: voxel feature channels C.
        class_names: dataset name -> class names in label order (merged by name).
    """

    def __init__(self, in_channels: int, class_names: dict[str, Sequence[str]]):
        super().__init__()
        self.union_names, index = union_label_space({d: tuple(n) for d, n in class_names.items()})
        self.class_names = {d: tuple(n) for d, n in class_names.items()}
        self.columns = {d: torch.tensor(i, dtype=torch.long) for d, i in index.items()}
        self.classifier = _linear(in_channels, len(self.union_names))

    def forward(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """(N, C) -> (N, K_d) logits, the union columns of ``dataset`` in its label order."""
        if dataset not in self.columns:
            raise _unknown(dataset, list(self.columns))
        return self.classifier(x)[:, self.columns[dataset].to(x.device)]

    def set_label_space(self, name: str, class_names: Sequence[str], embeddings: torch.Tensor | None = None) -> None:
        """Evaluate on a new subset of the union names (the head knows no other names)."""
        missing = [c for c in class_names if c not in self.union_names]
        if missing:
            raise KeyError(f"union head cannot classify {missing}: not in its label space "
                           f"{list(self.union_names)}; use the language head for new class names")
        self.class_names[name] = tuple(class_names)
        self.columns[name] = torch.tensor([self.union_names.index(c) for c in class_names], dtype=torch.long)


class LanguageHead(nn.Module):
    """Language-guided head: scaled cosine similarity with frozen class-name embeddings.

    Args:
        in_channels: voxel feature channels C.
        text_embeddings: dataset name -> (K_d, D) class embeddings in label order (normalised
            here again, stored as buffers ``text_<dataset>``).
        logit_scale: temperature s (100, CLIP's), fixed as the reference; or its start value.
        learnable_scale: learn s as CLIP pre-training did: a parameter ``log_scale`` = log s,
            ``s = exp(log_scale)`` capped at 100 (CLIP's cap). Off by default (the reference's
            fixed scale); bench/heads_real.py measures both.
    """

    def __init__(self, in_channels: int, text_embeddings: dict[str, torch.Tensor],
                 logit_scale: float = DEFAULT_LOGIT_SCALE, learnable_scale: bool = False):
        super().__init__()
        if not text_embeddings:
            raise ValueError("the language head needs text_embeddings (dataset -> (K, D) tensor)")
        dims = {d: e.shape[-1] for d, e in text_embeddings.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"text embeddings of all datasets must share one dimension, got {dims}")
        self.embed_dim = next(iter(dims.values()))
        self.logit_scale = logit_scale
        # log s as a parameter (in the base group; its weight decay, lr x 0.01 per AdamW step, is negligible)
        self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale))) if learnable_scale else None
        self.proj = _linear(in_channels, self.embed_dim)
        for name, emb in text_embeddings.items():
            self.set_label_space(name, None, emb)

    @property
    def label_spaces(self) -> list[str]:
        return [n[len(TEXT_PREFIX):] for n, _ in self.named_buffers(recurse=False) if n.startswith(TEXT_PREFIX)]

    def embeddings(self, name: str) -> torch.Tensor:
        """(K, D) stored class embeddings of label space ``name``."""
        if name not in self.label_spaces:
            raise _unknown(name, self.label_spaces)
        return getattr(self, TEXT_PREFIX + name)

    def set_label_space(self, name: str, class_names: Sequence[str] | None, embeddings: torch.Tensor) -> None:
        """Add or replace a label space; ``embeddings`` (K, D) in label order."""
        if embeddings is None or embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            shape = None if embeddings is None else tuple(embeddings.shape)
            raise ValueError(f"label space {name!r}: embeddings must be (K, {self.embed_dim}), got {shape}")
        if class_names is not None and len(class_names) != len(embeddings):
            raise ValueError(f"label space {name!r}: {len(class_names)} class names but {len(embeddings)} embeddings")
        if not name or "." in name:
            raise ValueError(f"invalid label space name {name!r} (non-empty, no '.')")
        emb = F.normalize(embeddings.detach().float(), dim=-1).to(self.proj.weight.device)
        if hasattr(self, TEXT_PREFIX + name):
            delattr(self, TEXT_PREFIX + name)
        self.register_buffer(TEXT_PREFIX + name, emb)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # label spaces added after construction (set_label_space) must load from checkpoints too
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if key.startswith(prefix + TEXT_PREFIX) and "." not in name and not hasattr(self, name):
                self.register_buffer(name, torch.empty_like(value, device=self.proj.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """(N, C) -> (N, K_d) logits = s * cos(proj(x), text embeddings of ``dataset``).

        The reference projects every point to the text width D (512 for CLIP), normalises and
        takes dot products. With C < D the same function is computed in the feature width: for
        ``proj(x) = W x + b`` and unit text rows t_k,
        ``proj(x) . t_k = x . (W^T t_k) + b . t_k`` and
        ``|proj(x)|^2 = x^T (W^T W) x + 2 x . (W^T b) + |b|^2``,
        so no (N, D) tensor is made or kept for backward: N (C K + C^2) multiply-adds instead
        of N D (C + K), and two (N, D) activations less (0.8 GB at 200k points and D = 512).
        Equal to the projected form up to fp32 rounding (tests/test_models.py).
        """
        text = self.embeddings(dataset)  # (K, D), unit rows
        scale = self.scale()
        # fp32 even under autocast: at scale 100 a bf16 logit would be off by up to 0.5
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if x.shape[1] >= self.embed_dim:  # projecting is the cheaper form
                return scale * F.normalize(self.proj(x), dim=-1) @ text.t()
            w, b = self.proj.weight, self.proj.bias                     # (D, C), (D,)
            dot = x @ (w.t() @ text.t()) + text @ b                     # (N, K)
            squared = ((x @ (w.t() @ w)) * x).sum(1) + 2.0 * (x @ (w.t() @ b)) + b @ b  # (N,)
            norm = squared.clamp_min(NORM_EPS ** 2).sqrt()              # max(|proj x|, eps), as F.normalize
            return (scale * dot) / norm[:, None]

    def scale(self) -> float | torch.Tensor:
        """The logit scale s: the fixed value, or exp(log_scale) capped at 100 when learnt."""
        if self.log_scale is None:
            return self.logit_scale
        # CLIP clamps the parameter itself, not the forward: a clamp in the graph would give a
        # scale at the cap (its start here, 100) a zero gradient, and it could never come down
        with torch.no_grad():
            self.log_scale.clamp_(max=math.log(DEFAULT_LOGIT_SCALE))
        return self.log_scale.float().exp()


HEADS = {"language": LanguageHead, "decoupled": DecoupledHead, "union": UnionHead}
