"""Clinical evaluation of 4D segmentations: overlap, distances, volumes, ejection fraction, consistency.

``trunet evaluate --pred DIR --ref DIR|datalist.json|ACDC-root --out DIR`` ends in
:func:`run_evaluation`. For every case ``<case_id>_seg.nii.gz`` in ``pred`` that has a reference:

* **Overlap and distance** per foreground class on every labelled frame: MONAI ``compute_dice`` and
  ``compute_hausdorff_distance(percentile=95)`` with the voxel spacing of the header (mm). HD95 is
  undefined when the prediction or the reference of a class is empty: it is reported missing (empty cell)
  with ``hd95_missing = 1``, never ``inf`` and never a crash. Dice is 0 for an empty prediction against a
  non-empty reference and missing where the reference is empty (MONAI ``ignore_empty``).
* **Volume curves** per class over the whole cycle (ml = voxel count x voxel volume / 1000).
* **Cardiac phases**: ED = frame of the largest LV cavity volume, ES = the smallest, detected on the
  predicted curve and compared with the reference phases (cyclic frame distance). Reference phases are
  the ones given (ACDC ``Info.cfg``, datalist ``ed``/``es``); otherwise the max/min of the reference LV
  curve over its labelled frames (at least two). ``phase_source`` says which phases the indices used:
  ``given``, ``reference-curve`` or ``detected`` (no usable reference phases).
* **Clinical indices** (:func:`ventricle_indices`): LV and RV EDV, ESV, SV = EDV - ESV, EF = SV / EDV x
  100 %, LV myocardial mass = MYO volume at ED x 1.05 g/ml. Computed for prediction and reference at
  the reference phases when known, else at the detected ones; the prediction's indices at its own
  detected phases are reported too (columns ``*_pred_det``).
* **Temporal consistency** (:func:`temporal_consistency`) of each predicted (and dense reference) curve:
  the number of *jumps*, frames whose volume deviates from the mean of its two cyclic neighbours by more
  than ``jump_threshold`` x the curve's maximum (the EDV for a cavity; the maximum rather than the range
  because the myocardium's range is ideally ~0 and would turn noise into jumps), and the *roughness*
  ``sum_t (v[t-1] - 2 v[t] + v[t+1])^2 / (T * max(v)^2)`` (cyclic, dimensionless; 0 for a constant or
  linear curve).
* **Summary**: mean and sd (ddof=1) of every per-case metric; for volumes, EF and mass the agreement of
  prediction and reference (:func:`agreement`): Pearson r, bias = mean(pred - ref), limits of agreement
  bias +- 1.96 sd.

Outputs in ``out_dir`` (all written atomically): ``per_case.csv``, ``per_frame.csv`` (one row per case,
frame and class), ``summary.json`` and PNG figures in ``figures/`` (see :mod:`trunet.pipeline.report`).

Class names come from ``classes`` (default ``DataConfig().classes``: background, RV, MYO, LV); the index
is the label value. Structures for the clinical indices are found by name (case-insensitive ``LV``,
``RV``, ``MYO``); indices whose structures are missing are skipped with a warning.

Array layout: labels in memory are ``(T, X, Y, Z)`` integer arrays (time first, NIfTI voxel order),
read from ``(x, y, z, t)`` files.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from trunet import __version__
from trunet.atomic import atomic_path, write_json
from trunet.errors import DataError
from trunet.pipeline import report
from trunet.pipeline.report import column_name
from trunet.pipeline.data import parse_info_cfg, read_datalist
from trunet.io import CineMeta, load_cine, load_label, strip_image_suffix

__all__ = [
    "MYOCARDIAL_DENSITY",
    "DEFAULT_JUMP_THRESHOLD",
    "ReferenceCase",
    "find_references",
    "class_volumes",
    "overlap_metrics",
    "cardiac_phases",
    "cyclic_frame_distance",
    "ventricle_indices",
    "temporal_consistency",
    "agreement",
    "CaseResult",
    "evaluate_case",
    "run_evaluation",
]

logger = logging.getLogger(__name__)

MYOCARDIAL_DENSITY = 1.05  # g/ml
DEFAULT_JUMP_THRESHOLD = 0.05  # fraction of the curve's maximum volume
HD_PERCENTILE = 95.0
AFFINE_TOLERANCE = 1e-3
IGNORE_INDEX = 255

PRED_SUFFIX = "_seg.nii.gz"
_REF_SUFFIXES = ("_4d_gt", "_gt", "_seg")  # label-folder names, in order of preference
_STRUCTURES = ("LV", "RV", "MYO")


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


@dataclass
class ReferenceCase:
    """Where one case's reference lives.

    Attributes:
        case_id: the case name, matched against ``<case_id>_seg.nii.gz`` predictions.
        label: a 4D label file ``(x, y, z, t)``, or ``{frame (0-based): 3D label file}``.
        image: the 4D image, for overlay figures (``None`` = unknown, no montage).
        ed, es: reference end-diastolic/end-systolic frames, 0-based, when known.
        frames: labelled frames of a 4D label (``None`` = every frame not filled with 255).
    """

    case_id: str
    label: str | dict[int, str]
    image: str | None = None
    ed: int | None = None
    es: int | None = None
    frames: list[int] | None = None


def _label_folder_references(folder: Path) -> dict[str, ReferenceCase]:
    found: dict[str, tuple[int, str]] = {}
    for path in sorted(folder.iterdir()):
        stem = strip_image_suffix(path.name)
        if stem == path.name or not path.is_file():
            continue
        for rank, suffix in enumerate(_REF_SUFFIXES):
            if stem.endswith(suffix) and len(stem) > len(suffix):
                case_id = stem[: -len(suffix)]
                if case_id not in found or rank < found[case_id][0]:
                    found[case_id] = (rank, str(path))
                break
    return {cid: ReferenceCase(case_id=cid, label=p) for cid, (_, p) in found.items()}


def _acdc_references(root: Path) -> dict[str, ReferenceCase]:
    refs: dict[str, ReferenceCase] = {}
    for info_path in sorted(root.glob("*/Info.cfg")):
        case_dir = info_path.parent
        cid = case_dir.name
        info = parse_info_cfg(info_path)
        ed, es = info["ED"] - 1, info["ES"] - 1
        dense = case_dir / f"{cid}_4d_gt.nii.gz"
        label: str | dict[int, str]
        if dense.is_file():
            label = str(dense)
        else:
            label = {}
            for gt in sorted(case_dir.glob(f"{cid}_frame*_gt.nii*")):
                match = re.fullmatch(rf"{re.escape(cid)}_frame(\d+)_gt\.nii(\.gz)?", gt.name)
                if match:
                    label[int(match.group(1)) - 1] = str(gt)
            if not label:
                logger.warning("%s: no reference labels (%s_4d_gt / _frameFF_gt), skipped", case_dir, cid)
                continue
        image = case_dir / f"{cid}_4d.nii.gz"
        refs[cid] = ReferenceCase(cid, label, str(image) if image.is_file() else None, ed, es)
    return refs


def _datalist_references(path: Path) -> dict[str, ReferenceCase]:
    """Cases of every list of a datalist (parsed by :func:`read_datalist`) that have a label."""
    refs: dict[str, ReferenceCase] = {}
    for record in read_datalist(path, require_image=False).all():
        cid = record["case_id"]
        if record["label"] is None:
            logger.info("%s: case %s has no label in the datalist", path, cid)
            continue
        if cid in refs:
            logger.warning("%s: case %s listed twice; the first entry is used", path, cid)
            continue
        refs[cid] = ReferenceCase(cid, record["label"], record["image"], record["ed"], record["es"], record["frames"])
    return refs


def find_references(ref: str | os.PathLike) -> dict[str, ReferenceCase]:
    """References by case id from a datalist JSON, an ACDC-layout root or a folder of 4D label files.

    A label folder holds ``<case_id>_4d_gt.nii.gz``, ``<case_id>_gt.nii.gz`` or ``<case_id>_seg.nii.gz``
    (preferred in that order). An ACDC root holds ``patientNNN/Info.cfg`` (ED/ES, 1-based) with the dense
    ``patientNNN_4d_gt.nii.gz`` when present, else the sparse ``patientNNN_frameFF_gt.nii.gz``.
    """
    ref = Path(ref)
    if ref.is_file():
        if ref.suffix.lower() != ".json":
            raise DataError(ref, "the reference must be a folder, a datalist .json or an ACDC root")
        return _datalist_references(ref)
    if not ref.is_dir():
        raise DataError(ref, "reference not found")
    if any(ref.glob("*/Info.cfg")):
        return _acdc_references(ref)
    return _label_folder_references(ref)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def _load_prediction(path: Path, num_classes: int) -> tuple[np.ndarray, CineMeta]:
    """Predicted labels ``(T, X, Y, Z)`` uint8 and their :class:`~trunet.io.CineMeta`."""
    labels, _, meta = load_label(path, num_classes=num_classes)
    return labels, meta


def _check_geometry(ref_meta: CineMeta, pred_meta: CineMeta) -> None:
    """The reference must lie on the prediction's grid: same shape, affine within ``AFFINE_TOLERANCE``."""
    if tuple(ref_meta.spatial_shape) != tuple(pred_meta.spatial_shape):
        raise DataError(ref_meta.path, f"reference shape {tuple(ref_meta.spatial_shape)} differs from the "
                                       f"prediction's {tuple(pred_meta.spatial_shape)} ({pred_meta.path})")
    diff = float(np.max(np.abs(np.asarray(ref_meta.affine) - np.asarray(pred_meta.affine))))
    if diff > AFFINE_TOLERANCE:
        raise DataError(ref_meta.path, f"reference affine differs from the prediction's ({pred_meta.path}) "
                                       f"by {diff:.4g} (tolerance {AFFINE_TOLERANCE}): not on the same grid")


