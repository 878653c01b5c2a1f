"""Class-name embeddings: cache, real offline encoder, CLIP failure mode, embed_classes tool."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

import ppt.text as text
from ppt.data.classes import S3DIS13

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def counting_encoder(monkeypatch):
    """Replace the real encoder by a deterministic fake that counts its calls."""
    calls = []

    def fake(encoder, texts, device):
        calls.append(list(texts))
        g = torch.Generator().manual_seed(len(calls))
        return torch.randn(len(texts), 8, generator=g) * 3.0

    monkeypatch.setattr(text, "_encode_texts", fake)
    return calls


def test_cache_hit_on_second_call(tmp_path, counting_encoder):
    names = ["chair", "wall", "floor"]
    first = text.class_embeddings(names, cache_dir=tmp_path)
    assert first.shape == (3, 8) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=1), torch.ones(3))
    assert counting_encoder == [["a point of chair", "a point of wall", "a point of floor"]]
    second = text.class_embeddings(names, cache_dir=tmp_path)
    assert len(counting_encoder) == 1 and torch.equal(first, second)
    assert len(list(tmp_path.iterdir())) == 1  # no temp files left behind
    # any change of template or class list (order included) is a new cache entry
    text.class_embeddings(names, template="{}", cache_dir=tmp_path)
    text.class_embeddings(names[::-1], cache_dir=tmp_path)
    assert len(counting_encoder) == 3 and counting_encoder[1][0] == "chair"


def test_input_errors(tmp_path, counting_encoder):
    with pytest.raises(ValueError, match="minilm"):
        text.class_embeddings(["a"], encoder="bert", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        text.class_embeddings(["a"], template="a point", cache_dir=tmp_path)
    path = tmp_path / "emb.pt"
    text.save_embeddings(path, torch.eye(2), ["a", "b"], "minilm", "{}")
    assert torch.equal(text.load_embeddings(path, ["a", "b"]), torch.eye(2))
    with pytest.raises(ValueError, match="expected"):
        text.load_embeddings(path, ["b", "a"])
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.pt"):
        text.load_embeddings(tmp_path / "junk.pt")
    assert counting_encoder == []


def test_minilm_embeddings_are_real(tmp_path):
    emb = text.class_embeddings(["chair", "sofa", "wall", "chair"], encoder="minilm", cache_dir=tmp_path)
    assert emb.shape == (4, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = emb @ emb.t()
    assert sim[0, 1] > sim[0, 2]  # chair is closer to sofa than to wall
    assert torch.allclose(emb[0], emb[3], atol=1e-5)  # same text, same vector


def test_clip_unreachable_fails_fast_with_advice(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    local, _, _ = text._local_clip_weights("ViT-B-16", "openai", None)
    if local is not None:
        pytest.skip("CLIP weights are cached on this machine")
    monkeypatch.setattr(text, "_host_reachable", lambda host: False)  # as without network
    text._clip.cache_clear()
    start = time.monotonic()
    with pytest.raises(text.TextEncoderUnavailable) as err:
        text.class_embeddings(["chair"], encoder="clip:ViT-B-16:openai", cache_dir=tmp_path)
    assert time.monotonic() - start < 30
    message = str(err.value)
    for advice in ("clip:ViT-B-16-quickgelu:/path/to/checkpoint", "tools/embed_classes.py", "'minilm'",
                   str(tmp_path)):
        assert advice in message
    assert not list(tmp_path.iterdir())  # nothing cached, no random vectors
    with pytest.raises(ValueError, match="tags"):
        text.class_embeddings(["chair"], encoder="clip:ViT-B-16:nonsense-tag", cache_dir=tmp_path)


def test_embed_classes_tool(tmp_path, counting_encoder, capsys):
    spec = importlib.util.spec_from_file_location("embed_classes", ROOT / "tools" / "embed_classes.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "s3dis.pt"
    assert tool.main(["--dataset", "s3dis", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "shape (13, 8)" in printed and "ceiling" in printed
    emb = text.load_embeddings(out, S3DIS13)  # right classes, right order
    assert emb.shape == (13, 8)
    assert tool.main(["--dataset", "nuscenes", "--cache-dir", str(tmp_path), "--data-root", str(tmp_path)]) == 2
    assert "unknown dataset 'nuscenes': not built in" in capsys.readouterr().err
    assert tool.main(["--classes", "a, b ,c", "--cache-dir", str(tmp_path)]) == 0
    assert counting_encoder[-1] == ["a point of a", "a point of b", "a point of c"]


@pytest.fixture
def weightless_clip(monkeypatch):
    """Let ``ppt.text`` build real open_clip architectures without any weights.

    ``open_clip.create_model`` is wrapped: ``pretrained`` is recorded and dropped (nothing is
    read or downloaded), everything else (model name, ``force_quick_gelu``) reaches open_clip's
    own config logic unchanged. Builds are memoised per (name, flag): ViT-B-16 takes ~1 s.
    """
    open_clip = pytest.importorskip("open_clip")
    real = open_clip.create_model
    built, calls = {}, []

    def create_model(model_name, pretrained=None, **kwargs):
        calls.append((model_name, pretrained, kwargs.get("force_quick_gelu", False)))
        key = (model_name, kwargs.get("force_quick_gelu", False))
        if key not in built:
            start = time.monotonic()
            built[key] = real(model_name, pretrained=None, **kwargs)
            if time.monotonic() - start > 20:
                pytest.skip("building ViT-B-16 takes over 20 s on this machine")
        return built[key]

    monkeypatch.setattr(open_clip, "create_model", create_model)
    text._clip.cache_clear()
    yield calls
    text._clip.cache_clear()


def text_activation(model) -> type:
    """Class of the MLP activation of the text tower's first and last residual blocks (one class)."""
    blocks = model.transformer.resblocks
    kinds = {type(blocks[0].mlp.gelu), type(blocks[-1].mlp.gelu)}
    assert len(kinds) == 1
    return kinds.pop()


