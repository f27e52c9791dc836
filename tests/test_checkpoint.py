"""Checkpoints: atomic writes, clear errors for bad files, RNG capture/restore, model rebuild."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch
from torch import nn

import trunet.models
from trunet.atomic import write_text
from trunet.errors import CheckpointError
from trunet.pipeline import checkpoint as ckpt
from trunet.config import Config, load_config


class _TinyNet(nn.Module):
    """Stands in for TimeResolvedUNet: same constructor keywords, one 1x1x1 conv per frame."""

    def __init__(self, in_channels=1, out_channels=4, channels=(4, 8), strides=((2, 2, 1),),
                 kernel_sizes=None, clstm_levels="all", clstm_reduction=1, bidirectional=False, peephole=False,
                 deep_supervision=False, checkpointing=False):
        super().__init__()
        self.received = dict(channels=channels, strides=strides)
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x):  # (B, T, C, X, Y, Z) -> (B, T, K, X, Y, Z)
        b, t = x.shape[:2]
        return self.conv(x.flatten(0, 1)).unflatten(0, (b, t))


@pytest.fixture
def tiny_net(monkeypatch):
    monkeypatch.setitem(trunet.models.ARCHITECTURES, "TimeResolvedUNet", _TinyNet)
    return _TinyNet


def _payload(config: Config, model: nn.Module) -> dict:
    return {
        "model_state": model.state_dict(),
        "model_hparams": ckpt.model_hparams(config),
        "config": config.to_dict(),
        "classes": list(config.data.classes),
        "preprocessing": {"target_spacing": [1.0, 1.0, 8.0]},
        "epoch": 3,
        "iteration": 30,
        "rng": ckpt.capture_rng_state(),
        "best_metric": 0.5,
        "metrics": [{"epoch": 1, "train_loss": 1.25}],
    }


def test_roundtrip_and_model_rebuild(tmp_path, tiny_net, configs_dir):
    config = load_config(configs_dir / "tiny.yaml")
    model = ckpt.model_from_hparams(ckpt.model_hparams(config))
    assert isinstance(model, _TinyNet)
    assert model.received["strides"][0] == (2, 2, 1)  # validated back into tuples
    path = ckpt.save_checkpoint(tmp_path / "sub" / "latest.pt", _payload(config, model))
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temporary file left behind

    payload = ckpt.load_checkpoint(path, classes=config.data.classes)
    assert payload["format_version"] == ckpt.FORMAT_VERSION
    assert payload["trunet_version"] == trunet.__version__
    assert payload["epoch"] == 3 and payload["metrics"][0]["train_loss"] == 1.25
    rebuilt = ckpt.model_from_checkpoint(payload)
    assert not rebuilt.training
    x = torch.randn(1, 2, 1, 4, 4, 2)
    model.eval()
    assert torch.equal(rebuilt(x), model(x))


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "latest.pt", {"model_state": {}, "value": 1})
    before = path.read_bytes()

    def dies_half_way(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"model_state": {}, "value": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_bad_files_are_clear_errors(tmp_path, tiny_net, configs_dir):
    config = load_config(configs_dir / "tiny.yaml")
    model = ckpt.model_from_hparams(ckpt.model_hparams(config))
    good = ckpt.save_checkpoint(tmp_path / "good.pt", _payload(config, model))

    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        ckpt.load_checkpoint(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt: not a trunet checkpoint"):
        ckpt.load_checkpoint(garbage)

    not_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_dict)
    with pytest.raises(CheckpointError, match="not a trunet checkpoint"):
        ckpt.load_checkpoint(not_dict)

    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "format_version": ckpt.FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 2 is incompatible"):
        ckpt.load_checkpoint(tmp_path / "future.pt")

    with pytest.raises(CheckpointError, match="trained for 4 classes"):
        ckpt.load_checkpoint(good, classes=["background", "LV"])

    torch.save({**payload, "classes": ["background", "LV"]}, tmp_path / "inconsistent.pt")
    with pytest.raises(CheckpointError, match="4 output channels but 2 class names"):
        ckpt.load_checkpoint(tmp_path / "inconsistent.pt")

    wrong_weights = {**payload, "model_state": {"conv.weight": torch.zeros(1)}}
    with pytest.raises(CheckpointError, match="do not fit"):
        ckpt.model_from_checkpoint(wrong_weights)


def test_a_corrupted_weight_is_caught_by_the_checksum(tmp_path, configs_dir):
    config = load_config(configs_dir / "tiny.yaml")
    model = ckpt.model_from_hparams(ckpt.model_hparams(config))  # the real network: weights of 64+ bytes
    good = ckpt.save_checkpoint(tmp_path / "good.pt", _payload(config, model))
    assert ckpt.load_checkpoint(good)["checksum"].startswith("sha256:")

    name, weight = next((k, v) for k, v in model.state_dict().items() if v.numel() >= 16)
    data = bytearray(good.read_bytes())
    at = data.find(weight.numpy().tobytes())  # torch stores tensors uncompressed: the zip stays valid
    assert at > 0
    data[at : at + 64] = np.random.default_rng(0).bytes(64)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(data))
    assert not torch.equal(torch.load(corrupt, weights_only=True)["model_state"][name], weight)  # torch loads it
    with pytest.raises(CheckpointError, match="corrupt.pt: corrupt checkpoint: its content does not match"):
        ckpt.load_checkpoint(corrupt)


def test_other_files_are_not_trunet_checkpoints(tmp_path):
    import argparse
    import gzip
    import pickle

    nifti = tmp_path / "case_4d.nii.gz"
    nifti.write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + bytes(344)))
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps(argparse.Namespace(weights=[1.0, 2.0]), protocol=2))
    module = tmp_path / "module.pt"
    torch.save(argparse.Namespace(weights=[1.0]), module)  # a torch file whose loading would run code
    text = tmp_path / "notes.txt"
    text.write_text("weights: 1, 2, 3\n")
    for path in (nifti, pickled, module, text):
        with pytest.raises(CheckpointError, match=f"{path.name}: not a trunet checkpoint") as info:
            ckpt.load_checkpoint(path)
        assert "weights_only" not in str(info.value)


def test_rng_state_survives_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng_state()
    ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    ckpt.restore_rng_state(loaded)
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert again == first


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["022", "002", "077"])
def test_written_files_follow_the_umask_and_their_folder_is_flushed(tmp_path, monkeypatch, umask, mode):
    """Files others must read (checkpoints, predictions, reports) get 0o666 less the umask, not mkstemp's
    0o600; the folder is fsynced after the rename."""
    folders = []
    fsync = os.fsync

    def recording_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            folders.append(fd)
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    previous = os.umask(umask)
    try:
        text = write_text(tmp_path / "summary.csv", "a,b\n")
        checkpoint = ckpt.save_checkpoint(tmp_path / "latest.pt", {"model_state": {}, "value": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(text.stat().st_mode) == mode
    assert stat.S_IMODE(checkpoint.stat().st_mode) == mode
    assert len(folders) == 2
