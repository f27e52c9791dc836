"""Errors a user can cause and fix.

The CLI prints a :class:`TrunetError` as one line on stderr and exits non-zero (no traceback unless
``--debug``). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

__all__ = ["TrunetError", "ConfigError", "DataError", "CheckpointError"]


class TrunetError(Exception):
    """A user error: bad input, bad config, missing file. The message is one line, shown as is."""


class ConfigError(TrunetError):
    """A config file or override is invalid; the message names the key and the file."""


class DataError(TrunetError):
    """An input file is missing, unreadable or inconsistent.

    Args:
        path: the offending file (or folder); it leads the message.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class CheckpointError(TrunetError):
    """A checkpoint is missing, corrupt or incompatible with this version of trunet."""
