"""Cases: where the cases come from, how they are checked and how they are split (no voxels read here).

Sources (``data.root``):
1. a Decathlon-style datalist JSON ``{"training": [...], "validation": [...], "test": [...]}``; items have
   ``image`` and optionally ``label`` (a 4D file, or ``{frame (0-based): 3D file}``), ``frames`` (the
   labelled frames of a dense 4D label), ``case_id``, ``ed``/``es`` (0-based); other keys are ignored;
   relative paths are relative to the JSON's folder;
2. an ACDC-layout root (``patientNNN/Info.cfg``, ``patientNNN_4d.nii.gz``, ``patientNNN_frameFF_gt.nii.gz``
   at ED and ES; optional ``training/`` and ``testing/`` sub-folders): sparse ED/ES labels;
3. ``None``: the built-in phantom, generated once under ``work_dir/phantom``.

A case record is a plain dict ``{"case_id": str, "image": str, "label": str | {int: str} | None,
"frames": [int] | None, "ed": int | None, "es": int | None}``.

Cheap header checks run when cases are resolved (shapes, affines, frame indices, 3D images, duplicates);
voxel checks (NaN, label values, truncated data) run when a case is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from trunet.atomic import write_json
from trunet.config import DataConfig
from trunet.data import phantom
from trunet.errors import DataError
from trunet.io import CineMeta, case_id_from_path, read_header

__all__ = [
    "CaseLists",
    "read_datalist",
    "read_acdc_root",
    "acdc_patient_folders",
    "is_acdc_root",
    "is_case_source",
    "read_case_source",
    "parse_info_cfg",
    "validate_cases",
    "resolve_cases",
    "split_cases",
    "median_target_spacing",
    "check_trainable",
]

logger = logging.getLogger(__name__)

_LISTS = ("training", "validation", "test")


@dataclass
class CaseLists:
    """Case records per list (see the module docstring) and where they came from."""

    training: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    source: str = ""

    def all(self) -> list[dict]:
        return self.training + self.validation + self.test


# --- sources --------------------------------------------------------------------------------


def _resolve_path(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise DataError(where, f"expected a file path, got {value!r}")
    p = Path(value)
    return str(p if p.is_absolute() else base / p)


def _record_from_item(item: Any, base: Path, where: str, require_image: bool = True) -> dict:
    if isinstance(item, str):
        item = {"image": item}
    has_label = isinstance(item, dict) and item.get("label") is not None
    if not isinstance(item, dict) or ("image" not in item and (require_image or not has_label)):
        needs = "an 'image' path" if require_image else "an 'image' or a 'label'"
        raise DataError(where, f"each item needs {needs}, got {item!r}"[:300])
    image = _resolve_path(base, item["image"], where) if "image" in item else None
    label = item.get("label")
    if isinstance(label, dict):
        mapping = {}
        for k, v in label.items():
            try:
                frame = int(k)
            except (TypeError, ValueError):
                raise DataError(where, f"label frame key {k!r} of {image} is not an integer frame "
                                       "index") from None
            mapping[frame] = _resolve_path(base, v, where)
        label = mapping
    elif label is not None:
        label = _resolve_path(base, label, where)
    frames = item.get("frames")
    if frames is not None:
        if not isinstance(frames, list) or any(isinstance(f, bool) or not isinstance(f, int) for f in frames):
            raise DataError(where, f"'frames' of {image} must be a list of 0-based frame indices, "
                                   f"got {frames!r}")
    elif isinstance(label, dict):
        frames = sorted(label)
    return {
        "case_id": str(item.get("case_id") or case_id_from_path(image or _first_label_path(label))),
        "image": image,
        "label": label,
        "frames": frames,
        "ed": None if item.get("ed") is None else int(item["ed"]),
        "es": None if item.get("es") is None else int(item["es"]),
    }


def _first_label_path(label: str | dict[int, str]) -> str:
    return label if isinstance(label, str) else label[min(label)]


def read_datalist(path: str | os.PathLike, require_image: bool = True) -> CaseLists:
    """Parse a Decathlon-style datalist JSON into case records (no file checks; see :func:`validate_cases`).

    ``require_image=False`` accepts label-only items (a reference list for evaluation); their ``image`` is
    None and their case id comes from the label's file name unless ``case_id`` is given.

    Raises:
        DataError: unreadable or invalid JSON, a list that is not a list, an item without ``image``, a
            datalist with no cases at all.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "datalist not found")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(p, f"not a valid JSON datalist ({exc})") from None
    if not isinstance(doc, dict):
        raise DataError(p, "a datalist must be a JSON object with 'training'/'validation'/'test' lists")
    lists = CaseLists(source=f"datalist {p}")
    for name in _LISTS:
        items = doc.get(name) or []
        if not isinstance(items, list):
            raise DataError(p, f"'{name}' must be a list of items")
        setattr(lists, name, [_record_from_item(it, p.parent, str(p), require_image) for it in items])
    if not lists.all():
        raise DataError(p, "empty datalist: no cases in 'training', 'validation' or 'test'")
    return lists


