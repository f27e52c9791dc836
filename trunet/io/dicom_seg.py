"""A cine segmentation as DICOM SEG (highdicom), for PACS, OHIF and 3D Slicer's DICOM browser.

DICOM SEG as highdicom builds it is spatial only: two frames of one SEG instance may not share a plane
position, so a cine (every slice position repeated at each cardiac phase) cannot be one instance. trunet
writes **one SEG series per cine** with **one SEG instance per cardiac frame** ``t`` (``InstanceNumber =
t + 1``, the trigger time in ``ContentDescription``), each holding every slice position and segment
(``BINARY``, empty frames kept so every plane has its frame). Segments are the label values 1..K-1 with
coded concepts (SNOMED CT, from pydicom's code dictionary: it has no "cavity" concepts, so the RV and LV
cavities are coded as the chambers, ``Right ventricle`` 53085002 and ``Left ventricle`` 87878005, and the
myocardium as ``Left ventricle myocardium`` 49848007; the segment labels say "cavity").

References: highdicom matches source images to SEG frames by position only (and only within one source
series), which is ambiguous for a cine and impossible for one series per slice; so after highdicom builds
an instance, each frame's ``DerivationImageSequence`` is set here to the exact source instance (and frame,
for an enhanced source) of its slice and cardiac frame, and the ``ReferencedSeriesSequence`` lists every
source series. ``highdicom.seg.segread`` and its ``get_pixels_by_source_instance`` /
``get_pixels_by_source_frame`` read the result back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trunet import __version__
from trunet.errors import DataError
from trunet.io.dicom import DicomCine, Plane

__all__ = ["write_dicom_seg", "segment_concepts", "read_dicom_seg"]


def segment_concepts(name: str) -> tuple[str, Any, Any]:
    """``(segment label, property category, property type)`` for a class name (ACDC's RV/MYO/LV known)."""
    from pydicom.sr.codedict import codes

    known = {
        "RV": ("RV cavity", codes.SCT.RightVentricle),
        "MYO": ("LV myocardium", codes.SCT.LeftVentricleMyocardium),
        "LV": ("LV cavity", codes.SCT.LeftVentricle),
    }
    label, concept = known.get(name.upper(), (name, codes.SCT.AnatomicalStructure))
    return label, codes.SCT.AnatomicalStructure, concept


def _source_datasets(cine: DicomCine) -> dict[Path, Any]:
    import pydicom

    return {p.path: pydicom.dcmread(os.fspath(p.path), stop_before_pixels=True)
            for frames in cine.planes for p in frames}


def _reference(plane: Plane, ds: Any) -> Any:
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = plane.sop_instance_uid
    if plane.frame is not None:
        ref.ReferencedFrameNumber = plane.frame + 1
    ref.SpatialLocationsPreserved = "YES"
    purpose = Dataset()
    code = codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = code.value, code.scheme_designator, code.meaning
    ref.PurposeOfReferenceCodeSequence = [purpose]
    return ref


def _set_references(seg: Any, slices: list[Plane], sources: dict[Path, Any]) -> None:
    """Each SEG frame's DerivationImageSequence -> the source plane of its slice; every series referenced."""
    from highdicom.sr import CodedConcept
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    by_position = {tuple(np.round(p.position, 3)): p for p in slices}
    for group in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(np.round([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient], 3))
        plane = by_position[position]
        derivation = Dataset()
        derivation.SourceImageSequence = [_reference(plane, sources[plane.path])]
        code = CodedConcept("113076", "DCM", "Segmentation")  # pydicom's codes.DCM.Segmentation is the modality SEG
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
        derivation.DerivationCodeSequence = [item]
        group.DerivationImageSequence = DicomSequence([derivation])
    series: dict[str, list[Plane]] = {}
    for p in slices:
        series.setdefault(p.series_instance_uid, []).append(p)
    items = []
    for uid, planes in series.items():
        entry = Dataset()
        entry.SeriesInstanceUID = uid
        instances = []
        for sop in dict.fromkeys(p.sop_instance_uid for p in planes):
            plane = next(p for p in planes if p.sop_instance_uid == sop)
            inst = Dataset()
            inst.ReferencedSOPClassUID = sources[plane.path].SOPClassUID
            inst.ReferencedSOPInstanceUID = sop
            instances.append(inst)
        entry.ReferencedInstanceSequence = instances
        items.append(entry)
    seg.ReferencedSeriesSequence = items


def write_dicom_seg(labels: np.ndarray, cine: DicomCine, out_dir: str | os.PathLike, classes: Sequence[str],
                    *, series_description: str = "trunet segmentation") -> list[Path]:
    """Write ``labels`` as a DICOM SEG series (one instance per cardiac frame) in the folder ``out_dir``.

    Args:
        labels: uint8 ``(T, X, Y, Z)`` on the cine's grid (X = columns, Y = rows, Z slices along the normal,
            as :mod:`trunet.io.dicom` reads them); value ``k`` >= 1 becomes segment ``k``.
        cine: the source cine (:func:`~trunet.io.dicom.scan_dicom_cine`).
        out_dir: the SEG series folder, ``frame_TT.dcm`` inside. Written whole into a temporary folder and
            renamed into place (an earlier folder of that name is replaced only after the new one is complete).
        classes: class names by label value (``classes[0]`` is the background, not a segment).

    Returns:
        The written files, one per cardiac frame.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    arr = np.asarray(labels)
    x, y, z, t = cine.shape
    if arr.shape != (t, x, y, z):
        raise ValueError(f"write_dicom_seg: labels {arr.shape} differ from the cine's (T, X, Y, Z) {(t, x, y, z)}")
    if len(classes) < 2:
        raise ValueError("write_dicom_seg: needs at least one foreground class")
    if int(arr.max(initial=0)) >= len(classes):
        raise ValueError(f"write_dicom_seg: label value {int(arr.max())} has no class name in {list(classes)}")
    sources = _source_datasets(cine)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="trunet", version=__version__,
        family=codes.DCM.ArtificialIntelligence,
    )
    descriptions = []
    for k, name in enumerate(classes[1:], start=1):
        label, category, concept = segment_concepts(str(name))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=label, segmented_property_category=category,
            segmented_property_type=concept, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{name}",
        ))
    first = cine.planes[0][0]
    orientation = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in first.orientation])
    slice_step = float(np.linalg.norm(cine.affine[:3, 2]))
    measures = hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in first.pixel_spacing],
                                        slice_thickness=slice_step)
    series_uid = hd.UID()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        names = []
        for f in range(t):
            slices = [cine.planes[k][f] for k in range(z)]
            src = sources[slices[0].path]
            mask = np.ascontiguousarray(np.transpose(arr[f], (2, 1, 0)))  # (Z, rows, columns) label map
            seg = hd.seg.Segmentation(
                source_images=[src], pixel_array=mask, segmentation_type="BINARY",
                segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=9000,
                sop_instance_uid=hd.UID(), instance_number=f + 1, manufacturer="trunet",
                manufacturer_model_name="trunet time-resolved UNet", software_versions=__version__,
                device_serial_number="0", plane_positions=[
                    hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in p.position])
                    for p in slices],
                plane_orientation=orientation, pixel_measures=measures, omit_empty_frames=False,
                series_description=series_description,
                content_description=(f"cardiac frame {f + 1} of {t}" + (
                    f", trigger time {slices[0].trigger_time:g} ms" if slices[0].trigger_time is not None else ""))[:64],
                content_label="TRUNET",
            )
            _set_references(seg, slices, sources)
            name = f"frame_{f + 1:02d}.dcm"
            seg.save_as(os.fspath(tmp / name), enforce_file_format=True)
            names.append(name)
        for name in names:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            if not out.is_dir() or any(not p.name.startswith("frame_") for p in out.iterdir()):
                raise DataError(out, "exists and is not a SEG folder trunet wrote; refusing to replace it")
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / name for name in names]


def read_dicom_seg(seg_dir: str | os.PathLike, cine: DicomCine) -> np.ndarray:
    """A SEG series written by :func:`write_dicom_seg` back as uint8 ``(T, X, Y, Z)`` labels on ``cine``'s
    grid, through highdicom's look-up by source instance (or source frame, for an enhanced source)."""
    import highdicom as hd

    x, y, z, t = cine.shape
    out = np.zeros((t, x, y, z), dtype=np.uint8)
    files = sorted(Path(seg_dir).glob("frame_*.dcm"))
    if len(files) != t:
        raise DataError(seg_dir, f"holds {len(files)} SEG instances, the cine has {t} frames")
    for f, path in enumerate(files):
        seg = hd.seg.segread(os.fspath(path))
        slices = [cine.planes[k][f] for k in range(z)]
        if slices[0].frame is None:
            pixels = seg.get_pixels_by_source_instance([p.sop_instance_uid for p in slices], combine_segments=True)
        else:
            pixels = seg.get_pixels_by_source_frame(slices[0].sop_instance_uid, [p.frame + 1 for p in slices],
                                                    combine_segments=True)
        out[f] = np.transpose(np.asarray(pixels), (2, 1, 0))
    return out
