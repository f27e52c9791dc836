"""The report's tables: per-case and per-frame CSV files and the summary statistics (mean, sd, agreement)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from trunet.atomic import atomic_path
from trunet.pipeline.evaluation.clinical import agreement

__all__ = ["write_csv", "summarise", "agreements", "json_clean"]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(float(value)) else f"{float(value):.6g}"
    if isinstance(value, (np.integer, np.bool_)):
        return int(value)
    return value


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(row.get(key)) for key in columns})
    return path


def _finite_or_none(x: Any) -> Any:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


_NOT_SUMMARISED = {"case_id", "n_frames", "n_labelled", "voxel_ml", "phase_source", "ed_frame", "es_frame",
                   "ed_ref", "es_ref", "ed_det", "es_det"}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    metrics: dict[str, dict[str, Any]] = {}
    for key in rows[0] if rows else []:
        if key in _NOT_SUMMARISED:
            continue
        vals = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        metrics[key] = {
            "mean": float(vals.mean()) if vals.size else None,
            "sd": float(vals.std(ddof=1)) if vals.size >= 2 else None,
            "n": int(vals.size),
        }
    return metrics


def agreements(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in ("LV", "RV"):
        for key in ("EDV", "ESV", "SV", "EF"):
            col = f"{s}_{key}"
            if f"{col}_pred" in rows[0]:
                out[col] = agreement([r[f"{col}_pred"] for r in rows], [r[f"{col}_ref"] for r in rows])
    if "LV_mass_pred" in rows[0]:
        out["LV_mass"] = agreement([r["LV_mass_pred"] for r in rows], [r["LV_mass_ref"] for r in rows])
    return out


def json_clean(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
