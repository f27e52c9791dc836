"""``trunet predict``: input discovery, one case from file to written prediction, and :func:`run_prediction`."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from trunet.config import InferConfig, config_from_dict
from trunet.data.cases import read_datalist
from trunet.data.datasets import unwrap_data_errors
from trunet.errors import CheckpointError, ConfigError, DataError, TrunetError
from trunet.io import case_id_from_path, is_image_path, read_header, save_cine_like, strip_image_suffix
from trunet.io.dicom import DICOM_SUFFIXES, dicom_cine_folders, is_dicom_folder, scan_dicom_cine
from trunet.io.dicom_seg import write_dicom_seg
from trunet.io.frames import check_frame_series
from trunet.pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from trunet.pipeline.inference.frame_repair import repair_spoilt_frames
from trunet.pipeline.inference.postprocess import (
    exclude_atrial_slices,
    keep_largest_components,
    probabilities_to_labels,
)
from trunet.pipeline.inference.predictor import Predictor, resolve_device
from trunet.progress import is_terminal
from trunet.transforms.compose import inference_transforms, invert_prediction

__all__ = ["InputCase", "find_inputs", "run_prediction", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = ("nifti", "dicom-seg")

logger = logging.getLogger(__name__)


_LABEL_NAME = re.compile(r"(_gt|_seg|_prob(_.*)?)$", re.IGNORECASE)
"""Names (without suffixes) a folder search never takes as input: labels and predictions."""
_FRAME_NAME = re.compile(r"_frame\d+$", re.IGNORECASE)
"""ACDC's per-frame files (``patient001_frame01``): frames, never a cine of their own."""


@dataclass(frozen=True)
class InputCase:
    """One scan to segment: ``image`` is a file (or a per-frame folder named in a datalist)."""

    case_id: str
    image: Path


def _datalist_cases(path: Path) -> list[InputCase]:
    """The datalist's ``test`` list, or every list when it has none (parsed by :func:`read_datalist`)."""
    lists = read_datalist(path)
    records = lists.test or lists.all()
    return [InputCase(str(record["case_id"]), Path(record["image"])) for record in records]


def _folder_cases(folder: Path, output_dir: Path, allow_3d: bool) -> list[InputCase]:
    """The cases of a folder, searched recursively, one folder at a time (see :func:`find_inputs`)."""
    out = output_dir.resolve()
    # DICOM: one case per folder holding one study's images (the folder itself, or its subfolders)
    dicom = [InputCase(cine.name, cine) for cine in dicom_cine_folders(folder, exclude=out)]
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*"), key=lambda p: str(p)):
        if not path.is_file() or not is_image_path(path) or path.name.startswith("."):
            continue
        if _LABEL_NAME.search(strip_image_suffix(path.name)) or out in path.resolve().parents:
            continue
        by_folder.setdefault(path.parent, []).append(path)
    cases, skipped_3d = [], 0
    for parent, files in by_folder.items():
        cines, frames = [], []
        for path in files:
            if _FRAME_NAME.search(strip_image_suffix(path.name)):
                frames.append(path)
            elif read_header(path).ndim == 3 and not allow_3d:
                frames.append(path)
            else:
                cines.append(InputCase(case_id_from_path(path), path))
        if not cines and len(frames) > 1:  # a folder of one 3D file per frame: one case
            check_frame_series(parent)
            read_header(parent)  # every frame 3D, one grid
            cines.append(InputCase(case_id_from_path(parent), parent))
        else:
            skipped_3d += len(frames)
        cases += cines
    if not cases and not dicom:
        detail = f" ({skipped_3d} lone 3D files skipped: a cine is (x, y, z, t))" if skipped_3d else ""
        raise DataError(
            folder, "no input images found (DICOM series, 4D .nii.gz, .nii, .mha, .mhd or .nrrd not named "
            f"*_gt, *_seg or *_prob*, or a folder of per-frame 3D files){detail}"
        )
    if skipped_3d:
        logger.info("%s: skipped %d 3D files beside a 4D cine or alone in their folder (a cine is (x, y, z, "
                    "t))", folder, skipped_3d)
    return dicom + sorted(cases, key=lambda c: str(c.image))


