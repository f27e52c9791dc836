"""MONAI-style dictionary transforms for time-as-channel cine data that MONAI lacks.

Every tensor here is channel-first with **time as the channel**: image ``(T, X, Y, Z)`` float32,
label ``(T, X, Y, Z)`` integer with ``ignore_index`` on unlabelled frames, ``frame_mask`` ``(T,)`` bool.
A spatial transform applied to such a tensor uses one geometry for all frames.

- :class:`LoadCined`: case record -> MetaTensors with the affine and the raw time step (MONAI's
  ``NibabelReader`` overwrites ``pixdim[4]``), sparse labels expanded to ``(T, ...)`` plus ``frame_mask``.
- :class:`ForegroundUniond`: single-channel union of all frames' foreground, for crop-centre sampling
  (MONAI's ``map_binary_to_indices`` treats a multi-channel label as one-hot and drops channel 0, i.e.
  frame 0).
- :class:`RandTemporalWindowd`: a cyclic window of consecutive frames containing a labelled frame.
- :class:`RandForegroundPatchd`: foreground-oversampled patch with in-plane rotation and scaling done in
  one resampling of the patch grid (nnU-Net's approach), identical for all frames.
- :class:`MaskUnlabelledFramesd`: restore ``ignore_index`` on unlabelled frames after padding/resampling.
- :class:`RandCorruptFramesd`: spoil random frames of the image (signal dropout, noise burst, motion blur,
  ghosting, misaligned slices, a missing frame) while the labels stay, so a temporal model learns to take
  a spoilt frame's anatomy from its neighbours.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Affine, MapTransform, Randomizable, SpatialCrop, SpatialPad
from monai.transforms.utils import generate_pos_neg_label_crop_centers

from trunet.data.artefacts import CORRUPTIONS, corrupt_cine
from trunet.io import case_id_from_path, load_cine, load_label

__all__ = [
    "LoadCined",
    "ForegroundUniond",
    "RandTemporalWindowd",
    "RandForegroundPatchd",
    "MaskUnlabelledFramesd",
    "RandCorruptFramesd",
    "case_id_from_path",
]

logger = logging.getLogger(__name__)


def snap_affine(affine: np.ndarray) -> np.ndarray:
    """The ``(4, 4)`` affine snapped to the precision a scanner knows its geometry to, with exactly orthonormal
    axis directions: directions rounded to 1e-6, then made orthonormal (the nearest rotation, by SVD);
    spacing and origin rounded to float32 (NIfTI's precision). An axis-aligned affine with float32 values
    (any NIfTI without rotation) comes back unchanged.

    Why: one geometry is stored with different rounding by different formats (a NIfTI sform is float32; a
    DICOM affine is rebuilt from decimal strings), ~1e-7 apart, and MONAI's ``Spacing`` turns such
    differences into different grids: it anchors the output grid at the first voxel only when the corners
    line up to ``atol`` 1e-8, else centres it half a voxel away, and an extent of exactly ``n + 0.5`` voxels
    rounds either way (``compute_shape_offset``). Snapped, the same scan as DICOM and as NIfTI is resampled
    onto one grid. Written by hand because no library step does it.
    """
    a = np.asarray(affine, dtype=np.float64)
    zooms = np.linalg.norm(a[:3, :3], axis=0)
    axes = np.round(a[:3, :3] / zooms, 6)
    u, _, vt = np.linalg.svd(axes)
    out = np.eye(4)
    out[:3, :3] = (u @ vt) * zooms.astype(np.float32)
    out[:3, 3] = a[:3, 3].astype(np.float32)
    return out


class LoadCined(MapTransform):
    """Load a case record into MetaTensors.

    Input: a record ``{"image": path, "label": path | {frame: path} | None, "frames": [..] | None,
    "case_id": str, "ed": int | None, "es": int | None}`` (only ``image`` is required).

    Output adds/replaces:
        ``image``: float32 :class:`~monai.data.MetaTensor` ``(T, X, Y, Z)``, affine = the file's (RAS),
        ``meta["time_step"]`` in ms (or NaN), ``meta["filename_or_obj"]`` the path;
        ``label`` (only when the record has one): uint8 MetaTensor ``(T, X, Y, Z)``, ``ignore_index`` on
        unlabelled frames, same affine; ``frame_mask``: bool tensor ``(T,)`` (all False without label);
        ``case_id``: str; ``ed``/``es``: int (-1 when unknown). ``frames`` is dropped.

    Raises:
        DataError: see :func:`~trunet.io.load_cine` / :func:`~trunet.io.load_label`.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        frame_mask_key: str = "frame_mask",
        num_classes: Optional[int] = None,
        ignore_index: int = 255,
        allow_3d: bool = False,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key, self.frame_mask_key = image_key, label_key, frame_mask_key
        self.num_classes, self.ignore_index, self.allow_3d = num_classes, ignore_index, allow_3d

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = d[self.image_key]
        array, meta = load_cine(path, allow_3d=self.allow_3d)
        affine = torch.as_tensor(snap_affine(meta.affine), dtype=torch.float64)
        image_meta = {
            "filename_or_obj": str(path),
            "time_step": float("nan") if meta.time_step is None else float(meta.time_step),
            "original_affine": meta.affine.copy(),
            "spatial_shape": np.asarray(meta.spatial_shape),
            "space": "RAS",
        }
        d[self.image_key] = MetaTensor(torch.from_numpy(array), affine=affine, meta=image_meta)
        n_frames = array.shape[0]
        label_src = d.get(self.label_key)
        if label_src is not None:
            if isinstance(label_src, Mapping):
                label_src = {int(k): v for k, v in label_src.items()}
            labels, mask, _ = load_label(
                label_src, n_frames, d.get("frames"), like=meta, num_classes=self.num_classes,
                ignore_index=self.ignore_index,
            )
            label_meta = {
                "filename_or_obj": str(path if isinstance(label_src, Mapping) else label_src),
                "original_affine": meta.affine.copy(),
                "spatial_shape": np.asarray(meta.spatial_shape),
                "space": "RAS",
            }
            d[self.label_key] = MetaTensor(torch.from_numpy(labels), affine=affine.clone(), meta=label_meta)
            d[self.frame_mask_key] = torch.from_numpy(mask)
        else:
            d.pop(self.label_key, None)
            d[self.frame_mask_key] = torch.zeros(n_frames, dtype=torch.bool)
        d.pop("frames", None)
        d["case_id"] = str(d.get("case_id") or case_id_from_path(path))
        for key in ("ed", "es"):
            value = d.get(key)
            d[key] = -1 if value is None else int(value)
        return d


class ForegroundUniond(MapTransform):
    """Union of all frames' foreground as one channel: ``(T, X, Y, Z)`` label -> ``(1, X, Y, Z)`` uint8.

    Foreground is ``0 < label != ignore_index``. Crop-centre sampling must use this single-channel mask:
    MONAI's ``RandCropByPosNegLabeld`` / ``map_binary_to_indices`` read a multi-channel label as one-hot and
    drop channel 0, which here is frame 0.
    """

    def __init__(self, label_key: str = "label", output_key: str = "fg", ignore_index: int = 255) -> None:
        super().__init__([label_key])
        self.label_key, self.output_key, self.ignore_index = label_key, output_key, ignore_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        raw = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
        fg = ((raw > 0) & (raw != self.ignore_index)).any(dim=0, keepdim=True).to(torch.uint8)
        d[self.output_key] = fg
        return d


def _cyclic_window(frame_mask: np.ndarray, window: int, rng: np.random.RandomState) -> np.ndarray:
    n = len(frame_mask)
    labelled = np.flatnonzero(frame_mask)
    if len(labelled) == 0:
        start = rng.randint(n)
    else:
        anchor = int(labelled[rng.randint(len(labelled))])
        start = anchor - rng.randint(window)
    return (start + np.arange(window)) % n


class RandTemporalWindowd(Randomizable, MapTransform):
    """Pick ``window`` consecutive frames, cyclically (the heartbeat wraps), containing a labelled frame.

    The window is anchored on a labelled frame drawn uniformly, at a uniform offset inside the window. A
    cine shorter than ``window`` repeats frames cyclically. Applies to ``keys`` (time-first tensors,
    ``(T, ...)`` -> ``(window, ...)``) and to ``frame_mask_key`` (``(T,)`` -> ``(window,)``).
    """

    def __init__(self, keys: KeysCollection, window: int, frame_mask_key: str = "frame_mask",
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.frame_mask_key = int(window), frame_mask_key
        self.indices: Optional[np.ndarray] = None

    def randomize(self, data: Any = None) -> None:
        self.indices = _cyclic_window(np.asarray(data, dtype=bool), self.window, self.R)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = torch.as_tensor(d[self.frame_mask_key])
        self.randomize(mask.cpu().numpy())
        idx = torch.as_tensor(self.indices, dtype=torch.long)
        for key in self.key_iterator(d):
            d[key] = d[key][idx]
        d[self.frame_mask_key] = mask[idx]
        return d


class RandForegroundPatchd(Randomizable, MapTransform):
    """Foreground-oversampled spatial patch with in-plane rotation and scaling, identical for all frames.

    A patch centre is drawn with MONAI's ``generate_pos_neg_label_crop_centers`` from precomputed indices
    of the single-channel union foreground (``fg_indices_key``/``bg_indices_key``, from
    ``FgBgToIndicesd`` on :class:`ForegroundUniond`'s output): foreground with probability
    ``pos_ratio``. Then, as nnU-Net does, rotation about the slice (z) axis (prob ``rotate_prob``, angle
    uniform in ±``rotate_deg``) and in-plane scaling (prob ``scale_prob``, factor uniform in
    ``scale_range``; > 1 zooms out) are drawn independently; when either fires, the patch grid is
    resampled once from the whole volume around the centre (MONAI ``Affine`` with a translation), else
    the patch is a plain crop. Outside the volume: zeros (the label's unlabelled frames are restored by
    :class:`MaskUnlabelledFramesd`).

    ``keys`` are time-first ``(T, X, Y, Z)``; ``modes`` per key (``bilinear`` for images, ``nearest`` for
    labels); integer tensors keep their dtype. Output ``(T, *patch_size)``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: Sequence[int],
        pos_ratio: float,
        fg_indices_key: str = "fg_fg_indices",
        bg_indices_key: str = "fg_bg_indices",
        modes: Sequence[str] | str = "bilinear",
        rotate_deg: float = 0.0,
        rotate_prob: float = 0.0,
        scale_range: Sequence[float] = (1.0, 1.0),
        scale_prob: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pos_ratio = float(pos_ratio)
        self.fg_indices_key, self.bg_indices_key = fg_indices_key, bg_indices_key
        self.modes = (modes,) * len(self.keys) if isinstance(modes, str) else tuple(modes)
        self.rotate_rad, self.rotate_prob = math.radians(rotate_deg), float(rotate_prob)
        self.scale_range, self.scale_prob = tuple(float(s) for s in scale_range), float(scale_prob)
        self.center: tuple[int, ...] = ()
        self.angle, self.scale = 0.0, 1.0

    def randomize(self, data: Any = None) -> None:
        spatial_shape, fg, bg = data
        self.center = tuple(int(c) for c in generate_pos_neg_label_crop_centers(
            self.patch_size, 1, self.pos_ratio, spatial_shape, fg, bg, self.R
        )[0])
        do_rot = self.R.rand() < self.rotate_prob
        do_scale = self.R.rand() < self.scale_prob
        self.angle = float(self.R.uniform(-self.rotate_rad, self.rotate_rad)) if do_rot else 0.0
        self.scale = float(self.R.uniform(*self.scale_range)) if do_scale else 1.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d[self.first_key(d)]
        spatial_shape = tuple(first.shape[1:])
        self.randomize((spatial_shape, d[self.fg_indices_key], d[self.bg_indices_key]))
        resample = self.angle != 0.0 or self.scale != 1.0
        for key, mode in zip(self.key_iterator(d), self.modes):
            img = d[key]
            if not resample:
                out = SpatialCrop(roi_center=self.center, roi_size=self.patch_size)(img)
                out = SpatialPad(self.patch_size)(out)  # only when the volume is smaller than the patch
            else:
                # MONAI grids are centred: offset of the patch centre from the volume centre, in voxels, with
                # the patch starting at centre - size // 2 exactly as SpatialCrop places it
                shift = [c - p // 2 + (p - 1) / 2.0 - (s - 1) / 2.0
                         for c, p, s in zip(self.center, self.patch_size, spatial_shape)]
                affine = Affine(
                    rotate_params=(0.0, 0.0, self.angle), scale_params=(self.scale, self.scale, 1.0),
                    translate_params=shift, spatial_size=self.patch_size, mode=mode, padding_mode="zeros",
                    image_only=True,
                )
                dtype = img.dtype
                out = affine(img.float() if not torch.is_floating_point(img) else img)
                if not torch.is_floating_point(torch.empty(0, dtype=dtype)):
                    out = out.round().to(dtype)
            d[key] = out
        return d


class MaskUnlabelledFramesd(MapTransform):
    """Set every voxel of unlabelled frames (``frame_mask`` False) to ``ignore_index``.

    After padding or resampling with zeros, unlabelled frames would otherwise gain background voxels.
    """

    def __init__(self, label_key: str = "label", frame_mask_key: str = "frame_mask", ignore_index: int = 255,
                 allow_missing_keys: bool = True) -> None:
        super().__init__([label_key], allow_missing_keys)
        self.label_key, self.frame_mask_key, self.ignore_index = label_key, frame_mask_key, ignore_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_key not in d:
            return d
        mask = torch.as_tensor(d[self.frame_mask_key], dtype=torch.bool)
        label = d[self.label_key]
        if (~mask).any():
            label = label.clone()
            label[~mask.to(label.device)] = self.ignore_index
        d[self.label_key] = label
        return d


class RandCorruptFramesd(Randomizable, MapTransform):
    """Corrupt random frames of a time-first image; labels and ``frame_mask`` are left as they are.

    Each frame is corrupted with probability ``prob`` (at most ``T - 1`` frames of a sample, so one clean
    frame always remains to borrow from), by a kind drawn uniformly from ``kinds`` at a strength drawn
    uniformly from ``strength_range`` (see :mod:`trunet.data.artefacts`). Trained this way, a model whose
    frames see each other (ConvLSTMs) learns to use its neighbours exactly when a frame cannot be read on
    its own; a frame-by-frame model can only learn to guess.

    Args:
        keys: the image key(s), ``(T, X, Y, Z)`` float tensors (the label must *not* be listed).
        prob: per-frame probability.
        kinds: subset of :data:`trunet.data.artefacts.CORRUPTIONS`.
        strength_range: ``(lo, hi)`` within ``[0, 1]``.
        spacing: voxel size in mm of the tensors (the training target spacing).
        clean_key: also store the image as it was before corruption under this key (one key only): the
            target of the corruption-consistency loss (``train.consistency_weight``).

    After a call, :attr:`frames` holds the corrupted frame indices (for tests and logging).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float,
        kinds: Sequence[str] = CORRUPTIONS,
        strength_range: Sequence[float] = (0.3, 1.0),
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        clean_key: Optional[str] = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if clean_key is not None and len(self.keys) != 1:
            raise ValueError(f"clean_key needs exactly one image key, got {list(self.keys)}")
        self.clean_key = clean_key
        unknown = [k for k in kinds if k not in CORRUPTIONS]
        if unknown or not kinds:
            raise ValueError(f"corruption kinds must be a non-empty subset of {list(CORRUPTIONS)}, got {list(kinds)}")
        lo, hi = (float(v) for v in strength_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"strength_range must satisfy 0 <= lo <= hi <= 1, got {tuple(strength_range)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob, self.kinds, self.strength_range = float(prob), tuple(kinds), (lo, hi)
        self.spacing = tuple(float(s) for s in spacing)
        self.frames: list[int] = []
        self._rng: np.random.Generator = np.random.default_rng(0)

    def randomize(self, data: Any = None) -> None:
        frames = int(data)
        chosen = np.flatnonzero(self.R.rand(frames) < self.prob)
        if frames > 1 and len(chosen) >= frames:
            chosen = np.delete(chosen, self.R.randint(len(chosen)))
        self.frames = [int(t) for t in chosen]
        self._rng = np.random.default_rng(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d[self.first_key(d)]
        self.randomize(first.shape[0])
        if self.clean_key is not None:
            # a copy, not the same object: a later transform acting in place on one key must not reach the other
            d[self.clean_key] = first.clone() if isinstance(first, torch.Tensor) else np.array(first, copy=True)
        if not self.frames:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            values = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            # a window holds only a few frames: a misaligned slice comes from the next or second-next one
            out, _ = corrupt_cine(values, self.frames, self.kinds, self.strength_range, self.spacing, self._rng,
                                  neighbour_phases=(1, 2))
            if isinstance(img, torch.Tensor):
                new = img.clone()
                new.copy_(torch.from_numpy(out).to(img.dtype))
                d[key] = new
            else:
                d[key] = out.astype(values.dtype, copy=False)
        return d
