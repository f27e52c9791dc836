"""Transform chains with time as the channel: inversion to the original grid, one geometry for all frames,
foreground sampling from every frame, sparse-label masking, temporal windows, and the MONAI 1.6 pitfalls
(time step lost by NibabelReader, frame 0 dropped by label-based crops, geometry lost by PersistentDataset).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cine_factory import SHAPE, make_image, make_label, oblique_affine, write_case, write_nifti
from trunet.config import load_config
from trunet.data.datasets import make_dataset
from trunet.transforms.cardiac import RandTemporalWindowd
from trunet.transforms.compose import (
    inference_transforms,
    invert_prediction,
    preprocessing_from_config,
    train_transforms,
)

NO_INTENSITY = [f"train.augment.{k}=0.0" for k in
                ("gamma_prob", "contrast_prob", "noise_prob", "blur_prob", "low_res_prob")]
ALL_SPATIAL = [f"train.augment.{k}=1.0" for k in ("rotate_prob", "scale_prob", "flip_prob", "elastic_prob")]


def _config(configs_dir: Path, *overrides: str):
    base = ["train.patch_size=[16,16,4]", "train.time_window=3"]
    return load_config(configs_dir / "tiny.yaml", [*base, *overrides])


def _samples(chain, record: dict, n: int, seed: int = 0) -> list[dict]:
    chain.set_random_state(seed)
    out = []
    for _ in range(n):
        s = chain(dict(record))
        out.append(s[0] if isinstance(s, list) else s)
    return out


@pytest.fixture
def case(tmp_path: Path) -> dict:
    return write_case(tmp_path, time_step=37.5)


@pytest.mark.parametrize("orientation", [None, "RAS"])
def test_inverse_restores_original_grid_on_oblique_affine(configs_dir: Path, case: dict, orientation) -> None:
    pre = preprocessing_from_config(_config(configs_dir), (1.1, 0.9, 6.0))
    pre["orientation"] = orientation
    chain = inference_transforms(pre)
    out = chain(dict(case))
    assert out["image"].shape[0] == SHAPE[3] and tuple(out["image"].shape[1:]) != SHAPE[:3]
    # a label map on the preprocessed grid goes back with the file's shape and affine
    predicted = out["label"].as_tensor().clone()  # a plain tensor, as the predictor has it
    back = invert_prediction(chain, out["image"], predicted)
    assert tuple(back.shape) == (SHAPE[3],) + SHAPE[:3] and back.dtype == torch.uint8
    np.testing.assert_allclose(back.affine.numpy(), oblique_affine(), atol=1e-4)
    original = np.moveaxis(make_label(), -1, 0)
    assert (back.numpy() == original).mean() > 0.95
    # so does a float map (the image itself), with the transforms' own interpolation
    img_back = invert_prediction(chain, out["image"], out["image"].clone(), nearest=False)
    assert tuple(img_back.shape) == (SHAPE[3],) + SHAPE[:3]
    np.testing.assert_allclose(img_back.affine.numpy(), oblique_affine(), atol=1e-4)


def test_time_step_survives_loading(configs_dir: Path, case: dict) -> None:
    """Pitfall 1: MONAI's NibabelReader sets pixdim[4] to 1; trunet keeps the raw header's time step."""
    pre = preprocessing_from_config(_config(configs_dir), (1.5, 1.6, 8.0))
    out = inference_transforms(pre)(dict(case))
    assert out["image"].meta["time_step"] == pytest.approx(37.5)


def test_one_geometry_for_all_frames(configs_dir: Path, tmp_path: Path) -> None:
    """Frame t = (t + 1) x frame 0. Linear interpolation and z-scoring keep z_t - z_0 = t (z_1 - z_0) only
    when every frame is resampled with the same geometry."""
    base = np.random.default_rng(1).uniform(1, 2, SHAPE[:3]).astype(np.float32)
    image = np.stack([(t + 1) * base for t in range(SHAPE[3])], axis=-1)
    path = write_nifti(tmp_path / "ratio.nii.gz", image, oblique_affine(), 30.0)
    lab = write_nifti(tmp_path / "ratio_gt.nii.gz", make_label(), oblique_affine(), 30.0)
    record = {"image": str(path), "label": str(lab)}
    # deterministic chain: frame order known
    pre = preprocessing_from_config(_config(configs_dir), (1.2, 1.3, 7.0))
    z = inference_transforms(pre)(dict(record))["image"].numpy()
    d1 = z[1] - z[0]
    assert np.abs(d1).max() > 0.1
    for t in range(2, SHAPE[3]):
        np.testing.assert_allclose(z[t] - z[0], t * d1, atol=1e-4)
    # training chain with every spatial augmentation on: the differences stay collinear
    config = _config(configs_dir, *ALL_SPATIAL, *NO_INTENSITY, "train.time_window=4")
    for s in _samples(train_transforms(config, (1.2, 1.3, 7.0)), record, 4):
        zz = s["image"].numpy().reshape(4, -1)
        ref = zz[1] - zz[0]
        assert np.abs(ref).max() > 0.1
        for t in range(2, 4):
            diff = zz[t] - zz[0]
            corr = np.dot(diff, ref) / (np.linalg.norm(diff) * np.linalg.norm(ref))
            assert abs(corr) > 0.9999


def test_foreground_in_frame0_only_is_sampled(configs_dir: Path, tmp_path: Path) -> None:
    """Pitfall 2: a label-based crop on the (T, ...) label would drop frame 0; ours samples the union."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 15:18, 1:3, 0] = 3  # a small structure near a corner, frame 0 only
    aff = np.diag([1.5, 1.5, 8.0, 1.0])
    record = {"image": str(write_nifti(tmp_path / "i.nii.gz", make_image(label), aff, 30.0)),
              "label": str(write_nifti(tmp_path / "l.nii.gz", label, aff, 30.0))}
    config = _config(configs_dir, "train.patch_size=[8,8,2]", "train.time_window=5",
                     "train.foreground_oversample=1.0", "train.augment.rotate_prob=0.5", *NO_INTENSITY)
    for s in _samples(train_transforms(config, (1.5, 1.5, 8.0)), record, 8):
        assert ((s["label"] > 0) & (s["label"] < 255)).any()


