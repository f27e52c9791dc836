"""Moved to :mod:`trunet.pipeline.training.tracking`; this name keeps old imports working."""

from trunet.pipeline.training.tracking import *  # noqa: F401,F403
from trunet.pipeline.training.tracking import __all__  # noqa: F401
