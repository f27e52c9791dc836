"""The :class:`Trainer`: one training run's model, data, optimisation, validation, checkpoints and metrics
(the job around it is :mod:`trunet.pipeline.training.run`).

Per optimizer step: a batch ``image (B, T, X, Y, Z)``, ``label (B, T, X, Y, Z)`` (``ignore_index`` on
unlabelled frames), ``frame_mask (B, T)`` -> model input ``(B, T, 1, X, Y, Z)`` -> logits ``(1, N, K, X, Y,
Z)`` of the ``N`` labelled frames only (every frame passes the encoder and the ConvLSTMs, only the labelled
ones the decoder; all ``(B, T)`` frames with the consistency loss, which needs them; a list of resolutions
with deep supervision) -> the loss of
:func:`~trunet.pipeline.training.losses.build_criterion` on the labelled frames only -> backward (GradScaler
for fp16) -> gradient clipping -> SGD (Nesterov) or AdamW -> the per-step warm-up + poly schedule of
:mod:`trunet.pipeline.training.optim`. An epoch is ``train.iterations_per_epoch`` steps.

Exact resume: every batch comes from a loader seeded with ``(train.seed, epoch, rank, step)`` (which cases,
and each sample's random transforms; see :mod:`trunet.pipeline.training.loaders`), so a run restarted at any
step draws the batches an uninterrupted run draws there. With ``train.deterministic: true`` the global RNGs
are re-seeded from the same key before every step too, and a run stopped anywhere (after an epoch,
mid-epoch, in validation) and resumed ends with the same weights, bit for bit (on CPU; cuDNN/cuBLAS add
their own non-determinism on GPUs).

Stopping: the :class:`StopRequest` of the job is checked after every step, before every validation case and
before the end-of-run W&B uploads; a stop saves ``latest.pt`` (within one step or one validation case of
the signal) and raises :class:`TrainingInterrupted`. A stop during validation saves the epoch's finished
steps; the resumed run validates that epoch again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from trunet.atomic import write_text
from trunet.config import Config, save_config
from trunet.data.cases import median_target_spacing, resolve_cases
from trunet.errors import TrunetError
from trunet.models import build_model
from trunet.pipeline import checkpoint as ckpt
from trunet.pipeline.inference.predictor import Predictor
from trunet.pipeline.precision import autocast, autocast_dtype
from trunet.pipeline.training import distributed as dist_utils
from trunet.pipeline.training.debug import (
    debug_loss_hook,
    debug_record,
    derived_seed,
    parameter_checksum,
    seed_everything,
)
from trunet.pipeline.training.distributed import DistContext
from trunet.pipeline.training.loaders import build_eval_dataset, build_train_loader
from trunet.pipeline.training.losses import build_criterion, consistency_loss
from trunet.pipeline.training.optim import (
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    replay_scheduler,
)
from trunet.pipeline.training.resume import check_resume_config
from trunet.pipeline.training.signals import QuietWorkerInit, StopRequest, TrainingInterrupted
from trunet.pipeline.training.tracking import Tracker
from trunet.pipeline.training.validation import validate
from trunet.progress import progress
from trunet.transforms.compose import CLEAN_IMAGE, preprocessing_from_config

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer:
    """One training run (built and driven by :func:`run_training`; see the module docstring)."""

    def __init__(self, config: Config, run_dir: Path, resume: bool, ctx: DistContext,
                 memory_estimate: Optional[Callable[[Config], float]] = None, stop: Optional[StopRequest] = None):
        self.config = config
        self.stop = stop if stop is not None else StopRequest()
        self.memory_estimate = memory_estimate
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

        seed_everything(t.seed)  # same initial weights on every rank
        # train.patch_size was checked against the model's size_divisor when the config was loaded
        self.model = build_model(c).to(self.device)

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
        self.criterion = build_criterion(c)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t.epochs * t.iterations_per_epoch,
                                         t.warmup_epochs * t.iterations_per_epoch, t.poly_power)
        self.amp_dtype = autocast_dtype(self.device, t.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.loader = build_train_loader(c, self.train_cases, self.target_spacing, self.run_dir / "cache",
                                         rank=ctx.rank, world_size=ctx.world_size)
        if not isinstance(self.loader.worker_init_fn, QuietWorkerInit):
            self.loader.worker_init_fn = QuietWorkerInit(self.loader.worker_init_fn)
        # validation: every rank predicts its share of the cases, rank 0 gathers
        shard = self.val_cases[ctx.rank :: ctx.world_size]
        self.val_dataset = build_eval_dataset(c, shard, self.preprocessing) if self.val_cases else None
        self.val_records = {r["case_id"]: r for r in self.val_cases}
        if not self.val_cases and ctx.is_main:
            logger.warning("no validation cases: best.pt is not written (set data.val_fraction > 0)")

    def _warn_memory(self) -> None:
        """Warn when the memory estimate (the ``memory_estimate`` hook, e.g. the planner's) exceeds the free GPU
        memory."""
        if self.device.type != "cuda" or self.memory_estimate is None:
            return
        try:
            need = float(self.memory_estimate(self.config))
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
        check_resume_config(payload.get("config", {}), self.config.to_dict(), str(self.latest_path))
        try:
            self.model.load_state_dict(payload["model_state"])
            load_scheduler_state(self.scheduler, payload["scheduler"])  # before the optimizer: see there
            self.optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrunetError(f"{self.latest_path}: cannot resume from this checkpoint: {exc}") from None
        self._rescale_schedule(payload)
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

    def _rescale_schedule(self, payload: dict[str, Any]) -> None:
        """When ``train.epochs`` changed on resume, rebuild the learning-rate schedule for the new length at
        the checkpoint's step: the rate becomes what a run started with the new ``train.epochs`` would have
        there (nnU-Net's choice). Kept as it was, a lengthened run would train its extra epochs at rate 0
        (the poly decay had reached 0); continued from the current rate instead, a finished run extended
        would too. So the rate jumps (up when lengthened), and the log says so."""
        t = self.t
        saved_epochs = int(payload.get("config", {}).get("train", {}).get("epochs", t.epochs))
        total, step = t.epochs * t.iterations_per_epoch, int(payload["iteration"])
        if saved_epochs == t.epochs or step >= total:
            return
        before = self.optimizer.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:  # a fresh schedule starts from the base rate
            group["lr"] = group["initial_lr"]
        self.scheduler = build_scheduler(self.optimizer, total, t.warmup_epochs * t.iterations_per_epoch,
                                         t.poly_power)
        replay_scheduler(self.scheduler, step)
        logger.info("train.epochs changed on resume (%d -> %d): the learning-rate schedule is rescaled to the "
                    "new length; at step %d the rate is %.3e (was %.3e)", saved_epochs, t.epochs, step,
                    self.optimizer.param_groups[0]["lr"], before)

    def save(self, best: bool = False) -> None:
        """Rank 0 writes ``best.pt`` (when ``best``), then ``latest.pt``; the other ranks write nothing.

        ``latest.pt`` comes last: it is what a resumed run starts from, so a job killed before it is written
        repeats the work since the previous ``latest.pt`` and writes ``best.pt`` (and ``metrics.csv``)
        again, instead of finding the epoch done without them."""
        if not self.ctx.is_main:
            return
        payload = self.payload()
        if best:
            ckpt.save_checkpoint(self.best_path, payload)
            debug_record(self.ctx, "saves", f"{self.best_path} epoch {self.epoch} step {self.iteration}")
        ckpt.save_checkpoint(self.latest_path, payload)
        debug_record(self.ctx, "saves", f"{self.latest_path} epoch {self.epoch} step {self.iteration}")

    def check_replicas(self) -> None:
        """Under DDP, check that every rank holds the same weights (one float per rank gathered)."""
        checksum = parameter_checksum(self.model)
        debug_record(self.ctx, "params", f"epoch {self.epoch} {checksum!r}")
        if not self.ctx.distributed:
            return
        sums = dist_utils.all_gather_objects(checksum, self.ctx)
        if any(not math.isclose(v, sums[0], rel_tol=1e-9, abs_tol=1e-9) for v in sums):
            raise TrunetError(
                f"data-parallel ranks hold different weights after epoch {self.epoch}: checksums {sums}"
            )

    # -- data --------------------------------------------------------------------------------------
    def _batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """The batches of steps ``start .. iterations_per_epoch - 1`` of ``epoch``, each a function of
        ``(seed, epoch, rank, step)``. Deterministic runs also re-seed the global RNGs before each step."""
        steps = self.t.iterations_per_epoch - start
        if steps <= 0:
            return
        self.loader.batch_sampler.set_window(epoch, start, steps)
        step = start
        for batch in self.loader:
            if self.t.deterministic:
                seed_everything(derived_seed(self.t.seed, epoch, self.ctx.rank, step))
            yield batch
            step += 1

    def stop_requested(self) -> bool:
        """True when any rank received SIGTERM/SIGINT (a collective under DDP: every rank calls it)."""
        flag = torch.tensor([1.0 if self.stop.signum else 0.0], device=self.device)
        dist_utils.all_reduce_sum(flag, self.ctx)
        return bool(flag.item() > 0)

    # -- one step ----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def step(self, batch: dict[str, Any], stop: StopRequest) -> tuple[Optional[float], bool]:
        """One optimizer step. Returns ``(loss or None if skipped, stop requested on any rank)``."""
        image = batch["image"].to(self.device, non_blocking=True).float().unsqueeze(2)  # (B, T, 1, X, Y, Z)
        label = batch["label"].to(self.device, non_blocking=True).long()
        frame_mask = batch["frame_mask"].to(self.device, non_blocking=True).bool()
        self.train_model.train()
        consistency = self.t.consistency_weight > 0 and CLEAN_IMAGE in batch
        # the labelled frames only reach the decoder (same loss and gradients, a cheaper step); the
        # consistency loss needs every frame
        decode = None if consistency or not bool(frame_mask.any()) else frame_mask
        with self._autocast():
            outputs = self.train_model(image, decode=decode)
        if decode is not None:
            label = label.flatten(0, 1)[decode.reshape(-1)].unsqueeze(0)  # (1, N, X, Y, Z)
            frame_mask = frame_mask.new_ones(label.shape[:2])
        loss = self.criterion(outputs, label, frame_mask)
        if consistency:
            clean = batch[CLEAN_IMAGE].to(self.device, non_blocking=True).float().unsqueeze(2)
            with torch.no_grad(), self._autocast():
                target = self.model(clean)  # the bare module: no DDP synchronisation for a no-grad pass
            loss = loss + self.t.consistency_weight * consistency_loss(outputs, target)
        loss = debug_loss_hook(loss, self.iteration)
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
    def validate(self) -> Optional[dict[str, Any]]:
        """Dice and HD95 per class on whole validation cases (labelled frames only), in the preprocessed
        space (target spacing); see :func:`trunet.pipeline.training.validation.validate`. None when a stop
        was requested before a case."""
        predictor = Predictor(self.model, self.preprocessing, self.config.infer, device=self.device,
                              amp=self.t.amp, amp_on_cpu=self.t.amp)  # as in training: bf16 on CPU too
        assert self.val_dataset is not None
        shown = self.config.tracking.wandb.num_val_images if self.ctx.is_main else 0
        return validate(predictor, self.val_dataset, self.classes, self.target_spacing, self.val_records, shown,
                        self.ctx, should_stop=self.stop_requested)

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
    def _interrupt(self) -> None:
        """Save ``latest.pt`` and raise :class:`TrainingInterrupted` (a stop was requested)."""
        self.save()
        dist_utils.barrier(self.ctx)
        raise TrainingInterrupted(self.stop.signum or signal.SIGTERM, self.latest_path, self.epoch, self.iteration)

    def run(self) -> Path:
        t, ctx, stop = self.t, self.ctx, self.stop
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
            stop.starting = False  # from here on a signal saves latest.pt (the SIGTERM handler is in place)
            with logging_redirect_tqdm():
                while self.epoch < t.epochs:
                    t0 = time.perf_counter()
                    if self.stop_requested() or self._train_epoch(stop) or \
                            not self._end_epoch(time.perf_counter() - t0):
                        exit_code = 128 + int(stop.signum or signal.SIGTERM)
                        self._interrupt()
            exit_code = 0
        finally:
            if self.tracker is not None:
                self.tracker.finish(exit_code=exit_code)
        return self.run_dir

    def _train_epoch(self, stop: StopRequest) -> bool:
        """The remaining steps of the current epoch, with a progress bar (one log line per ``log_every``
        steps when stderr is not a terminal) and W&B scalars every ``log_every`` steps. Returns True when
        a stop was requested (the epoch is then unfinished)."""
        t = self.t
        epoch, start = self.epoch, self.epoch_iteration
        samples_per_step = t.batch_size * self.ctx.world_size
        bar = progress(t.iterations_per_epoch, f"epoch {epoch + 1}/{t.epochs}", "step", initial=start,
                       every=self.config.tracking.wandb.log_every, disable=not self.ctx.is_main)
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

    def _end_epoch(self, seconds: float) -> bool:
        """Validate, record and save a finished epoch. Returns False, changing nothing, when a stop was
        requested during validation."""
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
            if result is None:
                return False
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
        self.write_metrics()
        self.save(best=is_best)  # latest.pt last (see save)
        dist_utils.barrier(ctx)
        self.tracker.log({"epoch/train_loss": loss, "epoch/epoch": self.epoch, "epoch/seconds": seconds},
                         step=self.iteration)
        logger.info("epoch %d/%d  loss %.4f  lr %.2e  %.1f samples/s  %.1f s%s", self.epoch, t.epochs, loss,
                    row["lr"], sps, seconds, summary)
        if self.epoch == t.epochs:
            self._upload_final()
        return True

    def _upload_final(self) -> None:
        """The end-of-run W&B summary and checkpoint artifacts; skipped after a stop request (the run is
        complete and saved; an upload may take minutes)."""
        self.tracker.summary({"best_mean_dice": self.best_metric, "epochs": self.epoch})
        uploads = [(self.best_path, ["best"], {"epoch": self.epoch, "mean_dice": self.best_metric}),
                   (self.latest_path, ["latest"], {"epoch": self.epoch})]
        for path, aliases, metadata in uploads:
            if self.stop.signum:
                logger.warning("%s received: the run is complete and saved; W&B checkpoint uploads skipped",
                               signal.Signals(self.stop.signum).name)
                return
            if path.is_file():
                self.tracker.log_checkpoint(path, aliases, metadata)
