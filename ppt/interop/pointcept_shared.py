"""What the Pointcept converters share: dataset names and PPT-v1m1's language head.

Dataset names: the reference's PPT ``conditions`` ("ScanNet", "S3DIS", "Structured3D") map to
this project's "scannet", "s3dis", "structured3d" (:data:`CONDITION_DATASETS`); a single-dataset
model's dataset comes from its config's val (else train) dataset ``type`` (:data:`DATASET_TYPES`;
``ScanNet200Dataset`` is "scannet200"); class lists are checked against this project's (same
order; the reference's "refridgerator" spelling accepted).

PPT-v1m1's language head (shared by its SpUNet and PTv3 variants, :func:`language_head_to_ours`):
``logits = exp(logit_scale) * cos(proj_head(x), class_embedding[valid_index[condition]])``. A
converted model keeps the reference's FUNCTION: the text rows of each label space are the rows
the reference's ``valid_index`` table picks, in the dataset's label order, even where that table
is wrong. The reference's S3DIS row ``(0, 1, 4, 5, 6, 7, 8, 10, 19, 29, 30, 31, 32)`` lists
S3DIS's names in another order than S3DIS's labels (SPEC §1), so the converted S3DIS label space
scores "ceiling" points with the text of "wall", "wall" with "chair", and so on, exactly as the
reference was trained and evaluated. Fine-tuning here (``--weights``) re-embeds the class names
with the model's text encoder (``ppt.engine.weights``), which drops the quirk.
"""
from __future__ import annotations

import torch

from ppt.interop import ConversionError

DATASETS_KEY = "_ppt_datasets"
CONDITION_DATASETS = {"ScanNet": "scannet", "S3DIS": "s3dis", "Structured3D": "structured3d"}
DATASET_TYPES = {"ScanNetDataset": "scannet", "ScanNet200Dataset": "scannet200", "S3DISDataset": "s3dis",
                 "Structured3DDataset": "structured3d"}
NAME_ALIASES = {"refridgerator": "refrigerator"}  # the reference's ScanNet spelling
CLIP_ENCODERS = {"ViT-B/16": "clip:ViT-B-16:openai", "ViT-B/32": "clip:ViT-B-32:openai",
                 "ViT-L/14": "clip:ViT-L-14:openai"}
PRETRAIN_PREFIX = "student.backbone."


def dataset_of_condition(condition: str) -> str:
    """A reference PPT condition ("ScanNet") -> this project's dataset name ("scannet")."""
    if condition not in CONDITION_DATASETS:
        raise ConversionError(f"reference condition {condition!r} has no dataset here; known: "
                              f"{', '.join(CONDITION_DATASETS)}")
    return CONDITION_DATASETS[condition]


def condition_of_dataset(dataset: str) -> str:
    for cond, name in CONDITION_DATASETS.items():
        if name == dataset:
            return cond
    raise ConversionError(f"dataset {dataset!r} has no reference condition; known: {', '.join(CONDITION_DATASETS.values())}")


def datasets_of(model_cfg: dict) -> list[str]:
    """This project's dataset names of a reference model's domains, in prompt-table order:
    what the core put under :data:`DATASETS_KEY`, else PPT's ``conditions``."""
    if DATASETS_KEY in model_cfg:
        return list(model_cfg[DATASETS_KEY])
    if "conditions" in model_cfg:
        return [dataset_of_condition(c) for c in model_cfg["conditions"]]
    raise ConversionError("model config names no datasets (no PPT conditions and no data section)")


def backbone_type(model_cfg: dict) -> str:
    backbone = model_cfg.get("backbone")
    if not isinstance(backbone, dict) or "type" not in backbone:
        raise ConversionError("reference config key 'model.backbone.type' is missing")
    return backbone["type"]


# --- the language head of PPT-v1m1 -----------------------------------------------------------

def _take(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"checkpoint lacks reference key '{key}'")
    return state.pop(key)


def language_head_to_ours(state: dict, model_cfg: dict) -> dict:
    """Consume PPT-v1m1's own keys (``embedding_table``, ``proj_head``, ``class_embedding``,
    ``logit_scale``) from ``state``; return ``prompts.table.weight``, ``head.proj.*`` and one
    ``head.text_<dataset>`` (K_d, D) per domain (rows = ``class_embedding[valid_index[c]]``,
    the reference's rows in its order: see the module docstring on S3DIS)."""
    datasets = datasets_of(model_cfg)
    conditions = [dataset_of_condition(c) for c in model_cfg["conditions"]]
    valid_index = model_cfg["valid_index"]
    table = _take(state, "embedding_table.weight")
    emb = _take(state, "class_embedding")
    _take(state, "logit_scale")  # a config value here (model.logit_scale): see config_from_reference
    out = {"prompts.table.weight": torch.stack([table[conditions.index(d)] for d in datasets]),
           "head.proj.weight": _take(state, "proj_head.weight"), "head.proj.bias": _take(state, "proj_head.bias")}
    for d in datasets:
        rows = list(valid_index[conditions.index(d)])
        if max(rows) >= len(emb):
            raise ConversionError(f"valid_index of {d} picks row {max(rows)} of a {len(emb)}-row class_embedding")
        out[f"head.text_{d}"] = emb[rows].clone()
    return out


