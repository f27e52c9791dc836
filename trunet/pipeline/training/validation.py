"""Validation during training: whole validation cases through the inference stage's
:class:`~trunet.pipeline.inference.predictor.Predictor`, scored with the evaluation stage's
:func:`~trunet.pipeline.evaluation.metrics.overlap_scores` -- the same Dice/HD95 (and the same treatment of
empty masks, MONAI ``ignore_empty``) as ``trunet evaluate``, here in the preprocessed space."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from trunet.pipeline.evaluation.case import structure_index
from trunet.pipeline.evaluation.clinical import ventricle_indices
from trunet.pipeline.evaluation.metrics import class_volumes, overlap_scores
from trunet.pipeline.inference.predictor import Predictor
from trunet.pipeline.training import distributed as dist_utils
from trunet.pipeline.training.distributed import DistContext

__all__ = ["validate"]

logger = logging.getLogger(__name__)


def validate(
    predictor: Predictor,
    dataset: Any,
    classes: Sequence[str],
    spacing: Sequence[float],
    records: Mapping[str, dict],
    shown: int,
    ctx: DistContext,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Optional[dict[str, Any]]:
    """Dice and HD95 per class on whole validation cases (labelled frames only).

    Args:
        predictor: wraps the live model (its mode is restored afterwards).
        dataset: this rank's share of the preprocessed validation cases (:func:`build_eval_dataset`).
        classes: class names by label value.
        spacing: the target spacing (mm), for HD95.
        records: case records by id (for ED/ES of the visuals).
        shown: how many cases to return as visuals (rank 0).
        ctx: the distributed context; rows are gathered on every rank.
        should_stop: asked before every case (by every rank the same number of times, so it may be a
            collective); when it says True, validation ends at once and returns None.

    Returns:
        ``{"scalars": {"val/dice/<class>", "val/hd95/<class>", "val/mean_dice"}, "rows": per-case rows
        (sorted by case id; Dice, HD95 and, for LV and RV, EDV/ESV (ml) and EF (%) predicted and reference at
        the case's ED and ES frames), "visuals": [...] (with ``volumes``: ``{"pred", "ref"}`` ``(T, K)`` ml,
        reference NaN on unlabelled frames)}``; a stray ``ignore_index`` voxel in a labelled frame counts
        as background. None when ``should_stop`` said so.
    """
    k = len(classes)
    rows: list[dict[str, Any]] = []
    visuals: list[dict[str, Any]] = []
    turns = max(dist_utils.all_gather_objects(len(dataset), ctx))  # the ranks' shares differ by one at most
    for i in range(turns):
        if should_stop is not None and should_stop():
            return None
        if i >= len(dataset):
            continue
        item = dataset[i]
        case_id = str(item["case_id"])
        if item.get("label") is None:
            logger.warning("validation case %s has no label: skipped", case_id)
            continue
        image = item["image"]
        probs = predictor.predict_case(image.unsqueeze(0) if image.dim() == 4 else image)
        pred = probs[0].argmax(dim=1).cpu()  # (T, X, Y, Z)
        label = torch.as_tensor(item["label"]).long().cpu()
        frames = torch.as_tensor(item["frame_mask"]).bool().cpu()
        if not bool(frames.any()):
            continue
        p, g = pred[frames], label[frames]
        g = torch.where(g < k, g, torch.zeros_like(g))  # stray ignore voxels count as background
        dice, hd, _ = overlap_scores(p.numpy(), g.numpy(), k, spacing)  # (N, K-1) each
        row: dict[str, Any] = {"case_id": case_id}
        for j, name in enumerate(classes[1:]):
            row[f"dice/{name}"] = nanmean(dice[:, j])
        for j, name in enumerate(classes[1:]):
            row[f"hd95/{name}"] = nanmean(hd[:, j])
        row["mean_dice"] = nanmean(torch.tensor([row[f"dice/{n}"] for n in classes[1:]]))
        record = records.get(case_id, {})
        labelled = torch.nonzero(frames).flatten().tolist()
        ed = int(record.get("ed") if record.get("ed") is not None else labelled[0])
        es = int(record.get("es") if record.get("es") is not None else labelled[-1])
        vol_pred = class_volumes(pred.numpy(), k, spacing)  # (T, K) ml
        vol_ref = class_volumes(np.where(label.numpy() < k, label.numpy(), 0), k, spacing)
        vol_ref[~frames.numpy()] = np.nan
        for name, idx in sorted(structure_index(classes).items()):
            if name == "MYO":
                continue
            p_idx = ventricle_indices(vol_pred[ed, idx], vol_pred[es, idx])
            r_idx = ventricle_indices(vol_ref[ed, idx], vol_ref[es, idx])
            for key in ("EDV", "ESV", "EF"):
                row[f"{name}_{key}_pred"] = round(p_idx[key], 2)
                row[f"{name}_{key}_ref"] = round(r_idx[key], 2)
        rows.append(row)
        if len(visuals) < shown:
            visuals.append({
                "case_id": case_id, "image": np.asarray(torch.as_tensor(image).cpu()),
                "pred": pred.numpy(), "label": label.numpy(), "frames": {"ED": ed, "ES": es},
                "volumes": {"pred": vol_pred, "ref": vol_ref},
            })
    gathered = dist_utils.all_gather_objects(rows, ctx)
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["case_id"])
    scalars: dict[str, float] = {}
    for name in classes[1:]:
        scalars[f"val/dice/{name}"] = nanmean(torch.tensor([r[f"dice/{name}"] for r in rows]))
        scalars[f"val/hd95/{name}"] = nanmean(torch.tensor([r[f"hd95/{name}"] for r in rows]))
    foreground = [scalars[f"val/dice/{n}"] for n in classes[1:]]
    scalars["val/mean_dice"] = nanmean(torch.tensor(foreground))
    return {"scalars": scalars, "rows": rows, "visuals": visuals}


def nanmean(values: Tensor | np.ndarray) -> float:
    """Mean of the non-NaN values in float64; NaN when there are none."""
    values = torch.as_tensor(values, dtype=torch.float64)
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else float("nan")
