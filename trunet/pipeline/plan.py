"""GPU memory planning: estimate the peak training memory of a config without a GPU, and choose the largest
patch, time window and batch that fit a VRAM budget (``trunet plan``).

How the estimate is made (:func:`estimate_memory`)
-------------------------------------------------
The real model (:class:`~trunet.models.TimeResolvedUNet` built from ``config.model``) and the trainer's
real loss (:class:`~trunet.pipeline.train.MaskedDiceCELoss`, wrapped in ``DeepSupervisionLoss`` when
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

Planner (:func:`plan`)
----------------------
Patch candidates keep the aspect ratio of the target spacing (equal physical extent per axis, i.e.
``size_i ~ 1 / spacing_i``), are multiples of ``model.size_divisor`` and are capped by the dataset's
median shape at the target spacing, rounded down to a multiple. With a dataset on disk (``data.root``)
the image headers give the median shape, spacing and the shortest cine; without one (the phantom, or no
data) the ACDC-typical median shape 256 x 216 x 10 at 1.5 x 1.5 x 10 mm and cines of at least 12 frames
are assumed. Time windows 4..16, capped by the shortest cine (a longer window would repeat frames).
Batch 2 (nnU-Net's minimum) unless nothing fits; a larger batch only when patch and time window are both
at their caps. The choice maximises the voxels of one training sample ``T * V``, then more frames, then
more voxels, among patches covering at least half the median in-plane field of view when any does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from trunet.atomic import write_yaml
from trunet.errors import TrunetError
from trunet.config import Config

__all__ = [
    "MemoryEstimate",
    "ActivationProbe",
    "build_model",
    "build_criterion",
    "PlanCandidate",
    "PlanResult",
    "estimate_memory",
    "probe_activations",
    "free_device_memory",
    "patch_ladder",
    "plan",
    "run_plan",
    "CUDA_CONTEXT_BYTES",
    "ACDC_MEDIAN_SHAPE",
    "ACDC_SPACING",
    "GB",
]

logger = logging.getLogger(__name__)

GB = 1e9
"""Bytes per GB in every figure here (10^9: conservative against the GiB-sized VRAM of real GPUs)."""
CUDA_CONTEXT_BYTES = int(0.5 * GB)
"""Fixed VRAM of the CUDA context (kernels, cuBLAS/cuDNN handles), invisible to the allocator's statistics."""
ACDC_MEDIAN_SHAPE = (256, 216, 10)
"""ACDC-typical median shape (x, y, z) at :data:`ACDC_SPACING`, used when no dataset is on disk."""
ACDC_SPACING = (1.5, 1.5, 10.0)
ACDC_MIN_FRAMES = 12
"""ACDC cines have 12 to 35 frames: windows are capped at the shortest cine so that none repeats a frame."""
TIME_WINDOWS = tuple(range(4, 17))
"""Time-window candidates of the planner, capped by the dataset's shortest cine."""
MIN_BATCH = 2
"""nnU-Net's minimum batch: the planner only goes below when nothing fits."""
MIN_FOV_FRACTION = 0.5
"""Prefer patches covering at least this fraction of the median in-plane extent."""

_PROBE_T = (2, 3)
_PROBE_B = (2, 4)  # not 1: on the CPU a one-sample fp32 recurrent conv takes a halo-padded path (clstm.py)
_PROBE_MULT = ((2, 1, 1), (2, 2, 1))  # patch = divisor * mult; the bottleneck keeps > 1 voxel (InstanceNorm)


# --------------------------------------------------------------------------------------------------------
# the estimate
# --------------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class ActivationProbe:
    """What one forward + loss on the CPU holds, measured (bytes).

    Attributes:
        live: storages produced during forward + loss and still alive at its end (parameters and the input
            batch excluded): what the step holds until backward.
        saved: distinct storages packed by ``saved_tensors_hooks`` (inputs and parameters excluded).
        largest: the largest single tensor an operator produced.
        largest_region: the saved bytes of the largest encoder/decoder stage (recomputed in one piece under
            checkpointing); measured only when ``regions`` is asked for.
    """

    live: int
    saved: int
    largest: int
    largest_region: int = 0


_SHAPE_ONLY = {torch.ops.aten.convolution.default}
"""Ops whose values never matter for memory: with ``shape_only`` they return an uninitialised tensor of the
right shape, dtype and strides (from the op's meta function) instead of computing."""
_SHAPE_ONLY_UNLESS_BATCH = {torch.ops.aten._to_copy.default, torch.ops.aten.clone.default}
"""The same for weight casts and copies; not for tensors made from the batch (label values steer the loss)."""


