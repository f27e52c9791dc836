"""Reproducibility helpers and test hooks of the trainer: derived seeds, a weight fingerprint, and the
``TRUNET_DEBUG_*`` environment hooks the tests use to record saves and inject non-finite losses."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trunet.pipeline.training.distributed import DistContext

__all__ = ["derived_seed", "seed_everything", "parameter_checksum", "debug_record", "debug_loss_hook"]


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (numpy's SeedSequence mixes them; nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def debug_record(ctx: DistContext, name: str, line: str) -> None:
    """Test hook: with ``TRUNET_DEBUG_DIR`` set, append ``line`` to ``<dir>/rank<r>-<name>.txt``."""
    folder = os.environ.get("TRUNET_DEBUG_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{ctx.rank}-{name}.txt", "a") as fh:
            fh.write(line + "\n")


def parameter_checksum(model: nn.Module) -> float:
    """A float64 fingerprint of the weights (sum of each tensor times its 1-based position)."""
    with torch.no_grad():
        tensors = [p for p in model.state_dict().values() if p.is_floating_point()]
        return float(sum((i + 1) * p.detach().double().sum().item() for i, p in enumerate(tensors)))


def debug_loss_hook(loss: Tensor, iteration: int) -> Tensor:
    """Test hook: ``TRUNET_DEBUG_NAN_STEPS="3,4"`` turns the loss of those 0-based steps into NaN."""
    spec = os.environ.get("TRUNET_DEBUG_NAN_STEPS")
    if spec and iteration in {int(s) for s in spec.split(",") if s.strip()}:
        return loss * float("nan")
    return loss
