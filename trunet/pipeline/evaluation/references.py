"""Where the references of ``trunet evaluate`` live (what training takes: a datalist, an ACDC root; or a
folder of label files) and how predictions and references are read and checked against each other's grid."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from trunet.data.cases import is_acdc_root, is_case_source, read_case_source
from trunet.errors import DataError
from trunet.io import CineMeta, is_image_path, load_cine, load_label, strip_image_suffix

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


def _case_source_references(ref: Path) -> dict[str, ReferenceCase]:
    """The cases with a label of a case source, read as training reads it (:func:`read_case_source`).

    An ACDC patient's sparse ED/ES labels give way to its dense ``patientNNN_4d_gt.nii.gz`` where one lies
    beside the image (the phantom writes both): every frame is then scored.
    """
    acdc = ref.is_dir() and is_acdc_root(ref)
    refs: dict[str, ReferenceCase] = {}
    for record in read_case_source(ref, require_image=False).all():
        cid, label, image = record["case_id"], record["label"], record["image"]
        frames = record["frames"]
        if acdc:
            dense = Path(image).with_name(f"{cid}_4d_gt.nii.gz")
            if dense.is_file():
                label, frames = str(dense), None
            image = image if Path(image).is_file() else None
        if label is None:
            logger.warning("%s: case %s has no reference label, skipped", ref, cid)
            continue
        if cid in refs:
            logger.warning("%s: case %s found twice; the first is used", ref, cid)
            continue
        refs[cid] = ReferenceCase(cid, label, image, record["ed"], record["es"], frames)
    return refs


def find_references(ref: str | os.PathLike) -> dict[str, ReferenceCase]:
    """References by case id from what ``trunet train --data`` takes, or from a folder of 4D label files.

    What training takes is read as training reads it (:func:`trunet.data.cases.read_case_source`): a
    datalist file, an ACDC-layout root (``patientNNN/Info.cfg`` directly under it or under ``training/``
    and ``testing/``, so both ``ACDC/training`` and ``ACDC`` work; ED/ES from ``Info.cfg``, labels the
    ``patientNNN_frameFF_gt.nii.gz`` at ED and ES, or the dense ``patientNNN_4d_gt.nii.gz`` when present),
    or a folder holding ``datalist.json``. Any other folder is a label folder: it holds
    ``<case_id>_4d_gt.nii.gz``, ``<case_id>_gt.nii.gz`` or ``<case_id>_seg.nii.gz`` (preferred in that
    order).

    Raises:
        DataError: a missing reference, an image file, or any error of the case-source readers (an invalid
            datalist, a bad ``Info.cfg``).
    """
    ref = Path(ref)
    if not ref.exists():
        raise DataError(ref, "reference not found")
    if ref.is_file() and is_image_path(ref):
        raise DataError(ref, "is an image; --ref takes a datalist, an ACDC root or a folder of label files")
    if is_case_source(ref):
        return _case_source_references(ref)
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