def test_sparse_labels_stay_masked_through_crops_pads_and_augmentation(configs_dir: Path, case: dict) -> None:
    record = dict(case, frames=[0, 3])
    # the patch is larger than the volume in-plane: padding everywhere, plus rotation, scaling, flips, elastic
    config = _config(configs_dir, "train.patch_size=[32,32,4]", *ALL_SPATIAL)
    for s in _samples(train_transforms(config, (1.5, 1.6, 8.0)), record, 6):
        label, mask = s["label"], s["frame_mask"]
        assert label.shape == (3, 32, 32, 4) and label.dtype == torch.int64 and mask.dtype == torch.bool
        assert mask.any()
        assert (label[~mask] == 255).all()
        assert set(label[mask].unique().tolist()) <= {0, 1, 2, 3}
        assert (label[mask] > 0).any()


def test_temporal_window_is_cyclic_and_holds_a_labelled_frame() -> None:
    frames = torch.arange(7).view(7, 1, 1, 1).float()
    mask = torch.zeros(7, dtype=torch.bool)
    mask[[1, 5]] = True
    window = RandTemporalWindowd(["image"], window=4)
    window.set_random_state(0)
    starts = set()
    for _ in range(60):
        out = window({"image": frames, "frame_mask": mask})
        idx = out["image"].view(-1).long()
        assert ((idx - idx[0]) % 7 == torch.arange(4)).all()  # consecutive, wrapping around
        assert torch.equal(out["frame_mask"], mask[idx]) and out["frame_mask"].any()
        starts.add(int(idx[0]))
    assert 0 in starts and 6 in starts  # windows wrap past the last frame
    long = RandTemporalWindowd(["image"], window=10)({"image": frames, "frame_mask": mask})
    assert long["image"].shape[0] == 10  # a short cine repeats frames cyclically


