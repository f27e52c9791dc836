"""Atomic file output: a job killed mid-write never leaves a half-written file under the final name.

Every file trunet writes (checkpoints, predictions, configs, reports) goes through :func:`atomic_path`:
the content is written to a temporary file in the same folder, flushed to disk, then renamed over the
final name with :func:`os.replace`, which is atomic on POSIX and Windows, and the folder is flushed so
the rename survives a power cut. The file gets the mode of any new file (``0o666`` less the umask: 644
under the usual 022), not the private 600 of the temporary file, so colleagues sharing an output folder
can read it.

A full device (``ENOSPC``, or ``EDQUOT`` for a spent quota) anywhere in a write becomes one
:class:`~trunet.errors.DiskFullError` naming the file and the space needed, without a traceback. A job
killed during a write (kill -9) leaves its temporary file (``.<name>.<random>.tmp<suffix>``) behind;
:func:`remove_stale_temporaries` removes them where no other writer can be at work (under a run lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from trunet.errors import DiskFullError

__all__ = ["atomic_path", "atomic_folder", "write_text", "write_json", "write_yaml", "is_disk_full",
           "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT)
TEMPORARY_PATTERN = ".*.tmp*"
"""Glob of the temporary files :func:`atomic_path` creates (and a killed job may leave)."""


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or an exception it was raised from or during is an ``ENOSPC``/``EDQUOT`` OSError
    (torch's stream writer, for one, turns the OSError of a failed write into a RuntimeError)."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return True
        current = current.__cause__ or current.__context__
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (not recursive); return them.

    Only safe where no other process writes to ``folder`` at the same time, e.g. a locked run folder.
    """
    removed = []
    for path in sorted(Path(folder).glob(TEMPORARY_PATTERN)):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed),
                    folder, ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None,
                size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    Args:
        path: the final file name. Its folder is created if missing.
        suffix: suffix of the temporary file (default: the final name's suffixes, so writers that
            pick a format from the extension, e.g. ``.nii.gz``, still work).
        size_hint: the bytes the file will take, if known: a full disk's message then says how much
            space is needed (otherwise: at least what was written before the device filled).

    On an exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        DiskFullError: the device filled up (``ENOSPC``/``EDQUOT``) while writing.
    """
    final = Path(path)
    if suffix is None:
        suffix = "".join(final.suffixes)
    tmp: Optional[Path] = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_folder(final.parent)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp is not None and tmp.is_file() else 0
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not is_disk_full(exc):
            raise
        free = shutil.disk_usage(_existing_parent(final)).free
        needed = size_hint if size_hint is not None else (written or None)
        raise DiskFullError(final, free, needed, at_least=size_hint is None) from None


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes ``path``'s place (a report written in
    parts: either all of it is there, or the earlier one).

    An existing ``path`` is replaced (the caller decides whether that is allowed): it is renamed aside,
    the new folder renamed into place, then the old one removed. On an exception the temporary folder is
    removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_folder(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux (``os.umask`` can only read it by changing it,
    which races with other threads creating files), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk. Skipped where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as block-style YAML to ``path`` atomically."""
    return write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))
