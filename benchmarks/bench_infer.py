"""Inference benchmark: seconds and peak memory to segment one ACDC-sized cine, end to end.

End to end = :func:`trunet.pipeline.inference.run_prediction` on a 4D NIfTI: load the checkpoint, read and
preprocess the scan, sliding-window prediction of every frame, inverse transforms back to the scan's grid,
largest-component post-processing and the atomic write of ``<case>_seg.nii.gz``. The model is the
architecture of ``configs/default.yaml`` with random weights (speed does not depend on training); the scan
is synthetic (a pulsing bright ellipse in noise), by default 30 frames of 256 x 216 x 10 voxels at
1.5 x 1.5 x 10 mm, the size of an ACDC cine, with the target spacing equal to the scan's.

Paths compared in one run (``--paths``):

* ``before``: the path before streaming: float32 on the CPU, and a causal model's series cut into time
  windows whose shared context frames are recomputed (45 frame-passes for 30 frames);
* ``float32``: float32, the series streamed with the ConvLSTM state carried from chunk to chunk, which
  equals one pass over all frames (the label reference);
* ``fast``: what ``trunet predict`` does by default: streamed, bf16 autocast on a CPU with bf16 instructions.

Each (path, TTA) setting runs in a fresh process, so the peak resident memory (``ru_maxrss``, which counts
torch's allocations, unlike ``tracemalloc``) belongs to that setting alone. Each setting's labels are compared
with the ``float32`` labels of the same TTA setting where that ran: the agreement is the fraction of voxels
(all frames) with the same label.

Usage::

    python benchmarks/bench_infer.py                      # 30 x 256 x 216 x 10, all paths, TTA off; fast with TTA
    python benchmarks/bench_infer.py --device cuda        # on a GPU (adds peak CUDA memory)
    python benchmarks/bench_infer.py --frames 2 --settings fast:off  # a quick check that it runs

Prints the command, the machine, the date, the network's work for the case (convolution GFLOP per frame and
window, counted on the ``meta`` device, times windows and frames) and one line per setting with its useful
throughput: that work over the predictor's seconds (the ``before`` path computes 45 frame-passes for 30 frames, so
its hardware throughput is 1.5x its useful one). Work over the CPU's convolution throughput is the floor no
scheduling can beat without changing the network.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]


def write_case(folder: Path, frames: int, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """A synthetic cine ``(x, y, z, t)`` float32 NIfTI with ``pixdim[4]`` = 30 ms."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    data = rng.normal(100.0, 20.0, size=(*size, frames)).astype(np.float32)
    for t in range(frames):
        r = 20 + 8 * np.cos(2 * np.pi * t / frames)  # radius in voxels, one beat
        inside = ((x - size[0] / 2) / r) ** 2 + ((y - size[1] / 2) / (0.8 * r)) ** 2 <= 1
        data[inside, :, t] += 300.0
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((*spacing, 30.0))
    path = folder / "bench_4d.nii.gz"
    nib.save(img, path)
    return path


def write_checkpoint(folder: Path, config_path: Path, spacing: tuple[float, float, float]) -> Path:
    """A checkpoint of the config's architecture with random weights."""
    import torch

    from trunet.pipeline.checkpoint import (
        inference_payload, model_from_checkpoint, model_from_hparams, model_hparams, save_checkpoint,
    )
    from trunet.config import load_config
    from trunet.transforms.compose import preprocessing_from_config

    config = load_config(config_path)
    torch.manual_seed(0)
    model = model_from_hparams(model_hparams(config))
    payload = inference_payload(model, config, preprocessing_from_config(config, spacing))
    path = save_checkpoint(folder / "bench.pt", payload)
    model_from_checkpoint(payload)  # fails here, not in the timed run, if the payload is unusable
    return path