def _empty_convolution(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int,
) -> Tensor:
    """An uninitialised output of ``aten.convolution`` (PyTorch's output-size formulas, contiguous)."""
    kernel = weight.shape[2:]
    if transposed:
        sizes = [(i - 1) * s - 2 * p + d * (k - 1) + op + 1
                 for i, s, p, d, k, op in zip(x.shape[2:], stride, padding, dilation, kernel, output_padding)]
        channels = weight.shape[1] * groups
    else:
        sizes = [(i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, s, p, d, k in zip(x.shape[2:], stride, padding, dilation, kernel)]
        channels = weight.shape[0]
    return torch.empty((x.shape[0], channels, *sizes), dtype=x.dtype, device=x.device)


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in nested tuples/lists/dicts (torch's pytree is several times slower per operator)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


class _StorageWatch(TorchDispatchMode):
    """Weak references to the storage of every operator output, and the largest output computed from the
    batch (weight casts and copies, whose size does not scale with the input, are not candidates).

    With ``shape_only``, convolutions and weight casts are not computed (see :data:`_SHAPE_ONLY`): the
    autograd layer above this mode saves the same tensors either way, and the probe of the default model
    runs in a fraction of the time (its convolutions at probe sizes are bound by the 57M weights).
    """

    def __init__(self, seeds: set[int], regions: Optional[list[int]] = None, shape_only: bool = True) -> None:
        super().__init__()
        self.shape_only = shape_only
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.derived = set(seeds)
        self.largest = 0
        self.regions = regions if regions is not None else []
        self.created_in: dict[int, int] = {}  # storage -> region (stage index) that produced it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        from_batch = any(t.untyped_storage()._cdata in self.derived for t in inputs)
        if self.shape_only and func in _SHAPE_ONLY:
            out = _empty_convolution(*args, **kwargs)
        elif self.shape_only and func in _SHAPE_ONLY_UNLESS_BATCH and not from_batch:
            out = torch.empty_like(args[0], dtype=kwargs.get("dtype", args[0].dtype),
                                   memory_format=kwargs.get("memory_format", torch.preserve_format))
        else:
            out = func(*args, **kwargs)
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            nbytes = storage.nbytes()
            if from_batch:
                self.derived.add(key)
                self.largest = max(self.largest, nbytes)
            if key not in self.refs or self.refs[key][0].expired():
                self.refs[key] = (StorageWeakRef(storage), nbytes)
                if self.regions:
                    self.created_in[key] = self.regions[-1]
                else:
                    self.created_in.pop(key, None)
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        return sum(n for key, (ref, n) in self.refs.items() if key not in exclude and not ref.expired())


def _storage_keys(tensors: Sequence[Tensor]) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors}


def build_model(config: Config, initialise: bool = True) -> nn.Module:
    """The training model of ``config`` on the CPU, in training mode.

    ``initialise=False`` skips the random initialisation (built on the meta device, then zero-filled):
    memory does not depend on the values, and the default model's initialisation takes seconds.
    """
    from trunet.models import TimeResolvedUNet

    kwargs = dict(in_channels=1, out_channels=len(config.data.classes), **dataclasses.asdict(config.model))
    if initialise:
        return TimeResolvedUNet(**kwargs).train()
    with torch.device("meta"):
        model = TimeResolvedUNet(**kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.zero_()
    return model.train()


def build_criterion(config: Config) -> nn.Module:
    """The trainer's loss: masked Dice + CE, under deep supervision when the model has it."""
    from trunet.pipeline.train import DeepSupervisionLoss, MaskedDiceCELoss

    t = config.train
    loss = MaskedDiceCELoss(len(config.data.classes), config.data.ignore_index, t.dice_weight, t.ce_weight)
    return DeepSupervisionLoss(loss) if config.model.deep_supervision else loss


def _amp_dtype(config: Config) -> Optional[torch.dtype]:
    return torch.bfloat16 if config.train.amp else None


def probe_activations(
    config: Config,
    model: nn.Module,
    criterion: nn.Module,
    batch_size: int,
    time_window: int,
    patch_size: Sequence[int],
    regions: bool = False,
) -> ActivationProbe:
    """Measure one forward + loss of ``model`` on the CPU at a (small) size, as the trainer runs it.

    Input ``(batch_size, time_window, 1, *patch_size)`` random image, random labels on every frame.
    Autocast (bf16, see assumption 1) around the model only when ``config.train.amp``; the loss in float32.
    ``regions=True`` also measures the saved bytes per encoder/decoder stage (run it without checkpointing).
    """
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, time_window, *patch_size)
    image = torch.randn(batch_size, time_window, 1, *patch_size, generator=generator)
    label = torch.randint(0, len(config.data.classes), shape, generator=generator)
    frame_mask = torch.ones(batch_size, time_window, dtype=torch.bool)
    exclude = _storage_keys([image, label, frame_mask, *model.parameters(), *model.buffers()])

    saved: dict[int, int] = {}
    region_stack: list[int] = []
    region_bytes: dict[int, int] = {}
    watch = _StorageWatch(_storage_keys([image, label, frame_mask]), region_stack)

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in exclude and key not in saved:
            saved[key] = storage.nbytes()
            if region_stack and watch.created_in.get(key) == region_stack[-1]:
                # made inside the stage (its inputs exist before it, and stay alive under checkpointing)
                region_bytes[region_stack[-1]] = region_bytes.get(region_stack[-1], 0) + storage.nbytes()
        return t

    handles = []
    if regions:
        encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
        stages = [*getattr(encoder, "stages", []), *getattr(decoder, "ups", [])]

        def enter(index: int) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                region_stack.append(index)
            return hook

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            region_stack.pop()

        for i, stage in enumerate(stages):
            handles.append(stage.register_forward_pre_hook(enter(i)))
            handles.append(stage.register_forward_hook(leave))
    amp = _amp_dtype(config)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), watch:
            with torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext():
                outputs = model(image)
            loss = criterion(outputs, label, frame_mask)
            del outputs
        live = watch.live_bytes(exclude)
    finally:
        for h in handles:
            h.remove()
    del loss
    return ActivationProbe(live=live, saved=sum(saved.values()), largest=watch.largest,
                           largest_region=max(region_bytes.values(), default=0))


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
    from trunet.config import config_from_dict

    spec = json.loads(key)
    config = config_from_dict({
        "model": spec["model"],
        "data": {"classes": [f"c{i}" for i in range(spec["classes"])]},
        "train": {"amp": spec["amp"], "dice_weight": float(spec["loss"][0]),
                  "ce_weight": float(spec["loss"][1])},
    }, source="<plan>")
    model = build_model(config, initialise=False)
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


