"""Evaluation metrics against hand-computed cases, and ``trunet evaluate`` end to end on tiny volumes."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from trunet.errors import DataError
from trunet.pipeline.evaluation import (
    MYOCARDIAL_DENSITY,
    agreement,
    cardiac_phases,
    class_volumes,
    cyclic_frame_distance,
    evaluate_case,
    find_references,
    overlap_metrics,
    run_evaluation,
    temporal_consistency,
    ventricle_indices,
)

CLASSES = ["background", "RV", "MYO", "LV"]
SPACING = (1.5, 1.5, 5.0)
SHAPE = (24, 20, 6)
# LV cavity half-width in x (voxels) per frame: the box is (2 * a) x 6 x 2 voxels, so counts are exact.
LV_HALF = [5, 5, 4, 3, 2, 2, 3, 4]


def _ellipsoid(radius_mm: float, shape=(32, 32, 12), spacing=(1.5, 1.5, 4.0), centre=None) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of the centre, in physical (mm) coordinates."""
    centre = centre if centre is not None else [(n - 1) / 2 for n in shape]
    axes = [(np.arange(n) - centre[i]) * spacing[i] for i, n in enumerate(shape)]
    grids = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


def _heart(t: int, pred: bool = False, empty: bool = False) -> np.ndarray:
    """One synthetic frame ``(X, Y, Z)``: an LV box, a MYO ring around it, a fixed RV box."""
    lab = np.zeros(SHAPE, dtype=np.uint8)
    if empty:
        return lab
    a = LV_HALF[t] + (1 if pred and t == 0 else 0)  # the prediction overestimates ED by one column pair
    cx = 12
    lab[cx - a - 1 : cx + a + 1, 6:14, 1:5] = 2  # MYO
    lab[cx - a : cx + a, 7:13, 2:4] = 3  # LV cavity
    lab[1:5, 4:16, 2:4] = 1  # RV, constant 4 x 12 x 2
    return lab


def _save(path: Path, labels_txyz: np.ndarray, affine: np.ndarray | None = None, dtype=np.uint8) -> Path:
    affine = np.diag([*SPACING, 1.0]) if affine is None else affine
    data = np.moveaxis(labels_txyz, 0, -1) if labels_txyz.ndim == 4 else labels_txyz
    data = data.astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(SPACING) + ((30.0,) if data.ndim == 4 else ()))
    nib.save(img, str(path))
    return path


def _write_cases(root: Path, ids=("caseA", "caseB"), empty_pred: str | None = None):
    """Predictions, dense references, images and a datalist with ED = 0, ES = 4 for each case."""
    pred_dir, ref_dir = root / "pred", root / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    items = []
    for i, cid in enumerate(ids):
        t = len(LV_HALF)
        ref = np.stack([_heart(f) for f in range(t)])
        pred = np.stack([_heart(f, pred=True, empty=cid == empty_pred) for f in range(t)])
        _save(pred_dir / f"{cid}_seg.nii.gz", pred)
        _save(ref_dir / f"{cid}_gt.nii.gz", ref)
        noise = np.random.default_rng(i).normal(0, 5, ref.shape)
        image = (ref * 100.0 + noise).astype(np.float32)
        _save(ref_dir / f"{cid}_4d.nii.gz", image, dtype=np.float32)
        items.append({"image": f"ref/{cid}_4d.nii.gz", "label": f"ref/{cid}_gt.nii.gz", "ed": 0, "es": 4})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": [], "test": []}))
    return pred_dir, ref_dir, datalist


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------- metrics


