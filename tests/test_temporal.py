"""What the time axis is for: frame corruption (the artefact model and its training transform), the narrow
ConvLSTM that makes bidirectional recurrence at every level affordable, and a small training run in which
the temporal model reads a spoilt frame from its neighbours where the frame-by-frame model cannot."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cine_factory import write_case
from trunet.data.artefacts import CORRUPTIONS, corrupt_cine, corrupt_frame
from trunet.models import TimeResolvedUNet
from trunet.models.blocks import TemporalCLSTM
from trunet.config import CorruptionKind, ConfigError, load_config
from trunet.transforms.cardiac import RandCorruptFramesd
from trunet.pipeline.training.losses import consistency_loss
from trunet.transforms.compose import CLEAN_IMAGE, train_transforms


def _frame(seed: int = 0) -> np.ndarray:
    """A bright disc on a dark textured background, ``(32, 32, 4)`` at 2 mm."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    disc = ((x - 16) ** 2 + (y - 14) ** 2 < 64).astype(np.float32)
    return (100.0 + 400.0 * disc[..., None] + 10.0 * rng.random((32, 32, 4))).astype(np.float32)


# -- the artefact model -----------------------------------------------------------------------------------


def test_config_kinds_are_the_artefact_models_kinds():
    assert typing.get_args(CorruptionKind) == CORRUPTIONS


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_changes_the_frame_more_when_stronger(kind):
    frame = _frame()
    spoilt = {s: corrupt_frame(frame, kind, s, (2.0, 2.0, 8.0), np.random.default_rng(1)) for s in (0.2, 1.0)}
    for s, out in spoilt.items():
        assert out.shape == frame.shape and out.dtype == np.float32 and np.isfinite(out).all()
    change = {s: float(np.abs(out - frame).mean()) for s, out in spoilt.items()}
    assert change[0.2] > 0.5, change  # visible
    assert change[1.0] > change[0.2], change  # and worse when stronger
    # the same generator state gives the same corruption; the input is left alone
    again = corrupt_frame(frame, kind, 1.0, (2.0, 2.0, 8.0), np.random.default_rng(1))
    np.testing.assert_array_equal(again, spoilt[1.0])
    np.testing.assert_array_equal(frame, _frame())


def test_severe_dropout_loses_most_of_the_signal_in_a_band():
    frame = _frame()
    out = corrupt_frame(frame, "dropout", 1.0, (2.0, 2.0, 8.0), np.random.default_rng(3))
    floor = np.percentile(frame, 1.0)
    ratio = (out - floor).sum(axis=(1, 2)) / (frame - floor).sum(axis=(1, 2)), \
        (out - floor).sum(axis=(0, 2)) / (frame - floor).sum(axis=(0, 2))
    # along the band's axis, some rows keep < 10% of their signal; the band is >= 40 mm (20 voxels) wide at full
    # strength, so the frame keeps less than half of its signal overall
    assert min(r.min() for r in ratio) < 0.1
    assert (out - floor).sum() < 0.6 * (frame - floor).sum()