def test_every_clip_weights_path_builds_quickgelu_for_openai_weights(tmp_path, monkeypatch, weightless_clip):
    from open_clip.transformer import QuickGELU

    # (1) the checkpoint file, named as OpenAI publishes it, and an unrecognised name
    openai_file, other_file = tmp_path / "ViT-B-16.pt", tmp_path / "my_clip.bin"
    for f in (openai_file, other_file):
        f.write_bytes(b"stand-in")
    # (2) the tag, its weights found in a local cache; (3) the tag, downloaded
    cached = tmp_path / "cached.safetensors"
    monkeypatch.setattr(text, "_local_clip_weights", lambda m, t, c: (str(cached), {}, []))
    paths = {"file": f"clip:ViT-B-16:{openai_file}", "unnamed file": f"clip:ViT-B-16:{other_file}",
             "cached tag": "clip:ViT-B-16:openai"}
    for what, encoder in paths.items():
        text._clip.cache_clear()
        model, _ = text._clip(encoder, "cpu")
        assert text_activation(model) is QuickGELU, what
    monkeypatch.setattr(text, "_local_clip_weights", lambda m, t, c: (None, {"hf_hub": "org/x/"}, []))
    monkeypatch.setattr(text, "_host_reachable", lambda host: True)
    text._clip.cache_clear()
    model, _ = text._clip("clip:ViT-B-16:openai", "cpu")
    assert text_activation(model) is QuickGELU, "downloaded tag"
    assert [c[1] for c in weightless_clip] == [str(openai_file), str(other_file), str(cached), "openai"]
    assert all(c[2] for c in weightless_clip)


def test_gelu_weights_keep_gelu(tmp_path, monkeypatch, weightless_clip):
    """Control: the switch follows the weights, it is not QuickGELU everywhere."""
    laion = tmp_path / "vit_b_16-laion400m_e31-00efa78f.pt"  # open_clip's download name of a GELU tag
    laion.write_bytes(b"stand-in")
    monkeypatch.setattr(text, "_local_clip_weights", lambda m, t, c: (str(laion), {}, []))
    for encoder in (f"clip:ViT-B-16:{laion}", "clip:ViT-B-16:laion400m_e31"):
        text._clip.cache_clear()
        model, _ = text._clip(encoder, "cpu")
        assert text_activation(model) is torch.nn.GELU, encoder


def test_activation_is_part_of_the_cache_key(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    names = ["chair", "wall"]
    encoder = "clip:ViT-B-16:openai"
    assert text.clip_spec(encoder).quick_gelu and "quickgelu" in text.weights_identity(encoder)
    assert not text.clip_spec("clip:ViT-B-16:laion400m_e31").quick_gelu
    quick = text.cache_path(names, encoder, "{}", tmp_path)
    real_spec = text.clip_spec
    monkeypatch.setattr(text, "clip_spec", lambda e: text.ClipSpec(**{**real_spec(e).__dict__, "quick_gelu": False}))
    assert text.cache_path(names, encoder, "{}", tmp_path) != quick  # same weights, other activation
