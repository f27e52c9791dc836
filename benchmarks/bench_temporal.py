"""Temporal-benefit benchmark: does seeing the neighbouring frames pay where a frame is spoilt?

What a time-resolved model is for: a cine frame degraded on its own (signal dropout, a noise burst,
motion blur or ghosting, a mistriggered slice, a missing frame) next to clean neighbours. The benchmark

1. writes phantom training cases (seed 0) and held-out cases (another seed) with ``trunet phantom``;
2. corrupts the held-out cines per scenario with :func:`trunet.data.artefacts.corrupt_cine`, recording
   the corrupted frames (``scenarios/<name>/frames.json``);
3. trains each variant with ``trunet train`` on the phantom's ACDC layout, i.e. on **ED and ES labels
   only**, as ACDC is labelled, with the same config, steps and data; only the variant's overrides differ;
4. predicts every scenario with each variant (the checkpoint's own inference settings) and scores all
   frames against the phantom's dense labels.

Variants (``--variants``), each ``configs/demo.yaml`` plus overrides:

* ``shipped``: the config as trunet ships it (causal ConvLSTM at the bottleneck, no frame corruption);
* ``temporal``: the time recipe, :data:`RECIPE`: bidirectional ConvLSTMs at every level on a
  quarter-width state, 25% of the training frames corrupted while their labels stay, cyclic inference;
* ``frame``: the recipe without ConvLSTMs (``model.clstm_levels=[]``): the same UNet frame by frame,
  trained on the same corrupted frames;
* ``shipped-frame``: the shipped config without ConvLSTMs: the same UNet frame by frame, trained as
  ``shipped`` is (no frame corruption);
* ``frame+smooth``: ``frame``'s probabilities smoothed over time (Gaussian, sigma ``--smooth-sigma``
  frames, cyclic) before the arg-max: the cheap thing a user tries first (no extra training);
* ``bottleneck``: the shipped config's one ConvLSTM (bottleneck, full width) made bidirectional, trained
  on the recipe's corrupted frames, cyclic inference: the time recipe at the shipped config's cost; its
  frame-by-frame twin is ``frame``;
* ``bidirectional``: the shipped config's one ConvLSTM made bidirectional, cyclic inference, trained as
  ``shipped`` is (no frame corruption: spoilt frames are the repair's job): whether seeing the frames after
  a frame helps the clean ones; its frame-by-frame twin is ``shipped-frame``;
* ``causal``: the recipe with unidirectional ConvLSTMs (the streaming form);
* ``temporal-full``: the recipe with full-width ConvLSTM states (``model.clstm_reduction=1``);
* ``temporal-cons`` / ``frame-cons``: ``temporal`` / ``frame`` plus the corruption-consistency loss
  (``train.consistency_weight``); ``<variant>+smooth`` smooths any variant's probabilities as
  ``frame+smooth`` does; ``<variant>+repair`` is the variant predicted with ``infer.repair_frames`` on
  (spoilt frames found by their disagreement with their neighbours and interpolated from clean ones,
  :mod:`trunet.pipeline.inference.frame_repair`); ``<variant>+basal`` with ``infer.exclude_atrium`` on
  (basal LV cavity that myocardium does not enclose is atrium,
  :func:`trunet.pipeline.inference.postprocess.exclude_atrial_slices`); ``<variant>+default`` with both, as
  ``trunet predict`` runs by default; ``<variant>+tta`` as ``+default`` plus mirroring test-time
  augmentation (``infer.tta``: the four in-plane mirrorings averaged). Every other variant is predicted
  with both off and no TTA: the network's masks.

All variants are predicted in float32 (``cpu_bf16=False``), so the table compares models, not precisions.

Printed per scenario and variant: mean Dice (RV, MYO, LV) on corrupted and on clean frames, Dice at ES,
LV/RV EF absolute error (EF at the reference's ED and ES frames), LV volume-curve roughness (mean absolute
cyclic second difference, mL) beside the reference's, how many of the cases' ED and ES frames have an LV
slice drawn wrong as a whole (:func:`lv_slice_wrong`: what moves a case's EF most), and training seconds.
Then one Markdown table for BENCHMARKS.md.

Usage (the figures in BENCHMARKS.md; about an hour on a 2-core CPU)::

    python benchmarks/bench_temporal.py --work bench-temporal
    python benchmarks/bench_temporal.py --work bench-temporal --variants frame,temporal  # a subset
    python benchmarks/bench_temporal.py --work bench-temporal --train-seeds 0,1  # each variant trained twice

A variant whose run folder already has ``checkpoints/best.pt`` is not retrained (``--retrain`` forces it).
With ``--train-seeds`` every variant is trained once per seed (``train.seed``; seed ``k > 0`` runs in
``runs/<variant>-seed<k>``): one training run is one draw of the batches and the initial weights, and two
variants that differ by less than two seeds of one variant differ do not differ.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from machine import cpu_name
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from scipy.ndimage import gaussian_filter1d

from trunet.data.artefacts import corrupt_cine
from trunet.pipeline.evaluation import class_volumes, ventricle_indices
from trunet.pipeline.inference import run_prediction
from trunet.pipeline.inference.postprocess import keep_largest_components, probabilities_to_labels
from trunet.io import load_cine, save_cine_like

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("RV", "MYO", "LV")  # label values 1, 2, 3

SCENARIOS = {
    # name: (fraction of frames, kinds, strength range)
    "mild": (0.15, ("dropout", "noise", "blur", "ghost", "misaligned", "missing"), (0.2, 0.5)),
    "severe": (0.30, ("dropout",), (0.85, 1.0)),
    "noise": (0.30, ("noise",), (0.6, 1.0)),
    "motion+missing": (0.30, ("blur", "ghost", "misaligned", "missing"), (0.5, 1.0)),
}

RECIPE = ["model.clstm_levels=all", "model.bidirectional=true", "model.clstm_reduction=4",
          "train.augment.corrupt_prob=0.25", "infer.cyclic=true"]
"""The time recipe as ``trunet train`` overrides (on top of ``configs/demo.yaml``)."""

CONSISTENCY = ["train.consistency_weight=1.0"]
"""The corruption-consistency loss, measured as an addition to the recipe (BENCHMARKS.md: it did not pay)."""

VARIANTS = {
    "shipped": [],
    "temporal": RECIPE,
    "frame": [*RECIPE, "model.clstm_levels=[]"],
    "shipped-frame": ["model.clstm_levels=[]"],
    "bottleneck": ["model.bidirectional=true", "train.augment.corrupt_prob=0.25", "infer.cyclic=true"],
    "bidirectional": ["model.bidirectional=true", "infer.cyclic=true"],
    "causal": [*RECIPE, "model.bidirectional=false"],
    "temporal-full": [*RECIPE, "model.clstm_reduction=1"],
    "temporal-cons": [*RECIPE, *CONSISTENCY],
    "frame-cons": [*RECIPE, *CONSISTENCY, "model.clstm_levels=[]"],
}


def _run(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if code != 0:
        raise SystemExit(f"command failed (exit {code}); see {log}")
    return time.perf_counter() - start


def make_data(work: Path, train_cases: int, test_cases: int) -> tuple[Path, Path]:
    train, test = work / "train", work / "test"
    for folder, cases, seed in ((train, train_cases, 0), (test, test_cases, 7000)):
        if not (folder / "datalist.json").is_file():
            _run([sys.executable, "-m", "trunet", "phantom", "--out", str(folder), "--cases", str(cases),
                  "--seed", str(seed)], work / f"phantom-{folder.name}.log")
    return train, test


def make_scenarios(work: Path, test: Path, seed: int) -> dict[str, dict]:
    """Corrupted copies of the held-out cines: ``{scenario: {case_id: {"image", "label", "ed", "es", "frames"}}}``."""
    items = json.loads((test / "datalist.json").read_text())["training"]
    out: dict[str, dict] = {}
    for s_index, (name, (fraction, kinds, strength)) in enumerate(SCENARIOS.items()):
        folder = work / "scenarios" / name
        record_path = folder / "frames.json"
        if record_path.is_file():
            out[name] = json.loads(record_path.read_text())
            continue
        folder.mkdir(parents=True, exist_ok=True)
        cases = {}
        for c_index, item in enumerate(items):
            src = test / item["image"]
            image, meta = load_cine(src)  # (T, X, Y, Z)
            rng = np.random.default_rng([seed, s_index, c_index])
            n = image.shape[0]
            frames = sorted(rng.choice(n, size=max(1, round(fraction * n)), replace=False).tolist())
            spacing = [float(s) for s in meta.spacing[:3]]
            corrupted, records = corrupt_cine(image, frames, kinds, strength, spacing, rng)
            target = folder / f"{item['case_id']}_4d.nii.gz"
            save_cine_like(np.clip(corrupted, 0, None), src, target, dtype=np.float32)
            cases[item["case_id"]] = {"image": str(target), "label": str(test / item["label"]),
                                      "ed": item["ed"], "es": item["es"], "corrupted": records}
        record_path.write_text(json.dumps(cases, indent=1))
        out[name] = cases
    return out


def seeded(name: str, seed: int) -> str:
    """Folder name of a variant's run (and predictions) trained with ``train.seed=seed``: seed 0, the
    config's own, keeps the plain name, so folders of single-seed runs are reused."""
    return name if seed == 0 else f"{name}-seed{seed}"


