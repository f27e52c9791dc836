"""The reader/writer interface every image format implements, and the registry that picks one by path.

A format is an :class:`ImageIO`: it claims file names (:meth:`ImageIO.handles`), reads a header without the
voxels (:meth:`ImageIO.read_header`) and reads voxels as ``(x, y, z, t)`` (``t = 1`` for a 3D file) with
their :class:`~trunet.io.meta.CineMeta`. Writing is optional (:meth:`ImageIO.write`). New formats (a DICOM
series reader, say) subclass :class:`ImageIO` and call :func:`register`; :func:`format_for` then finds them.
A format with ``reads_folders`` may claim a whole folder (:func:`folder_format`), as DICOM does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np

from trunet.errors import DataError
from trunet.io.meta import CineMeta

__all__ = ["ImageIO", "Reader", "register", "registered", "format_for", "folder_format"]

Reader = Literal["auto", "nibabel", "sitk"]


class ImageIO:
    """One image format.

    Attributes:
        name: what ``reader=`` selects it by (``"nibabel"``, ``"sitk"``, ...).
        suffixes: lower-case file name endings it claims when ``reader="auto"``.
        reads_folders: it may claim a folder (a DICOM series), which then is not a folder of per-frame files.
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()
    reads_folders: bool = False

    def handles(self, path: Path) -> bool:
        """True when this format claims ``path`` by its name."""
        return path.name.lower().endswith(self.suffixes)

    def read_header(self, path: Path) -> CineMeta:
        """Geometry of one file from its header only."""
        raise NotImplementedError

    def read(self, path: Path, integer: bool) -> tuple[np.ndarray, CineMeta]:
        """Voxels ``(x, y, z, t)`` (float32, or the stored integer type when ``integer``) and geometry."""
        raise NotImplementedError

    def write(self, path: Path, data: np.ndarray, meta: CineMeta, *, template: Optional[Path] = None,
              dtype: Optional[np.dtype] = None) -> Path:
        """Write ``(x, y, z[, t])`` voxels on the grid ``meta`` (header fields from ``template`` if given)."""
        raise NotImplementedError(f"the {self.name} format is read-only in trunet")


_REGISTRY: list[ImageIO] = []


def register(fmt: ImageIO) -> ImageIO:
    """Add a format (later registrations are asked first, so a new reader can take over a suffix)."""
    _REGISTRY.insert(0, fmt)
    return fmt


def registered() -> list[ImageIO]:
    """The known formats, in the order they are asked."""
    return list(_REGISTRY)


def folder_format(folder: Path) -> Optional[ImageIO]:
    """The format that claims ``folder`` as one image (a DICOM series folder), or ``None`` (a folder of
    per-frame files)."""
    return next((fmt for fmt in _REGISTRY if fmt.reads_folders and fmt.handles(folder)), None)


def format_for(path: Path, reader: str = "auto") -> ImageIO:
    """The format that reads ``path``: the one named ``reader``, or with ``"auto"`` the first that claims the
    file name.

    Raises:
        DataError: no format claims the name.
        ValueError: an unknown ``reader`` name.
    """
    if reader != "auto":
        for fmt in _REGISTRY:
            if fmt.name == reader:
                return fmt
        raise ValueError(f"unknown reader {reader!r}; known: {[f.name for f in _REGISTRY]}")
    for fmt in _REGISTRY:
        if fmt.handles(path):
            return fmt
    raise DataError(
        path,
        "not an image: unsupported file type (expected .nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr, .dcm, a DICOM "
        "folder or a folder of per-frame 3D files)",
    )
