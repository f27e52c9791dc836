"""The built-in phantom: physiology (EF, volume curve), labels, appearance, determinism, ACDC layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from trunet.cli import main
from trunet.data import phantom
from trunet.data.phantom import contraction_curve, simulate_case, write_phantom_dataset
from trunet.errors import DataError

SMALL = dict(inplane_scale=3.0)  # same field of view, ~45x45 voxels: fast


@pytest.fixture(scope="module")
def small_cases():
    return [simulate_case(seed, index, **SMALL) for seed, index in ((0, 0), (1, 3), (7, 2))]


def _volumes(label: np.ndarray, value: int) -> np.ndarray:
    return (label == value).sum(axis=(0, 1, 2)).astype(float)


def test_contraction_curve_single_peak_at_es():
    for n, es in ((15, 5), (30, 12), (22, 10)):
        f = contraction_curve(n, es, early_fill=0.4, atrial_kick=0.25)
        assert f[0] == 0.0 and f[es] == pytest.approx(1.0)
        assert np.all(np.diff(f[: es + 1]) > 0)  # systole: strictly contracting
        assert np.all(np.diff(f[es:]) <= 1e-12)  # diastole: filling, never contracting again
        assert 0.0 <= f.min() and f.max() <= 1.0
        # filling slows down: the last fifth of diastole (diastasis, atrial kick) refills less than the first
        dia = f[es:]
        fifth = max(1, len(dia) // 5)
        assert dia[0] - dia[fifth] > dia[-fifth - 1] - dia[-1]
    with pytest.raises(ValueError):
        contraction_curve(20, 0)


def test_drawn_acquisitions_match_the_specification():
    for seed in range(40):
        p = phantom._draw_params(np.random.default_rng([seed, 0]), 1.0, None)
        nx, ny, nz, nt = p.shape
        sx, sy, sz = p.spacing
        assert 1.2 <= sx <= 1.8 and sx == sy and 6.0 <= sz <= 10.0
        assert 8 <= nz <= 14 and 15 <= nt <= 30
        assert max(nx, ny) <= 160
        assert all(170.0 <= n * sx <= 242.0 for n in (nx, ny))  # field of view ~180-240 mm (matrix cap)
        assert nt / 3 <= p.es <= 2 * nt / 3  # ES in the middle third
        assert 0.30 <= p.ef <= 0.70 and p.group in phantom._GROUPS


def test_labels_and_shapes(small_cases):
    for case in small_cases:
        X, Y, Z, T = case.image.shape
        assert case.label.shape == case.image.shape
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert set(np.unique(case.label)) == {0, 1, 2, 3}
        assert case.ed == 0 and T / 3 <= case.es <= 2 * T / 3
        assert np.all(case.image >= 0) and np.all(case.image == np.rint(case.image))  # int16-exact values
        assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), case.spacing)
        # every labelled LV voxel is enclosed: the myocardium is present on every slice that has an LV
        for t in (case.ed, case.es):
            for k in range(Z):
                lv = case.label[..., k, t] == 3
                if lv.any():
                    assert (case.label[..., k, t] == 2).sum() > 0


def test_ejection_fraction_and_volume_curve(small_cases):
    for case in small_cases:
        lv = _volumes(case.label, 3)
        rv = _volumes(case.label, 1)
        ef = 1.0 - lv[case.es] / lv[case.ed]
        rv_ef = 1.0 - rv[case.es] / rv[case.ed]
        assert 0.30 <= ef <= 0.70
        assert ef == pytest.approx(case.ef_target, abs=0.03)
        assert 0.2 <= rv_ef <= 0.75 and rv_ef == pytest.approx(case.rv_ef_target, abs=0.05)
        # one minimum, at ES: non-increasing to ES, non-decreasing after (discretisation tolerance)
        tol = 0.01 * lv[0]
        assert int(np.argmin(lv)) == case.es
        assert np.all(np.diff(lv[: case.es + 1]) <= tol)
        assert np.all(np.diff(lv[case.es:]) >= -tol)
        assert lv.max() == lv[case.ed] or lv[case.ed] >= lv.max() - tol
        # the myocardium thickens: roughly the same volume around a much smaller cavity
        myo = _volumes(case.label, 2)
        assert myo[case.es] == pytest.approx(myo[case.ed], rel=0.25)


def test_deterministic_by_seed():
    a = simulate_case(3, 1, inplane_scale=3.0, max_frames=6)
    b = simulate_case(3, 1, inplane_scale=3.0, max_frames=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    c = simulate_case(4, 1, inplane_scale=3.0, max_frames=6)
    d = simulate_case(3, 2, inplane_scale=3.0, max_frames=6)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.image.shape != d.image.shape or not np.array_equal(a.image, d.image)


def test_a_threshold_does_not_segment_the_lv(small_cases):
    """Bright blood is not enough: RV, atria, vessels, fat and the bias field defeat any single threshold."""
    for case in small_cases:
        img, lv = case.image[..., case.ed], case.label[..., case.ed] == 3
        best = 0.0
        for thr in np.percentile(img, np.linspace(50, 99.8, 120)):
            pred = img > thr
            best = max(best, 2 * (pred & lv).sum() / (pred.sum() + lv.sum()))
        assert 0.2 < best < 0.85, best  # blood is brighter than average (learnable), yet not separable


def test_degraded_frames_are_not_ed_or_es():
    seen = 0
    for index in range(12):
        p = phantom._draw_params(np.random.default_rng([0, index]), 3.0, None)
        if p.artefact_frame is not None:
            seen += 1
            assert p.artefact_frame not in (0, p.es) and p.artefact in ("ghost", "blur")
    assert 0 < seen < 12


def test_written_acdc_layout(tmp_path):
    out = tmp_path / "ph"
    datalist_path = write_phantom_dataset(out, cases=2, seed=5, inplane_scale=3.0, max_frames=16)
    datalist = json.loads(datalist_path.read_text())
    assert datalist_path == out / "datalist.json"
    assert datalist["validation"] == [] and datalist["test"] == []
    assert [item["case_id"] for item in datalist["training"]] == ["patient001", "patient002"]
    for index, item in enumerate(datalist["training"]):
        case = simulate_case(5, index, inplane_scale=3.0, max_frames=16)
        cid = item["case_id"]
        assert item["image"] == f"{cid}/{cid}_4d.nii.gz" and item["label"] == f"{cid}/{cid}_4d_gt.nii.gz"
        assert "frames" not in item and item["ed"] == 0 and item["es"] == case.es
        img = nib.load(out / item["image"])
        gt = nib.load(out / item["label"])
        assert img.shape == case.image.shape and img.get_data_dtype() == np.int16
        assert gt.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(img.dataobj), case.image)
        np.testing.assert_array_equal(np.asarray(gt.dataobj), case.label)
        np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)
        np.testing.assert_allclose(gt.affine, case.affine, atol=1e-4)
        assert img.header["pixdim"][4] == pytest.approx(case.time_step_ms, rel=1e-5)
        assert img.header.get_xyzt_units() == ("mm", "msec")
        info = dict(line.split(": ") for line in (out / cid / "Info.cfg").read_text().splitlines())
        assert int(info["ED"]) == 1 and int(info["ES"]) == case.es + 1
        assert int(info["NbFrame"]) == case.image.shape[3] and info["Group"] == case.group
        for t in (case.ed, case.es):
            frame = nib.load(out / cid / f"{cid}_frame{t + 1:02d}.nii.gz")
            frame_gt = nib.load(out / cid / f"{cid}_frame{t + 1:02d}_gt.nii.gz")
            np.testing.assert_array_equal(np.asarray(frame.dataobj), case.image[..., t])
            np.testing.assert_array_equal(np.asarray(frame_gt.dataobj), case.label[..., t])
            np.testing.assert_allclose(frame.affine, case.affine, atol=1e-4)
    assert not list(out.rglob(".*tmp*"))  # no temporary files left behind

    # never overwrite: the error names the existing case folder
    with pytest.raises(DataError, match="patient001"):
        write_phantom_dataset(out, cases=1, seed=0, inplane_scale=3.0, max_frames=16)


def test_cli_refuses_existing_case(tmp_path, capsys):
    (tmp_path / "patient002").mkdir()
    (tmp_path / "patient002" / "Info.cfg").write_text("ED: 1\n")
    assert main(["phantom", "--out", str(tmp_path), "--cases", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "patient002" in err and "overwrite" in err
    assert not (tmp_path / "patient001").exists()  # checked before anything is written
