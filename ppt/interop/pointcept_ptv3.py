"""Pointcept's PTv3 family in and out: PT-v3m1 and PT-v3m2 backbones under DefaultSegmentorV2,
PPT-v1m1 (language head), PPT-v1m2 (decoupled heads) and PPT-v1m3 (Sonata's language head, no
prompt). The family interface of ``ppt.interop.pointcept`` (which strips ``module.`` and maps
``student.backbone.`` to ``backbone.``): :func:`config_sections`, :func:`to_ours`,
:func:`to_pointcept`.

Facts read from the reference (``pointcept/models/point_transformer_v3/point_transformer_v3m1_base.py``,
``..._v3m2_sonata.py``, ``point_prompt_training/*``, ``default.py``) and how they land here:

- PT-v3m1: subm k5 stem + BN, SerializedPooling (codes >> 3), SerializedUnpooling, whose
  first decoder block's CPE conv reads only the projected skip features -> ``ptv3.stem: conv``,
  ``resample_norm: batch``, ``pooling: serialized``, ``unpool_cpe: skip``.
- PT-v3m2 (Sonata / Concerto): Linear stem, LayerNorm everywhere, GridPooling that serializes
  every coarse level again from its own coordinates, GridUnpooling that refreshes the conv
  input, optional LayerScale -> ``stem: linear``, ``resample_norm: layer``, ``pooling: grid``,
  ``unpool_cpe: sum``, ``layer_scale``. ``enc_mode`` -> ``ptv3.enc_mode`` (the pooling_parent
  walk of DefaultSegmentorV2 / PPT-v1m3, finest stage first). The mask token
  (``embedding.mask_token``, pretraining only: it replaces masked points' features) is
  consumed and dropped: fine-tuning never masks.
- Both serialize at the depth of the batch's largest grid coordinate -> ``serial_depth: 0``.
- PDNorm in PT-v3m1 (``pdnorm_bn`` / ``pdnorm_ln``, one norm per ``pdnorm_conditions`` entry,
  ``norm.<i>``) -> ``model.prompt: pdnorm`` with ``norms.<dataset>``; ``pdnorm_adaptive`` ->
  ``model.prompt_adaptive`` (``modulation.1``); PPT's ``embedding_table`` -> the prompt table,
  rows by dataset name. Without PDNorm (``pdnorm_bn=False``) the table is never read by the
  reference's function: it is consumed and dropped, and the model has no prompt.
- Heads: DefaultSegmentorV2 ``seg_head`` -> ``head.classifiers.<dataset>`` (a checkpoint with
  neither ``seg_head`` key, i.e. a pretraining encoder under a probing config, gets this
  project's head initialisation, trunc-normal 0.02 / zero bias); PPT-v1m2 ``seg_heads.<i>`` ->
  ``head.classifiers.<dataset>``; PPT-v1m1 via ``ppt.interop.pointcept_shared.language_head_to_ours``;
  PPT-v1m3 ``proj_head`` -> ``head.proj`` and its class embeddings (a non-persistent buffer the
  reference recomputes with CLIP from ``class_names``: taken from a ``class_embeddings`` entry of
  the state when the caller adds one, as the parity bench does, else encoded here with the CLIP
  of ``clip_model`` and the reference's own class-name strings and template).
- Tensor layouts are the same on both sides (Linear (out, in), qkv rows = (3, heads, head dim)
  as the reference reshapes them, spconv 2.x conv weights (out, k, k, k, in)): no transposes;
  the parity bench (``bench/pointcept_parity_ptv3.py``) checks the function.

Not representable here (each an ``error:`` naming the reference key): per-stage patch sizes,
strides other than 2, ``enable_rpe``, ``pre_norm=False``, ``qkv_bias=False``, a ``qk_scale``,
non-zero ``attn_drop`` / ``proj_drop``, ``pdnorm_decouple=False`` (the reference then assigns
the norm class, not a norm), ``pdnorm_affine=False``, PDNorm on only one of BN / LN.
"""
from __future__ import annotations

import math

import torch

from ppt.interop import ConversionError
from ppt.interop.pointcept_shared import (
    CLIP_ENCODERS, dataset_of_condition, datasets_of, language_head_to_ours, language_head_to_pointcept,
)

