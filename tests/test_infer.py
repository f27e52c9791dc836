"""Inference: sliding window over space, time windows, TTA, post-processing, ``run_prediction`` on files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path as nibabel_data_path

from trunet.cli import main
from trunet.errors import CheckpointError, ConfigError, DataError
from trunet.io import read_header
from trunet.models import TimeResolvedUNet
from trunet.pipeline.checkpoint import (
    inference_payload,
    load_checkpoint,
    model_from_hparams,
    model_hparams,
    save_checkpoint,
)
from trunet.config import InferConfig, config_from_dict
from trunet.pipeline.inference import Predictor, find_inputs, run_prediction, time_windows
from trunet.pipeline.inference.postprocess import keep_largest_components, probabilities_to_labels
from trunet.transforms.compose import preprocessing_from_config

CLASSES = ["background", "RV", "MYO", "LV"]


def F32(**overrides) -> InferConfig:
    """Inference in float32 on any CPU: these tests compare against float32 references to 1e-6."""
    return InferConfig(cpu_bf16=False, **overrides)
TRAIN_ITERATIONS, TRAIN_LR = 50, 0.01  # the end-to-end test's training (see its docstring)


def tiny_model(seed: int = 0, clstm_levels="all", bidirectional: bool = False) -> TimeResolvedUNet:
    torch.manual_seed(seed)
    return TimeResolvedUNet(
        in_channels=1,
        out_channels=len(CLASSES),
        channels=[4, 8],
        strides=[(2, 2, 1)],
        clstm_levels=clstm_levels,
        bidirectional=bidirectional,
    ).eval()


def preprocessing(patch=(8, 8, 2), time_window: int = 3) -> dict:
    return {"patch_size": list(patch), "time_window": time_window, "classes": CLASSES}


def reference(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Whole-volume, whole-series softmax of ``image`` ``(1, T, X, Y, Z)`` -> ``(1, T, K, X, Y, Z)``."""
    with torch.no_grad():
        return torch.softmax(model(image.unsqueeze(2)), dim=2)


# -- time windows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("frames,window,context", [(10, 4, 2), (7, 3, 1), (30, 8, 2), (9, 4, 0), (5, 5, 2)])
def test_time_windows_cover_every_frame(frames, window, context, causal):
    windows = time_windows(frames, window, context, causal=causal)
    covered = torch.zeros(frames)
    for w in windows:
        assert w.stop - w.start == min(window, frames)
        assert 0 <= w.start < w.stop <= frames
        covered[w.start : w.stop] += w.weights
    assert torch.all(covered > 0), covered
    assert windows[0].start == 0 and windows[-1].stop == frames
    if causal and len(windows) > 1 and context:
        # warm-up frames of later windows are context only
        assert all(torch.all(w.weights[:context] == 0) for w in windows[1:])
    if causal:
        # every frame comes from exactly one window: the one that started earliest (longest past)
        assert all(set(w.weights.tolist()) <= {0.0, 1.0} for w in windows)
        for f in range(frames):
            first = next(w for w in windows if w.start <= f < w.stop)
            assert first.weights[f - first.start] == 1
    # shared frames blend to a total weight of exactly one (causal: one window; bidirectional: linear ramps)
    torch.testing.assert_close(covered, torch.ones(frames))


def test_time_windows_whole_series():
    for window in (None, 0, 12, 40):
        (w,) = time_windows(12, window, 2)
        assert (w.start, w.stop) == (0, 12) and torch.all(w.weights == 1)


# -- the predictor on tensors -----------------------------------------------------------------------------


def test_sliding_window_equals_whole_volume_when_one_window_covers_the_image():
    model = tiny_model()
    image = torch.randn(1, 5, 8, 8, 2)  # exactly the patch: one window, Gaussian weights cancel
    predictor = Predictor(model, preprocessing(), F32(overlap=0.5, cyclic=False))
    probs = predictor.predict_case(image)
    assert probs.shape == (1, 5, 4, 8, 8, 2) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, reference(model, image), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(2), torch.ones(1, 5, 8, 8, 2))
    # the (T, X, Y, Z) form and a MetaTensor-free plain tensor give the same
    torch.testing.assert_close(predictor.predict_case(image[0]), probs)


def test_sliding_window_on_a_larger_image_is_a_blend_of_patch_predictions():
    model = tiny_model(clstm_levels=[])  # per-frame UNet: frames are independent
    image = torch.randn(1, 3, 20, 12, 3)  # larger than the patch in x, y, z; z pads nothing
    predictor = Predictor(model, preprocessing(), F32(overlap=0.5, sw_batch_size=3))
    probs = predictor.predict_case(image)
    assert probs.shape == (1, 3, 4, 20, 12, 3)
    torch.testing.assert_close(probs.sum(2), torch.ones(1, 3, 20, 12, 3))
    # a voxel covered by a single window (the corner) equals that window's own prediction
    corner = reference(model, image[..., :8, :8, :2])
    torch.testing.assert_close(probs[..., 0, 0, 0], corner[..., 0, 0, 0], rtol=0, atol=1e-6)