def network_work(checkpoint: Path, size: tuple[int, int, int], frames: int) -> tuple[float, int]:
    """The network's work for the case: (GFLOP per frame per window, spatial windows per frame).

    The FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add, convolutions
    alone: everything else is memory-bound and small) on a model built on the ``meta`` device, so counting costs
    no compute; the windows are the predictor's own count for the scan (same rule as MONAI's sliding window).
    A frame's cost is the same in every path (one pass = streamed); TTA multiplies it by the mirrorings.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trunet.pipeline.checkpoint import load_checkpoint, model_from_hparams
    from trunet.pipeline.inference import Predictor
    from trunet.pipeline.inference.run import _infer_config

    payload = load_checkpoint(checkpoint)
    with torch.device("meta"):
        model = model_from_hparams(payload["model_hparams"]).eval()
    predictor = Predictor(model, payload["preprocessing"], _infer_config(payload, checkpoint))
    windows = predictor._num_spatial_windows(size)
    x = torch.empty(1, 1, predictor.in_channels, *predictor.roi_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9, windows


def worker(args: argparse.Namespace) -> None:
    """One timed ``run_prediction`` in this process; prints a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import trunet.pipeline.inference as infer

    predict_seconds = []
    original = infer.Predictor.predict_case
    original_init = infer.Predictor.__init__

    def init(self, *a, **kw):  # the path under test
        original_init(self, *a, **kw)
        if args.path in ("before", "float32"):
            self.amp_on_cpu = False
        if args.path == "before":
            self.streaming = False  # time windows with recomputed context, as before streaming

    infer.Predictor.__init__ = init

    def timed(self, image, description=None):  # time the network part alone as well
        start = time.perf_counter()
        out = original(self, image, description)
        if out.is_cuda:
            torch.cuda.synchronize()
        predict_seconds.append(time.perf_counter() - start)
        return out

    infer.Predictor.predict_case = timed
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    written = infer.run_prediction(
        args.checkpoint, args.image, args.out, device=args.device, tta=args.tta == "on", postprocess=True
    )
    seconds = time.perf_counter() - start
    record = {
        "path": args.path,
        "tta": args.tta,
        "seconds": round(seconds, 2),
        "predict_seconds": round(sum(predict_seconds), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": round(baseline / 1024, 1),
        "threads": torch.get_num_threads(),
        "written": [p.name for p in written],
    }
    if torch.cuda.is_available() and str(args.device).startswith("cuda"):
        record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, nargs=3, default=[256, 216, 10], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 10.0], metavar=("SX", "SY", "SZ"))
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="before:off,float32:off,fast:off,fast:on",
                        help="comma-separated PATH:TTA settings to run, PATH in before, float32, fast; TTA off or on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--tta", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import monai
    import nibabel as nib
    import torch

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date:    {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} logical CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
          f"python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}")
    print(f"case:    {args.frames} frames x {tuple(args.size)} voxels at {tuple(args.spacing)} mm; "
          f"model: {args.config.name} architecture, random weights; device {args.device}")
    with tempfile.TemporaryDirectory(prefix="trunet-bench-infer-") as tmp:
        folder = Path(tmp)
        image = write_case(folder, args.frames, tuple(args.size), tuple(args.spacing))
        checkpoint = write_checkpoint(folder, args.config, tuple(args.spacing))
        from trunet.config import load_config

        config = load_config(args.config)
        print(f"infer:   patch {list(config.train.patch_size)}, overlap {config.infer.overlap}, "
              f"sw_batch_size {config.infer.sw_batch_size}, time window 'auto' (training window "
              f"{config.train.time_window}, time_overlap {config.infer.time_overlap}), largest-component post-processing")
        gflop, windows = network_work(checkpoint, tuple(args.size), args.frames)
        work_tflop = gflop * windows * args.frames / 1000  # without TTA; TTA multiplies it by its mirrorings
        print(f"work:    {gflop:.0f} GFLOP per frame per window x {windows} windows x {args.frames} frames = "
              f"{work_tflop:.1f} TFLOP per cine without TTA (convolutions; {4 * work_tflop:.1f} with TTA); "
              f"60 s would need {1000 * work_tflop / 60:.0f} GFLOP/s")
        settings = [tuple(s.strip().split(":")) for s in args.settings.split(",") if s.strip()]
        if any(len(s) != 2 or s[0] not in ("before", "float32", "fast") or s[1] not in ("off", "on") for s in settings):
            raise SystemExit(f"--settings: expected PATH:TTA items (before|float32|fast):(off|on), got {args.settings!r}")
        labels: dict[tuple[str, str], np.ndarray] = {}
        results = []
        for path, tta in settings:
            out = folder / f"out-{path}-{tta}"
            cmd = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--image", str(image),
                   "--out", str(out), "--device", args.device, "--path", path, "--tta", tta,
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                raise SystemExit(f"setting {path}:{tta} failed (exit {proc.returncode})")
            r = json.loads(lines[-1][len("RESULT "):])
            r["load"] = os.getloadavg()[1]  # 5-minute load average at the end: other jobs on the machine
            labels[(path, tta)] = np.asarray(nib.load(out / r["written"][0]).dataobj)
            results.append(r)
            r["gflops"] = 1000 * work_tflop * (4 if tta == "on" else 1) / r["predict_seconds"]
            cuda = f", peak CUDA {r['peak_cuda_mb']:.0f} MB on {r['gpu']}" if "peak_cuda_mb" in r else ""
            print(f"{path:7s} tta={tta:3s}: {r['seconds']:8.1f} s end to end ({r['predict_seconds']:.1f} s in the "
                  f"predictor), peak RSS {r['peak_rss_mb']:.0f} MB (before run_prediction {r['rss_before_mb']:.0f} MB), "
                  f"{r['gflops']:.0f} useful GFLOP/s in the predictor, {r['threads']} torch threads, "
                  f"load average {r['load']:.1f}{cuda}", flush=True)
        print()
        print("| path | TTA | seconds | predictor s | useful GFLOP/s in the predictor | peak RSS GB | "
              "labels equal to float32 |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            ref = labels.get(("float32", r["tta"]))
            agree = f"{100 * np.mean(labels[(r['path'], r['tta'])] == ref):.3f}%" if ref is not None else "(no reference)"
            print(f"| {r['path']} | {r['tta']} | {r['seconds']:.1f} | {r['predict_seconds']:.1f} | {r['gflops']:.0f} | "
                  f"{r['peak_rss_mb'] / 1024:.2f} | {agree} |")

if __name__ == "__main__":
    main()
