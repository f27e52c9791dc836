"""The time benchmark's count of ED/ES frames with an LV slice drawn wrong: a whole basal slice added or lost
counts, a sliver at the apex or a cavity a little too small does not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_temporal  # noqa: E402

SPACING = (1.5, 1.5, 10.0)  # mm: a voxel is 0.0225 mL
VOXEL_ML = float(np.prod(SPACING)) / 1000.0


def _cavity() -> np.ndarray:
    """An LV cavity (label 3) in slices 1-4 of a 40 x 40 x 6 frame, 30 x 30 voxels (20 mL) each."""
    frame = np.zeros((40, 40, 6), dtype=np.uint8)
    frame[5:35, 5:35, 1:5] = 3
    return frame


def test_a_whole_slice_added_or_lost_is_wrong():
    ref = _cavity()
    basal = ref.copy()
    basal[5:35, 5:35, 0] = 3  # the slice above the base drawn as ventricle
    lost = ref.copy()
    lost[..., 2] = 0
    assert bench_temporal.lv_slice_wrong(basal, ref, VOXEL_ML)
    assert bench_temporal.lv_slice_wrong(lost, ref, VOXEL_ML)


def test_an_apical_sliver_or_a_smaller_cavity_is_not():
    ref = _cavity()
    sliver = ref.copy()
    sliver[18:20, 18:23, 5] = 3  # 10 voxels, 0.2 mL, beyond the apex
    smaller = ref.copy()
    smaller[5:14, 5:35, 1:5] = 0  # 30% of every slice missing
    assert not bench_temporal.lv_slice_wrong(sliver, ref, VOXEL_ML)
    assert not bench_temporal.lv_slice_wrong(smaller, ref, VOXEL_ML)
    assert not bench_temporal.lv_slice_wrong(ref, ref, VOXEL_ML)


def test_score_counts_the_ed_and_es_frames_with_a_slice_wrong():
    ref = np.stack([_cavity()] * 4)  # (T, X, Y, Z); ED frame 0, ES frame 2
    pred = ref.copy()
    pred[2, 5:35, 5:35, 0] = 3  # end-systole holds the atrium's slice
    pred[1, 5:35, 5:35, 0] = 3  # and so does a frame that is neither ED nor ES
    case = {"ed": 0, "es": 2, "corrupted": [{"frame": 1}]}
    assert bench_temporal.score(pred, ref, case, SPACING)["lv_slice_wrong"] == 1
    pred[0, ..., 3] = 0  # end-diastole loses a slice
    assert bench_temporal.score(pred, ref, case, SPACING)["lv_slice_wrong"] == 2