def test_time_windows_agree_with_a_single_pass_where_the_series_fits():
    model = tiny_model()
    image = torch.randn(1, 4, 8, 8, 2)
    single = Predictor(model, preprocessing(), F32(cyclic=False), time_window=None).predict_case(image)
    for window in (4, 6):  # the series fits in one window
        windowed = Predictor(model, preprocessing(), F32(cyclic=False), time_window=window).predict_case(image)
        torch.testing.assert_close(windowed, single, rtol=0, atol=0)
    auto = Predictor(model, preprocessing(), F32(cyclic=False)).predict_case(image)  # "auto": one pass
    torch.testing.assert_close(auto, single, rtol=0, atol=0)


def test_time_windows_blend_exactly_for_a_frame_independent_model():
    """Without recurrence every frame's output is the same in any window: the blending must reproduce it."""
    model = tiny_model(clstm_levels=[])
    image = torch.randn(1, 11, 8, 8, 2)
    single = reference(model, image)
    for causal_flag in (True, False):
        predictor = Predictor(model, preprocessing(), F32(time_overlap=2), time_window=4)
        predictor.causal = causal_flag
        torch.testing.assert_close(predictor.predict_case(image), single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cyclic_inference_equals_a_pass_over_the_wrapped_series(bidirectional):
    """A cine is one heartbeat: frame 0's past is the end of the cycle (and, bidirectional, the last frame's
    future is its start). The wrapped frames are context only; the frames returned are the series'."""
    model = tiny_model(bidirectional=bidirectional)
    image = torch.randn(1, 6, 8, 8, 2)
    predictor = Predictor(model, preprocessing(time_window=3), F32(cyclic=True))
    assert predictor.cyclic_padding(6) == (3, 3 if bidirectional else 0)
    assert predictor.cyclic_padding(2) == (1, 1 if bidirectional else 0)  # never more than T - 1 frames
    before, after = predictor.cyclic_padding(6)
    wrapped = torch.cat([image[:, 6 - before :], image, image[:, :after]], dim=1)
    expected = reference(model, wrapped)[:, before : before + 6]
    probs = predictor.predict_case(image)
    assert probs.shape == (1, 6, 4, 8, 8, 2)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    # and it is not the one-pass result: frame 0 now has a past
    plain = Predictor(model, preprocessing(time_window=3), F32(cyclic=False)).predict_case(image)
    assert not torch.allclose(probs[:, 0], plain[:, 0], atol=1e-4)


def test_cyclic_inference_leaves_a_frame_by_frame_model_unchanged():
    model = tiny_model(clstm_levels=[])
    image = torch.randn(1, 5, 8, 8, 2)
    cyclic = Predictor(model, preprocessing(), F32(cyclic=True)).predict_case(image)
    torch.testing.assert_close(cyclic, reference(model, image), rtol=0, atol=1e-6)


def test_a_streamed_series_equals_one_pass_for_a_causal_model():
    """A causal model carries its ConvLSTM state from chunk to chunk: exact, however the series is cut."""
    model = tiny_model()
    image = torch.randn(1, 10, 8, 8, 2)
    single = reference(model, image)
    for window in (1, 3, 4):
        predictor = Predictor(model, preprocessing(), F32(cyclic=False), time_window=window)
        assert predictor.streaming and predictor.frames_per_pass(10) == window
        torch.testing.assert_close(predictor.predict_case(image), single, rtol=0, atol=1e-5)
    # auto mode streams in chunks of the stream budget, which may be shorter than the training window
    predictor = Predictor(model, preprocessing(time_window=3), F32(cyclic=False), stream_voxel_budget=8 * 8 * 2 * 2)
    assert predictor.frames_per_pass(10) == 2 and predictor.frames_per_pass(2) is None
    torch.testing.assert_close(predictor.predict_case(image), single, rtol=0, atol=1e-5)
    # with TTA every mirroring streams on its own
    tta = Predictor(model, preprocessing(), F32(cyclic=False, tta=True), time_window=3).predict_case(image)
    one_pass = Predictor(model, preprocessing(), F32(cyclic=False, tta=True), time_window=None).predict_case(image)
    torch.testing.assert_close(tta, one_pass, rtol=0, atol=1e-5)


def test_a_long_series_through_time_windows_is_sensible_for_a_bidirectional_model():
    model = tiny_model(bidirectional=True)
    image = torch.randn(1, 10, 8, 8, 2)
    single = reference(model, image)
    predictor = Predictor(model, preprocessing(), F32(time_overlap=2, cyclic=False), time_window=4)
    assert not predictor.streaming
    windowed = predictor.predict_case(image)
    assert windowed.shape == single.shape
    assert torch.isfinite(windowed).all()
    torch.testing.assert_close(windowed.sum(2), torch.ones(1, 10, 8, 8, 2))
    # windows lack the frames outside them: close to the single pass, not identical
    assert not torch.equal(windowed, single)
    assert (windowed - single).abs().mean() < 0.1
    # auto mode with a tiny budget falls back to time windows of at least the training window
    predictor = Predictor(model, preprocessing(time_window=3), F32(), pass_voxel_budget=8 * 8 * 2 * 5)
    assert predictor.frames_per_pass(10) == 5 and predictor.frames_per_pass(5) is None


def test_tta_is_the_average_of_the_mirrored_passes_and_flip_equivariant():
    model = tiny_model()
    image = torch.randn(1, 3, 8, 8, 2)
    tta = Predictor(model, preprocessing(), F32(tta=True, cyclic=False)).predict_case(image)
    expected = torch.zeros_like(tta)
    for dims in [(), (2,), (3,), (2, 3)]:  # x, y of (1, T, X, Y, Z)
        flipped = image.flip(dims) if dims else image
        p = reference(model, flipped)
        expected += p.flip([d + 1 for d in dims]) if dims else p  # (1, T, K, X, Y, Z): spatial dims shift by one
    torch.testing.assert_close(tta, expected / 4, rtol=0, atol=1e-6)
    # TTA over the mirror group makes the prediction mirror-equivariant; a single pass is not
    for dims in [(2,), (3,)]:
        mirrored = Predictor(model, preprocessing(), F32(tta=True, cyclic=False)).predict_case(image.flip(dims))
        torch.testing.assert_close(mirrored, tta.flip([d + 1 for d in dims]), rtol=0, atol=1e-6)
    plain = Predictor(model, preprocessing(), F32(tta=False))
    assert not torch.allclose(plain.predict_case(image.flip((2,))), plain.predict_case(image).flip((3,)), atol=1e-4)


def test_predictor_restores_training_mode_and_checks_channels():
    model = tiny_model().train()
    predictor = Predictor(model, preprocessing(), F32())
    predictor.predict_case(torch.randn(1, 2, 8, 8, 2))
    assert model.training
    with pytest.raises(DataError, match="channel"):
        predictor.predict_case(torch.randn(1, 2, 3, 8, 8, 2))  # 3 channels per frame, model takes 1
    with pytest.raises(DataError, match=r"\(1, T, X, Y, Z\)"):
        predictor.predict_case(torch.randn(8, 8, 2))


def test_large_outputs_are_stitched_on_the_cpu():
    predictor = Predictor(tiny_model(), preprocessing(), F32(cpu_stitch_voxels=1000))
    assert predictor.stitch_device(5, (8, 8, 2)).type == "cpu"  # 5 * 4 * 128 > 1000
    assert predictor.stitch_device(1, (8, 8, 2)) == predictor.device


# -- post-processing ----------------------------------------------------------------------------------------


def test_largest_component_removes_isolated_blobs_per_class_and_frame():
    labels = np.zeros((2, 12, 12, 3), dtype=np.uint8)
    labels[:, 2:6, 2:6, :] = 3  # the LV, both frames
    labels[:, 3:5, 3:5, 1] = 2  # an inner part of another class (not a separate blob of class 3)
    labels[0, 10, 10, 2] = 3  # a one-voxel LV blob far away in frame 0
    labels[1, 9:11, 0:2, 0] = 1  # the RV only in frame 1: its only component stays
    labels[1, 0, 11, 0] = 1  # and a stray RV voxel in frame 1
    cleaned = keep_largest_components(labels, classes=[1, 2, 3])
    assert cleaned.dtype == labels.dtype and cleaned.shape == labels.shape
    assert cleaned[0, 10, 10, 2] == 0 and cleaned[1, 0, 11, 0] == 0
    expected = labels.copy()
    expected[0, 10, 10, 2] = 0
    expected[1, 0, 11, 0] = 0
    np.testing.assert_array_equal(cleaned, expected)
    # diagonal (26-) neighbours are one component: nothing removed
    diagonal = np.zeros((1, 4, 4, 2), dtype=np.uint8)
    diagonal[0, 0, 0, 0] = diagonal[0, 1, 1, 1] = 2
    np.testing.assert_array_equal(keep_largest_components(diagonal), diagonal)


def test_probabilities_to_labels_breaks_ties_towards_background():
    probs = torch.zeros(2, 4, 3, 3, 1)
    probs[:, 2, 1, 1, 0] = 0.9
    labels = probabilities_to_labels(probs)
    assert labels.dtype == np.uint8 and labels.shape == (2, 3, 3, 1)
    assert labels[0, 1, 1, 0] == 2 and labels.sum() == 4


# -- run_prediction on files ------------------------------------------------------------------------------

EXAMPLE4D = os.path.join(nibabel_data_path, "example4d.nii.gz")  # real scanner file, oblique affine, 2 frames


def write_checkpoint(path: Path, target_spacing=(6.0, 6.0, 6.6), **payload_changes) -> Path:
    """A checkpoint of a tiny random model, written through the checkpoint module (nothing trained)."""
    config = config_from_dict(
        {"model": {"channels": [4, 8], "strides": [[2, 2, 1]]}, "train": {"patch_size": [32, 32, 4], "time_window": 2}}
    )
    torch.manual_seed(0)
    model = model_from_hparams(model_hparams(config))
    payload = inference_payload(model, config, preprocessing_from_config(config, target_spacing))
    payload.update(payload_changes)
    return save_checkpoint(path, payload)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def fixed_network_case(
    tmp_path: Path, monkeypatch, labels_for, shape, target_spacing=(3.0, 3.0, 8.0)
) -> tuple[Path, Path]:
    """A checkpoint and a cine of ``shape`` ``(x, y, z, t)`` (spacing 3 x 3 x 8 mm) whose network gives a
    fixed segmentation: ``Predictor.predict_case`` is replaced by ``labels_for(frames, (X, Y, Z))`` (uint8
    labels ``(T, X, Y, Z)`` in 0..3 on the model's grid, ``target_spacing``) as confident probabilities
    ``(1, T, 4, X, Y, Z)``. Returns ``(checkpoint, image)``."""

    def predict_case(self, image, description=None):
        frames, *spatial = image.shape
        one_hot = np.moveaxis(np.eye(4, dtype=np.float32)[labels_for(frames, tuple(spatial))], -1, 1)
        return torch.from_numpy(0.9 * one_hot + 0.025)[None]

    monkeypatch.setattr(Predictor, "predict_case", predict_case)
    checkpoint = write_checkpoint(tmp_path / "model.pt", target_spacing=target_spacing)
    return checkpoint, write_cine(tmp_path / "in" / "case_4d.nii.gz", shape=shape)


@pytest.mark.parametrize("key, value", [("repair_min_drop", 1.5), ("repair_min_drop", 0.0),
                                        ("min_enclosed", 1.5), ("min_enclosed", 0.0)])
def test_an_infer_threshold_out_of_range_is_refused(tmp_path, key, value):
    payload = load_checkpoint(write_checkpoint(tmp_path / "model.pt"))
    payload["config"]["infer"][key] = value
    checkpoint = save_checkpoint(tmp_path / "bad.pt", payload)
    image = write_cine(tmp_path / "in" / "case_4d.nii.gz")
    with pytest.raises(ConfigError, match=key):
        run_prediction(checkpoint, image, tmp_path / "out", device="cpu")


def write_cine(path: Path, shape=(20, 16, 6, 3), affine=None, time_step=25.0) -> Path:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 8.0, 1.0]) if affine is None else affine)
    if len(shape) >= 4:
        img.header.set_xyzt_units("mm", "msec")
        zooms = list(img.header.get_zooms())
        zooms[3] = time_step
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def test_prediction_on_a_scanner_file_keeps_shape_affine_and_time_step(checkpoint, tmp_path, caplog):
    out_dir = tmp_path / "pred"
    with caplog.at_level(logging.INFO, logger="trunet.pipeline.inference"):
        written = run_prediction(checkpoint, EXAMPLE4D, out_dir, device="cpu", save_probabilities=True)
    assert [p.name for p in written] == [
        "example4d_seg.nii.gz", "example4d_prob_0_background.nii.gz", "example4d_prob_1_RV.nii.gz",
        "example4d_prob_2_MYO.nii.gz", "example4d_prob_3_LV.nii.gz",
    ]
    src, seg = nib.load(EXAMPLE4D), nib.load(written[0])
    assert seg.shape == src.shape == (128, 96, 24, 2)
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, src.affine, rtol=0, atol=1e-6)  # oblique: off-diagonal terms
    np.testing.assert_allclose(seg.header.get_sform(), src.header.get_sform(), atol=1e-6)
    np.testing.assert_allclose(seg.header.get_qform(), src.header.get_qform(), atol=1e-6)
    assert seg.header.get_zooms() == src.header.get_zooms()  # time step (pixdim[4]) included
    assert seg.header.get_xyzt_units() == src.header.get_xyzt_units()
    labels = np.asarray(seg.dataobj)
    assert labels.max() < 4
    probs = np.stack([np.asarray(nib.load(p).dataobj) for p in written[1:]])  # (K, x, y, z, t)
    assert probs.shape == (4, 128, 96, 24, 2) and np.isfinite(probs).all()
    assert np.all(probs.sum(0) <= 1 + 1e-4)
    inside = probs.sum(0) > 0.999  # away from the border, the resampled probabilities still sum to one
    assert inside.mean() > 0.5
    # the labels are the arg-max of the probabilities (before the largest-component clean-up removed blobs)
    kept = labels > 0
    np.testing.assert_array_equal(probs.argmax(0)[kept & inside], labels[kept & inside])
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("example4d:")]
    assert len(summary) == 1 and "128x96x24 x 2 frames" in summary[0] and " s on cpu" in summary[0]


