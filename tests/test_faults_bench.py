"""``benchmarks/faults.py`` cannot rot: its quickest form (a 2 x 2-step run, kill -9 during a checkpoint save,
SIGTERM during the training steps, each followed by the same command) runs here and finds no defect; and
its judge calls a traceback, a hang, a wrong exit code or a second message line a defect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import faults  # noqa: E402

pytestmark = pytest.mark.slow


def _table(stdout: str, header: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_quick_mode_recovers_from_both_faults(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/faults.py", "--work", str(tmp_path), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for line in ("command: `python benchmarks/faults.py --work ", "machine: ", "date: ", "run: `python -m trunet"):
        assert line in proc.stdout
    (summary,) = _table(proc.stdout, "| faults tried | recovered | clean errors | defects | checkpoints corrupt |")
    assert summary[:4] == ["2", "2", "0", "0"], summary
    assert summary[4].startswith("0 of ") and summary[5] == "2 of 2 finished runs", summary
    rows = _table(proc.stdout, "| # | fault | outcome | note |")
    assert [r[1].split(" during ")[0] for r in rows] == ["kill -9 #1", "SIGTERM"], rows
    assert rows[1][1] == "SIGTERM during training steps"
    assert [r[2] for r in rows] == ["recovered", "recovered"], rows
    assert "exit 143" in rows[1][3] and "rerun resumed at epoch " in rows[1][3], rows[1]


def test_the_judge_calls_what_a_user_cannot_act_on_a_defect():
    def result(rc, *lines, timed_out=False):
        return faults.Result("rerun", rc, [(0.0, line) for line in lines], 1.0, timed_out=timed_out, timeout=60)

    assert result(0, "done: RUN").problems({0}) == []
    assert result(2, "trunet train: error: RUN: corrupt checkpoint").problems({2}) == []
    assert result(143, "trunet train: stopped by SIGTERM at epoch 1, step 2").problems({143}) == []
    assert result(-9).problems({-9}) == []
    traceback = result(1, "Traceback (most recent call last):", '  File "x.py", line 1', "OSError: [Errno 28]")
    assert traceback.problems({0}) == ["rerun: traceback (OSError: [Errno 28])", "rerun: exit 1, expected 0"]
    assert result(None, timed_out=True).problems({0}) == ["rerun: still running after 60 s (hang)"]
    assert result(2).problems({2}) == ["rerun: 0 message lines with exit 2, expected one"]
    assert result(74, "trunet train: error: a", "trunet train: error: b").problems({74}) == [
        "rerun: 2 message lines with exit 74, expected one"]
