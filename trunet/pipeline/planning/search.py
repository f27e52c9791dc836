"""The planner: the largest patch, time window and batch that fit a VRAM budget.

Patch candidates keep the aspect ratio of the target spacing (equal physical extent per axis, i.e.
``size_i ~ 1 / spacing_i``), are multiples of ``model.size_divisor`` and are capped by the dataset's
median shape at the target spacing, rounded down to a multiple. With a dataset on disk (``data.root``)
the image headers give the median shape, spacing and the shortest cine; without one (the phantom, or no
data) the ACDC-typical median shape 256 x 216 x 10 at 1.5 x 1.5 x 10 mm and cines of at least 12 frames
are assumed. Time windows 4..16, capped by the shortest cine (a longer window would repeat frames).
Batch 2 (nnU-Net's minimum) unless nothing fits; a larger batch only when patch and time window are both
at their caps. The choice maximises the voxels of one training sample ``T * V``, then more frames, then
more voxels, among patches covering at least half the median in-plane field of view when any does.

Example::

    >>> from trunet.config import config_from_dict
    >>> config = config_from_dict({"model": {"channels": [4, 8], "strides": [[2, 2, 1]],
    ...                                      "clstm_levels": "bottleneck"},
    ...                            "train": {"patch_size": [16, 16, 4]}})
    >>> result = plan(config, vram_gb=2.0)
    >>> result.chosen.fits and result.estimate.total <= result.budget
    True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from trunet.config import Config
from trunet.data.cases import resolve_cases
from trunet.errors import TrunetError
from trunet.pipeline.planning.memory import GB, MemoryEstimate, estimate_memory

__all__ = ["PlanCandidate", "PlanResult", "patch_ladder", "plan", "ACDC_MEDIAN_SHAPE", "ACDC_SPACING"]

logger = logging.getLogger(__name__)


ACDC_MEDIAN_SHAPE = (256, 216, 10)
"""ACDC-typical median shape (x, y, z) at :data:`ACDC_SPACING`, used when no dataset is on disk."""
ACDC_SPACING = (1.5, 1.5, 10.0)
ACDC_MIN_FRAMES = 12
"""ACDC cines have 12 to 35 frames: windows are capped at the shortest cine so that none repeats a frame."""
TIME_WINDOWS = tuple(range(4, 17))
"""Time-window candidates of the planner, capped by the dataset's shortest cine."""
MIN_BATCH = 2
"""nnU-Net's minimum batch: the planner only goes below when nothing fits."""
MIN_FOV_FRACTION = 0.5
"""Prefer patches covering at least this fraction of the median in-plane extent."""