def test_postprocessing_flag_keeps_or_cleans_components(checkpoint, tmp_path):
    image = write_cine(tmp_path / "in" / "case_4d.nii.gz", shape=(40, 32, 4, 2))
    raw = run_prediction(checkpoint, image, tmp_path / "raw", device="cpu", postprocess=False)[0]
    clean = run_prediction(checkpoint, image, tmp_path / "clean", device="cpu", postprocess=True)[0]
    assert raw.name == clean.name == "case_seg.nii.gz"  # "_4d" dropped, as evaluation expects
    raw_labels = np.moveaxis(np.asarray(nib.load(raw).dataobj), -1, 0)
    clean_labels = np.moveaxis(np.asarray(nib.load(clean).dataobj), -1, 0)
    np.testing.assert_array_equal(clean_labels, keep_largest_components(raw_labels, classes=[1, 2, 3]))
    # on noise a random model makes many blobs: post-processing must have removed some of them
    assert (clean_labels != raw_labels).any()


def test_inputs_from_a_folder_and_a_datalist(checkpoint, tmp_path):
    folder = tmp_path / "scans"
    write_cine(folder / "p1" / "p1_4d.nii.gz")
    write_cine(folder / "p1" / "p1_4d_gt.nii.gz")  # a label: skipped
    write_cine(folder / "p1" / "p1_frame01.nii.gz", shape=(20, 16, 6))  # a per-frame file: skipped
    write_cine(folder / "p2.nii", shape=(20, 16, 6, 2))
    write_cine(folder / "single.nii.gz", shape=(20, 16, 6))  # 3D: skipped in a folder
    cases = find_inputs(folder, tmp_path / "out")
    assert [(c.case_id, c.image.name) for c in cases] == [("p1", "p1_4d.nii.gz"), ("p2", "p2.nii")]
    written = run_prediction(checkpoint, folder, tmp_path / "out", device="cpu")
    assert sorted(p.name for p in written) == ["p1_seg.nii.gz", "p2_seg.nii.gz"]
    assert nib.load(written[1]).shape == (20, 16, 6, 2)

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "training": [{"case_id": "train1", "image": "scans/p2.nii"}],
        "test": [{"case_id": "t1", "image": "scans/p1/p1_4d.nii.gz"}, str(folder / "p2.nii")],
    }))
    assert [(c.case_id, c.image.name) for c in find_inputs(datalist, tmp_path / "o")] == [
        ("t1", "p1_4d.nii.gz"), ("p2", "p2.nii")]
    datalist.write_text(json.dumps({"training": [{"case_id": "train1", "image": "scans/p2.nii"}], "test": []}))
    assert [c.case_id for c in find_inputs(datalist, tmp_path / "o")] == ["train1"]


