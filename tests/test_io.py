"""Readers and writer of 4D cines: layouts, formats, time step, geometry, and every bad input."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cine_factory import SHAPE, make_image, make_label, oblique_affine, write_case, write_nifti
from trunet.errors import DataError
from trunet.io import load_cine, load_label, read_header, save_cine_like

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _write_mha(path: Path, data_xyzt: np.ndarray, affine_ras: np.ndarray, time_step: float) -> Path:
    """Write a 4D MetaImage with SimpleITK from an (x, y, z, t) array and a RAS affine."""
    lps = LPS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = np.eye(4)
    direction[:3, :3] = lps[:3, :3] / spacing
    frames = [sitk.GetImageFromArray(np.ascontiguousarray(data_xyzt[..., t].transpose(2, 1, 0)))  # (z, y, x)
              for t in range(data_xyzt.shape[3])]
    img = sitk.JoinSeries(frames)  # 4D (x, y, z, t)
    img.SetSpacing([*spacing.tolist(), time_step])
    img.SetOrigin([*lps[:3, 3].tolist(), 0.0])
    img.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def case(tmp_path: Path) -> dict:
    return write_case(tmp_path, time_step=37.5)


def test_load_cine_nifti_layout_and_time_step(case: dict) -> None:
    array, meta = load_cine(case["image"])
    raw = nib.load(case["image"]).get_fdata()
    assert array.shape == (SHAPE[3],) + SHAPE[:3] and array.dtype == np.float32
    np.testing.assert_allclose(array[3], raw[..., 3], rtol=1e-6)  # frame t is array[t]
    assert meta.shape == SHAPE and meta.n_frames == SHAPE[3]
    assert meta.time_step == pytest.approx(37.5)  # MONAI's NibabelReader would report 1
    np.testing.assert_allclose(meta.affine, oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(meta.spacing, (1.5, 1.6, 8.0), atol=1e-5)
    header = read_header(case["image"])  # header only, same geometry
    assert header.shape == meta.shape and np.allclose(header.affine, meta.affine)


def test_time_step_in_seconds_is_converted(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 2, 3), np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((1, 1, 1, 0.05))
    nib.save(img, str(tmp_path / "s.nii.gz"))
    assert load_cine(tmp_path / "s.nii.gz")[1].time_step == pytest.approx(50.0)


def test_nibabel_and_simpleitk_agree(case: dict, tmp_path: Path) -> None:
    array, meta = load_cine(case["image"])
    # the same NIfTI through SimpleITK
    a2, m2 = load_cine(case["image"], reader="sitk")
    np.testing.assert_array_equal(array, a2)
    np.testing.assert_allclose(m2.affine, meta.affine, atol=1e-4)
    assert m2.time_step == pytest.approx(meta.time_step, rel=1e-5)
    # a MetaImage written with the same geometry
    raw = nib.load(case["image"]).get_fdata().astype(np.float32)
    mha = _write_mha(tmp_path / "c.mha", raw, meta.affine, 37.5)
    a3, m3 = load_cine(mha)
    np.testing.assert_allclose(a3, array, rtol=1e-6)
    np.testing.assert_allclose(m3.affine, meta.affine, atol=1e-4)
    assert m3.time_step == pytest.approx(37.5) and m3.shape == meta.shape


def test_folder_of_frames_equals_4d(case: dict, tmp_path: Path) -> None:
    array, meta = load_cine(case["image"])
    folder = tmp_path / "frames"
    for t in range(SHAPE[3]):  # names sort naturally: frame2 before frame10
        write_nifti(folder / f"frame{t * 5}.nii.gz", np.moveaxis(array, 0, -1)[..., t], meta.affine)
    a2, m2 = load_cine(folder)
    np.testing.assert_array_equal(a2, array)
    assert m2.shape == meta.shape and m2.time_step is None


@pytest.mark.parametrize("position", ["first", "later"])
def test_a_4d_file_in_a_folder_of_frames_is_refused(case: dict, tmp_path: Path, position: str) -> None:
    """A 4D file among the frames is an error naming it and its shape, never its frame 0 used as a frame."""
    array, meta = load_cine(case["image"])
    frames = np.moveaxis(array, 0, -1)  # (x, y, z, t)
    folder = tmp_path / "frames"
    for t in range(SHAPE[3]):
        write_nifti(folder / f"frame{t + 1:02d}.nii.gz", frames[..., t], meta.affine)
    four_d = "frame01.nii.gz" if position == "first" else "frame03.nii.gz"
    write_nifti(folder / four_d, frames[..., :2], meta.affine, 37.5)
    shape = rf"\({SHAPE[0]}, {SHAPE[1]}, {SHAPE[2]}, 2\)"
    for read in (read_header, load_cine):
        with pytest.raises(DataError, match=rf"{four_d}: is a 4D image of shape {shape}; .*one 3D frame") \
                as err:
            read(folder)
        assert "\n" not in str(err.value)


def test_load_label_dense_sparse_and_mapping(case: dict, tmp_path: Path) -> None:
    _, meta = load_cine(case["image"])
    dense, mask, _ = load_label(case["label"], like=meta, num_classes=4)
    assert dense.shape == (5,) + SHAPE[:3] and dense.dtype == np.uint8 and mask.all()
    sparse, mask2, _ = load_label(case["label"], frames=[0, 3], like=meta, num_classes=4)
    assert mask2.tolist() == [True, False, False, True, False]
    assert (sparse[~mask2] == 255).all() and np.array_equal(sparse[mask2], dense[mask2])
    files = {t: write_nifti(tmp_path / f"gt{t}.nii.gz", dense[t], meta.affine) for t in (1, 4)}
    mapped, mask3, m3 = load_label(files, like=meta, num_classes=4)
    assert mask3.tolist() == [False, True, False, False, True] and m3.shape == meta.shape
    assert np.array_equal(mapped[1], dense[1]) and (mapped[0] == 255).all()


def test_save_cine_like_round_trip(case: dict, tmp_path: Path) -> None:
    labels, _, _ = load_label(case["label"])
    out = save_cine_like(labels, case["image"], tmp_path / "pred" / "case0_pred.nii.gz")
    ref, new = nib.load(case["image"]), nib.load(out)
    assert new.shape == ref.shape and new.get_data_dtype() == np.uint8
    np.testing.assert_allclose(new.affine, ref.affine, atol=1e-6)
    assert new.header.get_zooms() == pytest.approx(ref.header.get_zooms())  # time step included
    np.testing.assert_array_equal(np.asanyarray(new.dataobj), np.moveaxis(labels, 0, -1))
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind


def test_save_cine_like_refuses_to_overwrite_input(case: dict) -> None:
    labels, _, _ = load_label(case["label"])
    before = Path(case["image"]).read_bytes()
    with pytest.raises(DataError, match="over its input"):
        save_cine_like(labels, case["image"], case["image"])
    assert Path(case["image"]).read_bytes() == before


# --- bad inputs -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as exc:
        load_cine(tmp_path / "nope.nii.gz")
    assert str(tmp_path / "nope.nii.gz") in str(exc.value)


def test_not_an_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a NIfTI file at all" * 20))
    with pytest.raises(DataError, match="bad.nii.gz"):
        load_cine(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="not an image"):
        load_cine(txt)
    mha = tmp_path / "bad.mha"
    mha.write_text("garbage")
    with pytest.raises(DataError, match="bad.mha"):
        load_cine(mha)


def test_truncated_gzip(case: dict, tmp_path: Path) -> None:
    data = Path(case["image"]).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as exc:
        load_cine(cut)
    assert "cut.nii.gz" in str(exc.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(case: dict) -> None:
    os.chmod(case["image"], 0)
    try:
        with pytest.raises(DataError, match="not readable"):
            load_cine(case["image"])
    finally:
        os.chmod(case["image"], 0o644)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_intensities(tmp_path: Path, value: float) -> None:
    img = make_image(make_label())
    img[3, 4, 1, 2] = value
    path = write_nifti(tmp_path / "nan.nii.gz", img, np.eye(4))
    with pytest.raises(DataError, match="NaN or infinite"):
        load_cine(path)


def test_3d_image_where_cine_expected(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "vol.nii.gz", make_image(make_label())[..., 0], np.eye(4))
    with pytest.raises(DataError, match="3D image.*allow_3d"):
        load_cine(path)
    with pytest.warns(UserWarning, match="one frame"):
        array, meta = load_cine(path, allow_3d=True)
    assert array.shape == (1,) + SHAPE[:3] and meta.ndim == 3


def test_label_shape_and_affine_mismatch(case: dict, tmp_path: Path) -> None:
    _, meta = load_cine(case["image"])
    small = write_nifti(tmp_path / "small.nii.gz", make_label((20, 20, 4, 5)), meta.affine)
    with pytest.raises(DataError, match="small.nii.gz: label shape"):
        load_label(small, like=meta)
    moved = meta.affine.copy()
    moved[0, 3] += 5.0
    shifted = write_nifti(tmp_path / "shifted.nii.gz", make_label(), moved)
    with pytest.raises(DataError, match="shifted.nii.gz: label affine differs"):
        load_label(shifted, like=meta)
    fewer = write_nifti(tmp_path / "fewer.nii.gz", make_label(SHAPE[:3] + (3,)), meta.affine)
    with pytest.raises(DataError, match="3 frames, the image has 5"):
        load_label(fewer, like=meta)


def test_label_values_outside_classes(tmp_path: Path) -> None:
    lab = make_label()
    lab[0, 0, 0, 0] = 7
    path = write_nifti(tmp_path / "seven.nii.gz", lab, np.eye(4))
    with pytest.raises(DataError, match=r"label values \[7\] are outside the configured classes 0..3"):
        load_label(path, num_classes=4)


def test_non_integer_label(tmp_path: Path) -> None:
    lab = make_label().astype(np.float32)
    lab[2, 2, 1, 0] = 1.5
    path = write_nifti(tmp_path / "float.nii.gz", lab, np.eye(4))
    with pytest.raises(DataError, match="non-integer"):
        load_label(path, num_classes=4)
    lab[2, 2, 1, 0] = 1.0  # integer values stored as float are fine
    ok = write_nifti(tmp_path / "float_ok.nii.gz", lab, np.eye(4))
    assert load_label(ok, num_classes=4)[0].dtype == np.uint8


def test_label_frame_index_out_of_range(case: dict, tmp_path: Path) -> None:
    _, meta = load_cine(case["image"])
    frame = write_nifti(tmp_path / "gt.nii.gz", make_label()[..., 0], meta.affine)
    with pytest.raises(DataError, match="frame index 5 is out of range"):
        load_label({5: frame}, like=meta)
    with pytest.raises(DataError, match=r"indices \[9\] are out of range"):
        load_label(case["label"], frames=[0, 9], like=meta)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="frames: folder holds no image files"):
        load_cine(tmp_path / "frames")
