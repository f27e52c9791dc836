"""Spoilt frames found by their disagreement with their neighbours and interpolated from clean ones."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from trunet.cli import main
from trunet.pipeline.inference import run_prediction
from trunet.pipeline.inference.frame_repair import repair_spoilt_frames

from test_infer import _dice, fixed_network_case


LV_CENTRE, RV_CENTRE = (18, 24), (36, 24)


def distance_from(centre: tuple[int, int], plane: tuple[int, int] = (48, 48)) -> np.ndarray:
    """Each in-plane voxel's distance ``(X, Y)`` from ``centre``, in voxels."""
    xx, yy = np.meshgrid(np.arange(plane[0]), np.arange(plane[1]), indexing="ij")
    return np.hypot(xx - centre[0], yy - centre[1])


def beating_heart(frames: int, shape=(48, 48, 2), motion: float = 5.0) -> np.ndarray:
    """Labels ``(T, X, Y, Z)`` of one beat: an LV cavity (3) in a myocardial ring (2) beside an RV (1), the
    cavity shrinking to end-systole at ``T // 2`` and refilling (radius 12 -> 12 - motion voxels)."""
    labels = np.zeros((frames, *shape), np.uint8)
    d_lv = distance_from(LV_CENTRE, shape[:2])
    d_rv = distance_from(RV_CENTRE, shape[:2])
    for t in range(frames):
        r = 12 - motion * (1 - np.cos(2 * np.pi * t / frames)) / 2
        plane = np.zeros(shape[:2], np.uint8)
        plane[d_rv <= 0.8 * r] = 1
        plane[d_lv <= r + 3] = 2
        plane[d_lv <= r] = 3
        labels[t] = plane[..., None]
    return labels


