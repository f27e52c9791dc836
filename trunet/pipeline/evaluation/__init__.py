"""Evaluation, the last stage: 4D segmentations against references -- overlap, distances, volumes, ejection
fraction, temporal consistency -- and the report.

Modules: :mod:`~trunet.pipeline.evaluation.metrics` (Dice/HD95 and volumes, pure functions shared with
validation during training), :mod:`~trunet.pipeline.evaluation.clinical` (phases, indices, consistency,
agreement), :mod:`~trunet.pipeline.evaluation.references` (finding and reading references),
:mod:`~trunet.pipeline.evaluation.case` (one case), :mod:`~trunet.pipeline.evaluation.summary` (tables),
:mod:`~trunet.pipeline.evaluation.report` (figures) and :mod:`~trunet.pipeline.evaluation.run`
(:func:`run_evaluation`).

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
frame and class), ``summary.json`` and PNG figures in ``figures/`` (see :mod:`trunet.pipeline.evaluation.report`).

Class names come from ``classes`` (default ``DataConfig().classes``: background, RV, MYO, LV); the index
is the label value. Structures for the clinical indices are found by name (case-insensitive ``LV``,
``RV``, ``MYO``); indices whose structures are missing are skipped with a warning.

Array layout: labels in memory are ``(T, X, Y, Z)`` integer arrays (time first, NIfTI voxel order),
read from ``(x, y, z, t)`` files.
"""

from __future__ import annotations

from trunet.pipeline.evaluation.case import CaseResult, evaluate_case
from trunet.pipeline.evaluation.clinical import (
    DEFAULT_JUMP_THRESHOLD,
    MYOCARDIAL_DENSITY,
    agreement,
    cardiac_phases,
    cyclic_frame_distance,
    temporal_consistency,
    ventricle_indices,
)
from trunet.pipeline.evaluation.metrics import class_volumes, overlap_metrics, overlap_scores
from trunet.pipeline.evaluation.references import ReferenceCase, find_references
from trunet.pipeline.evaluation.run import run_evaluation

__all__ = [
    "MYOCARDIAL_DENSITY",
    "DEFAULT_JUMP_THRESHOLD",
    "ReferenceCase",
    "find_references",
    "class_volumes",
    "overlap_metrics",
    "overlap_scores",
    "cardiac_phases",
    "cyclic_frame_distance",
    "ventricle_indices",
    "temporal_consistency",
    "agreement",
    "CaseResult",
    "evaluate_case",
    "run_evaluation",
]