def test_persistent_cache_keeps_geometry(configs_dir: Path, case: dict, tmp_path: Path) -> None:
    """Pitfall 3: PersistentDataset with track_meta=False loses the affine on cached reads."""
    pre = preprocessing_from_config(_config(configs_dir), (1.1, 0.9, 6.0))
    chain = inference_transforms(pre)
    fresh = chain(dict(case))
    ds = make_dataset([case], chain, "disk", tmp_path / "cache", pre, "test")
    first = ds[0]  # computes and writes the cache
    assert list((tmp_path / "cache").rglob("*.pt"))
    cached = ds[0]  # read back from disk
    for item in (first, cached):
        assert hasattr(item["image"], "affine")
        np.testing.assert_allclose(item["image"].affine.numpy(), fresh["image"].affine.numpy(), atol=1e-6)
        assert item["image"].meta["time_step"] == pytest.approx(37.5)
        torch.testing.assert_close(item["label"].as_tensor(), fresh["label"].as_tensor())
    back = invert_prediction(chain, cached["image"], cached["label"])
    np.testing.assert_allclose(back.affine.numpy(), oblique_affine(), atol=1e-4)


class _RunsCode:
    """A pickle that makes a folder when unpickled with ``weights_only=False``: code run from a cache file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("bad", ["runs_code", "corrupt", "foreign"])
def test_disk_cache_runs_no_code_and_rebuilds_a_bad_file(configs_dir: Path, case: dict, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture, bad: str) -> None:
    """Cache files hold plain tensors and values (they load with weights_only=True); a file that is not one
    (a pickle that would run code, random bytes, another program's file) is rebuilt with a warning."""
    pre = preprocessing_from_config(_config(configs_dir), (1.1, 0.9, 6.0))
    chain = inference_transforms(pre)
    fresh = chain(dict(case))
    make_dataset([case], chain, "disk", tmp_path / "cache", pre, "test")
    (cache_file,) = (tmp_path / "cache").rglob("*.pt")
    payload = torch.load(cache_file, weights_only=True)  # torch's safe unpickler: tensors and plain values
    assert payload["format"] == "trunet-cache"
    marker = tmp_path / "code-ran"
    if bad == "runs_code":
        torch.save({"item": _RunsCode(marker)}, cache_file)
    elif bad == "corrupt":
        cache_file.write_bytes(os.urandom(300))
    else:
        torch.save({"weights": torch.zeros(3)}, cache_file)
    with caplog.at_level(logging.WARNING, logger="trunet.data.cache"):
        ds = make_dataset([case], chain, "disk", tmp_path / "cache", pre, "test")
        item = ds[0]
    assert not marker.exists()
    assert f"{cache_file}: " in caplog.text and "rebuilding this cache file" in caplog.text
    assert torch.load(cache_file, weights_only=True)["format"] == "trunet-cache"  # replaced by a good one
    np.testing.assert_allclose(item["image"].affine.numpy(), fresh["image"].affine.numpy(), atol=1e-6)
    torch.testing.assert_close(item["image"].as_tensor(), fresh["image"].as_tensor())
    assert item["image"].meta["time_step"] == pytest.approx(37.5)
    assert [op["class"] for op in item["image"].applied_operations] == \
        [op["class"] for op in fresh["image"].applied_operations]


def test_intensity_augmentation_keeps_shapes(configs_dir: Path, case: dict) -> None:
    config = _config(configs_dir, *[o.replace("=0.0", "=1.0") for o in NO_INTENSITY])
    for s in _samples(train_transforms(config, (1.5, 1.6, 8.0)), case, 3):
        assert s["image"].shape == (3, 16, 16, 4) and s["image"].dtype == torch.float32
        assert torch.isfinite(s["image"]).all()
        assert set(s) == {"image", "label", "frame_mask", "case_id"}


def test_preprocessing_is_json(configs_dir: Path) -> None:
    pre = preprocessing_from_config(_config(configs_dir), (1.5, 1.5, 8.0))
    assert json.loads(json.dumps(pre)) == pre
    assert pre["patch_size"] == [16, 16, 4] and pre["time_window"] == 3 and pre["ignore_index"] == 255
