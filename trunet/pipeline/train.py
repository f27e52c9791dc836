"""The training job: patch-based AMP training of the time-resolved UNet with validation, checkpoints, exact
resume, W&B tracking and data-parallel runs under ``torchrun``.

``run_training(config, run_dir=None, resume=False)`` is what ``trunet train`` calls. A run folder holds::

    config.yaml          the resolved config
    splits.json          the patient-level split (written by :func:`trunet.pipeline.data.resolve_cases`)
    phantom/             the generated phantom, when ``data.root`` is None
    checkpoints/         latest.pt (every epoch and on SIGTERM/SIGINT), best.pt (best mean validation Dice)
    metrics.csv          one row per epoch (train loss, lr, throughput, validation Dice/HD95 per class)
    log.txt              the log of the run (all ``trunet`` loggers)
    wandb/               the W&B run (offline by default), see :mod:`trunet.pipeline.tracking`

Training, per optimizer step: a batch ``image (B, T, X, Y, Z)``, ``label (B, T, X, Y, Z)`` (``ignore_index``
on unlabelled frames), ``frame_mask (B, T)`` -> model input ``(B, T, 1, X, Y, Z)`` -> logits ``(B, T, K, X,
Y, Z)`` (a list of resolutions with deep supervision) -> :class:`MaskedDiceCELoss` on the labelled frames
only -> backward (GradScaler for fp16) -> gradient clipping -> SGD (Nesterov) or AdamW -> a per-step
LambdaLR: linear warm-up then poly decay. An epoch is ``train.iterations_per_epoch`` steps.

Exact resume: with ``train.deterministic: true`` every epoch's batches come from a DataLoader rebuilt with
a seed derived from ``(train.seed, epoch, rank)`` (sampler, MONAI transform states, worker seeds), and the
global RNGs are re-seeded from it too. So the batches of epoch ``e`` do not depend on what happened
before, and a run stopped after epoch ``k`` and resumed gives the same losses (on CPU; cuDNN/cuBLAS add
their own non-determinism on GPUs). A run stopped mid-epoch (SIGTERM) resumes at the next step of that
epoch with a loader seeded from ``(seed, epoch, rank, step)``: statistically the same run, not bit-identical.

Signals: SIGTERM or SIGINT lets the current step finish, writes ``latest.pt`` and raises
:class:`TrainingInterrupted`; ``trunet train`` then exits with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT), the shell's convention for "ended by a signal". A non-zero code is deliberate: the job is not
finished, so Kubernetes (``restartPolicy: OnFailure``), torchrun's elastic restarts and Slurm
``--requeue`` scripts restart it, and ``trunet train --resume`` continues from the whole ``latest.pt``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trunet.atomic import write_text
from trunet.errors import ConfigError, TrunetError
from trunet.pipeline import checkpoint as ckpt
from trunet.pipeline import distributed as dist_utils
from trunet.config import Config, config_from_dict, save_config
from trunet.pipeline.distributed import DistContext

__all__ = [
    "run_training",
    "TrainingInterrupted",
    "MaskedDiceCELoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "downsample_label",
    "poly_lr_lambda",
    "autocast_dtype",
    "default_run_dir",
    "parameter_checksum",
    "Trainer",
]

logger = logging.getLogger(__name__)

RESUMABLE_CHANGES = (
    "train.epochs", "train.val_every", "train.val_cases", "train.max_nonfinite", "data.num_workers",
    "data.cache", "infer.", "tracking.",
)
"""Config keys (or prefixes) that may differ between a run and its ``--resume``; anything else changes
the training and is refused."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing ``latest.pt``.

    Attributes:
        signum: the signal; ``trunet train`` exits with ``128 + signum``.
        checkpoint: the ``latest.pt`` written before stopping.
    """

    def __init__(self, signum: int, checkpoint: Path, epoch: int, iteration: int):
        self.signum = int(signum)
        self.checkpoint = Path(checkpoint)
        self.epoch = epoch
        self.iteration = iteration
        name = signal.Signals(self.signum).name
        super().__init__(
            f"stopped by {name} at epoch {epoch + 1}, step {iteration}; {checkpoint} is saved "
            f"(continue with: trunet train --resume --run-dir {checkpoint.parent.parent} --config ...)"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# --------------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------------


class MaskedDiceCELoss(nn.Module):
    """Soft Dice + cross-entropy over the labelled frames of a batch.

    MONAI's :class:`~monai.losses.DiceCELoss` cannot do this: its CE has no ``ignore_index`` path through
    one-hot targets, and its Dice would count unlabelled frames (``ignore_index`` voxels) as wrong
    background. So the frames are selected here first (``frame_mask``): unlabelled frames take no part in
    the loss, and their logits get exactly zero gradient (see the sparse-label test). Within labelled
    frames, any stray ``ignore_index`` voxel is left out of both terms: CE through ``ignore_index``, Dice
    through MONAI's :class:`~monai.losses.MaskedDiceLoss` with a voxel mask. The Dice is nnU-Net's: batch
    Dice over all selected frames, foreground classes only. Computed in float32 whatever the autocast.

    Args:
        num_classes: ``K``.
        ignore_index: label value of unlabelled voxels (255).
        dice_weight / ce_weight: weights of the two terms.

    Shapes:
        logits ``(B, T, K, X, Y, Z)``, label ``(B, T, X, Y, Z)`` integer, frame_mask ``(B, T)`` bool ->
        a scalar. A batch without any labelled frame gives ``0 * logits.sum()`` (graph kept).
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, dice_weight: float = 1.0, ce_weight: float = 1.0
    ):
        super().__init__()
        from monai.losses import MaskedDiceLoss

        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        # target one-hot is built here (not with to_onehot_y) so masked voxels are 0 in every channel
        self.dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True, smooth_nr=1e-5,
                                   smooth_dr=1e-5)

    def forward(self, logits: Tensor, label: Tensor, frame_mask: Tensor) -> Tensor:
        if logits.dim() != 6 or label.shape != logits.shape[:2] + logits.shape[3:]:
            raise ValueError(f"logits (B, T, K, X, Y, Z) and label (B, T, X, Y, Z) expected, got "
                             f"{tuple(logits.shape)} and {tuple(label.shape)}")
        mask = frame_mask.to(device=logits.device, dtype=torch.bool).reshape(-1)
        if not bool(mask.any()):
            return logits.sum() * 0.0
        x = logits.flatten(0, 1)[mask].float()  # (N, K, X, Y, Z) labelled frames only
        y = label.flatten(0, 1)[mask].long()  # (N, X, Y, Z)
        total = x.new_zeros(())
        valid = y != self.ignore_index
        if self.ce_weight:
            if bool(valid.any()):
                total = total + self.ce_weight * F.cross_entropy(x, y, ignore_index=self.ignore_index)
        if self.dice_weight:
            target = F.one_hot(torch.where(valid, y, 0), self.num_classes).movedim(-1, 1).to(x.dtype)
            voxel_mask = valid.unsqueeze(1).to(x.dtype)
            total = total + self.dice_weight * self.dice(x, target, mask=voxel_mask)
        return total


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's deep-supervision weights: halving per level (1, 1/2, 1/4, ...), normalised to sum 1."""
    w = [0.5**i for i in range(levels)]
    s = sum(w)
    return [v / s for v in w]


