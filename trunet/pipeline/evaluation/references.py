"""Where the references of ``trunet evaluate`` live (a label folder, a datalist, an ACDC root) and how
predictions and references are read and checked against each other's grid."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from trunet.data.cases import acdc_patient_folders, is_acdc_root, parse_info_cfg, read_datalist
from trunet.errors import DataError
from trunet.io import CineMeta, load_cine, load_label, strip_image_suffix

__all__ = ["ReferenceCase", "find_references", "load_prediction", "load_reference", "read_image_frames"]

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE = 1e-3
IGNORE_INDEX = 255
_REF_SUFFIXES = ("_4d_gt", "_gt", "_seg")  # label-folder names, in order of preference


@dataclass
class ReferenceCase:
    """Where one case's reference lives.

    Attributes:
        case_id: the case name, matched against ``<case_id>_seg.nii.gz`` predictions.
        label: a 4D label file ``(x, y, z, t)``, or ``{frame (0-based): 3D label file}``.
        image: the 4D image, for overlay figures (``None`` = unknown, no montage).
        ed, es: reference end-diastolic/end-systolic frames, 0-based, when known.
        frames: labelled frames of a 4D label (``None`` = every frame not filled with 255).
    """

    case_id: str
    label: str | dict[int, str]
    image: str | None = None
    ed: int | None = None
    es: int | None = None
    frames: list[int] | None = None


def _label_folder_references(folder: Path) -> dict[str, ReferenceCase]:
    found: dict[str, tuple[int, str]] = {}
    for path in sorted(folder.iterdir()):
        stem = strip_image_suffix(path.name)
        if stem == path.name or not path.is_file():
            continue
        for rank, suffix in enumerate(_REF_SUFFIXES):
            if stem.endswith(suffix) and len(stem) > len(suffix):
                case_id = stem[: -len(suffix)]
                if case_id not in found or rank < found[case_id][0]:
                    found[case_id] = (rank, str(path))
                break
    return {cid: ReferenceCase(case_id=cid, label=p) for cid, (_, p) in found.items()}


def _acdc_references(root: Path) -> dict[str, ReferenceCase]:
    refs: dict[str, ReferenceCase] = {}
    folders = acdc_patient_folders(root)  # the one ACDC discovery: root, training/ and testing/
    for case_dir in folders["training"] + folders["test"]:
        cid = case_dir.name
        info = parse_info_cfg(case_dir / "Info.cfg")
        ed, es = info["ED"] - 1, info["ES"] - 1
        dense = case_dir / f"{cid}_4d_gt.nii.gz"
        label: str | dict[int, str]
        if dense.is_file():
            label = str(dense)
        else:
            label = {}
            for gt in sorted(case_dir.glob(f"{cid}_frame*_gt.nii*")):
                match = re.fullmatch(rf"{re.escape(cid)}_frame(\d+)_gt\.nii(\.gz)?", gt.name)
                if match:
                    label[int(match.group(1)) - 1] = str(gt)
            if not label:
                logger.warning("%s: no reference labels (%s_4d_gt / _frameFF_gt), skipped", case_dir, cid)
                continue
        if cid in refs:
            logger.warning("%s: case %s found twice in the ACDC root; the first is used", case_dir, cid)
            continue
        image = case_dir / f"{cid}_4d.nii.gz"
        refs[cid] = ReferenceCase(cid, label, str(image) if image.is_file() else None, ed, es)
    return refs


def _datalist_references(path: Path) -> dict[str, ReferenceCase]:
    """Cases of every list of a datalist (parsed by :func:`read_datalist`) that have a label."""
    refs: dict[str, ReferenceCase] = {}
    for record in read_datalist(path, require_image=False).all():
        cid = record["case_id"]
        if record["label"] is None:
            logger.info("%s: case %s has no label in the datalist", path, cid)
            continue
        if cid in refs:
            logger.warning("%s: case %s listed twice; the first entry is used", path, cid)
            continue
        refs[cid] = ReferenceCase(cid, record["label"], record["image"], record["ed"], record["es"], record["frames"])
    return refs


def find_references(ref: str | os.PathLike) -> dict[str, ReferenceCase]:
    """References by case id from a datalist JSON, an ACDC-layout root or a folder of 4D label files.

    The ACDC root is found as training finds it (:func:`trunet.data.cases.acdc_patient_folders`):
    ``patientNNN/`` directly under the root or under ``training/`` and ``testing/``.

    A label folder holds ``<case_id>_4d_gt.nii.gz``, ``<case_id>_gt.nii.gz`` or ``<case_id>_seg.nii.gz``
    (preferred in that order). An ACDC root holds ``patientNNN/Info.cfg`` (ED/ES, 1-based) with the dense
    ``patientNNN_4d_gt.nii.gz`` when present, else the sparse ``patientNNN_frameFF_gt.nii.gz``.
    """
    ref = Path(ref)
    if ref.is_file():
        if ref.suffix.lower() != ".json":
            raise DataError(ref, "the reference must be a folder, a datalist .json or an ACDC root")
        return _datalist_references(ref)
    if not ref.is_dir():
        raise DataError(ref, "reference not found")
    if is_acdc_root(ref):
        return _acdc_references(ref)
    return _label_folder_references(ref)




def load_prediction(path: Path, num_classes: int) -> tuple[np.ndarray, CineMeta]:
    """Predicted labels ``(T, X, Y, Z)`` uint8 and their :class:`~trunet.io.CineMeta`."""
    labels, _, meta = load_label(path, num_classes=num_classes)
    return labels, meta


def _check_geometry(ref_meta: CineMeta, pred_meta: CineMeta) -> None:
    """The reference must lie on the prediction's grid: same shape, affine within ``AFFINE_TOLERANCE``."""
    if tuple(ref_meta.spatial_shape) != tuple(pred_meta.spatial_shape):
        raise DataError(ref_meta.path, f"reference shape {tuple(ref_meta.spatial_shape)} differs from the "
                                       f"prediction's {tuple(pred_meta.spatial_shape)} ({pred_meta.path})")
    diff = float(np.max(np.abs(np.asarray(ref_meta.affine) - np.asarray(pred_meta.affine))))
    if diff > AFFINE_TOLERANCE:
        raise DataError(ref_meta.path, f"reference affine differs from the prediction's ({pred_meta.path}) "
                                       f"by {diff:.4g} (tolerance {AFFINE_TOLERANCE}): not on the same grid")


