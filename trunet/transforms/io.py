"""Moved to :mod:`trunet.io` (one reader/writer class per format and a registry); this name keeps old
imports working."""

from trunet.io import (  # noqa: F401
    IMAGE_SUFFIXES,
    CineMeta,
    is_image_path,
    load_cine,
    load_label,
    read_header,
    save_cine_like,
    strip_image_suffix,
)

__all__ = ["CineMeta", "IMAGE_SUFFIXES", "read_header", "load_cine", "load_label", "save_cine_like",
           "is_image_path"]
