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
    assert tool.main(["--dataset", "scannet200", "--cache-dir", str(tmp_path)]) == 2
    assert "valid names" in capsys.readouterr().err
    assert tool.main(["--classes", "a, b ,c", "--cache-dir", str(tmp_path)]) == 0
    assert counting_encoder[-1] == ["a point of a", "a point of b", "a point of c"]
