"""The run folder of a training job: when a start may use it, its lock, and its log file.

A folder is *a run to protect* once it holds ``checkpoints/latest.pt``: a fresh start there is refused and
``--resume`` continues it. Before the first checkpoint it holds only what a start writes (:data:`START_UP`:
``log.txt``, ``splits.json``, ``config.yaml``, ``phantom/``, ``cache/``, ``wandb/``, the lock file, and
temporary files of a killed write); a start that failed or was killed there left nothing worth keeping, so
the same command starts afresh in it. A folder holding anything else (a file of the user's) is never
written into by a fresh start.

``--resume`` modes (:data:`RESUME_MODES`): ``never`` (the default: a fresh run), ``always`` (bare
``--resume``: continue, and say so when there is nothing to continue) and ``auto`` (continue where a
checkpoint exists, else start fresh: the command a restarted job can run every time).

One process at a time works in a run folder: :class:`RunLock` holds an exclusive ``flock`` on
``trunet.lock`` for the life of the job. The kernel releases it when the holder exits or dies (kill -9
included), so a lock is never stale.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from trunet.atomic import TEMPORARY_PATTERN, remove_stale_temporaries
from trunet.errors import TrunetError

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there are not locked (see RunLock.acquire)
    fcntl = None  # type: ignore[assignment]

__all__ = ["RESUME_MODES", "START_UP", "LOCK_NAME", "RunLock", "RunFolder", "default_run_dir", "has_checkpoint",
           "prepare_run_dir", "attach_log_file", "log_to_file"]

logger = logging.getLogger(__name__)

RESUME_MODES = ("never", "always", "auto")
LOCK_NAME = "trunet.lock"
START_UP = frozenset({"log.txt", "splits.json", "config.yaml", "metrics.csv", LOCK_NAME, "phantom", "cache",
                      "wandb", "checkpoints"})
"""What a start writes into a run folder before its first checkpoint (``metrics.csv`` and ``checkpoints/``
come with the first checkpoint; they are here so a folder whose checkpoint was removed by hand counts as
a failed start too)."""


def default_run_dir(config_path: str | os.PathLike | None, now: datetime | None = None) -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>`` (``runs/run-...`` without a config file)."""
    stem = Path(config_path).stem if config_path is not None else "run"
    return Path("runs") / f"{stem}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def has_checkpoint(run: Path) -> bool:
    """True when ``run`` holds a run to continue (``checkpoints/latest.pt``)."""
    return (run / "checkpoints" / "latest.pt").is_file()


def _foreign(run: Path) -> list[str]:
    """Names in ``run`` that no start of trunet writes (sorted)."""
    if not run.is_dir():
        return []
    return sorted(p.name for p in run.iterdir() if p.name not in START_UP and not p.match(TEMPORARY_PATTERN))


class RunLock:
    """An exclusive lock on a run folder: ``flock`` on ``<run>/trunet.lock``, which holds the holder's pid
    and host.

    The kernel drops a ``flock`` when its holder exits or dies, so a crashed job never blocks the next one.
    Where ``flock`` does not exist (Windows) or the file system refuses it (some network file systems), the
    run goes on unlocked with a warning: a lock must not stop a job the file system cannot lock for.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fh = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`TrunetError` naming the folder and the holder's pid."""
        fh = open(self.path, "a+", encoding="utf-8")
        if fcntl is None:
            logger.warning("%s: file locks are not available here; make sure no other job uses this run folder",
                           self.folder)
        else:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise TrunetError(f"{self.folder}: the run folder is in use by another trunet process (pid "
                                  f"{holder}); wait for it to end or stop it first") from None
            except OSError as exc:
                logger.warning("%s: cannot lock the run folder (%s); make sure no other job uses it",
                               self.folder, exc.strerror or exc)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Release the lock (the file stays: removing it would let two processes lock different files)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check(run: Path, mode: str) -> bool:
    """Whether a start in ``mode`` continues ``run`` (True) or starts afresh (False); raise when it may do
    neither."""
    if run.exists() and not run.is_dir():
        raise TrunetError(f"{run}: not a folder; --run-dir must name a folder")
    if has_checkpoint(run):
        if mode == "never":
            raise TrunetError(f"{run}: the run folder holds a run (checkpoints/latest.pt); continue it with "
                              "--resume auto or choose another --run-dir")
        return True
    if mode == "always":
        leftover = " (an earlier start ended before its first checkpoint)" if run.is_dir() and any(
            run.iterdir()) else ""
        raise TrunetError(f"{run}: nothing to resume (no checkpoints/latest.pt in this folder{leftover}); start "
                          "it with --resume auto or without --resume")
    foreign = _foreign(run)
    if foreign:
        raise TrunetError(f"{run}: the run folder is not empty (holds {', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); continue a run with --resume or choose "
                          "another --run-dir")
    return False


@dataclass
class RunFolder:
    """A run folder in use: its path, whether the job continues it, its lock and its log file."""

    path: Path
    continuing: bool
    lock: RunLock
    log: logging.Handler

    def close(self) -> None:
        """Detach the log file and release the lock."""
        logging.getLogger("trunet").removeHandler(self.log)
        self.log.close()
        self.lock.release()


def prepare_run_dir(run_dir: Optional[str | os.PathLike], resume: str,
                    config_path: Optional[str | os.PathLike]) -> RunFolder:
    """The run folder, created, locked and logging to ``log.txt``, and whether the start continues it.

    Args:
        run_dir: the folder (default :func:`default_run_dir`).
        resume: one of :data:`RESUME_MODES`.
        config_path: names the default folder.

    Returns:
        the :class:`RunFolder`; the caller closes it when the job ends. Temporary files of a killed write are
        removed from the folder and its ``checkpoints/`` (safe: the lock is held).
    Raises:
        TrunetError: no folder to continue, a folder that is not a run's, or one locked by another process.
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
    if run_dir is None:
        if resume == "always":
            raise TrunetError("--resume needs --run-dir (the run folder to continue)")
        run = default_run_dir(config_path)
    else:
        run = Path(run_dir)
    _check(run, resume)  # before anything is created
    run.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run).acquire()
    try:
        continuing = _check(run, resume)  # again: another job may have written a checkpoint meanwhile
        leftovers = not continuing and any(p.name != LOCK_NAME for p in run.iterdir())
        folder = RunFolder(run, continuing, lock, attach_log_file(run))
    except BaseException:
        lock.release()
        raise
    if leftovers:
        logger.info("%s holds only the files of a start that ended before its first checkpoint: starting "
                    "afresh", run)
    for where in (run, run / "checkpoints"):
        remove_stale_temporaries(where)
    return folder


class _LogFile(logging.FileHandler):
    """``log.txt``. A record that cannot be written (a full disk) is dropped: logging's default prints a
    traceback per record, burying the one line that says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Send the ``trunet`` loggers' INFO and above to ``run_dir/log.txt`` (appending)."""
    handler = _LogFile(run_dir / "log.txt", mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_logger = logging.getLogger("trunet")
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    return handler


def log_to_file(handler: logging.Handler, level: int, message: str) -> None:
    """Write ``message`` to the log file only (the command line prints it to the console itself)."""
    handler.handle(logger.makeRecord(logger.name, level, __file__, 0, message, None, None))
