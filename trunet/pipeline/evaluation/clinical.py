"""Clinical indices from volume curves: cardiac phases, ventricular volumes and ejection fraction, temporal
consistency, and the agreement of predicted and reference indices (definitions in
:mod:`trunet.pipeline.evaluation`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "MYOCARDIAL_DENSITY",
    "DEFAULT_JUMP_THRESHOLD",
    "cardiac_phases",
    "cyclic_frame_distance",
    "ventricle_indices",
    "temporal_consistency",
    "agreement",
]

MYOCARDIAL_DENSITY = 1.05  # g/ml
DEFAULT_JUMP_THRESHOLD = 0.05  # fraction of the curve's maximum volume


def cardiac_phases(lv_curve: np.ndarray, frames: Sequence[int] | None = None) -> tuple[int, int] | None:
    """ED = frame of the largest LV volume, ES = of the smallest (first one on ties).

    Args:
        lv_curve: ``(T,)`` LV cavity volumes.
        frames: consider only these frames (e.g. the labelled ones); default all.

    Returns:
        ``(ed, es)``, or ``None`` when undefined (fewer than 2 frames, or an all-zero curve).
    """
    idx = np.arange(len(lv_curve)) if frames is None else np.asarray(sorted(frames), dtype=int)
    if idx.size < 2:
        return None
    values = np.asarray(lv_curve, dtype=np.float64)[idx]
    if not np.all(np.isfinite(values)) or values.max() <= 0:
        return None
    return int(idx[np.argmax(values)]), int(idx[np.argmin(values)])


def cyclic_frame_distance(a: int, b: int, num_frames: int) -> int:
    """Frames between ``a`` and ``b`` on a cycle of ``num_frames`` (0 .. num_frames // 2)."""
    d = abs(int(a) - int(b)) % num_frames
    return min(d, num_frames - d)


def ventricle_indices(edv: float, esv: float) -> dict[str, float]:
    """``EDV``, ``ESV``, ``SV = EDV - ESV`` (ml) and ``EF = SV / EDV x 100`` (%; NaN if EDV is 0)."""
    sv = edv - esv
    ef = 100.0 * sv / edv if edv > 0 else float("nan")
    return {"EDV": float(edv), "ESV": float(esv), "SV": float(sv), "EF": float(ef)}


def temporal_consistency(
    curve: np.ndarray, threshold: float = DEFAULT_JUMP_THRESHOLD
) -> tuple[int | float, float, np.ndarray]:
    """Jumps and roughness of a cyclic volume curve.

    A frame is a *jump* when ``|v[t] - (v[t-1] + v[t+1]) / 2| > threshold * max(v)`` (neighbours taken
    cyclically). An isolated outlier of size ``d`` also moves its neighbours' deviation by ``d / 2``, so
    they count too only when ``d > 2 * threshold * max(v)``. Roughness is
    ``sum_t (v[t-1] - 2 v[t] + v[t+1])^2 / (T * max(v)^2)``.

    Args:
        curve: ``(T,)`` volumes over the cycle.
        threshold: fraction of the curve's maximum (the EDV for a cavity).

    Returns:
        ``(jumps, roughness, flags)``; ``flags`` is ``(T,)`` bool. NaN (and no flags) for curves with
        fewer than 3 frames or an all-zero maximum.
    """
    v = np.asarray(curve, dtype=np.float64)
    flags = np.zeros(v.shape, dtype=bool)
    if v.size < 3 or not np.all(np.isfinite(v)) or v.max() <= 0:
        return float("nan"), float("nan"), flags
    scale = v.max()
    second = np.roll(v, 1) - 2.0 * v + np.roll(v, -1)  # = -2 x (deviation from the neighbours' mean)
    flags = np.abs(second) / 2.0 > threshold * scale
    roughness = float(np.sum(second**2) / (v.size * scale**2))
    return int(flags.sum()), roughness, flags


def agreement(pred: Sequence[float], ref: Sequence[float]) -> dict[str, float | int | None]:
    """Agreement of paired measurements (pairs with a NaN are dropped).

    Returns:
        ``n``; ``pearson_r`` (n >= 3 and both non-constant, else None); ``bias`` = mean(pred - ref);
        ``sd_diff`` (ddof=1); ``loa_lower``/``loa_upper`` = bias -+ 1.96 sd (n >= 2, else None).
    """
    p, r = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    keep = np.isfinite(p) & np.isfinite(r)
    p, r = p[keep], r[keep]
    n = int(p.size)
    out: dict[str, float | int | None] = {"n": n, "pearson_r": None, "bias": None, "sd_diff": None,
                                          "loa_lower": None, "loa_upper": None}
    if n == 0:
        return out
    diff = p - r
    out["bias"] = float(diff.mean())
    if n >= 2:
        sd = float(diff.std(ddof=1))
        out.update(sd_diff=sd, loa_lower=out["bias"] - 1.96 * sd, loa_upper=out["bias"] + 1.96 * sd)
    if n >= 3 and p.std() > 0 and r.std() > 0:
        out["pearson_r"] = float(np.corrcoef(p, r)[0, 1])
    return out
