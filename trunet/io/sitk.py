"""4D ``.mha`` / ``.mhd`` / ``.nrrd`` / ``.nhdr`` (and NIfTI on request) through SimpleITK, LPS made RAS."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trunet.errors import DataError
from trunet.io.base import ImageIO
from trunet.io.meta import NIFTI_SUFFIXES, SITK_SUFFIXES, CineMeta, spacing_of

__all__ = ["SimpleITKIO"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _geometry(path: Path, size, spacing, origin, direction, dim: int, is_nifti: bool) -> CineMeta:
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
    return CineMeta(affine, spacing_of(affine), time_step, shape, str(path), dim)  # type: ignore[arg-type]


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "description:" in ln.lower()] or lines
    return useful[-1] if useful else type(exc).__name__


class SimpleITKIO(ImageIO):
    """Every format SimpleITK reads; claims the MetaImage and NRRD suffixes (``reader="sitk"`` forces it for
    NIfTI too). Needs no ``itk`` package, unlike MONAI's ``ITKReader``."""

    name = "sitk"
    suffixes = SITK_SUFFIXES

    def read_header(self, path: Path) -> CineMeta:
        import SimpleITK as sitk  # optional at import time: only files of this format need it

        reader = sitk.ImageFileReader()
        reader.SetFileName(os.fspath(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise DataError(path, f"not an image SimpleITK can read ({_first_line(exc)})") from None
        return _geometry(
            path, reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
            reader.GetDimension(), path.name.lower().endswith(NIFTI_SUFFIXES),
        )

    def read(self, path: Path, integer: bool) -> tuple[np.ndarray, CineMeta]:
        import SimpleITK as sitk

        try:
            img = sitk.ReadImage(os.fspath(path))
        except RuntimeError as exc:
            raise DataError(path, f"not an image SimpleITK can read, or truncated ({_first_line(exc)})") from None
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(path, "has vector pixels; a cine has one intensity per voxel")
        meta = _geometry(
            path, img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetDimension(),
            path.name.lower().endswith(NIFTI_SUFFIXES),
        )
        arr = sitk.GetArrayFromImage(img)  # (t, z, y, x) or (z, y, x)
        arr = arr.transpose(tuple(range(arr.ndim))[::-1])  # (x, y, z[, t])
        if not integer:
            arr = arr.astype(np.float32, copy=False)
        return arr.reshape(meta.shape), meta
