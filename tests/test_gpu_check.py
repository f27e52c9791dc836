"""``make gpu-check`` cannot rot while no GPU is at hand: its CPU quick mode runs the same code on tiny sizes
here, and without CUDA the make target says so in one line and succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

EXPECTED = {
    # section: checks (prefixes of the table's "check" cells) and the results they may have on the CPU
    1: [("the suite's device tests", "skip"), ("float32 forward/backward, cpu vs cpu", "pass"),
        ("20 trainer steps on one phantom batch, bf16 autocast", "pass"),
        ("20 trainer steps on one phantom batch, fp16 autocast + GradScaler", "pass|skip"),
        ("Predictor float32 on cpu vs cpu", "pass"), ("Predictor with AMP", "info"),
        ("trainer checkpoint saved on cpu", "pass")],
    2: [("2 AMP trainer steps, random data", "pass"), ("max_memory_allocated / reserved", "skip")],
    3: [("train step vs naive per-frame form", "info"), ("achieved TFLOP/s", "info"),
        ("predict one cine", "pass"), ("predict one cine", "pass")],
    4: [("tiny.yaml", "pass"), ("epoch 2: median step time", "info"), ("epoch 2: cpu idle", "info")],
    5: [("torchrun --nproc_per_node=2", "pass"), ("weights' checksums", "pass"),
        ("checkpoint: written by rank 0", "pass")],
}


def _rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines and lines[0].startswith("| # | check | figure | target | result |"), stdout
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def test_quick_mode_on_cpu_passes_with_every_row():
    env = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = _rows(proc.stdout)
    expected = [(section, check, result) for section, checks in EXPECTED.items() for check, result in checks]
    assert len(rows) == len(expected), proc.stdout
    for (section, check, result), row in zip(expected, rows):
        assert row[0] == str(section) and row[1].startswith(check), (row, check)
        assert row[4] in result.split("|"), row
        assert row[2], row  # a figure in every row
    for line in ("command: `python benchmarks/gpu_check.py --device cpu --quick`", "machine: ", "date: ",
                 "wall time: "):
        assert line in proc.stdout


def test_a_failing_check_fails_the_run(tmp_path):
    """The exit status follows the table: a section that raises is a FAIL row and exit 1."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    def broken(*args):
        raise RuntimeError("broken on purpose")

    original = gpu_check.SECTIONS[1]
    gpu_check.SECTIONS[1] = ("40 GB plan", broken)
    try:
        code = gpu_check.main(["--device", "cpu", "--quick", "--threads", "0", "--sections", "2"])
    finally:
        gpu_check.SECTIONS[1] = original
    assert code == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, make gpu-check runs the whole check")
def test_make_gpu_check_without_cuda_says_so_and_succeeds(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this interpreter, by its own path
    python.chmod(0o755)
    (venv / ".installed").touch()  # newer than setup.cfg: make does not reinstall
    proc = subprocess.run(["make", "-s", "gpu-check", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: gpu-check skipped"
