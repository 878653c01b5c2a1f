"""PPT: Point Prompt Training for multi-dataset 3D semantic segmentation on a SparseUNet.

``ppt.predict(points, exp="exp/demo")`` and ``ppt.Predictor`` (``ppt.engine.predict``) label
your own point clouds; they are imported on first use, so ``import ppt`` stays cheap (no torch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Predictor", "predict"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from ppt.engine.predict import Predictor, predict


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: torch and spconv load only when the predictor is asked for.
    if name in __all__:
        from ppt.engine import predict as module

        return getattr(module, name)
    raise AttributeError(f"module 'ppt' has no attribute {name!r}")
