"""Stopping a run cleanly: SIGTERM/SIGINT finish the current step, save ``latest.pt`` and end in
:class:`TrainingInterrupted` (exit code ``128 + signal``); data workers ignore the signals meanwhile."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["TrainingInterrupted", "StopRequest", "QuietWorkerInit"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing ``latest.pt``.

    Attributes:
        signum: the signal; ``trunet train`` exits with ``128 + signum``.
        checkpoint: the ``latest.pt`` written before stopping.
    """

    def __init__(self, signum: int, checkpoint: Path, epoch: int, iteration: int):
        self.signum = int(signum)
        self.checkpoint = Path(checkpoint)
        self.epoch = epoch
        self.iteration = iteration
        name = signal.Signals(self.signum).name
        super().__init__(
            f"stopped by {name} at epoch {epoch + 1}, step {iteration}; {checkpoint} is saved "
            f"(continue with: trunet train --resume --run-dir {checkpoint.parent.parent} --config ...)"
        )

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
    """SIGTERM/SIGINT handlers that only raise a flag; the training loop stops after the current step.

    Installed only in the main thread (Python allows signal handlers nowhere else); restored on exit.
    A second signal while stopping falls back to the previous handler (e.g. KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
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
        logger.warning("%s received: finishing the current step, then saving latest.pt",
                       signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