def find_inputs(inputs: Union[str, os.PathLike], output_dir: Union[str, os.PathLike], allow_3d: bool = False) -> list[InputCase]:
    """The scans ``trunet predict`` segments.

    Args:
        inputs: one image file (4D; a 3D file only with ``allow_3d``); a folder, searched recursively for
            DICOM cines and image files (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``)
            except hidden files, labels and earlier outputs (names ending ``_gt``, ``_seg``, ``_prob...``)
            and anything under ``output_dir``; each 4D file is a case (each 3D file too with ``allow_3d``).
            The 3D files of a folder that holds no 4D file, two or more of them (ACDC's ``_frameNN`` files
            count as 3D), are one case: a cine of one 3D file per frame, frames in frame-number order, the
            folder's name its id; the file names must say so
            (:func:`~trunet.io.frames.check_frame_series`). Beside a 4D file, or alone in a folder, 3D
            files are skipped. Or a datalist JSON: its ``test`` list, or every list when that is empty or
            missing (items are ``{"image": ..., "case_id": ...}`` or bare paths, relative to the JSON's
            folder).
        output_dir: where predictions go (excluded from a folder search).

    Returns:
        Cases with ids: a datalist's ``case_id``, else the file name without suffixes and a trailing ``_4d``
        (a per-frame folder's name).

    Raises:
        DataError: the input does not exist, is the output folder, holds no images, or two inputs share a case
            id; a folder of 3D files that is not one series of frames (files without a frame number,
            several series, a number twice or a gap; a 4D file or another grid among the frames), naming
            the folder and what it holds.
    """
    path = Path(inputs)
    if not path.exists():
        raise DataError(path, "input not found")
    if path.is_dir() and path.resolve() == Path(output_dir).resolve():
        raise DataError(path, "--input and --output are the same folder; write the predictions to another folder")
    if path.is_dir():
        cases = _folder_cases(path, Path(output_dir), allow_3d)
    elif path.name.lower().endswith(".json"):
        cases = _datalist_cases(path)
        if not cases:
            raise DataError(path, "the datalist lists no images")
    elif path.name.lower().endswith(DICOM_SUFFIXES):
        cases = [InputCase(path.name[: path.name.rfind(".")], path)]  # one enhanced multi-frame file
    else:
        cases = [InputCase(case_id_from_path(path), path)]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(case.image, f"case id '{case.case_id}' is also the id of {seen[case.case_id]}; outputs would collide")
        seen[case.case_id] = case.image
    return cases


def _is_dicom(image: Path) -> bool:
    return image.name.lower().endswith(DICOM_SUFFIXES) or (image.is_dir() and is_dicom_folder(image))


def _output_paths(case: InputCase, output_dir: Path, classes: Sequence[str], probabilities: bool,
                  formats: Sequence[str] = ("nifti",)) -> list[Path]:
    """The NIfTI label file first (when asked for), then the SEG folder, then probability files."""
    paths = [output_dir / f"{case.case_id}_seg.nii.gz"] if "nifti" in formats else []
    if "dicom-seg" in formats:
        paths.append(output_dir / f"{case.case_id}_seg_dicom")
    if probabilities:
        for k, name in enumerate(classes):
            safe = re.sub(r"[^A-Za-z0-9-]+", "-", str(name)).strip("-") or f"class{k}"
            paths.append(output_dir / f"{case.case_id}_prob_{k}_{safe}.nii.gz")
    return paths


