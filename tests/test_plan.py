"""Memory model and planner (trunet.pipeline.planning): exact scaling, savers, budgets, the CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import yaml

from trunet.errors import TrunetError
from trunet.models import build_model
from trunet.pipeline import planning
from trunet.pipeline.training.losses import build_criterion
from trunet.config import config_from_dict

TINY_MODEL = {"channels": [4, 8, 16], "strides": [[2, 2, 1], [2, 2, 2]], "clstm_levels": "all"}


def tiny(model: dict | None = None, train: dict | None = None):
    return config_from_dict({"model": {**TINY_MODEL, **(model or {})},
                             "train": {"amp": True, "optimizer": "sgd", **(train or {})}})


def test_activations_affine_in_time_and_voxels():
    config = tiny()
    acts = [planning.estimate_memory(config, (16, 16, 4), t, 2).activations for t in range(2, 7)]
    steps = [b - a for a, b in zip(acts, acts[1:])]
    assert steps[0] > 0
    assert max(steps) - min(steps) <= 4  # constant increment per frame (integer rounding of the fit)
    vols = [planning.estimate_memory(config, (16 * k, 16, 4), 3, 2).activations for k in range(1, 5)]
    steps = [b - a for a, b in zip(vols, vols[1:])]
    assert steps[0] > 0 and max(steps) - min(steps) <= 4
    # equal voxel counts, different shapes: equal estimates (fully convolutional, sizes divisible by strides)
    assert planning.estimate_memory(config, (32, 16, 4), 3, 2).activations == \
        planning.estimate_memory(config, (16, 16, 8), 3, 2).activations


@pytest.mark.parametrize("model", [{}, {"checkpointing": True}])
def test_fit_matches_direct_measurement_at_unprobed_size(model):
    """The multilinear fit from eight small probes predicts a measurement at a size it never saw."""
    config = tiny(model)
    batch, frames, patch = 3, 5, (24, 16, 6)
    estimate = planning.estimate_memory(config, patch, frames, batch, device_type="cpu")
    net = build_model(config, initialise=False)
    probe = planning.probe_activations(config, net, build_criterion(config), batch, frames, patch)
    assert abs(estimate.activations - probe.live) <= 8
    assert abs(estimate.saved_tensors - probe.saved) <= 8
    if model.get("checkpointing"):
        assert probe.live > probe.saved  # checkpoint inputs: alive, but not seen by the saved-tensor hooks


def test_savers_lower_the_estimate():
    size = dict(patch_size=(32, 32, 4), time_window=6, batch_size=2)
    base = planning.estimate_memory(tiny(), **size)  # bf16, CLSTM at all levels, no checkpointing
    ckpt = planning.estimate_memory(tiny({"checkpointing": True}), **size)
    fp32 = planning.estimate_memory(tiny(train={"amp": False}), **size)
    neck = planning.estimate_memory(tiny({"clstm_levels": "bottleneck"}), **size)
    assert ckpt.activations < 0.7 * base.activations and ckpt.total < base.total
    assert base.activations < 0.75 * fp32.activations and base.total < fp32.total
    assert neck.activations < base.activations and neck.parameters < base.parameters
    assert ckpt.checkpointing and not base.checkpointing


def test_components_and_optimizer_state():
    sgd = planning.estimate_memory(tiny(), (16, 16, 4), 3, 2)
    adamw = planning.estimate_memory(tiny(train={"optimizer": "adamw"}), (16, 16, 4), 3, 2)
    assert sgd.gradients == sgd.parameters == sgd.optimizer_state
    assert adamw.optimizer_state == 2 * adamw.parameters
    cpu = planning.estimate_memory(tiny(), (16, 16, 4), 3, 2, device_type="cpu")
    assert sgd.cuda_context == planning.CUDA_CONTEXT_BYTES and cpu.cuda_context == 0
    assert sgd.total == sum(getattr(sgd, k) for k in (
        "parameters", "gradients", "optimizer_state", "batch", "activations", "workspace", "cuda_context"))
    assert sgd.total_bytes == sgd.total and math.isclose(sgd.gb(), sgd.total / 1e9)
    with pytest.raises(TrunetError, match="multiples"):
        planning.estimate_memory(tiny(), (30, 16, 4), 3, 2)


def test_patch_ladder_keeps_aspect_ratio_and_divisor():
    ladder = planning.patch_ladder((16, 16, 2), (1.5, 1.5, 10.0), (256, 216, 10))
    assert ladder[0] == (16, 16, 2) and ladder[-1] == (256, 208, 10)
    for a, b in zip(ladder, ladder[1:]):
        assert all(x <= y for x, y in zip(a, b)) and a != b
    for x, y, z in ladder:
        assert x % 16 == 0 and y % 16 == 0 and z % 2 == 0
        assert abs(x - y) <= 16 or y == 208  # equal in-plane spacing: square until capped


def test_planner_choice_fits_and_next_candidate_does_not():
    config = tiny()
    result = planning.plan(config, vram_gb=0.6, headroom=0.1)
    chosen = result.chosen
    assert chosen.total <= result.budget == int(0.6 * 0.9 * 1e9)
    again = planning.estimate_memory(config, chosen.patch_size, chosen.time_window, chosen.batch_size)
    assert chosen.total == again.total
    assert chosen.batch_size >= 2
    i = result.ladder.index(chosen.patch_size)
    assert i + 1 < len(result.ladder), "the test budget should not reach the cap"
    bigger = planning.estimate_memory(config, result.ladder[i + 1], chosen.time_window, chosen.batch_size)
    assert bigger.total > result.budget
    for c in result.candidates:
        assert c.fits == (c.total <= result.budget)
    train = {"patch_size": list(chosen.patch_size), "time_window": chosen.time_window,
             "batch_size": chosen.batch_size}
    assert result.fragment() == {"train": train}
    # a larger budget never gives a smaller training sample
    larger = planning.plan(config, vram_gb=1.2, headroom=0.1).chosen
    assert larger.sample_voxels * larger.batch_size >= chosen.sample_voxels * chosen.batch_size


@pytest.mark.parametrize("vram, headroom, message", [
    (0, 0.1, "--vram-gb must be a positive"),
    (-4, 0.1, "--vram-gb must be a positive"),
    (float("nan"), 0.1, "--vram-gb must be a positive"),
    (40, 1.0, "--headroom must be a fraction"),
    (40, -0.1, "--headroom must be a fraction"),
    (0.001, 0.1, "too small for the smallest candidate"),
])
def test_invalid_budgets_are_clear_errors(vram, headroom, message):
    with pytest.raises(TrunetError, match=message):
        planning.plan(tiny(), vram_gb=vram, headroom=headroom)


def test_free_device_memory_is_none_without_cuda():
    assert planning.free_device_memory("cpu") is None


def test_cli_plan_default_config_fits_40gb(tmp_path, repo):
    out = tmp_path / "fragment.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "trunet", "plan", "--config", str(repo / "configs" / "default.yaml"),
         "--vram-gb", "40", "--out", str(out)],
        capture_output=True, text=True, cwd=repo, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    given = re.search(r"as given.*?total\s+([\d.]+) GB", proc.stdout, re.S)
    chosen = re.search(r"chosen:.*?total\s+([\d.]+) GB", proc.stdout, re.S)
    assert given and chosen, proc.stdout
    assert float(given.group(1)) <= 40 and float(chosen.group(1)) <= 40 * 0.9
    fragment = yaml.safe_load(out.read_text())
    config = config_from_dict(fragment)
    assert list(config.train.patch_size) == fragment["train"]["patch_size"]



def test_cli_plan_bad_budget_is_one_line_exit_2(capsys, repo):
    from trunet.cli import main

    code = main(["plan", "--config", str(repo / "configs" / "default.yaml"), "--vram-gb", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--vram-gb must be a positive" in err and err.count("\n") == 1


def test_cli_plan_refuses_to_replace_an_earlier_fragment(tmp_path, capsys, repo):
    from trunet.cli import main

    out = tmp_path / "fragment.yaml"
    out.write_text("train: {patch_size: [64, 64, 8]}\n")
    code = main(["plan", "--config", str(repo / "configs" / "default.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{out}: exists (an earlier plan?); pass --overwrite" in err
    assert out.read_text() == "train: {patch_size: [64, 64, 8]}\n"


def test_estimate_leaves_global_rng_alone():
    """The trainer calls estimate_memory after seeding: it must not shift the random streams."""
    import torch

    torch.manual_seed(3)
    before = torch.random.get_rng_state().clone()
    planning.estimate_memory(tiny({"clstm_levels": "bottleneck", "checkpointing": True}), (16, 16, 4), 3, 2)
    assert torch.equal(before, torch.random.get_rng_state())
