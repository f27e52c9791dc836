"""DICOM cine MRI as scanners write it, read with pydicom into trunet's ``(x, y, z, t)`` contract.

Accepted layouts (a folder is searched recursively; ``DICOMDIR`` and hidden files are ignored):

* one series per slice position, all frames of that slice in it (common on Siemens and GE);
* all slices and frames in one series;
* one enhanced multi-frame MR file (a ``.dcm`` file or a folder holding just it).

A cine is built from *planes* (one 2D image: a single-frame instance, or one frame of an enhanced file):

* **orientation**: planes are grouped by ``ImageOrientationPatient``; the largest group is the cine, the
  others (localizers, long-axis views) and images typed ``LOCALIZER`` are skipped with a warning;
* **slices**: planes are ordered by their position along the slice normal (row direction x column
  direction, from ``ImagePositionPatient`` and ``ImageOrientationPatient``), never by ``SliceLocation`` or
  file names; the slice step comes from those positions, not from ``SliceThickness``;
* **frames**: within a slice, by ``TriggerTime`` (``NominalCardiacTriggerDelayTime`` in an enhanced file),
  ``InstanceNumber`` when a plane has no trigger time; the time step is the median trigger time step.

Geometry: array axis x runs along a row (increasing column index), y down the columns (increasing row
index), z along the slice normal, as ITK and dcm2niix lay out a series; the affine is DICOM's LPS matrix
turned RAS (x and y world axes negated), the convention of the NIfTI path, so a cine read here and its
NIfTI conversion give the same array and affine.

Every inconsistency a real folder can hold is a :class:`~trunet.errors.DataError` naming the folder or
file and what is wrong: several studies, differing frame counts, missing frames, non-uniform slice gaps,
differing matrix or pixel spacing, or a compressed transfer syntax no installed decoder reads.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from trunet.errors import DataError
from trunet.io.base import ImageIO
from trunet.io.meta import CineMeta, spacing_of

__all__ = ["DICOM_SUFFIXES", "DicomIO", "DicomCine", "Plane", "is_dicom_file", "dicom_files", "is_dicom_folder",
           "dicom_cine_folders", "scan_dicom_cine"]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".ima")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_POSITION_TOL_MM = 0.05  # positions closer than this along the normal are one slice
_GAP_REL_TOL = 0.02  # slice gaps may differ by 2% (and at least _POSITION_TOL_MM) from their median


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm``/``.ima`` name, or the ``DICM`` magic of a DICOM Part 10 file after its 128-byte preamble."""
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under ``folder`` (recursively), in path order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom_file(p))


def is_dicom_folder(folder: Path) -> bool:
    """True when ``folder`` holds a DICOM file (at any depth)."""
    return folder.is_dir() and any(p.is_file() and is_dicom_file(p) for p in folder.rglob("*"))


def _study_of(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=["StudyInstanceUID", "Modality"])
    except Exception:  # an unreadable file is reported by the reader, with its name
        return ""
    return "" if str(ds.get("Modality", "")) == "SEG" else str(ds.get("StudyInstanceUID", ""))


def dicom_cine_folders(folder: Path, exclude: Optional[Path] = None) -> list[Path]:
    """The folders under ``folder`` that each hold one study's DICOM images (one cine each): ``folder``
    itself when all its DICOM files are of one study, else its subfolders, searched the same way.
    Files under ``exclude`` (an output folder) and SEG objects are not counted."""
    def wanted(p: Path) -> bool:
        return exclude is None or exclude not in p.resolve().parents

    files = [p for p in dicom_files(folder) if wanted(p)]
    studies = {s for s in map(_study_of, files) if s}
    if not studies:
        return []
    if len(studies) == 1:
        return [folder]
    return [c for sub in sorted(p for p in folder.iterdir() if p.is_dir() and wanted(p))
            for c in dicom_cine_folders(sub, exclude)]


@dataclass
class Plane:
    """One 2D image of a cine: a single-frame instance (``frame`` None) or frame ``frame`` (0-based) of an
    enhanced multi-frame instance. Positions and directions are DICOM LPS, in mm."""

    path: Path
    frame: Optional[int]
    sop_instance_uid: str
    series_instance_uid: str
    series_description: str
    study_instance_uid: str
    position: np.ndarray  # (3,) ImagePositionPatient
    orientation: np.ndarray  # (6,) ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    trigger_time: Optional[float]
    instance_number: int
    cardiac_images: Optional[int]  # CardiacNumberOfImages when the header gives it
    localizer: bool

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


