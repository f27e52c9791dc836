"""Progress output: a tqdm bar on a terminal, one log line per N steps when stderr is redirected."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from trunet.progress import LineProgress, progress, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_progress_is_lines_not_carriage_returns(caplog):
    stream = io.StringIO()  # a file: not a terminal
    with caplog.at_level(logging.INFO, logger="trunet.progress"):
        bar = progress(25, "epoch 1/2", "step", every=10, stream=stream)
        assert isinstance(bar, LineProgress)
        for i in range(25):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        bar.close()
        bar.close()  # a second close logs nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["epoch 1/2: 10/25 step", "epoch 1/2: 20/25 step",
                                                      "epoch 1/2: 25/25 step"]
    assert lines[-1].endswith("loss=0.040") and not any("\r" in line for line in lines)
    assert stream.getvalue() == ""


def test_resumed_epoch_counts_from_its_first_step(caplog):
    with caplog.at_level(logging.INFO, logger="trunet.progress"):
        bar = progress(40, "epoch 3/20", "step", every=10, initial=15, stream=io.StringIO())
        for _ in range(5):
            bar.update(1)
        bar.close()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["epoch 3/20: 20/40 step"]


def test_terminal_and_disabled_get_tqdm(caplog):
    bar = progress(3, "x", stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    off = progress(3, "x", disable=True, stream=io.StringIO())
    assert isinstance(off, tqdm) and off.disable
    with caplog.at_level(logging.INFO, logger="trunet.progress"):
        done = [x for x in track(range(3), "cases", "case", every=2, stream=io.StringIO()) if x != 1]
    assert done == [0, 2]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["cases: 2/3 case", "cases: 3/3 case"]
