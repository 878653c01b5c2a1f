"""The reference's SparseUNets <-> this project's SpUNet Segmentor (a family of ``ppt.interop.pointcept``).

Read from the reference (Pointcept ``pointcept/models/sparse_unet/spconv_unet_v1m1_base.py``,
``spconv_unet_v1m3_pdnorm.py``, ``point_prompt_training/point_prompt_training_v1m1_language_guided.py``):

* ``DefaultSegmentor`` + ``SpUNet-v1m1``: plain BatchNorm (eps 1e-3), the U-Net as here, and a
  final ``SubMConv3d(C, K, kernel_size=1, bias=True)``: per voxel ``W x + b``, i.e. this
  project's decoupled head with one Linear. Here: ``prompt: none``, ``head: decoupled``.
* ``PPT-v1m1`` + ``SpUNet-v1m3``: every norm is ``PDBatchNorm`` (one BN per backbone
  ``conditions`` entry when ``norm_decouple``, affine only when ``norm_affine``, and
  ``x * (1 + scale) + shift`` from ``Linear(SiLU(context))`` when ``norm_adaptive``); the context
  is row ``conditions.index(c)`` of PPT's ``embedding_table`` (PPT's own ``conditions`` order,
  which differs from the backbone's in the released configs). Here: ``prompt: pdnorm`` with
  ``decoupled_bn`` / ``prompt_adaptive`` from the reference flags, the language head (see
  ``ppt.interop.pointcept_shared.language_head_to_ours``). ``norm_affine=False`` becomes weight 1,
  bias 0 (the same function).

Key map (reference ``backbone.`` -> ours ``backbone.``), v1m1 / v1m3 names::

    conv_input.0 / conv_input.conv        -> stem.conv        (norm: .1 / .bn -> stem.norm)
    down.{s}.0 / down.{s}.conv            -> encoder.{s}.down.conv (norm .1 / .bn -> .down.norm)
    enc.{s}.block{i}.conv1, bn1, conv2, bn2 -> encoder.{s}.blocks.{i}.conv1, norm1, conv2, norm2
    up.{s}.*                              -> decoder.{3 - s}.up.*   (the reference runs up[3] first)
    dec.{s}.block{i}.*                    -> decoder.{3 - s}.blocks.{i}.*
    ...block0.proj.0 / proj_conv, proj.1 / proj_norm -> ...blocks.0.proj, proj_norm
    final.weight (K, 1, 1, 1, C), final.bias -> head.classifiers.<dataset>.weight (K, C), bias

Sparse-conv weights are spconv 2.x's (out, k, k, k, in) on both sides and copy as they are. The
final 1x1 conv is the exception, a quirk of spconv 2.x that the reference trained with: its
kernel-size-1 path computes ``x @ weight.view(in, out)``, reading the (out, 1, 1, 1, in) memory as
an (in, out) matrix (not its transpose), so the equal Linear weight is
``final.weight.reshape(C, K).t()`` and export writes ``linear.weight.t().reshape(K, 1, 1, 1, C)``.
(The blocks' 1x1 shortcut convs are spconv convs on both sides: same quirk, copied as they are.)
A weight saved in spconv 1.x's (k, k, k, in, out) layout is refused with its shape.
"""
from __future__ import annotations

import torch

from ppt.interop import ConversionError
from ppt.interop.pointcept_shared import (
    CLIP_ENCODERS, DATASETS_KEY, condition_of_dataset, dataset_of_condition, datasets_of, language_head_to_ours,
    language_head_to_pointcept,
)

BN_STATS = ("running_mean", "running_var")
KNOWN_KEYS = {
    "DefaultSegmentor": {"type", "backbone", "criteria", DATASETS_KEY},
    "PPT-v1m1": {"type", "backbone", "criteria", "backbone_out_channels", "context_channels", "conditions",
                 "template", "clip_model", "class_name", "valid_index", "backbone_mode", DATASETS_KEY},
    "SpUNet-v1m1": {"type", "in_channels", "num_classes", "base_channels", "channels", "layers", "enc_mode"},
    "SpUNet-v1m3": {"type", "in_channels", "num_classes", "base_channels", "context_channels", "channels",
                    "layers", "enc_mode", "conditions", "zero_init", "norm_decouple", "norm_adaptive",
                    "norm_affine"},
}
V1M3_DEFAULTS = dict(base_channels=32, context_channels=256, norm_decouple=True, norm_adaptive=True,
                     norm_affine=False, conditions=("ScanNet", "S3DIS", "Structured3D"))