@dataclass
class DicomCine:
    """A DICOM cine after ordering: ``planes[z][t]`` and its geometry.

    Attributes:
        folder: the file or folder it was read from.
        planes: ``Z`` lists of ``T`` planes, slices along the normal, frames in time.
        affine: 4x4 voxel -> world RAS matrix of ``(x, y, z)``.
        time_step: median trigger time step in ms (``None`` without trigger times).
        skipped: planes left out (other orientation, localizer).
    """

    folder: Path
    planes: list[list[Plane]]
    affine: np.ndarray
    time_step: Optional[float]
    skipped: list[Plane]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(X, Y, Z, T)``: X = columns, Y = rows."""
        p = self.planes[0][0]
        return (p.columns, p.rows, len(self.planes), len(self.planes[0]))

    @property
    def meta(self) -> CineMeta:
        return CineMeta(self.affine, spacing_of(self.affine), self.time_step, self.shape, str(self.folder), 4)

    def read(self) -> np.ndarray:
        """Voxels float32 ``(X, Y, Z, T)``, rescaled by each image's ``RescaleSlope``/``RescaleIntercept``."""
        out = np.empty(self.shape, dtype=np.float32)
        cache: dict[Path, np.ndarray] = {}  # one decode per multi-frame file
        for z, frames in enumerate(self.planes):
            for t, plane in enumerate(frames):
                out[:, :, z, t] = _pixels(plane, cache).T  # (rows, columns) -> (x, y)
        return out


# -- headers ------------------------------------------------------------------------------------------


