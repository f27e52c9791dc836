"""NIfTI through nibabel: the reader that keeps the time step (``pixdim[4]``), and trunet's one NIfTI writer."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from trunet.atomic import atomic_path
from trunet.errors import DataError
from trunet.io.base import ImageIO
from trunet.io.meta import NIFTI_SUFFIXES, CineMeta, spacing_of

__all__ = ["NiftiIO", "open_nifti"]


def open_nifti(path: Path) -> nib.Nifti1Image:
    """The nibabel image of ``path`` (header read, voxels not yet), or a DataError naming the file."""
    try:
        img = nib.load(os.fspath(path))
    except nib.filebasedimages.ImageFileError as exc:
        raise DataError(path, f"not an image nibabel can read ({exc})".replace("\n", " ")) from None
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise DataError(path, f"truncated or corrupt file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"expected a NIfTI image, got {type(img).__name__}")
    return img


def _time_step(img: nib.Nifti1Image) -> Optional[float]:
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not np.isfinite(zooms[3]) or zooms[3] <= 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    factor = {"sec": 1000.0, "msec": 1.0, "usec": 0.001}.get(unit, 1.0)  # unknown: ACDC stores ms
    return float(zooms[3]) * factor


def _meta(path: Path, img: nib.Nifti1Image) -> CineMeta:
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
    time_step = _time_step(img) if ndim == 4 else None
    return CineMeta(affine, spacing_of(affine), time_step, shape[:3] + (t,), str(path), ndim)


class NiftiIO(ImageIO):
    """``.nii`` / ``.nii.gz`` with nibabel. MONAI's ``NibabelReader`` would set ``pixdim[4]`` to 1 on 4D files
    (MONAI 1.6); this reader keeps the time step of the raw header (in ms)."""

    name = "nibabel"
    suffixes = NIFTI_SUFFIXES

    def read_header(self, path: Path) -> CineMeta:
        return _meta(path, open_nifti(path))

    def read(self, path: Path, integer: bool) -> tuple[np.ndarray, CineMeta]:
        img = open_nifti(path)
        meta = _meta(path, img)
        try:
            data = np.asanyarray(img.dataobj) if integer else img.get_fdata(dtype=np.float32)
        except (EOFError, zlib.error, OSError, ValueError) as exc:
            raise DataError(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from None
        return data.reshape(meta.shape), meta  # drops trailing singleton dims, adds T=1 to a 3D image

    def write(self, path: Path, data: np.ndarray, meta: CineMeta, *, template: Optional[Path] = None,
              dtype: Optional[np.dtype] = None) -> Path:
        """Write ``data`` ``(x, y, z[, t])`` atomically.

        With a NIfTI ``template`` its header, sform and qform (with their codes) are kept; otherwise the
        affine of ``meta`` becomes sform and qform (code 1, scanner), units mm/ms and, for 4D data,
        ``pixdim[4]`` = ``meta.time_step`` (1 when unknown). Integer data get ``cal_min``/``cal_max`` = 0 and
        their maximum; slope/intercept are 1/0 (values are stored as given).
        """
        dtype = np.dtype(dtype or data.dtype)
        if template is not None:
            ref = open_nifti(template)
            img = nib.Nifti1Image(data, ref.affine, header=ref.header.copy())
            sform, scode = ref.get_sform(coded=True)
            qform, qcode = ref.get_qform(coded=True)
            if sform is not None:
                img.set_sform(sform, int(scode))
            if qform is not None:
                img.set_qform(qform, int(qcode))
        else:
            img = nib.Nifti1Image(data, meta.affine)
            img.header.set_qform(meta.affine, code=1)
            img.header.set_sform(meta.affine, code=1)
            img.header.set_xyzt_units("mm", "msec")
            if data.ndim == 4:
                zooms = list(img.header.get_zooms())
                zooms[3] = meta.time_step or 1.0
                img.header.set_zooms(zooms)
        img.set_data_dtype(dtype)
        img.header.set_slope_inter(1.0, 0.0)
        if np.issubdtype(dtype, np.integer):
            img.header["cal_min"], img.header["cal_max"] = 0, float(data.max()) if data.size else 0
        with atomic_path(path) as tmp:
            nib.save(img, os.fspath(tmp))
        return Path(path)
