"""The probe behind the memory estimate: one forward pass and loss of the real model on the CPU, with the
storages autograd saves and the storages still alive counted (method in :mod:`trunet.pipeline.planning.memory`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from trunet.config import Config
from trunet.pipeline.precision import autocast, autocast_dtype

__all__ = ["ActivationProbe", "probe_activations"]


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
    amp = autocast_dtype("cpu", config.train.amp)  # CPU autocast stands in for CUDA's (assumption 1)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), watch:
            with autocast("cpu", amp):
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