def train_variant(work: Path, name: str, config: Path, train: Path, extra: list[str], retrain: bool,
                  seed: int = 0) -> float | None:
    run_dir = work / "runs" / seeded(name, seed)
    best = run_dir / "checkpoints" / "best.pt"
    timing = run_dir / "train_seconds.txt"
    if best.is_file() and not retrain:
        return float(timing.read_text()) if timing.is_file() else None
    if run_dir.exists():
        subprocess.call(["rm", "-rf", str(run_dir)])
    seed_override = [f"train.seed={seed}"] if seed else []
    seconds = _run([sys.executable, "-m", "trunet", "train", "--config", str(config), "--data", str(train),
                    "--run-dir", str(run_dir), "tracking.wandb.mode=disabled", *VARIANTS[name], *extra,
                    *seed_override],
                   work / f"train-{seeded(name, seed)}.log")
    timing.write_text(f"{seconds:.1f}\n")
    return seconds


def _reference(path: str) -> np.ndarray:
    return np.moveaxis(np.asarray(nib.load(path).dataobj), -1, 0).astype(np.uint8)  # (T, X, Y, Z)


def _prediction(path: Path) -> np.ndarray:
    return np.moveaxis(np.asarray(nib.load(str(path)).dataobj), -1, 0).astype(np.uint8)


