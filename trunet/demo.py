"""The main job on the built-in phantom, end to end: ``make demo`` / ``python -m trunet.demo``.

Steps, each through the same command line a user types:

1. ``trunet phantom`` writes training cases (``OUT/data``) and held-out cases from another seed
   (``OUT/heldout``); both are reused when they already exist.
2. ``trunet train --config configs/demo.yaml --data OUT/data --run-dir OUT/run-<time>``: the training cases'
   ACDC layout, i.e. their ED and ES labels only, as ACDC and most clinical data sets are labelled (the
   dense labels are the held-out reference). On this CPU it beat training on every frame's labels in the
   same time: each step decodes only the labelled frames, so twice the steps fit (BENCHMARKS.md, "Time").
3. ``trunet predict`` segments every frame of the held-out cines with ``best.pt``.
4. ``trunet evaluate`` compares them with the phantom's dense reference labels.

It ends by printing Dice per class, the EF agreement, where the figures are, and the W&B offline run
with the ``wandb sync`` command that uploads it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from trunet.cli import main as trunet_main
from trunet.config import load_config

__all__ = ["main"]

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _step(title: str, argv: list[str]) -> float:
    print(f"\n=== {title}\n$ trunet {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = trunet_main(argv)
    if code != 0:
        raise SystemExit(f"demo: step '{title}' failed (exit {code})")
    seconds = time.perf_counter() - start
    print(f"--- {title}: {seconds:.0f} s", flush=True)
    return seconds


def _phantom(folder: Path, cases: int, seed: int, title: str) -> float:
    if (folder / "datalist.json").is_file():
        print(f"\n=== {title}: reusing {folder}", flush=True)
        return 0.0
    return _step(title, ["phantom", "--out", str(folder), "--cases", str(cases), "--seed", str(seed)])


def _fmt(value: object, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _print_summary(summary: dict, run_dir: Path, eval_dir: Path, timings: dict[str, float]) -> None:
    metrics = summary.get("metrics", {})
    classes = [c for c in summary.get("classes", [])[1:]]
    print("\n================ trunet demo: results on held-out phantom cases ================")
    print(f"cases evaluated: {summary.get('n_cases')}")
    print("Dice per class (mean over all labelled frames; ED; ES):")
    for name in classes:
        row = [metrics.get(f"dice_{name}_{suffix}", {}).get("mean") for suffix in ("mean", "ed", "es")]
        print(f"  {name:<4} {_fmt(row[0])}   ED {_fmt(row[1])}   ES {_fmt(row[2])}")
    agreement = summary.get("agreement", {})
    for key in ("LV_EF", "RV_EF"):
        a = agreement.get(key)
        if a:
            print(f"{key} (%): bias {_fmt(a.get('bias'), '+.1f')}, limits of agreement "
                  f"[{_fmt(a.get('loa_lower'), '.1f')}, {_fmt(a.get('loa_upper'), '.1f')}], "
                  f"r = {_fmt(a.get('pearson_r'), '.2f')}, n = {a.get('n')}")
    figures = sorted((eval_dir / "figures").glob("*.png"))
    print(f"report: {eval_dir / 'summary.json'}, {eval_dir / 'per_case.csv'}, {eval_dir / 'per_frame.csv'}")
    print("figures:")
    for path in figures:
        print(f"  {path}")
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if runs:
        print(f"W&B offline run: {runs[-1]}")
        print(f"  upload it with: wandb sync {runs[-1]}")
    print("time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trunet.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="demo folder (default: demo)")
    parser.add_argument("--config", type=Path, default=REPO_CONFIG, help="training config (default: configs/demo.yaml)")
    parser.add_argument("--heldout-cases", type=int, default=4, help="held-out cases to predict (default: 4)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.overrides)
    out: Path = args.out
    data_dir, heldout_dir = out / "data", out / "heldout"
    run_dir = out / f"run-{datetime.now():%Y%m%d-%H%M%S}"
    pred_dir, eval_dir = run_dir / "pred", run_dir / "eval"

    timings: dict[str, float] = {}
    start = time.perf_counter()
    timings["phantom"] = _phantom(data_dir, config.data.phantom_cases, config.data.phantom_seed, "phantom: training cases")
    # A seed far from the training seed: the held-out patients share no random draws with training.
    timings["phantom"] += _phantom(heldout_dir, args.heldout_cases, config.data.phantom_seed + 1000,
                                   "phantom: held-out cases")
    timings["train"] = _step("train", ["train", "--config", str(args.config), "--data", str(data_dir),
                                       "--run-dir", str(run_dir), *args.overrides])
    timings["predict"] = _step("predict", ["predict", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"),
                                           "--input", str(heldout_dir / "datalist.json"), "--output", str(pred_dir)])
    timings["evaluate"] = _step("evaluate", ["evaluate", "--pred", str(pred_dir), "--ref",
                                             str(heldout_dir / "datalist.json"), "--out", str(eval_dir)])
    timings["total"] = time.perf_counter() - start
    summary = json.loads((eval_dir / "summary.json").read_text())
    _print_summary(summary, run_dir, eval_dir, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
