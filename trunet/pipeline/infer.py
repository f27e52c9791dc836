"""Inference: whole cine cases through a trained time-resolved UNet, and ``trunet predict`` on files.

Two layers:

* :class:`Predictor` works on tensors. ``predict_case(image)`` takes one preprocessed cine
  ``(1, T, X, Y, Z)`` and returns softmax probabilities ``(1, T, K, X, Y, Z)``. Validation during training
  calls it too.
* :func:`run_prediction` works on files: it loads a checkpoint, finds the input scans, preprocesses each
  with the checkpoint's inference transforms, predicts, maps the probabilities back onto the scan's own
  grid (MONAI ``Invertd``), takes the arg-max, optionally keeps the largest component per class and frame
  (:mod:`trunet.pipeline.postprocess`), and writes ``<case_id>_seg.nii.gz`` atomically.

Space and time
--------------
*Space*: MONAI's :class:`~monai.inferers.SlidingWindowInferer` with Gaussian blending slides a window of the
training patch size over ``(X, Y, Z)``. The frames of a time window ride along as the channels of the
window: the inferer sees ``(1, T*C, X, Y, Z)`` and a small wrapper unfolds each window batch to
``(n, T, C, x, y, z)``, runs the model, takes the softmax over classes and refolds ``(n, T*K, x, y, z)``.
So every frame of a time window goes through the ConvLSTMs together, and all frames share one geometry.
Probabilities (not logits) are blended, so overlapping windows and time windows mix on the same scale.
The stitched output lives on the CPU when it would exceed ``infer.cpu_stitch_voxels`` elements
(``T * K * X * Y * Z``), so accelerator memory depends on the patch, not on the scan.

*Time*: the ConvLSTM runs on any number of frames, so by default (``time_window="auto"``) the whole series
goes through in one pass whenever one pass stays within ``pass_voxel_budget`` voxel-frames
(``T * patch voxels * sw_batch_size``), a proxy for the activation memory of a pass, which grows linearly
with ``T`` (about 1.2 kB per voxel-frame for the default model in float32, half that in bf16): the default
8 Mi voxel-frames, ~10 GB, is 40 frames of a 160 x 160 x 8 patch or 15 of the 256 x 208 x 10 patch of
``configs/default.yaml``.
One pass is the best choice for accuracy: every frame sees the whole past of the cycle (and its future for
a bidirectional model), and there are no seams. Only a longer series (or an explicit ``time_window=W``) is
cut into overlapping **time windows** of ``W`` frames (``W`` = the largest window within the budget, at
least the training window), consecutive windows sharing ``c = infer.time_overlap`` frames:

* the fewest windows such that consecutive ones share at least ``c`` frames, spread evenly from frame 0
  to frame ``T`` (so the spare frames become extra shared context rather than a last window that
  repeats most of the one before);
* each window after the first is *warm-started*: the frames it shares with the previous window are
  context that its recurrent state runs through before the frames it is trusted on;
* causal (unidirectional) model: the outputs of those shared frames are discarded (weight 0), since the
  previous window saw them with more history; so every frame is predicted by exactly one window, the one
  in which it has the longest past;
* bidirectional model: the shared frames are blended linearly, weight ``(i + 1) / (o + 1)`` rising over the
  ``o`` shared frames at a window's head and falling at the previous window's tail (summing to one),
  because both ends of a window lack context there.

A series that fits in one window (``T <= W``) goes through in a single pass, exactly as with
``time_window=None``.

*The cycle* (``infer.cyclic``, on by default): a cine is one heartbeat, so the frame after the last is the
first. Before the passes above, the series is wrapped: the last ``k`` frames are put in front of frame 0
(``k`` = the training window, at most ``T - 1``), and for a bidirectional model the first ``k`` frames after
the last, and only the original ``T`` frames are returned. End-diastole (frame 0 in ACDC) then has a past,
and the last frames a future, as every other frame has. Turn it off for a series that is not one cycle.

Mirroring TTA (``infer.tta``) averages the probabilities of the four in-plane mirrorings (none, x, y, xy)
inside each window, as nnU-Net does; the slice axis is not mirrored (apex and base differ).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from torch import Tensor, nn
from tqdm.auto import tqdm

from trunet.errors import CheckpointError, ConfigError, DataError, TrunetError
from trunet.pipeline.checkpoint import build_model, load_checkpoint
from trunet.config import InferConfig
from trunet.pipeline.data import read_datalist, unwrap_data_errors
from trunet.pipeline.postprocess import keep_largest_components, probabilities_to_labels
from trunet.transforms.compose import inference_transforms, invert_prediction
from trunet.io import case_id_from_path
from trunet.io import is_image_path, read_header, save_cine_like, strip_image_suffix

__all__ = [
    "Predictor",
    "TimeWindow",
    "time_windows",
    "InputCase",
    "find_inputs",
    "run_prediction",
    "DEFAULT_PASS_VOXEL_BUDGET",
]

logger = logging.getLogger(__name__)

DEFAULT_PASS_VOXEL_BUDGET = 8 * 2**20
"""Voxel-frames one forward pass may hold (``T * patch voxels * sw_batch_size``) before ``time_window="auto"``
cuts the series into time windows: 40 frames of a 160 x 160 x 8 patch, ~10 GB of activations for the default
model in float32 (BENCHMARKS.md, Inference)."""

_INPLANE_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (4,), (3, 4))  # dims of (n, T, C, X, Y, Z)


@dataclass(frozen=True)
class TimeWindow:
    """Frames ``start:stop`` of a series go through the model together; ``weights`` ``(stop - start,)``
    say how much each frame's output counts when windows are blended (0 = context only)."""

    start: int
    stop: int
    weights: Tensor


