"""Load single modules of the reference (Pointcept) from a local checkout, for parity benches.

``import pointcept.models`` runs every model family's ``__init__`` and with them CUDA-only
extensions (pointops, MinkowskiEngine, torch_scatter, flash_attn, ...). This module imports
only the files a parity check needs:

* every package under ``<checkout>/pointcept`` is put into ``sys.modules`` as an empty package
  whose ``__path__`` is the real folder, so its ``__init__.py`` never runs but its files import
  as usual (``pointcept.models.utils`` and ``pointcept.models.losses`` keep their real
  ``__init__``: they need only torch);
* packages the reference files import but this machine lacks get small stand-ins, installed
  only when the real package is absent: ``torch_scatter`` (``segment_csr``, ``segment_coo``,
  ``scatter`` with sum / mean / min / max, written with torch), ``torch_geometric.utils.scatter``,
  ``torch_cluster`` and ``pointops`` (attribute access raises: no model checked here calls
  them), ``peft`` (``LoraConfig`` / ``get_peft_model`` raise), ``clip`` (see below), and
  ``flash_attn`` is made unimportable so the reference takes its non-flash attention path;
* ``pointcept.engines.hooks`` is replaced by a stub holding ``HookBase`` (the real one pulls in
  the trainer, tensorboard and wandb).

The reference's registries are the real ones (``pointcept.utils.registry``): :func:`build`
imports the files that register the requested ``type`` names, then calls
``pointcept.models.builder.build_model`` on the config wrapped in ``addict.Dict`` (as
Pointcept's ``Config`` does: PPT reads ``backbone.type`` as an attribute).

The ``clip`` stand-in: PPT-v1m1 loads CLIP in its constructor. ``clip.load`` returns a tiny
object whose ``encode_text`` gives a fixed pseudo-random (K, ``CLIP_DIM``) embedding per class
name (seeded by the name, so the same name always gets the same vector), whose
``text_projection`` has width ``CLIP_DIM`` and whose ``logit_scale`` is ln(100), the value of
the released CLIP ViT-B/16. The parity check needs the reference's function, not CLIP's text.

Used by ``bench/pointcept_parity.py`` and ``bench/pointcept_parity_ptv3.py``; bench only:
``ppt/`` never imports the reference. Needs ``timm`` and ``addict`` (``pip install addict``
into .venv; not in requirements.txt).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
import zlib
from pathlib import Path

import torch
import torch.nn as nn

CLIP_DIM = 512  # CLIP ViT-B/16 text width

# reference ``type`` name -> module (relative to pointcept.models) that registers it
TYPE_MODULES = {
    "DefaultSegmentor": "default",
    "DefaultSegmentorV2": "default",
    "SpUNet-v1m1": "sparse_unet.spconv_unet_v1m1_base",
    "SpUNet-v1m3": "sparse_unet.spconv_unet_v1m3_pdnorm",
    "PPT-v1m1": "point_prompt_training.point_prompt_training_v1m1_language_guided",
    "PPT-v1m2": "point_prompt_training.point_prompt_training_v1m2_decoupled",
    "PPT-v1m3": "point_prompt_training.point_prompt_training_v1m3_neo",
    "PT-v3m1": "point_transformer_v3.point_transformer_v3m1_base",
    "PT-v3m2": "point_transformer_v3.point_transformer_v3m2_sonata",
}
REAL_INIT_PACKAGES = ("pointcept.models.utils", "pointcept.models.losses",
                      "pointcept.models.utils.serialization")

_loaded_from: Path | None = None


# --- stand-ins for packages this machine lacks ---------------------------------------------

def _reduce_sorted(src: torch.Tensor, index: torch.Tensor, size: int, reduce: str) -> torch.Tensor:
    """Reduce rows of ``src`` (N, ...) into ``size`` groups given by ``index`` (N,)."""
    shape = (size, *src.shape[1:])
    idx = index.long().view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    if reduce in ("sum", "add"):
        return src.new_zeros(shape).scatter_add_(0, idx, src)
    if reduce == "mean":
        total = src.new_zeros(shape).scatter_add_(0, idx, src)
        count = torch.bincount(index.long(), minlength=size).clamp_min(1).to(src.dtype)
        return total / count.view(-1, *([1] * (src.dim() - 1)))
    if reduce in ("min", "max"):
        out = src.new_zeros(shape).scatter_reduce_(0, idx, src, "amin" if reduce == "min" else "amax",
                                                   include_self=False)
        return out
    raise ValueError(f"unsupported reduce {reduce!r}")


def _segment_csr(src, indptr, out=None, reduce="sum"):
    counts = torch.diff(indptr.long())
    index = torch.repeat_interleave(torch.arange(len(counts), device=src.device), counts)
    return _reduce_sorted(src[: int(indptr[-1])], index, len(counts), reduce)


def _segment_coo(src, index, out=None, dim_size=None, reduce="sum"):
    size = dim_size if dim_size is not None else int(index.max()) + 1 if index.numel() else 0
    return _reduce_sorted(src, index, size, reduce)


def _scatter(src, index, dim=0, out=None, dim_size=None, reduce="sum"):
    if dim not in (0, -src.dim()):
        raise NotImplementedError("the torch_scatter stand-in reduces along dim 0 only")
    return _segment_coo(src, index, dim_size=dim_size, reduce=reduce)


class _Absent(types.ModuleType):
    """A module that exists for ``import`` but raises when any of its functions is used."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name} is not available in the parity bench "
                           f"(stand-in for a CUDA extension)")


