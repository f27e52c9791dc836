"""The training job: the run folder, the log file, the distributed context and the :class:`Trainer` driven to
the end or to a signal.

``run_training(config, run_dir=None, resume=False)`` is what ``trunet train`` calls. A run folder holds::

    config.yaml          the resolved config
    splits.json          the patient-level split (written by :func:`trunet.data.cases.resolve_cases`)
    phantom/             the generated phantom, when ``data.root`` is None
    checkpoints/         latest.pt (every epoch and on SIGTERM/SIGINT), best.pt (best mean validation Dice)
    metrics.csv          one row per epoch (train loss, lr, throughput, validation Dice/HD95 per class)
    log.txt              the log of the run (all ``trunet`` loggers)
    wandb/               the W&B run (offline by default), see :mod:`trunet.pipeline.training.tracking`

Signals: SIGTERM or SIGINT lets the current step finish, writes ``latest.pt`` and raises
:class:`TrainingInterrupted`; ``trunet train`` then exits with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT), the shell's convention for "ended by a signal". A non-zero code is deliberate: the job is not
finished, so Kubernetes (``restartPolicy: OnFailure``), torchrun's elastic restarts and Slurm
``--requeue`` scripts restart it, and ``trunet train --resume`` continues from the whole ``latest.pt``.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import torch

from trunet.config import Config, config_from_dict
from trunet.errors import TrunetError
from trunet.pipeline.training import distributed as dist_utils
from trunet.pipeline.training.trainer import Trainer

__all__ = ["run_training", "default_run_dir"]

logger = logging.getLogger(__name__)


def default_run_dir(config_path: str | os.PathLike | None, now: datetime | None = None) -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>`` (``runs/run-...`` without a config file)."""
    stem = Path(config_path).stem if config_path is not None else "run"
    return Path("runs") / f"{stem}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


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
    memory_estimate: Optional[Callable[[Config], float]] = None,
) -> Path:
    """Train a model; return the run folder.

    Args:
        config: the resolved config.
        run_dir: the run folder (default ``runs/<config stem>-<YYYYmmdd-HHMMSS>``); a fresh run needs an
            empty or missing folder.
        resume: continue the run in ``run_dir`` from ``checkpoints/latest.pt``.
        config_path: the config file (names the default run folder).
        memory_estimate: bytes of GPU memory the config will need (``trunet train`` passes the planner's
            :func:`~trunet.pipeline.planning.estimate_memory`); on CUDA a warning is logged when it exceeds
            the free memory. ``None``: no check.

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
            trainer = Trainer(config, run, resume, ctx, memory_estimate=memory_estimate)
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