MODEL_TYPES = ("DefaultSegmentorV2", "PPT-v1m1", "PPT-v1m2", "PPT-v1m3")
BACKBONE_KEYS = {  # accepted reference backbone keys (type included) and what must hold for each
    "type", "in_channels", "order", "stride", "enc_depths", "enc_channels", "enc_num_head", "enc_patch_size",
    "dec_depths", "dec_channels", "dec_num_head", "dec_patch_size", "mlp_ratio", "qkv_bias", "qk_scale",
    "attn_drop", "proj_drop", "drop_path", "pre_norm", "shuffle_orders", "enable_rpe", "enable_flash",
    "upcast_attention", "upcast_softmax", "enc_mode",
}
M1_KEYS = {"pdnorm_bn", "pdnorm_ln", "pdnorm_decouple", "pdnorm_adaptive", "pdnorm_affine", "pdnorm_conditions"}
M2_KEYS = {"layer_scale", "traceable", "mask_token", "freeze_encoder"}
MODEL_KEYS = {  # accepted keys of the model dict per type (training-only keys are accepted and unused)
    "DefaultSegmentorV2": {"type", "num_classes", "backbone_out_channels", "backbone", "criteria", "freeze_backbone"},
    "PPT-v1m1": {"type", "backbone", "criteria", "backbone_out_channels", "context_channels", "conditions",
                 "template", "clip_model", "class_name", "valid_index", "backbone_mode"},
    "PPT-v1m2": {"type", "backbone", "criteria", "backbone_out_channels", "context_channels", "conditions",
                 "num_classes", "backbone_mode"},
    "PPT-v1m3": {"type", "backbone", "criteria", "backbone_out_channels", "conditions", "template", "clip_model",
                 "class_names", "freeze_backbone", "backbone_mode"},
}
MUST = {"stride": lambda v: all(s == 2 for s in v), "qkv_bias": lambda v: v is True, "qk_scale": lambda v: v is None,
        "attn_drop": lambda v: v == 0, "proj_drop": lambda v: v == 0, "pre_norm": lambda v: v is True,
        "enable_rpe": lambda v: v is False, "pdnorm_decouple": lambda v: v is True,
        "pdnorm_affine": lambda v: v is True, "backbone_mode": lambda v: v is False}
INIT_STD = 0.02  # this project's head initialisation (ppt.models.heads)
# reference defaults of the backbone keys the mapping reads (PointTransformerV3.__init__ of m1 / m2)
DEFAULTS = dict(order=("z", "z-trans"), stride=(2, 2, 2, 2), enc_depths=(2, 2, 2, 6, 2),
                enc_channels=(32, 64, 128, 256, 512), enc_num_head=(2, 4, 8, 16, 32), enc_patch_size=(48,) * 5,
                dec_depths=(2, 2, 2, 2), dec_channels=(64, 64, 128, 256), dec_num_head=(4, 4, 8, 16),
                dec_patch_size=(48,) * 4, mlp_ratio=4, drop_path=0.3, shuffle_orders=True, enc_mode=False,
                in_channels=6, pdnorm_bn=False, pdnorm_ln=False, pdnorm_adaptive=False,
                pdnorm_conditions=("ScanNet", "S3DIS", "Structured3D"), layer_scale=None)


def _bad(key: str, value, why: str) -> ConversionError:
    return ConversionError(f"reference config key '{key}' = {value!r}: {why}")


def _backbone(model_cfg: dict) -> dict:
    """The backbone dict with the reference's defaults filled in, checked key by key."""
    b = model_cfg["backbone"]
    m2 = b["type"] == "PT-v3m2"
    known = BACKBONE_KEYS | (M2_KEYS if m2 else M1_KEYS)
    for key, value in b.items():
        if key not in known:
            raise _bad(f"model.backbone.{key}", value, f"not a {b['type']} setting this converter knows")
        if key in MUST and not MUST[key](value):
            raise _bad(f"model.backbone.{key}", value, "not representable by this project's PTv3")
    full = {**DEFAULTS, **b}
    sizes = set(full["enc_patch_size"]) | (set() if full["enc_mode"] else set(full["dec_patch_size"]))
    if len(sizes) != 1:
        raise _bad("model.backbone.enc_patch_size", full["enc_patch_size"],
                   "one patch size for every stage is all this project's PTv3 has")
    if not m2 and full["pdnorm_bn"] != full["pdnorm_ln"]:
        raise _bad("model.backbone.pdnorm_ln", full["pdnorm_ln"], "PDNorm on BN and LN must be both on or both off")
    return full


