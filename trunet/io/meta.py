"""What every format shares: the geometry record :class:`CineMeta`, image-name rules and geometry helpers.

Affines are RAS (nibabel's convention), in mm; shapes are as on disk, ``(X, Y, Z, T)``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from trunet.errors import DataError

__all__ = [
    "CineMeta",
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "IMAGE_SUFFIXES",
    "is_image_path",
    "strip_image_suffix",
    "case_id_from_path",
    "check_readable",
    "spacing_of",
    "same_affine",
]

PathLike = Union[str, os.PathLike]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES


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


def case_id_from_path(path: str | Path) -> str:
    """The case id of an image file or per-frame folder: its name without image suffix and without ACDC's
    ``_4d`` cine suffix (``patient001_4d.nii.gz`` -> ``patient001``). Training, prediction file names and
    evaluation all use this rule, so a prediction finds its reference by id."""
    stem = strip_image_suffix(Path(path).name)
    return stem[:-3] if stem.lower().endswith("_4d") and len(stem) > 3 else stem


def natural_key(name: str) -> list:
    """Sort key that orders ``frame2`` before ``frame10``."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def check_readable(path: Path) -> None:
    """DataError unless ``path`` exists and is readable."""
    if not path.exists():
        raise DataError(path, "file not found")
    if not os.access(path, os.R_OK):
        raise DataError(path, "file is not readable (permission denied)")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (x, y, z) in mm: the column norms of the affine."""
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


def same_affine(a: np.ndarray, b: np.ndarray, atol: float = 1e-3) -> bool:
    """Two affines describe the same grid (within ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=1e-4))
