"""Mixed precision: the one decision of the autocast dtype, shared by training, inference and planning."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["autocast_dtype", "autocast", "cpu_has_fast_bf16", "cuda_has_native_bf16"]


def autocast_dtype(device: torch.device | str, amp: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 where the device supports it (CPU included), else fp16; None = AMP off."""
    device = torch.device(device)
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16 if torch.amp.autocast_mode.is_autocast_available(device.type) else None


def cuda_has_native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether the CUDA device computes bf16 natively (compute capability 8.0 and up: A100, H100, L4...).

    ``torch.cuda.is_bf16_supported()`` alone also says yes where bf16 is only emulated (V100, T4: slower
    than fp16 and without its tensor cores), so emulation is excluded; those GPUs take fp16 with the
    GradScaler.
    """
    index = None if device is None else torch.device(device).index
    with contextlib.nullcontext() if index is None else torch.cuda.device(index):  # None: the current device
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device: torch.device | str, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 convolutions
    several times faster than float32; elsewhere bf16 is emulated and slower, so inference stays float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in checks if hasattr(torch.cpu, name))
    except RuntimeError:  # an unusual build without the CPU capability probes
        return False
