"""One command that proves the GPU path (``make gpu-check``): correctness, the 40 GB plan, speed, the demo and
torchrun, printed as one Markdown table (check, figure, target, result); exit status 1 when a check fails.

Sections (each timed; an exception inside one becomes a FAIL row and the next section still runs):

1. **Correctness on the device.** (a) The model of ``configs/default.yaml`` (``--quick``: ``configs/tiny.yaml``)
   forward + the trainer's loss + backward in float32 on the device against the CPU (TF32 off): relative
   differences ``||a - b|| / ||b||`` of the logits (all deep-supervision outputs) and of the parameter
   gradients, target <= 1e-4. (b) 20 steps of the trainer's own step (:meth:`Trainer.step`: autocast, loss,
   GradScaler, clipping, optimizer) on one fixed phantom batch under bf16 autocast and under fp16 + GradScaler:
   every loss finite and the mean of the last 5 below the mean of the first 5. (c) The :class:`Predictor` on the
   device against the CPU in float32 (the bf16-trained model, a held-out phantom cine): labels agree on >= 99.9%
   of voxels; the same with AMP on the device (as ``trunet predict`` runs there) against float32 on the CPU.
   (d) The trainer's checkpoint written from the device loads on the CPU (weights bitwise equal) and resumes on
   the device (weights, optimizer and GradScaler state bitwise equal).
2. **The 40 GB plan.** ``trunet plan``'s choice for ``configs/default.yaml`` at 40 GB, the process capped to
   40 GB (``torch.cuda.set_per_process_memory_fraction``), 5 AMP steps of the trainer on random data:
   ``max_memory_allocated`` against the planner's estimate without the CUDA context (target: within 15%),
   ``max_memory_reserved`` + the context <= 40 GB, and the step time. Memory needs CUDA: on the CPU the steps run
   (``--quick``: ``configs/tiny.yaml``) and the memory rows say so.
3. **Speed.** The model benchmark's train step (``bench_model.measure``) against the naive per-frame form
   (target >= 3x on CUDA, reported only on the CPU), its TFLOP/s beside the measured bf16 matmul rate; one
   ACDC-sized cine, 30 x 256 x 216 x 10 (``--quick``: 2 x 32 x 32 x 4) through ``run_prediction`` end to end with
   TTA off and on (``bench_infer``'s case and checkpoint), seconds.
4. **The demo.** ``configs/demo.yaml`` for 2 epochs (``--quick``: ``configs/tiny.yaml`` on a small phantom) through
   the trainer, with the time spent waiting for the next batch (the device idles then) and in the step:
   median step time, samples/s, and the idle fraction (the loader keeps up when it is small).
5. **torchrun.** ``python -m torch.distributed.run --nproc_per_node=N -m trunet train`` on ``configs/tiny.yaml``:
   N = 2 with 2 GPUs (NCCL), else 1 (the same launcher, no process group); on the CPU 2 Gloo ranks (``--nproc``):
   weights' checksums equal across ranks, one ``latest.pt`` written by rank 0 only, and it loads.

Usage::

    python benchmarks/gpu_check.py                       # on a CUDA machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --quick  # the same code on tiny sizes (runs inside make test)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_infer import write_case, write_checkpoint  # noqa: E402
from bench_model import machine, matmul_rate, measure, sync  # noqa: E402
from monai.transforms import ResizeWithPadOrCrop  # noqa: E402

from trunet.config import Config, load_config  # noqa: E402
from trunet.data.phantom import simulate_case, write_phantom_dataset  # noqa: E402
from trunet.models import build_model  # noqa: E402
from trunet.pipeline import planning  # noqa: E402
from trunet.pipeline.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from trunet.pipeline.inference import Predictor, run_prediction  # noqa: E402
from trunet.pipeline.precision import autocast_dtype  # noqa: E402
from trunet.pipeline.training import parameter_checksum  # noqa: E402
from trunet.pipeline.training.debug import seed_everything  # noqa: E402
from trunet.pipeline.training.distributed import DistContext  # noqa: E402
from trunet.pipeline.training.losses import build_criterion  # noqa: E402
from trunet.pipeline.training.optim import build_optimizer, build_scheduler  # noqa: E402
from trunet.pipeline.training.signals import StopRequest  # noqa: E402
from trunet.pipeline.training.trainer import Trainer  # noqa: E402
from trunet.transforms.compose import preprocessing_from_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PASS, FAIL, INFO, SKIP = "pass", "FAIL", "info", "skip"
FP32_TOLERANCE = 1e-4
"""Largest ``||device - cpu|| / ||cpu||`` of float32 logits and gradients (TF32 off)."""
AGREEMENT_TARGET = 0.999
"""Smallest fraction of voxels whose Predictor labels agree between the device and the CPU."""
PLAN_VRAM_GB = 40.0
PLAN_TOLERANCE = 0.15
SPEEDUP_TARGET = 3.0
NO_TARGET = "-"


@dataclass(frozen=True)
class Sizes:
    """What the sections run at: the full sizes (one GPU, a few minutes) or ``--quick`` (tiny, seconds on a CPU).

    Attributes:
        arch: config whose model, loss and optimizer sections 1 uses.
        batch: ``(B, T, (X, Y, Z))`` of the fixed batch of section 1: image ``(B, T, X, Y, Z)``.
        phantom_scale: ``inplane_scale`` of the phantom cases the batch and the predictor's cine are cut from.
        amp_steps: trainer steps per AMP setting on the fixed batch.
        cine: ``(T, X, Y, Z)`` of the predictor's held-out cine (crop/pad of a phantom case).
        plan_config / plan_search / plan_overrides: section 2's config; whether the 40 GB search picks its
            patch, window and batch; overrides of the config.
        plan_steps: AMP steps of section 2.
        speed_shape / speed_widths / speed_dtypes / speed_repeats: the model benchmark's input ``(B, T, C, X, Y,
            Z)``, stage widths, precisions and timed steps (layout ``slice-last``).
        matmul_n: size of the square bf16 matmul whose rate is the reference.
        infer_frames / infer_size: the cine of the inference timing ``(T, X, Y, Z)``; infer_config its model.
        demo_config / demo_overrides: section 4 (``None`` data: the config's own phantom).
        budget_s: default ``--budget-s``.
    """

    arch: str
    batch: tuple[int, int, tuple[int, int, int]]
    phantom_scale: float
    amp_steps: int
    cine: tuple[int, int, int, int]
    plan_config: str
    plan_search: bool
    plan_overrides: tuple[str, ...]
    plan_steps: int
    speed_shape: tuple[int, ...]
    speed_widths: tuple[int, ...]
    speed_dtypes: tuple[str, ...]
    speed_repeats: int
    matmul_n: int
    infer_frames: int
    infer_size: tuple[int, int, int]
    infer_config: str
    demo_config: str
    demo_overrides: tuple[str, ...] = field(default_factory=tuple)
    demo_small_phantom: bool = False
    budget_s: float = 480.0


FULL = Sizes(
    arch="default.yaml", batch=(2, 4, (64, 64, 10)), phantom_scale=2.0, amp_steps=20, cine=(6, 80, 80, 10),
    plan_config="default.yaml", plan_search=True, plan_overrides=(), plan_steps=5,
    speed_shape=(1, 8, 1, 64, 64, 8), speed_widths=(16, 32, 64, 128), speed_dtypes=("fp32", "bf16"),
    speed_repeats=5, matmul_n=8192, infer_frames=30, infer_size=(256, 216, 10), infer_config="default.yaml",
    demo_config="demo.yaml", demo_overrides=("data.phantom_cases=16",), budget_s=480.0,
)
QUICK = Sizes(
    arch="tiny.yaml", batch=(2, 2, (16, 16, 4)), phantom_scale=4.0, amp_steps=20, cine=(2, 24, 24, 4),
    plan_config="tiny.yaml", plan_search=False, plan_overrides=("train.amp=true",), plan_steps=2,
    speed_shape=(1, 4, 1, 16, 16, 4), speed_widths=(4, 8, 8, 16), speed_dtypes=("fp32",), speed_repeats=1,
    matmul_n=256, infer_frames=2, infer_size=(32, 32, 4), infer_config="tiny.yaml",
    demo_config="tiny.yaml", demo_overrides=("train.iterations_per_epoch=1", "train.val_every=2"),
    demo_small_phantom=True, budget_s=120.0,
)
OFF = ("tracking.wandb.mode=disabled",)


@dataclass
class Row:
    """One line of the table: section number, what is checked, the measured figure, the target, the result
    (``pass``, ``FAIL``, ``info``: a figure without a target, ``skip``: not measurable here)."""

    section: int
    check: str
    figure: str
    target: str
    result: str


# -- shared pieces ---------------------------------------------------------------------------------------
def arch_config(sizes: Sizes, *overrides: str) -> Config:
    """Section 1's config: the architecture of ``sizes.arch`` at the fixed batch's window and patch."""
    b, t, patch = sizes.batch
    return load_config(CONFIGS / sizes.arch, [
        *OFF, f"train.batch_size={b}", f"train.time_window={t}", f"train.patch_size={list(patch)}",
        "train.warmup_epochs=0", "train.epochs=1", f"train.iterations_per_epoch={sizes.amp_steps}",
        "infer.tta=false", *overrides,
    ])


def phantom_cine(index: int, frames: int, size: tuple[int, int, int], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Phantom case ``index`` (seed 0), cropped/padded to ``size``: z-scored image ``(T, X, Y, Z)`` float32 and
    labels ``(T, X, Y, Z)`` int64."""
    case = simulate_case(0, index, inplane_scale=scale, max_frames=frames)
    image = np.moveaxis(case.image, -1, 0)[:frames]
    label = np.moveaxis(case.label, -1, 0)[:frames].astype(np.int64)
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    resize = ResizeWithPadOrCrop(size)
    return (np.asarray(resize(image), dtype=np.float32), np.asarray(resize(label), dtype=np.int64))


def phantom_batch(sizes: Sizes) -> dict[str, torch.Tensor]:
    """The fixed batch of section 1, as the loader gives it: ``image (B, T, X, Y, Z)`` float32, ``label (B, T,
    X, Y, Z)`` int64 (dense labels), ``frame_mask (B, T)`` bool, from phantom cases ``0 .. B-1``."""
    b, t, patch = sizes.batch
    cases = [phantom_cine(i, t, patch, sizes.phantom_scale) for i in range(b)]
    return {"image": torch.from_numpy(np.stack([c[0] for c in cases])),
            "label": torch.from_numpy(np.stack([c[1] for c in cases])),
            "frame_mask": torch.ones(b, t, dtype=torch.bool)}


def random_batch(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch of the config's size: ``image (B, T, X, Y, Z)``, ``label`` in ``[0, K)``, all frames labelled
    (the planner's assumption)."""
    t = config.train
    g = torch.Generator().manual_seed(seed)
    shape = (t.batch_size, t.time_window, *t.patch_size)
    return {"image": torch.randn(shape, generator=g),
            "label": torch.randint(0, len(config.data.classes), shape, generator=g),
            "frame_mask": torch.ones(t.batch_size, t.time_window, dtype=torch.bool)}


def bare_trainer(config: Config, device: torch.device, run_dir: Path, amp_dtype: Optional[torch.dtype]) -> Trainer:
    """A :class:`Trainer` with the model, loss, optimizer, schedule and GradScaler that :meth:`Trainer.setup`
    builds, but no data set: its own :meth:`~Trainer.step`, :meth:`~Trainer.save` and :meth:`~Trainer.load` run
    on batches given by hand. ``amp_dtype``: bf16, fp16 (GradScaler on) or None (float32)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, run_dir, resume=False, ctx=DistContext(device=device))
    t = config.train
    seed_everything(t.seed)
    trainer.model = build_model(config).to(device)
    trainer.train_model = trainer.model
    trainer.criterion = build_criterion(config)
    trainer.optimizer = build_optimizer(trainer.model, t)
    trainer.scheduler = build_scheduler(trainer.optimizer, t.epochs * t.iterations_per_epoch,
                                        t.warmup_epochs * t.iterations_per_epoch, t.poly_power)
    trainer.amp_dtype = amp_dtype
    trainer.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    trainer.target_spacing = tuple(config.data.target_spacing or planning.ACDC_SPACING)
    trainer.preprocessing = preprocessing_from_config(config, trainer.target_spacing)
    return trainer


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Plain float32 matmuls and convolutions on CUDA (no TF32) inside the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    norm = b.norm().item()
    return (a - b).norm().item() / norm if norm > 0 else (a - b).norm().item()


# -- 1. correctness -----------------------------------------------------------------------------------------
def forward_backward_difference(config: Config, device: torch.device, batch: dict[str, torch.Tensor]) -> dict:
    """Float32 forward (all deep-supervision outputs ``(B, T, K, X, Y, Z)``), the trainer's loss and backward of
    the same weights on ``device`` and on the CPU (TF32 off). Returns the relative differences of the logits and
    of all parameter gradients (concatenated), and the two losses."""
    image = batch["image"].unsqueeze(2)  # (B, T, 1, X, Y, Z)
    results = []
    torch.manual_seed(0)
    reference = build_model(config)
    criterion = build_criterion(config)
    for where in (torch.device("cpu"), device):
        model = copy.deepcopy(reference).to(where).train()
        with tf32_off():
            out = model(image.to(where))
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            loss = criterion(out, batch["label"].to(where), batch["frame_mask"].to(where))
            loss.backward()
        results.append((
            torch.cat([o.detach().float().flatten().cpu() for o in outs]),
            torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None]),
            loss.item(),
        ))
    (lc, gc_, loss_c), (ld, gd, loss_d) = results
    return {"logits": relative_difference(ld, lc), "grads": relative_difference(gd, gc_), "loss_cpu": loss_c,
            "loss_device": loss_d}


def amp_train(config: Config, device: torch.device, dtype: torch.dtype, batch: dict[str, torch.Tensor],
              run_dir: Path, steps: int) -> tuple[Trainer, list[Optional[float]]]:
    """``steps`` trainer steps on one fixed batch under autocast ``dtype`` (fp16: with the GradScaler). Returns
    the trainer and the losses (None for a step skipped as non-finite)."""
    trainer = bare_trainer(config, device, run_dir, dtype)
    stop = StopRequest()
    losses = [trainer.step(batch, stop)[0] for _ in range(steps)]
    return trainer, losses


def losses_decrease(losses: list[Optional[float]], k: int = 5) -> tuple[bool, str]:
    """All finite and the mean of the last ``k`` below the mean of the first ``k``; the figure as text."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    if len(finite) < len(losses) or len(losses) < 2 * k:
        return False, f"{len(losses) - len(finite)} of {len(losses)} losses non-finite"
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])  # type: ignore[arg-type]
    return last < first, f"{losses[0]:.3f} -> {losses[-1]:.3f} (mean of first/last {k}: {first:.3f} / {last:.3f})"


def predictor_agreement(model: torch.nn.Module, preprocessing: dict, config: Config, cine: torch.Tensor,
                        device: torch.device, amp: bool) -> float:
    """Fraction of voxels of ``cine (1, T, X, Y, Z)`` whose labels (argmax over K) from the :class:`Predictor` on
    ``device`` (autocast when ``amp``) equal those of the Predictor in float32 on the CPU."""
    cpu = Predictor(copy.deepcopy(model).cpu(), preprocessing, config.infer, device="cpu", amp=False,
                    amp_on_cpu=False)  # float32 even where the Predictor would take bf16 on this CPU
    dev = Predictor(copy.deepcopy(model), preprocessing, config.infer, device=device, amp=amp, amp_on_cpu=amp)
    labels_cpu = cpu.predict_case(cine).argmax(dim=2)
    labels_dev = dev.predict_case(cine).argmax(dim=2).cpu()
    return (labels_cpu == labels_dev).double().mean().item()


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _unequal(a: Any, b: Any) -> list[str]:
    """Names of tensors of ``a`` and ``b`` (nested state dicts) that are not bitwise equal (device ignored)."""
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    if ta.keys() != tb.keys():
        return sorted(ta.keys() ^ tb.keys())
    return [k for k in ta if not torch.equal(ta[k].cpu(), tb[k].cpu())]


def checkpoint_round_trip(trainer: Trainer) -> dict:
    """The trainer writes ``latest.pt`` from its device; it is read on the CPU (every tensor there, the model's
    weights bitwise those of the trainer) and resumed by a fresh trainer on the device (weights, optimizer and
    GradScaler state bitwise equal). Returns counts and the names of differing tensors."""
    trainer.save()
    payload = load_checkpoint(trainer.latest_path, map_location="cpu")
    off_cpu = [k for k, t in _tensors(payload) if t.device.type != "cpu"]
    model = model_from_checkpoint(payload)
    on_cpu = _unequal(model.state_dict(), trainer.model.state_dict())
    resumed = bare_trainer(trainer.config, trainer.device, trainer.run_dir, trainer.amp_dtype)
    resumed.load()
    back = (_unequal(resumed.model.state_dict(), trainer.model.state_dict())
            + _unequal(resumed.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]))
    scaler_equal = resumed.scaler.state_dict() == trainer.scaler.state_dict()
    on_device = {t.device.type for _, t in _tensors(resumed.model.state_dict())} == {trainer.device.type}
    return {"tensors": len(dict(_tensors(payload))), "off_cpu": off_cpu, "cpu_unequal": on_cpu,
            "back_unequal": back, "scaler_equal": scaler_equal, "on_device": on_device,
            "bytes": trainer.latest_path.stat().st_size}