def _load_reference(ref: ReferenceCase, pred_meta: CineMeta, num_classes: int) -> dict[int, np.ndarray]:
    """Labelled reference frames ``{frame: (X, Y, Z) uint8}``, checked against the prediction's grid.

    A frame filled with ``IGNORE_INDEX`` (255) counts as unlabelled; a partly filled one is an error.
    """
    t = pred_meta.n_frames
    if isinstance(ref.label, dict):
        labels, mask, meta = load_label(ref.label, n_frames=t, ignore_index=IGNORE_INDEX)
    else:
        labels, mask, meta = load_label(ref.label, frames=ref.frames, ignore_index=IGNORE_INDEX)
    _check_geometry(meta, pred_meta)
    if labels.shape[0] != t:
        raise DataError(meta.path, f"reference has {labels.shape[0]} frames, the prediction has {t} "
                                   f"({pred_meta.path})")
    frames: dict[int, np.ndarray] = {}
    for f in np.flatnonzero(mask):
        frame = labels[f]
        ignored = frame == IGNORE_INDEX
        if ignored.all():
            continue
        if ignored.any():
            raise DataError(meta.path, f"frame {f} is partly unlabelled ({IGNORE_INDEX}); label whole frames")
        if frame.max() >= num_classes:
            raise DataError(meta.path, f"label value {int(frame.max())} in frame {f} but only {num_classes} "
                                       f"classes (0..{num_classes - 1}) are evaluated; pass --classes")
        frames[int(f)] = frame
    return frames


