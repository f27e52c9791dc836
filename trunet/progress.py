"""Progress that reads well on a terminal and in a log file.

On a terminal, :func:`progress` is a tqdm bar. Redirected to a file (Docker, Slurm, CI), a bar redraws
itself with a carriage return on every update, and a training log fills with megabytes of half-drawn
bars; there :func:`progress` returns a :class:`LineProgress` instead, which logs one plain line every
``every`` steps (and one at the end) through the ``trunet.progress`` logger, so the lines also reach a
run's ``log.txt``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["LineProgress", "progress", "track", "is_terminal"]

T = TypeVar("T")

logger = logging.getLogger("trunet.progress")


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """True when ``stream`` (default ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or stream-like objects without isatty
        return False


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` interface, logging one line per ``every`` steps.

    A line reads ``epoch 3/20: 20/40 step, 5.1 step/s, loss=0.41``.

    Args:
        total: steps expected (``None`` when unknown).
        desc: what is progressing (leads each line).
        unit: name of one step.
        every: log after every ``every``-th step (counted from 0, so steps ``every, 2*every, ...``), and
            once at ``close`` unless the last step was just logged.
        initial: steps already done (a resumed epoch).
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", every: int = 10, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.every = max(1, int(every))
        self.n = self._logged = int(initial)
        self._start_n = self.n
        self._t0 = time.perf_counter()
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        before = self.n
        self.n += int(n)
        if self.n // self.every > before // self.every:
            self._log()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _log(self) -> None:
        rate = (self.n - self._start_n) / max(time.perf_counter() - self._t0, 1e-9)
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        line = f"{self.desc}: {count} {self.unit}, {rate:.2f} {self.unit}/s"
        logger.info(line + (f", {self._postfix}" if self._postfix else ""))
        self._logged = self.n

    def close(self) -> None:
        if self.n != self._logged:
            self._log()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: Optional[int], desc: str, unit: str = "it", *, every: int = 10, initial: int = 0,
             disable: bool = False, leave: bool = False, stream: Optional[TextIO] = None) -> Any:
    """A tqdm bar on a terminal, else a :class:`LineProgress` (see the module docstring).

    Args:
        total, desc, unit, initial: as tqdm's.
        every: steps per logged line when ``stream`` is not a terminal.
        disable: no output at all (e.g. on ranks other than 0); a disabled tqdm is returned.
        leave: keep the finished bar on a terminal.
        stream: what decides terminal or not (default ``sys.stderr``, where tqdm draws).
    """
    if disable or is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, leave=leave,
                    dynamic_ncols=True)
    return LineProgress(total, desc, unit, every=every, initial=initial)


def track(items: Iterable[T], desc: str, unit: str = "it", *, total: Optional[int] = None, every: int = 10,
          stream: Optional[TextIO] = None) -> Iterator[T]:
    """Yield ``items``, counting one step when the loop body of an item is done (a ``continue`` included)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = progress(total, desc, unit, every=every, stream=stream)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
