"""Post-processing of a predicted cine segmentation: probabilities -> labels -> largest components.

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

__all__ = ["probabilities_to_labels", "keep_largest_component", "keep_largest_components"]

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