def test_corrupt_cine_records_frames_and_keeps_the_rest():
    cine = np.stack([_frame(t) for t in range(8)], axis=-1)  # ACDC layout (X, Y, Z, T)
    out, records = corrupt_cine(cine, [1, 5], ("dropout", "missing"), (0.8, 1.0), (2.0, 2.0, 8.0),
                                np.random.default_rng(0), time_axis=-1)
    assert [r["frame"] for r in records] == [1, 5]
    assert all(r["kind"] in ("dropout", "missing") and 0.8 <= r["strength"] <= 1.0 for r in records)
    changed = [t for t in range(8) if not np.array_equal(out[..., t], cine[..., t])]
    assert changed == [1, 5]
    with pytest.raises(ValueError, match="outside"):
        corrupt_cine(cine, [8], ("noise",), (0.5, 0.5), (2.0, 2.0, 8.0), np.random.default_rng(0), time_axis=-1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_frame(cine[..., 0], "lightning", 0.5, (2.0, 2.0, 8.0), np.random.default_rng(0))


# -- the training transform -------------------------------------------------------------------------------


def test_corruption_transform_spoils_some_frames_and_leaves_labels_and_mask_alone():
    image = torch.from_numpy(np.stack([_frame(t) for t in range(6)]))  # (T, X, Y, Z)
    label = torch.randint(0, 4, (6, 32, 32, 4), dtype=torch.uint8)
    mask = torch.tensor([True, False, False, True, False, False])
    transform = RandCorruptFramesd("image", prob=0.5, spacing=(2.0, 2.0, 8.0))
    seen = set()
    for seed in range(20):
        transform.set_random_state(seed)
        out = transform({"image": image, "label": label, "frame_mask": mask})
        assert out["label"] is label and out["frame_mask"] is mask  # untouched, not even copied
        changed = [t for t in range(6) if not torch.equal(out["image"][t], image[t])]
        assert changed == transform.frames  # exactly the recorded frames, the others bit-identical
        assert len(changed) <= 5  # one clean frame always remains
        assert out["image"].dtype == image.dtype and out["image"].shape == image.shape
        seen.update(changed)
    assert seen == set(range(6))  # every frame can be hit, labelled or not
    # reproducible from the random state, as every MONAI random transform
    transform.set_random_state(7)
    a = transform({"image": image})["image"]
    transform.set_random_state(7)
    torch.testing.assert_close(transform({"image": image})["image"], a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="subset"):
        RandCorruptFramesd("image", prob=0.5, kinds=["lightning"])


def test_corruption_in_the_training_chain_is_configured_and_validated(configs_dir, tmp_path):
    case = write_case(tmp_path)
    config = load_config(configs_dir / "tiny.yaml", ["train.patch_size=[16,16,4]", "train.augment.corrupt_prob=0.5",
                                                     "train.augment.corrupt_kinds=[missing]"])
    chain = train_transforms(config, (4.0, 4.0, 8.0))
    (corrupt,) = [t for t in chain.transforms if isinstance(t, RandCorruptFramesd)]
    assert corrupt.prob == 0.5 and corrupt.kinds == ("missing",) and corrupt.spacing == (4.0, 4.0, 8.0)
    sample = chain(case)
    sample = sample[0] if isinstance(sample, list) else sample
    assert sample["image"].shape[0] == config.train.time_window and torch.isfinite(sample["image"]).all()
    off = train_transforms(load_config(configs_dir / "tiny.yaml"), (4.0, 4.0, 8.0))
    assert not any(isinstance(t, RandCorruptFramesd) for t in off.transforms)  # off by default
    for bad in ("train.augment.corrupt_kinds=[lightning]", "train.augment.corrupt_prob=1.5",
                "train.augment.corrupt_strength=[0.9,0.1]", "model.clstm_reduction=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[-1]):
            load_config(configs_dir / "tiny.yaml", [bad])


def test_consistency_training_keeps_the_clean_image_with_the_same_intensity_draws(configs_dir, tmp_path):
    """The consistency target is the sample before corruption: identical to the image on every frame that
    was not spoilt (noise and blur drawn once for both), different on the spoilt ones. (Contrast and gamma
    keep each image's own mean/range, which the spoilt frames shift: there the clean frames differ slightly.)"""
    case = write_case(tmp_path)
    config = load_config(configs_dir / "tiny.yaml", [
        "train.patch_size=[16,16,4]", "train.augment.corrupt_prob=0.5", "train.augment.corrupt_kinds=[dropout]",
        "train.augment.corrupt_strength=[0.9,1.0]", "train.consistency_weight=0.5", "train.augment.noise_prob=1.0",
        "train.augment.noise_std=0.1", "train.augment.blur_prob=1.0", "train.augment.contrast_prob=0",
        "train.augment.gamma_prob=0", "train.augment.low_res_prob=0",
    ])
    chain = train_transforms(config, (4.0, 4.0, 8.0))
    (corrupt,) = [t for t in chain.transforms if isinstance(t, RandCorruptFramesd)]
    hit = 0
    for seed in range(6):
        chain.set_random_state(seed)
        sample = chain(case)
        sample = sample[0] if isinstance(sample, list) else sample
        image, clean = sample["image"], sample[CLEAN_IMAGE]
        assert clean.shape == image.shape
        for t in range(image.shape[0]):
            same = torch.equal(image[t], clean[t])
            assert same == (t not in corrupt.frames), (seed, t, corrupt.frames)
        hit += len(corrupt.frames)
    assert hit > 0
    plain = train_transforms(load_config(configs_dir / "tiny.yaml", ["train.augment.corrupt_prob=0.5"]), (4.0, 4.0, 8.0))
    sample = plain(case)
    assert CLEAN_IMAGE not in (sample[0] if isinstance(sample, list) else sample)  # no copy without the loss
    with pytest.raises(ConfigError, match="consistency_weight"):
        load_config(configs_dir / "tiny.yaml", ["train.consistency_weight=0.5"])  # nothing corrupted to compare


def test_consistency_loss_is_zero_when_predictions_agree_and_pulls_towards_the_clean_prediction():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 4, 5, 5, 2)
    assert consistency_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 3, 4, 5, 5, 2, requires_grad=True)
    loss = consistency_loss([student, torch.zeros(1)], teacher)  # deep supervision: full resolution only
    assert loss.item() > 0
    loss.backward()
    expected = (torch.softmax(student, 2) - torch.softmax(teacher, 2)) / (2 * 3 * 5 * 5 * 2)
    torch.testing.assert_close(student.grad, expected.detach(), rtol=1e-4, atol=1e-7)


