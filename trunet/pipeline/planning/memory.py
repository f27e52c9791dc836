"""Peak training memory of a config, estimated on the CPU without a GPU (``trunet plan`` and the trainer's
out-of-memory warning).

How the estimate is made (:func:`estimate_memory`)
-------------------------------------------------
The real model (:class:`~trunet.models.TimeResolvedUNet` built from ``config.model``) and the trainer's
real loss (:class:`~trunet.pipeline.training.losses.MaskedDiceCELoss`, wrapped in ``DeepSupervisionLoss`` when
``model.deep_supervision``) run one forward pass on the CPU on small inputs ("probes"), under the trainer's
precision (autocast around the model only, loss in float32) and the configured checkpointing. Two
counters watch it:

* ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd saves for backward,
  deduplicated by storage (the same storage saved twice counts once; a view counts its base storage);
* a ``TorchDispatchMode`` keeps a weak reference to the storage of every tensor an operator produces, and
  the largest one. After forward and loss, the storages still alive are exactly what the step holds until
  backward: the saved tensors *plus* what they cannot see, i.e. the inputs ``torch.utils.checkpoint``
  keeps for recomputation (its own hooks hide the saved tensors of checkpointed regions). The activation
  term is this live set; the saved-tensor total is reported beside it (equal without checkpointing).

Scaling is exact, not a rule of thumb: for a fully convolutional network of fixed architecture whose
input sizes are multiples of the strides, every activation has ``B * T * V / P_l`` elements (``V`` voxels
of the patch, ``P_l`` the level's pooling factor), InstanceNorm statistics have ``B * T * C``, the first
ConvLSTM step (no recurrent convolution) is one extra frame, and weight casts are per forward or per time
step. So the live bytes are *multilinear* in ``B``, ``T`` and ``V``: a sum of the eight monomials
``1, B, T, V, BT, BV, TV, BTV``. Eight probes, ``B in {2, 4}`` x ``T in {2, 3}`` x two patch sizes, fix
the eight coefficients exactly; any other size is then a dot product (``tests/test_plan.py`` checks the
prediction against a direct measurement at a size not probed). ``B = 1`` is not probed because on the CPU
a one-sample float32 recurrent convolution takes a halo-padded path (``trunet/models/clstm.py``) that
CUDA never takes. The fit is cached per architecture and precision, so a planner search costs eight small
forwards, not one per candidate. In the probes, convolutions and weight casts return uninitialised
tensors of the right shape instead of computing (values never change what autograd saves), which makes
the default model's eight probes take about a second.

Assumptions (each one a choice; the figures in BENCHMARKS.md test them on the CPU)
---------------------------------------------------------------------------------
1. **Precision.** CPU autocast is used as a stand-in for CUDA autocast. For this network the two casting
   policies agree: ``conv3d`` and ``conv_transpose3d`` are lower-precision ops on both; InstanceNorm,
   LeakyReLU, sigmoid/tanh and the elementwise gate arithmetic are on neither list and keep the input
   dtype; the ops where the lists differ (``softmax``, ``log_softmax``, ``sum`` ... are float32 on CUDA,
   not on CPU) occur only in the loss, which the trainer computes outside autocast on ``logits.float()``.
   Checked: under CPU autocast every 5-D tensor the network saves is bf16, only the InstanceNorm
   statistics are float32.
   fp16 (GPUs without bf16) has the same element size as bf16, so one bf16 probe serves both. AMP off
   means float32 throughout.
2. **Labels.** Every frame of a window is labelled (dense labels, as the phantom): the loss then holds
   tensors for all ``T`` frames. With sparse ED/ES labels the loss part is smaller, so this is an upper
   bound.
3. **Peak of a steady-state step.** parameters (float32 master weights) + optimizer state (kept from the
   step before: SGD with momentum one buffer, AdamW two, SGD without momentum none) + gradients (float32,
   all present at once, as at the end of backward) + the batch on the device (image float32, label int64,
   frame mask) + (CUDA) the context, plus the larger of (a) the live activations at the end of forward +
   the backward workspace and (b) the optimizer step's temporaries. Taking all gradients and all
   activations at once is slightly pessimistic: activations are freed while gradients are made.
4. **Backward workspace** = the largest activation any operator produced (its gradient) + the largest
   parameter tensor in float32 bytes (its low-precision gradient and float32 copy, or oneDNN's reordered
   weight), plus on CUDA one more largest-activation size as an allowance for cuDNN's convolution
   workspace. With checkpointing, add the largest recomputed region: the tensors the largest encoder or
   decoder stage makes and saves, measured on the same model without checkpointing (ConvLSTM time steps,
   one frame each, are smaller and ignored). Largest activation and region are scaled with ``B * T * V``
   (full-resolution tensors of all frames). **Optimizer workspace**: on CUDA the ``foreach`` step makes
   whole-model temporary lists (weight decay, Nesterov, Adam's denominator): 2 x parameters; on the CPU
   the per-tensor step: 2 x the largest parameter tensor.
5. **CUDA context** ~0.5 GB (``CUDA_CONTEXT_BYTES``) for ``device_type="cuda"``: it is VRAM no allocator
   statistic shows. Allocator fragmentation and caching are left to ``headroom`` (10% by default).
6. **Single process.** DDP adds gradient buckets (about one more gradient copy); not included.
7. GB here is 10^9 bytes (a "40 GB" A100 has 42.5e9 usable, an "80 GB" H100 85.5e9): conservative.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from trunet.config import Config, config_for_model
from trunet.errors import TrunetError
from trunet.models import build_model
from trunet.pipeline.planning.profiler import probe_activations
from trunet.pipeline.training.losses import build_criterion

__all__ = ["GB", "CUDA_CONTEXT_BYTES", "MemoryEstimate", "estimate_memory", "free_device_memory",
           "training_memory_bytes"]


GB = 1e9
"""Bytes per GB in every figure here (10^9: conservative against the GiB-sized VRAM of real GPUs)."""
CUDA_CONTEXT_BYTES = int(0.5 * GB)
"""Fixed VRAM of the CUDA context (kernels, cuBLAS/cuDNN handles), invisible to the allocator's statistics."""

