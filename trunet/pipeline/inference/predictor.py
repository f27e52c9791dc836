"""The :class:`Predictor`: whole preprocessed cines through the network, sliding windows in space and time
windows in time (scheme in :mod:`trunet.pipeline.inference`). Validation during training uses it too."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from torch import Tensor, nn
from tqdm.auto import tqdm

from trunet.config import InferConfig
from trunet.errors import DataError
from trunet.pipeline.inference.windows import time_windows
from trunet.pipeline.precision import autocast, autocast_dtype, cpu_has_fast_bf16

__all__ = ["Predictor", "DEFAULT_PASS_VOXEL_BUDGET", "DEFAULT_STREAM_VOXEL_BUDGET", "resolve_device"]


DEFAULT_PASS_VOXEL_BUDGET = 8 * 2**20
"""Voxel-frames one forward pass may hold (``T * patch voxels * sw_batch_size``) before ``time_window="auto"``
cuts the series into time windows: 40 frames of a 160 x 160 x 8 patch, ~10 GB of activations for the default
model in float32 (BENCHMARKS.md, Inference)."""

DEFAULT_STREAM_VOXEL_BUDGET = 2 * 2**20
"""Voxel-frames per chunk when a causal model streams a series, its ConvLSTM state carried from one chunk to
the next: the chunk size does not change the result, only memory and speed, so it is kept small (3 frames of
the 256 x 208 x 10 patch of ``configs/default.yaml``; BENCHMARKS.md, Inference)."""

_INPLANE_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (4,), (3, 4))  # dims of (n, T, C, X, Y, Z)


def resolve_device(device: Union[str, torch.device, None], fallback: torch.device) -> torch.device:
    if device is None:
        return fallback
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DataError(None, f"unknown device {device!r} ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(None, f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return dev


class Predictor:
    """Sliding-window (space) and time-window inference of a time-resolved UNet on whole cases.

    Args:
        model: a :class:`~trunet.models.TimeResolvedUNet` (or any module mapping ``(B, T, C, X, Y, Z)`` to
            logits ``(B, T, K, X, Y, Z)``, or a list whose first element is that). Put in eval mode for each
            call and restored to its previous mode afterwards, so the trainer can pass its live model; a
            DDP/DataParallel wrapper is unwrapped.
        preprocessing: the checkpoint's preprocessing dict; uses ``patch_size`` (the window, rounded up to
            the model's ``size_divisor``), ``time_window`` (the training window) and ``classes``.
        infer_config: ``overlap``, ``sw_batch_size``, ``time_overlap``, ``tta``, ``cpu_stitch_voxels``
            (``postprocess`` is applied by :func:`run_prediction` on label maps, not here).
        device: where the model runs; default: the device of the model's parameters. The model is moved
            there.
        amp: autocast the forward pass on CUDA (bf16 where supported, else fp16).
        time_window: ``"auto"`` (whole series when within ``pass_voxel_budget``; for a streaming model, chunks
            within ``stream_voxel_budget``), ``None``/``0`` (always the whole series in one pass) or an int
            ``W`` (passes of ``W`` frames).
        amp_on_cpu: also autocast on the CPU (bf16). ``None`` (default): ``infer_config.cpu_bf16``, and where
            that is ``None`` too, on exactly when the CPU has bf16 instructions
            (:func:`~trunet.pipeline.precision.cpu_has_fast_bf16`).
        progress: show a tqdm bar per case (windows done).
        pass_voxel_budget: see ``time_window="auto"``.
        stream_voxel_budget: see ``time_window="auto"``.

    A causal model with ``forward_streaming`` (:class:`~trunet.models.TimeResolvedUNet`) *streams* the
    series: each spatial window's frames go through in consecutive chunks, the ConvLSTM state carried from
    one chunk into the next, which gives the one-pass result with the memory of one chunk and no frame
    computed twice. A bidirectional model uses the time windows of :mod:`trunet.pipeline.inference`.

    Example::

        >>> import torch
        >>> from trunet.config import InferConfig
        >>> from trunet.models import TimeResolvedUNet
        >>> net = TimeResolvedUNet(1, 4, channels=[4, 8], strides=[(2, 2, 1)])
        >>> pre = {"patch_size": [8, 8, 2], "time_window": 2, "classes": ["bg", "RV", "MYO", "LV"]}
        >>> predictor = Predictor(net, pre, InferConfig(), device="cpu")
        >>> probs = predictor.predict_case(torch.randn(1, 3, 12, 10, 2))  # (1, T, X, Y, Z), any size
        >>> probs.shape, bool(torch.allclose(probs.sum(dim=2), torch.ones(1)))
        (torch.Size([1, 3, 4, 12, 10, 2]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: dict[str, Any],
        infer_config: InferConfig,
        device: Union[str, torch.device, None] = None,
        amp: bool = True,
        *,
        time_window: Union[int, None, Literal["auto"]] = "auto",
        amp_on_cpu: Optional[bool] = None,
        progress: bool = False,
        pass_voxel_budget: int = DEFAULT_PASS_VOXEL_BUDGET,
        stream_voxel_budget: int = DEFAULT_STREAM_VOXEL_BUDGET,
    ):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # the bare module: a DDP forward on one rank would wait for the others
        try:
            model_device = next(model.parameters()).device
        except StopIteration:
            model_device = torch.device("cpu")
        self.device = resolve_device(device, model_device)
        self.model = model.to(self.device)
        self.config = infer_config
        self.classes = list(preprocessing["classes"])
        self.num_classes = len(self.classes)
        self.in_channels = int(getattr(model, "in_channels", 1))
        out_channels = getattr(model, "out_channels", self.num_classes)
        if out_channels != self.num_classes:
            raise ValueError(f"model has {out_channels} output channels but preprocessing names {self.num_classes} classes")
        patch = tuple(int(p) for p in preprocessing["patch_size"])
        fit_size = getattr(model, "fit_size", None)
        self.roi_size: tuple[int, int, int] = tuple(fit_size(patch)) if fit_size is not None else patch  # type: ignore[assignment]
        self.train_window = int(preprocessing.get("time_window") or 1)
        self.causal = bool(getattr(model, "causal", not getattr(model, "bidirectional", False)))
        if time_window not in ("auto", None) and (not isinstance(time_window, int) or time_window < 0):
            raise ValueError(f"time_window must be 'auto', None or a non-negative int, got {time_window!r}")
        self.time_window = time_window
        self.pass_voxel_budget = int(pass_voxel_budget)
        self.stream_voxel_budget = int(stream_voxel_budget)
        self.streaming = self.causal and callable(getattr(model, "forward_streaming", None))
        self.amp = amp
        if amp_on_cpu is None:
            amp_on_cpu = infer_config.cpu_bf16
        self.amp_on_cpu = cpu_has_fast_bf16() if amp_on_cpu is None else bool(amp_on_cpu)
        self.progress = progress
        self._bar: Optional[tqdm] = None

    # -- planning ---------------------------------------------------------------------------------
    def frames_per_pass(self, num_frames: int) -> Optional[int]:
        """Frames per pass ``W`` for a series of ``num_frames`` frames (``None`` = one pass): the time window,
        or for a streaming model the chunk."""
        if self.time_window == "auto":
            per_frame = math.prod(self.roi_size) * self.config.sw_batch_size
            budget = self.stream_voxel_budget if self.streaming else self.pass_voxel_budget
            if num_frames * per_frame <= budget:
                return None
            if self.streaming:
                return max(budget // per_frame, 1)
            return max(self.train_window, budget // per_frame, 1)
        return self.time_window or None

    def stitch_device(self, num_frames: int, spatial_size: Sequence[int]) -> torch.device:
        """CPU when the stitched output ``(T*K, X, Y, Z)`` exceeds ``cpu_stitch_voxels`` elements, else :attr:`device`."""
        voxels = num_frames * self.num_classes * math.prod(int(s) for s in spatial_size)
        return torch.device("cpu") if voxels > self.config.cpu_stitch_voxels else self.device

    def _num_spatial_windows(self, spatial_size: Sequence[int]) -> int:
        """How many windows MONAI's sliding window visits (same interval rule as ``sliding_window_inference``)."""
        size = [max(int(s), r) for s, r in zip(spatial_size, self.roi_size)]
        interval = [r if r == s else max(1, int(r * (1 - self.config.overlap))) for s, r in zip(size, self.roi_size)]
        return len(dense_patch_slices(size, self.roi_size, interval))

    def _autocast(self) -> contextlib.AbstractContextManager:
        dev = self.device.type
        enabled = self.amp if dev == "cuda" else self.amp_on_cpu if dev == "cpu" else False
        return autocast(self.device, autocast_dtype(self.device, enabled))

    # -- the model on one batch of windows ----------------------------------------------------------
    def _window_forward(self, windows: Tensor) -> Tensor:
        """``(n, T*C, x, y, z)`` windows -> probabilities ``(n, T*K, x, y, z)`` (float32; TTA-averaged)."""
        n, folded = windows.shape[:2]
        frames = folded // self.in_channels
        x = windows.view(n, frames, self.in_channels, *windows.shape[2:])
        flips = _INPLANE_FLIPS if self.config.tta else ((),)
        total: Optional[Tensor] = None
        for dims in flips:
            logits = self._logits(x.flip(dims) if dims else x)
            probs = torch.softmax(logits.float(), dim=2)
            if dims:
                probs = probs.flip(dims)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        if len(flips) > 1:
            total /= len(flips)
        if self._bar is not None:
            self._bar.update(n)
        return total.reshape(n, frames * self.num_classes, *total.shape[3:])

    def _logits(self, x: Tensor) -> Tensor:
        """Logits ``(n, T, K, x, y, z)`` of windows ``(n, T, C, x, y, z)``: one pass, or streamed in chunks."""
        chunk = self.frames_per_pass(x.shape[1]) if self.streaming else None
        if not chunk or chunk >= x.shape[1]:
            with self._autocast():
                logits = self.model(x)
            return logits[0] if isinstance(logits, (list, tuple)) else logits  # deep supervision: full res first
        parts, state = [], None
        for start in range(0, x.shape[1], chunk):
            with self._autocast():
                logits, state = self.model.forward_streaming(x[:, start : start + chunk], state)
            parts.append(logits)
        return torch.cat(parts, dim=1)

    # -- one case -----------------------------------------------------------------------------------
    def predict_case(self, image: Tensor, description: Optional[str] = None) -> Tensor:
        """Softmax probabilities of one preprocessed cine.

        Args:
            image: ``(1, T, X, Y, Z)`` or ``(T, X, Y, Z)`` (C = 1), or ``(1, T, C, X, Y, Z)``; a MetaTensor
                is fine (its metadata is not used). Any spatial size: windows are padded at the border.
            description: label of the progress bar (e.g. the case id).

        Returns:
            float32 probabilities ``(1, T, K, X, Y, Z)`` summing to 1 over ``K``, on :attr:`device`, or on the
            CPU when stitched there (see :meth:`stitch_device`). Gradients are off.
        """
        x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        if x.dim() == 4:
            x = x.unsqueeze(0)
        if x.dim() == 5:
            x = x.unsqueeze(2)
        if x.dim() != 6 or x.shape[0] != 1:
            raise DataError(
                None,
                f"predict_case expects one preprocessed cine (1, T, X, Y, Z) or (1, T, C, X, Y, Z), got shape {tuple(image.shape)}",
            )
        frames, channels = x.shape[1], x.shape[2]
        if channels != self.in_channels:
            raise DataError(
                None, f"the model expects {self.in_channels} image channel(s) per frame, the input has {channels}"
            )
        before, after = self.cyclic_padding(frames)
        if before or after:
            x = torch.cat([x[:, frames - before :], x, x[:, :after]], dim=1)
        out = self._predict_series(x, description)
        return out[:, before : before + frames] if before or after else out

    def cyclic_padding(self, num_frames: int) -> tuple[int, int]:
        """Frames wrapped in front of and after a series of ``num_frames`` frames (see the module docstring)."""
        if not self.config.cyclic or num_frames < 2:
            return 0, 0
        k = min(self.train_window, num_frames - 1)
        return k, (0 if self.causal else k)

    def _predict_series(self, x: Tensor, description: Optional[str]) -> Tensor:
        """Probabilities ``(1, T, K, X, Y, Z)`` of a checked input ``(1, T, C, X, Y, Z)``, as the series is."""
        frames, channels, spatial = x.shape[1], x.shape[2], tuple(x.shape[3:])
        stitch = self.stitch_device(frames, spatial)
        x = x.to(device=stitch if stitch.type == "cpu" else self.device, dtype=torch.float32)
        # a streaming model gets the whole series per spatial window and chunks it itself (_logits)
        window = None if self.streaming else self.frames_per_pass(frames)
        windows = time_windows(frames, window, self.config.time_overlap, self.causal)
        inferer = SlidingWindowInferer(
            roi_size=self.roi_size,
            sw_batch_size=self.config.sw_batch_size,
            overlap=self.config.overlap,
            mode="gaussian",
            sw_device=self.device,
            device=stitch,
        )
        was_training = self.model.training
        self.model.eval()
        total_windows = len(windows) * self._num_spatial_windows(spatial)
        self._bar = tqdm(total=total_windows, desc=description or "case", unit="window", leave=False) if self.progress else None
        try:
            with torch.no_grad():  # not inference_mode: callers may modify the result in place
                out: Optional[Tensor] = None
                weight_sum: Optional[Tensor] = None
                for tw in windows:
                    part = x[:, tw.start : tw.stop].reshape(1, (tw.stop - tw.start) * channels, *spatial)
                    probs = inferer(part, self._window_forward)
                    probs = probs.view(1, tw.stop - tw.start, self.num_classes, *spatial)
                    if len(windows) == 1:
                        out = probs
                        break
                    if out is None:
                        out = torch.zeros(1, frames, self.num_classes, *spatial, device=stitch)
                        weight_sum = torch.zeros(frames, device=stitch)
                    w = tw.weights.to(stitch)
                    out[:, tw.start : tw.stop] += probs * w.view(1, -1, 1, 1, 1, 1)
                    weight_sum[tw.start : tw.stop] += w  # type: ignore[index]
                assert out is not None
                if weight_sum is not None:
                    out /= weight_sum.view(1, -1, 1, 1, 1, 1)
        finally:
            self.model.train(was_training)
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        return out.as_tensor() if hasattr(out, "as_tensor") else out