def time_windows(num_frames: int, window: Optional[int], context: int, causal: bool = True) -> list[TimeWindow]:
    """Cut ``num_frames`` frames into overlapping time windows (scheme in the module docstring).

    Args:
        num_frames: ``T``.
        window: frames per window ``W``; ``None`` or ``0`` = the whole series in one window.
        context: frames shared by consecutive windows ``c`` (clipped to ``W - 1``).
        causal: the model's output at frame ``t`` depends on frames ``<= t`` only.

    Returns:
        Windows in time order whose nonzero weights cover every frame.
    """
    if num_frames < 1:
        raise ValueError(f"a series needs at least one frame, got {num_frames}")
    if not window or window >= num_frames:
        return [TimeWindow(0, num_frames, torch.ones(num_frames))]
    if window < 1:
        raise ValueError(f"time window must be positive or None, got {window}")
    context = max(0, min(int(context), window - 1))
    count = math.ceil((num_frames - window) / (window - context)) + 1  # fewest windows sharing >= c frames
    starts = [round(k * (num_frames - window) / (count - 1)) for k in range(count)]  # spread evenly
    out = []
    for k, start in enumerate(starts):
        weights = torch.ones(window)
        head = starts[k - 1] + window - start if k > 0 else 0  # frames shared with the previous window
        tail = start + window - starts[k + 1] if k + 1 < len(starts) else 0  # ... with the next one
        if causal:
            weights[:head] = 0.0  # warm-up: the previous window saw these frames with more history
        else:
            if head:
                weights[:head] = torch.arange(1, head + 1, dtype=torch.float32) / (head + 1)
            if tail:
                weights[-tail:] = torch.minimum(weights[-tail:], torch.arange(tail, 0, -1, dtype=torch.float32) / (tail + 1))
        out.append(TimeWindow(start, start + window, weights))
    return out


