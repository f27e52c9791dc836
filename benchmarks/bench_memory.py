"""Training memory: the planner's estimate against measurement on the CPU, and the memory savers.

Two tables, printed as markdown with the command, machine and date:

* ``--validate``: for three small configs, the estimate (``trunet.pipeline.planning.estimate_memory`` with
  ``device_type="cpu"``) against (a) the saved-tensor bytes measured directly at the full size
  (``saved_tensors_hooks``, deduplicated by storage) and the live bytes at the end of forward, and (b) the
  process's peak memory in one train step.
* ``--savers``: gradient checkpointing, bf16 autocast and ConvLSTM at the bottleneck only, alone and
  together, on one small config: estimated peak (CPU and CUDA accounting), measured peak, CPU step time.

Peak memory is measured in a fresh subprocess per configuration: the growth of the peak resident set
(``VmHWM`` of ``/proc/self/status``) from after model, optimizer and batch creation to after one full
train steps (forward under autocast, the trainer's loss, backward, the trainer's optimizer with the
config's settings; two steps, so that the second runs with the first one's optimizer state), with glibc's mmap
threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the system and the
resident set follows the live tensors. The estimate compared with it is ``total - parameters - batch``
(parameters and batch exist before the baseline; no CUDA context on the CPU).

Step time: median of ``--repeats`` steps after one warm-up step, ``--threads`` intra-op threads.

* ``--vram-table``: the largest patch per VRAM size (12, 24, 40, 80 GB) for ``configs/default.yaml``
  (estimates only).

    python benchmarks/bench_memory.py --validate --savers --vram-table --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
from machine import cpu_name

from trunet.models import build_model
from trunet.pipeline import planning
from trunet.pipeline.training.losses import build_criterion
from trunet.config import Config, config_from_dict

MB = 1e6

SMALL_MODEL = {"channels": [16, 32, 64, 128], "strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2]],
               "clstm_levels": "all"}

VALIDATION = {
    # name: (config mapping, batch, time window, patch)
    "demo-arch fp32": (
        {"model": SMALL_MODEL, "train": {"amp": False, "optimizer": "sgd"}}, 1, 4, (64, 64, 8)),
    "demo-arch bf16 + checkpointing, AdamW": (
        {"model": {**SMALL_MODEL, "checkpointing": True}, "train": {"amp": True, "optimizer": "adamw"}},
        2, 4, (64, 64, 8)),
    "default-arch bf16 (deep sup.)": (
        {"model": {"deep_supervision": True}, "train": {"amp": True}}, 1, 3, (64, 64, 4)),
}

SAVERS_BASE = {"model": SMALL_MODEL, "train": {"amp": False, "optimizer": "sgd"}}
SAVERS = {
    # name: overrides of SAVERS_BASE (model, train)
    "baseline: fp32, CLSTM at all levels": ({}, {}),
    "bf16 autocast": ({}, {"amp": True}),
    "checkpointing (stages + time steps)": ({"checkpointing": True}, {}),
    "CLSTM at the bottleneck only": ({"clstm_levels": "bottleneck"}, {}),
    "bf16 + checkpointing": ({"checkpointing": True}, {"amp": True}),
    "bf16 + checkpointing + bottleneck": (
        {"checkpointing": True, "clstm_levels": "bottleneck"}, {"amp": True}),
}
SAVERS_SIZE = (1, 6, (64, 64, 8))  # batch, time window, patch


def _config(mapping: dict[str, Any]) -> Config:
    return config_from_dict(mapping, source="<bench_memory>")


def _maxrss_bytes() -> int:
    """Peak resident set of this process: ``VmHWM`` (per address space, so reset by exec; ``ru_maxrss``
    would start from the parent's peak in a subprocess), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: one measured train step (peak RSS growth), then timed steps."""
    torch.set_num_threads(spec["threads"])
    config = _config(spec["config"])
    b, t, patch = spec["batch"], spec["time"], tuple(spec["patch"])
    torch.manual_seed(0)
    model = build_model(config)
    criterion = build_criterion(config)
    t_cfg = config.train  # the trainer's optimizers, with the config's settings
    if t_cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=t_cfg.lr, momentum=t_cfg.momentum, nesterov=True,
                                    weight_decay=t_cfg.weight_decay)
    image = torch.randn(b, t, 1, *patch)
    label = torch.randint(0, len(config.data.classes), (b, t, *patch))
    mask = torch.ones(b, t, dtype=torch.bool)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if config.train.amp else nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp:
            out = model(image)
        loss = criterion(out, label, mask)
        del out
        loss.backward()
        optimizer.step()

    base = _maxrss_bytes()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()  # the steady state: the optimizer state of the step before is alive during backward
    peak = _maxrss_bytes() - base
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times) if times else first
    return {"peak_rss_growth": peak, "first_step_s": first, "step_s": median}


