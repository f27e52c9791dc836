"""Case sources (datalist, ACDC root, phantom), splits, target spacing, loaders, bad inputs of a dataset."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cine_factory import SHAPE, make_image, make_label, oblique_affine, write_case, write_nifti
from trunet.errors import DataError
from trunet.config import DataConfig, load_config
from trunet.data.cases import (
    median_target_spacing,
    parse_info_cfg,
    read_acdc_root,
    read_datalist,
    resolve_cases,
    split_cases,
)
from trunet.pipeline.training.loaders import build_eval_dataset, build_train_loader
from trunet.transforms.compose import inference_transforms, preprocessing_from_config


def _datalist(folder: Path, training: list, **lists) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": training, **lists, "description": "extra keys are ignored"}))
    return path


def _acdc_patient(root: Path, name: str, ed: int = 1, es: int = 3, frames: int = 5,
                  with_gt: bool = True) -> None:
    d = root / name
    d.mkdir(parents=True)
    info = f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: {frames}\nWeight: 80.0\n"
    (d / "Info.cfg").write_text(info)
    label = make_label(SHAPE[:3] + (frames,))
    write_nifti(d / f"{name}_4d.nii.gz", make_image(label), oblique_affine(), 30.0)
    if with_gt:
        for f in (ed, es):
            write_nifti(d / f"{name}_frame{f:02d}_gt.nii.gz", label[..., f - 1], oblique_affine())


def _config(configs_dir: Path, *overrides: str):
    base = ["train.patch_size=[16,16,4]", "train.time_window=3"]
    return load_config(configs_dir / "tiny.yaml", [*base, *overrides])


@pytest.fixture
def three_cases(tmp_path: Path) -> list[dict]:
    return [write_case(tmp_path / "cases", f"case{i}", seed=i) for i in range(3)]


def test_datalist_relative_paths_mappings_and_extra_keys(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "d" / "imgs", "a")
    write_nifti(tmp_path / "d" / "imgs" / "b_f2.nii.gz", make_label()[..., 2], oblique_affine())
    path = _datalist(tmp_path / "d", [
        {"image": "imgs/a.nii.gz", "label": "imgs/a_gt.nii.gz", "frames": [0, 2], "ed": 0, "es": 2,
         "site": "x"},
        {"image": "imgs/a.nii.gz", "case_id": "b", "label": {"2": "imgs/b_f2.nii.gz"}},
    ], test=["imgs/a.nii.gz"])
    lists = read_datalist(path)
    a, b = lists.training
    assert a == {"case_id": "a", "image": rec["image"], "label": rec["label"], "frames": [0, 2], "ed": 0,
                 "es": 2}
    assert b["label"] == {2: str(tmp_path / "d" / "imgs" / "b_f2.nii.gz")} and b["frames"] == [2]
    assert lists.validation == [] and lists.test[0]["label"] is None
    item = inference_transforms(preprocessing_from_config(load_config(None), (1.5, 1.6, 8.0)))(dict(b))
    assert item["frame_mask"].tolist() == [False, False, True, False, False]
    assert (item["label"][[0, 1, 3, 4]] == 255).all() and item["case_id"] == "b"


def test_acdc_root_reads_info_cfg_and_sparse_labels(tmp_path: Path, configs_dir: Path) -> None:
    _acdc_patient(tmp_path / "acdc" / "training", "patient001", ed=1, es=4)
    _acdc_patient(tmp_path / "acdc" / "testing", "patient101", ed=2, es=5, with_gt=False)
    lists = read_acdc_root(tmp_path / "acdc")
    (p1,), (p101,) = lists.training, lists.test
    assert (p1["case_id"], p1["ed"], p1["es"], p1["frames"]) == ("patient001", 0, 3, [0, 3])
    assert set(p1["label"]) == {0, 3} and p1["label"][3].endswith("patient001_frame04_gt.nii.gz")
    assert p101["label"] is None and (p101["ed"], p101["es"]) == (1, 4)
    info = parse_info_cfg(tmp_path / "acdc" / "training" / "patient001" / "Info.cfg")
    assert (info["ED"], info["ES"], info["NbFrame"], info["Group"]) == (1, 4, 5, "NOR")
    item = inference_transforms(preprocessing_from_config(_config(configs_dir), (1.5, 1.6, 8.0)))(dict(p1))
    assert item["frame_mask"].tolist() == [True, False, False, True, False]
    assert (item["ed"], item["es"]) == (0, 3)


@pytest.mark.parametrize("text, problem", [
    ("ES: 3\nNbFrame: 5\n", "missing 'ED:'"),
    ("ED: one\nES: 3\nNbFrame: 5\n", "'ED' is not an integer"),
    ("ED: 1\nES: 9\nNbFrame: 5\n", "ES = 9 is outside frames 1..5"),
])
def test_bad_info_cfg(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "Info.cfg").write_text(text)
    with pytest.raises(DataError, match=problem):
        parse_info_cfg(tmp_path / "Info.cfg")


def test_split_is_by_patient_reproducible_and_order_free() -> None:
    cases = [{"case_id": f"p{i:02d}"} for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert {c["case_id"] for c in train} | {c["case_id"] for c in val} == {c["case_id"] for c in cases}
    assert not {c["case_id"] for c in train} & {c["case_id"] for c in val}
    assert split_cases(list(reversed(cases)), 0.2, seed=3) == (train, val)
    others = {tuple(c["case_id"] for c in split_cases(cases, 0.2, seed=s)[1]) for s in range(6)}
    assert len(others) > 1  # the seed matters
    assert split_cases(cases[:1], 0.5, 0) == (cases[:1], [])


def test_resolve_splits_and_writes_splits_json(tmp_path: Path, three_cases: list[dict]) -> None:
    path = _datalist(tmp_path, three_cases)
    lists = resolve_cases(DataConfig(root=str(path), val_fraction=0.34, split_seed=1), tmp_path / "run")
    assert len(lists.training) == 2 and len(lists.validation) == 1
    saved = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert saved["validation"] == [lists.validation[0]["case_id"]] and saved["split_seed"] == 1
    # a given validation list is kept as is
    path2 = _datalist(tmp_path / "v", three_cases[:2], validation=three_cases[2:])
    lists2 = resolve_cases(DataConfig(root=str(path2)), tmp_path / "run2")
    assert [c["case_id"] for c in lists2.validation] == ["case2"]


def test_phantom_is_the_default_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trunet.data.phantom as phantom

    calls = []
    small = functools.partial(phantom.write_phantom_dataset, inplane_scale=0.5, max_frames=6)
    monkeypatch.setattr(phantom, "write_phantom_dataset", lambda *a, **k: calls.append(1) or small(*a, **k))
    config = DataConfig(root=None, phantom_cases=2, val_fraction=0.5)
    lists = resolve_cases(config, tmp_path)
    assert len(lists.training) == 1 and len(lists.validation) == 1
    assert Path(lists.training[0]["image"]).is_relative_to(tmp_path / "phantom")
    assert resolve_cases(config, tmp_path).validation == lists.validation and len(calls) == 1
    with pytest.raises(DataError, match="phantom generated with"):
        resolve_cases(DataConfig(root=None, phantom_cases=3), tmp_path)


def test_median_target_spacing_from_headers(tmp_path: Path) -> None:
    cases = []
    for i, sp in enumerate([(1.2, 1.2, 8.0), (1.5, 1.4, 10.0), (1.8, 1.8, 6.0)]):
        cases.append(write_case(tmp_path, f"c{i}", affine=oblique_affine(spacing=sp)))
    assert median_target_spacing(cases) == pytest.approx((1.5, 1.4, 8.0))


@pytest.mark.parametrize("cache, workers",
                         [("memory", 0), ("disk", 0), ("none", 0), ("memory", 2), ("disk", 2)])
def test_train_loader_batches(configs_dir: Path, tmp_path: Path, three_cases: list[dict], cache: str,
                              workers: int) -> None:
    config = _config(configs_dir, f"data.cache={cache}", f"data.num_workers={workers}", "train.batch_size=2",
                     "train.iterations_per_epoch=2")
    three_cases[1]["frames"] = [1, 4]
    loader = build_train_loader(config, three_cases, (1.5, 1.6, 8.0), tmp_path / "cache")
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        assert b["image"].shape == (2, 3, 16, 16, 4) and b["image"].dtype == torch.float32
        assert b["label"].shape == (2, 3, 16, 16, 4) and b["label"].dtype == torch.int64
        assert b["frame_mask"].shape == (2, 3) and b["frame_mask"].dtype == torch.bool
        assert b["frame_mask"].any(dim=1).all() and len(b["case_id"]) == 2
        assert (b["label"][~b["frame_mask"]] == 255).all()
        assert set(b["label"][b["frame_mask"]].unique().tolist()) <= {0, 1, 2, 3}


def test_eval_dataset_items(configs_dir: Path, three_cases: list[dict]) -> None:
    config = _config(configs_dir)
    pre = preprocessing_from_config(config, (3.0, 3.0, 8.0))
    ds = build_eval_dataset(config, three_cases[:2], pre)
    item = ds[1]
    assert item["case_id"] == "case1" and item["image"].shape[0] == SHAPE[3]
    assert item["label"].shape == item["image"].shape and item["frame_mask"].all()
    np.testing.assert_allclose(np.asarray(item["image"].pixdim), (3.0, 3.0, 8.0), rtol=1e-5)


# --- bad inputs -----------------------------------------------------------------------------


def test_empty_datalist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty datalist"):
        resolve_cases(DataConfig(root=str(_datalist(tmp_path, []))), tmp_path / "run")


def test_duplicate_case_ids(tmp_path: Path, three_cases: list[dict]) -> None:
    dup = dict(three_cases[1], case_id="case0")
    with pytest.raises(DataError, match="duplicate case id 'case0'"):
        resolve_cases(DataConfig(root=str(_datalist(tmp_path, [three_cases[0], dup]))), tmp_path / "run")


def test_missing_image_and_unknown_root(tmp_path: Path, three_cases: list[dict]) -> None:
    missing = dict(three_cases[0], image=str(tmp_path / "gone.nii.gz"))
    with pytest.raises(DataError, match="gone.nii.gz: file not found"):
        resolve_cases(DataConfig(root=str(_datalist(tmp_path, [missing]))), tmp_path / "run")
    with pytest.raises(DataError, match="data root not found"):
        resolve_cases(DataConfig(root=str(tmp_path / "nowhere")), tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither an ACDC-layout root"):
        resolve_cases(DataConfig(root=str(tmp_path / "empty")), tmp_path / "run")


def test_image_label_shape_or_affine_mismatch_at_resolution(tmp_path: Path, three_cases: list[dict]) -> None:
    bad_shape = write_nifti(tmp_path / "small_gt.nii.gz", make_label((20, 20, 4, 5)), oblique_affine())
    case = dict(three_cases[0], label=str(bad_shape))
    with pytest.raises(DataError, match="small_gt.nii.gz: label shape"):
        resolve_cases(DataConfig(root=str(_datalist(tmp_path, [case]))), tmp_path / "run")
    bad_aff = write_nifti(tmp_path / "moved_gt.nii.gz", make_label(), oblique_affine(origin=(0, 0, 0)))
    case = dict(three_cases[0], label=str(bad_aff))
    with pytest.raises(DataError, match="moved_gt.nii.gz: label affine differs"):
        resolve_cases(DataConfig(root=str(_datalist(tmp_path, [case]))), tmp_path / "run")


def test_frame_indices_out_of_range(tmp_path: Path, three_cases: list[dict]) -> None:
    for change, problem in [({"frames": [0, 7]}, r"labelled frame indices \[7\]"), ({"es": 5}, "ES frame 5"),
                            ({"label": {"9": three_cases[1]["label"]}}, "frame index 9")]:
        case = dict(three_cases[0], **change)
        with pytest.raises(DataError, match=problem):
            resolve_cases(DataConfig(root=str(_datalist(tmp_path, [case]))), tmp_path / "run")


def test_3d_image_needs_allow_3d(tmp_path: Path, configs_dir: Path) -> None:
    img = write_nifti(tmp_path / "vol.nii.gz", make_image(make_label())[..., 0], oblique_affine())
    lab = write_nifti(tmp_path / "vol_gt.nii.gz", make_label()[..., 0], oblique_affine())
    path = _datalist(tmp_path, [{"image": "vol.nii.gz", "label": "vol_gt.nii.gz"}])
    with pytest.raises(DataError, match="vol.nii.gz: is a 3D image"):
        resolve_cases(DataConfig(root=str(path)), tmp_path / "run")
    lists = resolve_cases(DataConfig(root=str(path), allow_3d=True, val_fraction=0.0), tmp_path / "run")
    config = _config(configs_dir, "data.allow_3d=true", "train.iterations_per_epoch=1")
    with pytest.warns(UserWarning, match="one frame"):
        batch = next(iter(build_train_loader(config, lists.training, (1.5, 1.6, 8.0), None)))
    assert batch["image"].shape == (1, 3, 16, 16, 4) and batch["frame_mask"].all()  # one frame, repeated
    assert img.exists() and lab.exists()


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_bad_voxels_raise_data_error_when_loading(configs_dir: Path, tmp_path: Path, three_cases: list[dict],
                                                  cache: str) -> None:
    lab = make_label()
    lab[1, 1, 1, 1] = 9
    bad = write_nifti(tmp_path / "nine_gt.nii.gz", lab, oblique_affine())
    cases = [three_cases[0], dict(three_cases[1], label=str(bad))]
    config = _config(configs_dir, f"data.cache={cache}")
    with pytest.raises(DataError, match=r"nine_gt.nii.gz: label values \[9\] are outside"):
        build_train_loader(config, cases, (1.5, 1.6, 8.0), tmp_path / "cache")
    with pytest.raises(DataError, match="has no label"):
        build_train_loader(config, [dict(three_cases[0], label=None)], (1.5, 1.6, 8.0), None)
    with pytest.raises(DataError, match="no training cases"):
        build_train_loader(config, [], (1.5, 1.6, 8.0), None)
