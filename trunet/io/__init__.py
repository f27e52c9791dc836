"""Image files in and out: the first stage after the config.

One reader/writer class per format behind one small interface (:class:`~trunet.io.base.ImageIO`) and a
registry that picks the format by path (:func:`~trunet.io.base.format_for`):

* :class:`~trunet.io.nifti.NiftiIO` -- ``.nii``/``.nii.gz`` with nibabel, keeping the time step; trunet's
  only NIfTI writer;
* :class:`~trunet.io.sitk.SimpleITKIO` -- ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` with SimpleITK;
* :class:`~trunet.io.frames.FrameFolder` -- a folder of one 3D file per frame;
* :class:`~trunet.io.dicom.DicomIO` -- a DICOM cine folder (per-slice series or one series) or an enhanced
  multi-frame file, with pydicom; :mod:`trunet.io.dicom_seg` writes predictions as DICOM SEG.

:mod:`trunet.io.cine` turns files into the in-memory contract -- cines and labels ``(T, X, Y, Z)``, time
first, with their :class:`~trunet.io.meta.CineMeta` geometry -- and writes predictions on their input's
grid. Nothing here knows of MONAI, models or training.
"""

from trunet.io.base import ImageIO, folder_format, format_for, register, registered
from trunet.io.cine import load_cine, load_label, read_header, save_cine_like
from trunet.io.dicom import DicomIO, is_dicom_folder, scan_dicom_cine
from trunet.io.meta import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    SITK_SUFFIXES,
    CineMeta,
    case_id_from_path,
    is_image_path,
    strip_image_suffix,
)
from trunet.io.nifti import NiftiIO
from trunet.io.sitk import SimpleITKIO

register(SimpleITKIO())
register(NiftiIO())
register(DicomIO())

__all__ = [
    "CineMeta",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "ImageIO",
    "NiftiIO",
    "SimpleITKIO",
    "DicomIO",
    "is_dicom_folder",
    "scan_dicom_cine",
    "folder_format",
    "register",
    "registered",
    "format_for",
    "read_header",
    "load_cine",
    "load_label",
    "save_cine_like",
    "is_image_path",
    "strip_image_suffix",
    "case_id_from_path",
]