def smoothed_labels(pred_dir: Path, case_id: str, sigma: float) -> np.ndarray:
    """A variant's saved probabilities, Gaussian-smoothed over time (cyclic), arg-max, largest components."""
    probs = []
    for k, name in enumerate(("background", *CLASSES)):
        p = np.asarray(nib.load(str(pred_dir / f"{case_id}_prob_{k}_{name}.nii.gz")).dataobj, dtype=np.float32)
        probs.append(gaussian_filter1d(p, sigma, axis=-1, mode="wrap"))
    stacked = np.moveaxis(np.stack(probs), -1, 0)  # (T, K, X, Y, Z)
    labels = probabilities_to_labels(stacked, class_axis=1)
    return keep_largest_components(labels, classes=range(1, len(CLASSES) + 1))


def lv_slice_wrong(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, min_ml: float = 2.0) -> bool:
    """Whether one frame's LV cavity ``(X, Y, Z)`` has a slice drawn wrong as a whole: its area differs from
    the reference's by more than half of the larger of the two, and by more than ``min_ml`` mL.

    A short-axis slice is 5-10 mm thick, so at the base the question is often which slices hold ventricle at
    all, and one slice decided wrong at ED or ES moves that case's EF by 10 points or more; partial volume
    at the apex (a few voxels) is not counted."""
    area_pred = (pred == 3).sum(axis=(0, 1)).astype(np.int64)
    area_ref = (ref == 3).sum(axis=(0, 1)).astype(np.int64)
    diff = np.abs(area_pred - area_ref)
    return bool(np.any((diff > 0.5 * np.maximum(area_pred, area_ref)) & (diff * voxel_ml > min_ml)))


def score(pred: np.ndarray, ref: np.ndarray, case: dict, spacing) -> dict:
    """Per-frame mean Dice over the three structures, EF errors and LV curve roughness of one case."""
    p = one_hot(torch.as_tensor(pred, dtype=torch.int64)[:, None], 4)
    r = one_hot(torch.as_tensor(ref, dtype=torch.int64)[:, None], 4)
    dice = compute_dice(p, r, include_background=False, ignore_empty=True).double().numpy()  # (T, 3)
    per_frame = np.nanmean(dice, axis=1)
    corrupted = np.zeros(len(per_frame), dtype=bool)
    corrupted[[rec["frame"] for rec in case["corrupted"]]] = True
    vp, vr = class_volumes(pred, 4, spacing), class_volumes(ref, 4, spacing)
    ed, es = case["ed"], case["es"]
    ef = {}
    for name, c in (("LV", 3), ("RV", 1)):
        ef[name] = abs(ventricle_indices(vp[ed, c], vp[es, c])["EF"] - ventricle_indices(vr[ed, c], vr[es, c])["EF"])

    def rough(curve: np.ndarray) -> float:
        return float(np.mean(np.abs(np.roll(curve, 1) - 2 * curve + np.roll(curve, -1))))

    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {"dice_corrupted": per_frame[corrupted].tolist(), "dice_clean": per_frame[~corrupted].tolist(),
            "dice_es": float(per_frame[es]), "lv_ef_err": ef["LV"], "rv_ef_err": ef["RV"],
            "rough": rough(vp[:, 3]), "rough_ref": rough(vr[:, 3]),
            "lv_slice_wrong": sum(lv_slice_wrong(pred[t], ref[t], voxel_ml) for t in (ed, es))}


