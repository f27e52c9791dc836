"""Cines and labels as trunet holds them: ``(T, X, Y, Z)`` arrays, time first, with their geometry.

A cine on disk is ``(x, y, z, t)`` (4D NIfTI as ACDC stores it, a 4D ``.mha``/``.nrrd``, a DICOM cine, or
a folder of one 3D file per frame). In memory it is ``(T, X, Y, Z)``: time first, so MONAI treats it as the channel
axis and applies one geometry to all frames. The file formats are the :class:`~trunet.io.base.ImageIO`
classes of the registry (:func:`~trunet.io.base.format_for`); this module adds what a cine needs on top:
the time axis moved first, NaN checks, label value checks, sparse per-frame labels, and writing a
prediction on the grid of its input.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from trunet.errors import DataError
from trunet.io.base import Reader, folder_format
from trunet.io.frames import FrameFolder, frame_files, read_file, read_file_header
from trunet.io.meta import NIFTI_SUFFIXES, CineMeta, check_readable, same_affine
from trunet.io.nifti import NiftiIO

__all__ = ["read_header", "load_cine", "load_label", "save_cine_like"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
LabelSource = Union[PathLike, Mapping[int, PathLike]]


def read_header(path: PathLike, reader: Reader = "auto") -> CineMeta:
    """Geometry of an image file or per-frame folder from its header(s) only (no voxel data read).

    Returns:
        :class:`CineMeta` with ``shape`` ``(X, Y, Z, T)`` (``T = 1`` and ``ndim = 3`` for a 3D file).
    Raises:
        DataError: missing, unreadable, not an image, or fewer than 3 / more than 4 dimensions.
    """
    p = Path(path)
    check_readable(p)
    if p.is_dir():
        fmt = folder_format(p)
        return fmt.read_header(p) if fmt is not None else FrameFolder.read_header(p, reader)
    return read_file_header(p, reader)


def _check_finite(path: str, data: np.ndarray) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(path, f"contains {int(bad.sum())} NaN or infinite intensities")


def load_cine(
    path: PathLike, *, allow_3d: bool = False, reader: Reader = "auto"
) -> tuple[np.ndarray, CineMeta]:
    """Read a cine.

    Args:
        path: a 4D NIfTI (nibabel), a 4D ``.mha``/``.mhd``/``.nrrd``/NIfTI (SimpleITK), a DICOM cine (a
            series or study folder, or an enhanced multi-frame file; :mod:`trunet.io.dicom`), or a folder
            of per-frame 3D files (frames in natural name order).
        allow_3d: accept a 3D image as a cine of one frame (with a warning) instead of raising.
        reader: ``auto`` picks nibabel for NIfTI and SimpleITK otherwise; ``nibabel``/``sitk`` force one.

    Returns:
        ``(array, meta)``: ``array`` float32 ``(T, X, Y, Z)``; ``meta`` a :class:`CineMeta` whose ``shape`` is
        ``(X, Y, Z, T)`` and whose ``time_step`` is the raw header's frame interval in ms (or ``None``).

    Raises:
        DataError: missing/unreadable/truncated file, not an image, 3D where a cine is expected, NaN or
            infinite intensities, frames of a folder with different geometry.
    """
    p = Path(path)
    check_readable(p)
    fmt = folder_format(p) if p.is_dir() else None
    if fmt is not None:
        data, meta = fmt.read(p, integer=False)  # a DICOM series folder
    elif p.is_dir():
        data, meta = FrameFolder.read(p, reader, integer=False)
    else:
        data, meta = read_file(p, reader, integer=False)
        if meta.ndim == 3:
            if not allow_3d:
                raise DataError(
                    p, f"is a 3D image {meta.spatial_shape}; a cine (x, y, z, t) is expected "
                    "(set data.allow_3d: true to use a 3D image as a cine of one frame)"
                )
            warnings.warn(f"{p}: 3D image used as a cine of one frame (data.allow_3d)", stacklevel=2)
            logger.warning("%s: 3D image used as a cine of one frame", p)
    _check_finite(meta.path, data)
    return np.ascontiguousarray(np.moveaxis(data, -1, 0), dtype=np.float32), meta


def _as_labels(path: str, data: np.ndarray, num_classes: Optional[int]) -> np.ndarray:
    """Integer check and value range check; returns uint8."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise DataError(path, "label contains NaN or infinite values")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise DataError(path, "label has non-integer values; labels must be class indices")
        data = rounded
    elif data.dtype.kind not in "iub":
        raise DataError(path, f"label has data type {data.dtype}; integer class indices are expected")
    lo, hi = int(data.min()), int(data.max())
    limit = 256 if num_classes is None else num_classes
    if lo < 0 or hi >= limit:
        values = np.unique(data)
        bad = values[(values < 0) | (values >= limit)]
        raise DataError(
            path, f"label values {bad[:8].tolist()} are outside the configured classes 0..{limit - 1}"
        )
    return data.astype(np.uint8, copy=False)


def _check_geometry(label_meta: CineMeta, like: CineMeta, what: str = "label") -> None:
    if label_meta.spatial_shape != like.spatial_shape:
        raise DataError(
            label_meta.path,
            f"{what} shape {label_meta.spatial_shape} differs from the image's {like.spatial_shape} "
            f"({like.path})",
        )
    if not same_affine(label_meta.affine, like.affine):
        raise DataError(label_meta.path, f"{what} affine differs from the image's ({like.path})")


