"""All metrics of one case: overlap per labelled frame, volume curves, phases, clinical indices and temporal
consistency, as one per-case row and per-frame rows (columns described in :mod:`trunet.pipeline.evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from trunet.pipeline.evaluation.clinical import (
    DEFAULT_JUMP_THRESHOLD,
    MYOCARDIAL_DENSITY,
    cardiac_phases,
    cyclic_frame_distance,
    temporal_consistency,
    ventricle_indices,
)
from trunet.pipeline.evaluation.metrics import class_volumes, overlap_metrics
from trunet.pipeline.evaluation.report import column_name

__all__ = ["STRUCTURES", "structure_index", "CaseResult", "evaluate_case"]

STRUCTURES = ("LV", "RV", "MYO")


def structure_index(classes: Sequence[str]) -> dict[str, int]:
    """``{"LV": i, "RV": j, "MYO": k}`` for the structures found by name (case-insensitive)."""
    lower = [c.lower() for c in classes]
    return {s: lower.index(s.lower()) for s in STRUCTURES if s.lower() in lower}


@dataclass
class CaseResult:
    """What :func:`evaluate_case` found for one case: a per-case row, per-frame rows, curves."""

    row: dict[str, Any]
    frames: list[dict[str, Any]]
    pred_volumes: np.ndarray  # (T, K) ml
    ref_volumes: dict[int, np.ndarray]  # frame -> (K,) ml
    phases: dict[str, int | None] = field(default_factory=dict)


def evaluate_case(
    case_id: str,
    pred: np.ndarray,
    ref_frames: Mapping[int, np.ndarray],
    spacing: Sequence[float],
    classes: Sequence[str],
    ref_ed: int | None = None,
    ref_es: int | None = None,
    jump_threshold: float = DEFAULT_JUMP_THRESHOLD,
) -> CaseResult:
    """All metrics of one case.

    Args:
        case_id: the case name.
        pred: ``(T, X, Y, Z)`` predicted labels.
        ref_frames: ``{frame: (X, Y, Z) labels}`` of the labelled reference frames.
        spacing: voxel size in mm.
        classes: class names by label value.
        ref_ed, ref_es: reference phases (0-based) when known.
        jump_threshold: see :func:`temporal_consistency`.
    """
    k = len(classes)
    t = pred.shape[0]
    names = [column_name(c) for c in classes]
    struct = structure_index(classes)
    pred_vol = class_volumes(pred, k, spacing)  # (T, K)
    labelled = sorted(ref_frames)
    ref_vol = {f: class_volumes(ref_frames[f], k, spacing) for f in labelled}

    # phases: reference (given, else from the reference curve), detected (predicted curve)
    phase_source = "given"
    if ref_ed is None or ref_es is None:
        ref_ed = ref_es = None
        if "LV" in struct:
            ref_curve = np.zeros(t)
            for f in labelled:
                ref_curve[f] = ref_vol[f][struct["LV"]]
            found = cardiac_phases(ref_curve, labelled)
            if found is not None:
                ref_ed, ref_es = found
                phase_source = "reference-curve"
    det = cardiac_phases(pred_vol[:, struct["LV"]]) if "LV" in struct else None
    det_ed, det_es = det if det is not None else (None, None)
    if ref_ed is not None:
        ed, es = ref_ed, ref_es
    else:
        ed, es, phase_source = det_ed, det_es, "detected"

    row: dict[str, Any] = {
        "case_id": case_id, "n_frames": t, "n_labelled": len(labelled),
        "voxel_ml": float(np.prod(spacing)) / 1000.0,
        "phase_source": phase_source if ed is not None else "none", "ed_frame": ed, "es_frame": es,
        "ed_ref": ref_ed, "es_ref": ref_es, "ed_det": det_ed, "es_det": det_es,
        "ed_error": None, "es_error": None,
    }
    if ref_ed is not None and det_ed is not None:
        row["ed_error"] = cyclic_frame_distance(det_ed, ref_ed, t)
        row["es_error"] = cyclic_frame_distance(det_es, ref_es, t)

    # overlap per labelled frame
    dice = {f: np.full(k - 1, np.nan) for f in labelled}
    hd95 = {f: np.full(k - 1, np.nan) for f in labelled}
    missing = {f: np.ones(k - 1, dtype=bool) for f in labelled}
    for f in labelled:
        dice[f], hd95[f], missing[f] = overlap_metrics(pred[f], ref_frames[f], k, spacing)
    for c in range(1, k):
        for phase, frame in (("ed", ed), ("es", es)):
            ok = frame is not None and frame in ref_frames
            row[f"dice_{names[c]}_{phase}"] = dice[frame][c - 1] if ok else None
            row[f"hd95_{names[c]}_{phase}"] = hd95[frame][c - 1] if ok else None
        d = np.array([dice[f][c - 1] for f in labelled])
        h = np.array([hd95[f][c - 1] for f in labelled])
        row[f"dice_{names[c]}_mean"] = float(np.nanmean(d)) if np.isfinite(d).any() else None
        row[f"hd95_{names[c]}_mean"] = float(np.nanmean(h)) if np.isfinite(h).any() else None
    n_missing = int(sum(int(missing[f].sum()) for f in labelled))
    row["hd95_missing"] = int(n_missing > 0)
    row["hd95_missing_n"] = n_missing
    row["empty_pred_frames"] = int(np.sum(pred_vol[:, 1:].sum(axis=1) == 0))

    # clinical indices
    def at(vols: Mapping[int, np.ndarray] | np.ndarray, frame: int | None, c: int) -> float:
        if frame is None:
            return float("nan")
        if isinstance(vols, np.ndarray):
            return float(vols[frame, c])
        return float(vols[frame][c]) if frame in vols else float("nan")

    for s in ("LV", "RV"):
        if s not in struct:
            continue
        c = struct[s]
        sets = (("pred", pred_vol, ed, es), ("ref", ref_vol, ed, es), ("pred_det", pred_vol, det_ed, det_es))
        for tag, vols, e_d, e_s in sets:
            for key, value in ventricle_indices(at(vols, e_d, c), at(vols, e_s, c)).items():
                row[f"{s}_{key}_{tag}"] = value
    if "MYO" in struct:
        c = struct["MYO"]
        row["LV_mass_pred"] = MYOCARDIAL_DENSITY * at(pred_vol, ed, c)
        row["LV_mass_ref"] = MYOCARDIAL_DENSITY * at(ref_vol, ed, c)
        row["LV_mass_pred_det"] = MYOCARDIAL_DENSITY * at(pred_vol, det_ed, c)

    # temporal consistency (the reference only when it covers every frame)
    jump_flags = {}
    for c in range(1, k):
        jumps, rough, flags = temporal_consistency(pred_vol[:, c], jump_threshold)
        jump_flags[c] = flags
        row[f"{names[c]}_jumps_pred"] = jumps
        row[f"{names[c]}_roughness_pred"] = rough
        if len(labelled) == t:
            ref_curve = np.array([ref_vol[f][c] for f in labelled])
            jumps, rough, _ = temporal_consistency(ref_curve, jump_threshold)
        else:
            jumps, rough = float("nan"), float("nan")
        row[f"{names[c]}_jumps_ref"] = jumps
        row[f"{names[c]}_roughness_ref"] = rough

    frame_rows = []
    for f in range(t):
        phase = "ED" if f == ed else ("ES" if f == es else "")
        for c in range(1, k):
            lab = f in ref_frames
            frame_rows.append({
                "case_id": case_id, "frame": f, "class": classes[c], "labelled": int(lab), "phase": phase,
                "volume_pred_ml": pred_vol[f, c], "volume_ref_ml": ref_vol[f][c] if lab else None,
                "dice": dice[f][c - 1] if lab else None, "hd95": hd95[f][c - 1] if lab else None,
                "hd95_missing": int(missing[f][c - 1]) if lab else None, "jump": int(jump_flags[c][f]),
            })
    phases = {"ed": ed, "es": es, "ed_ref": ref_ed, "es_ref": ref_es, "ed_det": det_ed, "es_det": det_es}
    return CaseResult(row, frame_rows, pred_vol, ref_vol, phases)