POSTPROCESSING = ("+smooth", "+repair", "+basal", "+default", "+tta")
"""Suffixes of a variant name: the source variant's model predicted with other inference options, or its
predictions post-processed (over time, or at the base)."""
PREDICT_OFF = {"repair_frames": False, "exclude_atrium": False, "tta": False}
""":func:`run_prediction` options of every variant without a suffix of :data:`PREDICT_OPTIONS`: the
network's masks (``infer.repair_frames``, ``infer.exclude_atrium``, ``infer.tta`` off)."""
PREDICT_OPTIONS = {
    "+repair": {**PREDICT_OFF, "repair_frames": True},
    "+basal": {**PREDICT_OFF, "exclude_atrium": True},
    "+default": {**PREDICT_OFF, "repair_frames": True, "exclude_atrium": True},
    "+tta": {"repair_frames": True, "exclude_atrium": True, "tta": True},
}
""":func:`run_prediction` options per suffix (``+default``: as ``trunet predict`` runs by default)."""


def split_variant(variant: str) -> tuple[str, str]:
    """``"temporal+repair"`` -> ``("temporal", "+repair")``; ``"frame"`` -> ``("frame", "")``."""
    for suffix in POSTPROCESSING:
        if variant.endswith(suffix):
            return variant[: -len(suffix)], suffix
    return variant, ""


