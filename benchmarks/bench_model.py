"""Train-step speed and peak memory of TimeResolvedUNet against the naive formulation of the same network.

The naive formulation (written here, sharing the very same parameters) is what the seed code's
descendants do: each frame goes through the whole network in a Python loop, and every ConvLSTM step runs
one convolution on ``torch.cat([x, h])``. Both compute the same function; the script checks that
(max |difference| of the float32 logits) before timing.

One train step = forward, cross-entropy on all frames, backward, SGD step. Each (layout, dtype,
implementation) runs in its own subprocess so that the peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the growth of the process's peak resident set
(``ru_maxrss``) over the state before the first step. GFLOP per step come from
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, forward and backward); GFLOP/s =
that / median step time, printed beside the machine's measured matmul rate.

    python benchmarks/bench_model.py --repeats 5 --device cpu --threads 1
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

import torch
import torch.nn.functional as F
from machine import cpu_name
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from trunet.models import TimeResolvedUNet

WIDTHS = (16, 32, 64, 128)
CLASSES = 4
LAYOUTS = {
    # name: (input shape (B, T, C, X, Y, Z), strides)
    "slice-last": ((1, 8, 1, 64, 64, 8), ((2, 2, 1), (2, 2, 1), (2, 2, 2))),
    "slice-first": ((1, 8, 1, 8, 64, 64), ((1, 2, 2), (1, 2, 2), (2, 2, 2))),
}


class NaiveTimeUNet(nn.Module):
    """The same network as ``model`` (same parameters), formulated frame by frame.

    ``forward(x (B, T, C, X, Y, Z)) -> (B, T, K, X, Y, Z)``: for each frame, encoder, one ConvLSTM step per
    temporal level on ``torch.cat([features, h])`` (seed cell), decoder, head.
    """

    def __init__(self, model: TimeResolvedUNet):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        states: dict[int, tuple[Tensor, Tensor]] = {}
        outputs = []
        for t in range(x.shape[1]):
            feats = []
            y = x[:, t]
            for stage in m.encoder.stages:
                y = stage(y)
                feats.append(y)
            for key, module in m.temporal.items():
                level = int(key)
                cell = module.clstm.cell_list[0]
                f = feats[level]
                if level not in states:
                    zeros = torch.zeros(f.shape[0], cell.hidden_dim, *f.shape[2:], dtype=f.dtype, device=f.device)
                    states[level] = (zeros, zeros)
                h, c = states[level]
                a = F.conv3d(torch.cat([f, h], dim=1), cell.conv.weight, cell.conv.bias, padding=cell.padding)
                i, fg, o, g = torch.split(a, cell.hidden_dim, dim=1)
                c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states[level] = (h, c)
                feats[level] = f + h
            y = feats[-1]
            for level in range(len(m.decoder.ups) - 1, -1, -1):
                y = m.decoder.ups[level](y, feats[level])
            outputs.append(m.decoder.heads[0](y))
        return torch.stack(outputs, dim=1)


def build(
    layout: str, device: torch.device, seed: int = 0, shape: tuple[int, ...] | None = None,
    widths: tuple[int, ...] = WIDTHS,
) -> tuple[TimeResolvedUNet, Tensor, Tensor]:
    """The model of ``layout`` (its strides, ``widths`` per stage), an input ``x (B, T, 1, X, Y, Z)`` of the
    layout's shape (or ``shape``) and a target ``(B, T, X, Y, Z)`` of class indices."""
    default_shape, strides = LAYOUTS[layout]
    shape = tuple(shape or default_shape)
    torch.manual_seed(seed)
    model = TimeResolvedUNet(1, CLASSES, channels=widths, strides=strides).to(device)
    x = torch.randn(shape, device=device)
    target = torch.randint(0, CLASSES, (shape[0], shape[1], *shape[3:]), device=device)
    return model, x, target


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, target: Tensor, amp: bool) -> None:
    device_type = x.device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if amp else nullcontext()
    with ctx:
        logits = net(x)  # (B, T, K, X, Y, Z)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(
    layout: str, dtype: str, impl: str, repeats: int, warmup: int, device: torch.device,
    shape: tuple[int, ...] | None = None, widths: tuple[int, ...] = WIDTHS,
) -> dict:
    """Time one configuration (run in a fresh subprocess here; ``gpu_check.py`` calls it in-process).

    Returns ``times`` and ``cpu_times`` (s per step), ``peak_bytes`` and ``flops`` (of one step)."""
    model, x, target = build(layout, device, shape=shape, widths=widths)
    net = model if impl == "trunet" else NaiveTimeUNet(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = dtype == "bf16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(warmup):
        train_step(net, opt, x, target, amp)
    times, cpu_times = [], []
    for _ in range(repeats):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(net, opt, x, target, amp)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    with FlopCounterMode(display=False) as counter:
        train_step(net, opt, x, target, amp)
    return {"times": times, "cpu_times": cpu_times, "peak_bytes": peak, "flops": counter.get_total_flops()}


def check_equivalence(
    layout: str, device: torch.device, shape: tuple[int, ...] | None = None, widths: tuple[int, ...] = WIDTHS
) -> float:
    """max |logits(trunet) - logits(naive)| in float32 on the benchmark input."""
    model, x, _ = build(layout, device, shape=shape, widths=widths)
    with torch.no_grad():
        return (model(x) - NaiveTimeUNet(model)(x)).abs().max().item()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_child(args: argparse.Namespace, layout: str, dtype: str, impl: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", json.dumps([layout, dtype, impl]),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device,
        "--threads", str(args.threads),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed train steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ", ".join(LAYOUTS))
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)

    if args.child:
        layout, dtype, impl = json.loads(args.child)
        print(json.dumps(measure(layout, dtype, impl, args.repeats, args.warmup, device)))
        return

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    rate32 = matmul_rate(device, torch.float32)
    rate16 = matmul_rate(device, torch.bfloat16)
    print(f"command: `{command}`  ")
    print(f"machine: {machine(device)}  ")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}  ")
    print(f"model: TimeResolvedUNet(channels={WIDTHS}, clstm_levels='all'), one train step = forward + "
          f"cross-entropy on all {LAYOUTS['slice-last'][0][1]} frames + backward + SGD step; "
          f"median of {args.repeats} after {args.warmup} warm-up  ")
    print("CPU time = the process's CPU seconds per step (on a shared machine less disturbed than the wall "
          "clock; equal to it on a quiet one with one thread)  ")
    print(f"measured matmul rate (2048^3): fp32 {rate32:.0f} GFLOP/s, bf16 {rate16:.0f} GFLOP/s  ")
    print()
    print("| layout | input | dtype | implementation | step (ms) | speed-up | CPU time (ms) | speed-up (CPU time) "
          "| peak mem (MiB) | GFLOP/step | GFLOP/s | % of matmul rate |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    diffs = {}
    for layout in args.layouts.split(","):
        diffs[layout] = check_equivalence(layout, device)
        for dtype in args.dtypes.split(","):
            results = {impl: run_child(args, layout, dtype, impl) for impl in ("naive", "trunet")}
            naive_ms = statistics.median(results["naive"]["times"]) * 1e3
            naive_cpu = statistics.median(results["naive"]["cpu_times"]) * 1e3
            for impl in ("naive", "trunet"):
                r = results[impl]
                ms = statistics.median(r["times"]) * 1e3
                cpu = statistics.median(r["cpu_times"]) * 1e3
                gflop = r["flops"] / 1e9
                rate = gflop / (ms / 1e3)
                peak = rate16 if dtype == "bf16" else rate32
                print(f"| {layout} | {tuple(LAYOUTS[layout][0])} | {dtype} | {impl} | {ms:.0f} | "
                      f"{naive_ms / ms:.2f}x | {cpu:.0f} | {naive_cpu / cpu:.2f}x | {r['peak_bytes'] / 2**20:.0f} | {gflop:.1f} | {rate:.1f} | "
                      f"{100 * rate / peak:.0f}% |")
    print()
    for layout, diff in diffs.items():
        print(f"same function: max |trunet - naive| of the fp32 logits, {layout}: {diff:.1e}  ")


if __name__ == "__main__":
    main()