def _pd_datasets(model_cfg: dict, b: dict) -> list[str]:
    """This project's dataset of each PDNorm slot ``norm.<i>`` (``pdnorm_conditions`` order)."""
    names = [dataset_of_condition(c) for c in b["pdnorm_conditions"]]
    if sorted(names) != sorted(datasets_of(model_cfg)):
        raise _bad("model.backbone.pdnorm_conditions", b["pdnorm_conditions"],
                   f"must name the same datasets as the model's domains {datasets_of(model_cfg)}")
    return names


def config_sections(model_cfg: dict) -> dict:
    """Reference ``model`` dict -> ``{"model": {...}, "ptv3": {...}}`` of this project's config."""
    kind = model_cfg.get("type")
    if kind not in MODEL_TYPES:
        raise _bad("model.type", kind, f"supported with a PTv3 backbone: {', '.join(MODEL_TYPES)} (for a "
                                       f"pretraining config, pass a probing / fine-tuning config instead)")
    for key, value in model_cfg.items():
        if key not in MODEL_KEYS[kind] and not key.startswith("_"):
            raise _bad(f"model.{key}", value, f"not a {kind} setting this converter knows")
        if key in MUST and not MUST[key](value):
            raise _bad(f"model.{key}", value, "not representable here")
    b = _backbone(model_cfg)
    m2 = b["type"] == "PT-v3m2"
    width = sum(b["enc_channels"]) if b["enc_mode"] else b["dec_channels"][0]
    if model_cfg.get("backbone_out_channels", width) != width:
        raise _bad("model.backbone_out_channels", model_cfg["backbone_out_channels"],
                   f"the backbone gives {width} channels")
    if kind in ("PPT-v1m1", "PPT-v1m2") and b["enc_mode"]:
        raise _bad("model.backbone.enc_mode", True, f"{kind} reads the coarsest level's features without the "
                                                     f"pooling_parent walk; not representable")
    pdnorm = not m2 and b["pdnorm_bn"]
    if pdnorm:
        _pd_datasets(model_cfg, b)
    ptv3 = dict(enc_depths=list(b["enc_depths"]), enc_channels=list(b["enc_channels"]),
                enc_heads=list(b["enc_num_head"]), patch_size=int(b["enc_patch_size"][0]),
                mlp_ratio=float(b["mlp_ratio"]), drop_path=float(b["drop_path"]), orders=list(b["order"]),
                shuffle_orders=bool(b["shuffle_orders"]), serial_depth=0,
                pooling="grid" if m2 else "serialized", stem="linear" if m2 else "conv",
                resample_norm="layer" if m2 else "batch", unpool_cpe="sum" if m2 else "skip",
                layer_scale=float(b.get("layer_scale") or 0.0), enc_mode=bool(b["enc_mode"]))
    if b["enc_mode"]:
        ptv3.update(dec_depths=[], dec_channels=[], dec_heads=[])
    else:
        ptv3.update(dec_depths=list(b["dec_depths"]), dec_channels=list(b["dec_channels"]),
                    dec_heads=list(b["dec_num_head"]))
    model = dict(backbone="ptv3", in_channels=int(b["in_channels"]),
                 head={"DefaultSegmentorV2": "decoupled", "PPT-v1m2": "decoupled"}.get(kind, "language"),
                 prompt="pdnorm" if pdnorm else "none", decoupled_bn=True)
    if pdnorm:
        model.update(prompt_dim=int(model_cfg.get("context_channels", 256)),
                     prompt_adaptive=bool(b["pdnorm_adaptive"]), zero_init=False)
    return {"model": model, "ptv3": ptv3}


# --- the key table ----------------------------------------------------------------------------