def probabilities(labels: np.ndarray, confidence: float = 0.9) -> torch.Tensor:
    """Soft one-hot ``(T, K=4, X, Y, Z)`` of the labels, as a confident network gives them."""
    one_hot = np.moveaxis(np.eye(4, dtype=np.float32)[labels], -1, 1)
    return torch.from_numpy(confidence * one_hot + (1 - confidence) / 4)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over RV, MYO and LV."""
    return float(np.mean([_dice(a, b, k) for k in (1, 2, 3)]))


def test_spoilt_frames_are_found_and_interpolated_from_clean_ones():
    truth = beating_heart(16)
    spoilt = truth.copy()
    spoilt[3] = 0  # a dropout: the heart segmented as background
    spoilt[9][:, 20:30] = 0  # a band through the heart, next to end-systole (frame 8)...
    spoilt[10] = np.roll(truth[10], 8, axis=0)  # ...followed by a mistriggered, displaced frame
    repaired, report = repair_spoilt_frames(probabilities(spoilt))
    assert report.frames == [3, 9, 10], report
    labels = repaired.argmax(1).numpy()
    # each repaired frame is as close to the truth as the clean frames on either side of the gap are to each
    # other (the heart's motion across the gap), and far closer than the spoilt frame
    for t, (before, after) in {3: (2, 4), 9: (8, 11), 10: (8, 11)}.items():
        gap = dice(truth[before], truth[after])
        assert dice(labels[t], truth[t]) >= gap, (t, dice(labels[t], truth[t]), gap)
        assert dice(labels[t], truth[t]) > dice(spoilt[t], truth[t]) + 0.2
    untouched = [t for t in range(16) if t not in (3, 9, 10)]
    assert torch.equal(repaired[untouched], probabilities(spoilt)[untouched])  # end-systole (8) included


def test_a_partly_spoilt_frame_among_many_spoilt_ones_is_found():
    """With 7 of 24 frames blank, their zero agreements and the lowered ones of the clean frames beside them
    widen the first round's spread; the threshold the clean frames alone give then finds the frame that a
    band spoils only partly (the first round's threshold, 0.37, leaves it at Dice 0.71)."""
    truth = beating_heart(24, motion=3.0)
    spoilt = truth.copy()
    blank = [2, 3, 7, 12, 13, 17, 21]
    spoilt[blank] = 0
    spoilt[10][:, 14:24] = 0  # a dropout band over part of the heart
    assert dice(spoilt[10], truth[10]) < 0.75
    repaired, report = repair_spoilt_frames(probabilities(spoilt))
    assert report.frames == sorted([*blank, 10]), report
    labels = repaired.argmax(1).numpy()
    assert dice(labels[10], truth[10]) >= dice(truth[9], truth[11]), dice(labels[10], truth[10])
    untouched = [t for t in range(24) if t not in report.frames]
    assert torch.equal(repaired[untouched], probabilities(spoilt)[untouched])


@pytest.mark.parametrize("frames, motion", [(30, 5.0), (12, 5.0), (8, 4.0)])
def test_a_clean_cine_is_left_as_it_is_even_at_its_extremes(frames, motion):
    """End-diastole and end-systole differ from both neighbours the same way: they are no outliers, also in a
    coarsely sampled cine where the heart moves a lot from frame to frame."""
    probs = probabilities(beating_heart(frames, motion=motion))
    repaired, report = repair_spoilt_frames(probs)
    assert report.frames == [] and report.skipped == "", report
    assert repaired is probs
    assert min(report.agreement) > report.threshold


def basal_slice_at_end_diastole(frames: int) -> np.ndarray:
    """:func:`beating_heart` in 5 thick slices ``(T, X, Y, 5)``: slices 1-3 hold the heart in every frame,
    the most basal slice 0 holds it in end-diastole (frame 0), as when the base moves out of an 8-10 mm
    slice in the first frame of systole, and in the other frames only a sliver of cavity (a tenth of the
    slice's foreground: the partial volume a network finds there); slice 4 (beyond the apex) is empty."""
    heart = beating_heart(frames, shape=(48, 48, 1), motion=2.0)[..., 0]
    labels = np.zeros((frames, 48, 48, 5), np.uint8)
    labels[..., 1:4] = heart[..., None]
    labels[:, distance_from(LV_CENTRE) <= 6, 0] = 3
    labels[0, ..., 0] = heart[0]
    return labels


def test_a_basal_slice_held_at_end_diastole_only_is_the_hearts_motion_not_a_spoilt_frame():
    """End-diastole's basal slice alone sets it apart from both neighbours (Dice 0.86 over the whole volume,
    where the other frames agree at 0.94-1.0, and below the threshold, 0.865); the repair must not flag it,
    or the end-diastolic volume, the ejection fraction's denominator, is interpolated away. The neighbours'
    sliver of cavity in that slice is what a network gives, and defeats a rule that only leaves out slices
    beyond the extent both frames have foreground in. Frames spoilt inside the heart's extent, or with less
    than their neighbours in an end slice (a sliver: what a network makes of a displaced slice), are still
    found."""
    truth = basal_slice_at_end_diastole(24)
    spoilt = truth.copy()
    spoilt[6] = 0  # a dropout: the heart segmented as background
    spoilt[13][..., 2:4] = 0  # the cavity lost over the two apical slices (a band across the slices)
    spoilt[17][distance_from(LV_CENTRE) > 5, 3] = 0  # the apical slice a sliver (as a displaced slice is)
    repaired, report = repair_spoilt_frames(probabilities(spoilt))
    assert report.frames == [6, 13, 17], report
    assert torch.equal(repaired[0], probabilities(spoilt)[0])  # end-diastole kept as segmented
    assert (repaired[13].argmax(0).numpy()[..., 2:4] == 3).any()  # the lost slices back, from the neighbours


def test_a_series_mostly_spoilt_is_left_as_segmented():
    """With most frames unlike their neighbours there is no clean majority to repair from."""
    truth = beating_heart(10)
    spoilt = truth.copy()
    for t in (0, 2, 4, 5, 6, 8):  # 6 of 10 frames, each displaced its own way
        spoilt[t] = np.roll(truth[t], 5 * (t + 1), axis=1)
    probs = probabilities(spoilt)
    repaired, report = repair_spoilt_frames(probs)
    assert repaired is probs and report.frames == [], report


def test_too_short_a_series_and_bad_arguments():
    probs = probabilities(beating_heart(4))
    repaired, report = repair_spoilt_frames(probs)
    assert repaired is probs and report.frames == [] and report.skipped == ""
    with pytest.raises(ValueError, match=r"\(T, K, X, Y, Z\)"):
        repair_spoilt_frames(probs[0])
    with pytest.raises(ValueError, match="min_drop"):
        repair_spoilt_frames(probabilities(beating_heart(8)), min_drop=0)


def _spoilt_series(frames: int, spatial: tuple[int, int, int]) -> np.ndarray:
    """A beating heart on the case's grid with frame 4 spoilt (all background)."""
    labels = np.zeros((frames, *spatial), np.uint8)
    heart = beating_heart(frames)
    labels[:, : min(48, spatial[0]), : min(48, spatial[1]), : min(2, spatial[2])] = \
        heart[:, : spatial[0], : spatial[1], : spatial[2]]
    labels[4] = 0
    return labels


def test_predict_repairs_a_spoilt_frame_and_says_so(tmp_path, monkeypatch, caplog):
    checkpoint, image = fixed_network_case(tmp_path, monkeypatch, _spoilt_series, shape=(48, 48, 2, 12))
    with caplog.at_level(logging.INFO, logger="trunet.pipeline.inference"):
        (seg,) = run_prediction(checkpoint, image, tmp_path / "repaired", device="cpu")
    assert "case: frames [4] break from their neighbours" in caplog.text
    repaired = np.asarray(nib.load(seg).dataobj)
    cavity = [(repaired[..., t] == 3).sum() for t in (3, 4, 5)]
    assert cavity[0] >= cavity[1] >= cavity[2] > 0, cavity  # back, between its neighbours' (5: nearer systole)

    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output",
                 str(tmp_path / "as-segmented"), "--device", "cpu", "--no-repair-frames"]) == 0
    kept = np.asarray(nib.load(tmp_path / "as-segmented" / "case_seg.nii.gz").dataobj)
    assert (kept[..., 4] > 0).sum() == 0  # the spoilt frame as the network gave it
    np.testing.assert_array_equal(np.delete(kept, 4, axis=-1), np.delete(repaired, 4, axis=-1))