def parse_info_cfg(path: str | os.PathLike) -> dict[str, Any]:
    """Read an ACDC ``Info.cfg`` (``key: value`` lines). Returns keys as written; ED, ES, NbFrame as int.

    Raises:
        DataError: missing file, or ED/ES/NbFrame missing, not integers, or out of 1..NbFrame.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "Info.cfg not found")
    info: dict[str, Any] = {}
    for line in p.read_text(errors="replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    for key in ("ED", "ES", "NbFrame"):
        if key not in info:
            raise DataError(p, f"missing '{key}:' line")
        try:
            info[key] = int(float(info[key]))
        except ValueError:
            raise DataError(p, f"'{key}' is not an integer ({info[key]!r})") from None
    for key in ("ED", "ES"):
        if not 1 <= info[key] <= info["NbFrame"]:
            raise DataError(p, f"{key} = {info[key]} is outside frames 1..{info['NbFrame']} (ACDC frames "
                               "count from 1)")
    return info


_PATIENT = re.compile(r"^patient\d+$")


def _acdc_patients(folder: Path) -> list[Path]:
    return sorted(
        d for d in folder.iterdir() if d.is_dir() and _PATIENT.match(d.name) and (d / "Info.cfg").exists()
    )


def acdc_patient_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """The patient folders of an ACDC-layout root, by list: ``patientNNN/`` (with an ``Info.cfg``) directly
    under ``root`` or under ``training/`` are ``"training"``, under ``testing/`` are ``"test"``;
    ``training/`` and ``testing/`` may also sit in ``database/`` (the layout of the challenge's download).

    The one ACDC discovery of trunet: training and ``trunet evaluate --ref`` both read an ACDC root
    through :func:`read_acdc_root` (by way of :func:`read_case_source`), which walks these folders.
    """
    r = Path(root)
    found: dict[str, list[Path]] = {"training": _acdc_patients(r) if r.is_dir() else [], "test": []}
    # the challenge's download unpacks as ACDC/database/{training,testing}/ (older copies: ACDC/training/)
    for base in (r, r / "database"):
        if (base / "training").is_dir():
            found["training"] += _acdc_patients(base / "training")
        if (base / "testing").is_dir():
            found["test"] += _acdc_patients(base / "testing")
    return found


def _acdc_record(patient: Path) -> dict:
    info = parse_info_cfg(patient / "Info.cfg")
    name = patient.name
    image = patient / f"{name}_4d.nii.gz"
    if not image.exists():
        alt = patient / f"{name}_4d.nii"
        image = alt if alt.exists() else image
    ed, es = info["ED"] - 1, info["ES"] - 1
    label: dict[int, str] = {}
    for frame in sorted({ed, es}):
        for suffix in (".nii.gz", ".nii"):
            gt = patient / f"{name}_frame{frame + 1:02d}_gt{suffix}"
            if gt.exists():
                label[frame] = str(gt)
                break
    return {"case_id": name, "image": str(image), "label": label or None, "frames": sorted(label) or None,
            "ed": ed, "es": es}


def read_acdc_root(root: str | os.PathLike) -> CaseLists:
    """Case records of an ACDC-layout root: ``root/patientNNN/`` or ``root/{training,testing}/patientNNN/``.

    Labels are the ED and ES ``_gt`` files (frames from ``Info.cfg``, made 0-based); a patient without
    them has ``label: None``. Patients directly under ``root`` or under ``training/`` are training cases,
    those under ``testing/`` are test cases.

    Raises:
        DataError: no patient folder with an ``Info.cfg``; a bad ``Info.cfg``.
    """
    r = Path(root)
    lists = CaseLists(source=f"ACDC root {r}")
    folders = acdc_patient_folders(r)
    lists.training = [_acdc_record(p) for p in folders["training"]]
    lists.test = [_acdc_record(p) for p in folders["test"]]
    if not lists.all():
        raise DataError(r, "no ACDC patient folders (patientNNN/ with Info.cfg) found")
    return lists


def is_acdc_root(root: str | os.PathLike) -> bool:
    """True when ``root`` holds ACDC patient folders (see :func:`acdc_patient_folders`)."""
    return any(any(v) for v in acdc_patient_folders(root).values())


def is_case_source(root: str | os.PathLike) -> bool:
    """True when ``root`` is what ``data.root`` (``trunet train --data``) takes: a datalist file, an
    ACDC-layout root, or a folder holding ``datalist.json``."""
    r = Path(root)
    return r.is_file() or (r.is_dir() and (is_acdc_root(r) or (r / "datalist.json").is_file()))


def read_case_source(root: str | os.PathLike, require_image: bool = True) -> CaseLists:
    """Case records of a case source, as training reads ``data.root``: a datalist file
    (:func:`read_datalist`), an ACDC-layout root (:func:`read_acdc_root`; also its parent, which holds it as
    ``training/``), or a folder holding ``datalist.json``. ``trunet evaluate --ref`` reads the same sources
    through this function, with ``require_image=False`` (label-only datalist items).

    Raises:
        DataError: a missing root, a folder that is none of these, or any error of the readers.
    """
    r = Path(root)
    if r.is_file():
        return read_datalist(r, require_image)
    if not r.is_dir():
        raise DataError(r, "data root not found")
    if is_acdc_root(r):
        return read_acdc_root(r)
    if (r / "datalist.json").is_file():
        return read_datalist(r / "datalist.json", require_image)
    raise DataError(r, "neither an ACDC-layout root (patientNNN/Info.cfg) nor a folder with datalist.json")


def _phantom_lists(config: DataConfig, work_dir: Path) -> CaseLists:
    out = work_dir / "phantom"
    marker = out / "trunet_phantom.json"
    wanted = {"cases": config.phantom_cases, "seed": config.phantom_seed}
    datalist = out / "datalist.json"
    if datalist.is_file():
        if marker.is_file() and json.loads(marker.read_text()) != wanted:
            found = json.loads(marker.read_text())
            raise DataError(out, f"holds a phantom generated with {found}, the config asks for {wanted}; "
                                 "remove the folder or use another run folder")
        logger.info("reusing the phantom in %s", out)
    else:
        logger.info("generating %d phantom cases (seed %d) in %s", config.phantom_cases, config.phantom_seed,
                    out)
        datalist = Path(phantom.write_phantom_dataset(out, cases=config.phantom_cases, seed=config.phantom_seed))
        write_json(marker, wanted)
    lists = read_datalist(datalist)
    lists.source = f"phantom ({config.phantom_cases} cases, seed {config.phantom_seed}) in {out}"
    return lists


# --- checks ---------------------------------------------------------------------------------


def _check_case(case: dict, allow_3d: bool) -> CineMeta:
    meta = read_header(case["image"])
    if meta.ndim == 3 and not allow_3d:
        raise DataError(
            case["image"], f"is a 3D image {meta.spatial_shape}; a cine (x, y, z, t) is expected "
            "(set data.allow_3d: true to use a 3D image as a cine of one frame)"
        )
    t = meta.n_frames
    label = case.get("label")

    def check_geometry(lab: CineMeta) -> None:
        if lab.spatial_shape != meta.spatial_shape:
            raise DataError(lab.path, f"label shape {lab.spatial_shape} differs from the image's "
                                      f"{meta.spatial_shape} ({meta.path})")
        if not np.allclose(lab.affine, meta.affine, atol=1e-3, rtol=1e-4):
            raise DataError(lab.path, f"label affine differs from the image's ({meta.path})")

    if isinstance(label, dict):
        for frame, path in label.items():
            if not 0 <= int(frame) < t:
                raise DataError(path, f"label frame index {frame} is out of range for {meta.path} with {t} "
                                      "frames (0-based)")
            lab = read_header(path)
            if lab.n_frames != 1:
                raise DataError(path, f"a per-frame label must be 3D, got shape {lab.shape}")
            check_geometry(lab)
    elif label is not None:
        lab = read_header(label)
        check_geometry(lab)
        if lab.n_frames != t:
            raise DataError(label, f"label has {lab.n_frames} frames, the image {meta.path} has {t}")
    for key in ("frames",):
        bad = [f for f in case.get(key) or [] if not 0 <= int(f) < t]
        if bad:
            raise DataError(case["image"], f"labelled frame indices {bad} are out of range for {t} frames "
                                           "(0-based)")
    for key in ("ed", "es"):
        value = case.get(key)
        if value is not None and not 0 <= int(value) < t:
            raise DataError(case["image"], f"{key.upper()} frame {value} is out of range for {t} frames "
                                           "(0-based)")
    return meta


def validate_cases(lists: CaseLists, data_config: DataConfig) -> None:
    """Header-level checks of every case (no voxel data read).

    Raises:
        DataError: duplicate case ids, missing/unreadable files, 3D images where a cine is expected,
            image/label shape or affine mismatch, frame indices out of range.
    """
    seen: dict[str, str] = {}
    for case in lists.all():
        cid = case["case_id"]
        if cid in seen:
            raise DataError(case["image"], f"duplicate case id '{cid}' (also used by {seen[cid]})")
        seen[cid] = case["image"]
    for case in lists.all():
        _check_case(case, data_config.allow_3d)


# --- public ---------------------------------------------------------------------------------


def split_cases(cases: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Patient-level split, reproducible from ``seed`` and independent of the input order.

    Returns:
        ``(training, validation)``; validation has ``round(val_fraction * n)`` cases (at least 1 when
        ``val_fraction > 0`` and ``n >= 2``; training keeps at least 1). Both sorted by case id.
    """
    ordered = sorted(cases, key=lambda c: c["case_id"])
    n = len(ordered)
    if val_fraction <= 0 or n < 2:
        return ordered, []
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    val_idx = set(idx[:n_val])
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    return train, [c for i, c in enumerate(ordered) if i in val_idx]


def resolve_cases(data_config: DataConfig, work_dir: Optional[str | os.PathLike]) -> CaseLists:
    """The case lists of ``data_config.root`` (datalist JSON, ACDC root, or the phantom when ``None``).

    When the source has no validation list and ``val_fraction > 0``, the training list is split by
    patient (:func:`split_cases` with ``split_seed``). Every case is header-checked
    (:func:`validate_cases`). The lists' case ids are written to ``work_dir/splits.json``; with
    ``work_dir=None`` nothing is written (a check of the data before a run folder exists; the phantom,
    which lives in the run folder, then needs a ``work_dir``).

    Returns:
        :class:`CaseLists` with ``.training``, ``.validation``, ``.test`` lists of case records.
    Raises:
        DataError: missing root, unrecognised folder, empty datalist, any header check.
    """
    work = None if work_dir is None else Path(work_dir)
    root = data_config.root
    if root is None:
        if work is None:
            raise ValueError("the phantom is generated in the run folder: resolve_cases needs a work_dir")
        lists = _phantom_lists(data_config, work)
    else:
        lists = read_case_source(root)
    validate_cases(lists, data_config)
    if not lists.validation and lists.training:
        lists.training, lists.validation = split_cases(
            lists.training, data_config.val_fraction, data_config.split_seed
        )
    if work is not None:
        write_json(work / "splits.json", {
            "source": lists.source,
            "split_seed": data_config.split_seed,
            "val_fraction": data_config.val_fraction,
            **{name: [c["case_id"] for c in getattr(lists, name)] for name in _LISTS},
        })
    logger.info("%s: %d training, %d validation, %d test cases", lists.source, len(lists.training),
                len(lists.validation), len(lists.test))
    return lists


def median_target_spacing(cases: list[dict]) -> tuple[float, float, float]:
    """Median voxel spacing (x, y, z) in mm over ``cases``, from headers only (nnU-Net's choice for ACDC:
    the median in-plane spacing, the slice spacing kept at its median).

    Raises:
        DataError: no cases, or an unreadable header.
    """
    if not cases:
        raise DataError(None, "no cases to compute a target spacing from")
    spacings = np.array([read_header(c["image"]).spacing for c in cases], dtype=np.float64)
    return tuple(float(v) for v in np.median(spacings, axis=0))  # type: ignore[return-value]


def check_trainable(cases: list[dict]) -> None:
    if not cases:
        raise DataError(None, "no training cases")
    for c in cases:
        if c.get("label") is None:
            raise DataError(c["image"], f"training case '{c['case_id']}' has no label")
