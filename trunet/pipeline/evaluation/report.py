"""Figures and the text summary of ``trunet evaluate`` (see :mod:`trunet.pipeline.evaluation`).

Matplotlib through its object API on the Agg canvas (no ``pyplot`` state, no display needed); every PNG
is written atomically. Array layout as in the evaluation: labels ``(T, X, Y, Z)``, image slices
``(X, Y)`` shown with x to the right and y upwards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from trunet.atomic import atomic_path

__all__ = [
    "column_name",
    "plot_volume_curves",
    "plot_bland_altman",
    "plot_overlay_montage",
    "mid_slice",
    "summary_table",
]

_CLASS_COLOURS = ["#000000", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def column_name(name: str) -> str:
    """A class name as used in column names: non-word runs become ``_`` (``"LV cavity"`` -> ``LV_cavity``)."""
    return re.sub(r"\W+", "_", name).strip("_") or "class"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def _colour(c: int) -> str:
    return _CLASS_COLOURS[c % len(_CLASS_COLOURS)]


def plot_volume_curves(
    path: str | os.PathLike,
    case_id: str,
    pred_volumes: np.ndarray,
    ref_volumes: Mapping[int, np.ndarray],
    classes: Sequence[str],
    phases: Mapping[str, int | None],
) -> Path:
    """Volume (ml) over the cycle per foreground class: prediction line, reference markers/line.

    Args:
        pred_volumes: ``(T, K)`` predicted volumes.
        ref_volumes: ``{frame: (K,)}`` reference volumes on the labelled frames.
        phases: ``ed``/``es`` (used), ``ed_det``/``es_det`` (detected on the prediction).
    """
    from matplotlib.ticker import MaxNLocator

    t, k = pred_volumes.shape
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    frames = np.arange(t)
    ref_f = sorted(ref_volumes)
    for c in range(1, k):
        ax.plot(frames, pred_volumes[:, c], "-", color=_colour(c), label=f"{classes[c]} pred")
        if ref_f:
            style = "--o" if len(ref_f) == t else "o"
            ax.plot(ref_f, [ref_volumes[f][c] for f in ref_f], style, color=_colour(c), mfc="none",
                    label=f"{classes[c]} ref")
    for key, style, text in (("ed", "--", "ED"), ("es", ":", "ES")):
        if phases.get(key) is not None:
            ax.axvline(phases[key], color="grey", ls=style, lw=1)
            ax.text(phases[key], 1.0, f" {text}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    for key, text in (("ed_det", "ED det"), ("es_det", "ES det")):
        if phases.get(key) is not None and phases.get(key) != phases.get(key[:2]):
            ax.axvline(phases[key], color="black", ls="-.", lw=0.8)
            ax.text(phases[key], 0.9, f" {text}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
    ax.set_xlabel("frame")
    ax.set_ylabel("volume (ml)")
    ax.set_title(f"{case_id}: volume curves (line: prediction, markers: reference)")
    ax.set_xlim(-0.5, t - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bland_altman(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], ventricles: Sequence[str]
) -> Path:
    """Bland-Altman plots of the ejection fraction (pred - ref against their mean), a panel per ventricle."""
    fig = _figure(5.0 * len(ventricles), 4.2)
    for i, s in enumerate(ventricles):
        ax = fig.add_subplot(1, len(ventricles), i + 1)
        p = np.array([np.nan if r.get(f"{s}_EF_pred") is None else r[f"{s}_EF_pred"] for r in rows], float)
        q = np.array([np.nan if r.get(f"{s}_EF_ref") is None else r[f"{s}_EF_ref"] for r in rows], float)
        keep = np.isfinite(p) & np.isfinite(q)
        mean, diff = (p[keep] + q[keep]) / 2.0, p[keep] - q[keep]
        ax.scatter(mean, diff, s=18, color=_colour(3 if s == "LV" else 1))
        if diff.size:
            bias = diff.mean()
            ax.axhline(bias, color="black", lw=1, label=f"bias {bias:+.2f}")
            if diff.size >= 2:
                sd = diff.std(ddof=1)
                for sign in (-1, 1):
                    ax.axhline(bias + sign * 1.96 * sd, color="grey", ls="--", lw=1)
                loa = f"LoA {bias - 1.96 * sd:+.2f} .. {bias + 1.96 * sd:+.2f}"
                ax.plot([], [], color="grey", ls="--", label=loa)
            ax.legend(fontsize=8)
        ax.axhline(0.0, color="lightgrey", lw=0.8, zorder=0)
        ax.set_xlabel(f"mean {s} EF (%)")
        ax.set_ylabel(f"{s} EF pred - ref (%)")
        ax.set_title(f"{s} ejection fraction, n = {int(diff.size)}")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def mid_slice(ref_frames: Mapping[int, np.ndarray], struct: Mapping[str, int]) -> int:
    """The middle short-axis slice (z) of the reference's foreground (LV if named), else the middle one."""
    first = next(iter(ref_frames.values()))
    fg = np.zeros(first.shape, dtype=bool)
    for lab in ref_frames.values():
        fg |= (lab == struct["LV"]) if "LV" in struct else (lab > 0)
    zs = np.flatnonzero(fg.any(axis=(0, 1)))
    return int(zs[len(zs) // 2]) if zs.size else first.shape[2] // 2


def _overlay(ax: Any, image: np.ndarray, labels: np.ndarray | None, k: int, title: str) -> None:
    from matplotlib.colors import ListedColormap

    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if labels is not None:
        cmap = ListedColormap([_colour(c) for c in range(k)])
        masked = np.ma.masked_where(labels.T == 0, labels.T)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=k - 1, alpha=0.45, origin="lower", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def plot_overlay_montage(
    path: str | os.PathLike,
    case_id: str,
    images: Mapping[int, np.ndarray],
    pred: np.ndarray,
    ref_frames: Mapping[int, np.ndarray],
    z: int,
    phases: Mapping[str, int | None],
    num_classes: int,
) -> Path | None:
    """ED and ES rows of slice ``z``: image, reference overlay, prediction overlay.

    Args:
        images: ``{frame: (X, Y)}`` image slices.
        pred: ``(T, X, Y, Z)`` predicted labels.
        ref_frames: ``{frame: (X, Y, Z)}`` reference labels.
    """
    rows = [(name, phases.get(key)) for name, key in (("ED", "ed"), ("ES", "es"))]
    rows = [(name, f) for name, f in rows if f in images and images[f].shape == pred.shape[1:3]]
    if not rows:
        return None
    fig = _figure(9.0, 3.0 * len(rows))
    for i, (name, f) in enumerate(rows):
        ref = ref_frames[f][:, :, z] if f in ref_frames else None
        panels = [(None, "image"), (ref, "reference" if ref is not None else "no reference"),
                  (pred[f, :, :, z], "prediction")]
        for j, (lab, title) in enumerate(panels):
            ax = fig.add_subplot(len(rows), 3, 3 * i + j + 1)
            _overlay(ax, images[f], lab, num_classes, f"{case_id} {name} (frame {f}, z {z}): {title}")
    return _save(fig, path)


def _fmt(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    sd = stat.get("sd")
    return f"{stat['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def summary_table(summary: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    """A short human summary: class Dice and HD95 at ED/ES (mean ± sd), EF bias and limits of agreement."""
    m = summary["metrics"]
    missing = summary["missing_references"]
    head = f"evaluated {summary['n_cases']} case(s)"
    lines = [head + (f", {len(missing)} without reference" if missing else "")]
    lines.append(f"{'class':<12}{'Dice ED':>18}{'Dice ES':>18}{'HD95 ED (mm)':>18}{'HD95 ES (mm)':>18}")
    for c in classes[1:]:
        n = column_name(c)
        lines.append(f"{c:<12}{_fmt(m.get(f'dice_{n}_ed')):>18}{_fmt(m.get(f'dice_{n}_es')):>18}"
                     f"{_fmt(m.get(f'hd95_{n}_ed'), 2):>18}{_fmt(m.get(f'hd95_{n}_es'), 2):>18}")
    for s in ("LV", "RV"):
        a = summary["agreement"].get(f"{s}_EF")
        if a and a.get("bias") is not None:
            loa = ""
            if a.get("loa_lower") is not None:
                loa = f", LoA {a['loa_lower']:+.2f} .. {a['loa_upper']:+.2f}"
            r = f", r = {a['pearson_r']:.3f}" if a.get("pearson_r") is not None else ""
            lines.append(f"{s} EF bias (pred - ref): {a['bias']:+.2f} %{loa}{r} (n = {a['n']})")
    if summary["hd95_missing_cases"]:
        lines.append(f"HD95 undefined in some frames of: {', '.join(summary['hd95_missing_cases'])}")
    return lines