def _check_outputs(cases: Sequence[InputCase], output_dir: Path, classes: Sequence[str], probabilities: bool,
                   formats: Sequence[str] = ("nifti",), overwrite: bool = False) -> None:
    """Refuse to write over an input, over an existing file that sits in an input's folder, or (unless
    ``overwrite``) over an earlier prediction; a DICOM SEG needs a DICOM input."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(output_dir, "output must be a folder, this is a file")
    inputs = {c.image.resolve() for c in cases}
    input_dirs = {c.image.resolve().parent for c in cases}
    out = output_dir.resolve()
    for case in cases:
        if "dicom-seg" in formats and not _is_dicom(case.image):
            raise DataError(case.image, "--output-format dicom-seg needs a DICOM input (a SEG references its "
                                        "source images); use --output-format nifti for this file")
        for target in _output_paths(case, output_dir, classes, probabilities, formats):
            if any(target.resolve() == i or i in target.resolve().parents for i in inputs):
                raise DataError(target, "is an input image or inside an input folder; choose another --output folder")
            if target.exists() and out in input_dirs:
                raise DataError(
                    target, "exists in the input folder and could be an input or a reference; choose another --output folder"
                )
            if target.exists() and not overwrite:
                raise DataError(target, "exists (an earlier prediction?); pass --overwrite to replace it or choose "
                                        "another --output folder")


def _check_checkpoint(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    preprocessing = payload.get("preprocessing")
    if not isinstance(preprocessing, dict):
        raise CheckpointError(f"{path}: checkpoint has no preprocessing settings; it cannot be used for prediction")
    missing = [k for k in ("patch_size", "time_window", "classes") if k not in preprocessing]
    if missing:
        raise CheckpointError(f"{path}: checkpoint preprocessing lacks {', '.join(missing)}")
    if list(preprocessing["classes"]) != list(payload["classes"]):
        raise CheckpointError(
            f"{path}: inconsistent checkpoint: preprocessing classes {list(preprocessing['classes'])} differ from "
            f"the model's {list(payload['classes'])}"
        )
    if payload["model_hparams"].get("in_channels", 1) != 1:
        raise CheckpointError(
            f"{path}: the model takes {payload['model_hparams']['in_channels']} channels per frame; cine MRI has 1"
        )
    return preprocessing


def _infer_config(payload: dict[str, Any], path: Path, **overrides: Any) -> InferConfig:
    saved = (payload.get("config") or {}).get("infer") or {}
    try:
        config = config_from_dict({"infer": saved}, source=f"{path} (infer settings)").infer
    except TrunetError as exc:
        raise CheckpointError(str(exc)) from None
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if not 0.0 <= config.overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {config.overlap}")
    if not 0.0 < config.repair_min_drop < 1.0:
        raise ConfigError(f"repair_min_drop must be in (0, 1) (Dice), got {config.repair_min_drop}")
    if not 0.0 < config.min_enclosed <= 1.0:
        raise ConfigError(f"min_enclosed must be in (0, 1] (a fraction of the LV cavity's outline), got "
                          f"{config.min_enclosed}")
    if config.sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be at least 1, got {config.sw_batch_size}")
    return config


def _predict_one(
    case: InputCase,
    predictor: Predictor,
    transforms: Any,
    output_dir: Path,
    postprocess: bool,
    save_probabilities: bool,
    formats: Sequence[str] = ("nifti",),
    repair_min_drop: Optional[float] = None,
    min_enclosed: Optional[float] = None,
) -> list[Path]:
    header = read_header(case.image)
    with unwrap_data_errors():  # MONAI's Compose wraps a DataError (NaN, truncated file) in a RuntimeError
        data = transforms({"image": str(case.image), "case_id": case.case_id})
    image = data["image"]
    if image.dim() != 4:
        raise DataError(case.image, f"preprocessed image has shape {tuple(image.shape)}; expected (T, X, Y, Z)")
    frames, num_classes = image.shape[0], predictor.num_classes
    probs = predictor.predict_case(image, description=case.case_id)[0].cpu()  # (T, K, x, y, z)
    # back onto the scan's grid: probabilities are resampled (linear), then the arg-max is taken there
    folded = probs.reshape(frames * num_classes, *probs.shape[2:])
    del probs
    inverted = invert_prediction(transforms, image, folded, nearest=False)
    inverted = inverted.as_tensor() if hasattr(inverted, "as_tensor") else torch.as_tensor(inverted)
    inverted = inverted.reshape(frames, num_classes, *inverted.shape[1:])
    if tuple(inverted.shape[2:]) != header.spatial_shape or frames != header.n_frames:
        raise RuntimeError(  # a bug in the transform chain, not a user error
            f"{case.image}: inverted prediction {tuple(inverted.shape)} does not match the scan "
            f"(T={header.n_frames}, {header.spatial_shape})"
        )
    if repair_min_drop is not None:
        # on the scan's grid, not the model's: the slices that the base moves through over the cycle, which
        # the repair must not count as a spoilt frame, are the scan's own (resampled, one spreads over two)
        inverted, repair = repair_spoilt_frames(inverted, repair_min_drop)
        if repair.frames:
            logger.info("%s: frames %s break from their neighbours (agreement %s < %.3f Dice); replaced by "
                        "interpolation between the nearest unflagged frames", case.case_id, repair.frames,
                        [repair.agreement[t] for t in repair.frames], repair.threshold)
        elif repair.skipped:
            logger.warning("%s: %s", case.case_id, repair.skipped)
    labels = probabilities_to_labels(inverted)
    if postprocess:
        labels = keep_largest_components(labels, classes=range(1, num_classes))
    if min_enclosed is not None:
        labels = _exclude_atrium(labels, predictor.classes, min_enclosed, case.case_id)
    targets = _output_paths(case, output_dir, predictor.classes, save_probabilities, formats)
    written = []
    if "nifti" in formats:
        written.append(save_cine_like(labels, case.image, targets.pop(0), dtype=np.uint8))
    if "dicom-seg" in formats:
        labels_np = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
        seg_dir = targets.pop(0)
        write_dicom_seg(labels_np.astype(np.uint8), scan_dicom_cine(case.image), seg_dir, predictor.classes)
        written.append(seg_dir)
    for k, target in enumerate(targets):
        written.append(save_cine_like(inverted[:, k].numpy(), case.image, target, dtype=np.float32))
    return written


def _exclude_atrium(
    labels: np.ndarray, classes: Sequence[str], min_enclosed: float, case_id: str
) -> np.ndarray:
    """:func:`exclude_atrial_slices` on ``(T, X, Y, Z)`` labels when the classes name an ``LV`` and a
    ``MYO``."""
    if "LV" not in classes or "MYO" not in classes:
        logger.debug("%s: no LV and MYO classes in %s: basal-slice rule not applied", case_id, list(classes))
        return labels
    labels, removed = exclude_atrial_slices(labels, classes.index("LV"), classes.index("MYO"), min_enclosed)
    if removed:
        logger.info("%s: basal LV cavity less than %.0f%% enclosed by myocardium, or between such frames "
                    "around end-systole (atrium), relabelled background at (frame, slice) %s", case_id,
                    100 * min_enclosed, removed)
    return labels


def _note_unseen_mirroring(payload: dict, config: Any, ckpt: Path) -> None:
    """Say so when mirroring TTA meets a model trained without mirroring: a mirrored heart (RV on the other
    side) is an input such a model never saw. On the phantom TTA still gained Dice with such a model, as
    much as with one trained with mirroring (BENCHMARKS.md, "Mirroring TTA"), so this is a note, not a
    warning; real scans may differ."""
    flip = payload.get("config", {}).get("train", {}).get("augment", {}).get("flip_prob")
    if config.tta and flip is not None and float(flip) == 0.0:
        logger.info("%s: mirroring TTA on a model trained without mirroring (train.augment.flip_prob 0); on the "
                    "phantom it still helped (BENCHMARKS.md, Mirroring TTA): compare with --no-tta on your data",
                    ckpt)


def run_prediction(
    checkpoint: Union[str, os.PathLike],
    inputs: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    device: Union[str, torch.device, None] = None,
    overlap: Optional[float] = None,
    sw_batch_size: Optional[int] = None,
    tta: Optional[bool] = None,
    postprocess: Optional[bool] = None,
    repair_frames: Optional[bool] = None,
    exclude_atrium: Optional[bool] = None,
    save_probabilities: bool = False,
    cpu_bf16: Optional[bool] = None,
    output_formats: Sequence[str] = ("nifti",),
    overwrite: bool = False,
) -> list[Path]:
    """Segment every frame of the input scans with a checkpoint (``trunet predict``).

    Everything about the data (target spacing, normalisation, patch, time window, classes) comes from the
    checkpoint; ``overlap``, ``sw_batch_size``, ``tta``, ``postprocess``, ``repair_frames``,
    ``exclude_atrium`` and ``cpu_bf16`` override its ``infer`` settings when not ``None``.

    Args:
        checkpoint: a ``.pt`` written by training (``RUN/checkpoints/best.pt``).
        inputs: a 4D image file, a DICOM cine folder, a folder of per-frame 3D files, a folder of them or a
            datalist JSON (see :func:`find_inputs`).
        output_dir: created if missing. For each case ``<case_id>_seg.nii.gz``: uint8 labels ``(x, y, z, t)``
            on the scan's exact grid (shape, affine, header, time step). With ``save_probabilities`` also
            ``<case_id>_prob_<k>_<class>.nii.gz`` per class ``k``: float32 softmax probabilities
            ``(x, y, z, t)`` on the same grid (NIfTI-1 has no float16; one 4D file per class opens in any
            viewer, a 5D file would not).
        device: ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available.
        tta: mirroring test-time augmentation.
        postprocess: keep the largest component per class and frame.
        repair_frames: replace the probabilities of frames whose segmentation breaks from their neighbours
            (spoilt frames: signal dropout, a mistriggered beat) by interpolation in time between the nearest
            clean frames (:mod:`trunet.pipeline.inference.frame_repair`); the repaired frames are logged.
        exclude_atrium: the basal-slice rule: at the base, LV cavity less than ``infer.min_enclosed`` (one
            half) surrounded by myocardium is atrium and becomes background
            (:func:`~trunet.pipeline.inference.postprocess.exclude_atrial_slices`); the slices are logged.
        cpu_bf16: bf16 autocast on the CPU (default: the checkpoint's ``infer.cpu_bf16``, normally on exactly
            where the CPU has bf16 instructions).
        output_formats: ``"nifti"`` (the labels file above) and/or ``"dicom-seg"``: for a DICOM input, the
            folder ``<case_id>_seg_dicom/`` holding a DICOM SEG series, one instance per cardiac frame
            referencing its source images (:mod:`trunet.io.dicom_seg`).
        overwrite: replace earlier predictions in ``output_dir`` (refused otherwise, before any work).

    Returns:
        The written files, in case order. Each file is written atomically; nothing is written over an input.

    Raises:
        CheckpointError: missing, corrupt or incompatible checkpoint.
        DataError: no inputs, unreadable input, wrong dimensionality, an output that would overwrite an input
            (or an earlier prediction, unless ``overwrite``).
    """
    ckpt = Path(checkpoint)
    payload = load_checkpoint(ckpt)
    preprocessing = _check_checkpoint(payload, ckpt)
    config = _infer_config(payload, ckpt, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, postprocess=postprocess,
                           repair_frames=repair_frames, exclude_atrium=exclude_atrium, cpu_bf16=cpu_bf16)
    _note_unseen_mirroring(payload, config, ckpt)
    allow_3d = bool(preprocessing.get("allow_3d", False))
    out_dir = Path(output_dir)
    cases = find_inputs(inputs, out_dir, allow_3d=allow_3d)
    classes = list(preprocessing["classes"])
    formats = tuple(dict.fromkeys(output_formats))
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise ConfigError(f"output format {unknown or formats} unknown; choose from {list(OUTPUT_FORMATS)}")
    _check_outputs(cases, out_dir, classes, save_probabilities, formats, overwrite)
    for case in cases:
        meta = read_header(case.image)
        if meta.ndim == 3 and not allow_3d:
            raise DataError(case.image, f"is a 3D image {meta.spatial_shape}; a cine (x, y, z, t) is expected")

    model = model_from_checkpoint(payload)
    dev = resolve_device(device, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # a window bar on a terminal; redirected, the per-case line below is the progress (no '\r' floods)
    predictor = Predictor(model, preprocessing, config, device=dev, progress=is_terminal())
    transforms = inference_transforms(preprocessing)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for case in cases:
        start = time.perf_counter()
        files = _predict_one(case, predictor, transforms, out_dir, config.postprocess, save_probabilities, formats,
                             config.repair_min_drop if config.repair_frames else None,
                             config.min_enclosed if config.exclude_atrium else None)
        meta = read_header(case.image)
        logger.info(
            "%s: %s x %d frames, %.1f s on %s%s -> %s",
            case.case_id, "x".join(str(s) for s in meta.spatial_shape), meta.n_frames, time.perf_counter() - start,
            dev, " (TTA)" if config.tta else "", files[0],
        )
        written.extend(files)
    return written
