"""``trunet evaluate``: every prediction of a folder against its reference, written as a report."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence


from trunet import __version__
from trunet.atomic import atomic_folder, write_json
from trunet.config import DataConfig
from trunet.errors import DataError
from trunet.pipeline.evaluation import report
from trunet.pipeline.evaluation.case import STRUCTURES, evaluate_case, structure_index
from trunet.pipeline.evaluation.clinical import DEFAULT_JUMP_THRESHOLD, MYOCARDIAL_DENSITY
from trunet.pipeline.evaluation.metrics import HD_PERCENTILE
from trunet.pipeline.evaluation.references import (
    find_references,
    load_prediction,
    load_reference,
    read_image_frames,
)
from trunet.pipeline.evaluation.summary import agreements, json_clean, summarise, write_csv
from trunet.progress import track

__all__ = ["PRED_SUFFIX", "run_evaluation"]

logger = logging.getLogger(__name__)

PRED_SUFFIX = "_seg.nii.gz"


def run_evaluation(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    out_dir: str | os.PathLike,
    classes: Sequence[str] | None = None,
    jump_threshold: float = DEFAULT_JUMP_THRESHOLD,
    figures: bool = True,
    allow_missing: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate every ``<case_id>_seg.nii.gz`` in ``pred`` against its reference; write the report.

    Args:
        pred: folder of 4D ``(x, y, z, t)`` uint8 predictions.
        ref: what training takes (a datalist, an ACDC-layout root, a folder holding ``datalist.json``) or a
            folder of 4D label files (see :func:`find_references`).
        out_dir: report folder (created): ``per_case.csv``, ``per_frame.csv``, ``summary.json``, ``figures/``,
            written in a temporary folder that takes its place at the end (a failure leaves no partial
            report).
        classes: class names by label value (default ``DataConfig().classes``).
        jump_threshold: fraction of a curve's maximum above which a frame is a jump.
        figures: write the PNG figures.
        allow_missing: evaluate the predicted cases when some references have no prediction (listed in the
            summary's ``missing_predictions``); refused otherwise.
        overwrite: replace an existing report in ``out_dir`` (refused otherwise).

    Returns:
        The summary written to ``summary.json``.

    Raises:
        DataError: missing/unreadable files, no prediction, no prediction with a reference, references
            without prediction (unless ``allow_missing``), an existing report (unless ``overwrite``), a
            prediction and reference on different grids (shape, or affine beyond 1e-3), bad label values.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from trunet.io import CineMeta, NiftiIO
        >>> folder = Path(tempfile.mkdtemp())
        >>> labels = np.zeros((8, 8, 2, 4), dtype=np.uint8)  # (x, y, z, t)
        >>> labels[2:6, 2:6, :, :] = 3                       # an LV cavity ...
        >>> labels[3:5, 3:5, :, 2] = 0                       # ... smallest at frame 2
        >>> for name in ("pred/case1_seg.nii.gz", "ref/case1_gt.nii.gz"):
        ...     _ = NiftiIO().write(folder / name, labels, CineMeta(np.eye(4), (1.0, 1.0, 1.0), 20.0,
        ...                         (8, 8, 2, 4), name))
        >>> summary = run_evaluation(folder / "pred", folder / "ref", folder / "report", figures=False)
        >>> summary["cases"], summary["metrics"]["dice_LV_mean"]["mean"]
        (['case1'], 1.0)
    """
    pred_dir, out_dir = Path(pred), Path(out_dir)
    classes = list(classes) if classes else list(DataConfig().classes)
    if len(classes) < 2:
        raise DataError(None, f"need at least two classes (background and one structure), got {classes}")
    if not (jump_threshold > 0):
        raise DataError(None, f"jump_threshold must be positive, got {jump_threshold}")
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder not found")
    pred_files = {p.name[: -len(PRED_SUFFIX)]: p for p in sorted(pred_dir.glob(f"*{PRED_SUFFIX}"))}
    if not pred_files:
        raise DataError(pred_dir, f"no predictions (*{PRED_SUFFIX}) in this folder")
    refs = find_references(ref)
    missing_refs = [cid for cid in pred_files if cid not in refs]
    missing_preds = [cid for cid in refs if cid not in pred_files]
    if missing_refs:
        logger.warning("no reference for %d prediction(s), not evaluated: %s", len(missing_refs),
                       ", ".join(missing_refs))
    matched = [cid for cid in pred_files if cid in refs]
    if not matched:
        raise DataError(ref, f"no reference matches any of the {len(pred_files)} predictions in {pred_dir} "
                             f"(e.g. {next(iter(pred_files))})")
    struct = structure_index(classes)
    absent = [s for s in STRUCTURES if s not in struct]
    if absent:
        logger.warning("classes %s lack %s: the clinical indices needing them are skipped", classes, absent)
    if out_dir.resolve() == pred_dir.resolve():
        raise DataError(out_dir, "the report folder must differ from the prediction folder")
    if missing_preds and not allow_missing:
        shown = ", ".join(missing_preds[:10]) + (", ..." if len(missing_preds) > 10 else "")
        raise DataError(pred_dir, f"no prediction for {len(missing_preds)} of {len(refs)} reference case(s): "
                                  f"{shown}; predict them, or evaluate the others with --allow-missing")
    if missing_preds:
        logger.warning("no prediction for %d reference case(s), not evaluated: %s", len(missing_preds),
                       ", ".join(missing_preds))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(out_dir, "holds an earlier report; pass --overwrite to replace it or choose another "
                                 "--out")
    with atomic_folder(out_dir) as staging:
        return _write_report(pred_dir, ref, staging, classes, jump_threshold, figures, pred_files, refs,
                             matched, missing_refs, missing_preds, struct)