def load_label(
    label: LabelSource,
    n_frames: Optional[int] = None,
    frames: Optional[list[int]] = None,
    *,
    like: Optional[CineMeta] = None,
    num_classes: Optional[int] = None,
    ignore_index: int = 255,
    reader: Reader = "auto",
) -> tuple[np.ndarray, np.ndarray, CineMeta]:
    """Read a dense or sparse label.

    Args:
        label: a 4D label file ``(x, y, z, t)`` (or a 3D file for a cine of one frame), a folder of
            per-frame 3D labels, or a mapping ``{frame index (0-based): 3D label file}``.
        n_frames: frames of the image; required for a mapping, checked against a 4D label.
        frames: for a dense label, the frames that are really labelled (the others become
            ``ignore_index``); ``None`` = every frame.
        like: the image's :class:`CineMeta`; shape and affine must match it.
        num_classes: label values must lie in ``0..num_classes-1``.
        ignore_index: value of unlabelled frames.

    Returns:
        ``(labels, frame_mask, meta)``: ``labels`` uint8 ``(T, X, Y, Z)`` with ``ignore_index`` on
        unlabelled frames; ``frame_mask`` bool ``(T,)``; ``meta`` the geometry (``shape`` ``(X, Y, Z, T)``).

    Raises:
        DataError: unreadable file, non-integer values, values outside the classes, shape/affine differing
            from ``like``, frame indices out of range.
    """
    if n_frames is None and like is not None:
        n_frames = like.n_frames
    if isinstance(label, Mapping):
        if not label:
            raise DataError(None, "empty frame -> label mapping")
        if n_frames is None:
            raise ValueError("load_label needs n_frames (or like) for a frame -> file mapping")
        out: Optional[np.ndarray] = None
        mask = np.zeros(n_frames, dtype=bool)
        meta0: Optional[CineMeta] = None
        for frame, file in sorted(label.items(), key=lambda kv: int(kv[0])):
            f = int(frame)
            if not 0 <= f < n_frames:
                raise DataError(file, f"label frame index {f} is out of range for a cine of {n_frames} "
                                      "frames (0-based)")
            data, meta = read_file(Path(file), reader, integer=True)
            if meta.n_frames != 1:
                raise DataError(file, f"a per-frame label must be 3D, got shape {meta.shape}")
            ref = like or meta0
            if ref is not None:
                _check_geometry(meta, ref)
            meta0 = meta0 or meta
            if out is None:
                out = np.full((n_frames,) + meta.spatial_shape, ignore_index, dtype=np.uint8)
            out[f] = _as_labels(meta.path, data[..., 0], num_classes)
            mask[f] = True
        assert out is not None and meta0 is not None
        full = CineMeta(meta0.affine, meta0.spacing, None, meta0.spatial_shape + (n_frames,), meta0.path, 4)
        return out, mask, full

    p = Path(label)
    check_readable(p)
    if p.is_dir():
        return load_label(
            dict(enumerate(frame_files(p))), n_frames, frames, like=like, num_classes=num_classes,
            ignore_index=ignore_index, reader=reader,
        )
    data, meta = read_file(p, reader, integer=True)
    if like is not None:
        _check_geometry(meta, like)
    t = meta.n_frames
    if n_frames is not None and t != n_frames:
        raise DataError(p, f"label has {t} frames, the image has {n_frames}")
    labels = np.ascontiguousarray(np.moveaxis(_as_labels(meta.path, data, num_classes), -1, 0))
    mask = np.ones(t, dtype=bool)
    if frames is not None:
        bad = [f for f in frames if not 0 <= int(f) < t]
        if bad:
            raise DataError(p, f"labelled frame indices {bad} are out of range for {t} frames (0-based)")
        mask[:] = False
        mask[[int(f) for f in frames]] = True
        labels[~mask] = ignore_index
    return labels, mask, meta


def save_cine_like(
    array: np.ndarray,
    like: PathLike,
    out_path: PathLike,
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """Write ``array`` ``(T, X, Y, Z)`` as a NIfTI ``(x, y, z, t)`` on the grid of the reference ``like``.

    The affine (sform and qform), header fields and time step (``pixdim[4]``) come from ``like``; a 3D
    reference with ``T = 1`` gives a 3D file. A non-NIfTI reference (``.mha``, frame folder) lends its
    geometry and time step. The file is written atomically and never over ``like``.

    Returns:
        the written path.
    Raises:
        DataError: ``out_path`` is the reference file itself, or the reference is unreadable.
        ValueError: ``array``'s shape is not the reference's ``(T, X, Y, Z)``.
    """
    like_p, out_p = Path(like), Path(out_path)
    if out_p.exists() and like_p.exists() and out_p.resolve() == like_p.resolve():
        raise DataError(out_p, "refusing to write a prediction over its input image")
    if not out_p.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataError(out_p, "output must be a NIfTI file (.nii.gz or .nii)")
    meta = read_header(like_p)
    arr = np.asarray(array)
    expected = (meta.n_frames,) + meta.spatial_shape
    if arr.shape != expected:
        raise ValueError(f"save_cine_like: array shape {arr.shape} differs from the reference's (T, X, Y, Z) "
                         f"{expected}")
    data = np.moveaxis(arr, 0, -1).astype(dtype, copy=False)  # (x, y, z, t)
    if meta.ndim == 3:
        data = data[..., 0]
    template = like_p if like_p.is_file() and like_p.name.lower().endswith(NIFTI_SUFFIXES) else None
    NiftiIO().write(out_p, data, meta, template=template, dtype=np.dtype(dtype))
    return out_p
