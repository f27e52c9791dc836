"""Post-processing of a predicted cine segmentation: probabilities -> labels -> largest components ->
atrial slices at the base (:func:`exclude_atrial_slices`).

A predicted cine is a label map ``(T, X, Y, Z)`` (time is the channel axis, as everywhere in trunet).
The post-processing keeps, per frame and per foreground class, one 3D connected component: a heart has one
LV cavity, one myocardium and one RV cavity per frame, so a blob of class ``k`` elsewhere (an atrium or
the aorta that looks like the LV cavity) is a false positive. Removed voxels become background (0), as in
MONAI's :class:`~monai.transforms.KeepLargestConnectedComponent` with ``independent=True``.

Which component is kept uses the whole cycle, not one frame: each component of frame ``t`` is scored by
its *temporal support*, the sum over its voxels of the number of frames that label the voxel ``k``. The
true LV cavity lies inside its ED extent in every frame, so its component is supported by all frames even
at end-systole, where it is small; a false blob that appears in a few frames is supported only by those.
For a single frame the score is the component's size, i.e. the classic largest component. (A per-frame
largest component keeps a large false blob over a small true end-systolic cavity, which is what this
replaces.)

Hand-written on :func:`scipy.ndimage.label` rather than MONAI's transform because (1) MONAI's CPU path needs
scikit-image, which is not a trunet dependency, and (2) for non-one-hot input it analyses channel 0 only,
i.e. it would clean frame 0 of a ``(T, X, Y, Z)`` cine and leave every other frame as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "probabilities_to_labels",
    "keep_largest_component",
    "keep_largest_components",
    "exclude_atrial_slices",
]

# Full (26-) connectivity in 3D, MONAI's default (``connectivity=None``): voxels touching at an edge or a
# corner belong together. On anisotropic cine MRI (thick slices) this keeps a structure whose slices are
# offset in-plane from one slice to the next in one piece.
_STRUCTURE_3D = ndimage.generate_binary_structure(3, 3)


def probabilities_to_labels(probabilities: torch.Tensor | np.ndarray, class_axis: int = 1) -> np.ndarray:
    """Arg-max over the class axis -> ``uint8`` labels.

    Args:
        probabilities: e.g. ``(T, K, X, Y, Z)`` probabilities (or logits) with ``class_axis=1``.
        class_axis: the axis holding the ``K`` classes (at most 256).

    Returns:
        ``uint8`` array with the class axis removed, e.g. ``(T, X, Y, Z)``. Ties go to the lower class
        (background where every class is 0, e.g. in padding restored by an inverse transform).
    """
    if isinstance(probabilities, torch.Tensor):
        return probabilities.argmax(dim=class_axis).to(torch.uint8).cpu().numpy()
    return np.asarray(probabilities).argmax(axis=class_axis).astype(np.uint8)


def keep_largest_component(mask: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """One 26-connected component of a 3D boolean ``mask`` ``(X, Y, Z)`` (all False if empty).

    Args:
        mask: the class's voxels in one frame.
        support: optional non-negative weights ``(X, Y, Z)``; the kept component is the one with the largest
            sum of ``support`` over its voxels (ties: the larger component). Without it, the largest one.
    """
    components, count = ndimage.label(mask, structure=_STRUCTURE_3D)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(components.ravel(), minlength=count + 1).astype(np.float64)
    sizes[0] = 0  # the background "component"
    if support is None:
        return components == int(sizes.argmax())
    scores = np.bincount(components.ravel(), weights=support.ravel().astype(np.float64), minlength=count + 1)
    scores[0] = -1.0
    best = np.flatnonzero(scores == scores.max())
    return components == int(best[np.argmax(sizes[best])])


def keep_largest_components(labels: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """Keep one connected component of each foreground class in every frame, chosen over the whole cycle.

    Args:
        labels: integer label map ``(T, X, Y, Z)``; a single frame ``(X, Y, Z)`` is accepted too.
        classes: label values to clean (default: every value present except 0). Voxels of these classes
            outside their kept component are set to 0; other values are left untouched.

    Returns:
        A new array of the same shape and dtype. Per frame and class the kept component is the one with the
        largest temporal support (see the module docstring); with one frame, the largest component.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3:
        return keep_largest_components(labels[None], classes)[0]
    if labels.ndim != 4:
        raise ValueError(f"labels must be (T, X, Y, Z) or (X, Y, Z), got shape {labels.shape}")
    out = labels.copy()
    values = [int(v) for v in np.unique(labels) if v != 0] if classes is None else [int(c) for c in classes]
    for value in values:
        masks = labels == value
        support = masks.sum(axis=0, dtype=np.int32)  # (X, Y, Z): frames labelling each voxel `value`
        for frame, mask in zip(out, masks):  # frames are separate 3D volumes; ndimage.label would join them
            if mask.any():
                frame[mask & ~keep_largest_component(mask, support)] = 0
    return out