def suite_device_tests(device: torch.device) -> Row:
    """``pytest -m cuda tests/test_cuda.py``: the suite's device-parametrized tests (they call the functions below)."""
    check = "the suite's device tests: pytest -m cuda tests/test_cuda.py"
    if device.type != "cuda":
        return Row(1, check, "needs CUDA (skipped by the suite without it; the rows below run the same checks)",
                   "all pass", SKIP)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=REPO, capture_output=True, text=True, timeout=480)
    lines = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()
    ok = proc.returncode == 0 and "skipped" not in lines[-1]
    return Row(1, check, lines[-1].strip("= "), "all pass, none skipped", PASS if ok else FAIL)


def section_correctness(device: torch.device, sizes: Sizes, folder: Path) -> list[Row]:
    rows = [suite_device_tests(device)]
    config = arch_config(sizes)
    batch = phantom_batch(sizes)
    b, t, patch = sizes.batch
    shape = f"B x T x patch {b} x {t} x {'x'.join(map(str, patch))}"

    d = forward_backward_difference(config, device, batch)
    ok = d["logits"] <= FP32_TOLERANCE and d["grads"] <= FP32_TOLERANCE
    rows.append(Row(1, f"float32 forward/backward, {device.type} vs cpu ({sizes.arch} model, {shape}, TF32 off)",
                    f"rel. diff logits {d['logits']:.1e}, gradients {d['grads']:.1e}",
                    f"<= {FP32_TOLERANCE:.0e} each", PASS if ok else FAIL))

    trained: dict[str, Trainer] = {}
    for name, dtype in (("bf16 autocast", torch.bfloat16), ("fp16 autocast + GradScaler", torch.float16)):
        check = f"{sizes.amp_steps} trainer steps on one phantom batch, {name}"
        try:
            trainer, losses = amp_train(config, device, dtype, batch, folder / name.split()[0], sizes.amp_steps)
        except RuntimeError as exc:  # fp16 autocast where the device has none
            if dtype is torch.float16 and device.type == "cpu":
                rows.append(Row(1, check, f"fp16 unsupported on {device.type}: bf16 only ({str(exc)[:60]})",
                                "finite, decreasing", SKIP))
                continue
            raise
        ok, figure = losses_decrease(losses)
        if dtype is torch.float16:
            figure += f"; loss scale {trainer.scaler.get_scale():g}"
        rows.append(Row(1, check, figure, "finite; mean of last 5 < first 5", PASS if ok else FAIL))
        trained[name.split()[0]] = trainer

    model = trained["bf16"].model
    image, _ = phantom_cine(b, sizes.cine[0], sizes.cine[1:], sizes.phantom_scale)  # a case not trained on
    cine = torch.from_numpy(image)[None]  # (1, T, X, Y, Z)
    pre = trained["bf16"].preprocessing
    size = "x".join(map(str, sizes.cine))
    with tf32_off():
        agree = predictor_agreement(model, pre, config, cine, device, amp=False)
    rows.append(Row(1, f"Predictor float32 on {device.type} vs cpu, labels agree (cine {size}, TF32 off)",
                    f"{100 * agree:.3f}%", f">= {100 * AGREEMENT_TARGET:g}%",
                    PASS if agree >= AGREEMENT_TARGET else FAIL))
    # with AMP the labels of near-tied voxels flip with the rounding: a figure of the model's margins (this
    # model had 20 steps), not of the device, so it is reported without a target
    amp = str(autocast_dtype(device)).replace("torch.", "")
    agree = predictor_agreement(model, pre, config, cine, device, amp=True)
    rows.append(Row(1, f"Predictor with AMP ({amp}) on {device.type} vs cpu float32, labels agree (cine {size})",
                    f"{100 * agree:.3f}%", f"{NO_TARGET} (near-tied voxels flip)", INFO))

    source = trained.get("fp16") or trained["bf16"]
    r = checkpoint_round_trip(source)
    ok = not (r["off_cpu"] or r["cpu_unequal"] or r["back_unequal"]) and r["scaler_equal"] and r["on_device"]
    scaler = "GradScaler on" if source.scaler.is_enabled() else "GradScaler off"
    detail = "" if ok else f"; differ: {(r['off_cpu'] + r['cpu_unequal'] + r['back_unequal'])[:3]}"
    rows.append(Row(1, f"trainer checkpoint saved on {device.type}: loads on cpu and resumes on {device.type}",
                    f"{r['tensors']} tensors, {r['bytes'] / 1e6:.1f} MB, {scaler}: "
                    f"{'bitwise equal' if ok else 'NOT equal'}{detail}", "bitwise equal", PASS if ok else FAIL))
    return rows