def _resolve_device(device: Union[str, torch.device, None], fallback: torch.device) -> torch.device:
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
        time_window: ``"auto"`` (whole series when within ``pass_voxel_budget``), ``None``/``0`` (always the
            whole series) or an int ``W`` (time windows of ``W`` frames).
        amp_on_cpu: also autocast on the CPU (bf16; fast only on CPUs with bf16 instructions).
        progress: show a tqdm bar per case (windows done).
        pass_voxel_budget: see ``time_window="auto"``.
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
        amp_on_cpu: bool = False,
        progress: bool = False,
        pass_voxel_budget: int = DEFAULT_PASS_VOXEL_BUDGET,
    ):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # the bare module: a DDP forward on one rank would wait for the others
        try:
            model_device = next(model.parameters()).device
        except StopIteration:
            model_device = torch.device("cpu")
        self.device = _resolve_device(device, model_device)
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
        self.amp = amp
        self.amp_on_cpu = amp_on_cpu
        self.progress = progress
        self._bar: Optional[tqdm] = None

    # -- planning ---------------------------------------------------------------------------------
    def frames_per_pass(self, num_frames: int) -> Optional[int]:
        """The time window ``W`` used for a series of ``num_frames`` frames (``None`` = one pass)."""
        if self.time_window == "auto":
            per_frame = math.prod(self.roi_size) * self.config.sw_batch_size
            if num_frames * per_frame <= self.pass_voxel_budget:
                return None
            return max(self.train_window, self.pass_voxel_budget // per_frame, 1)
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
        if dev == "cuda" and self.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        if dev == "cpu" and self.amp_on_cpu:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the model on one batch of windows ----------------------------------------------------------
    def _window_forward(self, windows: Tensor) -> Tensor:
        """``(n, T*C, x, y, z)`` windows -> probabilities ``(n, T*K, x, y, z)`` (float32; TTA-averaged)."""
        n, folded = windows.shape[:2]
        frames = folded // self.in_channels
        x = windows.view(n, frames, self.in_channels, *windows.shape[2:])
        flips = _INPLANE_FLIPS if self.config.tta else ((),)
        total: Optional[Tensor] = None
        for dims in flips:
            with self._autocast():
                logits = self.model(x.flip(dims) if dims else x)
            if isinstance(logits, (list, tuple)):  # deep supervision: full resolution first
                logits = logits[0]
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
        windows = time_windows(frames, self.frames_per_pass(frames), self.config.time_overlap, self.causal)
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


# ----------------------------------------------------------------------------------------------------------
# Files: ``trunet predict``
# ----------------------------------------------------------------------------------------------------------

_SKIP_NAME = re.compile(r"(_gt|_seg|_prob(_.*)?|_frame\d+)$", re.IGNORECASE)
"""Names (without suffixes) a folder search never takes as input: labels, predictions, per-frame files."""


@dataclass(frozen=True)
class InputCase:
    """One scan to segment: ``image`` is a file (or a per-frame folder named in a datalist)."""

    case_id: str
    image: Path


def _datalist_cases(path: Path) -> list[InputCase]:
    """The datalist's ``test`` list, or every list when it has none (parsed by :func:`read_datalist`)."""
    lists = read_datalist(path)
    records = lists.test or lists.all()
    return [InputCase(str(record["case_id"]), Path(record["image"])) for record in records]


def _folder_cases(folder: Path, output_dir: Path, allow_3d: bool) -> list[InputCase]:
    cases, skipped_3d = [], 0
    out = output_dir.resolve()
    for path in sorted(folder.rglob("*"), key=lambda p: str(p)):
        if not path.is_file() or not is_image_path(path) or path.name.startswith("."):
            continue
        if _SKIP_NAME.search(strip_image_suffix(path.name)) or out in path.resolve().parents:
            continue
        if not allow_3d and read_header(path).ndim == 3:
            skipped_3d += 1
            continue
        cases.append(InputCase(case_id_from_path(path), path))
    if not cases:
        detail = f" ({skipped_3d} 3D files skipped: a cine is (x, y, z, t))" if skipped_3d else ""
        raise DataError(
            folder, "no input images found (4D .nii.gz, .nii, .mha, .mhd or .nrrd, not named *_gt, *_seg, "
            f"*_prob* or *_frameNN){detail}"
        )
    if skipped_3d:
        logger.info("%s: skipped %d 3D files (per-frame images are not cines)", folder, skipped_3d)
    return cases


def find_inputs(inputs: Union[str, os.PathLike], output_dir: Union[str, os.PathLike], allow_3d: bool = False) -> list[InputCase]:
    """The scans ``trunet predict`` segments.

    Args:
        inputs: one image file (4D; a 3D file only with ``allow_3d``); a folder, searched recursively for
            image files (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) except hidden files,
            labels and earlier outputs (names ending ``_gt``, ``_seg``, ``_prob...``), ACDC per-frame files
            (``_frameNN``), 3D images (unless ``allow_3d``) and anything under ``output_dir``; or a datalist
            JSON: its ``test`` list, or every list when that is empty or missing (items are
            ``{"image": ..., "case_id": ...}`` or bare paths, relative to the JSON's folder).
        output_dir: where predictions go (excluded from a folder search).

    Returns:
        Cases with ids: a datalist's ``case_id``, else the file name without suffixes and a trailing ``_4d``.

    Raises:
        DataError: the input does not exist, no images found, or two inputs share a case id.
    """
    path = Path(inputs)
    if not path.exists():
        raise DataError(path, "input not found")
    if path.is_dir():
        cases = _folder_cases(path, Path(output_dir), allow_3d)
    elif path.name.lower().endswith(".json"):
        cases = _datalist_cases(path)
        if not cases:
            raise DataError(path, "the datalist lists no images")
    else:
        cases = [InputCase(case_id_from_path(path), path)]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(case.image, f"case id '{case.case_id}' is also the id of {seen[case.case_id]}; outputs would collide")
        seen[case.case_id] = case.image
    return cases


def _output_paths(case: InputCase, output_dir: Path, classes: Sequence[str], probabilities: bool) -> list[Path]:
    paths = [output_dir / f"{case.case_id}_seg.nii.gz"]
    if probabilities:
        for k, name in enumerate(classes):
            safe = re.sub(r"[^A-Za-z0-9-]+", "-", str(name)).strip("-") or f"class{k}"
            paths.append(output_dir / f"{case.case_id}_prob_{k}_{safe}.nii.gz")
    return paths


def _check_outputs(cases: Sequence[InputCase], output_dir: Path, classes: Sequence[str], probabilities: bool) -> None:
    """Refuse to write over an input, or over an existing file that sits in an input's folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(output_dir, "output must be a folder, this is a file")
    inputs = {c.image.resolve() for c in cases}
    input_dirs = {c.image.resolve().parent for c in cases}
    out = output_dir.resolve()
    for case in cases:
        for target in _output_paths(case, output_dir, classes, probabilities):
            if target.resolve() in inputs:
                raise DataError(target, "is an input image; choose another --output folder")
            if target.exists() and out in input_dirs:
                raise DataError(
                    target, "exists in the input folder and could be an input or a reference; choose another --output folder"
                )


def _check_checkpoint(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    preprocessing = payload.get("preprocessing")
    if not isinstance(preprocessing, dict):
        raise CheckpointError(f"{path}: checkpoint has no preprocessing settings; it cannot be used for prediction")
    missing = [k for k in ("patch_size", "time_window", "classes") if k not in preprocessing]
    if missing:
        raise CheckpointError(f"{path}: checkpoint preprocessing lacks {', '.join(missing)}")
    if list(preprocessing["classes"]) != list(payload["classes"]):
        raise CheckpointError(
            f"{path}: inconsistent checkpoint: preprocessing classes {list(preprocessing['classes'])} differ from "
            f"the model's {list(payload['classes'])}"
        )
    if payload["model_hparams"].get("in_channels", 1) != 1:
        raise CheckpointError(
            f"{path}: the model takes {payload['model_hparams']['in_channels']} channels per frame; cine MRI has 1"
        )
    return preprocessing


def _infer_config(payload: dict[str, Any], path: Path, **overrides: Any) -> InferConfig:
    from trunet.config import config_from_dict

    saved = (payload.get("config") or {}).get("infer") or {}
    try:
        config = config_from_dict({"infer": saved}, source=f"{path} (infer settings)").infer
    except TrunetError as exc:
        raise CheckpointError(str(exc)) from None
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if not 0.0 <= config.overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {config.overlap}")
    if config.sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be at least 1, got {config.sw_batch_size}")
    return config


def _predict_one(
    case: InputCase,
    predictor: Predictor,
    transforms: Any,
    output_dir: Path,
    postprocess: bool,
    save_probabilities: bool,
) -> list[Path]:
    header = read_header(case.image)
    with unwrap_data_errors():  # MONAI's Compose wraps a DataError (NaN, truncated file) in a RuntimeError
        data = transforms({"image": str(case.image), "case_id": case.case_id})
    image = data["image"]
    if image.dim() != 4:
        raise DataError(case.image, f"preprocessed image has shape {tuple(image.shape)}; expected (T, X, Y, Z)")
    frames, num_classes = image.shape[0], predictor.num_classes
    probs = predictor.predict_case(image, description=case.case_id)[0].cpu()  # (T, K, x, y, z)
    # back onto the scan's grid: probabilities are resampled (linear), then the arg-max is taken there
    folded = probs.reshape(frames * num_classes, *probs.shape[2:])
    del probs
    inverted = invert_prediction(transforms, image, folded, nearest=False)
    inverted = inverted.as_tensor() if hasattr(inverted, "as_tensor") else torch.as_tensor(inverted)
    inverted = inverted.reshape(frames, num_classes, *inverted.shape[1:])
    if tuple(inverted.shape[2:]) != header.spatial_shape or frames != header.n_frames:
        raise RuntimeError(  # a bug in the transform chain, not a user error
            f"{case.image}: inverted prediction {tuple(inverted.shape)} does not match the scan "
            f"(T={header.n_frames}, {header.spatial_shape})"
        )
    labels = probabilities_to_labels(inverted)
    if postprocess:
        labels = keep_largest_components(labels, classes=range(1, num_classes))
    targets = _output_paths(case, output_dir, predictor.classes, save_probabilities)
    written = [save_cine_like(labels, case.image, targets[0], dtype=np.uint8)]
    for k, target in enumerate(targets[1:]):
        written.append(save_cine_like(inverted[:, k].numpy(), case.image, target, dtype=np.float32))
    return written


def run_prediction(
    checkpoint: Union[str, os.PathLike],
    inputs: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    device: Union[str, torch.device, None] = None,
    overlap: Optional[float] = None,
    sw_batch_size: Optional[int] = None,
    tta: Optional[bool] = None,
    postprocess: Optional[bool] = None,
    save_probabilities: bool = False,
) -> list[Path]:
    """Segment every frame of the input scans with a checkpoint (``trunet predict``).

    Everything about the data (target spacing, normalisation, patch, time window, classes) comes from the
    checkpoint; ``overlap``, ``sw_batch_size``, ``tta`` and ``postprocess`` override its ``infer`` settings
    when not ``None``.

    Args:
        checkpoint: a ``.pt`` written by training (``RUN/checkpoints/best.pt``).
        inputs: a 4D image file, a folder of them or a datalist JSON (see :func:`find_inputs`).
        output_dir: created if missing. For each case ``<case_id>_seg.nii.gz``: uint8 labels ``(x, y, z, t)``
            on the scan's exact grid (shape, affine, header, time step). With ``save_probabilities`` also
            ``<case_id>_prob_<k>_<class>.nii.gz`` per class ``k``: float32 softmax probabilities
            ``(x, y, z, t)`` on the same grid (NIfTI-1 has no float16; one 4D file per class opens in any
            viewer, a 5D file would not).
        device: ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available.
        tta: mirroring test-time augmentation.
        postprocess: keep the largest component per class and frame.

    Returns:
        The written files, in case order. Each file is written atomically; nothing is written over an input.

    Raises:
        CheckpointError: missing, corrupt or incompatible checkpoint.
        DataError: no inputs, unreadable input, wrong dimensionality, an output that would overwrite an input.
    """
    ckpt = Path(checkpoint)
    payload = load_checkpoint(ckpt)
    preprocessing = _check_checkpoint(payload, ckpt)
    config = _infer_config(payload, ckpt, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, postprocess=postprocess)
    allow_3d = bool(preprocessing.get("allow_3d", False))
    out_dir = Path(output_dir)
    cases = find_inputs(inputs, out_dir, allow_3d=allow_3d)
    classes = list(preprocessing["classes"])
    _check_outputs(cases, out_dir, classes, save_probabilities)
    for case in cases:
        meta = read_header(case.image)
        if meta.ndim == 3 and not allow_3d:
            raise DataError(case.image, f"is a 3D image {meta.spatial_shape}; a cine (x, y, z, t) is expected")

    model = build_model(payload)
    dev = _resolve_device(device, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    predictor = Predictor(model, preprocessing, config, device=dev, progress=True)
    transforms = inference_transforms(preprocessing)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for case in cases:
        start = time.perf_counter()
        files = _predict_one(case, predictor, transforms, out_dir, config.postprocess, save_probabilities)
        meta = read_header(case.image)
        logger.info(
            "%s: %s x %d frames, %.1f s on %s%s -> %s",
            case.case_id, "x".join(str(s) for s in meta.spatial_shape), meta.n_frames, time.perf_counter() - start,
            dev, " (TTA)" if config.tta else "", files[0],
        )
        written.extend(files)
    return written