def test_volumes_of_sphere_and_shell():
    spacing = (1.5, 1.5, 4.0)
    voxel_ml = 1.5 * 1.5 * 4.0 / 1000
    ball = _ellipsoid(12.0, spacing=spacing)
    inner = _ellipsoid(6.0, spacing=spacing)
    labels = ball.astype(np.uint8) + inner.astype(np.uint8)  # 2 inside 6 mm, 1 in the shell 6..12 mm
    vols = class_volumes(labels, 3, spacing)
    assert vols[1] == pytest.approx(np.count_nonzero(ball & ~inner) * voxel_ml, rel=1e-12)
    assert vols[2] == pytest.approx(np.count_nonzero(inner) * voxel_ml, rel=1e-12)
    # the discrete shell approximates 4/3 pi (R^3 - r^3)
    assert vols[1] == pytest.approx(4 / 3 * math.pi * (12.0**3 - 6.0**3) / 1000, rel=0.05)
    assert vols.sum() == pytest.approx(labels.size * voxel_ml)
    frames = np.stack([labels, np.zeros_like(labels)])
    assert class_volumes(frames, 3, spacing).shape == (2, 3)
    assert np.all(class_volumes(frames, 3, spacing)[1, 1:] == 0)


def test_dice_of_boxes_and_shifted_spheres():
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = 1  # 64 voxels
    b[3:7, 2:6, 2:6] = 1  # shifted by one: overlap 3 x 4 x 4 = 48
    dice, hd, missing = overlap_metrics(a, b, 2, (1.0, 1.0, 1.0))
    assert dice[0] == pytest.approx(2 * 48 / 128)
    assert not missing[0] and hd[0] == pytest.approx(1.0)

    s1 = _ellipsoid(7.0, centre=(15.5, 15.5, 5.5)).astype(np.uint8)
    s2 = _ellipsoid(7.0, centre=(17.5, 15.5, 5.5)).astype(np.uint8)
    inter = np.count_nonzero(s1 & s2)
    dice, _, _ = overlap_metrics(s1, s2, 2, (1.5, 1.5, 4.0))
    assert dice[0] == pytest.approx(2 * inter / (s1.sum() + s2.sum()), rel=1e-6)
    assert 0.3 < dice[0] < 0.95


def test_hd95_uses_anisotropic_spacing():
    # a flat box moved by one slice: every surface distance is 0 or one slice, HD95 = the slice spacing
    box = np.zeros((20, 20, 10), np.uint8)
    box[4:16, 4:16, 3:6] = 1
    _, hd, _ = overlap_metrics(box, np.roll(box, 1, axis=2), 2, (1.0, 1.0, 3.0))
    assert hd[0] == pytest.approx(3.0)
    # concentric spheres of 6 and 12 mm (centred on a voxel) on a 1.5 x 1.5 x 3 mm grid: HD95 ~ 6 mm up to
    # the discretisation (6.7 here); with the spacing ignored the same masks give 4.2
    spacing = (1.5, 1.5, 3.0)
    inner = _ellipsoid(6.0, shape=(21, 21, 13), spacing=spacing).astype(np.uint8)
    outer = _ellipsoid(12.0, shape=(21, 21, 13), spacing=spacing).astype(np.uint8)
    _, hd, missing = overlap_metrics(inner, outer, 2, spacing)
    assert not missing[0]
    assert abs(hd[0] - 6.0) <= 1.0
    _, hd_iso, _ = overlap_metrics(inner, outer, 2, (1.0, 1.0, 1.0))
    assert abs(hd_iso[0] - 6.0) > 1.0


def test_empty_prediction_gives_missing_hd95_not_a_crash(recwarn):
    ref = np.zeros((8, 8, 4), np.uint8)
    ref[2:5, 2:5, 1:3] = 1
    dice, hd, missing = overlap_metrics(np.zeros_like(ref), ref, 3, (1.0, 1.0, 2.0))
    assert dice[0] == 0.0
    assert math.isnan(dice[1])  # class 2 empty in both: Dice undefined
    assert np.all(np.isnan(hd)) and np.all(missing)
    assert not any("inf" in str(w.message) for w in recwarn)


