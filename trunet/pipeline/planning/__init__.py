"""Planning: what a training run will need before it runs -- the peak GPU memory of a config, estimated on
the CPU, and the largest patch, time window and batch that fit a VRAM budget (``trunet plan``).

Modules: :mod:`~trunet.pipeline.planning.profiler` (one measured forward pass),
:mod:`~trunet.pipeline.planning.memory` (the exact multilinear fit and :func:`estimate_memory`; the method and
its assumptions are described there), :mod:`~trunet.pipeline.planning.search` (:func:`plan`) and
:mod:`~trunet.pipeline.planning.run` (:func:`run_plan`). The planner builds the trainer's own network and
loss (:func:`trunet.models.build_model`, :func:`trunet.pipeline.training.losses.build_criterion`), so it
sits after training in the import graph; the trainer asks it for an estimate only through the hook that
:func:`trunet.pipeline.training.run.run_training` takes.
"""

from __future__ import annotations

from trunet.pipeline.planning.memory import (
    CUDA_CONTEXT_BYTES,
    GB,
    MemoryEstimate,
    estimate_memory,
    free_device_memory,
    training_memory_bytes,
)
from trunet.pipeline.planning.profiler import ActivationProbe, probe_activations
from trunet.pipeline.planning.run import run_plan
from trunet.pipeline.planning.search import (
    ACDC_MEDIAN_SHAPE,
    ACDC_SPACING,
    PlanCandidate,
    PlanResult,
    patch_ladder,
    plan,
)

__all__ = [
    "MemoryEstimate",
    "ActivationProbe",
    "PlanCandidate",
    "PlanResult",
    "estimate_memory",
    "probe_activations",
    "free_device_memory",
    "training_memory_bytes",
    "patch_ladder",
    "plan",
    "run_plan",
    "CUDA_CONTEXT_BYTES",
    "ACDC_MEDIAN_SHAPE",
    "ACDC_SPACING",
    "GB",
]