def downsample_label(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of ``(B, T, X, Y, Z)`` integer labels to spatial ``size``.

    Nearest keeps label values as they are, so ``ignore_index`` stays ``ignore_index``.
    """
    if tuple(label.shape[2:]) == tuple(size):
        return label
    size = tuple(int(s) for s in size)
    return F.interpolate(label.float(), size=size, mode="nearest-exact").to(label.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the outputs of several resolutions (labels downsampled to each).

    A single tensor is passed straight to ``loss``.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: Tensor | Sequence[Tensor], label: Tensor, frame_mask: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, label, frame_mask)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            total = total + w * self.loss(out, downsample_label(label, out.shape[3:]), frame_mask)
        return total


# --------------------------------------------------------------------------------------------------------
# optimisation helpers
# --------------------------------------------------------------------------------------------------------


def poly_lr_lambda(total_steps: int, warmup_steps: int, power: float) -> Callable[[int], float]:
    """LR factor per step ``s``: linear warm-up ``(s + 1) / W`` for ``s < W``, then poly decay
    ``(1 - (s - W) / (S - W)) ** power`` to 0 at ``S`` total steps."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return factor


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 where the device supports it (CPU included), else fp16; None = AMP off."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16 if torch.amp.autocast_mode.is_autocast_available(device.type) else None


def _build_optimizer(model: nn.Module, t: Any) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True,
                               weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (numpy's SeedSequence mixes them; nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_dir(config_path: str | os.PathLike | None, now: datetime | None = None) -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>`` (``runs/run-...`` without a config file)."""
    stem = Path(config_path).stem if config_path is not None else "run"
    return Path("runs") / f"{stem}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resume_config(saved: dict[str, Any], given: dict[str, Any], where: str) -> None:
    a, b = _flatten(saved), _flatten(given)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES))
    if changed:
        details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"{where}: --resume with a config that changes the training ({details}); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change. Resume with the run's own config.yaml."
        )