def evaluate_variant(work: Path, variant: str, scenarios: dict[str, dict], sigma: float,
                     probabilities: bool = False, seed: int = 0) -> dict[str, dict]:
    """Scores of one variant (its model trained with ``train.seed=seed``) per scenario; ``probabilities``:
    save them when predicting (a ``+smooth`` variant of the same model follows). A ``+repair``, ``+basal``,
    ``+default`` or ``+tta`` variant is the source checkpoint predicted by ``trunet predict``'s own path
    with the options of :data:`PREDICT_OPTIONS`; every other variant is predicted with all of them off."""
    source, post = split_variant(variant)
    ckpt = work / "runs" / seeded(source, seed) / "checkpoints" / "best.pt"
    results = {}
    for scenario, cases in scenarios.items():
        pred_dir = work / "pred" / seeded(variant if post in PREDICT_OPTIONS else source, seed) / scenario
        needed = [f"{cid}_seg.nii.gz" for cid in cases]
        if post == "+smooth":  # the probabilities too (saved by any variant's prediction when asked)
            needed += [f"{cid}_prob_0_background.nii.gz" for cid in cases]
        if not all((pred_dir / name).is_file() for name in needed):
            if pred_dir.exists():
                subprocess.call(["rm", "-rf", str(pred_dir)])
            run_prediction(ckpt, work / "scenarios" / scenario, pred_dir,
                           save_probabilities=post == "+smooth" or (probabilities and not post),
                           cpu_bf16=False, **PREDICT_OPTIONS.get(post, PREDICT_OFF))
        rows = []
        for cid, case in cases.items():
            ref = _reference(case["label"])
            if post == "+smooth":
                pred = smoothed_labels(pred_dir, cid, sigma)
            else:
                pred = _prediction(pred_dir / f"{cid}_seg.nii.gz")
            spacing = nib.load(case["label"]).header.get_zooms()[:3]
            rows.append(score(pred, ref, case, spacing))
        results[scenario] = {
            "dice_corrupted": float(np.mean(sum((r["dice_corrupted"] for r in rows), []))),
            "dice_clean": float(np.mean(sum((r["dice_clean"] for r in rows), []))),
            "dice_es": float(np.mean([r["dice_es"] for r in rows])),
            "lv_ef_err": float(np.mean([r["lv_ef_err"] for r in rows])),
            "rv_ef_err": float(np.mean([r["rv_ef_err"] for r in rows])),
            "rough": float(np.mean([r["rough"] for r in rows])),
            "rough_ref": float(np.mean([r["rough_ref"] for r in rows])),
            "lv_slice_wrong": float(sum(r["lv_slice_wrong"] for r in rows)),
            "ed_es_volumes": float(2 * len(rows)),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-temporal"), help="work folder (reused)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--train-cases", type=int, default=40)
    parser.add_argument("--test-cases", type=int, default=6)
    parser.add_argument("--variants", default="shipped,frame,frame+smooth,temporal",
                        help="comma-separated: " + ", ".join(VARIANTS) + "; any of them + " + " or ".join(POSTPROCESSING))
    parser.add_argument("--smooth-sigma", type=float, default=1.0, help="frame+smooth: Gaussian sigma in frames")
    parser.add_argument("--seed", type=int, default=0, help="corruption seed")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: " + ", ".join(SCENARIOS))
    parser.add_argument("--train-seeds", default="0",
                        help="comma-separated training seeds (train.seed): every variant is trained once per "
                             "seed; the table gives the mean over seeds, and a second table each seed's row")
    parser.add_argument("--retrain", action="store_true", help="train even where a checkpoint exists")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every variant's training")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one table at the end, no progress bars in the log
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if split_variant(v)[0] not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    for v in [v for v in variants if split_variant(v)[1]]:
        if split_variant(v)[0] not in variants:
            variants.insert(0, split_variant(v)[0])
    try:
        seeds = sorted({int(x) for x in args.train_seeds.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--train-seeds: comma-separated integers, got {args.train_seeds!r}")
    if not seeds or min(seeds) < 0:
        parser.error(f"--train-seeds: one or more integers >= 0, got {args.train_seeds!r}")
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not chosen or any(s not in SCENARIOS for s in chosen):
        parser.error(f"--scenarios: choose from {list(SCENARIOS)}, got {args.scenarios!r}")

    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.platform()}")
    print(f"date: {_dt.datetime.now():%Y-%m-%d %H:%M}")
    args.work.mkdir(parents=True, exist_ok=True)
    train, test = make_data(args.work, args.train_cases, args.test_cases)
    scenarios = {k: v for k, v in make_scenarios(args.work, test, args.seed).items() if k in chosen}
    for name, cases in scenarios.items():
        n_corr = sum(len(c["corrupted"]) for c in cases.values())
        print(f"scenario {name}: {len(cases)} cines, {n_corr} corrupted frames")

    seconds: dict[str, dict[int, float | None]] = {}
    for v in variants:
        if v in VARIANTS:
            seconds[v] = {}
            for seed in seeds:
                t = train_variant(args.work, v, args.config, train, args.overrides, args.retrain, seed)
                seconds[v][seed] = t
                print(f"trained {seeded(v, seed)}: " + (f"{t:.0f} s" if t else "reused"), flush=True)
    for v in variants:
        if split_variant(v)[1]:
            seconds[v] = seconds[split_variant(v)[0]]

    results = {v: {seed: evaluate_variant(args.work, v, scenarios, args.smooth_sigma, f"{v}+smooth" in variants,
                                          seed)
                   for seed in seeds}
               for v in variants}
    (args.work / "results.json").write_text(json.dumps({"seeds": seeds, "results": results,
                                                        "train_seconds": seconds}, indent=1))

    def table(title: str, rows: list[tuple[str, str, dict, float | None]]) -> None:
        print(f"\n{title}\n")
        print("| scenario | variant | Dice corrupted frames | Dice clean frames | Dice at ES | LV EF error | "
              "RV EF error | LV roughness (ref) | ED/ES LV with a slice wrong | training |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for scenario, label, r, t in rows:
            print(f"| {scenario} | {label} | {r['dice_corrupted']:.3f} | {r['dice_clean']:.3f} | "
                  f"{r['dice_es']:.3f} | {r['lv_ef_err']:.1f} | {r['rv_ef_err']:.1f} | "
                  f"{r['rough']:.1f} ({r['rough_ref']:.1f}) mL | {r['lv_slice_wrong']:.3g} of "
                  f"{r['ed_es_volumes']:.0f} | {'n/a' if t is None else f'{t:.0f} s'} |")

    def mean(values: list) -> float | None:
        return None if any(x is None for x in values) else float(np.mean(values))

    table(f"mean over training seeds {seeds}" if len(seeds) > 1 else f"training seed {seeds[0]}",
          [(scenario, v, {k: float(np.mean([results[v][seed][scenario][k] for seed in seeds]))
                          for k in results[v][seeds[0]][scenario]},
            mean([seconds[v][seed] for seed in seeds]))
           for scenario in scenarios for v in variants])
    if len(seeds) > 1:
        table("each training seed",
              [(scenario, f"{v}, seed {seed}", results[v][seed][scenario], seconds[v][seed])
               for scenario in scenarios for v in variants for seed in seeds])
    return 0


if __name__ == "__main__":
    sys.exit(main())