def test_a_folder_of_per_frame_files_is_one_case(checkpoint, tmp_path):
    """One 3D file per frame in a folder is one cine, frames in frame-number order (frame2 before frame10)."""
    folder = tmp_path / "scans"
    frames = folder / "caseA"
    for t in range(1, 11):
        write_cine(frames / f"caseA_frame{t}.nii.gz", shape=(20, 16, 6))
    write_cine(folder / "p2_4d.nii.gz", shape=(20, 16, 6, 2))  # a 4D cine beside it: its own case
    cases = find_inputs(folder, tmp_path / "out")
    assert [(c.case_id, c.image) for c in cases] == [("caseA", frames), ("p2", folder / "p2_4d.nii.gz")]
    assert [(c.case_id, c.image) for c in find_inputs(frames, tmp_path / "out")] == [("caseA", frames)]
    header = read_header(frames)
    assert header.shape == (20, 16, 6, 10)
    assert [Path(f).name for f in header.frame_files] == [f"caseA_frame{t}.nii.gz" for t in range(1, 11)]
    (written,) = run_prediction(checkpoint, frames, tmp_path / "pred", device="cpu")
    assert written.name == "caseA_seg.nii.gz" and nib.load(written).shape == (20, 16, 6, 10)
    np.testing.assert_allclose(nib.load(written).affine, nib.load(frames / "caseA_frame1.nii.gz").affine)


