"""The command line: help, version, and user errors as one line without traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trunet import __version__
from trunet.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", ["phantom", "train", "predict", "evaluate", "plan"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: trunet {command}" in out


def test_config_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nonsense: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trunet", "train", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.nonsense" in lines[0] and "Traceback" not in proc.stderr


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    for command in ("phantom", "train", "predict", "evaluate", "plan"):
        assert command in text