DEFAULT_CHANNELS = (32, 64, 128, 256, 256, 128, 96, 96)
DEFAULT_LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


def _check_keys(cfg: dict, kind: str, where: str) -> None:
    unknown = sorted(set(cfg) - KNOWN_KEYS[kind])
    if unknown:
        raise ConversionError(f"reference config key '{where}.{unknown[0]}' ({kind}) is not understood by the converter")


def _backbone(model_cfg: dict) -> dict:
    """The backbone dict with the reference's constructor defaults filled in."""
    bb = dict(model_cfg["backbone"])
    defaults = dict(base_channels=32, channels=DEFAULT_CHANNELS, layers=DEFAULT_LAYERS, enc_mode=False, num_classes=0)
    if bb["type"] == "SpUNet-v1m3":
        defaults.update(V1M3_DEFAULTS)
    return {**defaults, **bb}


def config_sections(model_cfg: dict) -> dict:
    """Reference ``model`` dict -> this project's ``model`` section."""
    kind, bb = model_cfg.get("type"), _backbone(model_cfg)
    pair = (kind, bb["type"])
    if pair not in (("DefaultSegmentor", "SpUNet-v1m1"), ("PPT-v1m1", "SpUNet-v1m3")):
        raise ConversionError(f"reference model 'model.type={kind}' over 'model.backbone.type={bb['type']}' is not "
                              f"supported (SpUNet: DefaultSegmentor + SpUNet-v1m1, PPT-v1m1 + SpUNet-v1m3)")
    _check_keys(model_cfg, kind, "model")
    _check_keys(model_cfg["backbone"], bb["type"], "model.backbone")
    if len(bb["channels"]) != 8 or len(bb["layers"]) != 8:
        raise ConversionError("reference config key 'model.backbone.channels' must have 8 entries "
                              "(4 encoder + 4 decoder stages), as this project's SpUNet")
    if bb["enc_mode"]:
        raise ConversionError("reference config key 'model.backbone.enc_mode=True' (encoder only) is not supported")
    model = dict(backbone="spunet", channels=list(bb["channels"]), layers=list(bb["layers"]),
                 in_channels=bb["in_channels"], stem_channels=bb["base_channels"])
    if kind == "DefaultSegmentor":
        if bb["num_classes"] <= 0:
            raise ConversionError("reference config key 'model.backbone.num_classes' must be > 0 for DefaultSegmentor")
        model.update(prompt="none", head="decoupled")
    else:
        if bb["num_classes"] != 0:
            raise ConversionError("reference config key 'model.backbone.num_classes' must be 0 under PPT-v1m1")
        if model_cfg.get("backbone_mode", False):
            raise ConversionError("reference config key 'model.backbone_mode=True' (no head) is not supported")
        if model_cfg.get("backbone_out_channels", 96) != bb["channels"][-1]:
            raise ConversionError("reference config key 'model.backbone_out_channels' must equal the last channel width")
        if model_cfg.get("context_channels", 256) != bb["context_channels"]:
            raise ConversionError("reference config keys 'model.context_channels' and "
                                  "'model.backbone.context_channels' differ")
        if set(bb["conditions"]) != set(model_cfg["conditions"]):
            raise ConversionError(f"reference config key 'model.backbone.conditions' {tuple(bb['conditions'])} must name "
                                  f"the same datasets as 'model.conditions' {tuple(model_cfg['conditions'])}")
        model.update(prompt="pdnorm", head="language", prompt_dim=bb["context_channels"],
                     decoupled_bn=bool(bb["norm_decouple"]), prompt_adaptive=bool(bb["norm_adaptive"]))
    return {"model": model}  # the loss (model.criteria) with the rest of the recipe: pointcept.reference_recipe


