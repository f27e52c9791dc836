"""Read back what an offline W&B run wrote: the records of its ``run-*.wandb`` transaction log.

Uses ``wandb leet inspect --json FILE`` (wandb >= 0.31), which prints one JSON record per line
(``{"num": .., "type": "history" | "config" | "artifact" | "files" | ..., "<type>": {...}}``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["wandb_files", "read_wandb_records", "history_keys", "records_of"]


def wandb_files(run_dir: Path) -> list[Path]:
    """The ``run-*.wandb`` files under ``run_dir/wandb`` (one per W&B process that wrote the run)."""
    return sorted((Path(run_dir) / "wandb").glob("*run-*/run-*.wandb"))


def read_wandb_records(path: Path) -> list[dict[str, Any]]:
    """All records of one ``.wandb`` file, in order."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def records_of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The payloads of the records of one type (e.g. ``"history"``, ``"artifact"``)."""
    return [r[kind] for r in records if r.get("type") == kind]


def history_keys(records: list[dict[str, Any]]) -> set[str]:
    """Every key logged with ``run.log`` (media keys appear as ``key._type``, ``key.path``, ...)."""
    keys: set[str] = set()
    for item in records_of(records, "history"):
        keys.update(item.get("item", {}).keys())
    return keys
