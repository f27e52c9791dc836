"""The basal-slice rule: LV cavity at the base that myocardium does not enclose is atrium."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from trunet.cli import main
from trunet.data.phantom import simulate_case
from trunet.pipeline.inference import run_prediction
from trunet.pipeline.inference.postprocess import exclude_atrial_slices

from test_infer import fixed_network_case

RV, MYO, LV = 1, 2, 3


def _disc(shape, centre, radius) -> np.ndarray:
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return np.hypot(xx - centre[0], yy - centre[1]) <= radius


def heart_stack(frames: int = 6, shape=(48, 48, 8), es: int = 3) -> np.ndarray:
    """Labels ``(T, X, Y, Z)`` of a short-axis stack, base at z = 0, apex at the last slice: an LV cavity
    in a myocardial ring beside an RV, narrowing towards the apex and smaller at ``es``. At ``es`` the base
    has descended: slice 0 shows atrial blood, labelled LV as a network that mistakes it would label it,
    with a fragment of a myocardial ring beside it (:func:`atrium_plane`)."""
    labels = np.zeros((frames, *shape), np.uint8)
    for t in range(frames):
        scale = 0.7 if t == es else 1.0
        for z in range(shape[2]):
            r = scale * 11 * (1 - z / (shape[2] + 2))
            plane = np.zeros(shape[:2], np.uint8)
            plane[_disc(shape, (36, 24), 0.8 * r)] = RV
            plane[_disc(shape, (18, 24), r + 3)] = MYO
            plane[_disc(shape, (18, 24), r)] = LV
            labels[t, :, :, z] = plane
    labels[es, :, :, 0] = atrium_plane(shape[:2], wall_from=24)
    return labels


def atrium_plane(shape: tuple[int, int], wall_from: int) -> np.ndarray:
    """One slice ``(X, Y)``: atrial blood labelled LV, with a myocardial wall fragment on the side
    ``x > wall_from``: 18% of the cavity's outline at ``wall_from=24``, 68% at ``wall_from=14``."""
    atrium = np.zeros(shape, np.uint8)
    xx, _ = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    atrium[_disc(shape, (18, 24), 10) & (xx > wall_from)] = MYO
    atrium[_disc(shape, (18, 24), 7)] = LV
    return atrium


def test_an_atrial_basal_slice_becomes_background_and_nothing_else_changes():
    labels = heart_stack()
    out, removed = exclude_atrial_slices(labels, LV, MYO)
    assert removed == [(3, 0)]
    assert (out[3, :, :, 0] == LV).sum() == 0
    assert (out[3, :, :, 0] == MYO).sum() == (labels[3, :, :, 0] == MYO).sum()  # other labels stay
    changed = out != labels
    changed[3, :, :, 0] = False
    assert not changed.any()
    assert labels[3, :, :, 0].max() == LV  # the input is not modified


def test_the_base_is_found_at_either_end_of_the_stack():
    flipped = np.flip(heart_stack(), axis=-1)
    out, removed = exclude_atrial_slices(flipped, LV, MYO)
    assert removed == [(3, 7)]
    single, removed_single = exclude_atrial_slices(flipped[3], LV, MYO)
    assert removed_single == [(0, 7)]
    np.testing.assert_array_equal(single, out[3])


def test_the_apex_and_mid_ventricle_are_never_touched():
    labels = heart_stack()
    labels[:, :, :, 7][labels[:, :, :, 7] == MYO] = 0  # apical cavity with no wall around it
    labels[1, 30:, :, 4][labels[1, 30:, :, 4] == MYO] = 0  # a mid slice with a broken wall
    out, removed = exclude_atrial_slices(labels, LV, MYO)
    assert removed == [(3, 0)]
    assert (out[:, :, :, 7] == labels[:, :, :, 7]).all() and (out[1] == labels[1]).all()


def test_a_failed_myocardium_is_not_taken_for_an_atrium():
    labels = heart_stack()
    labels[2][labels[2] == MYO] = 0  # no wall anywhere in frame 2: the rule would take most of it
    out, removed = exclude_atrial_slices(labels, LV, MYO)
    assert removed == [(3, 0)]
    np.testing.assert_array_equal(out[2], labels[2])
    with pytest.raises(ValueError, match="min_enclosed"):
        exclude_atrial_slices(labels, LV, MYO, min_enclosed=0.0)
    with pytest.raises(ValueError, match=r"\(T, X, Y, Z\)"):
        exclude_atrial_slices(labels[0, 0], LV, MYO)