def test_ejection_fraction_from_known_curves():
    assert ventricle_indices(150.0, 60.0) == {"EDV": 150.0, "ESV": 60.0, "SV": 90.0, "EF": 60.0}
    assert math.isnan(ventricle_indices(0.0, 0.0)["EF"])

    t = len(LV_HALF)
    ref = {f: _heart(f) for f in range(t)}
    pred = np.stack([_heart(f, pred=True) for f in range(t)])
    voxel_ml = float(np.prod(SPACING)) / 1000
    res = evaluate_case("c", pred, ref, SPACING, CLASSES, ref_ed=None, ref_es=None)
    row = res.row
    # LV cavity = (2a) x 6 x 2 voxels; reference ED a=5 (frame 0), ES a=2 (first minimum: frame 4)
    edv, esv = 10 * 12 * voxel_ml, 4 * 12 * voxel_ml
    assert (row["ed_ref"], row["es_ref"], row["phase_source"]) == (0, 4, "reference-curve")
    assert row["LV_EDV_ref"] == pytest.approx(edv)
    assert row["LV_ESV_ref"] == pytest.approx(esv)
    assert row["LV_EF_ref"] == pytest.approx(100 * (edv - esv) / edv)  # 60 %
    assert row["LV_EF_ref"] == pytest.approx(60.0)
    pred_edv = 12 * 12 * voxel_ml
    assert row["LV_EF_pred"] == pytest.approx(100 * (pred_edv - esv) / pred_edv)  # 66.7 %
    assert (row["ed_det"], row["es_det"], row["ed_error"], row["es_error"]) == (0, 4, 0, 0)
    myo_ed = (12 * 8 * 4 - 10 * 6 * 2) * voxel_ml  # ring = outer box minus cavity at ED
    assert row["LV_mass_ref"] == pytest.approx(MYOCARDIAL_DENSITY * myo_ed)
    assert row["RV_EF_ref"] == pytest.approx(0.0)  # constant RV
    assert row["dice_LV_es"] == pytest.approx(1.0)
    assert row["dice_LV_ed"] == pytest.approx(2 * 120 / (120 + 144))
    assert row["hd95_missing"] == 0

    # given reference phases override the reference curve; clinical indices follow them
    res = evaluate_case("c", pred, ref, SPACING, CLASSES, ref_ed=1, ref_es=5)
    assert (res.row["phase_source"], res.row["ed_frame"], res.row["es_frame"]) == ("given", 1, 5)
    assert res.row["ed_error"] == 1 and res.row["es_error"] == 1
    assert res.row["LV_EDV_pred"] == pytest.approx(edv)  # pred at frame 1 equals the reference
    assert res.row["LV_EDV_pred_det"] == pytest.approx(pred_edv)


def test_phases_and_cyclic_distance():
    assert cardiac_phases(np.array([3.0, 5.0, 9.0, 4.0, 1.0])) == (2, 4)
    assert cardiac_phases(np.array([3.0, 5.0, 9.0, 4.0, 1.0]), frames=[0, 1, 3]) == (1, 0)
    assert cardiac_phases(np.zeros(5)) is None
    assert cardiac_phases(np.array([1.0, 2.0]), frames=[1]) is None
    assert cyclic_frame_distance(0, 29, 30) == 1
    assert cyclic_frame_distance(3, 10, 30) == 7
    assert cyclic_frame_distance(0, 15, 30) == 15


def test_one_jump_is_flagged_once():
    t = 30
    curve = 100.0 + 40.0 * np.cos(2 * np.pi * np.arange(t) / t)  # smooth: max |deviation| = 40 (1 - cos 12°)
    jumps, rough, flags = temporal_consistency(curve, threshold=0.05)
    assert jumps == 0 and not flags.any()
    expected = np.sum((np.roll(curve, 1) - 2 * curve + np.roll(curve, -1)) ** 2) / (t * 140.0**2)
    assert rough == pytest.approx(expected)
    glitch = curve.copy()
    glitch[7] += 11.0  # threshold = 5 % of max 140 = 7 < 11 < 14, neighbours move by 5.5
    jumps, rough_g, flags = temporal_consistency(glitch, threshold=0.05)
    assert jumps == 1 and np.flatnonzero(flags).tolist() == [7]
    assert rough_g > rough
    jumps, rough_c, _ = temporal_consistency(np.full(t, 50.0))
    assert jumps == 0 and rough_c == 0.0
    jumps, rough_z, _ = temporal_consistency(np.zeros(t))
    assert math.isnan(jumps) and math.isnan(rough_z)


