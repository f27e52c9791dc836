"""Frame corruptions of cine MRI: what a single frame of a real cine can suffer, as array functions.

A cine is acquired over many heartbeats, so one frame (or one slice of it) can be spoilt while its
neighbours in time are fine. These functions model the common cases on one frame ``(X, Y, Z)`` (``Z`` the
slice axis), with sizes in mm so that the same corruption means the same thing on a 1.5 mm scan and on a
3 mm training patch:

=============  ==========================================================================================
``dropout``    signal dropout in a band across the field of view (coil element failure, off-resonance and
               flow dephasing): a smooth band of an in-plane axis loses a fraction of its signal
``noise``      a noise burst (RF interference, a bad receive channel): Gaussian noise scaled to the frame
``blur``       motion blur along the phase-encoding direction (the patient moved during the frame)
``ghost``      periodic-motion ghosting: attenuated replicas shifted along phase encoding
``misaligned`` a mistriggered beat or another breath-hold position: some slices shifted in-plane
``missing``    no usable signal at all (a dropped frame, filled at the noise floor)
=============  ==========================================================================================

``strength`` in ``[0, 1]`` scales every kind from barely visible to most of the signal lost. The
"no signal" level of a frame is its 1st percentile, so the functions work on raw magnitudes (floor near
0) and on z-scored patches (floor near -1) alike. Labels are never touched: the anatomy is where it was.

Used by :class:`trunet.transforms.cardiac.RandCorruptFramesd` (training augmentation: the model learns to
borrow from neighbouring frames) and by ``benchmarks/bench_temporal.py`` (held-out cines corrupted with
recorded frames). Written by hand: MONAI's intensity transforms act on a whole image, never on one frame
of a time-as-channel tensor with physically sized bands.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import shift as nd_shift

__all__ = ["CORRUPTIONS", "corrupt_frame", "corrupt_cine"]

CORRUPTIONS: tuple[str, ...] = ("dropout", "noise", "blur", "ghost", "misaligned", "missing")


def _floor(frame: np.ndarray) -> float:
    return float(np.percentile(frame, 1.0))


def _band(n: int, spacing: float, centre: float, width_mm: float, edge_mm: float) -> np.ndarray:
    """``(n,)`` weights in ``[0, 1]``: 1 inside a band of ``width_mm`` centred at voxel ``centre``, raised-cosine
    edges of ``edge_mm``, 0 outside."""
    d = np.abs(np.arange(n) - centre) * spacing - width_mm / 2.0  # mm outside the band's flat part
    ramp = np.clip(d / max(edge_mm, 1e-6), 0.0, 1.0)
    return np.where(d <= 0, 1.0, 0.5 * (1.0 + np.cos(np.pi * ramp)))


def corrupt_frame(
    frame: np.ndarray,
    kind: str,
    strength: float,
    spacing: Sequence[float],
    rng: np.random.Generator,
    neighbour: np.ndarray | None = None,
) -> np.ndarray:
    """One corrupted copy of one frame.

    Args:
        frame: ``(X, Y, Z)`` float intensities of one frame (not modified).
        kind: one of :data:`CORRUPTIONS`.
        strength: ``0`` (none) .. ``1`` (severe), see the module table.
        spacing: voxel size in mm ``(sx, sy, sz)``.
        rng: the random generator (positions, directions, noise).
        neighbour: for ``misaligned``, the same slices at another cardiac phase (``(X, Y, Z)``): a
            mistriggered slice shows that phase, shifted; without it the slice is only shifted.

    Returns:
        float32 ``(X, Y, Z)``.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if frame.ndim != 3:
        raise ValueError(f"corrupt_frame expects one frame (X, Y, Z), got shape {frame.shape}")
    x = np.asarray(frame, dtype=np.float32)
    floor = _floor(x)
    s = float(strength)
    axis = int(rng.integers(0, 2))  # in-plane direction (phase encoding) of the artefact
    n, pix = x.shape[axis], float(spacing[axis])
    if kind == "dropout":
        # a band 20-120 mm wide losing 40-97% of its signal
        width = (20.0 + 100.0 * s) * rng.uniform(0.8, 1.2)
        depth = min(0.97, 0.4 + 0.57 * s)
        centre = rng.uniform(0.25, 0.75) * (n - 1)
        gain = 1.0 - depth * _band(n, pix, centre, width, edge_mm=10.0)
        shape = [1, 1, 1]
        shape[axis] = n
        out = floor + (x - floor) * gain.reshape(shape).astype(np.float32)
    elif kind == "noise":
        sigma = (0.15 + 0.85 * s) * float(x.std())
        out = x + rng.normal(0.0, sigma, x.shape).astype(np.float32)
    elif kind == "blur":
        half = max(1, int(round((3.0 + 9.0 * s) / pix)))  # +-3 .. 12 mm of motion
        out = np.mean([np.roll(x, k, axis) for k in range(-half, half + 1)], axis=0)
    elif kind == "ghost":
        ghost = 0.5 * (np.roll(x, n // 2, axis) + np.roll(x, -(n // 3), axis))
        out = x + (0.15 + 0.6 * s) * (ghost - floor)
    elif kind == "misaligned":
        out = x.copy()
        nz = x.shape[2]
        count = max(1, int(round(s * nz / 2)))
        for k in rng.choice(nz, size=min(count, nz), replace=False):
            src = x[..., k] if neighbour is None else np.asarray(neighbour, dtype=np.float32)[..., k]
            mm = (4.0 + 11.0 * s) * rng.uniform(0.7, 1.0) * rng.choice([-1.0, 1.0], size=2)
            out[..., k] = nd_shift(src, (mm[0] / spacing[0], mm[1] / spacing[1]), order=1, mode="nearest")
    else:  # missing
        noise = 0.05 * float(x.std()) * rng.standard_normal(x.shape).astype(np.float32)
        out = floor + (1.0 - s) * (x - floor) + noise
    return np.asarray(out, dtype=np.float32)


def corrupt_cine(
    image: np.ndarray,
    frames: Sequence[int],
    kinds: Sequence[str],
    strength: tuple[float, float],
    spacing: Sequence[float],
    rng: np.random.Generator,
    time_axis: int = 0,
    neighbour_phases: tuple[int, int] = (2, 4),
) -> tuple[np.ndarray, list[dict]]:
    """Corrupt ``frames`` of a cine, each with a kind drawn from ``kinds`` and a strength drawn uniformly
    from ``strength``.

    Args:
        image: the cine, time on ``time_axis`` (``0`` for ``(T, X, Y, Z)``, ``-1`` for ACDC's
            ``(X, Y, Z, T)``); not modified.
        frames: 0-based frames to corrupt.
        kinds, strength, spacing, rng: see :func:`corrupt_frame`.
        time_axis: the time axis of ``image``.
        neighbour_phases: ``(lo, hi)``: a ``misaligned`` frame takes its slices from a frame ``lo..hi``
            phases before or after it (cyclically; the clean frame, not a corrupted one).

    Returns:
        ``(corrupted copy (float32, same layout), records)``, one record ``{"frame", "kind", "strength"}``
        per corrupted frame.
    """
    cine = np.moveaxis(np.asarray(image, dtype=np.float32), time_axis, 0)
    out = cine.copy()
    n = cine.shape[0]
    records = []
    for t in sorted({int(f) for f in frames}):
        if not 0 <= t < n:
            raise ValueError(f"frame {t} is outside the cine's {n} frames")
        kind = str(kinds[int(rng.integers(0, len(kinds)))])
        s = float(rng.uniform(*strength))
        step = int(rng.choice([-1, 1])) * int(rng.integers(neighbour_phases[0], neighbour_phases[1] + 1))
        other = cine[(t + step) % n]
        out[t] = corrupt_frame(cine[t], kind, s, spacing, rng, neighbour=other)
        records.append({"frame": t, "kind": kind, "strength": round(s, 3)})
    return np.moveaxis(out, 0, time_axis), records
