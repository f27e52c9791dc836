"""Moved to the stage package :mod:`trunet.pipeline.evaluation`; this name keeps old imports working."""

from trunet.pipeline.evaluation import *  # noqa: F401,F403
from trunet.pipeline.evaluation import __all__  # noqa: F401
