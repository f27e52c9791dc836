"""Moved to :mod:`trunet.config` (the base of the package); this name keeps old imports working."""

from trunet.config import *  # noqa: F401,F403
from trunet.config import __all__  # noqa: F401
from trunet.config import ConfigError  # noqa: F401  (tests and users import it from here)