class _QuietWorkerInit:
    """``worker_init_fn`` that makes DataLoader workers ignore SIGTERM/SIGINT, then runs ``inner``.

    Slurm, ``kill -- -PGID`` and Ctrl-C signal the whole process group: without this a worker dies at once
    and the main process fails with "DataLoader worker is killed" instead of finishing its step and saving.
    The main process alone decides to stop; its workers end when the loader does.
    """

    def __init__(self, inner: Optional[Callable[[int], None]]):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


class _StopRequest:
    """SIGTERM/SIGINT handlers that only raise a flag; the training loop stops after the current step.

    Installed only in the main thread (Python allows signal handlers nowhere else); restored on exit.
    A second signal while stopping falls back to the previous handler (e.g. KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: do what the process would have done
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning("%s received: finishing the current step, then saving latest.pt",
                       signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# --------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------


class Trainer:
    """One training run (built and driven by :func:`run_training`; see the module docstring)."""

    def __init__(self, config: Config, run_dir: Path, resume: bool, ctx: DistContext):
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.ctx = ctx
        self.device = ctx.device
        self.t = config.train
        self.classes = list(config.data.classes)
        self.ckpt_dir = run_dir / "checkpoints"
        self.latest_path = self.ckpt_dir / "latest.pt"
        self.best_path = self.ckpt_dir / "best.pt"
        self.epoch = 0  # completed epochs
        self.epoch_iteration = 0  # steps done in the current (unfinished) epoch
        self.iteration = 0  # optimizer steps in total (skipped non-finite steps included)
        self.best_metric: Optional[float] = None
        self.metrics: list[dict[str, Any]] = []
        self.partial: dict[str, float] = {"loss_sum": 0.0, "loss_count": 0, "skipped": 0}
        self.nonfinite_run = 0
        self.tracker: Any = None

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        from trunet.pipeline.data import (
            build_eval_dataset, build_train_loader, median_target_spacing, resolve_cases,
        )
        from trunet.transforms.compose import preprocessing_from_config

        c, t, ctx = self.config, self.t, self.ctx
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # the data workers need cores too: oversubscribed OpenMP threads slow a step down manyfold
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // ctx.world_size - c.data.num_workers))
            logger.info("CPU training with %d thread(s) and %d data worker(s)", torch.get_num_threads(),
                        c.data.num_workers)

        self._warn_memory()  # before anything of ours is on the GPU

        _seed_everything(t.seed)  # same initial weights on every rank
        # train.patch_size was checked against the model's size_divisor when the config was loaded
        self.model = ckpt.model_from_hparams(ckpt.model_hparams(c)).to(self.device)

        # rank 0 resolves (and maybe generates) the data first; the others then find it in place. A data
        # error on rank 0 is sent to every rank, so none waits for a collective that never comes.
        error: Optional[TrunetError] = None
        if ctx.is_main:
            try:
                lists = resolve_cases(c.data, self.run_dir)
            except TrunetError as exc:
                error = exc
        message = dist_utils.broadcast_object(None if error is None else str(error), ctx)
        if error is not None:
            raise error
        if message is not None:
            raise TrunetError(message)
        if not ctx.is_main:
            lists = resolve_cases(c.data, self.run_dir)
        self.train_cases = lists.training
        self.val_cases = lists.validation[: t.val_cases] if t.val_cases is not None else lists.validation
        spacing = c.data.target_spacing or median_target_spacing(self.train_cases)
        self.target_spacing = tuple(float(s) for s in spacing)
        self.preprocessing = preprocessing_from_config(c, self.target_spacing)

        self.train_model: nn.Module = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.criterion = DeepSupervisionLoss(
            MaskedDiceCELoss(len(self.classes), c.data.ignore_index, t.dice_weight, t.ce_weight)
        )
        self.optimizer = _build_optimizer(self.model, t)
        total = t.epochs * t.iterations_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lr_lambda(total, t.warmup_epochs * t.iterations_per_epoch, t.poly_power)
        )
        self.amp_dtype = autocast_dtype(self.device, t.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.loader = build_train_loader(c, self.train_cases, self.target_spacing, self.run_dir / "cache",
                                         rank=ctx.rank, world_size=ctx.world_size)
        if not isinstance(self.loader.worker_init_fn, _QuietWorkerInit):
            self.loader.worker_init_fn = _QuietWorkerInit(self.loader.worker_init_fn)
        # validation: every rank predicts its share of the cases, rank 0 gathers
        shard = self.val_cases[ctx.rank :: ctx.world_size]
        self.val_dataset = build_eval_dataset(c, shard, self.preprocessing) if self.val_cases else None
        self.val_records = {r["case_id"]: r for r in self.val_cases}
        if not self.val_cases and ctx.is_main:
            logger.warning("no validation cases: best.pt is not written (set data.val_fraction > 0)")

    def _warn_memory(self) -> None:
        """Warn when ``trunet.pipeline.plan.estimate_memory`` (if present) exceeds the free GPU memory."""
        if self.device.type != "cuda":
            return
        try:
            from trunet.pipeline.plan import estimate_memory  # written by the planning module
        except ImportError:
            return
        try:
            need = float(estimate_memory(self.config, device_type="cuda").total_bytes)
            free, _ = torch.cuda.mem_get_info(self.device)
        except Exception as exc:  # noqa: BLE001 - an estimate must never stop training
            logger.debug("memory estimate unavailable: %s", exc)
            return
        if need > free:
            logger.warning("estimated peak training memory %.1f GB exceeds the free GPU memory %.1f GB: "
                           "expect out-of-memory (see trunet plan)", need / 1e9, free / 1e9)

    # -- checkpoints -------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {
            **ckpt.inference_payload(self.model, self.config, self.preprocessing),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "epoch_iteration": self.epoch_iteration,
            "epoch_partial": dict(self.partial),
            "iteration": self.iteration,
            "rng": ckpt.capture_rng_state(),
            "best_metric": self.best_metric,
            "metrics": self.metrics,
        }

    def load(self) -> None:
        payload = ckpt.load_checkpoint(self.latest_path, map_location=self.device, classes=self.classes)
        _check_resume_config(payload.get("config", {}), self.config.to_dict(), str(self.latest_path))
        try:
            self.model.load_state_dict(payload["model_state"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrunetError(f"{self.latest_path}: cannot resume from this checkpoint: {exc}") from None
        if payload.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch = int(payload["epoch"])
        self.epoch_iteration = int(payload.get("epoch_iteration", 0))
        self.partial = dict(payload.get("epoch_partial") or self.partial)
        self.iteration = int(payload["iteration"])
        self.best_metric = payload.get("best_metric")
        self.metrics = list(payload.get("metrics") or [])
        if payload.get("rng") is not None:
            ckpt.restore_rng_state(payload["rng"])
        best = "none" if self.best_metric is None else f"{self.best_metric:.4f}"
        logger.info("resuming %s at epoch %d, step %d (best mean Dice so far: %s)", self.run_dir,
                    self.epoch + 1, self.iteration, best)

    def save(self, best: bool = False) -> None:
        """Rank 0 writes ``latest.pt`` (and ``best.pt``); the other ranks write nothing."""
        if not self.ctx.is_main:
            return
        payload = self.payload()
        ckpt.save_checkpoint(self.latest_path, payload)
        _debug_record(self.ctx, "saves", f"{self.latest_path} epoch {self.epoch} step {self.iteration}")
        if best:
            ckpt.save_checkpoint(self.best_path, payload)
            _debug_record(self.ctx, "saves", f"{self.best_path} epoch {self.epoch} step {self.iteration}")

    def check_replicas(self) -> None:
        """Under DDP, check that every rank holds the same weights (one float per rank gathered)."""
        checksum = parameter_checksum(self.model)
        _debug_record(self.ctx, "params", f"epoch {self.epoch} {checksum!r}")
        if not self.ctx.distributed:
            return
        sums = dist_utils.all_gather_objects(checksum, self.ctx)
        if any(not math.isclose(v, sums[0], rel_tol=1e-9, abs_tol=1e-9) for v in sums):
            raise TrunetError(
                f"data-parallel ranks hold different weights after epoch {self.epoch}: checksums {sums}"
            )

    # -- data --------------------------------------------------------------------------------------
    def _epoch_loader(self, seed: int, steps: int) -> Any:
        """The loader for ``steps`` batches. Deterministic runs rebuild it from ``seed`` (sampler, transform
        RNGs, worker seeds, no persistent workers), so a resumed epoch sees the same batches."""
        if not self.t.deterministic and steps == self.t.iterations_per_epoch:
            return self.loader
        from monai.data import DataLoader

        base = self.loader
        generator = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(
            base.dataset, replacement=True, num_samples=steps * self.t.batch_size, generator=generator
        )
        return DataLoader(
            base.dataset, batch_size=self.t.batch_size, sampler=sampler, num_workers=base.num_workers,
            drop_last=True, pin_memory=base.pin_memory, generator=generator, collate_fn=base.collate_fn,
            worker_init_fn=base.worker_init_fn, persistent_workers=False,
        )

    def _batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """``iterations_per_epoch - start`` batches of ``epoch`` (more loader passes if one is short)."""
        remaining = self.t.iterations_per_epoch - start
        passes = 0
        while remaining > 0:
            seed = _derived_seed(self.t.seed, epoch, self.ctx.rank, start, passes)
            if self.t.deterministic:
                _seed_everything(seed)
            produced = 0
            for batch in self._epoch_loader(seed, remaining):
                produced += 1
                yield batch
                remaining -= 1
                if remaining == 0:
                    return
            if produced == 0:
                raise TrunetError("the training loader produced no batch "
                                  "(fewer training samples than batch_size?)")
            passes += 1

    # -- one step ----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, batch: dict[str, Any], stop: _StopRequest) -> tuple[Optional[float], bool]:
        """One optimizer step. Returns ``(loss or None if skipped, stop requested on any rank)``."""
        image = batch["image"].to(self.device, non_blocking=True).float().unsqueeze(2)  # (B, T, 1, X, Y, Z)
        label = batch["label"].to(self.device, non_blocking=True).long()
        frame_mask = batch["frame_mask"].to(self.device, non_blocking=True).bool()
        self.train_model.train()
        with self._autocast():
            outputs = self.train_model(image)
        loss = self.criterion(outputs, label, frame_mask)
        loss = _debug_loss_hook(loss, self.iteration)
        # agree across ranks before backward: all skip or none (DDP all-reduces inside backward)
        flags = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0, 1.0 if stop.signum else 0.0],
                             device=self.device)
        dist_utils.all_reduce_sum(flags, self.ctx)
        nonfinite, stop_now = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        self.optimizer.zero_grad(set_to_none=True)
        value: Optional[float] = None
        if nonfinite:
            self.nonfinite_run += 1
            self.partial["skipped"] += 1
            logger.warning("non-finite loss at epoch %d, step %d: step skipped (%d in a row, stop at %d)",
                           self.epoch + 1, self.iteration + 1, self.nonfinite_run, self.t.max_nonfinite)
            if self.nonfinite_run >= self.t.max_nonfinite:
                kept = (f"{self.latest_path} (epoch {self.epoch})" if self.latest_path.is_file()
                        else "no checkpoint yet")
                raise TrunetError(
                    f"non-finite loss in {self.nonfinite_run} consecutive steps "
                    f"(epoch {self.epoch + 1}, step "
                    f"{self.iteration + 1}): training stopped; last good checkpoint: {kept}. Lower train.lr, "
                    "check the data, or set train.amp: false"
                )
        else:
            self.nonfinite_run = 0
            self.scaler.scale(loss).backward()
            if self.t.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            value = float(loss.detach().item())
        self.scheduler.step()
        self.iteration += 1
        return value, stop_now

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Dice and HD95 per class on whole validation cases (labelled frames only), in the preprocessed
        space (target spacing). Returns scalars, per-case rows and visuals (rank 0 has the gathered rows)."""
        from monai.metrics import compute_dice, compute_hausdorff_distance

        from trunet.pipeline.infer import Predictor

        k = len(self.classes)
        predictor = Predictor(self.model, self.preprocessing, self.config.infer, device=self.device,
                              amp=self.t.amp, amp_on_cpu=self.t.amp)  # as in training: bf16 on CPU too
        rows: list[dict[str, Any]] = []
        visuals: list[dict[str, Any]] = []
        shown = self.config.tracking.wandb.num_val_images if self.ctx.is_main else 0
        assert self.val_dataset is not None
        for i in range(len(self.val_dataset)):
            item = self.val_dataset[i]
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
            p1 = F.one_hot(p, k).movedim(-1, 1).float()  # (N, K, X, Y, Z)
            g1 = F.one_hot(g, k).movedim(-1, 1).float()
            dice = compute_dice(p1, g1, include_background=False, ignore_empty=True)  # (N, K-1)
            with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*always_return_as_numpy")
                hd = compute_hausdorff_distance(p1, g1, include_background=False, percentile=95,
                                                spacing=list(self.target_spacing))
            hd = torch.where(torch.isfinite(hd), hd, torch.full_like(hd, float("nan")))
            row: dict[str, Any] = {"case_id": case_id}
            for j, name in enumerate(self.classes[1:]):
                row[f"dice/{name}"] = _nanmean(dice[:, j])
            for j, name in enumerate(self.classes[1:]):
                row[f"hd95/{name}"] = _nanmean(hd[:, j])
            row["mean_dice"] = _nanmean(torch.tensor([row[f"dice/{n}"] for n in self.classes[1:]]))
            rows.append(row)
            if len(visuals) < shown:
                record = self.val_records.get(case_id, {})
                labelled = torch.nonzero(frames).flatten().tolist()
                ed = record.get("ed") if record.get("ed") is not None else labelled[0]
                es = record.get("es") if record.get("es") is not None else labelled[-1]
                visuals.append({
                    "case_id": case_id, "image": np.asarray(torch.as_tensor(image).cpu()),
                    "pred": pred.numpy(), "label": label.numpy(), "frames": {"ED": int(ed), "ES": int(es)},
                })
        gathered = dist_utils.all_gather_objects(rows, self.ctx)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["case_id"])
        scalars: dict[str, float] = {}
        for name in self.classes[1:]:
            scalars[f"val/dice/{name}"] = _nanmean(torch.tensor([r[f"dice/{name}"] for r in rows]))
            scalars[f"val/hd95/{name}"] = _nanmean(torch.tensor([r[f"hd95/{name}"] for r in rows]))
        foreground = [scalars[f"val/dice/{n}"] for n in self.classes[1:]]
        scalars["val/mean_dice"] = _nanmean(torch.tensor(foreground))
        return {"scalars": scalars, "rows": rows, "visuals": visuals}

    # -- files -------------------------------------------------------------------------------------
    def metric_columns(self) -> list[str]:
        cols = ["epoch", "iteration", "train_loss", "lr", "samples_per_s", "epoch_seconds", "skipped_steps",
                "val_mean_dice"]
        cols += [f"val_dice_{n}" for n in self.classes[1:]] + [f"val_hd95_{n}" for n in self.classes[1:]]
        return cols

    def write_metrics(self) -> None:
        if not self.ctx.is_main:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metric_columns(), extrasaction="ignore")
        writer.writeheader()
        for row in self.metrics:
            # repr keeps every bit of a float, so resumed and uninterrupted runs compare exactly
            writer.writerow({k: "" if v is None else repr(v) if isinstance(v, float) else v
                             for k, v in row.items()})
        write_text(self.run_dir / "metrics.csv", buffer.getvalue())

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from trunet.pipeline.tracking import Tracker

        t, ctx = self.t, self.ctx
        if self.resume:
            self.load()  # refuses a config that changes the training before anything is written
        if ctx.is_main:
            save_config(self.config, self.run_dir / "config.yaml")
        self.tracker = Tracker(self.config, self.run_dir, enabled=ctx.is_main, resume=self.resume)
        samples_per_step = t.batch_size * ctx.world_size
        exit_code = 1
        logger.info("training on %s%s: %d training / %d validation cases, target spacing %s mm, AMP %s, "
                    "%d epochs x %d steps, %d sample(s) per step", self.device,
                    f" x {ctx.world_size} processes ({ctx.backend})" if ctx.distributed else "",
                    len(self.train_cases), len(self.val_cases), list(self.target_spacing),
                    self.amp_dtype or "off", t.epochs, t.iterations_per_epoch, samples_per_step)
        try:
            with _StopRequest() as stop, logging_redirect_tqdm():
                while self.epoch < t.epochs:
                    t0 = time.perf_counter()
                    if self._train_epoch(stop, tqdm):
                        self.save()
                        dist_utils.barrier(ctx)
                        signum = stop.signum or signal.SIGTERM
                        self.tracker.log_checkpoint(self.latest_path, ["latest"], {"epoch": self.epoch})
                        exit_code = 128 + int(signum)
                        raise TrainingInterrupted(signum, self.latest_path, self.epoch, self.iteration)
                    self._end_epoch(time.perf_counter() - t0)
            exit_code = 0
        finally:
            if self.tracker is not None:
                self.tracker.finish(exit_code=exit_code)
        return self.run_dir

    def _train_epoch(self, stop: _StopRequest, tqdm: Any) -> bool:
        """The remaining steps of the current epoch, with a progress bar and W&B scalars every
        ``log_every`` steps. Returns True when a stop was requested (the epoch is then unfinished)."""
        t = self.t
        epoch, start = self.epoch, self.epoch_iteration
        samples_per_step = t.batch_size * self.ctx.world_size
        bar = tqdm(total=t.iterations_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{t.epochs}",
                   unit="step", disable=not self.ctx.is_main, leave=False, dynamic_ncols=True)
        t0 = window_t0 = time.perf_counter()
        window_loss, window_n, window_steps = 0.0, 0, 0
        stopped = False
        try:
            for batch in self._batches(epoch, start):
                loss, stopped = self.step(batch, stop)
                self.epoch_iteration += 1
                window_steps += 1
                if loss is not None:
                    self.partial["loss_sum"] += loss
                    self.partial["loss_count"] += 1
                    window_loss += loss
                    window_n += 1
                sps = (self.epoch_iteration - start) * samples_per_step / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{window_loss / max(window_n, 1):.4f}", samples_per_s=f"{sps:.1f}")
                if self.iteration % max(1, self.config.tracking.wandb.log_every) == 0:
                    now = time.perf_counter()
                    scalars = {
                        "train/loss": window_loss / window_n if window_n else float("nan"),
                        "train/lr": self.optimizer.param_groups[0]["lr"],
                        "train/samples_per_s": window_steps * samples_per_step / max(now - window_t0, 1e-9),
                        "train/epoch": epoch + self.epoch_iteration / t.iterations_per_epoch,
                    }
                    if self.device.type == "cuda":
                        scalars["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    self.tracker.log(scalars, step=self.iteration)
                    window_loss, window_n, window_t0, window_steps = 0.0, 0, now, 0
                if stopped:
                    break
        finally:
            bar.close()
        return stopped

    def _end_epoch(self, seconds: float) -> None:
        t, ctx = self.t, self.ctx
        count = int(self.partial["loss_count"])
        loss = self.partial["loss_sum"] / count if count else float("nan")
        loss = float(dist_utils.all_reduce_mean(loss, ctx))
        sps = t.iterations_per_epoch * t.batch_size * ctx.world_size / max(seconds, 1e-9)
        row: dict[str, Any] = {
            "epoch": self.epoch + 1, "iteration": self.iteration, "train_loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": round(sps, 3),
            "epoch_seconds": round(seconds, 3), "skipped_steps": int(self.partial["skipped"]),
        }
        is_best = False
        summary = ""
        last = self.epoch + 1 == t.epochs
        if self.val_dataset is not None and ((self.epoch + 1) % t.val_every == 0 or last):
            v0 = time.perf_counter()
            result = self.validate()
            s = result["scalars"]
            mean = s["val/mean_dice"]
            row["val_mean_dice"] = mean
            for n in self.classes[1:]:
                row[f"val_dice_{n}"] = s[f"val/dice/{n}"]
                row[f"val_hd95_{n}"] = s[f"val/hd95/{n}"]
            if not math.isnan(mean) and (self.best_metric is None or mean > self.best_metric):
                self.best_metric, is_best = mean, True
            self.tracker.log_validation(self.iteration, s, result["rows"], result["visuals"])
            best = self.best_metric if self.best_metric is not None else float("nan")
            summary = ("  val Dice " + " ".join(f"{n} {s[f'val/dice/{n}']:.3f}" for n in self.classes[1:])
                       + f" mean {mean:.4f} (best {best:.4f}) [{time.perf_counter() - v0:.1f} s]")
        self.metrics.append(row)
        self.epoch += 1
        self.epoch_iteration = 0
        self.partial = {"loss_sum": 0.0, "loss_count": 0, "skipped": 0}
        self.check_replicas()
        self.save(best=is_best)
        self.write_metrics()
        dist_utils.barrier(ctx)
        self.tracker.log({"epoch/train_loss": loss, "epoch/epoch": self.epoch, "epoch/seconds": seconds},
                         step=self.iteration)
        logger.info("epoch %d/%d  loss %.4f  lr %.2e  %.1f samples/s  %.1f s%s", self.epoch, t.epochs, loss,
                    row["lr"], sps, seconds, summary)
        if self.epoch == t.epochs:
            self.tracker.summary({"best_mean_dice": self.best_metric, "epochs": self.epoch})
            if self.best_path.is_file():
                self.tracker.log_checkpoint(self.best_path, ["best"],
                                            {"epoch": self.epoch, "mean_dice": self.best_metric})
            self.tracker.log_checkpoint(self.latest_path, ["latest"], {"epoch": self.epoch})


def _nanmean(values: Tensor) -> float:
    values = torch.as_tensor(values, dtype=torch.float64)
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else float("nan")


def _debug_record(ctx: DistContext, name: str, line: str) -> None:
    """Test hook: with ``TRUNET_DEBUG_DIR`` set, append ``line`` to ``<dir>/rank<r>-<name>.txt``."""
    folder = os.environ.get("TRUNET_DEBUG_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{ctx.rank}-{name}.txt", "a") as fh:
            fh.write(line + "\n")


def parameter_checksum(model: nn.Module) -> float:
    """A float64 fingerprint of the weights (sum of each tensor times its 1-based position)."""
    with torch.no_grad():
        tensors = [p for p in model.state_dict().values() if p.is_floating_point()]
        return float(sum((i + 1) * p.detach().double().sum().item() for i, p in enumerate(tensors)))


def _debug_loss_hook(loss: Tensor, iteration: int) -> Tensor:
    """Test hook: ``TRUNET_DEBUG_NAN_STEPS="3,4"`` turns the loss of those 0-based steps into NaN."""
    spec = os.environ.get("TRUNET_DEBUG_NAN_STEPS")
    if spec and iteration in {int(s) for s in spec.split(",") if s.strip()}:
        return loss * float("nan")
    return loss


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------


def _prepare_run_dir(config: Config, run_dir: Optional[str | os.PathLike], resume: bool,
                     config_path: Optional[str | os.PathLike]) -> Path:
    if run_dir is None:
        if resume:
            raise TrunetError("--resume needs --run-dir (the run folder to continue)")
        run = default_run_dir(config_path)
    else:
        run = Path(run_dir)
    if resume:
        if not (run / "checkpoints" / "latest.pt").is_file():
            raise TrunetError(f"{run}: nothing to resume (no checkpoints/latest.pt in this folder)")
    elif run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise TrunetError(f"{run}: the run folder is not empty; continue it with --resume or choose another "
                          "--run-dir")
    run.mkdir(parents=True, exist_ok=True)
    return run


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt", mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_logger = logging.getLogger("trunet")
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    return handler


def run_training(
    config: Config,
    run_dir: Optional[str | os.PathLike] = None,
    resume: bool = False,
    config_path: Optional[str | os.PathLike] = None,
) -> Path:
    """Train a model; return the run folder.

    Args:
        config: the resolved config.
        run_dir: the run folder (default ``runs/<config stem>-<YYYYmmdd-HHMMSS>``); a fresh run needs an
            empty or missing folder.
        resume: continue the run in ``run_dir`` from ``checkpoints/latest.pt``.
        config_path: the config file (names the default run folder).

    Raises:
        TrunetError: bad run folder (non-empty for a fresh run, no ``latest.pt`` to resume), config or
            data errors, ``max_nonfinite`` non-finite losses in a row.
        TrainingInterrupted: SIGTERM/SIGINT; ``latest.pt`` was written first.
    """
    config = config_from_dict(config.to_dict(), "resolved config")  # validate (overrides may come from code)
    with dist_utils.distributed_context() as ctx:
        if not ctx.distributed and dist_utils.launcher_world_size() > 1:
            logger.warning("%d processes were launched but WORLD_SIZE is 1: each trains its own model. "
                           "Use torchrun --nproc_per_node=N -m trunet train ... for data-parallel training",
                           dist_utils.launcher_world_size())
        error: Optional[str] = None
        run: Optional[Path] = None
        if ctx.is_main:
            try:
                run = _prepare_run_dir(config, run_dir, resume, config_path)
            except TrunetError as exc:
                error = str(exc)
        error, run = dist_utils.broadcast_object((error, run), ctx)
        if error is not None:
            raise TrunetError(error)
        assert run is not None
        package_logger = logging.getLogger("trunet")
        threads, previous_level = torch.get_num_threads(), package_logger.level
        handler = _attach_log_file(run) if ctx.is_main else None
        if not ctx.is_main:
            package_logger.setLevel(logging.WARNING)
        try:
            trainer = Trainer(config, run, resume, ctx)
            trainer.setup()
            result = trainer.run()
            logger.info("done: %s (best mean validation Dice %s)", result,
                        "n/a" if trainer.best_metric is None else f"{trainer.best_metric:.4f}")
            return result
        finally:
            torch.set_num_threads(threads)
            package_logger.setLevel(previous_level)
            if handler is not None:
                package_logger.removeHandler(handler)
                handler.close()
