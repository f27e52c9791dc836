"""Optimiser and learning-rate schedule of a training run.

The schedule is nnU-Net's poly decay after a linear warm-up, built from :mod:`torch.optim.lr_scheduler`
parts: :class:`~torch.optim.lr_scheduler.LinearLR` for ``W`` warm-up steps (factor ``(s + 1) / W``), then
:class:`~torch.optim.lr_scheduler.PolynomialLR` (factor ``(1 - (s - W) / (S - W)) ** power``, 0 at the
``S``-th step), joined by :class:`~torch.optim.lr_scheduler.SequentialLR`. :func:`poly_lr_lambda` is the
same curve written out; ``tests/test_train.py`` checks the two agree step by step (to float rounding:
torch's schedulers update the rate multiplicatively).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR, LRScheduler, PolynomialLR, SequentialLR

__all__ = ["build_optimizer", "build_scheduler", "load_scheduler_state", "poly_lr_lambda", "replay_scheduler"]


def build_optimizer(model: nn.Module, t: Any) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net's) or AdamW, from the ``train`` section of the config."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True,
                               weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    power: float) -> LRScheduler:
    """Per-step schedule: linear warm-up over ``warmup_steps``, then poly decay to 0 at ``total_steps``
    (warm-up clipped to ``total_steps - 1``; no warm-up when 0)."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
    poly = PolynomialLR(optimizer, total_iters=max(1, total_steps - warmup_steps), power=power)
    if warmup_steps == 0:
        return poly
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                      total_iters=max(1, warmup_steps - 1))
    return SequentialLR(optimizer, [warmup, poly], milestones=[warmup_steps])


def load_scheduler_state(scheduler: LRScheduler, state: dict[str, Any]) -> None:
    """Load ``state`` into ``scheduler`` (made by :func:`build_scheduler`).

    A checkpoint written before the schedule was built from torch's schedulers holds the state of a
    ``LambdaLR`` over :func:`poly_lr_lambda`; it is replayed instead: the fresh schedule is stepped to the
    saved step. Call this before the optimizer's ``load_state_dict``, which then restores the saved rate.
    """
    if "lr_lambdas" not in state:
        scheduler.load_state_dict(state)
        return
    replay_scheduler(scheduler, int(state["last_epoch"]))


def replay_scheduler(scheduler: LRScheduler, steps: int) -> None:
    """Step a freshly built schedule ``steps`` times (no optimizer steps): the optimizer's rate becomes the
    schedule's at that step."""
    with warnings.catch_warnings():  # stepping a schedule without optimizer steps warns; here it is the point
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def poly_lr_lambda(total_steps: int, warmup_steps: int, power: float) -> Callable[[int], float]:
    """LR factor per step ``s``: linear warm-up ``(s + 1) / W`` for ``s < W``, then poly decay
    ``(1 - (s - W) / (S - W)) ** power`` to 0 at ``S`` total steps (the curve :func:`build_scheduler` makes)."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return factor