_PROBE_T = (2, 3)
_PROBE_B = (2, 4)  # not 1: on the CPU a one-sample fp32 recurrent conv takes a halo-padded path (clstm.py)
_PROBE_MULT = ((2, 1, 1), (2, 2, 1))  # patch = divisor * mult; the bottleneck keeps > 1 voxel (InstanceNorm)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak training memory of one step, in bytes per component (see the module docstring).

    Attributes:
        parameters / gradients / optimizer_state: float32 weights, their gradients, optimizer buffers.
        batch: the batch on the device (image float32, label int64, frame mask).
        activations: tensors alive at the end of forward + loss (saved for backward, checkpoint inputs).
        saved_tensors: the part of ``activations`` autograd's saved-tensor hooks see (for validation).
        workspace: transient tensors of backward (largest activation gradient, largest weight gradient,
            cuDNN allowance, recomputed stage).
        optimizer_workspace: temporaries of the optimizer step (``foreach`` lists on CUDA).
        cuda_context: fixed CUDA context (0 for ``device_type="cpu"``).
        patch_size / time_window / batch_size / precision / checkpointing / device_type: what was estimated.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    batch: int
    activations: int
    saved_tensors: int
    workspace: int
    optimizer_workspace: int
    cuda_context: int
    patch_size: tuple[int, int, int]
    time_window: int
    batch_size: int
    precision: str
    checkpointing: bool
    device_type: str

    @property
    def total(self) -> int:
        """Estimated peak bytes: weights, gradients, optimizer state, batch and context, plus the larger of
        backward's (activations + workspace) and the optimizer step's temporaries (the activations are
        gone by then). ``saved_tensors`` is part of ``activations``."""
        return (self.parameters + self.gradients + self.optimizer_state + self.batch + self.cuda_context
                + max(self.activations + self.workspace, self.optimizer_workspace))

    @property
    def total_bytes(self) -> int:
        """Alias of :attr:`total` (the trainer's pre-flight check reads it)."""
        return self.total

    @property
    def step_bytes(self) -> int:
        """What a training step adds to the weights: everything but parameters and CUDA context."""
        return self.total - self.parameters - self.cuda_context

    def gb(self, component: str = "total") -> float:
        """A component (``"total"``, ``"activations"``, ...) in GB (10^9 bytes)."""
        return float(getattr(self, component)) / GB

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: every field plus ``total``."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["total"] = self.total
        return d

    def summary(self) -> str:
        """Multi-line human-readable breakdown in GB."""
        rows = [
            ("parameters", self.parameters), ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state), ("batch", self.batch),
            ("activations", self.activations), ("  of which saved for backward", self.saved_tensors),
            ("backward workspace", self.workspace), ("optimizer-step workspace*", self.optimizer_workspace),
            ("CUDA context", self.cuda_context),
            ("total", self.total),
        ]
        ckpt = "on" if self.checkpointing else "off"
        head = (f"patch {list(self.patch_size)}, time window {self.time_window}, batch {self.batch_size}, "
                f"{self.precision}, checkpointing {ckpt}, {self.device_type}")
        return (head + "\n" + "\n".join(f"  {name:<30s} {value / GB:9.3f} GB" for name, value in rows)
                + "\n  (* the total takes the larger of activations + backward workspace and the optimizer "
                "step's)")