# -- the narrow ConvLSTM ----------------------------------------------------------------------------------


def test_reduced_clstm_is_narrow_and_plain_one_keeps_its_parameter_names():
    plain = TemporalCLSTM(16, (3, 3, 3), bidirectional=True)
    narrow = TemporalCLSTM(16, (3, 3, 3), bidirectional=True, reduction=4)
    assert narrow.clstm.hidden_dim == [4] and plain.clstm.hidden_dim == [16]
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in plain.parameters()) / 8
    assert not any(k.startswith(("reduce", "expand")) for k in plain.state_dict())  # old checkpoints load
    x = torch.randn(2 * 5, 16, 6, 6, 2)
    out = narrow(x, batch=2)
    assert out.shape == x.shape
    # bidirectional: the first frame's output depends on the last frame
    y = x.clone()
    y[4] += 1.0  # sample 0, last frame
    assert not torch.allclose(narrow(y, batch=2)[0], out[0])
    torch.testing.assert_close(narrow(y, batch=2)[5:], out[5:])  # sample 1 untouched
    with pytest.raises(ValueError, match="reduction"):
        TemporalCLSTM(16, (3, 3, 3), reduction=0)


# -- a small training run ---------------------------------------------------------------------------------


def _disc_batch(generator: torch.Generator, batch: int, frames: int = 5):
    """Cines of a disc at a random place per cine, slowly moving; one frame of each cine is spoilt by
    :class:`RandCorruptFramesd` (missing frame: no signal). Returns image ``(B, T, 1, 16, 16, 2)``,
    label ``(B, T, 16, 16, 2)`` and the corrupted-frame mask ``(B, T)``."""
    images, labels, spoilt = [], [], []
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"))
    corrupt = RandCorruptFramesd("image", prob=1.0, kinds=["missing"], strength_range=(1.0, 1.0),
                                 spacing=(2.0, 2.0, 8.0))
    for _ in range(batch):
        centre = 4 + 8 * torch.rand(2, generator=generator)
        step = torch.rand(2, generator=generator) - 0.5
        lab = torch.stack([(((grid - (centre + t * step).view(2, 1, 1)) ** 2).sum(0) < 9).long() for t in range(frames)])
        lab = lab[..., None].expand(frames, 16, 16, 2)
        img = lab.float() + 0.1 * torch.randn(lab.shape, generator=generator)
        bad = int(torch.randint(frames, (1,), generator=generator))
        corrupt.set_random_state(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        spoiled = corrupt({"image": img[bad : bad + 1]})["image"]
        img = torch.cat([img[:bad], spoiled, img[bad + 1 :]])
        mask = torch.zeros(frames, dtype=torch.bool)
        mask[bad] = True
        images.append(img)
        labels.append(lab)
        spoilt.append(mask)
    return torch.stack(images)[:, :, None], torch.stack(labels), torch.stack(spoilt)


def _train_and_score(clstm_levels, steps: int = 80) -> float:
    torch.manual_seed(0)
    model = TimeResolvedUNet(1, 2, channels=[8, 16], strides=[(2, 2, 1)], clstm_levels=clstm_levels,
                             clstm_reduction=2, bidirectional=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y, _ = _disc_batch(gen, 4)
        loss = F.cross_entropy(model(x).transpose(1, 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, spoilt = _disc_batch(torch.Generator().manual_seed(123), 8)
    with torch.no_grad():
        per_voxel = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (B, T, X, Y, Z)
    return float(per_voxel[spoilt].mean())


def test_temporal_model_reads_a_missing_frame_from_its_neighbours():
    """Same data, steps and optimiser; the only difference is the ConvLSTMs. On the spoilt frames the
    frame-by-frame model can only guess where the disc is; the temporal model takes it from the
    neighbouring frames."""
    frame_by_frame = _train_and_score([])
    temporal = _train_and_score("all")
    assert temporal < 0.5 * frame_by_frame, (temporal, frame_by_frame)
