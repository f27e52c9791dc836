"""Pictures of a validation case for the dashboard, as uint8 RGB arrays (no W&B here; :mod:`tracking` logs them).

Validation runs at the training resolution, where a whole case is a few dozen pixels across (39 x 39 on
the demo): logged as is, a dashboard shows a smudge. Everything here is upsampled by an integer factor with
nearest-neighbour repetition (:func:`upsample`), so a label pixel stays one colour and no class is blended
into another, to at least ``MIN_LONG_SIDE`` = 256 pixels on the long side of each panel:

* :func:`compare_panels` -- one slice over time, prediction (left) beside reference (right), the frames of a
  cine GIF;
* :func:`montage` -- every slice at ED and ES, rows ED prediction, ED reference, ES prediction, ES reference,
  columns the slices in order;
* :func:`volume_curve` -- the LV and RV volume curves, predicted and reference, as a small plot.

Arrays are ``(T, X, Y, Z)`` as everywhere in trunet; a slice is shown with rows = y and columns = x.
Reference frames that are not labelled (``ignore_index``) show the image without colours.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["MIN_LONG_SIDE", "upsample", "upsample_factor", "to_uint8", "overlay", "compare_panels", "montage",
           "volume_curve"]

MIN_LONG_SIDE = 256
MONTAGE_TILE = 96  # minimum long side of one montage tile (pixels)

# RGB colours of classes 1.. (background is transparent): RV blue, MYO green, LV red, then others.
PALETTE = np.array(
    [[0, 114, 255], [0, 200, 80], [230, 40, 40], [255, 200, 0], [200, 0, 200], [0, 200, 200]],
    dtype=np.float32,
)


def upsample_factor(shape: Sequence[int], min_long_side: int = MIN_LONG_SIDE) -> int:
    """The smallest integer factor that brings the long side of a 2D ``shape`` to ``min_long_side``."""
    return max(1, math.ceil(min_long_side / max(1, max(int(s) for s in shape[-2:]))))


def upsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of the last two axes by repetition (labels stay labels)."""
    return np.repeat(np.repeat(np.asarray(array), factor, axis=-2), factor, axis=-1)


def to_uint8(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Intensities to 0..255 by the 1st-99th percentile window (or ``window``), robust to outliers."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = window if window is not None else (np.percentile(image, [1.0, 99.0]) if image.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((image - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay(grey: np.ndarray, seg: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Class colours over grey pixels: ``(..., H, W)`` uint8 + integer labels -> ``(..., H, W, 3)`` uint8.
    Label 0 and values without a colour slot beyond the classes (e.g. 255, unlabelled) stay grey."""
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=-1)
    seg = np.asarray(seg)
    for value in np.unique(seg):
        if value <= 0 or value == 255:
            continue
        colour = PALETTE[(int(value) - 1) % len(PALETTE)]
        where = seg == value
        rgb[where] = (1.0 - alpha) * rgb[where] + alpha * colour
    return rgb.clip(0, 255).astype(np.uint8)


def _slices(image: np.ndarray, z: int) -> np.ndarray:
    """``(T, X, Y, Z)`` -> ``(T, Y, X)``: one slice over time, rows = y."""
    return np.asarray(image)[:, :, :, z].transpose(0, 2, 1)


def compare_panels(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, z: int,
                   min_long_side: int = MIN_LONG_SIDE, gap: int = 4) -> np.ndarray:
    """Slice ``z`` over time, prediction beside reference, each panel upsampled to ``min_long_side``.

    Args:
        image, pred, label: ``(T, X, Y, Z)`` (``label`` may be None: the right panel is then the bare image).

    Returns:
        ``(T, H, 2 W + gap, 3)`` uint8 with ``max(H, W) >= min_long_side``.
    """
    grey_all = _slices(image, z)
    f = upsample_factor(grey_all.shape, min_long_side)
    grey = upsample(to_uint8(grey_all), f)
    left = overlay(grey, upsample(_slices(pred, z), f))
    right = overlay(grey, upsample(_slices(label, z), f)) if label is not None else overlay(grey, np.zeros_like(grey))
    sep = np.full(left.shape[:2] + (gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, sep, right], axis=2)


def _label_tile(tile: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(tile)
    ImageDraw.Draw(img).text((3, 2), text, fill=(255, 255, 0))
    return np.asarray(img)


def montage(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, frames: Mapping[str, int],
            min_tile: int = MONTAGE_TILE, gap: int = 2) -> np.ndarray:
    """Every slice at the named frames (e.g. ``{"ED": 0, "ES": 9}``): per frame a row of predictions and a
    row of references, one column per slice, tiles upsampled (nearest) to ``min_tile`` on the long side.

    Returns:
        ``(rows * (h + gap), Z * (w + gap), 3)`` uint8, rows in the order of ``frames`` (prediction first).
    """
    image = np.asarray(image)
    t_all = [int(t) for t in frames.values()]
    window = tuple(np.percentile(image[t_all], [1.0, 99.0]))  # one window for every tile
    f = upsample_factor(image.shape[1:3], min_tile)
    rows = []
    for name, t in frames.items():
        grey = upsample(to_uint8(image[t].transpose(2, 1, 0), window), f)  # (Z, h, w)
        sources = [("pred", pred)] + ([("ref", label)] if label is not None else [])
        for what, seg in sources:
            tiles = overlay(grey, upsample(np.asarray(seg)[t].transpose(2, 1, 0), f))  # (Z, h, w, 3)
            tiles = [_label_tile(tile, f"{name} {what} z{k}") for k, tile in enumerate(tiles)]
            pad = [np.pad(tile, ((0, gap), (0, gap), (0, 0)), constant_values=255) for tile in tiles]
            rows.append(np.concatenate(pad, axis=1))
    return np.concatenate(rows, axis=0)


def volume_curve(pred_ml: np.ndarray, ref_ml: np.ndarray, classes: Sequence[str], title: str) -> np.ndarray:
    """LV and RV volume curves over the frames, prediction (line) and reference (dots, labelled frames).

    Args:
        pred_ml, ref_ml: ``(T, K)`` volumes in ml (``ref_ml`` NaN on unlabelled frames).

    Returns:
        a 400 x 240 RGB plot as uint8 ``(240, 400, 3)``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.0, 2.4), dpi=100)
    try:
        frames = np.arange(len(pred_ml))
        for name in ("LV", "RV"):
            if name not in classes:
                continue
            k = list(classes).index(name)
            colour = PALETTE[(k - 1) % len(PALETTE)] / 255.0
            ax.plot(frames, pred_ml[:, k], "-", color=colour, label=f"{name} pred")
            ax.plot(frames, ref_ml[:, k], "o", color=colour, markersize=4, label=f"{name} ref")
        ax.set_xlabel("frame")
        ax.set_ylabel("ml")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)
