"""The PPT model: domain prompts + backbone (SpUNet or PTv3) + category-alignment head."""
from __future__ import annotations

from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ppt.models.heads import HEADS, LanguageHead
from ppt.models.prompts import (
    MEAN_PROMPT, PROMPT_ADAPTERS, DomainPrompts, PDLayerNorm, PDNorm, PromptCrossAttention, PromptInjection,
)
from ppt.models.ptv3 import PointTransformerV3
from ppt.models.spunet import BatchNorm, DomainContext, SpUNet

PROMPT_MODULES = (PromptInjection, PromptCrossAttention)
PROMPT_NORMS = (PDNorm, PDLayerNorm)
BACKBONES = ("spunet", "ptv3")  # model.backbone choices


class Segmentor(nn.Module):
    """Point Prompt Training segmentor (SPEC §3-§5).

    Args:
        class_names: dataset name -> class names in label order; the keys are the domains
            (one prompt each) and the label spaces of the head.
        backbone: keyword arguments of the backbone class (SpUNet: ``in_channels``,
            ``channels``, ``layers``, ``stem_channels``; PTv3: see
            ``ppt.models.ptv3.PointTransformerV3``).
        backbone_type: "spunet" (default) or "ptv3". With "pdnorm", every norm of either is
            prompt-driven (PTv3: PDNorm for its batch norms, PDLayerNorm for its LayerNorms).
        prompt: "none" (plain BN, naive joint training), "pdnorm" (paper default),
            "inject" (direct injection) or "xattn" (cross-attention) — see ``ppt.models.prompts``.
        prompt_dim: prompt length.
        decoupled_bn: PDNorm keeps BN statistics per dataset (used by "pdnorm" only; the other
            modes use one shared BN, as the paper's ablation).
        head: "language" (default), "decoupled" or "union".
        text_embeddings: dataset name -> (K_d, D) class embeddings (language head only).
        logit_scale: logit scale of the language head (fixed unless ``learnable_scale``).
        learnable_scale: the language head learns its logit scale (``LanguageHead``).
        zero_init: zero-initialise PDNorm's modulation (training starts as the plain network).
        prompt_adaptive: PDNorm modulates with the prompt ("pdnorm" only); False leaves the
            decoupled norms alone, as the reference's ``norm_adaptive=False`` models.
    """

    def __init__(
        self,
        class_names: dict[str, Sequence[str]],
        backbone: dict | None = None,
        backbone_type: str = "spunet",
        prompt: str = "pdnorm",
        prompt_dim: int = 256,
        decoupled_bn: bool = True,
        head: str = "language",
        text_embeddings: dict[str, torch.Tensor] | None = None,
        logit_scale: float = 100.0,
        learnable_scale: bool = False,
        zero_init: bool = True,
        prompt_adaptive: bool = True,
    ):
        super().__init__()
        if prompt not in PROMPT_ADAPTERS:
            raise ValueError(f"unknown prompt adapter {prompt!r}; valid: {', '.join(PROMPT_ADAPTERS)}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
        if backbone_type not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone_type!r}; valid: {', '.join(BACKBONES)}")
        self.domains = tuple(class_names)
        self.prompt_mode = prompt
        self.prompts = DomainPrompts(self.domains, prompt_dim) if prompt != "none" else None

        layers: dict = {}
        if prompt == "pdnorm":
            pd = dict(domains=self.domains, prompt_dim=prompt_dim, decoupled=decoupled_bn, zero_init=zero_init,
                      adaptive=prompt_adaptive)
            layers["norm_layer"] = partial(PDNorm, **pd)
            if backbone_type == "ptv3":
                layers["ln_layer"] = partial(PDLayerNorm, **pd)
        else:
            layers["norm_layer"] = BatchNorm
        if prompt == "inject":
            layers["adapter_layer"] = partial(PromptInjection, prompt_dim=prompt_dim)
        elif prompt == "xattn":
            layers["adapter_layer"] = partial(PromptCrossAttention, prompt_dim=prompt_dim)
        if backbone_type == "ptv3":
            self.backbone = PointTransformerV3(**(backbone or {}), **layers)
        else:
            self.backbone = SpUNet(**(backbone or {}), **layers)

        if head == "language":
            if text_embeddings is None:
                raise ValueError("head 'language' needs text_embeddings (see ppt.text.class_embeddings)")
            missing = [d for d in self.domains if d not in text_embeddings]
            if missing:
                raise ValueError(f"text_embeddings lack datasets {missing}")
            for d in self.domains:
                if len(text_embeddings[d]) != len(class_names[d]):
                    raise ValueError(f"text_embeddings[{d!r}] has {len(text_embeddings[d])} rows, "
                                     f"dataset has {len(class_names[d])} classes")
            self.head = LanguageHead(self.backbone.out_channels, text_embeddings, logit_scale, learnable_scale)
        else:
            self.head = HEADS[head](self.backbone.out_channels, class_names)

    def domain_context(self, batch: dict, prompt: str | None = None) -> DomainContext:
        """Which prompt and norm statistics a batch uses: ``prompt`` if given, else its dataset."""
        domain = prompt if prompt is not None else batch["dataset"]
        if self.prompts is None:
            if prompt is not None and prompt not in (*self.domains, MEAN_PROMPT):
                raise KeyError(f"unknown prompt {prompt!r}; valid: {', '.join(self.domains)}, {MEAN_PROMPT}")
            return DomainContext()
        if domain not in self.domains and domain != MEAN_PROMPT:
            raise KeyError(f"no domain prompt for {domain!r}; valid prompts: {', '.join(self.domains)}, "
                           f"{MEAN_PROMPT} (pass prompt=<name> for a dataset the model was not trained on)")
        return DomainContext(domain=domain, prompt=self.prompts(domain))

    def forward_features(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        """Batch -> (N, C_out) voxel features."""
        return self.backbone(batch, self.domain_context(batch, prompt))

    def forward(self, batch: dict, prompt: str | None = None) -> torch.Tensor:
        """Batch -> (N, K_d) logits in the label order of ``batch["dataset"]``.

        Args:
            batch: collated batch (``grid_coord``, ``feat``, ``offset``, ``dataset``).
            prompt: domain prompt override: a training dataset name or "mean".
        """
        return self.head(self.forward_features(batch, prompt), batch["dataset"])

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """Prompt table, PDNorm modulations and prompt adapters (trained at lr x 0.1)."""
        seen: set[int] = set()
        modules: list[nn.Module] = [self.prompts] if self.prompts is not None else []
        for m in self.backbone.modules():
            if isinstance(m, PROMPT_NORMS) and m.modulation is not None:
                modules.append(m.modulation)
            elif isinstance(m, PROMPT_MODULES):
                modules.append(m)
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def block_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone's blocks (``backbone.blocks()``) that are not prompt
        parameters: the group the PTv3 recipe trains at lr x 0.1 (reference keyword "block")."""
        prompt = {id(p) for p in self.prompt_parameters()}
        seen: set[int] = set()
        for block in self.backbone.blocks():
            for p in block.parameters():
                if id(p) not in prompt and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def set_label_space(self, name: str, class_names: Sequence[str],
                        text_embeddings: torch.Tensor | None = None) -> None:
        """Add or replace a label set for evaluation (open vocabulary with the language head)."""
        self.head.set_label_space(name, class_names, text_embeddings)