# -- 2. the 40 GB plan --------------------------------------------------------------------------------------
def section_plan(device: torch.device, sizes: Sizes, folder: Path) -> list[Row]:
    rows = []
    config = load_config(CONFIGS / sizes.plan_config, [*OFF, *sizes.plan_overrides])
    t = config.train
    planned = (list(t.patch_size), t.time_window, t.batch_size)
    if sizes.plan_search:
        chosen = planning.plan(config, PLAN_VRAM_GB, 0.1).chosen
        planned = (list(chosen.patch_size), chosen.time_window, chosen.batch_size)
        same = planned == (list(t.patch_size), t.time_window, t.batch_size)
        rows.append(Row(2, f"trunet plan --vram-gb {PLAN_VRAM_GB:g} on {sizes.plan_config}",
                        f"patch {planned[0]}, window {planned[1]}, batch {planned[2]}"
                        f" ({'as in' if same else 'differs from'} the config)", "-", INFO))
    config = load_config(CONFIGS / sizes.plan_config, [
        *OFF, *sizes.plan_overrides, f"train.patch_size={planned[0]}", f"train.time_window={planned[1]}",
        f"train.batch_size={planned[2]}"])
    amp = autocast_dtype(device, config.train.amp)
    estimate = planning.estimate_memory(config, device_type=device.type)
    label = (f"{sizes.plan_config}: B {planned[2]} x T {planned[1]} x {'x'.join(map(str, planned[0]))}, "
             f"AMP {str(amp).replace('torch.', '') if amp else 'off'}")

    cap = None
    free_memory()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(1.0, PLAN_VRAM_GB * planning.GB / total)
        torch.cuda.set_per_process_memory_fraction(cap, device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the trainer sets it (train.deterministic off)
    try:
        trainer = bare_trainer(config, device, folder / "plan", amp)
        batch, stop, times, losses = random_batch(config), StopRequest(), [], []
        try:
            for _ in range(sizes.plan_steps):
                start = time.perf_counter()
                losses.append(trainer.step(batch, stop)[0])
                sync(device)
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError as exc:
            del trainer, batch
            reserved = torch.cuda.max_memory_reserved(device) / planning.GB if device.type == "cuda" else 0.0
            rows.append(Row(2, f"{sizes.plan_steps} AMP trainer steps, random data ({label})",
                            f"out of memory at step {len(times) + 1} (peak reserved {reserved:.2f} GB; estimate "
                            f"{estimate.total / planning.GB:.2f} GB): {str(exc).splitlines()[0][:100]}",
                            f"fits in {PLAN_VRAM_GB:g} GB", FAIL))
            return rows
        finite = all(v is not None and math.isfinite(v) for v in losses)
        steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
        rows.append(Row(2, f"{sizes.plan_steps} AMP trainer steps, random data ({label})",
                        f"step {steady:.3f} s (median after the first; first {times[0]:.2f} s), losses "
                        f"{'finite' if finite else 'NOT finite'}", "finite", PASS if finite else FAIL))
        context = estimate.cuda_context
        if device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(device) - base
            reserved = torch.cuda.max_memory_reserved(device)
            expected = estimate.total - context
            error = (expected - allocated) / allocated
            rows.append(Row(2, "max_memory_allocated vs the planner's estimate (without the CUDA context)",
                            f"{allocated / planning.GB:.2f} GB measured, {expected / planning.GB:.2f} GB estimated "
                            f"({100 * error:+.0f}%)", f"within {100 * PLAN_TOLERANCE:.0f}%",
                            PASS if abs(error) <= PLAN_TOLERANCE else FAIL))
            peak = reserved + context
            rows.append(Row(2, f"max_memory_reserved + CUDA context {context / planning.GB:.1f} GB (process capped "
                            f"to {PLAN_VRAM_GB:g} GB, fraction {cap:.3f})",
                            f"{reserved / planning.GB:.2f} + {context / planning.GB:.1f} = {peak / planning.GB:.2f} GB",
                            f"<= {PLAN_VRAM_GB:g} GB", PASS if peak <= PLAN_VRAM_GB * planning.GB else FAIL))
        else:
            rows.append(Row(2, "max_memory_allocated / reserved vs the planner's estimate",
                            f"needs CUDA (estimate {estimate.total / planning.GB:.3f} GB, not measured here)",
                            f"within {100 * PLAN_TOLERANCE:.0f}%, <= {PLAN_VRAM_GB:g} GB", SKIP))
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return rows


# -- 3. speed -----------------------------------------------------------------------------------------------
def section_speed(device: torch.device, sizes: Sizes, folder: Path) -> list[Row]:
    rows = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    shape = "x".join(map(str, sizes.speed_shape))
    for dtype in sizes.speed_dtypes:
        r = {impl: measure("slice-last", dtype, impl, sizes.speed_repeats, 1, device, shape=sizes.speed_shape,
                           widths=sizes.speed_widths) for impl in ("naive", "trunet")}
        naive, ours = (statistics.median(r[i]["times"]) for i in ("naive", "trunet"))
        speedup = naive / ours
        judged = device.type == "cuda"
        rows.append(Row(3, f"train step vs naive per-frame form ({dtype}, input {shape}, bench_model)",
                        f"{1e3 * ours:.1f} ms vs {1e3 * naive:.1f} ms: {speedup:.2f}x",
                        f">= {SPEEDUP_TARGET:g}x" + ("" if judged else " (on CUDA)"),
                        (PASS if speedup >= SPEEDUP_TARGET else FAIL) if judged else INFO))
        rate = matmul_rate(device, dtypes[dtype], n=sizes.matmul_n) / 1e3  # TFLOP/s
        achieved = r["trunet"]["flops"] / ours / 1e12
        rows.append(Row(3, f"achieved TFLOP/s of that step ({dtype}) vs measured {dtype} matmul rate",
                        f"{achieved:.3g} vs {rate:.3g} TFLOP/s ({100 * achieved / rate:.1f}%; matmul "
                        f"{sizes.matmul_n}^3)", NO_TARGET, INFO))

    spacing = (1.5, 1.5, 10.0)
    image = write_case(folder, sizes.infer_frames, sizes.infer_size, spacing)
    checkpoint = write_checkpoint(folder, CONFIGS / sizes.infer_config, spacing)
    case = f"{sizes.infer_frames} x {' x '.join(map(str, sizes.infer_size))}"
    for tta in (False, True):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        written = run_prediction(checkpoint, image, folder / f"pred-tta-{tta}", device=str(device), tta=tta,
                                 postprocess=True)
        seconds = time.perf_counter() - start
        ok = len(written) == 1 and nib.load(written[0]).shape == (*sizes.infer_size, sizes.infer_frames)
        memory = (f", peak {torch.cuda.max_memory_allocated(device) / planning.GB:.1f} GB"
                  if device.type == "cuda" else "")
        rows.append(Row(3, f"predict one cine {case} ({sizes.infer_config} model), TTA {'on' if tta else 'off'}",
                        f"{seconds:.1f} s end to end{memory}", "- (output on the scan's grid)", PASS if ok else FAIL))
    return rows


# -- 4. the demo --------------------------------------------------------------------------------------------
class TimedTrainer(Trainer):
    """The trainer, recording per step the wait for the next batch (the device idles meanwhile) and the step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[tuple[int, float]] = []  # (epoch, seconds)
        self.steps: list[tuple[int, float]] = []

    def _batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        batches = super()._batches(epoch, start)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waits.append((epoch, time.perf_counter() - t0))
            yield batch

    def step(self, batch: dict[str, Any], stop: StopRequest) -> tuple[Optional[float], bool]:
        t0 = time.perf_counter()
        result = super().step(batch, stop)
        sync(self.device)
        self.steps.append((self.epoch, time.perf_counter() - t0))
        return result


def small_phantom(folder: Path) -> Path:
    """Four small phantom patients (the test suite's size) and their datalist, written once per run."""
    datalist = folder / "phantom" / "datalist.json"
    if not datalist.is_file():
        write_phantom_dataset(folder / "phantom", cases=4, seed=0, inplane_scale=2.5, max_frames=6)
    return datalist


def section_demo(device: torch.device, sizes: Sizes, folder: Path) -> list[Row]:
    overrides = [*OFF, "train.epochs=2", *sizes.demo_overrides]
    if sizes.demo_small_phantom:
        overrides.append(f"data.root={small_phantom(folder)}")
    config = load_config(CONFIGS / sizes.demo_config, overrides)
    threads = torch.get_num_threads()
    try:
        trainer = TimedTrainer(config, folder / "demo", resume=False, ctx=DistContext(device=device))
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        trainer.setup()
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    t = config.train
    data = "its phantom" if config.data.root is None else "a 4-case phantom"
    label = (f"{sizes.demo_config} ({data}, {config.data.phantom_cases if config.data.root is None else 4} cases) "
             f"2 epochs x {t.iterations_per_epoch} steps, batch {t.batch_size}, {config.data.num_workers} worker(s)")
    rows = []
    losses = [m["train_loss"] for m in trainer.metrics]
    ok = trainer.epoch == 2 and all(math.isfinite(v) for v in losses) and trainer.latest_path.is_file()
    dice = trainer.metrics[-1].get("val_mean_dice") if trainer.metrics else None
    rows.append(Row(4, label, f"loss {' -> '.join(f'{v:.3f}' for v in losses)}"
                    + (f", val Dice {dice:.3f}" if dice is not None else ""), "2 epochs, finite, latest.pt",
                    PASS if ok else FAIL))
    last = trainer.epoch - 1
    steps = [s for e, s in trainer.steps if e == last]
    waits = [w for e, w in trainer.waits if e == last]
    idle = sum(waits) / max(sum(waits) + sum(steps), 1e-9)
    sps = trainer.metrics[-1]["samples_per_s"] if trainer.metrics else float("nan")
    rows.append(Row(4, "epoch 2: median step time, samples/s",
                    f"{1e3 * statistics.median(steps):.1f} ms, {sps:.1f} samples/s", NO_TARGET, INFO))
    keeps = "keeps up" if idle <= 0.1 else "does not keep up"
    rows.append(Row(4, f"epoch 2: {device.type} idle waiting for the loader (wait / (wait + step))",
                    f"{100 * idle:.0f}%: the loader {keeps}", "small (<= 10%: keeps up)", INFO))
    return rows


# -- 5. torchrun --------------------------------------------------------------------------------------------
def section_torchrun(device: torch.device, sizes: Sizes, folder: Path, nproc: int) -> list[Row]:
    datalist = small_phantom(folder)
    run, debug = folder / "ddp", folder / "ddp-debug"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRUNET_DEBUG_DIR=str(debug), WANDB_MODE="disabled")
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
           "-m", "trunet", "train", "--config", str(CONFIGS / "tiny.yaml"), "--data", str(datalist),
           "--run-dir", str(run), *OFF, "train.epochs=1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    expected = ("nccl" if device.type == "cuda" else "gloo") if nproc > 1 else None
    log = (run / "log.txt").read_text() if (run / "log.txt").is_file() else ""
    backend = next((b for b in ("nccl", "gloo") if f"processes ({b})" in log), None)
    what = f"{nproc} process(es), backend {backend or 'none (single process, no process group)'}"
    rows = [Row(5, f"torchrun --nproc_per_node={nproc} -m trunet train (tiny.yaml, 1 epoch)",
                f"exit {proc.returncode} in {seconds:.0f} s; {what}" + (
                    f"; stderr: {proc.stderr.strip().splitlines()[-1][:80]}" if proc.returncode and proc.stderr.strip()
                    else ""),
                f"exit 0, backend {expected or 'none'}",
                PASS if proc.returncode == 0 and backend == expected else FAIL)]
    sums = [(debug / f"rank{r}-params.txt").read_text().split() if (debug / f"rank{r}-params.txt").is_file()
            else [] for r in range(nproc)]
    equal = all(s and s == sums[0] for s in sums)
    rows.append(Row(5, "weights' checksums after the epoch, all ranks",
                    f"{nproc} rank(s): {'equal' if equal else 'DIFFERENT or missing'}"
                    + (f" ({sums[0][-1]})" if sums[0] else ""), "equal", PASS if equal else FAIL))
    saves = [r for r in range(nproc) if (debug / f"rank{r}-saves.txt").is_file()]
    latest = run / "checkpoints" / "latest.pt"
    loads = False
    if latest.is_file():
        loads = repr(parameter_checksum(model_from_checkpoint(load_checkpoint(latest)))) == (sums[0] or [""])[-1]
    ok = saves == [0] and loads
    rows.append(Row(5, "checkpoint: written by rank 0 only, loads with rank 0's weights",
                    f"written by rank(s) {saves}; latest.pt {'loads, same checksum' if loads else 'missing or differs'}",
                    "rank 0 only, same weights", PASS if ok else FAIL))
    return rows


# -- the table ----------------------------------------------------------------------------------------------
SECTIONS: list[tuple[str, Callable[..., list[Row]]]] = [
    ("correctness", section_correctness),
    ("40 GB plan", section_plan),
    ("speed", section_speed),
    ("demo", section_demo),
    ("torchrun", section_torchrun),
]


def table(rows: list[Row]) -> str:
    lines = ["| # | check | figure | target | result |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.check} | {r.figure} | {r.target} | {r.result} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the same code in seconds (CPU, make test)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the sections still to run once this many seconds have passed (a skipped "
                             "section fails the check); default 480, --quick 120")
    parser.add_argument("--nproc", type=int, default=None,
                        help="torchrun processes (default: 2 with 2 GPUs, else 1; on the CPU 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; --quick: 1, for a shared machine)")
    parser.add_argument("--sections", default="1,2,3,4,5", help="comma-separated subset of 1..5")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu (gpu-check skipped)", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the trainer then keeps it (and the data workers)
    budget = args.budget_s if args.budget_s is not None else sizes.budget_s
    if args.nproc is None:
        args.nproc = min(2, torch.cuda.device_count()) if device.type == "cuda" else 2
    wanted = {int(s) for s in args.sections.split(",") if s.strip()}

    started = time.perf_counter()
    rows: list[Row] = []
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="trunet-gpu-check-") as tmp:
        for number, (name, fn) in enumerate(SECTIONS, start=1):
            if number not in wanted:
                continue
            folder = Path(tmp) / f"section{number}"
            folder.mkdir()
            if time.perf_counter() - started > budget:
                rows.append(Row(number, f"{name}: not run", f"over the {budget:.0f} s budget", "-", SKIP + " (budget)"))
                continue
            t0 = time.perf_counter()
            try:
                extra = (args.nproc,) if fn is section_torchrun else ()
                rows += fn(device, sizes, Path(tmp) if fn in (section_demo, section_torchrun) else folder, *extra)
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                traceback.print_exc(file=sys.stderr)
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
                rows.append(Row(number, f"{name}: section raised", message, "-", FAIL))
            finally:
                free_memory()
            seconds = time.perf_counter() - t0
            timings.append(f"{number} {name} {seconds:.1f} s")
            print(f"gpu-check: section {number} ({name}) done in {seconds:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    cuda = (f"; CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if device.type == "cuda" else "")
    print(f"command: `{command}`  ")
    print(f"machine: {machine(device)}{cuda}  ")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}  ")
    print(f"wall time: {total:.0f} s ({'; '.join(timings)})  ")
    print()
    print(table(rows))
    failed = [r for r in rows if r.result == FAIL or r.result.startswith(SKIP + " (budget)")]
    print()
    print(f"{len(rows)} rows: {sum(r.result == PASS for r in rows)} pass, {len(failed)} fail, "
          f"{sum(r.result == INFO for r in rows)} info, {sum(r.result == SKIP for r in rows)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