def _write_report(pred_dir: Path, ref: str | os.PathLike, out_dir: Path, classes: list[str], jump_threshold: float,
                  figures: bool, pred_files: dict[str, Path], refs: dict[str, Any], matched: list[str],
                  missing_refs: list[str], missing_preds: list[str], struct: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the matched cases and write the report into ``out_dir`` (a staging folder that takes the
    report folder's place afterwards); return the summary."""
    fig_dir = out_dir / "figures"
    case_rows: list[dict[str, Any]] = []
    frame_rows: list[dict[str, Any]] = []
    written: list[Path] = []
    for cid in track(matched, "evaluate", "case", every=10):
        labels, meta = load_prediction(pred_files[cid], len(classes))
        r = refs[cid]
        ref_frames = load_reference(r, meta, len(classes))
        if not ref_frames:
            logger.warning("%s: the reference has no labelled frame, not evaluated", cid)
            missing_refs.append(cid)
            continue
        res = evaluate_case(cid, labels, ref_frames, meta.spacing, classes, r.ed, r.es, jump_threshold)
        case_rows.append(res.row)
        frame_rows.extend(res.frames)
        if res.row["hd95_missing"]:
            logger.warning("%s: HD95 undefined (empty prediction or reference) for %d frame-class pair(s)",
                           cid, res.row["hd95_missing_n"])
        if figures:
            written.append(report.plot_volume_curves(fig_dir / f"{cid}_volumes.png", cid, res.pred_volumes,
                                                     res.ref_volumes, classes, res.phases))
            if r.image is None:
                logger.info("%s: no image known for this case, overlay montage skipped", cid)
            else:
                z = report.mid_slice(ref_frames, struct)
                wanted = [f for f in (res.phases["ed"], res.phases["es"]) if f is not None]
                images = read_image_frames(r.image, wanted, z, labels.shape[1:])
                if images is not None:
                    written.append(report.plot_overlay_montage(
                        fig_dir / f"{cid}_overlay.png", cid, images, labels, ref_frames, z, res.phases,
                        len(classes)))
    if not case_rows:
        raise DataError(ref, "no case could be evaluated (every reference is empty)")

    written.insert(0, write_csv(out_dir / "per_case.csv", case_rows))
    written.insert(1, write_csv(out_dir / "per_frame.csv", frame_rows))
    agree = agreements(case_rows)
    if figures and ("LV_EF" in agree or "RV_EF" in agree):
        written.append(report.plot_bland_altman(fig_dir / "bland_altman_ef.png", case_rows,
                                                [s for s in ("LV", "RV") if f"{s}_EF" in agree]))
    summary: dict[str, Any] = {
        "trunet_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pred": str(pred_dir),
        "ref": str(ref),
        "classes": classes,
        "parameters": {
            "hd_percentile": HD_PERCENTILE,
            "myocardial_density_g_per_ml": MYOCARDIAL_DENSITY,
            "jump_threshold": jump_threshold,
            "jump_definition": "|v[t] - (v[t-1] + v[t+1]) / 2| > jump_threshold * max(v), cyclic",
            "roughness_definition": "sum_t (v[t-1] - 2 v[t] + v[t+1])^2 / (T * max(v)^2), cyclic",
            "agreement": "bias = mean(pred - ref); limits of agreement = bias +- 1.96 sd(pred - ref)",
        },
        "n_cases": len(case_rows),
        "cases": [r["case_id"] for r in case_rows],
        "missing_references": missing_refs,
        "missing_predictions": missing_preds,
        "hd95_missing_cases": [r["case_id"] for r in case_rows if r["hd95_missing"]],
        "metrics": summarise(case_rows),
        "agreement": agree,
    }
    summary_path = out_dir / "summary.json"
    summary["files"] = [str(p.relative_to(out_dir)) for p in [*written, summary_path]]
    summary = json_clean(summary)
    write_json(summary_path, summary)
    for line in report.summary_table(summary, classes):
        logger.info("%s", line)
    return summary