def _dcmread(path: Path, stop_before_pixels: bool) -> Any:
    import pydicom  # optional at import time: only DICOM input needs it
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(os.fspath(path), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(path, f"not a DICOM file pydicom can read ({type(exc).__name__}: {exc})") from None


def _check_transfer_syntax(path: Path, ds: Any) -> None:
    """DataError when the pixel data are compressed with a syntax no installed decoder reads, naming the
    packages to add (pydicom knows which plugins decode what)."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid is None or not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DataError(path, f"pixel data use the transfer syntax {uid.name} ({uid}), which pydicom cannot "
                              "decode; convert the series to an uncompressed syntax (e.g. dcmdjpeg)") from None
    if decoder.is_available:
        return
    needs = [s.split(" - requires ", 1)[-1] for s in decoder.missing_dependencies]
    raise DataError(path, f"pixel data are compressed as {uid.name} ({uid}) and no installed decoder reads it; "
                          f"install one of: {' | '.join(needs)} (e.g. pip install pylibjpeg pylibjpeg-libjpeg "
                          "pylibjpeg-openjpeg, or pip install python-gdcm)")


def _floats(value: Any, n: int, path: Path, name: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,):
        raise DataError(path, f"has no valid {name} (got {value!r}); a cine needs the image geometry")
    return arr


def _single_frame_plane(path: Path, ds: Any) -> Plane:
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if key not in ds:
            raise DataError(path, f"has no {key}; a cine needs the image geometry")
    return _plane(
        path, None, ds, ds, ds, ds, ds.get("TriggerTime"),
        instance_number=int(ds.get("InstanceNumber") or 0),
        cardiac_images=int(ds.CardiacNumberOfImages) if ds.get("CardiacNumberOfImages") else None,
        localizer="LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])],
    )


def _plane(path: Path, frame: Optional[int], ds: Any, pos: Any, ori: Any, meas: Any, trigger: Any, *,
           instance_number: int, cardiac_images: Optional[int], localizer: bool) -> Plane:
    """A :class:`Plane` from a dataset ``ds`` (identity, matrix) and the items holding its plane position,
    orientation and pixel measures (``ds`` itself for a single-frame image, functional groups for a frame
    of an enhanced one)."""
    return Plane(
        path=path, frame=frame, sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        position=_floats(pos.ImagePositionPatient, 3, path, "ImagePositionPatient"),
        orientation=_floats(ori.ImageOrientationPatient, 6, path, "ImageOrientationPatient"),
        pixel_spacing=tuple(float(v) for v in _floats(meas.PixelSpacing, 2, path, "PixelSpacing")),  # type: ignore[arg-type]
        rows=int(ds.Rows), columns=int(ds.Columns),
        trigger_time=None if trigger in (None, "") else float(trigger),
        instance_number=instance_number, cardiac_images=cardiac_images, localizer=localizer,
    )


def _group_item(frame_group: Any, shared: Any, name: str) -> Any:
    """Functional group ``name`` of one frame of an enhanced file: per-frame first, then shared."""
    for source in (frame_group, shared):
        if source is not None and name in source and len(source[name].value):
            return source[name].value[0]
    return None


def _multi_frame_planes(path: Path, ds: Any) -> list[Plane]:
    """The frames of an enhanced multi-frame image as planes (geometry and timing from the functional
    groups, as the enhanced MR IOD stores them)."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = int(ds.NumberOfFrames)
    if len(per_frame) != n:
        raise DataError(path, f"enhanced image has {n} frames but {len(per_frame)} per-frame functional groups")
    planes = []
    for i, group in enumerate(per_frame):
        pos = _group_item(group, shared, "PlanePositionSequence")
        ori = _group_item(group, shared, "PlaneOrientationSequence")
        meas = _group_item(group, shared, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None:
            raise DataError(path, f"frame {i + 1} lacks its plane position, orientation or pixel measures")
        sync = _group_item(group, shared, "CardiacSynchronizationSequence")
        trigger = sync.get("NominalCardiacTriggerDelayTime") if sync is not None else None
        content = _group_item(group, None, "FrameContentSequence")
        temporal = content.get("TemporalPositionIndex") if content is not None else None
        legacy = _group_item(group, None, "UnassignedPerFrameConvertedAttributesSequence")
        if legacy is not None:  # a legacy-converted enhanced image keeps the single-frame attributes here
            trigger = trigger if trigger not in (None, "") else legacy.get("TriggerTime")
            temporal = temporal or legacy.get("InstanceNumber")
        planes.append(_plane(path, i, ds, pos, ori, meas, trigger,
                             instance_number=int(temporal) if temporal else i + 1, cardiac_images=None,
                             localizer=False))
    return planes


def _planes(files: list[Path]) -> list[Plane]:
    planes: list[Plane] = []
    for path in files:
        ds = _dcmread(path, stop_before_pixels=True)
        if "Rows" not in ds:
            continue  # no image: a structured report, a presentation state
        modality = str(ds.get("Modality", ""))
        if modality in ("SEG", "SR", "PR", "RTSTRUCT"):
            continue  # derived objects (e.g. a SEG trunet wrote next to the images) are not cine images
        _check_transfer_syntax(path, ds)
        if int(ds.get("NumberOfFrames") or 1) > 1:
            planes.extend(_multi_frame_planes(path, ds))
        else:
            planes.append(_single_frame_plane(path, ds))
    return planes


# -- ordering -----------------------------------------------------------------------------------------


def _describe(planes: list[Plane]) -> str:
    names = sorted({p.series_description or p.series_instance_uid[-12:] for p in planes})
    return ", ".join(f"'{n}'" for n in names[:4]) + (" ..." if len(names) > 4 else "")


def _main_orientation(folder: Path, planes: list[Plane]) -> tuple[list[Plane], list[Plane]]:
    """The planes of the cine's orientation, and the skipped ones (other orientations, localizers)."""
    candidates = [p for p in planes if not p.localizer]
    if not candidates:
        raise DataError(folder, "holds only localizer images, no cine")
    keys = Counter(tuple(np.round(p.orientation, 3)) for p in candidates)
    main_key = keys.most_common(1)[0][0]
    keep = [p for p in candidates if np.allclose(p.orientation, main_key, atol=2e-3)]
    kept = {id(p) for p in keep}
    skipped = [p for p in planes if id(p) not in kept]
    if skipped:
        msg = (f"{folder}: skipped {len(skipped)} image(s) of another orientation or typed LOCALIZER "
               f"(series {_describe(skipped)}); the cine is the {len(keep)} images of series {_describe(keep)}")
        logger.warning(msg)
        warnings.warn(msg, stacklevel=3)
    return keep, skipped


def _check_uniform(folder: Path, planes: list[Plane]) -> None:
    studies = {p.study_instance_uid for p in planes}
    if len(studies) > 1:
        raise DataError(folder, f"holds {len(studies)} studies; point at the folder of one study's cine")
    first = planes[0]
    for p in planes[1:]:
        if (p.rows, p.columns) != (first.rows, first.columns):
            raise DataError(p.path, f"image matrix {p.rows}x{p.columns} differs from {first.rows}x{first.columns} "
                                    f"of {first.path.name}; one cine has one matrix")
        if not np.allclose(p.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise DataError(p.path, f"PixelSpacing {[float(v) for v in p.pixel_spacing]} differs from "
                                    f"{[float(v) for v in first.pixel_spacing]} of {first.path.name}")


def _slices(folder: Path, planes: list[Plane]) -> tuple[list[list[Plane]], np.ndarray]:
    """Planes grouped by position along the normal (ascending), and those positions (mm)."""
    normal = planes[0].normal
    dist = np.array([float(p.position @ normal) for p in planes])
    order = np.argsort(dist, kind="stable")
    groups: list[list[Plane]] = []
    centres: list[float] = []
    for i in order:
        if groups and dist[i] - centres[-1] <= _POSITION_TOL_MM:
            groups[-1].append(planes[i])
        else:
            groups.append([planes[i]])
            centres.append(float(dist[i]))
    return groups, np.asarray(centres)


def _order_frames(folder: Path, groups: list[list[Plane]], centres: np.ndarray) -> list[list[Plane]]:
    """Each slice's planes in time order, with frame-count, duplicate and missing-frame checks."""
    counts = [len(g) for g in groups]
    if len(set(counts)) > 1:
        common = Counter(counts).most_common(1)[0][0]
        odd = [f"slice {z} at {centres[z]:.1f} mm (series {_describe(g)}): {len(g)}"
               for z, g in enumerate(groups) if len(g) != common]
        raise DataError(folder, f"slices have different frame counts: {common} frames in most slices, but "
                                f"{'; '.join(odd[:3])}{' ...' if len(odd) > 3 else ''} (a missing frame, or "
                                "another series at the same position)")
    ordered = []
    for z, group in enumerate(groups):
        timed = all(p.trigger_time is not None for p in group)
        key = (lambda p: (p.trigger_time, p.instance_number)) if timed else (lambda p: p.instance_number)
        group = sorted(group, key=key)
        values = [p.trigger_time if timed else p.instance_number for p in group]
        dup = [v for v, n in Counter(values).items() if n > 1]
        if dup:
            what = "TriggerTime" if timed else "InstanceNumber (no TriggerTime)"
            raise DataError(folder, f"slice {z} at {centres[z]:.1f} mm has several images with {what} {dup[0]} "
                                    f"(series {_describe(group)}): a repeated acquisition mixed in?")
        announced = {p.cardiac_images for p in group if p.cardiac_images}
        if announced and max(announced) > len(group):
            raise DataError(folder, f"missing frames: slice {z} at {centres[z]:.1f} mm has {len(group)} of the "
                                    f"{max(announced)} frames its headers announce (CardiacNumberOfImages)")
        if timed and len(group) > 2:
            steps = np.diff([p.trigger_time for p in group])
            median = float(np.min(steps))  # the regular step (a median is fooled when few frames remain)
            jumps = np.flatnonzero(steps > 1.5 * median)
            if median > 0 and jumps.size:
                j = int(jumps[0])
                raise DataError(folder, f"missing frames: at slice {z} ({centres[z]:.1f} mm) trigger times jump "
                                        f"from {group[j].trigger_time:g} to {group[j + 1].trigger_time:g} ms, "
                                        f"the step elsewhere is {median:g} ms")
        ordered.append(group)
    return ordered


def _affine(folder: Path, slices: list[list[Plane]], centres: np.ndarray) -> np.ndarray:
    first = slices[0][0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    d_row, d_col = first.pixel_spacing  # DICOM: (spacing between rows, spacing between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * d_col  # x: along a row, one column to the next
    lps[:3, 1] = col_dir * d_row  # y: down a column, one row to the next
    lps[:3, 3] = first.position
    if len(slices) > 1:
        gaps = np.diff(centres)
        median = float(np.min(gaps))  # the regular gap: a missing slice only makes larger ones
        bad = np.flatnonzero(np.abs(gaps - median) > max(_POSITION_TOL_MM, _GAP_REL_TOL * median))
        if bad.size:
            k = int(bad[0])
            raise DataError(folder, f"slice gaps are not uniform: {gaps[k]:.2f} mm between slices {k} and {k + 1} "
                                    f"(at {centres[k]:.2f} and {centres[k + 1]:.2f} mm along the normal), "
                                    f"{median:.2f} mm elsewhere; a slice is missing or the stack is not one cine")
        # the slice step from the first and last positions (keeps a gantry tilt's in-plane shift)
        lps[:3, 2] = (slices[-1][0].position - first.position) / (len(slices) - 1)
    else:
        lps[:3, 2] = first.normal * 1.0  # one slice: unit thickness along the normal (no step to measure)
    return LPS_TO_RAS @ lps


def scan_dicom_cine(path: Path) -> DicomCine:
    """Headers of a DICOM cine (file or folder) ordered into slices and frames; no pixel data decoded.

    Raises:
        DataError: no DICOM images, several studies, inconsistent matrix/spacing, different frame counts,
            missing or duplicate frames, non-uniform slice gaps, an undecodable transfer syntax.
    """
    path = Path(path)
    files = [path] if path.is_file() else dicom_files(path)
    if not files:
        raise DataError(path, "holds no DICOM files")
    planes = _planes(files)
    if not planes:
        raise DataError(path, "holds no DICOM images (only non-image objects such as SEG or SR)")
    planes, skipped = _main_orientation(path, planes)
    _check_uniform(path, planes)
    groups, centres = _slices(path, planes)
    slices = _order_frames(path, groups, centres)
    affine = _affine(path, slices, centres)
    triggers = [[p.trigger_time for p in s] for s in slices]
    time_step = None
    if len(slices[0]) > 1 and all(t is not None for s in triggers for t in s):
        time_step = float(np.median(np.diff(np.asarray(triggers, dtype=np.float64), axis=1)))
    return DicomCine(path, slices, affine, time_step, skipped)


# -- pixels -------------------------------------------------------------------------------------------


def _pixels(plane: Plane, cache: dict[Path, np.ndarray]) -> np.ndarray:
    """One plane's rescaled pixels ``(rows, columns)``."""
    from pydicom.pixels import apply_rescale

    if plane.path not in cache:
        ds = _dcmread(plane.path, stop_before_pixels=False)
        try:
            arr = ds.pixel_array
        except Exception as exc:  # pydicom raises several types for bad or undecodable pixel data
            raise DataError(plane.path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
        if plane.frame is None:
            return np.asarray(apply_rescale(arr, ds), dtype=np.float32)
        # an enhanced image: pydicom rescales all frames with the (shared or first) Pixel Value Transformation
        cache[plane.path] = np.asarray(apply_rescale(arr, ds), dtype=np.float32).reshape(-1, plane.rows,
                                                                                         plane.columns)
    return cache[plane.path][plane.frame]


class DicomIO(ImageIO):
    """A DICOM cine: a folder of single-frame MR images (per-slice series or one series), or one enhanced
    multi-frame file. Read-only here; segmentations go out as DICOM SEG (:mod:`trunet.io.dicom_seg`)."""

    name = "dicom"
    suffixes = DICOM_SUFFIXES
    reads_folders = True

    def handles(self, path: Path) -> bool:
        if path.is_dir():
            return is_dicom_folder(path)
        return super().handles(path)

    def read_header(self, path: Path) -> CineMeta:
        return scan_dicom_cine(path).meta

    def read(self, path: Path, integer: bool) -> tuple[np.ndarray, CineMeta]:
        cine = scan_dicom_cine(path)
        data = cine.read()
        if integer:
            rounded = np.rint(data)
            data = rounded.astype(np.int32) if np.array_equal(rounded, data) else data
        return data, cine.meta
