"""Training-loader throughput against the train step it feeds, at the demo config, on phantom cases.

Loader: ``trunet.pipeline.training.loaders.build_train_loader`` with the config's workers (demo: 2) and cache (demo:
memory), i.e. temporal window, foreground-oversampled patch with rotation/scaling, mirroring and
intensity augmentation per sample. The one-time cost of building the cache (loading, resampling,
normalising every case) is reported apart. Samples/s = batches x batch size / wall time of the timed
batches, after warm-up batches.

Train step (for comparison, when ``trunet.models.TimeResolvedUNet`` exists): forward, cross-entropy on
labelled frames (``ignore_index``), backward, AdamW step, on one pre-loaded batch of the same shape, on
the chosen device. The loader keeps up when its samples/s is at least the train step's.

    python benchmarks/bench_loader.py --config configs/demo.yaml --cases 8 --batches 40
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_name

from trunet.data.phantom import write_phantom_dataset
from trunet.config import load_config
from trunet.data.cases import read_datalist
from trunet.pipeline.precision import autocast_dtype
from trunet.pipeline.training.loaders import build_train_loader


def _machine(device: torch.device) -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs{gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def bench_loader(config, cases, target_spacing, batches: int, warmup: int, cache_dir: Path) -> dict:
    t0 = time.perf_counter()
    loader = build_train_loader(config, cases, target_spacing, cache_dir)
    build_s = time.perf_counter() - t0
    it = iter(loader)
    times = []
    done = 0
    t_start = None
    shape = None
    while done < warmup + batches:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        done += 1
        shape = tuple(batch["image"].shape)
        if done == warmup:
            t_start = time.perf_counter()
        elif done > warmup:
            times.append(time.perf_counter())
    wall = times[-1] - t_start
    return {"build_s": build_s, "batches": batches, "wall_s": wall,
            "samples_per_s": batches * config.train.batch_size / wall, "batch_shape": shape}


def bench_train_step(config, batch_shape, device: torch.device, steps: int, warmup: int) -> dict | None:
    try:
        from trunet.models import TimeResolvedUNet
    except ImportError as exc:
        print(f"train step: skipped, trunet.models.TimeResolvedUNet not available ({exc})")
        return None
    classes = len(config.data.classes)
    hparams = dataclasses.asdict(config.model)
    model = TimeResolvedUNet(in_channels=1, out_channels=classes, **hparams).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    b, t = batch_shape[:2]
    image = torch.randn(batch_shape, device=device)
    label = torch.randint(0, classes, batch_shape, device=device)
    label[:, 1::2] = config.data.ignore_index  # sparse labels, as in training
    amp = config.train.amp and device.type == "cuda"
    dtype = autocast_dtype("cuda") if amp else torch.float16
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = model(image.unsqueeze(2))  # (B, T, K, X, Y, Z)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), label.flatten(0, 1),
                                   ignore_index=config.data.ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step_s": step, "samples_per_s": b / step, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--cases", type=int, default=8, help="phantom cases to generate (the config's count if 0)")
    p.add_argument("--data", type=Path, default=None, help="reuse a phantom folder (with datalist.json)")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps (0: skip the model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = ["train.iterations_per_epoch=1000"]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    config = load_config(args.config, overrides)
    print(f"command: python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}")
    print(f"machine: {_machine(device)}; torch threads {torch.get_num_threads()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")

    with tempfile.TemporaryDirectory(prefix="trunet-bench-") as tmp:
        if args.data is None:
            n = args.cases or config.data.phantom_cases
            t0 = time.perf_counter()
            datalist = write_phantom_dataset(Path(tmp) / "phantom", cases=n, seed=config.data.phantom_seed)
            print(f"phantom: {n} cases generated in {time.perf_counter() - t0:.1f} s")
        else:
            datalist = args.data / "datalist.json"
        cases = read_datalist(datalist).training
        spacing = tuple(config.data.target_spacing or (1.5, 1.5, 8.0))
        t = config.train
        print(f"config: {args.config}: patch {list(t.patch_size)}, time window {t.time_window}, "
              f"batch {t.batch_size}, target spacing {list(spacing)}, cache {config.data.cache}, "
              f"workers {config.data.num_workers}")
        res = bench_loader(config, cases, spacing, args.batches, args.warmup, Path(tmp) / "cache")
        print(f"loader: cache built in {res['build_s']:.1f} s for {len(cases)} cases; "
              f"{res['batches']} batches {res['batch_shape']} in {res['wall_s']:.2f} s = "
              f"{res['samples_per_s']:.1f} samples/s "
              f"({res['samples_per_s'] / t.batch_size:.1f} batches/s)")
        if args.steps > 0:
            step = bench_train_step(config, res["batch_shape"], device, args.steps, warmup=2)
            if step is not None:
                verdict = "keeps up" if res["samples_per_s"] >= step["samples_per_s"] else "does NOT keep up"
                print(f"train step ({device.type}, median of {step['steps']}): "
                      f"{step['step_s'] * 1000:.0f} ms = "
                      f"{step['samples_per_s']:.1f} samples/s; loader/train = "
                      f"{res['samples_per_s'] / step['samples_per_s']:.1f}x: the loader {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
