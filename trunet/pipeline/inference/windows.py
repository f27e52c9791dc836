"""Time windows: how a series longer than one pass is cut into overlapping windows and blended back
(the scheme is described in :mod:`trunet.pipeline.inference`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TimeWindow", "time_windows"]


@dataclass(frozen=True)
class TimeWindow:
    """Frames ``start:stop`` of a series go through the model together; ``weights`` ``(stop - start,)``
    say how much each frame's output counts when windows are blended (0 = context only)."""

    start: int
    stop: int
    weights: Tensor


def time_windows(num_frames: int, window: Optional[int], context: int, causal: bool = True) -> list[TimeWindow]:
    """Cut ``num_frames`` frames into overlapping time windows (scheme in the module docstring).

    Args:
        num_frames: ``T``.
        window: frames per window ``W``; ``None`` or ``0`` = the whole series in one window.
        context: frames shared by consecutive windows ``c`` (clipped to ``W - 1``).
        causal: the model's output at frame ``t`` depends on frames ``<= t`` only.

    Returns:
        Windows in time order whose nonzero weights cover every frame.
    """
    if num_frames < 1:
        raise ValueError(f"a series needs at least one frame, got {num_frames}")
    if not window or window >= num_frames:
        return [TimeWindow(0, num_frames, torch.ones(num_frames))]
    if window < 1:
        raise ValueError(f"time window must be positive or None, got {window}")
    context = max(0, min(int(context), window - 1))
    count = math.ceil((num_frames - window) / (window - context)) + 1  # fewest windows sharing >= c frames
    starts = [round(k * (num_frames - window) / (count - 1)) for k in range(count)]  # spread evenly
    out = []
    for k, start in enumerate(starts):
        weights = torch.ones(window)
        head = starts[k - 1] + window - start if k > 0 else 0  # frames shared with the previous window
        tail = start + window - starts[k + 1] if k + 1 < len(starts) else 0  # ... with the next one
        if causal:
            weights[:head] = 0.0  # warm-up: the previous window saw these frames with more history
        else:
            if head:
                weights[:head] = torch.arange(1, head + 1, dtype=torch.float32) / (head + 1)
            if tail:
                weights[-tail:] = torch.minimum(weights[-tail:], torch.arange(tail, 0, -1, dtype=torch.float32) / (tail + 1))
        out.append(TimeWindow(start, start + window, weights))
    return out
