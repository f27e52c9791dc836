"""Overlap and volume metrics of label maps, as pure functions: the one home of Dice and HD95.

Both validation during training (:mod:`trunet.pipeline.training.validation`) and ``trunet evaluate``
(:mod:`trunet.pipeline.evaluation.case`) call :func:`overlap_scores`, so the two report the same numbers
for the same masks. Empty masks follow MONAI's ``ignore_empty``: Dice is 0 for an empty prediction
against a non-empty reference and NaN (missing) where the reference is empty; HD95 is NaN and flagged
missing where the prediction or the reference of a class is empty (never ``inf``).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

__all__ = ["HD_PERCENTILE", "class_volumes", "overlap_scores", "overlap_metrics"]

HD_PERCENTILE = 95.0


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


def overlap_scores(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, num_classes: int, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) of every foreground class on each of ``N`` frames, with MONAI.

    Args:
        pred, ref: ``(N, X, Y, Z)`` integer labels with values in ``0..K-1``.
        num_classes: K (class 0 is background and not reported).
        spacing: voxel size in mm, for the Hausdorff distance.

    Returns:
        ``dice``, ``hd95`` (float64) and ``hd95_missing`` (bool), each ``(N, K-1)``; empty masks as in the
        module docstring.

    Example::

        >>> import numpy as np
        >>> ref = np.zeros((1, 4, 4, 1), dtype=np.uint8); ref[0, :2] = 1
        >>> dice, hd95, missing = overlap_scores(ref, ref, 3, (1.0, 1.0, 1.0))
        >>> dice.tolist(), missing.tolist()
        ([[1.0, nan]], [[False, True]])
    """
    p = one_hot(torch.as_tensor(np.asarray(pred), dtype=torch.int64)[:, None], num_classes)  # (N, K, X, Y, Z)
    r = one_hot(torch.as_tensor(np.asarray(ref), dtype=torch.int64)[:, None], num_classes)
    dice = compute_dice(p, r, include_background=False, ignore_empty=True).double().numpy()
    n = p.shape[0]
    hd95 = np.full((n, num_classes - 1), np.nan)
    missing = np.ones((n, num_classes - 1), dtype=bool)
    for i in range(n):
        for c in range(1, num_classes):
            pc, rc = p[i : i + 1, c : c + 1], r[i : i + 1, c : c + 1]
            if not (pc.any() and rc.any()):
                continue  # MONAI gives inf (or nan) with a warning: undefined, reported as missing
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.5+ deprecation inside its own call
                hd = compute_hausdorff_distance(pc, rc, include_background=True, percentile=HD_PERCENTILE,
                                                spacing=[float(s) for s in spacing])
            hd95[i, c - 1] = float(hd[0, 0])
            missing[i, c - 1] = not math.isfinite(hd95[i, c - 1])
    return dice, hd95, missing


def overlap_metrics(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`overlap_scores` of one frame: ``pred``, ``ref`` ``(X, Y, Z)``; each result ``(K-1,)``."""
    dice, hd95, missing = overlap_scores(np.asarray(pred)[None], np.asarray(ref)[None], num_classes, spacing)
    return dice[0], hd95[0], missing[0]