def load_reference(ref: ReferenceCase, pred_meta: CineMeta, num_classes: int) -> dict[int, np.ndarray]:
    """Labelled reference frames ``{frame: (X, Y, Z) uint8}``, checked against the prediction's grid.

    A frame filled with ``IGNORE_INDEX`` (255) counts as unlabelled; a partly filled one is an error.
    """
    t = pred_meta.n_frames
    if isinstance(ref.label, dict):
        labels, mask, meta = load_label(ref.label, n_frames=t, ignore_index=IGNORE_INDEX)
    else:
        labels, mask, meta = load_label(ref.label, frames=ref.frames, ignore_index=IGNORE_INDEX)
    _check_geometry(meta, pred_meta)
    if labels.shape[0] != t:
        raise DataError(meta.path, f"reference has {labels.shape[0]} frames, the prediction has {t} "
                                   f"({pred_meta.path})")
    frames: dict[int, np.ndarray] = {}
    for f in np.flatnonzero(mask):
        frame = labels[f]
        ignored = frame == IGNORE_INDEX
        if ignored.all():
            continue
        if ignored.any():
            raise DataError(meta.path, f"frame {f} is partly unlabelled ({IGNORE_INDEX}); label whole frames")
        if frame.max() >= num_classes:
            raise DataError(meta.path, f"label value {int(frame.max())} in frame {f} but only {num_classes} "
                                       f"classes (0..{num_classes - 1}) are evaluated; pass --classes")
        frames[int(f)] = frame
    return frames


def read_image_frames(
    path: str, frames: Iterable[int], z: int, shape: Sequence[int]
) -> dict[int, np.ndarray] | None:
    """2D ``(X, Y)`` slices ``z`` of the given frames of the image; ``None`` (logged) if unusable."""
    try:
        image, meta = load_cine(path, allow_3d=True)
    except DataError as exc:  # the image only feeds a figure; a bad image must not stop the evaluation
        logger.warning("%s; overlay montage skipped", exc)
        return None
    if tuple(image.shape[1:]) != tuple(shape) or max(frames, default=0) >= image.shape[0]:
        logger.warning("%s: image shape %s does not match the prediction's %s; overlay montage skipped",
                       path, meta.shape, tuple(shape))
        return None
    return {f: image[f, :, :, z] for f in frames}
