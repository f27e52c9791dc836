"""4D cine readers and the prediction writer.

A cine on disk is ``(x, y, z, t)`` (4D NIfTI as ACDC stores it, a 4D ``.mha``/``.nrrd``, or a folder of
one 3D file per frame). In memory it is ``(T, X, Y, Z)``: time first, so MONAI treats it as the channel
axis and applies one geometry to all frames.

Why not MONAI's ``LoadImage`` alone: its ``NibabelReader`` overwrites ``pixdim[4]`` (the time step) of a
4D file with 1 (MONAI 1.6), and its ``ITKReader`` needs the ``itk`` package, which trunet does not depend
on. The readers here keep the time step from the raw header and raise :class:`~trunet.errors.DataError`
naming the file for every bad input; :class:`trunet.transforms.cardiac.LoadCined` wraps them as a MONAI
transform that produces ``MetaTensor`` objects with the affine.

Affines are RAS (nibabel's convention); SimpleITK's LPS geometry is converted.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

import nibabel as nib
import numpy as np

from trunet.atomic import atomic_path
from trunet.errors import DataError

__all__ = [
    "CineMeta",
    "IMAGE_SUFFIXES",
    "read_header",
    "load_cine",
    "load_label",
    "save_cine_like",
    "is_image_path",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

PathLike = Union[str, os.PathLike]
LabelSource = Union[PathLike, Mapping[int, PathLike]]
Reader = Literal["auto", "nibabel", "sitk"]


@dataclass
class CineMeta:
    """Geometry of a cine (or of a 3D frame) as found on disk.

    Attributes:
        affine: 4x4 voxel -> world (RAS, mm) matrix of the spatial axes (x, y, z).
        spacing: voxel size (x, y, z) in mm, from the affine's column norms.
        time_step: frame interval in ms (``pixdim[4]`` of a NIfTI), ``None`` when unknown.
        shape: ``(X, Y, Z, T)`` as on disk (``T = 1`` for a 3D file).
        path: the file or folder it came from.
        ndim: dimensionality on disk (3 or 4; a folder of frames counts as 4).
    """

    affine: np.ndarray
    spacing: tuple[float, float, float]
    time_step: Optional[float]
    shape: tuple[int, int, int, int]
    path: str
    ndim: int = 4
    frame_files: list[str] = field(default_factory=list)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[:3])  # type: ignore[return-value]

    @property
    def n_frames(self) -> int:
        return int(self.shape[3])


def is_image_path(path: PathLike) -> bool:
    """True when the name ends in a suffix trunet reads (``.nii.gz``, ``.nii``, ``.mha``, ...)."""
    name = os.fspath(path).lower()
    return name.endswith(IMAGE_SUFFIXES)


def strip_image_suffix(name: str) -> str:
    """``patient001_4d.nii.gz`` -> ``patient001_4d``: the name without a suffix trunet reads (any case)."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and is_image_path(p)]
    files.sort(key=lambda p: _natural_key(p.name))
    if not files:
        raise DataError(folder, "folder holds no image files (.nii.gz, .nii, .mha, .mhd, .nrrd) to use as "
                                "frames")
    return files


def _pick_reader(path: Path, reader: Reader) -> str:
    if reader != "auto":
        return reader
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nibabel"
    if name.endswith(SITK_SUFFIXES):
        return "sitk"
    raise DataError(
        path,
        "not an image: unsupported file type (expected .nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr or a folder "
        "of per-frame 3D files)",
    )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if not os.access(path, os.R_OK):
        raise DataError(path, "file is not readable (permission denied)")


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


# --- nibabel --------------------------------------------------------------------------------