def _norm_pairs(ref: str, ours: str, kind: str, pd: list[str] | None, adaptive: bool) -> list[tuple[str, str]]:
    """(reference key, our key) of one norm: BN ("bn") or LN ("ln"), plain or PDNorm."""
    params = ["weight", "bias"] + (["running_mean", "running_var", "num_batches_tracked"] if kind == "bn" else [])
    if pd is None:
        return [(f"{ref}.{p}", f"{ours}.{p}") for p in params]
    pairs = [(f"{ref}.norm.{i}.{p}", f"{ours}.norms.{d}.{p}") for i, d in enumerate(pd) for p in params]
    if adaptive:
        pairs += [(f"{ref}.modulation.1.{p}", f"{ours}.modulation.1.{p}") for p in ("weight", "bias")]
    return pairs


def _linear(ref: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{ref}.{p}", f"{ours}.{p}") for p in ("weight", "bias")]


def backbone_pairs(model_cfg: dict) -> list[tuple[str, str]]:
    """Every (reference key, our key) of the backbone, in module order."""
    b = _backbone(model_cfg)
    m2 = b["type"] == "PT-v3m2"
    pd = _pd_datasets(model_cfg, b) if not m2 and b["pdnorm_bn"] else None
    adaptive = bool(pd) and b["pdnorm_adaptive"]
    bn, ln = ("ln", "ln") if m2 else ("bn", "ln")
    scale = bool(b.get("layer_scale"))

    def block(ref: str, ours: str) -> list[tuple[str, str]]:
        pairs = [(f"{ref}.cpe.0.weight", f"{ours}.cpe_conv.conv.weight"), (f"{ref}.cpe.0.bias", f"{ours}.cpe_conv.bias"),
                 *_linear(f"{ref}.cpe.1", f"{ours}.cpe_linear"), *_norm_pairs(f"{ref}.cpe.2", f"{ours}.cpe_norm", ln, pd, adaptive),
                 *_norm_pairs(f"{ref}.norm1.0", f"{ours}.norm1", ln, pd, adaptive),
                 *_linear(f"{ref}.attn.qkv", f"{ours}.attn.qkv"), *_linear(f"{ref}.attn.proj", f"{ours}.attn.proj"),
                 *_norm_pairs(f"{ref}.norm2.0", f"{ours}.norm2", ln, pd, adaptive),
                 *_linear(f"{ref}.mlp.0.fc1", f"{ours}.mlp.fc1"), *_linear(f"{ref}.mlp.0.fc2", f"{ours}.mlp.fc2")]
        if scale:
            pairs += [(f"{ref}.ls1.0.gamma", f"{ours}.ls1.gamma"), (f"{ref}.ls2.0.gamma", f"{ours}.ls2.gamma")]
        return pairs

    pairs = _linear("backbone.embedding.stem.linear", "backbone.stem.linear") if m2 else \
        [("backbone.embedding.stem.conv.weight", "backbone.stem.conv.weight")]
    pairs += _norm_pairs("backbone.embedding.stem.norm", "backbone.stem.norm", bn, pd, adaptive)
    stages = len(b["enc_depths"])
    for s in range(stages):
        ref, ours = f"backbone.enc.enc{s}", f"backbone.encoder.{s}"
        if s > 0:
            pairs += _linear(f"{ref}.down.proj", f"{ours}.resample.proj")
            pairs += _norm_pairs(f"{ref}.down.norm.0", f"{ours}.resample.norm", bn, pd, adaptive)
        for i in range(b["enc_depths"][s]):
            pairs += block(f"{ref}.block{i}", f"{ours}.blocks.{i}")
    if b["enc_mode"]:
        return pairs
    for k, s in enumerate(reversed(range(stages - 1))):  # our decoder runs deepest first
        ref, ours = f"backbone.dec.dec{s}", f"backbone.decoder.{k}"
        pairs += _linear(f"{ref}.up.proj.0", f"{ours}.resample.proj")
        pairs += _norm_pairs(f"{ref}.up.proj.1", f"{ours}.resample.norm", bn, pd, adaptive)
        pairs += _linear(f"{ref}.up.proj_skip.0", f"{ours}.resample.proj_skip")
        pairs += _norm_pairs(f"{ref}.up.proj_skip.1", f"{ours}.resample.norm_skip", bn, pd, adaptive)
        for i in range(b["dec_depths"][s]):
            pairs += block(f"{ref}.block{i}", f"{ours}.blocks.{i}")
    return pairs


def _move(src: dict, pairs: list[tuple[str, str]], reverse: bool = False) -> dict:
    """Pop every pair's source key from ``src`` into a new dict under its destination key."""
    out = {}
    for ref, ours in pairs:
        a, b = (ours, ref) if reverse else (ref, ours)
        if a not in src:
            side = "this project's state" if reverse else "checkpoint"
            raise ConversionError(f"{side} lacks key '{a}' (needed for '{b}')")
        out[b] = src.pop(a)
    return out


def _leftover(state: dict, what: str) -> None:
    if state:
        keys = sorted(state)
        raise ConversionError(f"{what} key '{keys[0]}' is not understood by the PTv3 converter"
                              + (f" ({len(keys)} such keys, e.g. {', '.join(keys[1:4])})" if len(keys) > 1 else ""))


# --- heads ------------------------------------------------------------------------------------

def _fresh_linear(rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.init.trunc_normal_(torch.empty(rows, cols), std=INIT_STD, generator=g)
    return {"weight": weight, "bias": torch.zeros(rows)}


def _v1m3_text(state: dict, model_cfg: dict, datasets: list[str]) -> dict[str, torch.Tensor]:
    """head.text_<dataset> of PPT-v1m3: the reference's class embeddings split per condition."""
    names = model_cfg.get("class_names")
    conditions = [dataset_of_condition(c) for c in model_cfg["conditions"]]
    if names is None:
        raise _bad("model.class_names", None, "PPT-v1m3's built-in class lists are not read here; name them")
    if len(names) != len(conditions):
        raise _bad("model.class_names", f"{len(names)} lists", f"one per condition ({len(conditions)})")
    if "class_embeddings" in state:
        emb = state.pop("class_embeddings")
    else:
        from ppt.text import class_embeddings

        clip = model_cfg.get("clip_model", "ViT-B/16")
        encoder = CLIP_ENCODERS.get(clip, "clip:" + clip.replace("/", "-") + ":openai")
        template = model_cfg.get("template", "[x]").replace("[x]", "{}")
        try:
            emb = torch.cat([class_embeddings(list(n), encoder, template) for n in names])
        except Exception as err:  # no network / no open_clip: say what was needed
            raise ConversionError(f"PPT-v1m3 keeps no class embeddings in its checkpoint; encoding "
                                  f"'model.class_names' with {encoder} failed: {err}") from None
    counts = [len(n) for n in names]
    if len(emb) != sum(counts):
        raise ConversionError(f"class_embeddings has {len(emb)} rows, model.class_names {sum(counts)} names")
    parts = dict(zip(conditions, emb.float().split(counts)))
    return {f"head.text_{d}": parts[d].clone() for d in datasets}


def _head_to_ours(state: dict, model_cfg: dict, datasets: list[str], width: int) -> dict:
    kind = model_cfg["type"]
    if kind == "PPT-v1m1":
        out = language_head_to_ours(state, model_cfg)
        if not model_cfg["backbone"].get("pdnorm_bn", False):
            out.pop("prompts.table.weight")  # no PDNorm: the reference never reads its table
        return out
    if kind == "DefaultSegmentorV2":
        if "seg_head.weight" not in state and "seg_head.bias" not in state:
            head = _fresh_linear(int(model_cfg["num_classes"]), width)  # a pretraining encoder: no head yet
        else:
            head = _move(state, _linear("seg_head", "h"))
            head = {"weight": head["h.weight"], "bias": head["h.bias"]}
        return {f"head.classifiers.{datasets[0]}.{p}": v for p, v in head.items()}
    out = {}
    conditions = model_cfg["conditions"]
    if kind == "PPT-v1m2":
        order = [dataset_of_condition(c) for c in conditions]
        table = state.pop("embedding_table.weight", None)
        if table is None:
            raise ConversionError("checkpoint lacks key 'embedding_table.weight'")
        if model_cfg["backbone"].get("pdnorm_bn", False):
            out["prompts.table.weight"] = torch.stack([table[order.index(d)] for d in datasets])
        for i, d in enumerate(order):
            out.update(_move(state, _linear(f"seg_heads.{i}", f"head.classifiers.{d}")))
        return out
    out.update(_move(state, _linear("proj_head", "head.proj")))  # PPT-v1m3
    state.pop("logit_scale", None)  # the core reads it into model.logit_scale
    out.update(_v1m3_text(state, model_cfg, datasets))
    return out


def _head_to_pointcept(state: dict, model_cfg: dict, datasets: list[str]) -> dict:
    kind = model_cfg["type"]
    if kind == "PPT-v1m1":
        if not model_cfg["backbone"].get("pdnorm_bn", False):  # the reference keeps an unread table
            state["prompts.table.weight"] = torch.zeros(len(datasets), int(model_cfg.get("context_channels", 256)))
        out = language_head_to_pointcept(state, model_cfg)
        out["logit_scale"] = torch.tensor(math.log(100.0))  # CLIP's; the core overwrites it with the model's
        return out
    if kind == "DefaultSegmentorV2":
        return _move(state, _linear("seg_head", f"head.classifiers.{datasets[0]}"), reverse=True)
    if kind == "PPT-v1m2":
        order = [dataset_of_condition(c) for c in model_cfg["conditions"]]
        out = {}
        for i, d in enumerate(order):
            out.update(_move(state, _linear(f"seg_heads.{i}", f"head.classifiers.{d}"), reverse=True))
        if "prompts.table.weight" in state:
            table = state.pop("prompts.table.weight")
            out["embedding_table.weight"] = torch.stack([table[datasets.index(d)] for d in order])
        else:
            out["embedding_table.weight"] = torch.zeros(len(order), int(model_cfg.get("context_channels", 256)))
        return out
    out = _move(state, _linear("proj_head", "head.proj"), reverse=True)  # PPT-v1m3
    for d in datasets:
        state.pop(f"head.text_{d}", None)  # the reference recomputes them (non-persistent buffer)
    out["logit_scale"] = torch.tensor(math.log(100.0))  # CLIP's; the core overwrites it with the model's
    return out


# --- the interface ----------------------------------------------------------------------------

FRESH_DECODER = "backbone.decoder."  # our keys a pretraining encoder leaves to a fresh decoder


def to_ours(state: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """Reference state (``backbone.*`` + head keys) -> this project's Segmentor state.

    Raises:
        ConversionError: a missing key (names it and what needed it) or a key left unconsumed.
    """
    state = dict(state)
    config_sections(model_cfg)  # checks the settings first
    b = _backbone(model_cfg)
    pairs = backbone_pairs(model_cfg)
    if not b["enc_mode"] and not any(k.startswith("backbone.dec.") for k in state):
        # a pretraining encoder (Sonata / Concerto) under a decoder-probing or fine-tuning config:
        # the reference builds the decoder at its initialisation and loads the encoder only
        # (the core fills the decoder from a freshly built model: FRESH_DECODER)
        pairs = [(ref, ours) for ref, ours in pairs if not ref.startswith("backbone.dec.")]
    out = _move(state, pairs)
    state.pop("backbone.embedding.mask_token", None)  # pretraining only: fine-tuning never masks
    width = sum(b["enc_channels"]) if b["enc_mode"] else b["dec_channels"][0]
    out.update(_head_to_ours(state, model_cfg, datasets_of(model_cfg), width))
    _leftover(state, "reference")
    return out


def to_pointcept(state: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_ours`: this project's state -> the reference's (loads with strict=True
    into the reference model of ``model_cfg``; a mask token, where the reference model has one, is
    written as zeros: it is never read outside pretraining)."""
    state = dict(state)
    config_sections(model_cfg)
    out = _move(state, backbone_pairs(model_cfg), reverse=True)
    b = _backbone(model_cfg)
    if b.get("mask_token"):  # the reference model has the parameter; never read outside pretraining
        out["backbone.embedding.mask_token"] = torch.zeros(1, b["enc_channels"][0])
    out.update(_head_to_pointcept(state, model_cfg, datasets_of(model_cfg)))
    _leftover(state, "this project's")
    return out