_CROSS_2D = ndimage.generate_binary_structure(2, 1)  # the 4 in-plane neighbours of a pixel


def _enclosure(cavity: np.ndarray, frame_slice: np.ndarray, wall: int) -> float:
    """Fraction of the pixels just outside ``cavity`` ``(X, Y)`` (its 4-connected outer ring) that are
    ``wall``."""
    ring = ndimage.binary_dilation(cavity, _CROSS_2D) & ~cavity
    return float((frame_slice[ring] == wall).mean()) if ring.any() else 1.0


def exclude_atrial_slices(
    labels: np.ndarray, cavity: int, wall: int, min_enclosed: float = 0.5
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The basal-slice rule of CMR volumetry: at the base, cavity not enclosed by myocardium is atrium.

    In a short-axis stack the base moves towards the apex in systole, so the most basal slices show the LV
    at end-diastole and the left atrium at end-systole. The SCMR post-processing guideline (Schulz-Menger
    et al., JCMR 2020) counts a basal slice's blood pool as ventricle only where at least half of it is
    surrounded by myocardium; a network that labels that atrial blood LV over-estimates the end-systolic
    volume and under-estimates the ejection fraction. Per frame, the slices holding ``cavity`` are walked
    from the base inwards (the base is the end of the stack where the cavity is larger: the LV narrows
    towards the apex); a slice whose cavity's outer ring is less than ``min_enclosed`` ``wall`` is relabelled
    background, until the first slice that passes. Mid-ventricular and apical slices are never touched, nor
    other labels. A frame where more than half of the cavity slices would go is left as it is (a failed
    myocardium, not an atrium).

    Then through time (:func:`_bridge_atrial_frames`), for a cine of at least three frames: the base moves
    one way in systole and back in diastole, so the frames in which a basal slice shows atrium are one run
    around end-systole. Where a basal slice has no LV cavity (as segmented or after the step above) in a
    frame of late systole and in one of early diastole, the frames between them are atrium too, and their
    cavity there becomes background unless it is fully ringed (:data:`RINGED`). This takes the atrium that
    a network half rings with myocardium at end-systole, which the per-frame test keeps, when the frames
    just before and after it say "no ventricle here".

    Hand-written: neither MONAI nor SimpleITK implements this clinical convention.

    Args:
        labels: ``(T, X, Y, Z)`` integer labels, Z the slice axis (a single frame ``(X, Y, Z)`` too).
        cavity: the LV cavity's label value.
        wall: the LV myocardium's label value.
        min_enclosed: fraction of the cavity's outer ring that must be myocardium (SCMR: one half).

    Returns:
        ``(labels, removed)``: a new array of the same shape and dtype, and the relabelled ``(frame, slice)``
        pairs.
    """
    if not 0.0 < min_enclosed <= 1.0:
        raise ValueError(f"min_enclosed must be in (0, 1], got {min_enclosed}")
    labels = np.asarray(labels)
    if labels.ndim == 3:
        out, removed = exclude_atrial_slices(labels[None], cavity, wall, min_enclosed)
        return out[0], [(0, z) for _, z in removed]
    if labels.ndim != 4:
        raise ValueError(f"labels must be (T, X, Y, Z) or (X, Y, Z), got shape {labels.shape}")
    out = labels.copy()
    removed: list[tuple[int, int]] = []
    for t, frame in enumerate(out):
        inside = frame == cavity
        area = inside.sum(axis=(0, 1))
        slices = np.flatnonzero(area)
        if slices.size < 2:
            continue
        half = slices.size // 2
        from_base = slices if area[slices[:half]].sum() >= area[slices[-half:]].sum() else slices[::-1]
        atrial = []
        for z in from_base[:-1]:
            if _enclosure(inside[:, :, z], frame[:, :, z], wall) >= min_enclosed:
                break
            atrial.append(int(z))
        if not atrial or len(atrial) > half:
            continue
        for z in atrial:
            frame[:, :, z][inside[:, :, z]] = 0
        removed.extend((t, z) for z in atrial)
    removed.extend(_bridge_atrial_frames(out, cavity, wall))
    return out, sorted(removed)


RINGED = 0.9
"""Fraction of a cavity's outline that is myocardium from which :func:`_bridge_atrial_frames` leaves the
slice as ventricle whatever its neighbours in time say: a full ring is ventricle. The atrium a network half
rings at end-systole had 0.5-0.7 of its outline myocardium on the temporal benchmark's cines; true basal
slices near end-systole range from 0.5 to 1.0 there, so this spares only the fully ringed ones."""


def _bridge_atrial_frames(labels: np.ndarray, cavity: int, wall: int) -> list[tuple[int, int]]:
    """The time step of :func:`exclude_atrial_slices`, in place on ``labels`` ``(T, X, Y, Z)``.

    End-diastole is the frame with the largest cavity, end-systole the one with the smallest cavity in
    the apical half of the slices (the basal half is what this step may change). Per slice of the basal
    half of the end-diastolic cavity, the frames without cavity are found; if one lies in the second half
    of systole and one in the first half of diastole (cyclically, counted from end-diastole), the cavity
    of the frames between the two closest to end-systole becomes background, except in frames where it is
    at least :data:`RINGED` enclosed by myocardium. Outside those half-phases a missing cavity says nothing
    about the base's descent (a missed frame, a spoilt one), so nothing is bridged on it.

    Returns:
        The relabelled ``(frame, slice)`` pairs.
    """
    frames = labels.shape[0]
    if frames < 3:
        return []
    present = (labels == cavity).any(axis=(1, 2))  # (T, Z): slices holding cavity per frame
    ed = int((labels == cavity).sum(axis=(1, 2, 3)).argmax())
    area = (labels[ed] == cavity).sum(axis=(0, 1))
    slices = np.flatnonzero(area)
    half = slices.size // 2
    if half == 0:
        return []
    from_base = slices if area[slices[:half]].sum() >= area[slices[-half:]].sum() else slices[::-1]
    apical = (labels[:, :, :, from_base[half:]] == cavity).sum(axis=(1, 2, 3))
    systole = (int(apical.argmin()) - ed) % frames  # end-systole's phase: frames after end-diastole
    bridged: list[tuple[int, int]] = []
    for z in from_base[:half]:
        empty = [(t - ed) % frames for t in np.flatnonzero(~present[:, z])]
        before = [p for p in empty if systole / 2 <= p <= systole]
        after = [p for p in empty if systole <= p <= systole + (frames - systole) / 2]
        if not before or not after:
            continue
        for phase in range(max(before) + 1, min(after)):
            t = (ed + phase) % frames
            inside = labels[t, :, :, z] == cavity
            if _enclosure(inside, labels[t, :, :, z], wall) < RINGED:
                labels[t, :, :, z][inside] = 0
                bridged.append((t, int(z)))
    return bridged
