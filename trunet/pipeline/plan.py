"""Moved to the stage package :mod:`trunet.pipeline.planning`; this name keeps old imports working
(``build_model`` is :func:`trunet.models.build_model`, ``build_criterion`` is
:func:`trunet.pipeline.training.losses.build_criterion`)."""

from trunet.models import build_model  # noqa: F401
from trunet.pipeline.planning import *  # noqa: F401,F403
from trunet.pipeline.planning import __all__ as _planning_all
from trunet.pipeline.training.losses import build_criterion  # noqa: F401

__all__ = [*_planning_all, "build_model", "build_criterion"]
