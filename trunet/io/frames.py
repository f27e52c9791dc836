"""A cine stored as a folder of one 3D file per frame (frames in natural name order, any readable format)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from trunet.errors import DataError
from trunet.io.base import format_for
from trunet.io.meta import (
    CineMeta,
    check_readable,
    is_image_path,
    natural_key,
    same_affine,
    strip_image_suffix,
)

__all__ = ["frame_files", "frame_number", "check_frame_series", "FrameFolder"]

_NUMBERED = re.compile(r"^(?P<series>.*?)(?P<number>\d+)$")


def frame_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` in natural name order (``frame2`` before ``frame10``)."""
    files = [p for p in folder.iterdir() if p.is_file() and is_image_path(p)]
    files.sort(key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(folder, "folder holds no image files (.nii.gz, .nii, .mha, .mhd, .nrrd) to use as "
                                "frames")
    return files


def frame_number(path: Path) -> tuple[str, int] | None:
    """``(series, number)`` of a frame file named ``<series><number>`` (``case_frame07.nii.gz`` ->
    ``("case_frame", 7)``, ``012.mha`` -> ``("", 12)``), or ``None`` when the name does not end in a number
    (``case_frame07_gt.nii.gz``)."""
    match = _NUMBERED.match(strip_image_suffix(path.name))
    return None if match is None else (match["series"], int(match["number"]))


def _listing(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def check_frame_series(folder: Path) -> list[Path]:
    """The files of a folder that must hold one cine as one file per frame, checked by name, in frame order.

    Where a folder could also be something else (``trunet predict`` searching a folder), the names must
    say it is one series of frames: every image file named ``<series><number>``, one series, no number
    twice, the numbers evenly spaced (no frame missing between them). Geometry (3D files on one grid) is
    checked when the folder is read (:meth:`FrameFolder.read_header`).

    Returns:
        The image files in frame order (natural name order, which is number order within one series).
    Raises:
        DataError: naming ``folder`` and what it holds instead: files without a frame number (labels such
            as ``_gt``), frames of several series, a repeated number, or a gap in the numbers.
    """
    files = frame_files(folder)
    unnumbered = [p.name for p in files if frame_number(p) is None]
    series: dict[str, list[int]] = {}
    for p in files:
        key = frame_number(p)
        if key is not None:
            series.setdefault(key[0], []).append(key[1])
    found = []
    if len(series) > 1:
        counts = [f"{name or '<number>'}NN: {len(numbers)} files" for name, numbers in sorted(series.items())]
        found.append(f"frames of {len(series)} series ({', '.join(counts)})")
    elif series:
        numbers = sorted(next(iter(series.values())))
        steps = {b - a for a, b in zip(numbers, numbers[1:])}
        if 0 in steps:
            twice = sorted({a for a, b in zip(numbers, numbers[1:]) if a == b})
            found.append(f"frame number(s) {_listing([str(n) for n in twice])} twice")
        elif len(steps) > 1:
            shown = _listing([str(n) for n in numbers], 8)
            found.append(f"frame numbers {shown} with a gap (a frame missing?)")
    if unnumbered:
        found.append(f"{len(unnumbered)} file(s) without a frame number ({_listing(unnumbered)})")
    if found:
        raise DataError(folder, "is not one cine of per-frame files: it holds " + "; ".join(found) + "; a "
                                "per-frame folder holds only one 3D file per frame, named with the frame "
                                "number (case_frame01.nii.gz, case_frame02.nii.gz, ...)")
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
