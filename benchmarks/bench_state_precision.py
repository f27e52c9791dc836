"""Drift of the ConvLSTM state under autocast: how far a low-precision run wanders from float32 over a cine.

The cell state ``c`` is carried from frame to frame; kept in bf16 (8 bits of mantissa) its rounding errors
compound over the frames of a cine. trunet keeps ``c`` and the gate arithmetic in float32 while the
convolutions run in bf16 (:attr:`trunet.models.clstm.ConvLSTMCell.state_dtype`). This script measures both
forms against a float32 run of the same trained model on the same cine:

* the relative error of the carried cell state ``c`` of every ConvLSTM level after the last frame
  (``forward_streaming``'s state; causal models), and
* per frame: the largest absolute difference of the softmax probabilities and the fraction of voxels whose
  arg-max label differs from float32's, reported at a few frames along the series.

The cine: a phantom case preprocessed as inference does (target spacing, z-score), centre-cropped to the
checkpoint's patch and repeated cyclically to ``--frames`` frames (a cine is one heartbeat, so repeating it
is a longer acquisition of the same heart).

Usage::

    python benchmarks/bench_state_precision.py --checkpoint RUN/checkpoints/best.pt --frames 30
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name

from trunet.data.phantom import write_phantom_dataset
from trunet.models.clstm import ConvLSTMCell
from trunet.pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from trunet.transforms.compose import inference_transforms


def cine(preprocessing: dict, frames: int, folder: Path) -> torch.Tensor:
    """One phantom cine preprocessed for the model, ``(1, frames, 1, X, Y, Z)`` at the checkpoint's patch."""
    write_phantom_dataset(folder, cases=1, seed=11)
    image_path = next(folder.rglob("*_4d.nii.gz"))
    image = inference_transforms(preprocessing)({"image": str(image_path), "case_id": "x"})["image"]
    image = torch.as_tensor(np.asarray(image), dtype=torch.float32)  # (T, X, Y, Z)
    patch = preprocessing["patch_size"]
    pad = [max(0, p - s) for p, s in zip(patch, image.shape[1:])]
    image = torch.nn.functional.pad(image, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
    starts = [(s - p) // 2 for s, p in zip(image.shape[1:], patch)]
    image = image[:, starts[0]:starts[0] + patch[0], starts[1]:starts[1] + patch[1], starts[2]:starts[2] + patch[2]]
    index = torch.arange(frames) % image.shape[0]
    return image[index][None, :, None]


def run(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, dict]:
    """Probabilities ``(T, K, X, Y, Z)`` float32 and the final state per level, from one streamed pass."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits, state = model.forward_streaming(x)
    return torch.softmax(logits.float(), dim=2)[0], state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a causal trunet checkpoint")
    parser.add_argument("--frames", type=int, default=30)
    args = parser.parse_args(argv)
    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload).eval()
    if getattr(model, "bidirectional", False):
        parser.error("the carried state is measured on a causal model (streaming); this one is bidirectional")
    with tempfile.TemporaryDirectory() as tmp:
        x = cine(payload["preprocessing"], args.frames, Path(tmp))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.platform()}")
    print(f"date: {_dt.datetime.now():%Y-%m-%d %H:%M}; cine {tuple(x.shape)}")
    ref_p, ref_s = run(model, x, None)
    marks = sorted({0, 4, 9, 19, args.frames - 1} & set(range(args.frames)))
    print("\n| cell state and gates | level: rel. error of c after the last frame | "
          + " | ".join(f"frame {t + 1}: max abs prob diff / labels differing" for t in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for name, state_dtype in (("bf16 (before)", None), ("float32 (now)", torch.float32)):
        ConvLSTMCell.state_dtype = state_dtype
        try:
            p, s = run(model, x, torch.bfloat16)
        finally:
            ConvLSTMCell.state_dtype = torch.float32
        errs = ", ".join(f"{lvl}: {float((s[lvl][1].float() - ref_s[lvl][1]).norm() / ref_s[lvl][1].norm()):.1e}"
                         for lvl in ref_s)
        cells = []
        for t in marks:
            dp = float((p[t] - ref_p[t]).abs().max())
            flips = float((p[t].argmax(0) != ref_p[t].argmax(0)).float().mean())
            cells.append(f"{dp:.3f} / {100 * flips:.2f}%")
        print(f"| {name} | {errs} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
