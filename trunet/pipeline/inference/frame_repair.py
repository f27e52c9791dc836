"""Repair of spoilt frames: frames whose segmentation breaks from their neighbours in time.

A cine frame can be spoilt on its own (a signal-dropout band, a mistriggered beat, a missing frame) while
the frames around it are clean, and the heart moves little from one frame to the next. A network, with or
without ConvLSTMs, may then segment the spoilt frame badly and *confidently* (a dropout band looks like
background), so neither its confidence nor a blur over time finds it: a Gaussian filter over time pulls every
frame towards its neighbours, the spoilt ones a little and end-systole (the smallest cavity, between
larger ones) as much, which costs the ejection fraction (BENCHMARKS.md, "Time").

What this does instead, on the probabilities of a whole series ``(T, K, X, Y, Z)``:

1. **Find** the frames that disagree with the series: frame ``t``'s labels (arg-max) are compared, by
   mean Dice over the foreground classes, with the labels of each of the frames ``t - HALF_WINDOW ..
   t + HALF_WINDOW`` (cyclic: a cine is one heartbeat), and its agreement is the **second-best** of those
   Dice values. In the first and the last slice (along ``Z``, the short axis) that either frame has
   foreground in, what frame ``t`` holds beyond its neighbour is not counted against it, what it lacks is:
   the base moves through a thick slice over the cycle, so end-diastole can hold a basal slice of
   ventricle that the frames beside it barely hold, and that is no spoilt frame (``trunet predict``
   therefore judges the frames on the scan's own slices, not the model's grid).
   A clean frame resembles at least two of its neighbours, end-diastole and end-systole
   included (the heart turns slowly at its extremes); a spoilt frame resembles none of the clean ones, and
   at most one spoilt frame beside it (two blank frames agree perfectly). A frame is flagged when its
   agreement lies below ``median(agreement) - max(3 * MAD, min_drop)`` over the series; then the
   agreements are computed again with the flagged frames left out of the other frames' neighbours (a clean
   frame between two spoilt ones is then judged against clean ones, a frame beside a flagged one by its
   best Dice), and the threshold again from the agreements of the frames not flagged, until the flags no
   longer change. Re-estimating the threshold (iterative outlier rejection) matters where many frames are
   spoilt: their low agreements, and those of the clean frames beside them, widen the first round's
   spread, so a partly spoilt frame (a dropout band across part of the heart) stays above a threshold
   that the clean frames alone would put above it.
2. **Repair** each flagged frame: its probabilities become the linear interpolation in time between the
   nearest unflagged frames before and after it (cyclic). Unflagged frames are left exactly as they are,
   so end-systole and end-diastole keep their own segmentation unless they are themselves spoilt.

``min_drop`` (``infer.repair_min_drop``, 0.1 Dice by default) keeps mild defects in place: a frame is only
replaced when its mask differs from its neighbours' by clearly more than the heart's own motion does.
If more than half of the frames end up flagged, nothing is repaired (the series is not a cine with a few
spoilt frames) and a warning says so. A series of fewer than ``2 * HALF_WINDOW + 1`` frames (an ED/ES pair)
is returned as it is.

Written by hand: neither MONAI nor SimpleITK has outlier detection over the time axis of a segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["HALF_WINDOW", "FrameRepair", "repair_spoilt_frames"]

HALF_WINDOW = 2
"""Frames on each side of a frame that it is compared with (4 neighbours: 2 spoilt among them still leave 2)."""

_MAD_SCALE = 1.4826  # MAD -> standard deviation for normally distributed agreements
_MAD_FACTOR = 3.0
_MAX_ROUNDS = 5


@dataclass
class FrameRepair:
    """What :func:`repair_spoilt_frames` found: the flagged frames and every frame's agreement."""

    frames: list[int] = field(default_factory=list)
    """Indices of the repaired frames (empty: none)."""
    agreement: list[float] = field(default_factory=list)
    """Per frame: the second-best mean foreground Dice of its labels with its neighbours' (last round)."""
    threshold: float = float("nan")
    """Agreement below which a frame was flagged."""
    skipped: str = ""
    """Why nothing was repaired although frames were flagged (empty otherwise)."""


def _foreground_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either label map (1.0 when none is).

    Symmetric, as neither map is the reference here (MONAI's ``compute_dice`` with ``ignore_empty`` skips a
    class by the second map alone), and on label maps without a one-hot copy of either."""
    scores = []
    for c in range(1, num_classes):
        x, y = a == c, b == c
        total = int(x.sum()) + int(y.sum())
        if total:
            scores.append(2.0 * int(np.logical_and(x, y).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def _forgiving_end_slices(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A copy of label map ``a`` ``(X, Y, Z)`` without its foreground that ``b`` lacks in the first and the
    last slice along ``Z`` that either has foreground in (``a`` itself when they span fewer than 3 slices).

    Short-axis slices are thick (5-10 mm) and the base moves through them over the cycle: end-diastole can
    hold a whole basal slice of ventricle of which the frames beside it hold a sliver. That is the heart's
    motion, not a spoilt frame, yet it alone can cost a clean end-diastole more Dice than ``min_drop``
    (BENCHMARKS.md, "Spoilt-frame repair at the base"). So when frame ``a`` is judged against ``b``, what
    ``a`` holds *beyond* ``b`` in the two end slices of their joint extent is not held against it; what it
    *lacks* there still is: a network segments a mistriggered, displaced basal slice as a sliver of its
    neighbours', and that frame must still disagree.
    Every slice between counts in full. A joint extent of fewer than 3 slices is left whole.
    """
    extent = np.flatnonzero(np.logical_or(a > 0, b > 0).any(axis=(0, 1)))
    if extent.size < 3:
        return a
    a = a.copy()
    for z in (extent[0], extent[-1]):
        a[..., z] = np.where(a[..., z] == b[..., z], a[..., z], 0)
    return a


