"""Training and inference transform chains (MONAI ``Compose``), time as the channel axis.

Deterministic part (shared, cached by the datasets, invertible for inference):
    load (:class:`~trunet.transforms.cardiac.LoadCined`) -> optional orientation (``Orientationd``; off by
    default, see below) -> resampling to the target spacing (``Spacingd``: image bilinear, label nearest; one
    geometry for all frames since T is the channel) -> per-case z-score over all frames
    (``NormalizeIntensityd``, nnU-Net's MRI scheme).

Training adds: padding to the patch size -> union foreground mask and its indices (cached) -> cyclic
temporal window -> foreground-oversampled patch with in-plane rotation/scaling -> mirroring -> optional
elastic deformation -> unlabelled frames reset to ``ignore_index`` -> optional frame corruption (random
frames spoilt, labels kept) -> intensity augmentation (noise, blur, contrast, simulated low resolution,
gamma) -> plain tensors.

Orientation: canonicalising an oblique short-axis stack to RAS can permute the voxel axes, so the coarse
slice axis would no longer be Z (the model pools Z late). trunet therefore keeps the NIfTI voxel order by
default (``preprocessing["orientation"] = None``); a string such as ``"RAS"`` enables ``Orientationd``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    Invertd,
    NormalizeIntensityd,
    Orientationd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)

from trunet.config import Config
from trunet.transforms.cardiac import (
    ForegroundUniond,
    LoadCined,
    MaskUnlabelledFramesd,
    RandCorruptFramesd,
    RandForegroundPatchd,
    RandTemporalWindowd,
)

__all__ = [
    "IMAGE",
    "LABEL",
    "FRAME_MASK",
    "preprocessing_from_config",
    "deterministic_transforms",
    "train_transforms",
    "inference_transforms",
    "invert_prediction",
]

IMAGE, LABEL, FRAME_MASK = "image", "label", "frame_mask"
CLEAN_IMAGE = "image_clean"
"""The training image before frame corruption (only with ``train.consistency_weight > 0``)."""
_FG = "fg"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # affines are RAS (nibabel's convention)
_FG_IDX, _BG_IDX = "fg_fg_indices", "fg_bg_indices"  # FgBgToIndicesd's default key names for "fg"


def preprocessing_from_config(config: Config, target_spacing: Sequence[float]) -> dict[str, Any]:
    """The preprocessing a checkpoint must carry so ``predict`` repeats it exactly (JSON-able).

    Returns:
        ``{"target_spacing": [x, y, z] mm, "normalisation": "zscore", "orientation": None,
        "classes": [names], "ignore_index": int, "patch_size": [x, y, z], "time_window": int,
        "allow_3d": bool}``.
    """
    if len(target_spacing) != 3 or any(float(s) <= 0 for s in target_spacing):
        raise ValueError(f"target_spacing must be 3 positive values, got {target_spacing}")
    return {
        "target_spacing": [float(s) for s in target_spacing],
        "normalisation": "zscore",
        "orientation": None,
        "classes": list(config.data.classes),
        "ignore_index": int(config.data.ignore_index),
        "patch_size": [int(p) for p in config.train.patch_size],
        "time_window": int(config.train.time_window),
        "allow_3d": bool(config.data.allow_3d),
    }


def deterministic_transforms(preprocessing: dict[str, Any]) -> list:
    """Load -> [orientation] -> spacing -> z-score, as a list (keys ``image`` and optional ``label``)."""
    keys = [IMAGE, LABEL]
    chain: list = [
        LoadCined(
            num_classes=len(preprocessing["classes"]),
            ignore_index=int(preprocessing["ignore_index"]),
            allow_3d=bool(preprocessing.get("allow_3d", False)),
        )
    ]
    if preprocessing.get("orientation"):
        chain.append(Orientationd(keys, axcodes=preprocessing["orientation"], labels=_RAS_LABELS,
                                  allow_missing_keys=True))
    chain += [
        Spacingd(keys, pixdim=tuple(preprocessing["target_spacing"]), mode=("bilinear", "nearest"),
                 allow_missing_keys=True),
        CastToTyped(LABEL, dtype=torch.uint8, allow_missing_keys=True),
    ]
    if preprocessing.get("normalisation", "zscore") != "zscore":
        raise ValueError(f"unknown normalisation {preprocessing['normalisation']!r}")
    chain.append(NormalizeIntensityd(IMAGE, nonzero=False, channel_wise=False))
    return chain


def inference_transforms(preprocessing: dict[str, Any]) -> Compose:
    """Deterministic, invertible chain for validation and prediction.

    Input: a case record (``image`` path required; ``label`` optional). Output dict:
        ``image``: float32 MetaTensor ``(T, X', Y', Z')`` at the target spacing, z-scored, carrying the
        applied operations that :func:`invert_prediction` / MONAI ``Invertd`` undo;
        ``label`` (when given): uint8 MetaTensor ``(T, X', Y', Z')``, ``ignore_index`` on unlabelled frames;
        ``frame_mask``: bool ``(T,)``; ``case_id``: str; ``ed``/``es``: int (-1 unknown).
    """
    return Compose(deterministic_transforms(preprocessing) + [EnsureTyped(IMAGE, dtype=torch.float32)])


def _crop_prob(prob: float) -> float:
    return max(0.0, min(1.0, float(prob)))


def train_transforms(config: Config, target_spacing: Sequence[float]) -> Compose:
    """The training chain: deterministic part (cacheable, up to the first random transform) + sampling and
    augmentation.

    Output dict per sample (``RandForegroundPatchd`` yields one patch):
        ``image``: float32 tensor ``(T_train, *patch_size)``; ``label``: int64 tensor
        ``(T_train, *patch_size)`` (0..K-1 on labelled frames, ``ignore_index`` on all voxels of unlabelled
        frames); ``frame_mask``: bool ``(T_train,)``; ``case_id``: str. Plain tensors (no meta).
    """
    pre = preprocessing_from_config(config, target_spacing)
    t, aug = config.train, config.train.augment
    ignore = int(config.data.ignore_index)
    patch = tuple(int(p) for p in t.patch_size)
    keys = [IMAGE, LABEL]
    chain = deterministic_transforms(pre) + [
        SpatialPadd(keys, spatial_size=patch, mode="constant"),
        ForegroundUniond(LABEL, _FG, ignore_index=ignore),
        FgBgToIndicesd(_FG),
        DeleteItemsd(_FG),
        # ---- random from here (CacheDataset caches everything above) ----
        RandTemporalWindowd(keys, window=t.time_window, frame_mask_key=FRAME_MASK),
        RandForegroundPatchd(
            keys, patch, pos_ratio=t.foreground_oversample, fg_indices_key=_FG_IDX, bg_indices_key=_BG_IDX,
            modes=("bilinear", "nearest"), rotate_deg=aug.rotate_deg, rotate_prob=_crop_prob(aug.rotate_prob),
            scale_range=aug.scale_range, scale_prob=_crop_prob(aug.scale_prob),
        ),
        DeleteItemsd([_FG_IDX, _BG_IDX]),
    ]
    if aug.flip_prob > 0:
        chain += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in (0, 1)]
    if aug.elastic_prob > 0:
        # deformation in voxels of the patch; the field is smooth in-plane and along z alike
        chain.append(Rand3DElasticd(
            keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=aug.elastic_prob,
            mode=("bilinear", "nearest"), padding_mode="zeros",
        ))
    chain.append(MaskUnlabelledFramesd(LABEL, FRAME_MASK, ignore_index=ignore))
    images = [IMAGE]
    if aug.corrupt_prob > 0:
        # before the intensity augmentation: a spoilt frame is then jittered like any other
        consistency = t.consistency_weight > 0
        chain.append(RandCorruptFramesd(IMAGE, prob=aug.corrupt_prob, kinds=aug.corrupt_kinds,
                                        strength_range=aug.corrupt_strength, spacing=pre["target_spacing"],
                                        clean_key=CLEAN_IMAGE if consistency else None))
        if consistency:
            images.append(CLEAN_IMAGE)  # same draws as the image: the two differ in the spoilt frames only
    if aug.noise_prob > 0 and aug.noise_std > 0:
        chain.append(RandGaussianNoised(images, prob=aug.noise_prob, mean=0.0, std=aug.noise_std))
    if aug.blur_prob > 0:
        # in-plane blur only: the slice axis is already coarse
        chain.append(RandGaussianSmoothd(images, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.0, 0.0),
                                         prob=aug.blur_prob))
    if aug.contrast_prob > 0:
        chain.append(RandScaleIntensityFixedMeand(images, factors=(-0.25, 0.25), preserve_range=True,
                                                  prob=aug.contrast_prob))
    if aug.low_res_prob > 0:
        chain.append(RandSimulateLowResolutiond(images, prob=aug.low_res_prob, zoom_range=(0.5, 1.0)))
    if aug.gamma_prob > 0:
        chain.append(RandAdjustContrastd(images, gamma=tuple(aug.gamma_range), prob=aug.gamma_prob,
                                         retain_stats=True))
    chain += [
        EnsureTyped(images, dtype=torch.float32, track_meta=False),
        EnsureTyped(LABEL, dtype=torch.int64, track_meta=False),
        EnsureTyped(FRAME_MASK, dtype=torch.bool, track_meta=False),
        SelectItemsd([*images, LABEL, FRAME_MASK, "case_id"]),
    ]
    return Compose(chain)


def invert_prediction(
    transform: Compose, image: Any, pred: torch.Tensor, nearest: bool = True
) -> torch.Tensor:
    """Map a prediction on the preprocessed grid back to the original image grid.

    Args:
        transform: the :func:`inference_transforms` chain that produced ``image``.
        image: the preprocessed ``image`` MetaTensor ``(T, X', Y', Z')`` of the case (its applied
            operations drive the inversion).
        pred: tensor or MetaTensor ``(C, X', Y', Z')`` on the preprocessed grid (CPU or GPU), e.g. a
            label map ``(T, ...)`` (use ``nearest=True``) or per-frame probabilities of one class; fold
            ``(T, K)`` into ``C`` first.
        nearest: nearest-neighbour interpolation (labels) instead of the transforms' own modes.

    Returns:
        MetaTensor ``(C, X, Y, Z)`` on the original grid (the file's shape and affine); label maps keep
        their dtype.
    """
    dtype = pred.dtype
    if not isinstance(pred, MetaTensor):
        # Invertd takes the operations from ``image``, but skips a plain tensor
        pred = MetaTensor(pred)
    inverter = Invertd(keys="pred", transform=transform, orig_keys=IMAGE, nearest_interp=nearest)
    out = inverter({"pred": pred, IMAGE: image})["pred"]
    if not torch.is_floating_point(torch.empty(0, dtype=dtype)):
        out = out.round().to(dtype)
    return out