@dataclass(frozen=True)
class PlanCandidate:
    """One evaluated (patch, time window, batch) and its estimated peak in bytes."""

    patch_size: tuple[int, int, int]
    time_window: int
    batch_size: int
    total: int
    fits: bool

    @property
    def sample_voxels(self) -> int:
        return self.time_window * math.prod(self.patch_size)


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer.

    Attributes:
        chosen: the chosen candidate.
        estimate: its full :class:`MemoryEstimate`.
        budget: usable bytes ``vram_gb * (1 - headroom) * 1e9``.
        candidates: per time window, the largest fitting patch and the next larger one (which does not
            fit); at the caps, the batch sizes tried.
        ladder: the patch sizes searched, smallest first.
        median_shape / spacing / time_windows / shape_source: the caps, the windows searched, and where
            the caps came from.
    """

    chosen: PlanCandidate
    estimate: MemoryEstimate
    budget: int
    candidates: list[PlanCandidate]
    ladder: list[tuple[int, int, int]]
    median_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    time_windows: list[int]
    shape_source: str

    def fragment(self) -> dict[str, Any]:
        """The chosen values as a config fragment ``{"train": {...}}``."""
        c = self.chosen
        return {"train": {"patch_size": list(c.patch_size), "time_window": c.time_window,
                          "batch_size": c.batch_size}}


def patch_ladder(
    divisor: Sequence[int], spacing: Sequence[float], cap: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Patch sizes of growing physical extent with the aspect ratio of ``spacing``, multiples of ``divisor``.

    The extent grows by one divisor step on the axis of finest spacing; every axis is ``round(extent /
    spacing)`` to the nearest multiple of its divisor (at least one divisor), capped by ``cap`` rounded
    down to a multiple (at least one divisor). Distinct sizes, smallest first, ending at the cap.
    """
    div = [int(d) for d in divisor]
    caps = [max(d, (int(c) // d) * d) for c, d in zip(cap, div)]
    fine = int(np.argmin(spacing))
    sizes: list[tuple[int, int, int]] = []
    k = 1
    while True:
        extent = k * div[fine] * spacing[fine]
        size = tuple(min(c, max(d, int(round(extent / s / d)) * d)) for s, d, c in zip(spacing, div, caps))
        if not sizes or size != sizes[-1]:
            if sizes and any(a < b for a, b in zip(size, sizes[-1])):
                raise AssertionError("patch ladder must grow")  # a bug, not a user error
            sizes.append(size)  # type: ignore[arg-type]
        if list(size) == caps:
            return sizes
        k += 1


def _dataset_shape(config: Config) -> tuple[tuple[int, int, int], tuple[float, float, float], int, str]:
    """Median shape at the target spacing, the target spacing, the fewest frames of a cine, and where they
    came from.

    With a dataset on disk (``data.root``), the NIfTI/ITK headers of the training images give the median
    shape and spacing and the frame counts; otherwise (phantom, missing or unreadable data) the
    ACDC-typical figures.
    """
    target = config.data.target_spacing
    if config.data.root is not None:
        try:
            return _headers_median(config, target)
        except Exception as exc:  # noqa: BLE001 - planning falls back to typical figures, and says so
            logger.warning("could not read the dataset's image headers (%s); using the ACDC-typical median "
                           "shape %s at %s mm", exc, ACDC_MEDIAN_SHAPE, ACDC_SPACING)
    spacing = tuple(target) if target is not None else ACDC_SPACING
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(ACDC_MEDIAN_SHAPE, ACDC_SPACING, spacing))
    source = (f"ACDC-typical median shape 256x216x10 at 1.5x1.5x10 mm, cines of {ACDC_MIN_FRAMES} or more "
              "frames (no dataset on disk)")
    return shape, spacing, ACDC_MIN_FRAMES, source  # type: ignore[return-value]


def _headers_median(
    config: Config, target: Optional[Sequence[float]]
) -> tuple[tuple[int, int, int], tuple[float, float, float], int, str]:
    import tempfile

    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as work:
        lists = resolve_cases(config.data, Path(work))
        cases = [*lists.training, *lists.validation]
    shapes, spacings, frames = [], [], []
    for case in cases:
        path = Path(case["image"])
        if path.is_dir():
            raise TrunetError(f"{path}: frame folders are not read for planning")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shapes.append(reader.GetSize()[:3])
        spacings.append(reader.GetSpacing()[:3])
        frames.append(reader.GetSize()[3] if len(reader.GetSize()) > 3 else 1)
    if not shapes:
        raise TrunetError("no training images")
    median_spacing = tuple(float(x) for x in np.median(np.array(spacings), axis=0))
    spacing = tuple(target) if target is not None else median_spacing
    physical = np.median(np.array(shapes) * np.array(spacings), axis=0)
    shape = tuple(max(1, int(round(p / s))) for p, s in zip(physical, spacing))
    source = f"median of {len(shapes)} images in {config.data.root}, shortest cine {min(frames)} frames"
    return shape, spacing, min(frames), source  # type: ignore[return-value]


def check_budget(vram_gb: float, headroom: float) -> int:
    if not isinstance(vram_gb, (int, float)) or not math.isfinite(vram_gb) or vram_gb <= 0:
        raise TrunetError(f"--vram-gb must be a positive number of GB, got {vram_gb}")
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise TrunetError(f"--headroom must be a fraction in [0, 1), got {headroom}")
    return int(vram_gb * (1 - headroom) * GB)


def plan(
    config: Config, vram_gb: float = 40.0, headroom: float = 0.1, device_type: str = "cuda"
) -> PlanResult:
    """Choose patch size, time window and batch size for ``vram_gb * (1 - headroom)`` (module docstring).

    Raises:
        TrunetError: a budget <= 0, a headroom outside [0, 1), or a budget too small for the smallest
            candidate (one divisor-sized patch, the shortest time window, batch 1).
    """
    budget = check_budget(vram_gb, headroom)
    shape, spacing, max_frames, source = _dataset_shape(config)
    ladder = patch_ladder(config.model.size_divisor, spacing, shape)
    windows = [t for t in TIME_WINDOWS if t <= max_frames] or [max(1, max_frames)]

    def total(patch: tuple[int, int, int], frames: int, batch: int) -> int:
        return estimate_memory(config, patch, frames, batch, device_type=device_type).total

    def largest_patch(frames: int, batch: int) -> int:
        """Index in ``ladder`` of the largest patch that fits, -1 if none (totals grow along the ladder)."""
        lo, hi = -1, len(ladder) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if total(ladder[mid], frames, batch) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    smallest = total(ladder[0], windows[0], 1)
    if smallest > budget:
        raise TrunetError(
            f"a budget of {vram_gb:g} GB with headroom {headroom:g} ({budget / GB:.2f} GB usable) is too "
            f"small for the smallest candidate (patch {list(ladder[0])}, time window {windows[0]}, batch 1: "
            f"{smallest / GB:.2f} GB); lower the model size or raise the budget"
        )
    min_inplane = MIN_FOV_FRACTION * MIN_FOV_FRACTION * shape[0] * shape[1]
    batch = MIN_BATCH if total(ladder[0], windows[0], MIN_BATCH) <= budget else 1
    candidates: list[PlanCandidate] = []
    best: Optional[tuple[tuple, PlanCandidate]] = None
    for frames in windows:
        i = largest_patch(frames, batch)
        if i < 0:
            continue
        patch = ladder[i]
        chosen = PlanCandidate(patch, frames, batch, total(patch, frames, batch), True)
        candidates.append(chosen)
        if i + 1 < len(ladder):
            nxt = ladder[i + 1]
            candidates.append(PlanCandidate(nxt, frames, batch, total(nxt, frames, batch), False))
        wide = patch[0] * patch[1] >= min_inplane
        score = (wide, chosen.sample_voxels, frames, math.prod(patch))
        if best is None or score > best[0]:
            best = (score, chosen)
    assert best is not None  # the smallest candidate fits
    chosen = best[1]
    if chosen.patch_size == ladder[-1] and chosen.time_window == windows[-1]:
        # patch and window at their caps: spend what is left on the batch (as nnU-Net does)
        b = chosen.batch_size
        while total(chosen.patch_size, chosen.time_window, b + 1) <= budget:
            b += 1
        if b != chosen.batch_size:
            chosen = PlanCandidate(chosen.patch_size, chosen.time_window, b,
                                   total(chosen.patch_size, chosen.time_window, b), True)
            candidates.append(chosen)
        candidates.append(PlanCandidate(chosen.patch_size, chosen.time_window, b + 1,
                                        total(chosen.patch_size, chosen.time_window, b + 1), False))
    estimate = estimate_memory(config, chosen.patch_size, chosen.time_window, chosen.batch_size, device_type)
    return PlanResult(chosen, estimate, budget, candidates, ladder, shape, spacing,  # type: ignore[arg-type]
                      windows, source)
