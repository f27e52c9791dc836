"""What ``--resume`` may change: a resumed run must train as the original would have, so only settings
that do not change the training may differ from the checkpoint's config."""

from __future__ import annotations

from typing import Any

from trunet.errors import ConfigError

__all__ = ["RESUMABLE_CHANGES", "check_resume_config"]


RESUMABLE_CHANGES = (
    "train.epochs", "train.val_every", "train.val_cases", "train.max_nonfinite", "data.num_workers",
    "data.cache", "infer.", "tracking.",
)
"""Config keys (or prefixes) that may differ between a run and its ``--resume``; anything else changes
the training and is refused."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_config(saved: dict[str, Any], given: dict[str, Any], where: str) -> None:
    a, b = _flatten(saved), _flatten(given)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES))
    if changed:
        details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"{where}: --resume with a config that changes the training ({details}); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change. Resume with the run's own config.yaml."
        )
