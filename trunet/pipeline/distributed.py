"""Moved to :mod:`trunet.pipeline.training.distributed`; this name keeps old imports working."""

from trunet.pipeline.training.distributed import *  # noqa: F401,F403
from trunet.pipeline.training.distributed import __all__  # noqa: F401