def _measure(
    mapping: dict[str, Any], b: int, t: int, patch: tuple[int, int, int], threads: int, repeats: int
) -> dict[str, Any]:
    spec = {"config": mapping, "batch": b, "time": t, "patch": list(patch), "threads": threads,
            "repeats": repeats}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _header(args: argparse.Namespace) -> str:
    cpu = cpu_name()
    return (f"command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  \n"
            f"machine: {cpu}, {os.cpu_count()} cores, {args.threads} thread(s); torch {torch.__version__}; "
            f"no GPU  \n"
            f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}"
            + (f"  \nnote: {args.note}" if args.note else ""))


def validate(args: argparse.Namespace) -> str:
    rows = ["| config | B x T x patch | estimate: live activations MB | "
            "measured: saved-tensor MB (live MB) | "
            "estimate: step peak MB | measured: peak RSS growth MB | estimate / measured |",
            "|---|---|---|---|---|---|---|"]
    for name, (mapping, b, t, patch) in VALIDATION.items():
        config = _config(mapping)
        est = planning.estimate_memory(config, patch, t, b, device_type="cpu")
        model = build_model(config, initialise=False)
        probe = planning.probe_activations(config, model, build_criterion(config), b, t, patch)
        del model
        measured = _measure(mapping, b, t, patch, args.threads, 0)
        step_est = est.total - est.parameters - est.batch
        rows.append(
            f"| {name} | {b} x {t} x {'x'.join(map(str, patch))} | {est.activations / MB:.1f} | "
            f"{probe.saved / MB:.1f} ({probe.live / MB:.1f}) | {step_est / MB:.1f} | "
            f"{measured['peak_rss_growth'] / MB:.1f} | "
            f"{step_est / max(1, measured['peak_rss_growth']):.2f} |")
    return "\n".join(rows)


def savers(args: argparse.Namespace) -> str:
    b, t, patch = SAVERS_SIZE
    rows = [f"B x T x patch = {b} x {t} x {'x'.join(map(str, patch))}, "
            f"model channels {SMALL_MODEL['channels']}, "
            f"SGD; CPU step time: median of {args.repeats} steps after two.",
            "",
            "| variant | est. activations MB | est. step peak MB (CPU) | est. total GB (CUDA) | "
            "measured peak RSS growth MB | CPU step s |",
            "|---|---|---|---|---|---|"]
    for name, (model_over, train_over) in SAVERS.items():
        mapping = {"model": {**SAVERS_BASE["model"], **model_over},
                   "train": {**SAVERS_BASE["train"], **train_over}}
        config = _config(mapping)
        est = planning.estimate_memory(config, patch, t, b, device_type="cpu")
        cuda = planning.estimate_memory(config, patch, t, b, device_type="cuda")
        measured = _measure(mapping, b, t, patch, args.threads, args.repeats)
        rows.append(
            f"| {name} | {est.activations / MB:.1f} | {(est.total - est.parameters - est.batch) / MB:.1f} | "
            f"{cuda.gb():.3f} | {measured['peak_rss_growth'] / MB:.1f} | {measured['step_s']:.2f} |")
    return "\n".join(rows)


