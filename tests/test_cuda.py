"""The GPU path, device by device (``@pytest.mark.cuda``: skipped without CUDA; ``make gpu-check`` runs them).

Each test calls the check of ``benchmarks/gpu_check.py`` that prints the same figure in its table, at the
full sizes (the ``configs/default.yaml`` model on a 2 x 4 x 64 x 64 x 10 phantom batch); the CPU runs those
functions at tiny sizes in ``tests/test_gpu_check.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.cuda

DEVICES = ["cuda"]
"""Accelerators the checks run on; the reference is always the CPU."""
SIZES = gpu_check.FULL


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return gpu_check.phantom_batch(SIZES)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_backward_equals_cpu(device, batch):
    d = gpu_check.forward_backward_difference(gpu_check.arch_config(SIZES), torch.device(device), batch)
    assert d["logits"] <= gpu_check.FP32_TOLERANCE, d
    assert d["grads"] <= gpu_check.FP32_TOLERANCE, d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-gradscaler"])
def test_amp_steps_are_finite_and_decreasing(device, dtype, batch, tmp_path):
    trainer, losses = gpu_check.amp_train(gpu_check.arch_config(SIZES), torch.device(device), dtype, batch,
                                          tmp_path, SIZES.amp_steps)
    assert trainer.scaler.is_enabled() == (dtype is torch.float16)
    ok, figure = gpu_check.losses_decrease(losses)
    assert ok, figure


@pytest.mark.parametrize("device", DEVICES)
def test_predictor_labels_equal_cpu(device, batch, tmp_path):
    config = gpu_check.arch_config(SIZES)
    trainer, _ = gpu_check.amp_train(config, torch.device(device), torch.bfloat16, batch, tmp_path, SIZES.amp_steps)
    t, x, y, z = SIZES.cine
    image, _ = gpu_check.phantom_cine(SIZES.batch[0], t, (x, y, z), SIZES.phantom_scale)
    with gpu_check.tf32_off():
        agree = gpu_check.predictor_agreement(trainer.model, trainer.preprocessing, config,
                                              torch.from_numpy(image)[None], torch.device(device), amp=False)
    assert agree >= gpu_check.AGREEMENT_TARGET


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_from_device_loads_on_cpu_and_back(device, batch, tmp_path):
    trainer, _ = gpu_check.amp_train(gpu_check.arch_config(SIZES), torch.device(device), torch.float16, batch,
                                     tmp_path, 2)
    r = gpu_check.checkpoint_round_trip(trainer)
    assert not r["off_cpu"] and not r["cpu_unequal"] and not r["back_unequal"], r
    assert r["scaler_equal"] and r["on_device"]
