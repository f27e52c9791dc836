"""ConvLSTM cells and layers against references written here from the seed equations and Shi et al."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trunet.models import ConvLSTM, ConvLSTMCell

CONV = {2: F.conv2d, 3: F.conv3d}


# --- references -----------------------------------------------------------------------------------------
def seed_cell(x, h, c, weight, bias, spatial_dims):
    """The seed cell: one convolution of [x, h], split into i, f, o, g."""
    pad = tuple(k // 2 for k in weight.shape[2:])
    a = CONV[spatial_dims](torch.cat([x, h], dim=1), weight, bias, padding=pad)
    i, f, o, g = torch.chunk(a, 4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def seed_stack(x, state_dict, num_layers, hidden, spatial_dims, init=None, prefix="cell_list"):
    """Seed-style stack on a batch-first sequence (B, T, C, *sp): loop layers, then frames."""
    b, t = x.shape[:2]
    outputs, states = [], []
    cur = x
    for n in range(num_layers):
        w = state_dict[f"{prefix}.{n}.conv.weight"]
        bias = state_dict.get(f"{prefix}.{n}.conv.bias")
        if init is None:
            h = torch.zeros(b, hidden, *x.shape[3:], dtype=x.dtype)
            c = torch.zeros_like(h)
        else:
            h, c = init[n]
        seq = []
        for step in range(t):
            h, c = seed_cell(cur[:, step], h, c, w, bias, spatial_dims)
            seq.append(h)
        cur = torch.stack(seq, dim=1)
        outputs.append(cur)
        states.append((h, c))
    return outputs, states


def random_state_dict(input_dim, hidden, k, num_layers, spatial_dims, prefix="cell_list", bias=True):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for n in range(num_layers):
        cin = (input_dim if n == 0 else hidden) + hidden
        sd[f"{prefix}.{n}.conv.weight"] = 0.3 * torch.randn(4 * hidden, cin, *([k] * spatial_dims), generator=g)
        if bias:
            sd[f"{prefix}.{n}.conv.bias"] = 0.3 * torch.randn(4 * hidden, generator=g)
    return sd


# --- seed equivalence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_seed_notebook_2d_checkpoint_gives_same_outputs(batch_first):
    sd = random_state_dict(2, 3, 3, num_layers=2, spatial_dims=2)
    model = ConvLSTM(2, 3, (3, 3), 2, batch_first, True, True, spatial_dims=2)
    model.load_state_dict(sd)  # strict: same keys and shapes as the seed notebook
    x = torch.randn(2, 4, 2, 6, 5)  # (B, T, C, H, W)
    ref_out, ref_states = seed_stack(x, sd, 2, 3, 2)
    outs, states = model(x if batch_first else x.transpose(0, 1))
    assert len(outs) == len(states) == 2
    for out, ref in zip(outs, ref_out):
        got = out if batch_first else out.transpose(0, 1)  # time-first in, time-first out
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for (h, c), (rh, rc) in zip(states, ref_states):
        torch.testing.assert_close(h, rh, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, rc, atol=1e-5, rtol=0)
    last_only, last_state = ConvLSTM(2, 3, (3, 3), 2, batch_first, spatial_dims=2)(x if batch_first else x.transpose(0, 1))
    assert len(last_only) == len(last_state) == 1


def test_blog_clstm3d_checkpoint_gives_same_outputs():
    blog = random_state_dict(1, 4, 3, num_layers=2, spatial_dims=3, prefix="lstm_cells")
    renamed = {k.replace("lstm_cells.", "cell_list."): v for k, v in blog.items()}
    model = ConvLSTM(1, 4, 3, 2, batch_first=True, spatial_dims=3)
    model.load_state_dict(renamed)
    x = torch.randn(1, 3, 1, 4, 5, 3)  # (B, T, C, D, H, W)
    ref, _ = seed_stack(x, blog, 2, 4, 3, prefix="lstm_cells")
    (out,), _ = model(x)
    torch.testing.assert_close(out, ref[-1], atol=1e-5, rtol=0)


def test_single_step_cell_matches_seed_cell_and_bias_free():
    cell = ConvLSTMCell(2, 3, 3, bias=False, spatial_dims=2)
    assert cell.conv.bias is None
    x, h, c = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    rh, rc = seed_cell(x, h, c, cell.conv.weight, None, 2)
    gh, gc = cell(x, (h, c))
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gc, rc, atol=1e-5, rtol=0)


# --- peephole (Shi et al. 2015) -------------------------------------------------------------------------
def test_peephole_cell_follows_shi_equations():
    torch.manual_seed(0)
    cell = ConvLSTMCell(2, 3, 3, spatial_dims=3, peephole=True)
    with torch.no_grad():
        cell.w_peephole.normal_()
    w, b = cell.conv.weight, cell.conv.bias
    wx, wh = w[:, :2], w[:, 2:]
    x, h, c = torch.randn(1, 2, 4, 4, 3), torch.randn(1, 3, 4, 4, 3), torch.randn(1, 3, 4, 4, 3)

    def conv(inp, weight, bias=None):
        return F.conv3d(inp, weight, bias, padding=1)

    bi, bf, bo, bg = b.chunk(4)
    wci, wcf, wco = (cell.w_peephole[j].view(1, 3, 1, 1, 1) for j in range(3))
    i = torch.sigmoid(conv(x, wx[0:3], bi) + conv(h, wh[0:3]) + wci * c)
    f = torch.sigmoid(conv(x, wx[3:6], bf) + conv(h, wh[3:6]) + wcf * c)
    c_new = f * c + i * torch.tanh(conv(x, wx[9:12], bg) + conv(h, wh[9:12]))
    o = torch.sigmoid(conv(x, wx[6:9], bo) + conv(h, wh[6:9]) + wco * c_new)
    h_new = o * torch.tanh(c_new)
    gh, gc = cell(x, (h, c))
    torch.testing.assert_close(gc, c_new, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, h_new, atol=1e-5, rtol=0)
    # a fresh peephole cell (zero peephole weights) computes exactly what a plain cell does
    fresh = ConvLSTMCell(2, 3, 3, spatial_dims=3, peephole=True)
    plain = ConvLSTMCell(2, 3, 3, spatial_dims=3)
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if k != "w_peephole"})
    torch.testing.assert_close(fresh(x, (h, c))[0], plain(x, (h, c))[0])


# --- state handling -------------------------------------------------------------------------------------
def test_stateful_two_calls_equal_one_call_and_reset():
    torch.manual_seed(1)
    model = ConvLSTM(2, 3, 3, 2, batch_first=True, stateful=True, spatial_dims=2, peephole=True)
    with torch.no_grad():
        for cell in model.cell_list:
            cell.w_peephole.normal_()
    x = torch.randn(2, 6, 2, 5, 4)
    (whole,), (state,) = model(x)
    model.reset_state()
    (first,), _ = model(x[:, :4])
    (second,), (state2,) = model(x[:, 4:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(state2[1], state[1], atol=1e-6, rtol=0)
    model.reset_state()
    (again,), _ = model(x[:, 4:])
    assert not torch.allclose(again, second, atol=1e-3)


def test_initial_state_passed_in():
    sd = random_state_dict(2, 3, 3, num_layers=2, spatial_dims=2)
    model = ConvLSTM(2, 3, 3, 2, batch_first=False, return_all_layers=True, spatial_dims=2)
    model.load_state_dict(sd)
    x = torch.randn(3, 2, 2, 4, 4)  # (T, B, C, H, W)
    init = [(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)) for _ in range(2)]
    ref, _ = seed_stack(x.transpose(0, 1), sd, 2, 3, 2, init=init)
    outs, _ = model(x, init)
    torch.testing.assert_close(outs[-1].transpose(0, 1), ref[-1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="initial state"):
        model(x, [(torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 5, 5))] * 2)


# --- argument validation --------------------------------------------------------------------------------
def test_arguments_are_validated():
    assert ConvLSTM(1, 2, 3, 1, spatial_dims=3).kernel_size == [(3, 3, 3)]
    assert ConvLSTM(1, [2, 4], [(3, 1), (5, 3)], 2).kernel_size == [(3, 1), (5, 3)]
    with pytest.raises(ValueError, match="odd"):
        ConvLSTM(1, 2, (3, 4), 1)
    with pytest.raises(ValueError, match="odd"):
        ConvLSTMCell(1, 2, 2, spatial_dims=3)
    with pytest.raises(ValueError, match="num_layers"):
        ConvLSTM(1, [2, 2, 2], 3, 2)
    with pytest.raises(ValueError, match="entries"):
        ConvLSTM(1, 2, (3, 3, 3), 1, spatial_dims=2)
    with pytest.raises(ValueError, match="spatial_dims"):
        ConvLSTM(1, 2, 3, 1, spatial_dims=1)
    with pytest.raises(ValueError, match="stateful"):
        ConvLSTM(1, 2, 3, 1, stateful=True, bidirectional=True)
    model = ConvLSTM(1, 2, 3, 1, batch_first=True, spatial_dims=3)
    with pytest.raises(ValueError, match="6-D input"):
        model(torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.zeros(1, 2, 3, 4, 4, 4))


# --- gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peephole", [True, False])
def test_gradcheck_float64_tiny_layer(peephole):
    """The hand-written backward of the gate arithmetic (first step from a zero state included)."""
    torch.manual_seed(2)
    model = ConvLSTM(1, 2, 3, 1, batch_first=True, spatial_dims=2, peephole=peephole).double()
    if peephole:
        with torch.no_grad():
            model.cell_list[0].w_peephole.normal_()
    params = list(model.parameters())
    x = torch.randn(1, 3, 1, 3, 3, dtype=torch.float64, requires_grad=True)

    names = [n for n, _ in model.named_parameters()]

    def fn(inp, *weights):
        (out,), ((h, c),) = torch.func.functional_call(model, dict(zip(names, weights)), (inp,))
        return out, c

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().requires_grad_() for p in params]), eps=1e-6, atol=1e-5)


def test_time_step_checkpointing_gives_same_gradients():
    torch.manual_seed(3)
    model = ConvLSTM(2, 3, 3, 2, batch_first=True, spatial_dims=3, peephole=True)
    x = torch.randn(1, 4, 2, 4, 4, 2)

    def grads(ckpt):
        model.zero_grad()
        model.checkpointing = ckpt
        (out,), _ = model(x)
        (out**2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bidirectional_sees_both_directions():
    torch.manual_seed(4)
    model = ConvLSTM(1, 2, 3, 2, batch_first=False, spatial_dims=2, bidirectional=True)
    x = torch.randn(5, 1, 1, 4, 4)  # time-first
    (out,), ((h, c),) = model(x)
    assert out.shape == (5, 1, 2, 4, 4) and h.shape == (1, 2, 4, 4)
    later = x.clone()
    later[-1] += 1.0
    earlier = x.clone()
    earlier[0] += 1.0
    assert (model(later)[0][0][0] - out[0]).abs().max() > 1e-4  # frame 0 sees the last frame
    assert (model(earlier)[0][0][-1] - out[-1]).abs().max() > 1e-4  # and the last frame sees frame 0
    causal = ConvLSTM(1, 2, 3, 2, batch_first=False, spatial_dims=2)
    (ref,), _ = causal(x)
    torch.testing.assert_close(causal(later)[0][0][:-1], ref[:-1])


def _rollout_cell_state(cell: ConvLSTMCell, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, c)`` after running ``cell`` over ``x`` ``(T, B, C, *sp)`` step by step (bf16 autocast or not)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        state = None
        for frame in x:
            state = cell.step(cell.input_to_state(frame), state)
    return state


@pytest.mark.parametrize("peephole", [False, True])
def test_cell_state_stays_float32_under_autocast_and_drifts_less(peephole):
    """30 frames under bf16 autocast: ``c`` is float32 and closer to the float32 run than a bf16 ``c``."""
    torch.manual_seed(0)
    cell = ConvLSTMCell(4, 8, 3, spatial_dims=3, peephole=peephole)
    with torch.no_grad():  # a long memory, as trained cells keep: forget gate near 1
        cell.conv.bias[8:16] = 3.0
        if peephole:
            cell.w_peephole.uniform_(-0.2, 0.2)
    x = torch.randn(30, 2, 4, 6, 6, 3)
    _, c_ref = _rollout_cell_state(cell, x, autocast=False)
    h, c = _rollout_cell_state(cell, x, autocast=True)
    assert c.dtype == torch.float32 and h.dtype == torch.bfloat16  # h only feeds the bf16 convolutions
    err_now = float((c - c_ref).norm() / c_ref.norm())
    try:
        ConvLSTMCell.state_dtype = None  # the gate arithmetic and c in bf16, as before
        _, c_bf16 = _rollout_cell_state(cell, x, autocast=True)
    finally:
        ConvLSTMCell.state_dtype = torch.float32
    assert c_bf16.dtype == torch.bfloat16
    err_before = float((c_bf16.float() - c_ref).norm() / c_ref.norm())
    assert err_now < err_before / 2, (err_now, err_before)