DEFAULT_SAVERS = {
    # name: overrides of configs/default.yaml (its patch, time window and batch)
    "as configured: bf16, CLSTM at all levels": [],
    "fp32 (AMP off)": ["train.amp=false"],
    "checkpointing (stages + time steps)": ["model.checkpointing=true"],
    "CLSTM at the bottleneck only": ["model.clstm_levels=bottleneck"],
    "checkpointing + bottleneck": ["model.checkpointing=true", "model.clstm_levels=bottleneck"],
}


def default_savers() -> str:
    """Estimates only (no GPU here): the savers at configs/default.yaml's size, CUDA accounting."""
    from pathlib import Path

    from trunet.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    rows = []
    for name, overrides in DEFAULT_SAVERS.items():
        config = load_config(path, overrides)
        est = planning.estimate_memory(config)
        if not rows:
            t = config.train
            rows += [f"configs/default.yaml: B x T x patch = {t.batch_size} x {t.time_window} x "
                     f"{'x'.join(map(str, t.patch_size))}; estimates (CUDA accounting), not measured.", "",
                     "| variant | parameters GB | activations GB (saved for backward) | "
                     "backward workspace GB | "
                     "estimated peak GB |", "|---|---|---|---|---|"]
        rows.append(f"| {name} | {est.gb('parameters'):.3f} | {est.gb('activations'):.2f} "
                    f"({est.gb('saved_tensors'):.2f}) | {est.gb('workspace'):.2f} | {est.gb():.2f} |")
    return "\n".join(rows)


def vram_table(sizes: tuple[int, ...] = (12, 24, 40, 80), headroom: float = 0.1, frames: int = 12) -> str:
    """Largest patch per VRAM size for configs/default.yaml: the planner's choice, and the largest patch of
    the planner's ladder at ``frames`` frames and batch 2, without and with checkpointing (estimates)."""
    from pathlib import Path

    from trunet.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    configs = [load_config(path), load_config(path, ["model.checkpointing=true"])]
    rows = [f"| VRAM | usable | planner's choice (T, batch, patch x, y, z) | estimate | "
            f"largest patch at T = {frames}, "
            "batch 2 | estimate | same with checkpointing | estimate |", "|---|---|---|---|---|---|---|---|"]
    for vram in sizes:
        result = planning.plan(configs[0], vram, headroom)
        c = result.chosen
        row = (f"| {vram} GB | {result.budget / planning.GB:.1f} GB | "
               f"T = {c.time_window}, B = {c.batch_size}, "
               f"{' x '.join(map(str, c.patch_size))} | {c.total / planning.GB:.1f} GB ")
        for config in configs:
            fits = [(p, e) for p in result.ladder
                    if (e := planning.estimate_memory(config, p, frames, 2).total) <= result.budget]
            if fits:
                patch, est = fits[-1]
                cap = " (cap)" if patch == result.ladder[-1] else ""
                row += f"| {' x '.join(map(str, patch))}{cap} | {est / planning.GB:.1f} GB "
            else:
                row += "| none fits | - "
        rows.append(row + "|")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validate", action="store_true", help="estimate vs measurement, three configs")
    parser.add_argument("--savers", action="store_true", help="memory savers on one small config")
    parser.add_argument("--vram-table", action="store_true", help="largest patch per VRAM size (estimates)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per saver variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--note", default="", help="a note printed in the header (e.g. 'machine shared')")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    if not (args.validate or args.savers or args.vram_table):
        args.validate = args.savers = args.vram_table = True
    print(_header(args))
    if args.validate:
        print("\n### Estimate against measurement (CPU)\n")
        print(validate(args))
    if args.savers:
        print("\n### Memory savers (CPU)\n")
        print(savers(args))
        print("\n### Memory savers at the default config (estimated)\n")
        print(default_savers())
    if args.vram_table:
        print("\n### Largest patch per VRAM size (configs/default.yaml, estimated)\n")
        print(vram_table())


if __name__ == "__main__":
    main()
