"""Stopping a run cleanly: SIGTERM/SIGINT finish the current step (or validation case), save ``latest.pt``
and end in :class:`TrainingInterrupted` (exit code ``128 + signal``); data workers ignore the signals
meanwhile. During start-up (data caching, W&B init) there is nothing to save yet: the signal ends the job
at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["TrainingInterrupted", "StopRequest", "QuietWorkerInit"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(BaseException):
    """Training stopped on SIGTERM/SIGINT after writing ``latest.pt`` (or during start-up, with nothing to
    write: :attr:`checkpoint` is None).

    A :class:`BaseException`, like :class:`KeyboardInterrupt`: raised from the signal handler during
    start-up, it must not be taken for a failure by the ``except Exception`` that keeps W&B trouble from
    stopping training.

    Attributes:
        signum: the signal; ``trunet train`` exits with ``128 + signum``.
        checkpoint: the ``latest.pt`` written before stopping.
    """

    def __init__(self, signum: int, checkpoint: Optional[Path], epoch: int = 0, iteration: int = 0):
        self.signum = int(signum)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.epoch = epoch
        self.iteration = iteration
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            message = (f"stopped by {name} during start-up, before training began; nothing new was saved "
                       "(the same command starts it again)")
        else:
            message = (f"stopped by {name} at epoch {epoch + 1}, step {iteration}; {self.checkpoint} is saved "
                       f"(continue with: trunet train --resume auto --run-dir {self.checkpoint.parent.parent} "
                       "--config ...)")
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class QuietWorkerInit:
    """``worker_init_fn`` that makes DataLoader workers ignore SIGTERM/SIGINT, then runs ``inner``.

    Slurm, ``kill -- -PGID`` and Ctrl-C signal the whole process group: without this a worker dies at once
    and the main process fails with "DataLoader worker is killed" instead of finishing its step and saving.
    The main process alone decides to stop; its workers end when the loader does.
    """

    def __init__(self, inner: Optional[Callable[[int], None]]):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


class StopRequest:
    """SIGTERM/SIGINT handlers for a training job.

    While :attr:`starting` (the job's start-up: run folder, data caching, W&B init) a signal raises
    :class:`TrainingInterrupted` at once: nothing is saved yet, and start-up steps can take minutes. Once
    the trainer clears :attr:`starting`, a signal only raises a flag (:attr:`signum`); the loop stops after
    the current step or validation case and saves ``latest.pt``.

    Installed only in the main thread (Python allows signal handlers nowhere else); restored on exit.
    A second signal while stopping falls back to the previous handler (e.g. KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, starting: bool = False) -> None:
        self.signum: Optional[int] = None
        self.starting = starting
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: do what the process would have done
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.starting:
            raise TrainingInterrupted(signum, None)
        logger.warning("%s received: finishing the current step, then saving latest.pt",
                       signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