class _FakeClipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_projection = nn.Parameter(torch.zeros(CLIP_DIM, CLIP_DIM))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            rows.append(torch.randn(CLIP_DIM, generator=g))
        return torch.stack(rows)


def _install_stubs() -> None:
    bench_dir = str(Path(__file__).resolve().parent)

    def absent_or(name: str) -> bool:
        """True when no real package ``name`` is installed (a script run from bench/ puts bench/
        first on sys.path, where bench/peft.py would pass for the ``peft`` package)."""
        if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")).startswith(bench_dir):
            return False
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return True
        return spec is None or str(spec.origin or "").startswith(bench_dir)

    if absent_or("torch_scatter"):
        m = types.ModuleType("torch_scatter")
        m.segment_csr, m.segment_coo, m.scatter = _segment_csr, _segment_coo, _scatter
        sys.modules["torch_scatter"] = m
    if absent_or("torch_geometric"):
        tg, tgu = types.ModuleType("torch_geometric"), types.ModuleType("torch_geometric.utils")
        tgu.scatter = lambda src, index, dim=0, dim_size=None, reduce="sum": _scatter(
            src, index, dim=dim, dim_size=dim_size, reduce=reduce)
        tg.utils = tgu
        sys.modules.update({"torch_geometric": tg, "torch_geometric.utils": tgu})
    for name in ("torch_cluster", "pointops"):
        if absent_or(name):
            sys.modules[name] = _Absent(name)
    if absent_or("flash_attn"):
        sys.modules["flash_attn"] = None  # "import flash_attn" raises ImportError: non-flash path
    if absent_or("peft"):
        peft = types.ModuleType("peft")

        def unavailable(*args, **kwargs):
            raise RuntimeError("peft is not installed (LoRA models are not checked by the parity bench)")

        peft.LoraConfig = peft.get_peft_model = unavailable
        sys.modules["peft"] = peft
    if absent_or("clip"):
        clip = types.ModuleType("clip")
        clip.load = lambda name, device="cpu", download_root=None: (_FakeClipModel(), None)
        clip.tokenize = lambda texts: list(texts)
        sys.modules["clip"] = clip


