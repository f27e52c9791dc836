"""Train-step time on sparse (ED/ES) labels: decoding the labelled frames only against decoding every frame.

With ACDC's labels, a training window of ``T`` frames holds one labelled frame (two when ED and ES are
close). :meth:`trunet.pipeline.training.trainer.Trainer.step` runs every frame through the encoder and the
ConvLSTMs but only the labelled ones through the decoder and the loss. The baseline is the same batch with
every frame decoded, the unlabelled frames' voxels set to ``ignore_index`` so that they count in neither
loss term: the same loss (checked first, to float rounding), as the trainer computed it before.

Both run the real ``Trainer.step`` (model, loss, optimizer, bf16 autocast of the config) on a random batch
of the config's size with one labelled frame per sample; steps alternate between the two forms so a drift of
the machine's speed hits both alike. Median of ``--steps`` after ``--warmup``.

    python benchmarks/bench_train_step.py --config configs/demo.yaml --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_check import bare_trainer, random_batch
from machine import cpu_name

from trunet.config import load_config
from trunet.pipeline.training.signals import StopRequest

REPO = Path(__file__).resolve().parents[1]


def sparse_batches(config, seed: int = 0) -> tuple[dict, dict]:
    """``(labelled frames only, every frame decoded)``: one random batch, one labelled frame per sample."""
    batch = random_batch(config, seed)
    b, t = batch["frame_mask"].shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[torch.arange(b), torch.randint(0, t, (b,), generator=g)] = True
    label = batch["label"].clone()
    label[~mask] = config.data.ignore_index
    sparse = {**batch, "label": label, "frame_mask": mask}
    dense = {**batch, "label": label, "frame_mask": torch.ones(b, t, dtype=torch.bool)}
    return sparse, dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each form")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo trainer uses 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = (torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16) \
        if config.train.amp else None
    sparse, dense = sparse_batches(config)
    stop = StopRequest()
    times: dict[str, list[float]] = {"labelled frames decoded": [], "every frame decoded": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: bare_trainer(config, device, Path(tmp) / str(i), amp)
                    for i, name in enumerate(times)}
        for trainer in trainers.values():  # same start weights: compare the losses of the first step
            trainer.model.load_state_dict(trainers["every frame decoded"].model.state_dict())
        losses = {name: trainers[name].step(batch, stop)[0]
                  for name, batch in zip(times, (sparse, dense))}
        for i in range(args.warmup + args.steps):
            for name, batch in zip(times, (sparse, dense)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainers[name].step(batch, stop)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    t = config.train
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), "
          f"{platform.platform()}; device {device}; autocast {amp}")
    print(f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}")
    resolved = args.config.resolve()
    shown = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else args.config
    print(f"config: {shown} {' '.join(args.overrides)}: batch {t.batch_size} x window {t.time_window} x "
          f"patch {tuple(t.patch_size)}, one labelled frame per sample; median of {args.steps} steps after "
          f"{args.warmup}")
    print(f"first-step loss: labelled frames decoded {losses['labelled frames decoded']:.6f}, every frame "
          f"decoded {losses['every frame decoded']:.6f}")
    base = statistics.median(times["every frame decoded"])
    print("\n| form | step (ms), median | min - max | speed-up |\n|---|---:|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1000 * med:.0f} | {1000 * min(values):.0f} - {1000 * max(values):.0f} | "
              f"{base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
