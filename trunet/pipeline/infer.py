"""Moved to the stage package :mod:`trunet.pipeline.inference`; this name keeps old imports working."""

from trunet.pipeline.inference import *  # noqa: F401,F403
from trunet.pipeline.inference import __all__  # noqa: F401