# --------------------------------------------------------------------------------------------------------
# the planner
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanCandidate:
    """One evaluated (patch, time window, batch) and its estimated peak in bytes."""

    patch_size: tuple[int, int, int]
    time_window: int
    batch_size: int
    total: int
    fits: bool

    @property
    def sample_voxels(self) -> int:
        return self.time_window * math.prod(self.patch_size)


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer.

    Attributes:
        chosen: the chosen candidate.
        estimate: its full :class:`MemoryEstimate`.
        budget: usable bytes ``vram_gb * (1 - headroom) * 1e9``.
        candidates: per time window, the largest fitting patch and the next larger one (which does not
            fit); at the caps, the batch sizes tried.
        ladder: the patch sizes searched, smallest first.
        median_shape / spacing / time_windows / shape_source: the caps, the windows searched, and where
            the caps came from.
    """

    chosen: PlanCandidate
    estimate: MemoryEstimate
    budget: int
    candidates: list[PlanCandidate]
    ladder: list[tuple[int, int, int]]
    median_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    time_windows: list[int]
    shape_source: str

    def fragment(self) -> dict[str, Any]:
        """The chosen values as a config fragment ``{"train": {...}}``."""
        c = self.chosen
        return {"train": {"patch_size": list(c.patch_size), "time_window": c.time_window,
                          "batch_size": c.batch_size}}


def patch_ladder(
    divisor: Sequence[int], spacing: Sequence[float], cap: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Patch sizes of growing physical extent with the aspect ratio of ``spacing``, multiples of ``divisor``.

    The extent grows by one divisor step on the axis of finest spacing; every axis is ``round(extent /
    spacing)`` to the nearest multiple of its divisor (at least one divisor), capped by ``cap`` rounded
    down to a multiple (at least one divisor). Distinct sizes, smallest first, ending at the cap.
    """
    div = [int(d) for d in divisor]
    caps = [max(d, (int(c) // d) * d) for c, d in zip(cap, div)]
    fine = int(np.argmin(spacing))
    sizes: list[tuple[int, int, int]] = []
    k = 1
    while True:
        extent = k * div[fine] * spacing[fine]
        size = tuple(min(c, max(d, int(round(extent / s / d)) * d)) for s, d, c in zip(spacing, div, caps))
        if not sizes or size != sizes[-1]:
            if sizes and any(a < b for a, b in zip(size, sizes[-1])):
                raise AssertionError("patch ladder must grow")  # a bug, not a user error
            sizes.append(size)  # type: ignore[arg-type]
        if list(size) == caps:
            return sizes
        k += 1


def _dataset_shape(config: Config) -> tuple[tuple[int, int, int], tuple[float, float, float], int, str]:
    """Median shape at the target spacing, the target spacing, the fewest frames of a cine, and where they
    came from.

    With a dataset on disk (``data.root``), the NIfTI/ITK headers of the training images give the median
    shape and spacing and the frame counts; otherwise (phantom, missing or unreadable data) the
    ACDC-typical figures.
    """
    target = config.data.target_spacing
    if config.data.root is not None:
        try:
            return _headers_median(config, target)
        except Exception as exc:  # noqa: BLE001 - planning falls back to typical figures, and says so
            logger.warning("could not read the dataset's image headers (%s); using the ACDC-typical median "
                           "shape %s at %s mm", exc, ACDC_MEDIAN_SHAPE, ACDC_SPACING)
    spacing = tuple(target) if target is not None else ACDC_SPACING
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(ACDC_MEDIAN_SHAPE, ACDC_SPACING, spacing))
    source = (f"ACDC-typical median shape 256x216x10 at 1.5x1.5x10 mm, cines of {ACDC_MIN_FRAMES} or more "
              "frames (no dataset on disk)")
    return shape, spacing, ACDC_MIN_FRAMES, source  # type: ignore[return-value]


def _headers_median(
    config: Config, target: Optional[Sequence[float]]
) -> tuple[tuple[int, int, int], tuple[float, float, float], int, str]:
    import tempfile

    import SimpleITK as sitk

    from trunet.pipeline.data import resolve_cases

    with tempfile.TemporaryDirectory() as work:
        lists = resolve_cases(config.data, Path(work))
        cases = [*lists.training, *lists.validation]
    shapes, spacings, frames = [], [], []
    for case in cases:
        path = Path(case["image"])
        if path.is_dir():
            raise TrunetError(f"{path}: frame folders are not read for planning")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shapes.append(reader.GetSize()[:3])
        spacings.append(reader.GetSpacing()[:3])
        frames.append(reader.GetSize()[3] if len(reader.GetSize()) > 3 else 1)
    if not shapes:
        raise TrunetError("no training images")
    median_spacing = tuple(float(x) for x in np.median(np.array(spacings), axis=0))
    spacing = tuple(target) if target is not None else median_spacing
    physical = np.median(np.array(shapes) * np.array(spacings), axis=0)
    shape = tuple(max(1, int(round(p / s))) for p, s in zip(physical, spacing))
    source = f"median of {len(shapes)} images in {config.data.root}, shortest cine {min(frames)} frames"
    return shape, spacing, min(frames), source  # type: ignore[return-value]


def _budget(vram_gb: float, headroom: float) -> int:
    if not isinstance(vram_gb, (int, float)) or not math.isfinite(vram_gb) or vram_gb <= 0:
        raise TrunetError(f"--vram-gb must be a positive number of GB, got {vram_gb}")
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise TrunetError(f"--headroom must be a fraction in [0, 1), got {headroom}")
    return int(vram_gb * (1 - headroom) * GB)


def plan(
    config: Config, vram_gb: float = 40.0, headroom: float = 0.1, device_type: str = "cuda"
) -> PlanResult:
    """Choose patch size, time window and batch size for ``vram_gb * (1 - headroom)`` (module docstring).

    Raises:
        TrunetError: a budget <= 0, a headroom outside [0, 1), or a budget too small for the smallest
            candidate (one divisor-sized patch, the shortest time window, batch 1).
    """
    budget = _budget(vram_gb, headroom)
    shape, spacing, max_frames, source = _dataset_shape(config)
    scales = [1, 1, 1]
    for s in config.model.strides:
        scales = [a * b for a, b in zip(scales, s)]
    ladder = patch_ladder(scales, spacing, shape)
    windows = [t for t in TIME_WINDOWS if t <= max_frames] or [max(1, max_frames)]

    def total(patch: tuple[int, int, int], frames: int, batch: int) -> int:
        return estimate_memory(config, patch, frames, batch, device_type=device_type).total

    def largest_patch(frames: int, batch: int) -> int:
        """Index in ``ladder`` of the largest patch that fits, -1 if none (totals grow along the ladder)."""
        lo, hi = -1, len(ladder) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if total(ladder[mid], frames, batch) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    smallest = total(ladder[0], windows[0], 1)
    if smallest > budget:
        raise TrunetError(
            f"a budget of {vram_gb:g} GB with headroom {headroom:g} ({budget / GB:.2f} GB usable) is too "
            f"small for the smallest candidate (patch {list(ladder[0])}, time window {windows[0]}, batch 1: "
            f"{smallest / GB:.2f} GB); lower the model size or raise the budget"
        )
    min_inplane = MIN_FOV_FRACTION * MIN_FOV_FRACTION * shape[0] * shape[1]
    batch = MIN_BATCH if total(ladder[0], windows[0], MIN_BATCH) <= budget else 1
    candidates: list[PlanCandidate] = []
    best: Optional[tuple[tuple, PlanCandidate]] = None
    for frames in windows:
        i = largest_patch(frames, batch)
        if i < 0:
            continue
        patch = ladder[i]
        chosen = PlanCandidate(patch, frames, batch, total(patch, frames, batch), True)
        candidates.append(chosen)
        if i + 1 < len(ladder):
            nxt = ladder[i + 1]
            candidates.append(PlanCandidate(nxt, frames, batch, total(nxt, frames, batch), False))
        wide = patch[0] * patch[1] >= min_inplane
        score = (wide, chosen.sample_voxels, frames, math.prod(patch))
        if best is None or score > best[0]:
            best = (score, chosen)
    assert best is not None  # the smallest candidate fits
    chosen = best[1]
    if chosen.patch_size == ladder[-1] and chosen.time_window == windows[-1]:
        # patch and window at their caps: spend what is left on the batch (as nnU-Net does)
        b = chosen.batch_size
        while total(chosen.patch_size, chosen.time_window, b + 1) <= budget:
            b += 1
        if b != chosen.batch_size:
            chosen = PlanCandidate(chosen.patch_size, chosen.time_window, b,
                                   total(chosen.patch_size, chosen.time_window, b), True)
            candidates.append(chosen)
        candidates.append(PlanCandidate(chosen.patch_size, chosen.time_window, b + 1,
                                        total(chosen.patch_size, chosen.time_window, b + 1), False))
    estimate = estimate_memory(config, chosen.patch_size, chosen.time_window, chosen.batch_size, device_type)
    return PlanResult(chosen, estimate, budget, candidates, ladder, shape, spacing,  # type: ignore[arg-type]
                      windows, source)


def _table(result: PlanResult) -> str:
    lines = ["  time window | batch | patch (x, y, z)     | sample voxels | estimate GB | fits",
             "  ------------|-------|---------------------|---------------|-------------|-----"]
    for c in result.candidates:
        mark = "*" if c == result.chosen else ""
        lines.append(f"  {c.time_window:11d} | {c.batch_size:5d} | {str(list(c.patch_size)):19s} | "
                     f"{c.sample_voxels:13,d} | {c.total / GB:11.2f} | {'yes' if c.fits else 'no'}{mark}")
    return "\n".join(lines)


def run_plan(
    config: Config,
    vram_gb: float = 40.0,
    headroom: float = 0.1,
    out: Optional[str | os.PathLike] = None,
) -> PlanResult:
    """``trunet plan``: print the estimate of ``config`` as given, search, print the candidates, write the
    chosen values as a YAML fragment to ``out`` (atomically) when given. Returns the :class:`PlanResult`."""
    budget = _budget(vram_gb, headroom)
    try:
        given = estimate_memory(config)
    except TrunetError as exc:  # e.g. a patch the strides do not divide: still plan
        print(f"the config as given cannot be estimated: {exc}")
    else:
        print(f"estimated peak training memory of the config as given (GB = 1e9 bytes):\n{given.summary()}")
        verdict = "fits" if given.total <= budget else "does NOT fit"
        print(f"budget: {vram_gb:g} GB x (1 - {headroom:g}) = {budget / GB:.2f} GB -> "
              f"the config as given {verdict}")
    result = plan(config, vram_gb, headroom)
    print(f"\npatch cap: median shape {list(result.median_shape)} at spacing {list(result.spacing)} mm "
          f"({result.shape_source}); size divisor {list(result.ladder[0])}; time windows "
          f"{result.time_windows[0]}..{result.time_windows[-1]}")
    print("candidates: per time window the largest fitting patch and the next larger one; at the caps, the "
          "next larger batch (* = chosen)")
    print(_table(result))
    c = result.chosen
    print(f"\nchosen: patch {list(c.patch_size)}, time window {c.time_window}, batch {c.batch_size}\n"
          f"{result.estimate.summary()}")
    if out is not None:
        path = write_yaml(out, result.fragment())
        print(f"wrote {path}")
    return result
