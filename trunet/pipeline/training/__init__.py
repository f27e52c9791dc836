"""Training, the stage between the model and the checkpoint: patch-based AMP training of the time-resolved
UNet with validation, checkpoints, exact resume, W&B tracking and data-parallel runs under ``torchrun``.

Modules, in the order a run uses them:

- :mod:`~trunet.pipeline.training.run` -- :func:`run_training`, the job: checks, run folder, log file,
  distributed context, the trainer, and the exit on a signal;
- :mod:`~trunet.pipeline.training.rundir` -- the run folder: when a start may use it (``--resume auto``),
  its lock, its log file;
- :mod:`~trunet.pipeline.training.trainer` -- :class:`Trainer`: setup, one step, epochs, checkpoints,
  metrics, resume;
- :mod:`~trunet.pipeline.training.loaders` -- the training loader and the validation dataset;
- :mod:`~trunet.pipeline.training.losses` -- masked Dice + CE, deep supervision, the one
  :func:`build_criterion`;
- :mod:`~trunet.pipeline.training.optim` -- optimiser and the warm-up + poly schedule from
  :mod:`torch.optim.lr_scheduler`;
- :mod:`~trunet.pipeline.training.validation` -- whole-case validation with the inference stage's
  predictor and the evaluation stage's metrics;
- :mod:`~trunet.pipeline.training.signals`, :mod:`~trunet.pipeline.training.distributed`,
  :mod:`~trunet.pipeline.training.tracking` -- SIGTERM handling, DDP helpers, W&B.

Checkpoints are read and written by :mod:`trunet.pipeline.checkpoint`, which inference shares.
"""

from __future__ import annotations

from trunet.pipeline.training.losses import (
    DeepSupervisionLoss,
    MaskedDiceCELoss,
    build_criterion,
    deep_supervision_weights,
    downsample_label,
)
from trunet.pipeline.training.optim import build_optimizer, build_scheduler, poly_lr_lambda
from trunet.pipeline.training.run import default_run_dir, run_training
from trunet.pipeline.training.signals import TrainingInterrupted
from trunet.pipeline.training.debug import parameter_checksum
from trunet.pipeline.training.trainer import Trainer

__all__ = [
    "run_training",
    "TrainingInterrupted",
    "Trainer",
    "MaskedDiceCELoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "downsample_label",
    "build_criterion",
    "build_optimizer",
    "build_scheduler",
    "poly_lr_lambda",
    "default_run_dir",
    "parameter_checksum",
]
