"""Mixed-precision policy of training: autocast dtype and loss scaling per device.

CUDA with ``train.amp``: bf16 autocast where supported, else fp16, with a GradScaler in both
cases (:func:`amp_policy` says why). CPU: fp32, autocast and scaler disabled (same calls).
"""
from __future__ import annotations

import torch


def amp_policy(device_type: str, enabled: bool, bf16_supported: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, loss scaling on?) for ``train.amp`` on a device.

    CUDA: bf16 autocast where supported, else fp16 — and loss scaling in BOTH cases. bf16
    alone would not need it, but spconv casts its convolutions to fp16 under any CUDA autocast,
    so their input gradients are fp16: unscaled, most of them fall below fp16's smallest normal
    (measured at initialisation on 40k voxels: 81 % subnormal, 4.6 % flushed to zero). The
    scaler costs one multiply and skips the rare overflow step. CPU: fp32, no scaler.
    """
    if not enabled or device_type != "cuda":
        return None, False
    return (torch.bfloat16 if bf16_supported else torch.float16), True


def amp_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """(autocast dtype or None, GradScaler) for ``device`` (:func:`amp_policy`)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype, scale = amp_policy(device.type, enabled, bf16)
    return dtype, torch.amp.GradScaler(device.type, enabled=scale)


def amp_description(device: torch.device, amp_dtype: torch.dtype | None, scaler) -> str:
    """"amp off (CPU)", "amp bf16 + loss scaling", ... for the start line."""
    if amp_dtype is None:
        return "amp off (CPU)" if device.type == "cpu" else "amp off"
    return f"amp {str(amp_dtype).removeprefix('torch.')}" + (" + loss scaling" if scaler.is_enabled() else "")
