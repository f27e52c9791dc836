"""Synthetic short-axis cardiac cine MRI with dense labels: the built-in data set of trunet.

A case is simulated from an analytic heart, not drawn: the left-ventricular (LV) cavity and epicardium
are truncated prolate ellipsoids (base plane near the equator, apex fixed in space), the right ventricle
(RV) is a crescent wrapped around the septal side of the LV, and a full heartbeat ED -> ES -> ED scales
them about the apex. Per frame:

* the LV cavity volume follows ``V(t) = V_ed * (1 - EF * f(t))`` where ``f`` is the contraction curve of
  :func:`contraction_curve` (raised-cosine systole, rapid early filling, diastasis, atrial kick);
* the long axis shortens (the base descends towards the apex) and the cavity narrows so that the
  volume is exact for the analytic shape;
* the epicardium is scaled so that the myocardial volume is conserved, hence the wall thickens when the
  cavity shrinks;
* the RV crescent thins with its own ejection fraction.

Appearance (what a model has to see through): bright blood with flow inhomogeneity, dark myocardium
with papillary muscles inside the LV cavity, a textured body with lungs, liver, subcutaneous and
epicardial fat, aorta and atria (bright but unlabelled), per-slice misalignment and gain, a smooth
multiplicative coil bias field, partial volume (analytic in-plane edge coverage, three sub-slices
through the slice thickness), Rician noise, and now and then one frame degraded by motion ghosting or
blur. Labels (ACDC values: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity) come from the same
geometry, evaluated at the voxel centres.

Every random draw of case ``index`` comes from ``numpy.random.default_rng([seed, index])``, so a case
does not depend on how many cases are generated or in which order.

:func:`simulate_case` returns the arrays in memory; :func:`write_phantom_dataset` writes cases in the
ACDC layout plus a ``datalist.json`` (through :mod:`trunet.io`'s NIfTI writer).

Why one module of ~780 lines: the anatomy, the appearance model and the writer share one private parameter
record per case (``_Params``) and its draws from one RNG stream; split into modules they would need that
record as a public interface that nothing else in trunet uses, and the order of the draws, which fixes
every case of a seed, would span files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from trunet.atomic import write_json, write_text
from trunet.errors import DataError, TrunetError
from trunet.data.phantom_dicom import write_dicom_cine
from trunet.io import CineMeta, NiftiIO

__all__ = [
    "PhantomCase",
    "contraction_curve",
    "simulate_case",
    "write_case",
    "write_phantom_dataset",
    "case_id",
]

logger = logging.getLogger(__name__)

#: ACDC label values.
BACKGROUND, RV, MYO, LV = 0, 1, 2, 3
_SUBSLICES = (-1.0 / 3.0, 0.0, 1.0 / 3.0)  # sub-slice offsets (in slice thicknesses) for through-plane partial volume
_OUTSIDE = -1e3  # radius (mm) used for "structure absent at this level": no voxel is within it


@dataclass
class PhantomCase:
    """One simulated cine with its dense labels.

    Attributes:
        image: float32 ``(X, Y, Z, T)``, the values stored on disk (integers of the int16 file).
        label: uint8 ``(X, Y, Z, T)``, 0 background, 1 RV, 2 MYO, 3 LV.
        affine: 4x4 voxel -> world (mm) matrix; columns 0-2 have lengths ``spacing``.
        spacing: (sx, sy, sz) in mm; z is the slice axis.
        time_step_ms: time between frames in ms.
        ed, es: 0-based end-diastolic and end-systolic frames (``ed`` is always 0, as in ACDC).
        group: pathology group the parameters were drawn for (ACDC names: NOR, DCM, HCM, MINF, RV).
        height_cm, weight_kg: patient metadata written to ``Info.cfg``.
        ef_target, rv_ef_target: the ejection fractions the simulation was asked for (the label-derived
            values differ slightly through discretisation).
        degraded_frame: 0-based index of the frame with a motion artefact, or None.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    time_step_ms: float
    ed: int
    es: int
    group: str
    height_cm: float
    weight_kg: float
    ef_target: float
    rv_ef_target: float
    degraded_frame: int | None = None


def case_id(index: int) -> str:
    """ACDC-style id of the 0-based case ``index``: ``patient001`` for 0."""
    return f"patient{index + 1:03d}"


def contraction_curve(
    n_frames: int, es: int, early_fill: float = 0.45, atrial_kick: float = 0.2
) -> np.ndarray:
    """Fraction of the stroke volume ejected at each frame of one heartbeat, ``(T,)`` in [0, 1].

    0 at frame 0 (ED) and 1 at ``es`` (ES). Systole is a raised cosine over frames ``0..es``; diastole
    (``es..T``, slower) has a rapid early filling phase over the first ``early_fill`` of it, a flat
    diastasis, then the atrial kick (the last ``atrial_kick`` of the volume) over its final fifth. The
    curve rises strictly to ES and never rises after it, so the volume has a single minimum, at ES.
    """
    if not 0 < es < n_frames:
        raise ValueError(f"ES frame {es} outside 1..{n_frames - 1}")
    x = np.arange(n_frames, dtype=np.float64)
    f = np.empty(n_frames)
    sys = x <= es
    f[sys] = 0.5 * (1.0 - np.cos(np.pi * x[sys] / es))
    y = (x[~sys] - es) / (n_frames - es)  # diastole phase in [0, 1)
    early = 0.5 * (1.0 - np.cos(np.pi * np.clip(y / early_fill, 0.0, 1.0)))
    kick = 0.5 * (1.0 - np.cos(np.pi * np.clip((y - 0.8) / 0.2, 0.0, 1.0)))
    f[~sys] = 1.0 - ((1.0 - atrial_kick) * early + atrial_kick * kick)
    return f


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------

