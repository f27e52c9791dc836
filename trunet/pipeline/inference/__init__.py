"""Inference, the stage after training: whole cine cases through a trained time-resolved UNet, and
``trunet predict`` on files.

Modules: :mod:`~trunet.pipeline.inference.predictor` (:class:`Predictor`, tensors in, probabilities out),
:mod:`~trunet.pipeline.inference.windows` (time windows), :mod:`~trunet.pipeline.inference.frame_repair`
(spoilt frames found and interpolated over time), :mod:`~trunet.pipeline.inference.postprocess`
(arg-max, largest component, atrial basal slices) and :mod:`~trunet.pipeline.inference.run` (files:
:func:`run_prediction`).

Two layers:

* :class:`Predictor` works on tensors. ``predict_case(image)`` takes one preprocessed cine
  ``(1, T, X, Y, Z)`` and returns softmax probabilities ``(1, T, K, X, Y, Z)``. Validation during training
  calls it too.
* :func:`run_prediction` works on files: it loads a checkpoint, finds the input scans, preprocesses each
  with the checkpoint's inference transforms, predicts, repairs spoilt frames (``infer.repair_frames``:
  frames whose segmentation breaks from their neighbours are interpolated from clean ones,
  :mod:`trunet.pipeline.inference.frame_repair`), maps the probabilities back onto the scan's own
  grid (MONAI ``Invertd``), takes the arg-max, optionally keeps the largest component per class and frame,
  relabels basal LV cavity that myocardium does not enclose as background (``infer.exclude_atrium``, the
  SCMR basal-slice rule; :mod:`trunet.pipeline.inference.postprocess`), and writes
  ``<case_id>_seg.nii.gz`` atomically.

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

*Time, causal model* (the default architecture): the series is *streamed*. Each spatial window's frames go
through the network in consecutive chunks of ``time_window`` frames (``"auto"``: as many as fit in
``stream_voxel_budget`` voxel-frames, 2 Mi by default), the ConvLSTM state ``(h, c)`` of every level carried
from one chunk into the next (:meth:`~trunet.models.TimeResolvedUNet.forward_streaming`). That is the one-pass
result to float rounding, computes every frame once, and holds one chunk's activations whatever the length
of the cine.

*Time, bidirectional model*: the backward direction needs the frames after a chunk, so by default
(``time_window="auto"``) the whole series goes through in one pass whenever one pass stays within ``pass_voxel_budget`` voxel-frames
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
* a causal model that cannot stream (any module without ``forward_streaming``): the outputs of those
  shared frames are discarded (weight 0), since the previous window saw them with more history; so every
  frame is predicted by exactly one window, the one in which it has the longest past;
* bidirectional model: the shared frames are blended linearly, weight ``(i + 1) / (o + 1)`` rising over the
  ``o`` shared frames at a window's head and falling at the previous window's tail (summing to one),
  because both ends of a window lack context there.

A series that fits in one window (``T <= W``) goes through in a single pass, exactly as with
``time_window=None``.

*The cycle* (``infer.cyclic``, off by default; part of the time recipe in BENCHMARKS.md): a cine is one
heartbeat, so the frame after the last is the first. Before the passes above, the series is wrapped: the
last ``k`` frames are put in front of frame 0 (``k`` = the training window, at most ``T - 1``), and for a
bidirectional model the first ``k`` frames after the last, and only the original ``T`` frames are returned.
End-diastole (frame 0 in ACDC) then has a past, and the last frames a future, as every other frame has.
Leave it off for a series that is not one whole cycle.

*Precision*: on CUDA the forward pass runs under autocast (bf16 where supported). On the CPU it runs under
bf16 autocast exactly where the CPU has bf16 instructions (AVX512-BF16 or AMX), where oneDNN's bf16
convolutions are faster than float32; elsewhere in float32 (``infer.cpu_bf16`` / ``trunet predict
--cpu-precision`` choose). Probabilities are blended in float32.

Mirroring TTA (``infer.tta``) averages the probabilities of the four in-plane mirrorings (none, x, y, xy)
inside each window, as nnU-Net does; the slice axis is not mirrored (apex and base differ).
"""

from __future__ import annotations

from trunet.pipeline.inference.postprocess import keep_largest_components, probabilities_to_labels
from trunet.pipeline.inference.predictor import DEFAULT_PASS_VOXEL_BUDGET, Predictor
from trunet.pipeline.inference.run import InputCase, find_inputs, run_prediction
from trunet.pipeline.inference.windows import TimeWindow, time_windows

__all__ = [
    "Predictor",
    "TimeWindow",
    "time_windows",
    "InputCase",
    "find_inputs",
    "run_prediction",
    "keep_largest_components",
    "probabilities_to_labels",
    "DEFAULT_PASS_VOXEL_BUDGET",
]