def _read_image_frames(
    path: str, frames: Iterable[int], z: int, shape: Sequence[int]
) -> dict[int, np.ndarray] | None:
    """2D ``(X, Y)`` slices ``z`` of the given frames of the image; ``None`` (logged) if unusable."""
    try:
        image, meta = load_cine(path, allow_3d=True)
    except DataError as exc:  # the image only feeds a figure; a bad image must not stop the evaluation
        logger.warning("%s; overlay montage skipped", exc)
        return None
    if tuple(image.shape[1:]) != tuple(shape) or max(frames, default=0) >= image.shape[0]:
        logger.warning("%s: image shape %s does not match the prediction's %s; overlay montage skipped",
                       path, meta.shape, tuple(shape))
        return None
    return {f: image[f, :, :, z] for f in frames}


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def class_volumes(labels: np.ndarray, num_classes: int, spacing: Sequence[float]) -> np.ndarray:
    """Volume of every class in ml.

    Args:
        labels: ``(F, X, Y, Z)`` or ``(X, Y, Z)`` integer labels.
        num_classes: K; values must lie in ``0..K-1``.
        spacing: voxel size in mm (3 values).

    Returns:
        ``(F, K)`` (or ``(K,)``) float64 volumes: voxel count x voxel volume (mm^3) / 1000.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    flat = labels.reshape(labels.shape[0], -1) if labels.ndim == 4 else labels.reshape(1, -1)
    counts = np.stack([np.bincount(row, minlength=num_classes)[:num_classes] for row in flat])
    vols = counts.astype(np.float64) * voxel_ml
    return vols if labels.ndim == 4 else vols[0]


def overlap_metrics(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) of every foreground class on one frame, with MONAI.

    Args:
        pred, ref: ``(X, Y, Z)`` integer labels.
        num_classes: K (class 0 is background and not reported).
        spacing: voxel size in mm, for the Hausdorff distance.

    Returns:
        ``dice``, ``hd95`` and ``hd95_missing`` (bool), each ``(K-1,)``. HD95 is NaN and flagged where the
        prediction or the reference of the class is empty.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], num_classes)
    r = one_hot(torch.as_tensor(ref.astype(np.int64))[None, None], num_classes)
    dice = compute_dice(p, r, include_background=False, ignore_empty=True)[0].double().numpy()
    hd95 = np.full(num_classes - 1, np.nan)
    missing = np.ones(num_classes - 1, dtype=bool)
    for c in range(1, num_classes):
        pc, rc = p[:, c : c + 1], r[:, c : c + 1]
        if not (pc.any() and rc.any()):
            continue  # MONAI gives inf (or nan) with a warning: undefined, reported as missing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.5+ deprecation inside its own call
            hd = compute_hausdorff_distance(pc, rc, include_background=True, percentile=HD_PERCENTILE,
                                            spacing=[float(s) for s in spacing])
        hd95[c - 1] = float(hd[0, 0])
        missing[c - 1] = not math.isfinite(hd95[c - 1])
    return dice, hd95, missing


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


# --------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------


def _structure_index(classes: Sequence[str]) -> dict[str, int]:
    """``{"LV": i, "RV": j, "MYO": k}`` for the structures found by name (case-insensitive)."""
    lower = [c.lower() for c in classes]
    return {s: lower.index(s.lower()) for s in _STRUCTURES if s.lower() in lower}


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
    struct = _structure_index(classes)
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


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(float(value)) else f"{float(value):.6g}"
    if isinstance(value, (np.integer, np.bool_)):
        return int(value)
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(row.get(key)) for key in columns})
    return path


def _finite_or_none(x: Any) -> Any:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


_NOT_SUMMARISED = {"case_id", "n_frames", "n_labelled", "voxel_ml", "phase_source", "ed_frame", "es_frame",
                   "ed_ref", "es_ref", "ed_det", "es_det"}


def _summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    metrics: dict[str, dict[str, Any]] = {}
    for key in rows[0] if rows else []:
        if key in _NOT_SUMMARISED:
            continue
        vals = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        metrics[key] = {
            "mean": float(vals.mean()) if vals.size else None,
            "sd": float(vals.std(ddof=1)) if vals.size >= 2 else None,
            "n": int(vals.size),
        }
    return metrics


def _agreements(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in ("LV", "RV"):
        for key in ("EDV", "ESV", "SV", "EF"):
            col = f"{s}_{key}"
            if f"{col}_pred" in rows[0]:
                out[col] = agreement([r[f"{col}_pred"] for r in rows], [r[f"{col}_ref"] for r in rows])
    if "LV_mass_pred" in rows[0]:
        out["LV_mass"] = agreement([r["LV_mass_pred"] for r in rows], [r["LV_mass_ref"] for r in rows])
    return out


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def run_evaluation(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    out_dir: str | os.PathLike,
    classes: Sequence[str] | None = None,
    jump_threshold: float = DEFAULT_JUMP_THRESHOLD,
    figures: bool = True,
) -> dict[str, Any]:
    """Evaluate every ``<case_id>_seg.nii.gz`` in ``pred`` against its reference; write the report.

    Args:
        pred: folder of 4D ``(x, y, z, t)`` uint8 predictions.
        ref: a folder of 4D label files, a datalist JSON or an ACDC-layout root (see :func:`find_references`).
        out_dir: report folder (created): ``per_case.csv``, ``per_frame.csv``, ``summary.json``, ``figures/``.
        classes: class names by label value (default ``DataConfig().classes``).
        jump_threshold: fraction of a curve's maximum above which a frame is a jump.
        figures: write the PNG figures.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        DataError: missing/unreadable files, no prediction, no prediction with a reference, a
            prediction and reference on different grids (shape, or affine beyond 1e-3), bad label values.
    """
    from tqdm.auto import tqdm

    from trunet.config import DataConfig

    pred_dir, out_dir = Path(pred), Path(out_dir)
    classes = list(classes) if classes else list(DataConfig().classes)
    if len(classes) < 2:
        raise DataError(None, f"need at least two classes (background and one structure), got {classes}")
    if not (jump_threshold > 0):
        raise DataError(None, f"jump_threshold must be positive, got {jump_threshold}")
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder not found")
    pred_files = {p.name[: -len(PRED_SUFFIX)]: p for p in sorted(pred_dir.glob(f"*{PRED_SUFFIX}"))}
    if not pred_files:
        raise DataError(pred_dir, f"no predictions (*{PRED_SUFFIX}) in this folder")
    refs = find_references(ref)
    missing_refs = [cid for cid in pred_files if cid not in refs]
    missing_preds = [cid for cid in refs if cid not in pred_files]
    if missing_refs:
        logger.warning("no reference for %d prediction(s), not evaluated: %s", len(missing_refs),
                       ", ".join(missing_refs))
    matched = [cid for cid in pred_files if cid in refs]
    if not matched:
        raise DataError(ref, f"no reference matches any of the {len(pred_files)} predictions in {pred_dir} "
                             f"(e.g. {next(iter(pred_files))})")
    struct = _structure_index(classes)
    absent = [s for s in _STRUCTURES if s not in struct]
    if absent:
        logger.warning("classes %s lack %s: the clinical indices needing them are skipped", classes, absent)
    if out_dir.resolve() == pred_dir.resolve():
        raise DataError(out_dir, "the report folder must differ from the prediction folder")

    fig_dir = out_dir / "figures"
    case_rows: list[dict[str, Any]] = []
    frame_rows: list[dict[str, Any]] = []
    written: list[Path] = []
    for cid in tqdm(matched, desc="evaluate", unit="case"):
        labels, meta = _load_prediction(pred_files[cid], len(classes))
        r = refs[cid]
        ref_frames = _load_reference(r, meta, len(classes))
        if not ref_frames:
            logger.warning("%s: the reference has no labelled frame, not evaluated", cid)
            missing_refs.append(cid)
            continue
        res = evaluate_case(cid, labels, ref_frames, meta.spacing, classes, r.ed, r.es, jump_threshold)
        case_rows.append(res.row)
        frame_rows.extend(res.frames)
        if res.row["hd95_missing"]:
            logger.warning("%s: HD95 undefined (empty prediction or reference) for %d frame-class pair(s)",
                           cid, res.row["hd95_missing_n"])
        if figures:
            written.append(report.plot_volume_curves(fig_dir / f"{cid}_volumes.png", cid, res.pred_volumes,
                                                     res.ref_volumes, classes, res.phases))
            if r.image is None:
                logger.info("%s: no image known for this case, overlay montage skipped", cid)
            else:
                z = report.mid_slice(ref_frames, struct)
                wanted = [f for f in (res.phases["ed"], res.phases["es"]) if f is not None]
                images = _read_image_frames(r.image, wanted, z, labels.shape[1:])
                if images is not None:
                    written.append(report.plot_overlay_montage(
                        fig_dir / f"{cid}_overlay.png", cid, images, labels, ref_frames, z, res.phases,
                        len(classes)))
    if not case_rows:
        raise DataError(ref, "no case could be evaluated (every reference is empty)")

    written.insert(0, _write_csv(out_dir / "per_case.csv", case_rows))
    written.insert(1, _write_csv(out_dir / "per_frame.csv", frame_rows))
    agree = _agreements(case_rows)
    if figures and ("LV_EF" in agree or "RV_EF" in agree):
        written.append(report.plot_bland_altman(fig_dir / "bland_altman_ef.png", case_rows,
                                                [s for s in ("LV", "RV") if f"{s}_EF" in agree]))
    summary: dict[str, Any] = {
        "trunet_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pred": str(pred_dir),
        "ref": str(ref),
        "classes": classes,
        "parameters": {
            "hd_percentile": HD_PERCENTILE,
            "myocardial_density_g_per_ml": MYOCARDIAL_DENSITY,
            "jump_threshold": jump_threshold,
            "jump_definition": "|v[t] - (v[t-1] + v[t+1]) / 2| > jump_threshold * max(v), cyclic",
            "roughness_definition": "sum_t (v[t-1] - 2 v[t] + v[t+1])^2 / (T * max(v)^2), cyclic",
            "agreement": "bias = mean(pred - ref); limits of agreement = bias +- 1.96 sd(pred - ref)",
        },
        "n_cases": len(case_rows),
        "cases": [r["case_id"] for r in case_rows],
        "missing_references": missing_refs,
        "missing_predictions": missing_preds,
        "hd95_missing_cases": [r["case_id"] for r in case_rows if r["hd95_missing"]],
        "metrics": _summarise(case_rows),
        "agreement": agree,
    }
    summary_path = out_dir / "summary.json"
    summary["files"] = [str(p.relative_to(out_dir)) for p in [*written, summary_path]]
    summary = _json_clean(summary)
    write_json(summary_path, summary)
    for line in report.summary_table(summary, classes):
        logger.info("%s", line)
    return summary


def _json_clean(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
