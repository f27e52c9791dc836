"""A cine stored as a folder of one 3D file per frame (frames in natural name order, any readable format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trunet.errors import DataError
from trunet.io.base import format_for
from trunet.io.meta import CineMeta, check_readable, is_image_path, natural_key, same_affine

__all__ = ["frame_files", "FrameFolder"]


def frame_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` in natural name order (``frame2`` before ``frame10``)."""
    files = [p for p in folder.iterdir() if p.is_file() and is_image_path(p)]
    files.sort(key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(folder, "folder holds no image files (.nii.gz, .nii, .mha, .mhd, .nrrd) to use as "
                                "frames")
    return files


def _one_file(path: Path) -> None:
    check_readable(path)
    if path.is_dir():
        raise DataError(path, "is a folder, expected an image file")


def read_file_header(path: Path, reader: str = "auto") -> CineMeta:
    """Header of one image file through the registry."""
    _one_file(path)
    return format_for(path, reader).read_header(path)


def read_file(path: Path, reader: str = "auto", integer: bool = False) -> tuple[np.ndarray, CineMeta]:
    """Voxels ``(x, y, z, t)`` (``t = 1`` for 3D) and geometry of one image file through the registry."""
    _one_file(path)
    return format_for(path, reader).read(path, integer)


class FrameFolder:
    """The frames of a per-frame folder read as one cine; every frame must share one grid."""

    @staticmethod
    def combine(folder: Path, frames: list[CineMeta]) -> CineMeta:
        """The cine's geometry from its frames' (checked to agree).

        Args:
            folder: the per-frame folder.
            frames: the geometry of each file, in frame order; each must be 3D (or 4D with one frame).

        Returns:
            :class:`CineMeta` of shape ``(X, Y, Z, T)``, ``T = len(frames)``, without a time step.

        Raises:
            DataError: a file that holds several frames (the first one too: its frame 0 is never taken
                silently), or a shape or affine that differs from the first frame's.
        """
        for m in frames:
            if m.ndim != 3 and m.n_frames != 1:
                raise DataError(m.path, f"is a {m.ndim}D image of shape {m.shape}; each file of a per-frame "
                                        "folder must be one 3D frame (give a 4D file as the cine itself)")
        first = frames[0]
        for m in frames[1:]:
            if m.spatial_shape != first.spatial_shape:
                raise DataError(m.path, f"frame shape {m.spatial_shape} differs from the first frame's "
                                        f"{first.spatial_shape}")
            if not same_affine(m.affine, first.affine):
                raise DataError(m.path, "frame affine differs from the first frame's (frames must share one "
                                        "geometry)")
        return CineMeta(first.affine, first.spacing, None, first.spatial_shape + (len(frames),), str(folder),
                        4, [m.path for m in frames])

    @classmethod
    def read_header(cls, folder: Path, reader: str = "auto") -> CineMeta:
        return cls.combine(folder, [read_file_header(f, reader) for f in frame_files(folder)])

    @classmethod
    def read(cls, folder: Path, reader: str = "auto", integer: bool = False) -> tuple[np.ndarray, CineMeta]:
        arrays, metas = zip(*(read_file(f, reader, integer) for f in frame_files(folder)))
        meta = cls.combine(folder, list(metas))
        return np.stack([a[..., 0] for a in arrays], axis=-1), meta