def _monomials(b: float, t: float, v: float) -> np.ndarray:
    """The eight monomials of a multilinear function of ``(B, T, V)``."""
    return np.array([1.0, b, t, v, b * t, b * v, t * v, b * t * v])


@dataclass(frozen=True)
class _Fit:
    """Exact multilinear fits of the probe figures for one architecture and precision."""

    live: tuple[float, ...]
    saved: tuple[float, ...]
    largest_per_btv: float
    region_per_btv: float
    parameters: int
    largest_parameter: int

    def at(self, b: int, t: int, v: int) -> tuple[int, int, int, int]:
        m = _monomials(b, t, v)
        live = int(round(float(np.dot(self.live, m))))
        saved = int(round(float(np.dot(self.saved, m))))
        btv = b * t * v
        return live, saved, int(round(self.largest_per_btv * btv)), int(round(self.region_per_btv * btv))


def _fit_key(config: Config) -> str:
    """Everything the activation fit depends on (not the sizes, not the optimizer)."""
    return json.dumps({
        "model": config.to_dict()["model"],
        "classes": len(config.data.classes),
        "amp": config.train.amp,
        "loss": [config.train.dice_weight != 0, config.train.ce_weight != 0],
    }, sort_keys=True)


@functools.lru_cache(maxsize=32)
def _fit(key: str) -> _Fit:
    spec = json.loads(key)
    config = config_for_model(
        spec["model"], "<plan>",
        data={"classes": [f"c{i}" for i in range(spec["classes"])]},
        train={"amp": spec["amp"], "dice_weight": float(spec["loss"][0]), "ce_weight": float(spec["loss"][1])},
    )
    model = build_model(config, initialise=False)  # the trainer's network and loss, from their one factory
    criterion = build_criterion(config)
    divisor = model.size_divisor
    rows, live, saved, largest, region = [], [], [], 0.0, 0.0
    for b, t, mult in itertools.product(_PROBE_B, _PROBE_T, _PROBE_MULT):
        size = tuple(d * m for d, m in zip(divisor, mult))
        v = math.prod(size)
        p = probe_activations(config, model, criterion, b, t, size)
        rows.append(_monomials(b, t, v))
        live.append(p.live)
        saved.append(p.saved)
        largest = max(largest, p.largest / (b * t * v))
    if config.model.checkpointing:
        model.checkpointing = False
        b, t, mult = _PROBE_B[-1], _PROBE_T[-1], _PROBE_MULT[-1]
        size = tuple(d * m for d, m in zip(divisor, mult))
        p = probe_activations(config, model, criterion, b, t, size, regions=True)
        region = p.largest_region / (b * t * math.prod(size))
        model.checkpointing = True
    a = np.stack(rows)
    coef_live = np.linalg.solve(a, np.array(live, dtype=float))
    coef_saved = np.linalg.solve(a, np.array(saved, dtype=float))
    n_params = sum(p.numel() * p.element_size() for p in model.parameters())
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    return _Fit(tuple(coef_live), tuple(coef_saved), largest, region, n_params, biggest)