def _neighbours(num_frames: int, t: int, flagged: np.ndarray) -> tuple[int, ...]:
    """Frame ``t``'s unflagged neighbours within ``HALF_WINDOW`` frames (cyclic), the window widened until it
    holds at least 2 of them (or spans the series)."""
    half = HALF_WINDOW
    while True:
        members = tuple(sorted({s % num_frames for s in range(t - half, t + half + 1)
                                if s % num_frames != t and not flagged[s % num_frames]}))
        if len(members) >= 2 or 2 * half + 1 >= num_frames:
            return members
        half += 1


class _Agreement:
    """Each frame's agreement with its neighbours: the second-best Dice of its labels with theirs.

    A clean frame resembles at least two of the frames around it, end-diastole and end-systole included
    (the heart turns slowly there, so both neighbours are close); a spoilt frame resembles none of the clean
    ones, and a second spoilt frame beside it (two blank frames agree perfectly) is only one of them. A frame
    beside a flagged one is judged by its **best** Dice instead: it has lost one of its two nearest witnesses,
    and the second-best of the rest is a frame two or more steps away, which the heart's own motion already
    sets apart (without this, clean frames beside a repaired gap were flagged in turn).
    Pairwise Dice values are cached across rounds.
    """

    def __init__(self, labels: np.ndarray, num_classes: int):
        self.labels = labels
        self.num_classes = num_classes
        self._pairs: dict[tuple[int, int], float] = {}

    def _dice(self, t: int, s: int) -> float:
        """How well frame ``t`` agrees with frame ``s`` (not symmetric: see :func:`_forgiving_end_slices`)."""
        if (t, s) not in self._pairs:
            a = _forgiving_end_slices(self.labels[t], self.labels[s])
            self._pairs[(t, s)] = _foreground_dice(a, self.labels[s], self.num_classes)
        return self._pairs[(t, s)]

    def __call__(self, flagged: np.ndarray) -> np.ndarray:
        num_frames = self.labels.shape[0]
        values = np.ones(num_frames)
        for t in range(num_frames):
            scores = sorted((self._dice(t, s) for s in _neighbours(num_frames, t, flagged)), reverse=True)
            beside_flagged = flagged[(t - 1) % num_frames] or flagged[(t + 1) % num_frames]
            if scores:
                values[t] = scores[1] if len(scores) > 1 and not beside_flagged else scores[0]
        return values


def _interpolate(probs: np.ndarray, t: int, good: np.ndarray) -> np.ndarray:
    """Frame ``t`` linearly interpolated in time between the nearest good frames before and after it (cyclic)."""
    num_frames = probs.shape[0]
    after = (good - t) % num_frames
    before = (t - good) % num_frames
    nxt, d_next = good[np.argmin(after)], int(after.min())
    prv, d_prev = good[np.argmin(before)], int(before.min())
    return (d_next * probs[prv] + d_prev * probs[nxt]) / (d_next + d_prev)


def _threshold(agreement: np.ndarray, min_drop: float) -> float:
    """``median - max(3 * MAD, min_drop)`` of the agreements of the frames not (yet) flagged."""
    median = float(np.median(agreement))
    mad = _MAD_SCALE * float(np.median(np.abs(agreement - median)))
    return median - max(_MAD_FACTOR * mad, min_drop)


def repair_spoilt_frames(probabilities: torch.Tensor, min_drop: float = 0.1) -> tuple[torch.Tensor, FrameRepair]:
    """Find the frames whose segmentation breaks from their neighbours and interpolate them from clean ones.

    Args:
        probabilities: class probabilities of one series ``(T, K, X, Y, Z)`` (float; summing to 1 over ``K``).
        min_drop: the least drop in agreement below the series' median agreement for a frame to be
            flagged (Dice; the threshold is ``median - max(3 * MAD, min_drop)``).

    Returns:
        ``(probabilities, report)``: the series with the flagged frames replaced (a new tensor, same shape,
        dtype and device; the input is returned unchanged when nothing is repaired), and what was found.
    """
    if probabilities.dim() != 5:
        raise ValueError(f"probabilities must be (T, K, X, Y, Z), got shape {tuple(probabilities.shape)}")
    if not min_drop > 0:
        raise ValueError(f"min_drop must be positive, got {min_drop}")
    num_frames = probabilities.shape[0]
    if num_frames < 2 * HALF_WINDOW + 1:
        return probabilities, FrameRepair()  # too short to compare a frame with a window around it
    probs = probabilities.detach().float().cpu().numpy()
    agreements = _Agreement(probs.argmax(1), probs.shape[1])
    flagged = np.zeros(num_frames, dtype=bool)
    agreement = agreements(flagged)
    for _ in range(_MAX_ROUNDS):
        threshold = _threshold(agreement[~flagged], min_drop)
        new = agreement < threshold
        if np.array_equal(new, flagged):
            break
        flagged = new
        agreement = agreements(flagged)
    report = FrameRepair(frames=np.flatnonzero(flagged).tolist(), agreement=agreement.round(4).tolist(),
                         threshold=round(threshold, 4))
    if not report.frames:
        return probabilities, report
    if 2 * len(report.frames) > num_frames:
        report.skipped = (f"{len(report.frames)} of {num_frames} frames disagree with their neighbours: "
                          "not a cine with a few spoilt frames, left as segmented")
        report.frames = []
        return probabilities, report
    good = np.flatnonzero(~flagged)
    repaired = probs.copy()
    for t in report.frames:
        repaired[t] = _interpolate(probs, t, good)
    return torch.from_numpy(repaired).to(dtype=probabilities.dtype, device=probabilities.device), report