def _hooks_stub() -> types.ModuleType:
    hooks = types.ModuleType("pointcept.engines.hooks")

    class HookBase:  # what pointcept.models.modules needs of the real one
        trainer = None

    hooks.HookBase = HookBase
    return hooks


# --- the reference tree -----------------------------------------------------------------------

def setup(pointcept_dir: str | Path) -> Path:
    """Make ``pointcept.*`` importable from ``pointcept_dir`` without running package inits.

    Raises:
        FileNotFoundError: ``pointcept_dir`` has no ``pointcept/models`` folder.
        RuntimeError: another checkout was set up before in this process.
    """
    global _loaded_from
    root = Path(pointcept_dir).resolve()
    if not (root / "pointcept" / "models").is_dir():
        raise FileNotFoundError(f"{pointcept_dir} is not a Pointcept checkout (no pointcept/models folder)")
    if _loaded_from is not None:
        if _loaded_from != root:
            raise RuntimeError(f"reference already loaded from {_loaded_from}; one checkout per process")
        return root
    _install_stubs()
    for init in sorted((root / "pointcept").rglob("__init__.py")):
        folder = init.parent
        name = ".".join(folder.relative_to(root).parts)
        if name in REAL_INIT_PACKAGES or name in sys.modules:
            continue
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        pkg.__file__ = str(init)
        pkg.__package__ = name
        sys.modules[name] = pkg
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, pkg)
    hooks = _hooks_stub()
    sys.modules["pointcept.engines.hooks"] = hooks
    sys.modules["pointcept.engines"].hooks = hooks
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # real-init packages (utils, losses) import by path
    _loaded_from = root
    # names other reference files import from stubbed package inits
    ppt_pkg = sys.modules["pointcept.models.point_prompt_training"]
    ppt_pkg.PDNorm = module("prompt_driven_normalization", "point_prompt_training").PDNorm
    models_pkg = sys.modules["pointcept.models"]
    models_pkg.build_model = module("builder").build_model
    return root


def module(name: str, package: str = "") -> types.ModuleType:
    """Import ``pointcept.models.<package>.<name>`` (after :func:`setup`)."""
    if _loaded_from is None:
        raise RuntimeError("call bench.pointcept_ref.setup(DIR) first")
    dotted = ".".join(p for p in ("pointcept.models", package, name) if p)
    return importlib.import_module(dotted)


def register(types_: list[str] | tuple[str, ...]) -> None:
    """Import the files that register these reference ``type`` names."""
    for t in types_:
        if t not in TYPE_MODULES:
            raise KeyError(f"no reference module known for type {t!r}; known: {', '.join(TYPE_MODULES)}")
        module(TYPE_MODULES[t])


def _types_in(cfg) -> list[str]:
    found = []
    if isinstance(cfg, dict):
        if isinstance(cfg.get("type"), str) and cfg["type"] in TYPE_MODULES:
            found.append(cfg["type"])
        for v in cfg.values():
            found += _types_in(v)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            found += _types_in(v)
    return found


def build(pointcept_dir: str | Path, model_cfg: dict) -> nn.Module:
    """Build the reference model of a config's ``model`` dict (random init, as Pointcept does).

    Every model ``type`` in the dict (model, backbone) is registered first; criteria come from
    the real loss registry.
    """
    from copy import deepcopy

    setup(pointcept_dir)
    register(_types_in(model_cfg))
    from addict import Dict

    return module("builder").build_model(Dict(deepcopy(model_cfg)))


def native_convs(model: nn.Module) -> nn.Module:
    """Set every spconv layer of ``model`` to ``ConvAlgo.Native``: spconv's default implicit-GEMM
    algorithm runs on CUDA only, and this project's SpUNet uses Native on the CPU too."""
    from spconv.core import ConvAlgo
    from spconv.pytorch.conv import SparseConvolution

    for m in model.modules():
        if isinstance(m, SparseConvolution):
            m.algo = ConvAlgo.Native
    return model