def _check_size(config: Config, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """The patch as a 3-tuple, or a TrunetError if the strides do not divide it (the model's rule)."""
    scales = config.model.size_divisor
    size = tuple(int(p) for p in patch_size)
    if len(size) != 3 or any(p < d or p % d for p, d in zip(size, scales)):
        raise TrunetError(
            f"patch size {list(size)} must be three multiples of the model's size divisor {scales} "
            f"(the product of model.strides)"
        )
    return size  # type: ignore[return-value]


def estimate_memory(
    config: Config,
    patch_size: Optional[Sequence[int]] = None,
    time_window: Optional[int] = None,
    batch_size: Optional[int] = None,
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Estimated peak memory of one training step of ``config`` (module docstring: method, assumptions).

    Args:
        config: the resolved config; ``model``, ``train`` (amp, optimizer, momentum, sizes) and
            ``data.classes`` are used.
        patch_size / time_window / batch_size: override ``config.train``'s values.
        device_type: ``"cuda"`` (adds the CUDA context and a cuDNN workspace allowance) or ``"cpu"``.

    The first call for an architecture runs eight small forwards on the CPU (about a second for the
    default model); later calls are arithmetic.

    Raises:
        TrunetError: a patch size that is not a multiple of the model's size divisor, or sizes < 1.
    """
    if device_type not in ("cuda", "cpu"):
        raise TrunetError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    t = config.train
    size = _check_size(config, patch_size if patch_size is not None else t.patch_size)
    frames = int(time_window if time_window is not None else t.time_window)
    batch = int(batch_size if batch_size is not None else t.batch_size)
    if frames < 1 or batch < 1:
        raise TrunetError(f"time window and batch size must be at least 1, got {frames} and {batch}")
    fit = _fit(_fit_key(config))
    voxels = math.prod(size)
    live, saved, largest, region = fit.at(batch, frames, voxels)
    params = fit.parameters
    if t.optimizer == "adamw":
        optimizer = 2 * params
    else:
        optimizer = params if t.momentum != 0 else 0
    cuda = device_type == "cuda"
    workspace = largest + fit.largest_parameter
    if cuda:
        workspace += largest  # cuDNN convolution workspace allowance
    if config.model.checkpointing:
        workspace += region
    optimizer_workspace = 2 * (params if cuda else fit.largest_parameter)
    batch_bytes = batch * frames * (voxels * (4 + 8) + 1)
    return MemoryEstimate(
        parameters=params,
        gradients=params,
        optimizer_state=optimizer,
        batch=batch_bytes,
        activations=live,
        saved_tensors=saved,
        workspace=workspace,
        optimizer_workspace=optimizer_workspace,
        cuda_context=CUDA_CONTEXT_BYTES if device_type == "cuda" else 0,
        patch_size=size,
        time_window=frames,
        batch_size=batch,
        precision=("bf16/fp16" if device_type == "cuda" else "bf16") if t.amp else "fp32",
        checkpointing=config.model.checkpointing,
        device_type=device_type,
    )


def free_device_memory(device: torch.device | str) -> Optional[int]:
    """Free memory in bytes of a CUDA device (``torch.cuda.mem_get_info``); ``None`` for other devices or
    when it cannot be read."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return None
    return int(free)


def training_memory_bytes(config: Config) -> float:
    """Peak CUDA training memory of ``config`` as it is (its patch, window and batch), in bytes: the hook
    ``trunet train`` gives :func:`~trunet.pipeline.training.run.run_training` for its out-of-memory warning."""
    return float(estimate_memory(config, device_type="cuda").total_bytes)