def test_agreement_statistics():
    pred = [50.0, 60.0, 70.0, float("nan")]
    ref = [48.0, 61.0, 66.0, 55.0]
    a = agreement(pred, ref)
    diff = np.array([2.0, -1.0, 4.0])
    assert a["n"] == 3
    assert a["bias"] == pytest.approx(diff.mean())
    assert a["sd_diff"] == pytest.approx(diff.std(ddof=1))
    assert a["loa_upper"] == pytest.approx(diff.mean() + 1.96 * diff.std(ddof=1))
    assert a["loa_lower"] == pytest.approx(diff.mean() - 1.96 * diff.std(ddof=1))
    assert a["pearson_r"] == pytest.approx(np.corrcoef([50, 60, 70], [48, 61, 66])[0, 1])
    single = agreement([1.0], [2.0])
    assert single["bias"] == -1.0 and single["loa_lower"] is None and single["pearson_r"] is None


# ---------------------------------------------------------------------------------------------- end to end


def test_run_evaluation_writes_finite_reports(tmp_path, caplog):
    pred_dir, _, datalist = _write_cases(tmp_path)
    out = tmp_path / "report"
    with caplog.at_level("INFO"):
        summary = run_evaluation(pred_dir, datalist, out)
    for name in ("per_case.csv", "per_frame.csv", "summary.json", "figures/bland_altman_ef.png",
                 "figures/caseA_volumes.png", "figures/caseB_overlay.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "figures/caseA_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(out / "per_case.csv")
    assert [r["case_id"] for r in rows] == ["caseA", "caseB"]
    for r in rows:
        for col in ("dice_RV_ed", "dice_MYO_es", "dice_LV_ed", "hd95_LV_ed", "hd95_MYO_mean", "LV_EF_pred",
                    "LV_EF_ref", "RV_EDV_pred", "LV_mass_pred", "LV_jumps_pred", "LV_roughness_pred"):
            assert math.isfinite(float(r[col])), col
        assert r["phase_source"] == "given" and r["hd95_missing"] == "0"
        assert float(r["LV_EF_ref"]) == pytest.approx(60.0)
    frames = _read_csv(out / "per_frame.csv")
    assert len(frames) == 2 * len(LV_HALF) * 3
    assert all(math.isfinite(float(f["volume_pred_ml"])) for f in frames)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["n_cases"] == 2 and on_disk["missing_references"] == []
    ef = on_disk["agreement"]["LV_EF"]
    voxel_ml = float(np.prod(SPACING)) / 1000
    pred_ef = 100 * (12 - 4) / 12
    assert ef["n"] == 2 and ef["bias"] == pytest.approx(pred_ef - 60.0, abs=1e-4) and ef["sd_diff"] == 0.0
    assert on_disk["metrics"]["LV_EDV_pred"]["mean"] == pytest.approx(12 * 12 * voxel_ml, rel=1e-5)
    assert on_disk["metrics"]["LV_EDV_ref"]["mean"] == pytest.approx(10 * 12 * voxel_ml, rel=1e-5)
    assert math.isfinite(on_disk["metrics"]["dice_LV_ed"]["mean"])
    assert "LV EF bias" in caplog.text and "Dice ED" in caplog.text


def test_acdc_references_are_found_as_training_finds_them(tmp_path):
    """ACDC discovery is shared with training: patients under training/ and testing/ count too."""
    from trunet.data.cases import read_acdc_root

    acdc = tmp_path / "acdc"
    for part, cid in (("training", "patient001"), ("testing", "patient101"), ("", "patient002")):
        case = acdc / part / cid
        case.mkdir(parents=True)
        (case / "Info.cfg").write_text("ED: 1\nES: 5\nNbFrame: 8\n")
        for f in (0, 4):
            _save(case / f"{cid}_frame{f + 1:02d}_gt.nii.gz", _heart(f))
    refs = find_references(acdc)
    assert sorted(refs) == ["patient001", "patient002", "patient101"]
    assert refs["patient101"].label == {0: str(acdc / "testing/patient101/patient101_frame01_gt.nii.gz"),
                                        4: str(acdc / "testing/patient101/patient101_frame05_gt.nii.gz")}
    assert sorted(refs) == sorted(c["case_id"] for c in read_acdc_root(acdc).all())


def _official_acdc(root: Path, ids=("patient001", "patient002")) -> Path:
    """ACDC as distributed: ``ACDC/training/patientNNN/`` with the 4D image, the ED and ES frames and their
    ``_gt`` labels (frames numbered from 1), and ``Info.cfg``; no dense label."""
    for i, cid in enumerate(ids):
        case = root / "ACDC" / "training" / cid
        case.mkdir(parents=True)
        (case / "Info.cfg").write_text(f"ED: 1\nES: 5\nGroup: NOR\nHeight: 180.0\nNbFrame: {len(LV_HALF)}\n"
                                       "Weight: 80.0\n")
        ref = np.stack([_heart(f) for f in range(len(LV_HALF))])
        image = (ref * 100.0 + np.random.default_rng(i).normal(0, 5, ref.shape)).astype(np.float32)
        _save(case / f"{cid}_4d.nii.gz", image, dtype=np.float32)
        for f in (0, 4):
            _save(case / f"{cid}_frame{f + 1:02d}.nii.gz", image[f], dtype=np.float32)
            _save(case / f"{cid}_frame{f + 1:02d}_gt.nii.gz", ref[f])
    return root / "ACDC"


@pytest.mark.parametrize("source", ["ACDC", "ACDC/training", "lists", "lists/datalist.json"])
def test_evaluate_takes_every_case_source_training_takes(tmp_path, capsys, source):
    """``--ref`` takes what ``--data`` takes, read by the same code: the official ACDC layout given as
    ``ACDC/training`` or as its parent ``ACDC``, a datalist, or a folder holding ``datalist.json``."""
    from trunet.cli import main
    from trunet.config import DataConfig
    from trunet.data.cases import resolve_cases

    _official_acdc(tmp_path)
    lists = tmp_path / "lists"
    lists.mkdir()
    items = [{"image": f"../ACDC/training/{c}/{c}_4d.nii.gz", "ed": 0, "es": 4,
              "label": {"0": f"../ACDC/training/{c}/{c}_frame01_gt.nii.gz",
                        "4": f"../ACDC/training/{c}/{c}_frame05_gt.nii.gz"}}
             for c in ("patient001", "patient002")]
    (lists / "datalist.json").write_text(json.dumps({"training": items}))
    pred = tmp_path / "pred"
    pred.mkdir()
    for cid in ("patient001", "patient002"):
        _save(pred / f"{cid}_seg.nii.gz", np.stack([_heart(f, pred=True) for f in range(len(LV_HALF))]))
    ref = tmp_path / source
    trained = resolve_cases(DataConfig(root=str(ref), val_fraction=0.0), None)  # training takes it
    assert sorted(c["case_id"] for c in trained.all()) == ["patient001", "patient002"]
    out = tmp_path / "report"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == ["patient001", "patient002"] and summary["missing_predictions"] == []
    rows = {r["case_id"]: r for r in _read_csv(out / "per_case.csv")}
    assert rows["patient001"]["n_labelled"] == "2" and rows["patient001"]["phase_source"] == "given"
    assert (out / "figures/patient001_overlay.png").is_file()  # the image was found too


def test_reference_layouts_missing_reference_and_empty_prediction(tmp_path, caplog):
    pred_dir, ref_dir, _ = _write_cases(tmp_path, ids=("patient001", "patient002", "patient003"),
                                        empty_pred="patient002")
    # ACDC root with sparse ED/ES labels (1-based in Info.cfg and file names) for two of the three cases
    acdc = tmp_path / "acdc"
    for cid in ("patient001", "patient002"):
        case = acdc / cid
        case.mkdir(parents=True)
        (case / "Info.cfg").write_text("ED: 1\nES: 5\nNbFrame: 8\n")
        for f in (0, 4):
            _save(case / f"{cid}_frame{f + 1:02d}_gt.nii.gz", _heart(f))
    refs = find_references(acdc)
    assert refs["patient001"].label == {0: str(acdc / "patient001/patient001_frame01_gt.nii.gz"),
                                        4: str(acdc / "patient001/patient001_frame05_gt.nii.gz")}
    assert (refs["patient001"].ed, refs["patient001"].es) == (0, 4)
    with caplog.at_level("INFO"):
        summary = run_evaluation(pred_dir, acdc, tmp_path / "out")
    assert summary["cases"] == ["patient001", "patient002"]
    assert summary["missing_references"] == ["patient003"]
    assert summary["hd95_missing_cases"] == ["patient002"]
    assert "overlay montage skipped" in caplog.text
    rows = {r["case_id"]: r for r in _read_csv(tmp_path / "out/per_case.csv")}
    empty = rows["patient002"]
    assert empty["hd95_missing"] == "1" and empty["hd95_missing_n"] == "6"
    assert empty["hd95_LV_ed"] == "" and float(empty["dice_LV_ed"]) == 0.0
    assert empty["LV_EF_pred"] == "" and empty["ed_det"] == ""
    assert rows["patient001"]["n_labelled"] == "2" and rows["patient001"]["LV_jumps_ref"] == ""
    frames = [f for f in _read_csv(tmp_path / "out/per_frame.csv") if f["case_id"] == "patient002"]
    assert {f["hd95_missing"] for f in frames if f["labelled"] == "1"} == {"1"}

    # a folder of 4D labels (<case>_gt.nii.gz): all three cases, phases from the reference curve
    summary = run_evaluation(pred_dir, ref_dir, tmp_path / "out2", figures=False)
    assert summary["n_cases"] == 3 and summary["missing_references"] == []
    assert not (tmp_path / "out2/figures").exists()

    # no reference at all for the predictions: one clear error
    with pytest.raises(DataError, match="no reference matches"):
        run_evaluation(pred_dir, tmp_path / "out", tmp_path / "out3")


def test_missing_predictions_earlier_reports_and_failures_half_way(tmp_path, monkeypatch, capsys):
    from trunet.cli import main
    from trunet.pipeline.evaluation import run as evaluation_run

    pred_dir, ref_dir, _ = _write_cases(tmp_path, ids=("caseA", "caseB"))
    (pred_dir / "caseB_seg.nii.gz").unlink()
    out = tmp_path / "report"
    args = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"trunet evaluate: error: {pred_dir}: no prediction for 1 of 2 reference case(s): "
                              "caseB;") and "--allow-missing" in err[-1]
    assert not out.exists()
    assert main([*args, "--allow-missing"]) == 0
    assert json.loads((out / "summary.json").read_text())["missing_predictions"] == ["caseB"]

    with pytest.raises(DataError, match="report: holds an earlier report; pass --overwrite"):
        run_evaluation(pred_dir, ref_dir, out, allow_missing=True, figures=False)
    earlier = (out / "summary.json").read_text()

    evaluate_case = evaluation_run.evaluate_case

    def fails_half_way(*a, **k):
        evaluate_case(*a, **k)
        raise MemoryError("the job dies half way through the report")

    monkeypatch.setattr(evaluation_run, "evaluate_case", fails_half_way)
    with pytest.raises(MemoryError):
        run_evaluation(pred_dir, ref_dir, out, allow_missing=True, overwrite=True)
    assert (out / "summary.json").read_text() == earlier  # the earlier report, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datalist.json", "pred", "ref", "report"]  # no staging left
    monkeypatch.undo()
    summary = run_evaluation(pred_dir, ref_dir, out, allow_missing=True, overwrite=True, figures=False)
    assert summary["n_cases"] == 1 and not (out / "figures").exists()  # replaced, not merged


