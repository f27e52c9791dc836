"""TimeResolvedUNet: shapes, config wiring, causality, temporal paths, gradients, checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trunet.models import TimeResolvedUNet
from trunet.config import ModelConfig

TINY = dict(channels=(4, 8, 16), strides=((2, 2, 1), (2, 2, 2)))


def tiny(**kwargs) -> TimeResolvedUNet:
    torch.manual_seed(0)
    return TimeResolvedUNet(in_channels=1, out_channels=3, **{**TINY, **kwargs})


def test_builds_from_model_config_and_shapes():
    config = ModelConfig(channels=[4, 8, 16], strides=[(2, 2, 1), (2, 2, 2)], kernel_sizes=[(3, 3, 1), (3, 3, 3), (3, 3, 3)])
    model = TimeResolvedUNet(in_channels=1, out_channels=4, **dataclasses.asdict(config))
    assert model.size_divisor == (4, 4, 2)
    assert sorted(int(k) for k in model.temporal) == [0, 1, 2]
    y = model(torch.randn(2, 3, 1, 8, 12, 4))
    assert y.shape == (2, 3, 4, 8, 12, 4)
    default = TimeResolvedUNet(**{k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k != "channels"},
                               channels=[2, 2, 2, 2, 2])
    assert default.size_divisor == (16, 16, 2)
    assert list(TimeResolvedUNet(clstm_levels="bottleneck", **TINY).temporal) == ["2"]
    assert list(TimeResolvedUNet(clstm_levels=[], **TINY).temporal) == []


def test_odd_anisotropic_sizes_and_clear_size_error():
    model = tiny(strides=[[2, 2, 1], [2, 1, 1]], clstm_levels=[0, 2])
    y = model(torch.randn(1, 2, 1, 12, 6, 3))  # odd z, y pooled only once
    assert y.shape == (1, 2, 3, 12, 6, 3)
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 2, 1, 10, 6, 3))
    message = str(err.value)
    assert "X=10 is not a multiple of 4" in message and "8 or 12" in message and "(12, 6, 3)" in message
    assert model.fit_size((10, 5, 3)) == (12, 6, 3)
    with pytest.raises(ValueError, match=r"\(B, T, C, X, Y, Z\)"):
        model(torch.randn(2, 1, 12, 6, 3))
    with pytest.raises(ValueError, match="strides needs 2"):
        tiny(strides=[(2, 2, 1)])
    with pytest.raises(ValueError, match="clstm_levels"):
        tiny(clstm_levels=[3])


def test_causal_and_temporal_path():
    model = tiny().eval()
    x = torch.randn(1, 4, 1, 8, 8, 2)
    with torch.no_grad():
        y = model(x)
        changed = x.clone()
        changed[:, 2] += 1.0
        y2 = model(changed)
        torch.testing.assert_close(y2[:, :2], y[:, :2], atol=0, rtol=0)  # frames <= 1 untouched
        assert (y2[:, 2:] - y[:, 2:]).abs().amax(dim=(0, 2, 3, 4, 5)).min() > 1e-5
        first = x.clone()
        first[:, 0] += 1.0
        assert (model(first)[:, -1] - y[:, -1]).abs().max() > 1e-5  # frame 0 reaches the last frame


def test_bidirectional_is_not_causal_but_sees_both_directions():
    model = tiny(bidirectional=True).eval()
    assert not model.causal
    x = torch.randn(1, 4, 1, 8, 8, 2)
    with torch.no_grad():
        y = model(x)
        last = x.clone()
        last[:, -1] += 1.0
        first = x.clone()
        first[:, 0] += 1.0
        assert (model(last)[:, 0] - y[:, 0]).abs().max() > 1e-5
        assert (model(first)[:, -1] - y[:, -1]).abs().max() > 1e-5


def test_loss_on_one_frame_reaches_every_parameter():
    model = tiny(peephole=True)
    y = model(torch.randn(1, 3, 1, 8, 8, 2))
    y[:, -1].square().mean().backward()  # the last frame only
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []
    # the seed descendants' mistake: a loss on frame 0 cannot train the recurrent (hidden-to-state) weights
    model.zero_grad()
    model(torch.randn(1, 3, 1, 8, 8, 2))[:, 0].square().mean().backward()
    cell = model.temporal["1"].clstm.cell_list[0]
    assert cell.conv.weight.grad[:, cell.input_dim :].abs().max() == 0


def test_batch_independence():
    model = tiny()
    x = torch.randn(3, 2, 1, 8, 8, 2)
    both = model(x)
    torch.testing.assert_close(model(x[1:2]), both[1:2], atol=1e-5, rtol=1e-4)


def test_deep_supervision_train_list_eval_tensor():
    model = tiny(deep_supervision=True)
    out = model(torch.randn(1, 2, 1, 8, 8, 4))
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [(1, 2, 3, 8, 8, 4), (1, 2, 3, 4, 4, 4)]
    assert model.level_scales[1] == (2, 2, 1)
    model.eval()
    assert model(torch.randn(1, 2, 1, 8, 8, 4)).shape == (1, 2, 3, 8, 8, 4)


@pytest.mark.parametrize("options", [{}, {"bidirectional": True, "clstm_levels": "all"}])
def test_decoding_the_labelled_frames_only_gives_the_same_loss_and_gradients(options):
    """``decode=frame_mask`` (the trainer's ED/ES path) equals a full forward whose loss masks the frames."""
    from trunet.pipeline.training.losses import DeepSupervisionLoss, MaskedDiceCELoss

    model = tiny(deep_supervision=True, **options)
    criterion = DeepSupervisionLoss(MaskedDiceCELoss(3))
    torch.manual_seed(1)
    x = torch.randn(2, 4, 1, 8, 8, 4)
    label = torch.randint(0, 3, (2, 4, 8, 8, 4))
    mask = torch.tensor([[False, True, False, False], [True, False, False, True]])
    label[~mask] = 255

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_loss, full = grads(criterion(model(x), label, mask))
    out = model(x, decode=mask)
    assert [tuple(o.shape[:2]) for o in out] == [(1, 3), (1, 3)]
    picked = label.flatten(0, 1)[mask.reshape(-1)].unsqueeze(0)
    assert (picked != 255).all()
    part_loss, part = grads(criterion(out, picked, torch.ones(1, 3, dtype=torch.bool)))
    torch.testing.assert_close(part_loss, full_loss)
    for name in full:
        torch.testing.assert_close(part[name], full[name], atol=1e-6, rtol=1e-4, msg=name)
    # the same frames in another order would pair logits with the wrong labels: the loss must differ
    swapped = picked.flip(1)
    assert not torch.allclose(criterion(model(x, decode=mask), swapped, torch.ones(1, 3, dtype=torch.bool)),
                              full_loss)
    with pytest.raises(ValueError, match="decode must be"):
        model(x, decode=mask[:1])


@pytest.mark.parametrize("options", [{}, {"bidirectional": True, "deep_supervision": True, "peephole": True}])
def test_checkpointing_gives_equal_gradients(options):
    model = tiny(**options)
    x = torch.randn(2, 3, 1, 8, 8, 2)

    def grads(flag):
        model.zero_grad()
        model.checkpointing = flag
        out = model(x)
        out = out if isinstance(out, list) else [out]
        sum(o.square().mean() for o in out).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reduction", [1, 4])
def test_streaming_in_chunks_equals_one_forward(reduction):
    """The ConvLSTM state carried from chunk to chunk gives the one-pass logits, and must be carried."""
    torch.manual_seed(0)
    net = TimeResolvedUNet(1, 4, channels=[4, 8, 8], strides=[(2, 2, 1), (2, 2, 1)], clstm_levels="all",
                           clstm_reduction=reduction, peephole=True).eval()
    x = torch.randn(2, 7, 1, 16, 16, 2)
    with torch.no_grad():
        whole = net(x)
        parts, state = [], None
        for start, stop in [(0, 3), (3, 4), (4, 7)]:
            logits, state = net.forward_streaming(x[:, start:stop], state)
            parts.append(logits)
        assert set(state) == {"0", "1", "2"} and state["0"][0].shape == (2, max(1, 4 // reduction), 16, 16, 2)
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)
        restarted, _ = net.forward_streaming(x[:, 4:7])  # a zero state is not the carried one
        assert not torch.allclose(restarted, whole[:, 4:7], atol=1e-4)
    with pytest.raises(ValueError, match="causal"):
        TimeResolvedUNet(1, 4, channels=[4, 8], strides=[(2, 2, 1)], bidirectional=True).forward_streaming(x)