#: pathology group -> (LV EF range, ED endocardial radius range mm, wall thickness range mm, RV EF range)
_GROUPS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "NOR": ((0.55, 0.66), (24.0, 29.0), (7.0, 10.0), (0.45, 0.62)),
    "DCM": ((0.34, 0.42), (30.0, 36.0), (6.0, 8.5), (0.35, 0.55)),
    "HCM": ((0.60, 0.66), (21.0, 26.0), (12.0, 17.0), (0.50, 0.65)),
    "MINF": ((0.35, 0.48), (27.0, 33.0), (6.5, 9.5), (0.38, 0.55)),
    "RV": ((0.50, 0.64), (23.0, 28.0), (7.0, 10.0), (0.25, 0.40)),
}


@dataclass
class _Params:
    """Everything drawn for one case (lengths in mm, angles in radians)."""

    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    time_step_ms: float
    es: int
    early_fill: float
    atrial_kick: float
    group: str
    ef: float
    rv_ef: float
    height_cm: float
    weight_kg: float
    # LV geometry at ED
    center: np.ndarray  # (2,) in-plane heart centre, image-centred mm
    tilt: np.ndarray  # (2,) in-plane drift of the centre per mm along z (long axis not perpendicular)
    slice_jitter: np.ndarray  # (Z, 2) per-slice misalignment (breath-hold), mm
    theta: float  # in-plane rotation of the heart frame
    r_endo: float
    r_epi: float
    l_endo: float
    l_epi: float
    zc: float  # ellipsoid centre along z
    z_base: float
    shortening: float  # longitudinal shortening at ES (fraction of the long axis)
    endo_shape: tuple[float, ...]  # ellipticity, orientation, k3 amp, k3 phase, k4 amp, k4 phase
    epi_shape: tuple[float, ...]
    min_wall: float
    # RV
    rv_width: float  # crescent thickness at the base, ED
    rv_back: float  # how far the RV ellipse reaches behind the LV centre, in LV epicardial radii
    rv_breadth: float  # RV half-width across the septum, in LV epicardial radii
    rv_angle: float
    rv_tilt: float
    rv_length: float  # RV long axis as a fraction of the LV epicardial one
    rv_wall: float
    # appearance
    blood: float
    rv_blood: float
    myo: float
    tissue: float
    fat: float
    liver: float
    lung: float
    noise: float
    gain: float
    papillary: tuple[float, float, float, float]  # angle 1, angle 2, radius, depth fraction
    artefact: str | None
    artefact_frame: int | None
    artefact_strength: float
    atria: tuple[tuple[float, float, float, float], ...]  # (u, v, a, b) of left and right atrium
    infarct: tuple[float, float, float] | None  # MINF: akinetic thinned sector (angle, half-width, bulge)
    ef_drive: float = 0.5  # the EF the analytic cavity is scaled for; set by _calibrate
    rv_drive: float = 0.3  # RV crescent shrink at ES; set by _calibrate


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _draw_params(rng: np.random.Generator, inplane_scale: float, max_frames: int | None) -> _Params:
    """Draw one patient. The order and number of draws do not depend on the size arguments."""
    spacing_xy = _u(rng, 1.2, 1.8)
    nz = int(rng.integers(8, 15))
    dz = _u(rng, 6.0, 10.0)
    nt = int(rng.integers(15, 31))
    fov = (_u(rng, 180.0, 240.0), _u(rng, 180.0, 240.0))
    heart_rate = _u(rng, 55.0, 90.0)
    es_frac = _u(rng, 0.34, 0.44)
    early_fill, atrial_kick = _u(rng, 0.35, 0.55), _u(rng, 0.12, 0.28)

    group = str(rng.choice(list(_GROUPS)))
    ef_rng, r_rng, wall_rng, rv_ef_rng = _GROUPS[group]
    ef, rv_ef = _u(rng, *ef_rng), _u(rng, *rv_ef_rng)
    r_endo, wall = _u(rng, *r_rng), _u(rng, *wall_rng)
    height = round(_u(rng, 150.0, 195.0), 1)
    weight = round(_u(rng, 48.0, 110.0), 1)

    # long axis: the stack covers the heart from just above the base to around the apex
    coverage = nz * dz
    apex_wall = _u(rng, 0.6, 0.9) * wall
    h = _u(rng, -0.3, 0.0)  # base plane position on the ellipsoid (0 = equator, <0 towards the base)
    heart_len = float(np.clip(_u(rng, 0.72, 0.98) * coverage, 55.0, 115.0))
    l_endo = (heart_len - apex_wall) / (1.0 - h)
    z_base = _u(rng, 0.2, 1.1) * dz - 0.5 * dz  # base plane in slice-centre coordinates (slice k at k*dz)
    zc = z_base - h * l_endo

    spacing_xy_eff = spacing_xy * inplane_scale
    shape_xy = [max(16, min(160, int(round(f / spacing_xy_eff)))) for f in fov]
    if max_frames is not None:
        nt = max(4, min(nt, max_frames))
    es = int(np.clip(round(es_frac * nt), math.ceil(nt / 3), (2 * nt) // 3))

    half_fov = np.array(shape_xy) * spacing_xy_eff / 2.0
    center = rng.uniform(-0.12, 0.12, 2) * 2 * half_fov
    # keep the heart (plus RV) inside the field of view
    margin = r_endo + wall + 30.0
    center = np.clip(center, -half_fov + margin, half_fov - margin) if np.all(half_fov > margin) else center * 0
    tilt = rng.normal(0.0, 0.08, 2)
    slice_jitter = rng.normal(0.0, 1.0, (15, 2))[:nz]

    def shape_draw(ell_max: float, harm_max: float) -> tuple[float, ...]:
        return (
            _u(rng, 0.0, ell_max), _u(rng, 0.0, np.pi),
            _u(rng, 0.0, harm_max), _u(rng, 0.0, 2 * np.pi),
            _u(rng, 0.0, harm_max * 0.6), _u(rng, 0.0, 2 * np.pi),
        )

    endo_shape = shape_draw(0.12, 0.05)
    epi_shape = shape_draw(0.08, 0.03)

    # an infarcted sector (used for MINF): thinned by a third and akinetic in the radial direction
    infarct = (_u(rng, 0.0, 2 * np.pi), _u(rng, 0.5, 0.9), 0.35 * wall / r_endo)
    blood = _u(rng, 0.85, 1.0)
    art_roll = rng.uniform()
    art_kind = "ghost" if rng.uniform() < 0.5 else "blur"
    art_frame_u = rng.uniform()
    art_strength = _u(rng, 0.5, 1.0)
    artefact = art_kind if art_roll < 0.25 else None
    artefact_frame = None
    if artefact is not None:
        candidates = [t for t in range(nt) if t not in (0, es)]
        artefact_frame = candidates[int(art_frame_u * len(candidates))]

    return _Params(
        shape=(shape_xy[0], shape_xy[1], nz, nt),
        spacing=(spacing_xy_eff, spacing_xy_eff, dz),
        time_step_ms=60000.0 / heart_rate / nt,
        es=es, early_fill=early_fill, atrial_kick=atrial_kick,
        group=group, ef=ef, rv_ef=rv_ef, height_cm=height, weight_kg=weight,
        center=center, tilt=tilt, slice_jitter=slice_jitter,
        theta=_u(rng, 0.0, 2 * np.pi),
        r_endo=r_endo, r_epi=r_endo + wall, l_endo=l_endo, l_epi=l_endo + apex_wall,
        zc=zc, z_base=z_base,
        shortening=_u(rng, 0.05, 0.11),
        endo_shape=endo_shape, epi_shape=epi_shape, min_wall=0.5 * wall,
        rv_width=_u(rng, 12.0, 26.0) * (1.3 if group == "RV" else 1.0),
        rv_back=_u(rng, 0.15, 0.55),
        rv_breadth=_u(rng, 1.05, 1.35) * (1.15 if group == "RV" else 1.0),
        rv_angle=_u(rng, -0.35, 0.35),
        rv_tilt=_u(rng, -0.3, 0.3),
        rv_length=_u(rng, 0.65, 0.85),
        rv_wall=_u(rng, 2.5, 4.0),
        blood=blood,
        rv_blood=blood * _u(rng, 0.85, 1.0),
        myo=_u(rng, 0.2, 0.32),
        tissue=_u(rng, 0.25, 0.4),
        fat=_u(rng, 0.7, 0.95),
        liver=_u(rng, 0.38, 0.55),
        lung=_u(rng, 0.03, 0.09),
        noise=_u(rng, 0.03, 0.07),
        gain=_u(rng, 400.0, 1500.0),
        papillary=(np.pi + _u(rng, 0.4, 0.9), np.pi - _u(rng, 0.4, 0.9), _u(rng, 2.5, 4.5), _u(rng, 0.6, 0.75)),
        artefact=artefact, artefact_frame=artefact_frame, artefact_strength=art_strength,
        atria=(
            (_u(rng, -15.0, -5.0), _u(rng, -15.0, 0.0), _u(rng, 0.7, 0.95) * r_endo + 8, _u(rng, 0.6, 0.85) * r_endo + 8),
            (r_endo + wall + _u(rng, 5.0, 15.0), _u(rng, -10.0, 10.0), _u(rng, 15.0, 25.0), _u(rng, 15.0, 25.0)),
        ),
        infarct=infarct if group == "MINF" else None,
    )


def _truncated_ellipsoid_volume(radius: float, length: float, h: float) -> float:
    """Volume of ``{|w| <= 1, w >= h}`` of an ellipsoid with equal in-plane radii ``radius`` and semi-axis
    ``length`` (w = z / length): ``pi r^2 L (2/3 - h + h^3 / 3)``. The shape harmonics change the area by
    a common factor, which cancels in the ratios used here."""
    return math.pi * radius**2 * length * (2.0 / 3.0 - h + h**3 / 3.0)


@dataclass
class _Motion:
    """Per-frame geometry, arrays of shape ``(T,)``."""

    f: np.ndarray  # contraction fraction
    zc: np.ndarray
    z_base: np.ndarray
    l_endo: np.ndarray
    l_epi: np.ndarray
    r_endo: np.ndarray
    r_epi: np.ndarray
    rv_scale: np.ndarray
    k_r: np.ndarray  # radial scale of the cavity relative to ED


def _motion(p: _Params) -> _Motion:
    """Scale the ED heart about the fixed epicardial apex so that the cavity volume follows the curve and
    the myocardial volume is conserved."""
    nt = p.shape[3]
    f = contraction_curve(nt, p.es, p.early_fill, p.atrial_kick)
    z_fix = p.zc + p.l_epi
    k_l = 1.0 - p.shortening * f
    k_r = np.sqrt((1.0 - p.ef_drive * f) / k_l)  # k_r^2 k_l = V(t) / V_ed
    h_endo = (p.z_base - p.zc) / p.l_endo
    h_epi = (p.z_base - p.zc) / p.l_epi
    v_cav = _truncated_ellipsoid_volume(p.r_endo, p.l_endo, h_endo)
    v_epi = _truncated_ellipsoid_volume(p.r_epi, p.l_epi, h_epi)
    k_e = np.sqrt(((v_epi - v_cav) / k_l + k_r**2 * v_cav) / v_epi)  # V_epi(t) - V_cav(t) = myocardial volume
    return _Motion(
        f=f,
        zc=z_fix + k_l * (p.zc - z_fix),
        z_base=z_fix + k_l * (p.z_base - z_fix),
        l_endo=k_l * p.l_endo,
        l_epi=k_l * p.l_epi,
        r_endo=k_r * p.r_endo,
        r_epi=k_e * p.r_epi,
        k_r=k_r,
        rv_scale=1.0 - p.rv_drive * f,
    )


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def _radius_shape(phi: np.ndarray, shape: tuple[float, ...]) -> np.ndarray:
    """Unit radius of a perturbed ellipse in direction ``phi``: ellipse (ellipticity e, orientation) times
    ``1 + a3 cos(3 phi + p3) + a4 cos(4 phi + p4)``."""
    e, psi, a3, p3, a4, p4 = shape
    c, s = np.cos(phi - psi), np.sin(phi - psi)
    ell = 1.0 / np.sqrt((c / (1.0 + e)) ** 2 + (s / (1.0 - e)) ** 2)
    return (ell * (1.0 + a3 * np.cos(3 * phi + p3) + a4 * np.cos(4 * phi + p4))).astype(np.float32)


def _coverage(dist: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel of in-plane size ``width`` inside a boundary at signed distance ``dist`` (mm,
    negative inside): the exact box-filter partial volume of a straight edge."""
    return np.clip(0.5 - dist / width, 0.0, 1.0)


def _profile(z: float, zc: np.ndarray, length: np.ndarray, z_base: np.ndarray) -> np.ndarray:
    """Relative radius ``sqrt(1 - w^2)`` of a truncated ellipsoid at level ``z`` per frame, ``(T,)``; 0 outside."""
    w = (z - zc) / length
    inside = (np.abs(w) < 1.0) & (z >= z_base)
    return np.where(inside, np.sqrt(np.clip(1.0 - w * w, 0.0, 1.0)), 0.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation, float32."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _ellipse_dist(du: np.ndarray, dv: np.ndarray, a: float, b: float, angle: float) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse of semi-axes ``a, b`` rotated by ``angle``, from
    offsets ``du, dv`` to its centre (first-order: ``(F - 1) / |grad F|``)."""
    c, s = math.cos(angle), math.sin(angle)
    x = (du * c + dv * s) / a
    y = (-du * s + dv * c) / b
    F = np.sqrt(x * x + y * y) + 1e-6
    grad = np.sqrt((x / a) ** 2 + (y / b) ** 2) / F + 1e-6
    return (F - 1.0) / grad


def _background(p: _Params, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, z: np.ndarray,
                x: np.ndarray, y: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Static surroundings ``(X, Y, Z)``: body, subcutaneous fat, lungs, liver, spine, descending aorta,
    epicardial fat pads and, above the base, the great vessels (the atria move with the base: see
    :func:`_render`).

    ``u, v``: heart-frame coordinates ``(X, Y, Z)`` (u points from the LV towards the RV); ``x, y``:
    image-centred mm; ``z``: slice positions ``(Z,)``.
    """
    pix = p.spacing[0]
    r_epi = p.r_epi
    body_c = rng.normal(0.0, 12.0, 2)
    body_ax = (_u(rng, 150.0, 190.0), _u(rng, 105.0, 135.0))
    body_d = _ellipse_dist(x - body_c[0], y - body_c[1], body_ax[0], body_ax[1], _u(rng, 0.0, np.pi))
    img = np.full(u.shape, 0.02, np.float32)
    body = _coverage(body_d, pix)
    img += body * (p.tissue * (1.0 + 0.25 * texture) - 0.02)
    fat_thick = _u(rng, 6.0, 16.0)
    fat = _coverage(-(body_d + fat_thick), pix) * body  # ring inside the outline
    img = img * (1 - fat) + fat * p.fat * (1.0 + 0.1 * texture)

    def blob(cu: float, cv: float, a: float, b: float, angle: float, value: float, zmask: np.ndarray | float = 1.0,
             tex: float = 0.1) -> None:
        nonlocal img
        m = _coverage(_ellipse_dist(u - cu, v - cv, a, b, angle), pix) * zmask * body
        img = img * (1 - m) + m * value * (1.0 + tex * texture)

    z_rel = (z - p.z_base)[None, None, :]  # mm below the base plane
    cavity_len = p.l_endo - (p.z_base - p.zc)  # base plane to endocardial apex at ED
    # lungs either side of the mediastinum
    blob(-(r_epi + _u(rng, 35.0, 60.0)), _u(rng, -10.0, 25.0), _u(rng, 35.0, 55.0), _u(rng, 50.0, 80.0),
         _u(rng, -0.4, 0.4), p.lung, tex=0.3)
    blob(r_epi + _u(rng, 55.0, 80.0), _u(rng, 0.0, 30.0), _u(rng, 30.0, 50.0), _u(rng, 45.0, 75.0),
         _u(rng, -0.4, 0.4), p.lung, tex=0.3)
    # liver: below the heart, appears towards the apex
    liver_z = np.clip((z_rel - _u(rng, 0.35, 0.75) * cavity_len) / 15.0, 0.0, 1.0)
    blob(_u(rng, 20.0, 50.0), -(r_epi + _u(rng, 10.0, 35.0)), _u(rng, 55.0, 80.0), _u(rng, 40.0, 60.0),
         _u(rng, -0.5, 0.5), p.liver, liver_z, tex=0.12)
    # spine and descending aorta, posterior
    sp_u, sp_v = _u(rng, -10.0, 20.0), -(r_epi + _u(rng, 40.0, 55.0))
    blob(sp_u, sp_v, 16.0, 14.0, 0.0, p.tissue * 1.2, tex=0.2)
    blob(sp_u - _u(rng, 18.0, 28.0), sp_v + _u(rng, 10.0, 20.0), _u(rng, 9.0, 12.0), _u(rng, 9.0, 12.0), 0.0,
         p.blood * _u(rng, 0.7, 0.95), tex=0.05)
    # epicardial/pericardial fat pads
    for _ in range(3):
        ang = _u(rng, 0.0, 2 * np.pi)
        rr = r_epi + _u(rng, 2.0, 8.0)
        blob(rr * math.cos(ang), rr * math.sin(ang), _u(rng, 6.0, 14.0), _u(rng, 3.0, 6.0), ang + np.pi / 2,
             p.fat * 0.9, tex=0.1)
    # ascending aorta and pulmonary trunk above the base plane (bright, unlabelled)
    above = np.clip((-z_rel - 2.0) / 8.0, 0.0, 1.0)
    blob(_u(rng, 0.0, 15.0), _u(rng, 10.0, 25.0), _u(rng, 12.0, 16.0), _u(rng, 12.0, 16.0), 0.0,
         p.blood * 0.95, above, tex=0.05)
    blob(_u(rng, 20.0, 40.0), _u(rng, 20.0, 35.0), _u(rng, 11.0, 14.0), _u(rng, 11.0, 14.0), 0.0,
         p.blood * 0.9, above, tex=0.05)
    return img


class _Grid:
    """Voxel-centre coordinates of one case: image-centred mm ``x, y`` ``(X, Y)`` and slice positions ``z``."""

    def __init__(self, p: _Params):
        nx, ny, nz, _ = p.shape
        sx, sy, sz = p.spacing
        xs = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float32)
        ys = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float32)
        self.x, self.y = np.meshgrid(xs, ys, indexing="ij")
        self.z = np.arange(nz) * sz
        self.p = p
        self._polar: dict[tuple[int, float], tuple[np.ndarray, ...]] = {}

    def heart_frame(self, k: int, zpos: float) -> tuple[np.ndarray, np.ndarray]:
        """Heart-frame coordinates ``(u, v)`` ``(X, Y)`` at level ``zpos`` of slice ``k``: centred on the LV
        axis (which drifts with the tilt and the slice's misalignment), u pointing towards the RV."""
        p = self.p
        c = p.center + p.tilt * (zpos - p.z_base) + p.slice_jitter[k]
        dx, dy = self.x - c[0], self.y - c[1]
        ct, st = math.cos(p.theta), math.sin(p.theta)
        return (ct * dx + st * dy).astype(np.float32), (-st * dx + ct * dy).astype(np.float32)

    def polar(self, k: int, zpos: float) -> tuple[np.ndarray, ...]:
        """``(u, v, rho, endo unit radius, epi unit radius, infarct weight or None)``, each ``(X, Y)`` (the
        radii and weight with a leading axis of 1), at a level; cached, as the calibration and the
        rendering visit the same levels."""
        key = (k, float(zpos))
        if key not in self._polar:
            u, v = self.heart_frame(k, zpos)
            phi = np.arctan2(v, u)
            s_endo = _radius_shape(phi, self.p.endo_shape)[None]
            sector = None
            if self.p.infarct is not None:
                centre, half_width, bulge = self.p.infarct
                offset = np.abs(np.angle(np.exp(1j * (phi - centre)))) / half_width
                sector = (0.5 * (1.0 + np.cos(np.pi * np.clip(offset, 0.0, 1.0)))).astype(np.float32)[None]
                s_endo = s_endo * (1.0 + np.float32(bulge) * sector)
            self._polar[key] = (u, v, np.hypot(u, v), s_endo, _radius_shape(phi, self.p.epi_shape)[None], sector)
        return self._polar[key]


@dataclass
class _SliceGeometry:
    """Signed distances (mm, negative inside) at one level for the selected frames, each ``(T', X, Y)``."""

    u: np.ndarray  # (X, Y)
    v: np.ndarray  # (X, Y)
    d_endo: np.ndarray
    d_epi: np.ndarray
    d_rv: np.ndarray
    prof_endo: np.ndarray  # (T',)

    def labels(self) -> np.ndarray:
        """ACDC labels ``(T', X, Y)`` uint8 at these points."""
        lab = np.zeros(self.d_endo.shape, np.uint8)
        lab[(self.d_rv < 0) & (self.d_epi >= 0)] = RV
        lab[self.d_epi < 0] = MYO
        lab[self.d_endo < 0] = LV
        return lab


def _geometry(p: _Params, m: _Motion, grid: _Grid, k: int, zpos: float, frames: np.ndarray) -> _SliceGeometry:
    """LV endocardium, LV epicardium and RV crescent at level ``zpos`` of slice ``k`` for ``frames``."""
    u, v, rho, s_endo, s_epi, sector = grid.polar(k, zpos)
    zc, z_base, l_endo, l_epi = m.zc[frames], m.z_base[frames], m.l_endo[frames], m.l_epi[frames]
    prof_endo = _profile(zpos, zc, l_endo, z_base)
    prof_epi = _profile(zpos, zc, l_epi, z_base)
    r_endo = np.where(prof_endo > 0, m.r_endo[frames] * prof_endo, _OUTSIDE).astype(np.float32)[:, None, None]
    r_epi_t = m.r_epi[frames] * prof_epi  # (T',) mean epicardial radius at this level
    r_epi = np.where(prof_epi > 0, r_epi_t, _OUTSIDE).astype(np.float32)[:, None, None]
    if sector is not None:  # the infarcted sector keeps its ED radius (akinetic); the rest compensates
        s_endo = s_endo * (1.0 + sector * (1.0 / m.k_r[frames] - 1.0).astype(np.float32)[:, None, None])
    d_endo = rho[None] - r_endo * s_endo
    d_epi = rho[None] - np.maximum(r_epi * s_epi, r_endo * s_endo + np.float32(p.min_wall) * (r_endo > 0))

    # RV crescent: an ellipse from rv_back LV radii behind the LV centre to `width` beyond the epicardium
    rv_prof = _profile(zpos, zc, l_epi * p.rv_length, z_base)
    scale = m.rv_scale[frames]
    width = p.rv_width * scale * rv_prof
    base_r = np.maximum(r_epi_t, 1e-3)
    a_rv = np.maximum((base_r + width + p.rv_back * base_r) / 2.0, 1e-3)
    c_rv = (base_r + width - p.rv_back * base_r) / 2.0
    b_rv = np.maximum(p.rv_breadth * base_r * scale * np.sqrt(rv_prof), 1e-3)
    present = (rv_prof > 0) & (prof_epi > 0)
    d_rv = np.full(d_endo.shape, 1e3, np.float32)
    for i in np.flatnonzero(present):
        cu, cv = c_rv[i] * math.cos(p.rv_angle), c_rv[i] * math.sin(p.rv_angle)
        d_rv[i] = _ellipse_dist(u - cu, v - cv, a_rv[i], b_rv[i], p.rv_angle + p.rv_tilt)
    return _SliceGeometry(u, v, d_endo, d_epi, d_rv, prof_endo)


def _ed_es_volumes(p: _Params, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Voxel counts of LV and RV at ED and ES, ``(2,)`` each, from the labels at voxel centres."""
    m = _motion(p)
    frames = np.array([0, p.es])
    lv, rv = np.zeros(2), np.zeros(2)
    for k, zpos in enumerate(grid.z):
        lab = _geometry(p, m, grid, k, zpos, frames).labels()
        lv += (lab == LV).sum((1, 2))
        rv += (lab == RV).sum((1, 2))
    return lv, rv


def _calibrate(p: _Params, grid: _Grid, iterations: int = 12) -> None:
    """Set ``p.ef_drive`` and ``p.rv_drive`` by bisection so that the ejection fractions measured on the
    labels (voxel counts) equal the drawn ``p.ef`` and ``p.rv_ef``: the moving base plane crossing a
    thick slice's centre, or the RV crescent's overlap with the LV, would otherwise shift them."""
    for attr, target, idx in (("ef_drive", p.ef, 0), ("rv_drive", p.rv_ef, 1)):
        lo, hi = 0.0, 0.95
        for _ in range(iterations):
            setattr(p, attr, 0.5 * (lo + hi))
            vol = _ed_es_volumes(p, grid)[idx]
            ef = 1.0 - vol[1] / max(vol[0], 1.0)
            lo, hi = (getattr(p, attr), hi) if ef < target else (lo, getattr(p, attr))
        setattr(p, attr, 0.5 * (lo + hi))


def _render(p: _Params, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Simulate the cine: image float32 ``(X, Y, Z, T)`` (before noise scaling to int16) and labels uint8."""
    nx, ny, nz, nt = p.shape
    sz = p.spacing[2]
    pix = p.spacing[0]
    grid = _Grid(p)
    _calibrate(p, grid)
    motion = _motion(p)
    x2, y2, zs = grid.x, grid.y, grid.z
    all_frames = np.arange(nt)

    # static surroundings and fields on the slice grid
    texture = _smooth_noise(rng, (nx, ny, nz), (3.0 / pix, 3.0 / pix, 0.4))
    fine_tex = _smooth_noise(rng, (nx, ny, nz), (1.2 / pix, 1.2 / pix, 0.3))
    uv = [grid.heart_frame(k, zs[k]) for k in range(nz)]
    u3 = np.stack([a for a, _ in uv], -1)
    v3 = np.stack([b for _, b in uv], -1)
    x3 = np.repeat(x2[..., None], nz, -1)
    y3 = np.repeat(y2[..., None], nz, -1)
    background = _background(p, rng, u3, v3, zs, x3, y3, texture)
    del u3, v3, x3, y3

    image = np.empty((nt, nx, ny, nz), np.float32)
    label = np.zeros((nt, nx, ny, nz), np.uint8)
    pa1, pa2, p_rad, p_depth = p.papillary
    pap_radius = (p_rad * (1.0 + 0.5 * motion.f)).astype(np.float32)[:, None, None]  # papillaries thicken too
    for k in range(nz):
        blood_tex = (1.0 + 0.08 * texture[..., k] + 0.06 * fine_tex[..., k])[None]
        myo_val = p.myo * (1.0 + 0.1 * fine_tex[..., k])[None]
        acc = np.zeros((nt, nx, ny), np.float32)
        for off in _SUBSLICES:
            zpos = zs[k] + off * sz
            g = _geometry(p, motion, grid, k, zpos, all_frames)
            u, v = g.u, g.v
            # compositing, back to front
            img = np.broadcast_to(background[..., k], (nt, nx, ny)).copy()
            a_wall = _coverage(g.d_rv - p.rv_wall, pix)
            img += a_wall * (myo_val - img)
            a_epi = _coverage(g.d_epi, pix)
            img += a_epi * (myo_val - img)
            a_endo = _coverage(g.d_endo, pix)
            img += a_endo * (p.blood * blood_tex - img)
            # papillary muscles: dark discs inside the cavity (labelled LV, as in ACDC)
            depth = (zpos - motion.zc) / motion.l_endo  # (T,)
            pap_on = np.clip(1.0 - np.abs(depth - 0.35) / 0.35, 0.0, 1.0).astype(np.float32)[:, None, None]
            for ang in (pa1, pa2):
                rr = (p_depth * motion.r_endo * g.prof_endo).astype(np.float32)[:, None, None]
                pu, pv = rr * math.cos(ang), rr * math.sin(ang)
                d_pap = np.sqrt((u[None] - pu) ** 2 + (v[None] - pv) ** 2) - pap_radius
                a_pap = _coverage(d_pap, pix) * pap_on * a_endo
                img += a_pap * (myo_val - img)
            a_rv = _coverage(g.d_rv, pix) * (1.0 - a_epi)
            img += a_rv * (p.rv_blood * blood_tex - img)
            # atria above the (moving) base plane: bright blood, unlabelled
            above = np.clip((motion.z_base - zpos) / 4.0, 0.0, 1.0).astype(np.float32)[:, None, None]
            for (cu, cv, a, b), value in zip(p.atria, (p.blood, p.rv_blood)):
                a_at = _coverage(_ellipse_dist(u - cu, v - cv, a, b, 0.0), pix)[None] * above
                img += a_at * (value * blood_tex - img)
            acc += img
            if off == 0.0:  # labels at the voxel centres
                label[..., k] = g.labels()
        image[..., k] = acc / len(_SUBSLICES)

    image *= rng.uniform(0.9, 1.1, nz).astype(np.float32)  # per-slice gain (separate breath-holds)
    # smooth multiplicative coil bias field: a tilted exponential plus a near-coil bump
    bx, by = rng.normal(0.0, 0.35, 2) / 100.0
    coil = p.center + rng.normal(0.0, 40.0, 2)
    bias = np.exp(bx * x2 + by * y2 + 0.5 * np.exp(-((x2 - coil[0]) ** 2 + (y2 - coil[1]) ** 2) / (2 * 80.0**2)))
    bias = (bias / bias.mean()).astype(np.float32)
    image *= bias[None, :, :, None]

    if p.artefact is not None:
        t = p.artefact_frame
        frame = image[t]
        axis = int(rng.integers(0, 2))  # phase-encoding direction
        if p.artefact == "ghost":  # periodic motion: attenuated replicas shifted along phase encoding
            n = frame.shape[axis]
            ghost = 0.5 * (np.roll(frame, n // 2, axis) + np.roll(frame, -(n // 3), axis))
            image[t] = frame + 0.35 * p.artefact_strength * ghost
        else:  # motion blur along phase encoding, over 5-10 mm
            steps = max(2, int(round(10.0 * p.artefact_strength / pix)))
            image[t] = np.mean([np.roll(frame, s, axis) for s in range(-steps // 2, steps // 2 + 1)], axis=0)

    # Rician noise: magnitude of the complex signal with Gaussian noise on both channels
    sigma = np.float32(p.noise)
    re = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(re * re + im * im)
    return np.moveaxis(image, 0, -1), np.moveaxis(label, 0, -1)


def _affine(p: _Params, rng: np.random.Generator) -> np.ndarray:
    """Oblique voxel -> world matrix: a random rotation (any angle in-plane, up to 12 degrees out of
    plane, so z stays the slice axis) of the spacing, centred near the world origin."""
    a, b, c = rng.uniform(-0.21, 0.21), rng.uniform(-0.21, 0.21), rng.uniform(-np.pi, np.pi)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    m = rx @ ry @ rz @ np.diag(p.spacing)
    affine = np.eye(4)
    affine[:3, :3] = m
    centre_vox = (np.array(p.shape[:3]) - 1) / 2.0
    affine[:3, 3] = -m @ centre_vox + rng.normal(0.0, 20.0, 3)
    return affine


def simulate_case(seed: int, index: int, *, inplane_scale: float = 1.0, max_frames: int | None = None) -> PhantomCase:
    """Simulate case ``index`` of the phantom with ``seed``; deterministic in ``(seed, index)``.

    Args:
        seed: data set seed.
        index: 0-based case index (``patient001`` is 0).
        inplane_scale: for fast tests only: multiplies the in-plane spacing (same field of view, fewer
            voxels). The default gives the specified 1.2-1.8 mm.
        max_frames: for fast tests only: caps the number of frames (default: 15-30 as drawn).

    Returns:
        A :class:`PhantomCase` with image float32 ``(X, Y, Z, T)`` and label uint8 ``(X, Y, Z, T)``.
    """
    if inplane_scale <= 0:
        raise ValueError(f"inplane_scale must be positive, got {inplane_scale}")
    rng = np.random.default_rng([int(seed), int(index)])
    p = _draw_params(rng, inplane_scale, max_frames)
    image, label = _render(p, rng)
    image = np.clip(np.rint(image * p.gain), 0, np.iinfo(np.int16).max).astype(np.float32)
    return PhantomCase(
        image=image, label=label, affine=_affine(p, rng), spacing=tuple(float(s) for s in p.spacing),
        time_step_ms=float(p.time_step_ms), ed=0, es=p.es, group=p.group, height_cm=p.height_cm,
        weight_kg=p.weight_kg, ef_target=p.ef, rv_ef_target=p.rv_ef, degraded_frame=p.artefact_frame,
    )


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _save(data: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...], time_step_ms: float | None,
          path: Path) -> None:
    """One NIfTI file through trunet's NIfTI writer (sform/qform from ``affine``, mm/ms, the time step)."""
    shape = tuple(data.shape[:3]) + ((data.shape[3],) if data.ndim == 4 else (1,))
    meta = CineMeta(affine, tuple(float(s) for s in spacing), time_step_ms, shape, str(path), data.ndim)
    NiftiIO().write(path, data, meta)


def write_case(case: PhantomCase, case_dir: str | os.PathLike, cid: str) -> dict:
    """Write one case in the ACDC layout under ``case_dir`` and return its datalist item (paths relative
    to ``case_dir``'s parent)."""
    case_dir = Path(case_dir)
    frames = {case.ed, case.es}
    img16 = case.image.astype(np.int16)
    _save(img16, case.affine, case.spacing, case.time_step_ms, case_dir / f"{cid}_4d.nii.gz")
    _save(case.label, case.affine, case.spacing, case.time_step_ms, case_dir / f"{cid}_4d_gt.nii.gz")
    for t in sorted(frames):
        stem = f"{cid}_frame{t + 1:02d}"
        _save(img16[..., t], case.affine, case.spacing, None, case_dir / f"{stem}.nii.gz")
        _save(case.label[..., t], case.affine, case.spacing, None, case_dir / f"{stem}_gt.nii.gz")
    info = (
        f"ED: {case.ed + 1}\nES: {case.es + 1}\nGroup: {case.group}\nHeight: {case.height_cm:.1f}\n"
        f"NbFrame: {case.image.shape[3]}\nWeight: {case.weight_kg:.1f}\n"
    )
    write_text(case_dir / "Info.cfg", info)
    return {
        "case_id": cid,
        "image": f"{case_dir.name}/{cid}_4d.nii.gz",
        "label": f"{case_dir.name}/{cid}_4d_gt.nii.gz",
        "ed": case.ed,
        "es": case.es,
    }


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    cases: int = 10,
    seed: int = 0,
    *,
    inplane_scale: float = 1.0,
    max_frames: int | None = None,
    dicom: bool = False,
) -> Path:
    """Write ``cases`` phantom patients in the ACDC layout plus ``datalist.json``; return the datalist path.

    With ``dicom`` each cine is also written as DICOM MR images, one series per slice position with
    oblique orientation and trigger times (:func:`~trunet.data.phantom_dicom.write_dicom_cine`), under
    ``out_dir/dicom/patientNNN/``, and ``datalist_dicom.json`` lists those folders as images (labels the
    same NIfTI files).

    ``out_dir/patientNNN/`` holds ``Info.cfg``, ``patientNNN_4d.nii.gz`` (int16 ``(x, y, z, t)``,
    pixdim[4] = time step in ms), ``patientNNN_4d_gt.nii.gz`` (dense uint8 labels), and
    ``patientNNN_frameFF.nii.gz`` / ``_gt`` at ED and ES (FF 1-based). ``datalist.json`` lists every case
    under ``training`` with paths relative to ``out_dir`` and 0-based ``ed``/``es``.

    Raises:
        TrunetError: ``cases < 1``, or a case folder (or the datalist) already exists with files in it;
            nothing is written in that case.
    """
    if cases < 1:
        raise TrunetError(f"phantom: --cases must be at least 1, got {cases}")
    out = Path(out_dir)
    datalist = out / "datalist.json"
    ids = [case_id(i) for i in range(cases)]
    for cid in ids:
        d = out / cid
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise DataError(d, "already exists and is not empty; the phantom never overwrites cases "
                               "(remove it or choose another --out)")
    if datalist.exists():
        raise DataError(datalist, "already exists; the phantom never overwrites a datalist "
                                  "(remove it or choose another --out)")
    items = []
    start = time.perf_counter()
    dicom_items = []
    for i, cid in enumerate(tqdm(ids, desc="phantom", unit="case", disable=None)):
        case = simulate_case(seed, i, inplane_scale=inplane_scale, max_frames=max_frames)
        items.append(write_case(case, out / cid, cid))
        if dicom:
            write_dicom_cine(case.image, case.affine, case.time_step_ms, out / "dicom" / cid, layout="per-slice",
                             patient_id=cid, uid_seed=f"trunet-phantom-{seed}-{i}")
            dicom_items.append({**items[-1], "image": f"dicom/{cid}"})
    elapsed = time.perf_counter() - start
    logger.info("phantom: %d cases in %.1f s (%.2f s per case) under %s", cases, elapsed, elapsed / cases, out)
    write_json(datalist, {"training": items, "validation": [], "test": []})
    if dicom:
        write_json(out / "datalist_dicom.json", {"training": dicom_items, "validation": [], "test": []})
    return datalist