def test_predict_judges_the_frames_on_the_scans_own_slices(tmp_path, monkeypatch, caplog):
    """The base moves through the scan's slices, not the model's: on a model grid of a third of the slice
    spacing (2.67 mm for the scan's 8 mm) end-diastole's extra basal slice spans three model slices, and a
    rule on the end slice alone would still flag it there. Predicted, end-diastole keeps that slice; the
    spoilt frame is repaired."""

    def labels_for(frames, spatial):  # the scan's labels, each 8 mm slice as 3 slices of the model's grid
        scan = basal_slice_at_end_diastole(frames)[..., :3]  # 3 slices: base at ED only, then 2 of the heart
        scan[6] = 0
        model = np.zeros((frames, *spatial), np.uint8)
        for z in range(spatial[2]):
            model[..., : spatial[0], : spatial[1], z] = scan[:, : spatial[0], : spatial[1], min(z // 3, 2)]
        return model

    checkpoint, image = fixed_network_case(tmp_path, monkeypatch, labels_for, shape=(48, 48, 3, 24),
                                           target_spacing=(3.0, 3.0, 8.0 / 3))
    with caplog.at_level(logging.INFO, logger="trunet.pipeline.inference"):
        (seg,) = run_prediction(checkpoint, image, tmp_path / "pred", device="cpu")
    assert "case: frames [6] break from their neighbours" in caplog.text
    labels = np.asarray(nib.load(seg).dataobj)  # (x, y, z, t)
    assert (labels[..., 0, 0] == 3).sum() > 0.9 * (labels[..., 1, 0] == 3).sum()  # ED's basal cavity kept
    assert (labels[..., 6] == 3).any()  # the spoilt frame back