def test_bad_inputs_are_data_errors(tmp_path):
    pred_dir, ref_dir, datalist = _write_cases(tmp_path, ids=("caseA",))
    with pytest.raises(DataError, match="prediction folder not found"):
        run_evaluation(tmp_path / "nope", datalist, tmp_path / "o")
    with pytest.raises(DataError, match="reference not found"):
        run_evaluation(pred_dir, tmp_path / "nope", tmp_path / "o")
    with pytest.raises(DataError, match="caseA_gt.nii.gz: is an image; --ref takes a datalist"):
        run_evaluation(pred_dir, ref_dir / "caseA_gt.nii.gz", tmp_path / "o")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "caseA_seg.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="caseA_seg.nii.gz: "):
        run_evaluation(bad, datalist, tmp_path / "o")
    with pytest.raises(DataError, match=r"caseA_seg.nii.gz: label values \[3\] are outside"):
        run_evaluation(pred_dir, datalist, tmp_path / "o", classes=["background", "RV", "MYO"])
    # other class names still give Dice/HD95, clinical indices are skipped
    summary = run_evaluation(pred_dir, datalist, tmp_path / "o", classes=["bg", "a", "b", "c"], figures=False)
    assert "dice_c_ed" in summary["metrics"] and "LV_EF" not in summary["agreement"]