@pytest.mark.parametrize("layout,found", [
    ("two_series", r"frames of 2 series \(a_frameNN: 3 files, b_frameNN: 3 files\)"),
    ("labels", r"1 file\(s\) without a frame number \(case_frame01_gt.nii.gz\)"),
    ("gap", r"frame numbers 1, 2, 4, 5 with a gap"),
    ("twice", r"frame number\(s\) 2 twice"),
    ("first_4d", r"case_frame01.nii.gz: is a 4D image of shape \(20, 16, 6, 3\)"),
    ("grid", r"case_frame03.nii.gz: frame shape \(20, 16, 5\) differs"),
])
def test_a_folder_of_3d_files_that_is_not_one_cine_is_one_clear_error(checkpoint, tmp_path, layout, found):
    folder = tmp_path / "frames"
    names = {"two_series": [f"{s}_frame{t:02d}" for s in "ab" for t in (1, 2, 3)],
             "gap": [f"case_frame{t:02d}" for t in (1, 2, 4, 5)],
             "twice": ["case_frame01", "case_frame02", "case_frame2", "case_frame03"]}
    for name in names.get(layout, [f"case_frame{t:02d}" for t in (1, 2, 3, 4)]):
        write_cine(folder / f"{name}.nii.gz", shape=(20, 16, 6))
    if layout == "labels":
        write_cine(folder / "case_frame01_gt.nii.gz", shape=(20, 16, 6))
    elif layout == "first_4d":
        write_cine(folder / "case_frame01.nii.gz", shape=(20, 16, 6, 3))
    elif layout == "grid":
        write_cine(folder / "case_frame03.nii.gz", shape=(20, 16, 5))
    for inputs in (folder, tmp_path):  # the folder itself, or a folder above it
        with pytest.raises(DataError, match=found) as err:
            run_prediction(checkpoint, inputs, tmp_path / "out", device="cpu")
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_over_inputs_or_references(checkpoint, tmp_path):
    folder = tmp_path / "scans"
    image = write_cine(folder / "case_4d.nii.gz")
    reference = write_cine(folder / "case_seg.nii.gz")  # e.g. a manual segmentation next to the scan
    before = reference.read_bytes()
    with pytest.raises(DataError, match="input folder"):
        run_prediction(checkpoint, image, folder, device="cpu")
    assert reference.read_bytes() == before
    # the same folder is fine when no name collides
    reference.unlink()
    (written,) = run_prediction(checkpoint, image, folder, device="cpu")
    assert written == folder / "case_seg.nii.gz" and image.exists()