def _nib_open(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(os.fspath(path))
    except nib.filebasedimages.ImageFileError as exc:
        raise DataError(path, f"not an image nibabel can read ({exc})".replace("\n", " ")) from None
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise DataError(path, f"truncated or corrupt file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"expected a NIfTI image, got {type(img).__name__}")
    return img


def _nib_time_step(img: nib.Nifti1Image) -> Optional[float]:
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not np.isfinite(zooms[3]) or zooms[3] <= 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    factor = {"sec": 1000.0, "msec": 1.0, "usec": 0.001}.get(unit, 1.0)  # unknown: ACDC stores ms
    return float(zooms[3]) * factor


def _nib_meta(path: Path, img: nib.Nifti1Image) -> CineMeta:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise DataError(path, f"has {len(shape)} dimensions {shape}; a cine is (x, y, z, t)")
    ndim = len(shape)
    if ndim < 3:
        raise DataError(path, f"is a {ndim}D image {shape}; a cine (x, y, z, t) is expected")
    affine = np.asarray(img.affine, dtype=np.float64)
    t = shape[3] if ndim == 4 else 1
    time_step = _nib_time_step(img) if ndim == 4 else None
    return CineMeta(affine, _spacing(affine), time_step, shape[:3] + (t,), str(path), ndim)


def _nib_data(path: Path, img: nib.Nifti1Image, meta: CineMeta, integer: bool) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj) if integer else img.get_fdata(dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise DataError(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from None
    return data.reshape(meta.shape)  # drops trailing singleton dims, adds T=1 to a 3D image


# --- SimpleITK ------------------------------------------------------------------------------


def _sitk_geometry(path: Path, size, spacing, origin, direction, dim: int, is_nifti: bool) -> CineMeta:
    if dim not in (3, 4):
        raise DataError(path, f"is a {dim}D image; a cine (x, y, z, t) is expected")
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = d @ np.diag(spacing[:3])
    lps[:3, 3] = origin[:3]
    affine = _LPS_TO_RAS @ lps
    time_step = None
    if dim == 4 and spacing[3] > 0:
        # ITK converts a NIfTI's time unit to seconds; MetaImage/NRRD store what was written (trunet: ms)
        time_step = float(spacing[3]) * (1000.0 if is_nifti else 1.0)
    t = int(size[3]) if dim == 4 else 1
    shape = tuple(int(s) for s in size[:3]) + (t,)
    return CineMeta(affine, _spacing(affine), time_step, shape, str(path), dim)  # type: ignore[arg-type]


def _sitk_header(path: Path) -> CineMeta:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(path, f"not an image SimpleITK can read ({_first_line(exc)})") from None
    return _sitk_geometry(
        path, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
        reader.GetDimension(), path.name.lower().endswith(NIFTI_SUFFIXES),
    )


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "description:" in ln.lower()] or lines
    return useful[-1] if useful else type(exc).__name__


def _sitk_read(path: Path, integer: bool) -> tuple[np.ndarray, CineMeta]:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(os.fspath(path))
    except RuntimeError as exc:
        raise DataError(path, f"not an image SimpleITK can read, or truncated ({_first_line(exc)})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, "has vector pixels; a cine has one intensity per voxel")
    meta = _sitk_geometry(
        path, img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetDimension(),
        path.name.lower().endswith(NIFTI_SUFFIXES),
    )
    arr = sitk.GetArrayFromImage(img)  # (t, z, y, x) or (z, y, x)
    arr = arr.transpose(tuple(range(arr.ndim))[::-1])  # (x, y, z[, t])
    if not integer:
        arr = arr.astype(np.float32, copy=False)
    return arr.reshape(meta.shape), meta


# --- public ---------------------------------------------------------------------------------


def _read_one(path: Path, reader: Reader, integer: bool) -> tuple[np.ndarray, CineMeta]:
    """Array ``(x, y, z, t)`` (``t = 1`` for 3D) and geometry of one file."""
    _check_exists(path)
    if path.is_dir():
        raise DataError(path, "is a folder, expected an image file")
    if _pick_reader(path, reader) == "nibabel":
        img = _nib_open(path)
        meta = _nib_meta(path, img)
        return _nib_data(path, img, meta, integer), meta
    return _sitk_read(path, integer)


def _header_one(path: Path, reader: Reader) -> CineMeta:
    _check_exists(path)
    if path.is_dir():
        raise DataError(path, "is a folder, expected an image file")
    if _pick_reader(path, reader) == "nibabel":
        return _nib_meta(path, _nib_open(path))
    return _sitk_header(path)


def _same_affine(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=1e-4))


def _folder_meta(folder: Path, frames: list[CineMeta]) -> CineMeta:
    first = frames[0]
    for m in frames[1:]:
        if m.ndim != 3 and m.n_frames != 1:
            raise DataError(m.path, "a frame of a per-frame folder must be a 3D image")
        if m.spatial_shape != first.spatial_shape:
            raise DataError(m.path, f"frame shape {m.spatial_shape} differs from the first frame's "
                                    f"{first.spatial_shape}")
        if not _same_affine(m.affine, first.affine):
            raise DataError(m.path, "frame affine differs from the first frame's (frames must share one "
                                    "geometry)")
    return CineMeta(first.affine, first.spacing, None, first.spatial_shape + (len(frames),), str(folder), 4,
                    [m.path for m in frames])


def read_header(path: PathLike, reader: Reader = "auto") -> CineMeta:
    """Geometry of an image file or per-frame folder from its header(s) only (no voxel data read).

    Returns:
        :class:`CineMeta` with ``shape`` ``(X, Y, Z, T)`` (``T = 1`` and ``ndim = 3`` for a 3D file).
    Raises:
        DataError: missing, unreadable, not an image, or fewer than 3 / more than 4 dimensions.
    """
    p = Path(path)
    _check_exists(p)
    if p.is_dir():
        return _folder_meta(p, [_header_one(f, reader) for f in _frame_files(p)])
    return _header_one(p, reader)


def _check_finite(path: str, data: np.ndarray) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(path, f"contains {int(bad.sum())} NaN or infinite intensities")


def load_cine(
    path: PathLike, *, allow_3d: bool = False, reader: Reader = "auto"
) -> tuple[np.ndarray, CineMeta]:
    """Read a cine.

    Args:
        path: a 4D NIfTI (nibabel), a 4D ``.mha``/``.mhd``/``.nrrd``/NIfTI (SimpleITK), or a folder of
            per-frame 3D files (frames in natural name order).
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
    _check_exists(p)
    if p.is_dir():
        arrays, metas = zip(*(_read_one(f, reader, integer=False) for f in _frame_files(p)))
        meta = _folder_meta(p, list(metas))
        data = np.stack([a[..., 0] for a in arrays], axis=-1)
    else:
        data, meta = _read_one(p, reader, integer=False)
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
    if not _same_affine(label_meta.affine, like.affine):
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
            data, meta = _read_one(Path(file), reader, integer=True)
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
    _check_exists(p)
    if p.is_dir():
        return load_label(
            dict(enumerate(_frame_files(p))), n_frames, frames, like=like, num_classes=num_classes,
            ignore_index=ignore_index, reader=reader,
        )
    data, meta = _read_one(p, reader, integer=True)
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
    ref = None
    if like_p.is_file() and like_p.name.lower().endswith(NIFTI_SUFFIXES):
        ref = _nib_open(like_p)
    if ref is not None:
        header = ref.header.copy()
        img = nib.Nifti1Image(data, ref.affine, header=header)
        sform, scode = ref.get_sform(coded=True)
        qform, qcode = ref.get_qform(coded=True)
        if sform is not None:
            img.set_sform(sform, int(scode))
        if qform is not None:
            img.set_qform(qform, int(qcode))
    else:
        img = nib.Nifti1Image(data, meta.affine)
        img.header.set_xyzt_units("mm", "msec")
        if meta.ndim == 4:
            zooms = list(img.header.get_zooms())
            zooms[3] = meta.time_step or 1.0
            img.header.set_zooms(zooms)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header["cal_min"], img.header["cal_max"] = 0, float(data.max()) if data.size else 0
    with atomic_path(out_p) as tmp:
        nib.save(img, os.fspath(tmp))
    return out_p