def layer_map(model_cfg: dict) -> list[tuple[str, str, str, tuple[int, int, int]]]:
    """(kind "conv"/"norm", reference name, our name, (in, out, kernel)) of every backbone layer."""
    bb = _backbone(model_cfg)
    v3 = bb["type"] == "SpUNet-v1m3"
    ch, layers, base = bb["channels"], bb["layers"], bb["base_channels"]
    seq = (lambda p: (f"{p}.conv", f"{p}.bn")) if v3 else (lambda p: (f"{p}.0", f"{p}.1"))
    out: list = []

    def conv_norm(ref: str, ours: str, cin: int, cout: int, k: int) -> None:
        conv, norm = seq(ref)
        out.extend([("conv", conv, f"{ours}.conv", (cin, cout, k)), ("norm", norm, f"{ours}.norm", (cout, cout, 0))])

    def block(ref: str, ours: str, cin: int, cout: int) -> None:
        out.extend([("conv", f"{ref}.conv1", f"{ours}.conv1", (cin, cout, 3)), ("norm", f"{ref}.bn1", f"{ours}.norm1", (cout,) * 2 + (0,)),
                    ("conv", f"{ref}.conv2", f"{ours}.conv2", (cout, cout, 3)), ("norm", f"{ref}.bn2", f"{ours}.norm2", (cout,) * 2 + (0,))])
        if cin != cout:
            conv, norm = ("proj_conv", "proj_norm") if v3 else ("proj.0", "proj.1")
            out.extend([("conv", f"{ref}.{conv}", f"{ours}.proj", (cin, cout, 1)),
                        ("norm", f"{ref}.{norm}", f"{ours}.proj_norm", (cout, cout, 0))])

    conv_norm("conv_input", "stem", bb["in_channels"], base, 5)
    widths = [base, *ch[:4]]
    for s in range(4):
        conv_norm(f"down.{s}", f"encoder.{s}.down", widths[s], ch[s], 2)
        for i in range(layers[s]):
            block(f"enc.{s}.block{i}", f"encoder.{s}.blocks.{i}", ch[s], ch[s])
    for s in range(4):  # reference up[s] / dec[s] leave level s + 1; ours decoder[3 - s]
        j, cin, cout = 3 - s, ch[6 - s], ch[7 - s]
        conv_norm(f"up.{s}", f"decoder.{j}.up", cin, cout, 2)
        for i in range(layers[7 - s]):
            block(f"dec.{s}.block{i}", f"decoder.{j}.blocks.{i}", cout + widths[s] if i == 0 else cout, cout)
    return [(kind, "backbone." + r, "backbone." + o, shape) for kind, r, o, shape in out]


def _take(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"checkpoint lacks reference key '{key}'")
    return state.pop(key)


def _conv_weight(w: torch.Tensor, key: str, cin: int, cout: int, k: int) -> torch.Tensor:
    """A reference spconv weight, checked to be (out, k, k, k, in) (spconv 2.x)."""
    krsc = (cout, k, k, k, cin)
    if tuple(w.shape) != krsc:
        legacy = " (spconv 1.x's (k, k, k, in, out) layout?)" if tuple(w.shape) == (k, k, k, cin, cout) else ""
        raise ConversionError(f"reference key '{key}' has shape {tuple(w.shape)}; the config implies {krsc}{legacy}")
    return w


def final_to_linear(w: torch.Tensor) -> torch.Tensor:
    """(K, 1, 1, 1, C) weight of spconv's 1x1 SubMConv3d -> (K, C) weight of the equal Linear
    (spconv computes ``x @ w.view(C, K)``; see the module docstring)."""
    return w.reshape(w.shape[-1], w.shape[0]).t().contiguous()


