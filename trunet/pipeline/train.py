"""Moved to the stage package :mod:`trunet.pipeline.training`; this name keeps old imports working.

:func:`run_training` here is the training job with the planner's out-of-memory warning switched on, as
``trunet train`` runs it.
"""

from __future__ import annotations

import functools

from trunet.pipeline.planning.memory import training_memory_bytes
from trunet.pipeline.precision import autocast_dtype
from trunet.pipeline.training import *  # noqa: F401,F403
from trunet.pipeline.training import __all__ as _training_all
from trunet.pipeline.training import run as _run

__all__ = [*_training_all, "autocast_dtype"]

run_training = functools.partial(_run.run_training, memory_estimate=training_memory_bytes)
"""``run_training(config, run_dir=None, resume=False, config_path=None)`` with the planner's memory estimate."""
