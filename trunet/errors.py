"""Errors a user can cause and fix.

The CLI prints a :class:`TrunetError` as one line on stderr and exits with its :attr:`~TrunetError.exit_code`
(2; 74 for a full disk), no traceback unless ``--debug``. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

__all__ = ["TrunetError", "ConfigError", "DataError", "CheckpointError", "DiskFullError"]


class TrunetError(Exception):
    """A user error: bad input, bad config, missing file. The message is one line, shown as is."""

    exit_code = 2
    """What the command line exits with (argparse's code for a usage error)."""


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


class DiskFullError(TrunetError):
    """A file could not be written because its device is full (``ENOSPC``) or the user's quota is spent
    (``EDQUOT``). Earlier files are intact: every write is atomic (:mod:`trunet.atomic`).

    Args:
        path: the file that was being written.
        free: bytes free on its device after the failure.
        needed: bytes the file needs (an estimate), or None when unknown.
        at_least: ``needed`` is a lower bound (the bytes written before the device filled).
    """

    exit_code = 74
    """``EX_IOERR`` of ``sysexits.h``: an input/output error, here a full disk."""

    def __init__(self, path: str | os.PathLike, free: int, needed: int | None, at_least: bool = False):
        self.path, self.free, self.needed = os.fspath(path), int(free), needed
        need = "" if needed is None else f", {'at least ' if at_least else 'about '}{_size(needed)} needed"
        super().__init__(f"{self.path}: no space left on device ({_size(free)} free{need}); free some "
                         "space on that device or write elsewhere")


def _size(n: int) -> str:
    """``n`` bytes in the largest unit of B, kB, MB, GB that keeps a leading digit."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