def descending_base(empty: tuple[int, ...], ringed: tuple[int, ...] = ()) -> np.ndarray:
    """:func:`heart_stack` of 12 frames, end-systole at frame 6. The base's slice 0 shows atrium in the
    frames ``empty`` (barely ringed: the per-frame test takes it) and in frames 5-7 (two thirds ringed,
    which the per-frame test keeps), except in frames ``ringed``, where it is the ventricle's full ring."""
    labels = heart_stack(12, es=6)
    for t in range(5, 8):
        labels[t, :, :, 0] = labels[t, :, :, 1] if t in ringed else atrium_plane(labels.shape[1:3], 14)
    for t in empty:
        labels[t, :, :, 0] = atrium_plane(labels.shape[1:3], wall_from=24)
    return labels


def test_half_ringed_atrium_between_atrial_frames_around_end_systole_is_taken():
    labels = descending_base(empty=(4, 8))
    out, removed = exclude_atrial_slices(labels, LV, MYO)
    assert removed == [(4, 0), (5, 0), (6, 0), (7, 0), (8, 0)]
    assert not (out[4:9, :, :, 0] == LV).any()
    np.testing.assert_array_equal(out[4:9, :, :, 0] == MYO, labels[4:9, :, :, 0] == MYO)
    changed = out != labels
    changed[4:9, :, :, 0] = False
    assert not changed.any()


def test_a_fully_ringed_slice_between_atrial_frames_stays_ventricle():
    out, removed = exclude_atrial_slices(descending_base(empty=(4, 8), ringed=(6,)), LV, MYO)
    assert removed == [(4, 0), (5, 0), (7, 0), (8, 0)]
    assert (out[6, :, :, 0] == LV).any()


@pytest.mark.parametrize("empty", [(4,), (8,), (1, 11), (1, 8), (4, 11)], ids=str)
def test_atrium_is_bridged_only_from_both_sides_of_end_systole_near_it(empty):
    """One side only, or a frame without cavity in early systole or late diastole (a missed or spoilt frame
    says nothing about the base's descent): only the per-frame test acts."""
    labels = descending_base(empty)
    out, removed = exclude_atrial_slices(labels, LV, MYO)
    assert removed == [(t, 0) for t in empty]
    assert (out[5:8, :, :, 0] == LV).any(axis=(1, 2)).all()


def test_bridging_needs_three_frames_and_a_cavity():
    two = descending_base(empty=(4, 8))[[4, 6]]
    _, removed = exclude_atrial_slices(two, LV, MYO)
    assert removed == [(0, 0)]
    _, removed = exclude_atrial_slices(np.zeros((5, 8, 8, 4), np.uint8), LV, MYO)
    assert removed == []


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_phantoms_reference_labels_pass_the_rule_in_every_frame(index):
    """Where the labels are right, nothing is removed: the rule matches how the reference is drawn."""
    case = simulate_case(seed=1000, index=index)
    labels = np.moveaxis(case.label, -1, 0)
    _, removed = exclude_atrial_slices(labels, LV, MYO)
    assert removed == []


def _atrium_series(frames: int, spatial: tuple[int, int, int]) -> np.ndarray:
    """:func:`heart_stack` on the case's grid (atrium at frame 3, slice 0)."""
    labels = np.zeros((frames, *spatial), np.uint8)
    heart = heart_stack(frames, shape=(48, 48, 8))
    labels[:, :48, :48, :8] = heart[:, : spatial[0], : spatial[1], : spatial[2]]
    return labels


def test_predict_applies_the_rule_says_so_and_can_keep_the_atrium(tmp_path, monkeypatch, caplog):
    checkpoint, image = fixed_network_case(tmp_path, monkeypatch, _atrium_series, shape=(48, 48, 8, 6))
    with caplog.at_level(logging.INFO, logger="trunet.pipeline.inference"):
        (seg,) = run_prediction(checkpoint, image, tmp_path / "rule", device="cpu", repair_frames=False)
    assert "relabelled background at (frame, slice) [(3, 0)]" in caplog.text
    ruled = np.asarray(nib.load(seg).dataobj)
    assert (ruled[:, :, 0, 3] == LV).sum() == 0 and (ruled[:, :, 1, 3] == LV).sum() > 0

    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output",
                 str(tmp_path / "kept"), "--device", "cpu", "--no-repair-frames", "--keep-atrium"]) == 0
    kept = np.asarray(nib.load(tmp_path / "kept" / "case_seg.nii.gz").dataobj)
    assert (kept[:, :, 0, 3] == LV).sum() > 0
    kept[:, :, 0, 3][kept[:, :, 0, 3] == LV] = 0
    np.testing.assert_array_equal(kept, ruled)
