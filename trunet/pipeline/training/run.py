"""The training job: the run folder, the log file, the distributed context and the :class:`Trainer` driven to
the end or to a signal.

``run_training(config, run_dir=None, resume="never")`` is what ``trunet train`` calls. A run folder holds::

    config.yaml          the resolved config
    splits.json          the patient-level split (written by :func:`trunet.data.cases.resolve_cases`)
    phantom/             the generated phantom, when ``data.root`` is None
    checkpoints/         latest.pt (every epoch and on SIGTERM/SIGINT), best.pt (best mean validation Dice)
    metrics.csv          one row per epoch (train loss, lr, throughput, validation Dice/HD95 per class)
    log.txt              the log of the run (all ``trunet`` loggers), ending with why the job ended
    trunet.lock          the lock of the job working in the folder (:mod:`~trunet.pipeline.training.rundir`)
    wandb/               the W&B run (offline by default), see :mod:`trunet.pipeline.training.tracking`

Start-up order: the config and the data (headers, splits) are checked before anything is written, so a
bad input leaves no run folder behind; then the folder is created and locked; the SIGTERM handler is in
place before the slow steps (data caching, W&B init). A folder without a checkpoint is not a run to
protect: the same command starts afresh there (see :mod:`~trunet.pipeline.training.rundir`).

Signals: SIGTERM or SIGINT lets the current step (or validation case) finish, writes ``latest.pt`` and
raises :class:`TrainingInterrupted`; during start-up it raises at once. ``trunet train`` then exits with
``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the shell's convention for "ended by a signal". A
non-zero code is deliberate: the job is not finished, so Kubernetes (``restartPolicy: OnFailure``),
torchrun's elastic restarts and Slurm ``--requeue`` scripts restart it, and ``trunet train --resume auto``
(the same command every time) continues from the whole ``latest.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from trunet.config import Config, config_from_dict
from trunet.data.cases import check_trainable, resolve_cases
from trunet.errors import TrunetError
from trunet.pipeline.training import distributed as dist_utils
from trunet.pipeline.training.rundir import RESUME_MODES, RunFolder, default_run_dir, log_to_file, prepare_run_dir
from trunet.pipeline.training.signals import StopRequest, TrainingInterrupted
from trunet.pipeline.training.trainer import Trainer

__all__ = ["run_training", "default_run_dir", "RESUME_MODES"]

logger = logging.getLogger(__name__)


def _check_data(config: Config) -> None:
    """Read and check the data's case list and headers (nothing is written); the phantom needs no check."""
    if config.data.root is not None:
        check_trainable(resolve_cases(config.data, None).training)


def run_training(
    config: Config,
    run_dir: Optional[str | os.PathLike] = None,
    resume: bool | str = "never",
    config_path: Optional[str | os.PathLike] = None,
    memory_estimate: Optional[Callable[[Config], float]] = None,
) -> Path:
    """Train a model; return the run folder.

    Args:
        config: the resolved config.
        run_dir: the run folder (default ``runs/<config stem>-<YYYYmmdd-HHMMSS>``); a fresh run needs a
            missing or empty folder, or one holding only the files of a start that ended before its first
            checkpoint.
        resume: ``"never"`` (a fresh run), ``"always"`` (continue the run in ``run_dir`` from
            ``checkpoints/latest.pt``) or ``"auto"`` (continue where that checkpoint exists, else start
            fresh); ``True``/``False`` mean ``"always"``/``"never"``.
        config_path: the config file (names the default run folder).
        memory_estimate: bytes of GPU memory the config will need (``trunet train`` passes the planner's
            :func:`~trunet.pipeline.planning.estimate_memory`); on CUDA a warning is logged when it exceeds
            the free memory. ``None``: no check.

    Raises:
        TrunetError: bad run folder (see :mod:`~trunet.pipeline.training.rundir`), a folder locked by
            another process, config or data errors, ``max_nonfinite`` non-finite losses in a row;
            :class:`~trunet.errors.DiskFullError` when a file cannot be written for lack of space.
        TrainingInterrupted: SIGTERM/SIGINT; ``latest.pt`` was written first (when training had begun).
    """
    mode = ("always" if resume else "never") if isinstance(resume, bool) else resume
    config = config_from_dict(config.to_dict(), "resolved config")  # validate (overrides may come from code)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopRequest(starting=True))  # before the slow start-up steps
        ctx = stack.enter_context(dist_utils.distributed_context())
        if not ctx.distributed and dist_utils.launcher_world_size() > 1:
            logger.warning("%d processes were launched but WORLD_SIZE is 1: each trains its own model. "
                           "Use torchrun --nproc_per_node=N -m trunet train ... for data-parallel training",
                           dist_utils.launcher_world_size())
        error: Optional[str] = None
        folder: Optional[RunFolder] = None
        package_logger = logging.getLogger("trunet")
        threads, previous_level = torch.get_num_threads(), package_logger.level
        stack.callback(package_logger.setLevel, previous_level)
        if ctx.is_main:
            try:
                _check_data(config)  # before anything is written: a bad input leaves no run folder
                folder = prepare_run_dir(run_dir, mode, config_path)
                stack.callback(folder.close)
            except TrunetError as exc:
                error = str(exc)
        error, run, continuing = dist_utils.broadcast_object(
            (error, folder.path if folder else None, folder.continuing if folder else False), ctx)
        if error is not None:
            raise TrunetError(error)
        assert run is not None
        handler = folder.log if folder is not None else None
        if not ctx.is_main:
            package_logger.setLevel(logging.WARNING)
        try:
            trainer = Trainer(config, run, continuing, ctx, memory_estimate=memory_estimate, stop=stop)
            trainer.setup()
            result = trainer.run()
            logger.info("done: %s (best mean validation Dice %s)", result,
                        "n/a" if trainer.best_metric is None else f"{trainer.best_metric:.4f}")
            return result
        except (TrunetError, TrainingInterrupted) as exc:
            if handler is not None:  # the console gets the message from the command line
                kind = "interrupted" if isinstance(exc, TrainingInterrupted) else "error"
                log_to_file(handler, logging.ERROR, f"ended: {kind}: {exc}")
            raise
        finally:
            torch.set_num_threads(threads)