def linear_to_final(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`final_to_linear`: (K, C) -> (K, 1, 1, 1, C)."""
    return w.t().contiguous().reshape(w.shape[0], 1, 1, 1, w.shape[1])


def _norm_layout(model_cfg: dict) -> tuple[bool, bool, bool, list[str]]:
    """(plain BN?, decoupled, affine, backbone conditions as our dataset names)."""
    bb = _backbone(model_cfg)
    if bb["type"] == "SpUNet-v1m1":
        return True, False, True, []
    return False, bool(bb["norm_decouple"]), bool(bb["norm_affine"]), [dataset_of_condition(c) for c in bb["conditions"]]


def _bn_to_ours(state: dict, ref: str, ours: str, affine: bool, width: int, out: dict) -> None:
    if affine:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = _take(state, f"{ref}.weight"), _take(state, f"{ref}.bias")
    else:  # the reference's affine-free BN = weight 1, bias 0
        out[f"{ours}.weight"], out[f"{ours}.bias"] = torch.ones(width), torch.zeros(width)
    for stat in BN_STATS:
        out[f"{ours}.{stat}"] = _take(state, f"{ref}.{stat}")
    tracked = state.pop(f"{ref}.num_batches_tracked", None)
    out[f"{ours}.num_batches_tracked"] = tracked if tracked is not None else torch.tensor(0)


def to_ours(state: dict, model_cfg: dict) -> dict:
    """Reference state dict (no ``module.``) -> this project's Segmentor state dict.

    Raises:
        ConversionError: a missing reference key, a shape that contradicts the config, or a
            reference key nothing consumed (named).
    """
    state = dict(state)
    plain, decoupled, affine, bb_datasets = _norm_layout(model_cfg)
    adaptive = not plain and bool(_backbone(model_cfg)["norm_adaptive"])
    datasets = datasets_of(model_cfg)
    out: dict = {}
    for kind, ref, ours, (cin, cout, k) in layer_map(model_cfg):
        if kind == "conv":
            out[f"{ours}.weight"] = _conv_weight(_take(state, f"{ref}.weight"), f"{ref}.weight", cin, cout, k)
            continue
        if plain:
            _bn_to_ours(state, ref, ours, True, cout, out)
        elif decoupled:
            for d in datasets:
                _bn_to_ours(state, f"{ref}.bns.{bb_datasets.index(d)}", f"{ours}.norms.{d}", affine, cout, out)
        else:
            _bn_to_ours(state, f"{ref}.bn", f"{ours}.norm", affine, cout, out)
        if adaptive:
            for p in ("weight", "bias"):
                out[f"{ours}.modulation.1.{p}"] = _take(state, f"{ref}.modulation.1.{p}")
    if model_cfg["type"] == "DefaultSegmentor":
        (d,) = datasets
        bb = _backbone(model_cfg)
        w = _conv_weight(_take(state, "backbone.final.weight"), "backbone.final.weight", bb["channels"][-1], bb["num_classes"], 1)
        out[f"head.classifiers.{d}.weight"] = final_to_linear(w)
        out[f"head.classifiers.{d}.bias"] = _take(state, "backbone.final.bias")
    else:
        out.update(language_head_to_ours(state, model_cfg))
    if state:
        keys = sorted(state)
        raise ConversionError(f"reference key '{keys[0]}' is not mapped by the SpUNet converter"
                              + (f" ({len(keys)} unmapped keys)" if len(keys) > 1 else ""))
    return out


def _bn_to_pointcept(state: dict, ours: str, ref: str, affine: bool, out: dict) -> None:
    weight, bias = _take(state, f"{ours}.weight"), _take(state, f"{ours}.bias")
    if affine:
        out[f"{ref}.weight"], out[f"{ref}.bias"] = weight, bias
    elif not (torch.all(weight == 1) and torch.all(bias == 0)):
        raise ConversionError(f"{ours} has a trained affine; the reference config has norm_affine=False")
    for stat in (*BN_STATS, "num_batches_tracked"):
        out[f"{ref}.{stat}"] = _take(state, f"{ours}.{stat}")


def to_pointcept(state: dict, model_cfg: dict) -> dict:
    """This project's Segmentor state -> the reference's (inverse of :func:`to_ours`)."""
    state = dict(state)
    plain, decoupled, affine, bb_datasets = _norm_layout(model_cfg)
    adaptive = not plain and bool(_backbone(model_cfg)["norm_adaptive"])
    datasets = datasets_of(model_cfg)
    out: dict = {}
    for kind, ref, ours, _ in layer_map(model_cfg):
        if kind == "conv":
            out[f"{ref}.weight"] = _take(state, f"{ours}.weight")
            continue
        if plain:
            _bn_to_pointcept(state, ours, ref, True, out)
        elif decoupled:
            for i, d in enumerate(bb_datasets):
                _bn_to_pointcept(state, f"{ours}.norms.{d}", f"{ref}.bns.{i}", affine, out)
        else:
            _bn_to_pointcept(state, f"{ours}.norm", f"{ref}.bn", affine, out)
        if adaptive:
            for p in ("weight", "bias"):
                out[f"{ref}.modulation.1.{p}"] = _take(state, f"{ours}.modulation.1.{p}")
    if model_cfg["type"] == "DefaultSegmentor":
        (d,) = datasets
        w = _take(state, f"head.classifiers.{d}.weight")
        out["backbone.final.weight"] = linear_to_final(w)
        out["backbone.final.bias"] = _take(state, f"head.classifiers.{d}.bias")
    else:
        out.update(language_head_to_pointcept(state, model_cfg))
    if state:
        raise ConversionError(f"key '{sorted(state)[0]}' of this model has no place in the reference's "
                              f"{model_cfg['type']} ({len(state)} unmapped)")
    return out


def pointcept_model(cfg) -> dict:
    """The reference ``model`` dict of a SpUNet model trained here (for export without --config):
    prompt "none" + decoupled head over one dataset -> DefaultSegmentor / SpUNet-v1m1; prompt
    "pdnorm" + language head over CLIP text -> PPT-v1m1 / SpUNet-v1m3 with this model's domains
    as ``conditions`` and ``valid_index`` built from its class names (no S3DIS quirk)."""
    from ppt.data.classes import union_label_space
    from ppt.data.dataset_file import get_dataset_info
    from ppt.engine.build import model_datasets

    m, datasets = cfg.model, model_datasets(cfg)
    common = dict(in_channels=m.in_channels, base_channels=m.stem_channels, channels=tuple(m.channels),
                  layers=tuple(m.layers))
    criteria = [dict(type="CrossEntropyLoss", loss_weight=1.0, ignore_index=-1)]
    if m.prompt == "none" and m.head == "decoupled" and len(datasets) == 1:
        return {"type": "DefaultSegmentor", "backbone": dict(type="SpUNet-v1m1", num_classes=get_dataset_info(
            datasets[0]).num_classes, **common), "criteria": criteria, DATASETS_KEY: datasets}
    if m.prompt == "pdnorm" and m.head == "language":
        if not m.text_encoder.startswith("clip:") or not m.text_encoder.endswith(":openai"):
            raise ConversionError(f"model.text_encoder {m.text_encoder!r} has no reference counterpart "
                                  f"(PPT-v1m1 embeds class names with OpenAI CLIP); pass --config")
        conditions = tuple(condition_of_dataset(d) for d in datasets)
        names, index = union_label_space({d: get_dataset_info(d).class_names for d in datasets})
        return {"type": "PPT-v1m1",
                "backbone": dict(type="SpUNet-v1m3", num_classes=0, context_channels=m.prompt_dim, enc_mode=False,
                                 conditions=conditions, zero_init=m.zero_init, norm_decouple=m.decoupled_bn,
                                 norm_adaptive=m.prompt_adaptive, norm_affine=True, **common),
                "criteria": criteria, "backbone_out_channels": m.channels[-1], "context_channels": m.prompt_dim,
                "conditions": conditions, "template": m.template.replace("{}", "[x]"),
                "clip_model": {v: k for k, v in CLIP_ENCODERS.items()}.get(m.text_encoder,
                                                                           "/".join(m.text_encoder.split(":")[1].rsplit("-", 1))),
                "class_name": names, "valid_index": tuple(tuple(index[d]) for d in datasets), "backbone_mode": False,
                DATASETS_KEY: datasets}
    raise ConversionError(f"a SpUNet with prompt {m.prompt!r}, head {m.head!r} over {len(datasets)} datasets has no "
                          f"reference model type (SpUNet-v1m1: prompt none + decoupled head, one dataset; "
                          f"PPT-v1m1: pdnorm + language head)")
