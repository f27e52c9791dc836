"""Tiny synthetic cines for the data tests (not a test module): 4D NIfTI with oblique affines and bad inputs.

Volumes are ``(x, y, z, t) = (24, 20, 4, 5)`` by default so a whole test file runs in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

SHAPE = (24, 20, 4, 5)


def oblique_affine(spacing=(1.5, 1.6, 8.0), angles=(0.3, -0.2, 0.7), origin=(-20.0, 13.0, 7.5)) -> np.ndarray:
    """A rotated (non-axis-aligned) voxel -> world affine with the given spacing."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rx @ ry @ rz @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def make_label(shape=SHAPE) -> np.ndarray:
    """uint8 ``(x, y, z, t)``: LV cavity (3) in a myocardial ring (2), RV (1) beside it; the LV shrinks."""
    x, y, z, t = shape
    xx, yy = np.meshgrid(np.arange(x), np.arange(y), indexing="ij")
    out = np.zeros(shape, dtype=np.uint8)
    cx, cy = x * 0.55, y * 0.5
    for k in range(t):
        r = 4.0 - 1.5 * math.sin(math.pi * k / max(t - 1, 1))
        d = np.hypot(xx - cx, yy - cy)
        rv = np.hypot(xx - (cx - 7), (yy - cy) / 1.5) < 3
        frame = np.zeros((x, y), np.uint8)
        frame[rv] = 1
        frame[(d >= r) & (d < r + 2)] = 2
        frame[d < r] = 3
        out[:, :, 1: z - 1 if z > 2 else z, k] = frame[:, :, None]
    return out


def make_image(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """float32 ``(x, y, z, t)``: bright blood, dark myocardium, noise."""
    rng = np.random.default_rng(seed)
    img = 100.0 + 20.0 * rng.standard_normal(label.shape)
    img[label == 1] += 300
    img[label == 3] += 350
    img[label == 2] -= 50
    return img.astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, time_step: Optional[float] = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "msec")
    if time_step is not None and data.ndim == 4:
        zooms = list(img.header.get_zooms())
        zooms[3] = time_step
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_case(folder: Path, name: str = "case0", shape=SHAPE, affine: Optional[np.ndarray] = None,
               time_step: float = 33.0, seed: int = 0) -> dict:
    """Write ``name.nii.gz`` and ``name_gt.nii.gz``; return a case record (dense label, all frames)."""
    affine = oblique_affine() if affine is None else affine
    label = make_label(shape)
    image = make_image(label, seed)
    img_path = write_nifti(folder / f"{name}.nii.gz", image, affine, time_step)
    lab_path = write_nifti(folder / f"{name}_gt.nii.gz", label, affine, time_step)
    return {"case_id": name, "image": str(img_path), "label": str(lab_path), "frames": None, "ed": 0, "es": 2}
