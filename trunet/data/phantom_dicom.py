"""A cine written as DICOM MR images the way scanners write them: the phantom's DICOM export (test data for
:mod:`trunet.io.dicom` and the DICOM SEG path).

Layouts:

* ``"per-slice"``: one series per slice position, its frames as instances ordered by trigger time (common
  on Siemens and GE);
* ``"one-series"``: every slice and frame in one series;
* ``"enhanced"``: one enhanced multi-frame MR file, converted from the single-frame images by highdicom.

Headers carry what a reader needs and real files have: oblique ``ImageOrientationPatient`` and
``ImagePositionPatient`` from the affine (RAS turned LPS), ``PixelSpacing`` as (row, column) spacing,
``TriggerTime``, ``CardiacNumberOfImages``, ``SliceLocation``, ``SliceThickness``, one study and one frame of
reference. pydicom has no writer for a whole series (it writes datasets); this module fills the MR image
attributes itself. UIDs derive from ``uid_seed``, so the same case gives the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from trunet.atomic import atomic_path

__all__ = ["write_dicom_cine", "Layout"]

Layout = Literal["per-slice", "one-series", "enhanced"]
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _save(ds, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(os.fspath(tmp), enforce_file_format=True)
    return path


def write_dicom_cine(
    image: np.ndarray,
    affine: np.ndarray,
    time_step_ms: float,
    folder: str | os.PathLike,
    *,
    layout: Layout = "per-slice",
    patient_id: str = "PHANTOM",
    uid_seed: Optional[str] = None,
    series_description: str = "cine_sax",
) -> list[Path]:
    """Write a cine as DICOM MR images under ``folder``.

    Args:
        image: ``(X, Y, Z, T)`` intensities, stored as uint16 (rounded, clipped to 0..65535); X runs along a
            row (columns), Y down the columns (rows).
        affine: 4x4 voxel -> world RAS matrix (columns 0 and 1 orthogonal, as DICOM needs in plane). With a
            positive determinant, slice ``z`` lies at increasing position along the DICOM slice normal, so
            :mod:`trunet.io.dicom` reads back the same array and affine.
        time_step_ms: trigger time step; frame ``t`` has ``TriggerTime = t * time_step_ms``.
        folder: created; per-slice layout: ``series_ZZ/``, one file per frame.
        layout: see the module docstring.
        patient_id: ``PatientID`` and ``PatientName``.
        uid_seed: makes the UIDs reproducible (default: fresh UIDs).

    Returns:
        The written files.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    data = np.asarray(image)
    if data.ndim != 4:
        raise ValueError(f"write_dicom_cine: image must be (X, Y, Z, T), got shape {data.shape}")
    nx, ny, nz, nt = data.shape
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    d_col, d_row = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    row_dir, col_dir = col_step / d_col, row_step / d_row
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise ValueError("write_dicom_cine: the affine's x and y axes are not orthogonal; DICOM cannot store it")
    normal = np.cross(row_dir, col_dir)
    thickness = float(abs(slice_step @ normal))
    pixels = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    lo, hi = np.percentile(pixels, [1, 99])
    window = [round(float(lo + hi) / 2, 1), round(max(float(hi - lo), 1.0), 1)]

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(uid_seed), *map(str, parts)]) if uid_seed else generate_uid()

    study, frame_of_reference = uid("study"), uid("for")
    folder = Path(folder)
    datasets: list[tuple[Path, Dataset]] = []
    for z in range(nz):
        position = lps[:3, :3] @ np.array([0.0, 0.0, z]) + lps[:3, 3]
        series = uid("series", z) if layout == "per-slice" else uid("series")
        for t in range(nt):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = uid("image", z, t)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.Manufacturer = "MR", "trunet phantom"
            ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = f"{patient_id}^", patient_id, "O", ""
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", ""
            ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
            ds.SeriesInstanceUID = series
            ds.SeriesNumber = 100 + z if layout == "per-slice" else 100
            ds.SeriesDescription = f"{series_description}_{z + 1:02d}" if layout == "per-slice" else series_description
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
            ds.InstanceNumber = t + 1 if layout == "per-slice" else z * nt + t + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SS", "", "2D"
            ds.SequenceName, ds.AngioFlag = "tfi2d1", "N"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.FlipAngle = 3.0, 1.5, 1, 60.0
            ds.MagneticFieldStrength = 1.5
            ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
            ds.ImagePositionPatient = [round(float(v), 6) for v in position]
            ds.PixelSpacing = [round(d_row, 8), round(d_col, 8)]
            ds.SliceThickness = round(thickness, 6)
            ds.SliceLocation = round(float(position @ normal), 6)
            ds.TriggerTime = round(t * float(time_step_ms), 4)
            ds.CardiacNumberOfImages = nt
            ds.HeartRate = int(round(60000.0 / (nt * float(time_step_ms))))
            ds.Rows, ds.Columns = ny, nx
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
            ds.WindowCenter, ds.WindowWidth = window
            ds.PixelData = np.ascontiguousarray(pixels[:, :, z, t].T).tobytes()  # (rows, columns)
            name = f"series_{z + 1:02d}/IM_{t + 1:04d}.dcm" if layout == "per-slice" else f"IM_{z * nt + t + 1:05d}.dcm"
            datasets.append((folder / name, ds))
    if layout == "enhanced":
        from highdicom.legacy import LegacyConvertedEnhancedMRImage

        enhanced = LegacyConvertedEnhancedMRImage([ds for _, ds in datasets], series_instance_uid=uid("enhanced"),
                                                  series_number=200, sop_instance_uid=uid("enhanced-image"),
                                                  instance_number=1)
        return [_save(enhanced, folder / "cine_enhanced.dcm")]
    if layout not in ("per-slice", "one-series"):
        raise ValueError(f"write_dicom_cine: unknown layout {layout!r}")
    return [_save(ds, path) for path, ds in datasets]