@pytest.mark.parametrize(
    "problem,match",
    [
        ("missing", "checkpoint not found"),
        ("corrupt", "not a readable checkpoint"),
        ("version", "format 99 is incompatible"),
        ("classes", "3 class names"),
        ("no_preprocessing", "no preprocessing"),
    ],
)
def test_bad_checkpoints_are_clear_errors(problem, match, tmp_path):
    path = tmp_path / "bad.pt"
    if problem == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    elif problem == "version":
        write_checkpoint(path, format_version=99)
    elif problem == "classes":
        write_checkpoint(path, classes=["background", "RV", "LV"])
    elif problem == "no_preprocessing":
        write_checkpoint(path, preprocessing=None)
    image = write_cine(tmp_path / "case_4d.nii.gz")
    with pytest.raises(CheckpointError, match=match):
        run_prediction(path, image, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_wrong_dimensionality_and_empty_inputs_are_clear_errors(checkpoint, tmp_path):
    five_d = write_cine(tmp_path / "a" / "multi_4d.nii.gz", shape=(20, 16, 6, 3, 2))  # a channel axis
    with pytest.raises(DataError, match="5 dimensions"):
        run_prediction(checkpoint, five_d, tmp_path / "out", device="cpu")
    three_d = write_cine(tmp_path / "b" / "vol.nii.gz", shape=(20, 16, 6))
    with pytest.raises(DataError, match="3D image"):
        run_prediction(checkpoint, three_d, tmp_path / "out", device="cpu")
    with pytest.raises(DataError, match="no input images found"):
        run_prediction(checkpoint, tmp_path / "b", tmp_path / "out", device="cpu")
    with pytest.raises(DataError, match="input not found"):
        run_prediction(checkpoint, tmp_path / "nothing.nii.gz", tmp_path / "out", device="cpu")


def test_cli_predict_prints_one_line_for_a_user_error(tmp_path, capsys):
    image = write_cine(tmp_path / "case_4d.nii.gz")
    code = main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--input", str(image), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint not found" in err[0]


def test_refuses_its_input_folder_as_output_and_earlier_predictions(checkpoint, tmp_path):
    folder = tmp_path / "in"
    write_cine(folder / "case_4d.nii.gz")
    with pytest.raises(DataError, match="in: --input and --output are the same folder"):
        run_prediction(checkpoint, folder, folder, device="cpu")
    out = tmp_path / "out"
    (first,) = run_prediction(checkpoint, folder, out, device="cpu")
    first.write_bytes(b"an earlier result")
    with pytest.raises(DataError, match="case_seg.nii.gz: exists .* pass --overwrite"):
        run_prediction(checkpoint, folder, out, device="cpu")
    assert first.read_bytes() == b"an earlier result"
    (again,) = run_prediction(checkpoint, folder, out, device="cpu", overwrite=True)
    assert again == first and nib.load(again).shape == (20, 16, 6, 3)


def test_cli_predict_on_a_full_disk_prints_one_line_and_leaves_no_partial_file(checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    import errno

    from trunet.io import nifti

    image = write_cine(tmp_path / "case_4d.nii.gz")
    out = tmp_path / "out"

    def full_disk(img, filename):
        Path(filename).write_bytes(b"\x00" * 100)  # the device fills half way through the file
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(nifti.nib, "save", full_disk)
    code = main(["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(out)])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bars
    assert code == 74 and "Traceback" not in err, err
    assert line.startswith(f"trunet predict: error: {out / 'case_seg.nii.gz'}: no space left on device (")
    assert " free, at least 100 B needed)" in line
    assert not [p for p in out.rglob("*") if p.is_file()]  # no partial output


# -- end to end with a trained model ---------------------------------------------------------------------


def _dice(pred: np.ndarray, ref: np.ndarray, k: int) -> float:
    a, b = pred == k, ref == k
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.mark.slow
def test_a_tiny_trained_model_segments_fresh_phantom_cases(tmp_path, configs_dir):
    """Train briefly on phantom cases (50 steps), predict a case from another seed, compare with its labels;
    bf16 and float32 inference agree on >= 99.5% of the voxels.

    The slowest test here: ~3 min on the busy shared 2-core VM, where one step of this tiny model took 1-9 s.
    """
    from trunet.data.phantom import write_phantom_dataset
    from trunet.config import load_config
    from trunet.pipeline.training import run_training

    small = {"inplane_scale": 0.5, "max_frames": 4}
    train_list = write_phantom_dataset(tmp_path / "train", cases=3, seed=0, **small)
    fresh_list = write_phantom_dataset(tmp_path / "fresh", cases=1, seed=1, **small)
    config = load_config(configs_dir / "tiny.yaml", [
        f"data.root={train_list}", "model.channels=[8,16,32]", "train.batch_size=2", "train.time_window=3",
        "train.epochs=1", f"train.iterations_per_epoch={TRAIN_ITERATIONS}", f"train.lr={TRAIN_LR}",
        "train.val_every=1", "tracking.wandb.mode=disabled",
    ])
    run = run_training(config, run_dir=tmp_path / "run")
    checkpoint = run / "checkpoints" / "best.pt"

    (seg,) = run_prediction(checkpoint, fresh_list, tmp_path / "pred", device="cpu", cpu_bf16=True)
    (seg_f32,) = run_prediction(checkpoint, fresh_list, tmp_path / "pred-f32", device="cpu", cpu_bf16=False)
    # the bf16 path (the default on CPUs with bf16 instructions) gives the float32 masks
    agreement = np.mean(np.asarray(nib.load(seg).dataobj) == np.asarray(nib.load(seg_f32).dataobj))
    assert agreement >= 0.995, agreement
    (untrained,) = run_prediction(write_checkpoint(tmp_path / "random.pt", target_spacing=(4.0, 4.0, 8.0)),
                                  fresh_list, tmp_path / "pred-random", device="cpu")
    ref = np.asarray(nib.load(tmp_path / "fresh" / "patient001" / "patient001_4d_gt.nii.gz").dataobj)
    pred = np.asarray(nib.load(seg).dataobj)
    assert pred.shape == ref.shape
    dice = {k: _dice(pred, ref, k) for k in (1, 2, 3)}
    chance = {k: _dice(np.asarray(nib.load(untrained).dataobj), ref, k) for k in (1, 2, 3)}
    # after 50 steps: LV ~0.4, MYO ~0.4, RV ~0.2-0.3 on this fresh case (a random model: near 0)
    assert dice[3] > 0.25 and dice[2] > 0.25, (dice, chance)  # LV cavity and myocardium found
    assert np.mean(list(dice.values())) > np.mean(list(chance.values())) + 0.15, (dice, chance)


def test_cli_predict_writes_the_segmentation(checkpoint, tmp_path):
    image = write_cine(tmp_path / "in" / "case_4d.nii.gz")
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(checkpoint), "--input", str(image.parent), "--output", str(out),
                 "--device", "cpu", "--overlap", "0.25", "--no-postprocess"])
    assert code == 0
    assert [p.name for p in out.iterdir()] == ["case_seg.nii.gz"]  # no temporary files left behind
    assert nib.load(out / "case_seg.nii.gz").shape == (20, 16, 6, 3)


def test_post_processing_keeps_the_component_that_persists_through_the_cycle():
    """A small true end-systolic cavity outranks a larger blob that appears in a few frames only."""
    frames, shape = 6, (24, 24, 4)
    labels = np.zeros((frames, *shape), np.uint8)
    radius = [6, 5, 3, 3, 5, 6]  # the cavity shrinks to end-systole (frames 2-3) and refills
    xx, yy = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    for t, r in enumerate(radius):
        labels[t][(xx - 7) ** 2 + (yy - 7) ** 2 <= r * r] = 3
    blob = np.zeros(shape, bool)
    blob[15:22, 15:22, :] = True  # 7x7x4 = 196 voxels, larger than the end-systolic cavity (29x4 = 116)
    labels[2][blob] = 3
    labels[3][blob] = 3
    es_cavity = (labels[2] == 3) & ~blob
    assert blob.sum() > es_cavity.sum()  # a per-frame largest component would keep the blob

    cleaned = keep_largest_components(labels, classes=[3])
    for t in (2, 3):
        np.testing.assert_array_equal(cleaned[t] == 3, es_cavity)
    np.testing.assert_array_equal(cleaned[[0, 1, 4, 5]], labels[[0, 1, 4, 5]])
    # one frame alone has no cycle to consult: the largest component wins, as before
    np.testing.assert_array_equal(keep_largest_components(labels[2]) == 3, blob)


def test_cli_predict_nan_input_is_one_line_naming_the_file(checkpoint, tmp_path, capsys):
    image = write_cine(tmp_path / "in" / "case_4d.nii.gz")
    data = np.asarray(nib.load(image).dataobj).copy()
    data[3, 4, 2, 1] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(image).affine, nib.load(image).header), image)
    code = main(["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output", str(tmp_path / "o"),
                 "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert code == 2 and len(err) == 1, err
    assert str(image) in err[0] and "NaN" in err[0]


@pytest.mark.parametrize("flags, expected", [([], None), (["--tta"], True), (["--no-tta"], False)])
def test_cli_predict_tta_flags(monkeypatch, tmp_path, flags, expected):
    import trunet.pipeline.inference as infer

    seen = {}
    monkeypatch.setattr(infer, "run_prediction", lambda **kwargs: seen.update(kwargs) or [])
    assert main(["predict", "--checkpoint", "c.pt", "--input", "i", "--output", str(tmp_path), *flags]) == 0
    assert seen["tta"] is expected  # None: the checkpoint's infer.tta decides


def test_tta_on_a_model_trained_without_mirroring_says_so(checkpoint, tmp_path, caplog):
    """The checkpoint's train.augment.flip_prob is 0 (the default): mirroring TTA says so, plain inference not."""
    image = write_cine(tmp_path / "in" / "case_4d.nii.gz")
    with caplog.at_level(logging.INFO, logger="trunet.pipeline.inference"):
        run_prediction(checkpoint, image, tmp_path / "plain", device="cpu", tta=False)
        assert "mirroring TTA" not in caplog.text
        run_prediction(checkpoint, image, tmp_path / "tta", device="cpu", tta=True)
    assert "trained without mirroring (train.augment.flip_prob 0)" in caplog.text
    caplog.clear()
    config = config_from_dict({"model": {"channels": [4, 8], "strides": [[2, 2, 1]]},
                               "train": {"patch_size": [32, 32, 4], "time_window": 2, "augment": {"flip_prob": 0.5}}})
    torch.manual_seed(0)
    model = model_from_hparams(model_hparams(config))
    flipped = save_checkpoint(tmp_path / "flipped.pt", inference_payload(model, config,
                                                                         preprocessing_from_config(config, (6.0, 6.0, 6.6))))
    with caplog.at_level(logging.INFO, logger="trunet.pipeline.inference"):
        run_prediction(flipped, image, tmp_path / "tta-flipped", device="cpu", tta=True)
    assert "mirroring TTA" not in caplog.text