def language_head_to_pointcept(state: dict, model_cfg: dict) -> dict:
    """Inverse of :func:`language_head_to_ours` (consumes our head and prompt keys). Rows of
    ``class_embedding`` no ``valid_index`` entry picks are zero (never read by the reference);
    two label spaces that need different text in one shared row are an error."""
    datasets = datasets_of(model_cfg)
    conditions = [dataset_of_condition(c) for c in model_cfg["conditions"]]
    names = model_cfg["class_name"]
    table_ours = _take(state, "prompts.table.weight")
    proj_w, proj_b = _take(state, "head.proj.weight"), _take(state, "head.proj.bias")
    emb = torch.zeros(len(names), proj_w.shape[0])
    owner: dict[int, str] = {}
    for d in datasets:
        text = _take(state, f"head.text_{d}")
        rows = model_cfg["valid_index"][conditions.index(d)]
        if len(rows) != len(text):
            raise ConversionError(f"label space {d} has {len(text)} classes, the reference's valid_index row "
                                  f"for {condition_of_dataset(d)} has {len(rows)}")
        for k, row in enumerate(rows):
            if row in owner and not torch.allclose(emb[row], text[k], atol=1e-6):
                raise ConversionError(
                    f"class_embedding row {row} ({names[row]!r}) is shared by {owner[row]} and {d} class {k} "
                    f"in the reference's valid_index, but this model's text embeddings differ: the reference's "
                    f"shared table cannot hold them (give --config a Pointcept config whose valid_index fits)")
            emb[row], owner[row] = text[k], f"{d} class {k}"
    table = torch.stack([table_ours[datasets.index(dataset_of_condition(c))] for c in model_cfg["conditions"]])
    return {"embedding_table.weight": table, "proj_head.weight": proj_w, "proj_head.bias": proj_b,
            "class_embedding": emb}


# --- what a checkpoint looks like -------------------------------------------------------------

# --- which model a checkpoint holds -------------------------------------------------------------
# Key names that give a reference checkpoint's backbone away (its stem), and its head.
BACKBONE_SIGNS = (
    ("backbone.conv_input.0.", "SpUNet-v1m1", "stem conv_input.0 / .1: conv + BatchNorm"),
    ("backbone.conv_input.conv.", "SpUNet-v1m3", "stem conv_input.conv + PDNorm conv_input.bn"),
    ("backbone.embedding.stem.conv.", "PT-v3m1", "sparse-conv stem embedding.stem.conv + BatchNorm"),
    ("backbone.embedding.stem.linear.", "PT-v3m2", "Linear stem embedding.stem.linear + LayerNorm"),
)
OTHER_BACKBONES = (  # reference backbones this converter has no family for, by a key of theirs
    ("backbone.patch_embed.", "Point Transformer V2 (PT-v2m*, not supported)"),
)


def checkpoint_model_type(state: dict) -> tuple[str | None, str | None, str]:
    """(segmentor type, backbone type, the key names that say so) a reference state dict looks
    like, from its key names alone; a type is None where the keys do not tell (no head: an
    encoder, e.g. Sonata / Concerto pretraining)."""
    backbone, why = None, []
    for prefix, kind, what in BACKBONE_SIGNS:
        if any(k.startswith(prefix) for k in state):
            backbone = kind
            why.append(f"{prefix}* ({what})")
            break
    else:
        for prefix, kind in OTHER_BACKBONES:
            if any(k.startswith(prefix) for k in state):
                backbone = kind
                why.append(f"{prefix}*")
                break
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    segmentor = None
    if has("embedding_table.") and has("class_embedding"):
        segmentor, sign = "PPT-v1m1", "embedding_table + class_embedding (PPT language head)"
    elif has("embedding_table.") and has("seg_heads."):
        segmentor, sign = "PPT-v1m2", "embedding_table + seg_heads.* (PPT, one head per dataset)"
    elif has("proj_head.") and not has("embedding_table."):
        segmentor, sign = "PPT-v1m3", "proj_head without embedding_table (Sonata's language head)"
    elif has("seg_head."):
        segmentor, sign = "DefaultSegmentorV2", "seg_head.*"
    elif has("backbone.final."):
        segmentor, sign = "DefaultSegmentor", "backbone.final.* (SpUNet's classifier)"
    if segmentor:
        why.append(sign)
    return segmentor, backbone, "; ".join(why) or f"first keys {', '.join(sorted(state)[:3])}"


def _describe(segmentor: str | None, backbone: str | None) -> str:
    if backbone is None and segmentor is None:
        return "no model type the converter knows"
    return f"{backbone or 'an unknown backbone'} under {segmentor}" if segmentor else f"a {backbone} encoder (no head)"


def model_mismatch(state: dict, model_cfg: dict, source: str) -> str | None:
    """The message for a checkpoint whose key names say another model type than the config
    (backbone, or segmentor when it says one), else None."""
    segmentor, backbone, why = checkpoint_model_type(state)
    cfg_segmentor, cfg_backbone = model_cfg.get("type"), (model_cfg.get("backbone") or {}).get("type")
    if (backbone is None or backbone == cfg_backbone) and (segmentor is None or segmentor == cfg_segmentor):
        return None
    return (f"the checkpoint and --config do not match: the checkpoint looks like {_describe(segmentor, backbone)} "
            f"(keys {why}); the config ({source}) describes {cfg_backbone} under {cfg_segmentor} "
            f"(model.backbone.type, model.type). Pass the config the checkpoint was trained with")
