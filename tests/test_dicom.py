"""DICOM cine in, DICOM SEG out: every layout reads as its NIfTI conversion, bad folders are one clear
error (or a warning for a skipped localizer), pydicom's real MR file reads, the phantom writes itself as
DICOM, and ``predict --output-format dicom-seg`` writes a SEG that reads back equal to the NIfTI output."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cine_factory import make_image, make_label, oblique_affine, write_nifti
from trunet.cli import main
from trunet.data.phantom_dicom import write_dicom_cine
from trunet.errors import DataError
from trunet.io import load_cine, read_header
from trunet.io.dicom import scan_dicom_cine
from trunet.io.dicom_seg import read_dicom_seg
from trunet.pipeline.inference import run_prediction

SHAPE = (32, 32, 4, 4)  # (x, y, z, t)
STEP_MS = 37.5


def _cine() -> tuple[np.ndarray, np.ndarray]:
    label = make_label(SHAPE)
    return np.rint(make_image(label)).clip(0, None), oblique_affine(spacing=(1.7, 1.5, 8.0))


def _dicom(folder: Path, layout: str = "per-slice", **kw) -> Path:
    image, affine = _cine()
    write_dicom_cine(image, affine, STEP_MS, folder, layout=layout, uid_seed=str(folder.name), **kw)
    return folder


@pytest.mark.parametrize("layout", ["per-slice", "one-series", "enhanced"])
def test_each_layout_reads_as_its_nifti_conversion(tmp_path, layout):
    image, affine = _cine()
    nifti = write_nifti(tmp_path / "cine.nii.gz", image.astype(np.int16), affine, time_step=STEP_MS)
    folder = _dicom(tmp_path / "case", layout)
    source = next(folder.glob("*.dcm")) if layout == "enhanced" else folder
    a, meta = load_cine(source)
    b, ref = load_cine(nifti)
    assert a.shape == (4, 32, 32, 4) and np.array_equal(a, b)
    np.testing.assert_allclose(meta.affine, ref.affine, atol=1e-5)  # oblique: every term
    np.testing.assert_allclose(meta.spacing, (1.7, 1.5, 8.0), atol=1e-6)
    assert meta.time_step == pytest.approx(STEP_MS)
    assert read_header(source).shape == (32, 32, 4, 4)


def test_frames_follow_trigger_time_not_file_order(tmp_path):
    folder = _dicom(tmp_path / "case", "one-series")
    files = sorted(folder.glob("*.dcm"))
    for i, path in enumerate(files):  # scramble instance numbers: the order must come from TriggerTime
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1000 - i
        ds.save_as(path)
    a, _ = load_cine(folder)
    b, _ = load_cine(_dicom(tmp_path / "ref", "one-series"))
    assert np.array_equal(a, b)


def test_pydicom_real_mr_file_reads_with_its_header_geometry(tmp_path):
    src = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    folder = tmp_path / "mr"
    folder.mkdir()
    shutil.copy(src, folder / "MR_small.dcm")
    ds = pydicom.dcmread(src)
    data, meta = load_cine(folder)
    assert data.shape == (1, ds.Columns, ds.Rows, 1)
    expected = ds.pixel_array.T * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_allclose(data[0, :, :, 0], expected)
    row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
    ras_x = np.diag([-1.0, -1.0, 1.0]) @ (row_dir * float(ds.PixelSpacing[1]))
    np.testing.assert_allclose(meta.affine[:3, 0], ras_x, atol=1e-6)
    np.testing.assert_allclose(meta.affine[:3, 3], [-float(ds.ImagePositionPatient[0]),
                                                    -float(ds.ImagePositionPatient[1]),
                                                    float(ds.ImagePositionPatient[2])], atol=1e-6)


# -- folders as they come ------------------------------------------------------------------------------


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_a_localizer_and_another_orientation_are_skipped_with_a_warning(tmp_path, caplog):
    folder = _dicom(tmp_path / "case")
    extra = folder / "localizer"
    extra.mkdir()
    for i, iop in enumerate(([1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1])):
        target = extra / f"L{i}.dcm"
        shutil.copy(folder / "series_01" / "IM_0001.dcm", target)
        _edit(target, ImageOrientationPatient=iop, SeriesDescription=f"loc{i}", SOPInstanceUID=f"1.2.3.{i}",
              SeriesInstanceUID=f"1.2.3.9{i}", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"] if i else ["ORIGINAL"])
    with caplog.at_level(logging.WARNING, logger="trunet.io.dicom"), pytest.warns(UserWarning, match="skipped 2"):
        data, meta = load_cine(folder)
    assert data.shape == (4, 32, 32, 4)
    assert "'loc0', 'loc1'" in caplog.text and "another orientation" in caplog.text


def _drop_frame_everywhere(folder: Path, frame: int, keep_count_tag: bool) -> None:
    for series in sorted(folder.glob("series_*")):
        (series / f"IM_{frame:04d}.dcm").unlink()
        if not keep_count_tag:
            for path in series.glob("*.dcm"):
                _edit(path, CardiacNumberOfImages=None)


@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / "series_02" / "IM_0003.dcm").unlink(),
     r"slices have different frame counts: 4 frames in most slices, but slice 1 at .* mm \(series 'cine_sax_02'\): 3"),
    (lambda f: _drop_frame_everywhere(f, 3, True),
     r"missing frames: slice 0 at .* mm has 3 of the 4 frames its headers announce \(CardiacNumberOfImages\)"),
    (lambda f: _drop_frame_everywhere(f, 3, False),
     r"missing frames: at slice 0 \(.* mm\) trigger times jump from 37.5 to 112.5 ms, the step elsewhere is 37.5 ms"),
    (lambda f: shutil.rmtree(f / "series_02"),
     r"slice gaps are not uniform: 16.00 mm between slices 0 and 1 .* 8.00 mm elsewhere"),
    (lambda f: _edit(f / "series_01" / "IM_0001.dcm", StudyInstanceUID="1.2.3.4"),
     r"holds 2 studies"),
    (lambda f: _edit(f / "series_03" / "IM_0002.dcm", PixelSpacing=[1.0, 1.0]),
     r"IM_0002.dcm: PixelSpacing \[1.0, 1.0\] differs"),
])
def test_bad_folders_are_one_clear_error(tmp_path, damage, match):
    folder = _dicom(tmp_path / "case")
    damage(folder)
    with pytest.raises(DataError, match=match) as info:
        load_cine(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_undecodable_compression_names_the_package_to_add(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import HTJ2KLossless, JPEGLosslessSV1

    missing = [u for u in (JPEGLosslessSV1, HTJ2KLossless) if not get_decoder(u).is_available]
    if not missing:
        pytest.skip("every candidate decoder is installed here")
    folder = _dicom(tmp_path / "case")
    path = folder / "series_02" / "IM_0001.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = missing[0]
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match=rf"IM_0001.dcm: pixel data are compressed as .*{missing[0]}.* install one of: "
                                        r".*pylibjpeg"):
        read_header(folder)


# -- the phantom as DICOM ------------------------------------------------------------------------------


def test_phantom_writes_itself_as_dicom_with_a_datalist(tmp_path):
    from trunet.data.cases import read_datalist, validate_cases
    from trunet.config import DataConfig
    from trunet.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path, cases=1, seed=0, inplane_scale=3.0, max_frames=3, dicom=True)
    folder = tmp_path / "dicom" / "patient001"
    a, meta = load_cine(folder)
    b, ref = load_cine(tmp_path / "patient001" / "patient001_4d.nii.gz")
    assert np.array_equal(a, b) and np.allclose(meta.affine, ref.affine, atol=1e-4)
    assert abs(meta.affine[2, 0]) + abs(meta.affine[0, 2]) > 0.01  # oblique
    ds = pydicom.dcmread(folder / "series_01" / "IM_0001.dcm", stop_before_pixels=True)
    assert ds.Modality == "MR" and float(ds.TriggerTime) == 0 and int(ds.CardiacNumberOfImages) == meta.n_frames
    series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in folder.rglob("IM_0001.dcm")}
    assert len(series) == meta.spatial_shape[2]  # one series per slice position
    lists = read_datalist(tmp_path / "datalist_dicom.json")
    assert lists.training[0]["image"] == str(folder)
    validate_cases(lists, DataConfig())  # the NIfTI label matches the DICOM image's grid


# -- DICOM SEG out -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from test_infer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", target_spacing=(3.0, 3.0, 8.0))


@pytest.mark.parametrize("layout", ["per-slice", "enhanced"])
def test_dicom_seg_round_trip_equals_the_nifti_output(checkpoint, tmp_path, layout):
    folder = _dicom(tmp_path / "inputs" / "case7", layout)
    source = next(folder.glob("*.dcm")) if layout == "enhanced" else folder
    out = tmp_path / "pred"
    written = run_prediction(checkpoint, source, out, device="cpu", output_formats=("nifti", "dicom-seg"))
    cid = "case7" if layout == "per-slice" else "cine_enhanced"
    assert [p.name for p in written] == [f"{cid}_seg.nii.gz", f"{cid}_seg_dicom"]
    nifti = nib.load(written[0])
    cine = scan_dicom_cine(source)
    np.testing.assert_allclose(nifti.affine, cine.affine, atol=1e-5)
    labels = np.moveaxis(np.asarray(nifti.dataobj), -1, 0)  # (T, X, Y, Z)
    assert len(np.unique(labels)) > 1  # something to compare
    back = read_dicom_seg(written[1], cine)
    assert np.array_equal(back, labels)

    seg = pydicom.dcmread(sorted(written[1].glob("*.dcm"))[0])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and seg.NumberOfFrames == 4 * 3
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["RV cavity", "LV myocardium", "LV cavity"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
        ["53085002", "49848007", "87878005"]
    refs = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
    assert refs == {p.series_instance_uid for s in cine.planes for p in s}
    assert seg.StudyInstanceUID == cine.planes[0][0].study_instance_uid
    assert not list(folder.rglob("*seg*"))  # nothing written into the input
    with pytest.raises(DataError, match="inside an input folder"):  # nor will be
        run_prediction(checkpoint, folder, folder / "pred", device="cpu", output_formats=("dicom-seg",))


def test_dicom_and_its_nifti_conversion_predict_the_same(checkpoint, tmp_path):
    folder = _dicom(tmp_path / "case7")
    image, affine = _cine()
    nifti_in = write_nifti(tmp_path / "nifti" / "case7.nii.gz", image.astype(np.int16), affine, time_step=STEP_MS)
    a, meta = load_cine(folder)
    b, ref = load_cine(nifti_in)
    assert np.array_equal(a, b) and np.allclose(meta.affine, ref.affine, atol=1e-5)  # the inputs agree
    (from_dicom,) = run_prediction(checkpoint, folder, tmp_path / "pred-dicom", device="cpu")
    (from_nifti,) = run_prediction(checkpoint, nifti_in, tmp_path / "pred-nifti", device="cpu")
    assert np.array_equal(np.asarray(nib.load(from_dicom).dataobj), np.asarray(nib.load(from_nifti).dataobj))


def test_cli_predict_on_a_dicom_folder_of_cases(checkpoint, tmp_path, capsys):
    root = tmp_path / "dicom"
    for name in ("p1", "p2"):
        _dicom(root / name, "one-series")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(root), "--output", str(out),
                 "--device", "cpu", "--output-format", "dicom-seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["p1_seg_dicom", "p2_seg_dicom"]
    assert len(list((out / "p1_seg_dicom").glob("frame_*.dcm"))) == 4
    # a SEG needs DICOM sources: a NIfTI input is one clear line
    nifti = write_nifti(tmp_path / "n" / "c.nii.gz", np.zeros(SHAPE, np.float32), oblique_affine(), STEP_MS)
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(nifti), "--output", str(out),
                 "--output-format", "dicom-seg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a DICOM input" in err[0]


@pytest.mark.slow
def test_phantom_dicom_datalist_trains_predicts_and_evaluates(tmp_path):
    """The DICOM folders of ``trunet phantom --dicom`` go through train (datalist images), predict and
    evaluate (the reference datalist's images are DICOM folders; the overlay figure reads them)."""
    from trunet.config import load_config
    from trunet.data.phantom import write_phantom_dataset
    from trunet.pipeline.evaluation import run_evaluation
    from trunet.pipeline.training import run_training

    data = tmp_path / "data"
    write_phantom_dataset(data, cases=2, seed=1, inplane_scale=3.0, max_frames=4, dicom=True)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    config = load_config(tiny, [f"data.root={data / 'datalist_dicom.json'}", "tracking.wandb.mode=disabled",
                                "train.epochs=1", "train.iterations_per_epoch=1"])
    run = run_training(config, run_dir=tmp_path / "run", config_path=tiny)
    assert (run / "checkpoints" / "best.pt").is_file()
    pred = tmp_path / "pred"
    run_prediction(run / "checkpoints" / "best.pt", data / "dicom" / "patient002", pred, device="cpu")
    assert sorted(p.name for p in pred.iterdir()) == ["patient002_seg.nii.gz"]
    summary = run_evaluation(pred, data / "datalist_dicom.json", tmp_path / "report", allow_missing=True)
    assert summary["n_cases"] == 1 and summary["missing_predictions"] == ["patient001"]
    assert any(f.endswith("_overlay.png") for f in summary["files"])


def test_snapped_affines_agree_across_storage_precisions_and_leave_axis_aligned_ones_alone():
    from trunet.transforms.cardiac import snap_affine

    axis_aligned = np.array([[-1.5625, 0, 0, 153.27734375], [0, -1.5625, 0, 120.5], [0, 0, 10, -33.3], [0, 0, 0, 1]])
    axis_aligned = axis_aligned.astype(np.float32).astype(np.float64)  # as nibabel returns a NIfTI sform
    assert np.array_equal(snap_affine(axis_aligned), axis_aligned)
    _, oblique = _cine()
    as_float32 = oblique.astype(np.float32).astype(np.float64)  # the NIfTI copy of the geometry
    nudged = oblique + np.pad(np.full((3, 4), 3e-8), ((0, 1), (0, 0)))  # another store's rounding
    assert not np.array_equal(as_float32, nudged)
    snapped = snap_affine(as_float32)
    assert np.array_equal(snap_affine(nudged), snapped)
    axes = snapped[:3, :3] / np.linalg.norm(snapped[:3, :3], axis=0)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), rtol=0, atol=1e-15)
    np.testing.assert_allclose(snapped, oblique, rtol=0, atol=1e-5)