def test_cli_geometry_mismatch_exits_2_with_one_line(tmp_path):
    pred_dir, ref_dir, _ = _write_cases(tmp_path, ids=("caseA",))
    ref = ref_dir / "caseA_gt.nii.gz"
    img = nib.load(str(ref))
    shifted = img.affine.copy()
    shifted[0, 3] += 0.01  # 10 micrometres beyond the 1e-3 tolerance
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted, img.header), str(ref))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "trunet", "evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir),
         "--out", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]  # the rest is the progress bar
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("trunet evaluate: error: " + str(ref))
    assert "affine differs from the prediction" in errors[0]
    assert not (tmp_path / "report/per_case.csv").exists()


def test_datalist_frame_map_and_labelled_frames(tmp_path):
    pred_dir, ref_dir, _ = _write_cases(tmp_path, ids=("caseA", "caseB"))
    for f in (0, 4):
        _save(ref_dir / f"caseA_f{f}.nii.gz", _heart(f))
    items = [
        {"image": "ref/caseA_4d.nii.gz", "label": {"0": "ref/caseA_f0.nii.gz", "4": "ref/caseA_f4.nii.gz"}},
        {"case_id": "caseB", "label": str(ref_dir / "caseB_gt.nii.gz"), "frames": [0, 2, 4]},
        {"case_id": "caseC", "image": "ref/caseC_4d.nii.gz"},  # no label: no reference
    ]
    datalist = tmp_path / "sparse.json"
    datalist.write_text(json.dumps({"training": items[:1], "test": items[1:]}))
    refs = find_references(datalist)
    assert sorted(refs) == ["caseA", "caseB"] and refs["caseB"].frames == [0, 2, 4]
    summary = run_evaluation(pred_dir, datalist, tmp_path / "out", figures=False)
    rows = {r["case_id"]: r for r in _read_csv(tmp_path / "out/per_case.csv")}
    assert rows["caseA"]["n_labelled"] == "2" and rows["caseB"]["n_labelled"] == "3"
    # no ED/ES given: the reference phases are the max/min of the reference LV volumes on labelled frames
    assert rows["caseA"]["phase_source"] == "reference-curve"
    assert (rows["caseA"]["ed_ref"], rows["caseA"]["es_ref"]) == ("0", "4")
    assert float(rows["caseB"]["LV_EF_ref"]) == pytest.approx(60.0)
    assert summary["missing_references"] == []


def test_the_acdc_download_layout_with_a_database_folder_is_found(tmp_path):
    """The challenge's archive unpacks as ``ACDC/database/training/patientNNN``: training and evaluation
    find its cases from ``ACDC`` as from ``ACDC/database``."""
    from trunet.config import DataConfig
    from trunet.data.cases import resolve_cases

    acdc = _official_acdc(tmp_path)
    (acdc / "database").mkdir()
    (acdc / "training").rename(acdc / "database" / "training")
    for root in (acdc, acdc / "database"):
        cases = resolve_cases(DataConfig(root=str(root), val_fraction=0.0), None)
        assert sorted(c["case_id"] for c in cases.all()) == ["patient001", "patient002"]
        assert sorted(find_references(root)) == ["patient001", "patient002"]
