"""Convolutional LSTM (Shi et al. 2015) cells and sequence layers for 2 or 3 spatial dimensions.

Equations (``*`` convolution, ``∘`` Hadamard product, ``σ`` logistic sigmoid)::

    i_t = σ(W_xi * X_t + W_hi * H_{t-1} [+ w_ci ∘ C_{t-1}] + b_i)
    f_t = σ(W_xf * X_t + W_hf * H_{t-1} [+ w_cf ∘ C_{t-1}] + b_f)
    g_t = tanh(W_xg * X_t + W_hg * H_{t-1} + b_g)
    C_t = f_t ∘ C_{t-1} + i_t ∘ g_t
    o_t = σ(W_xo * X_t + W_ho * H_{t-1} [+ w_co ∘ C_t] + b_o)
    H_t = o_t ∘ tanh(C_t)

The bracketed peephole terms are optional (``peephole=True``). As in Shi et al., the output gate looks at
the *new* cell state ``C_t``. Unlike Shi et al., the peephole weights are one value per channel, broadcast
over space, so a model stays independent of the patch size (parameter ``w_peephole`` of shape
``(3, hidden_dim)``, rows ``ci, cf, co``, initialised to zero so a fresh peephole cell computes exactly
what a plain cell does).

Parameter layout (kept from the seed code, so its checkpoints load): one convolution ``conv`` maps
``[X_t, H_{t-1}]`` (input channels first) to the four gates in the order ``i, f, o, g``. A stack of cells is
``cell_list.N.conv.{weight,bias}``. Here that convolution is never run on a concatenation: its weight is
sliced into the input part ``W_x = conv.weight[:, :input_dim]`` and the hidden part
``W_h = conv.weight[:, input_dim:]`` (the same function, since a convolution is linear in its input
channels). ``W_x * X_t`` runs for all ``T`` frames in one batched call; only ``W_h * H_{t-1}`` and the
gate arithmetic loop over time, and the first step of a zero initial state skips ``W_h`` altogether.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ConvLSTMCell", "ConvLSTM", "State"]

State = tuple[Tensor, Tensor]
"""``(h, c)``: hidden and cell state, each ``(B, hidden_dim, *spatial)``."""

KernelArg = Union[int, Sequence[int]]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_FCONV = {2: F.conv2d, 3: F.conv3d}


def _kernel_tuple(kernel_size: KernelArg, spatial_dims: int) -> tuple[int, ...]:
    """An int or a ``spatial_dims``-sequence of odd positive ints -> tuple; anything else is a ValueError."""
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        kernel = (kernel_size,) * spatial_dims
    elif isinstance(kernel_size, Sequence) and all(
        isinstance(k, int) and not isinstance(k, bool) for k in kernel_size
    ):
        kernel = tuple(kernel_size)
    else:
        raise ValueError(
            f"kernel_size must be an int or a sequence of {spatial_dims} ints, got {kernel_size!r}"
        )
    if len(kernel) != spatial_dims:
        raise ValueError(f"kernel_size {kernel_size!r} has {len(kernel)} entries, expected {spatial_dims}")
    if any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(
            f"kernel_size {kernel_size!r} must be odd and positive in every dimension: an even kernel "
            "cannot keep the state aligned with the input ('same' padding)"
        )
    return kernel


def _mkldnn_would_be_skipped(h: Tensor) -> bool:
    """Whether PyTorch's CPU convolution falls back to its slow (im2col) kernel for this input.

    ATen picks oneDNN for a float32 convolution only if ``N > 1`` or ``N * C * S0 * S1 > 20480`` (``S0, S1``
    the first two spatial sizes; a heuristic tuned for 2D). A one-sample hidden state of a coarse level
    misses both, and the fallback's backward is 1.5-3x slower. bfloat16 (autocast) always takes oneDNN.
    """
    return (
        h.device.type == "cpu"
        and h.shape[0] == 1
        and h.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and h.shape[1] * h.shape[2] * h.shape[3] <= 20480
    )


def _conv_as_two_halves(fconv, h: Tensor, weight: Tensor, padding: tuple[int, ...]) -> Optional[Tensor]:
    """``fconv(h, weight, padding=padding)`` for one sample, computed as a batch of two halves.

    The first even spatial axis is cut in two halves, each with a halo of ``padding`` voxels of its
    neighbour (zeros at the border, as 'same' padding), so the same FLOPs run as a batch of two, which
    oneDNN takes (see :func:`_mkldnn_would_be_skipped`). Returns None when no axis can be halved.
    """
    for axis in range(2, h.dim()):
        size, pad = h.shape[axis], padding[axis - 2]
        if size % 2 or size < 2 * max(pad, 1):
            continue
        half = size // 2
        spec = [0, 0] * (h.dim() - 2)
        spec[2 * (h.dim() - 1 - axis)] = spec[2 * (h.dim() - 1 - axis) + 1] = pad
        padded = F.pad(h, spec)
        parts = torch.cat([padded.narrow(axis, 0, half + 2 * pad), padded.narrow(axis, half, half + 2 * pad)])
        inner = list(padding)
        inner[axis - 2] = 0
        out = fconv(parts, weight, None, padding=tuple(inner))
        return torch.cat([out[:1], out[1:]], dim=axis)
    return None


def _gate_values(a: Tensor, c_prev: Optional[Tensor], w: Optional[Tensor]) -> tuple[Tensor, ...]:
    """``(i, f, o, g, c, tanh(c))`` of the ConvLSTM equations (module docstring) from the pre-activations
    ``a`` ``(B, 4H, *sp)`` (order i, f, o, g) and ``c_prev`` (``None``: zero), all in ``a``'s dtype.
    ``w``: the peephole weights ``(3, H)`` or ``None``."""
    if w is None:
        a_ifo, a_g = a.split([3 * a.shape[1] // 4, a.shape[1] // 4], dim=1)
        i, f, o = torch.sigmoid(a_ifo).chunk(3, dim=1)
        g = torch.tanh(a_g)
        c = i * g if c_prev is None else torch.addcmul(i * g, f, c_prev)
        return i, f, o, g, c, torch.tanh(c)
    a_i, a_f, a_o, a_g = a.chunk(4, dim=1)
    g = torch.tanh(a_g)
    w = w.to(a.dtype).view(3, 1, -1, *([1] * (a.dim() - 2)))
    if c_prev is None:
        i, f = torch.sigmoid(a_i), None
        c = i * g
    else:
        i = torch.sigmoid(torch.addcmul(a_i, w[0], c_prev))
        f = torch.sigmoid(torch.addcmul(a_f, w[1], c_prev))
        c = torch.addcmul(i * g, f, c_prev)
    o = torch.sigmoid(torch.addcmul(a_o, w[2], c))
    return i, f, o, g, c, torch.tanh(c)


class _GateFunction(torch.autograd.Function):
    """``(a, c_prev, w_peephole) -> (h, c)``: the gate arithmetic of one step, recomputed in backward.

    Written by hand because autograd would save six gate tensors per step (i, f, o, g, c, tanh c) in the
    arithmetic's float32, a third more activation memory than the bf16 gates of autocast for the default
    model; this saves only the pre-activations as they come (bf16 under autocast) and ``c_prev``, and
    recomputes the elementwise gates in backward (cheap next to the convolutions).

    Args (of ``apply``): ``a`` ``(B, 4H, *sp)``; ``c_prev`` ``(B, H, *sp)`` or ``None`` (zero state);
    ``w`` ``(3, H)`` or ``None``; ``arithmetic``: the dtype of the arithmetic and of ``c``; ``out_dtype``:
    that of ``h``.
    """

    @staticmethod
    def forward(ctx, a, c_prev, w, arithmetic, out_dtype):  # noqa: ANN001, ANN205 - autograd's signature
        a32 = a.to(arithmetic)
        cp = None if c_prev is None else c_prev.to(arithmetic)
        *_, o, _g, c, tc = _gate_values(a32, cp, w)
        if a._base is not None and any(ctx.needs_input_grad):
            # a view (the first step's gates are a slice of all frames' input gates): saved as it is, it
            # would keep every frame's input gates alive until backward
            a = a.clone()
        ctx.save_for_backward(a, c_prev, w)
        ctx.arithmetic = arithmetic
        return (o * tc).to(out_dtype), c

    @staticmethod
    def backward(ctx, dh, dc_out):  # noqa: ANN001, ANN205
        a, c_prev, w = ctx.saved_tensors
        arithmetic = ctx.arithmetic
        a32 = a.to(arithmetic)
        cp = None if c_prev is None else c_prev.to(arithmetic)
        i, f, o, g, c, tc = _gate_values(a32, cp, w)
        dh = torch.zeros_like(c) if dh is None else dh.to(arithmetic)
        dc = torch.zeros_like(c) if dc_out is None else dc_out.to(arithmetic)
        do = dh * tc
        dz_o = do * o * (1 - o)
        dc = dc + dh * o * (1 - tc * tc)
        wv = None if w is None else w.to(arithmetic).view(3, 1, -1, *([1] * (a.dim() - 2)))
        if wv is not None:
            dc = dc + dz_o * wv[2]
        dz_i = dc * g * i * (1 - i)
        dz_g = dc * i * (1 - g * g)
        if cp is None:
            dz_f = torch.zeros_like(c)
            dcp = None
        else:
            dz_f = dc * cp * f * (1 - f)
            dcp = dc * f
            if wv is not None:
                dcp = dcp + dz_i * wv[0] + dz_f * wv[1]
        da = torch.cat([dz_i, dz_f, dz_o, dz_g], dim=1).to(a.dtype)
        dw = None
        if w is not None and ctx.needs_input_grad[2]:
            reduce = [0, *range(2, a.dim())]
            zero = torch.zeros(dz_i.shape[1], dtype=arithmetic, device=a.device)
            dw = torch.stack([
                zero if cp is None else (dz_i * cp).sum(reduce),
                zero if cp is None else (dz_f * cp).sum(reduce),
                (dz_o * c).sum(reduce),
            ]).to(w.dtype)
        if dcp is not None:
            dcp = dcp.to(c_prev.dtype)
        return da, dcp, dw, None, None


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell (one layer, one direction).

    Args:
        input_dim: channels of the input ``X_t``.
        hidden_dim: channels of ``H`` and ``C``.
        kernel_size: odd int or one odd int per spatial dimension; 'same' padding.
        bias: gate bias (the seed's ``bias``).
        spatial_dims: 2 or 3.
        peephole: add the per-channel peephole terms (see the module docstring).

    ``forward(input_tensor (B, input_dim, *sp), cur_state=(h, c)) -> (h_next, c_next)`` is one time step,
    call-compatible with the seed cell. Sequence layers use :meth:`input_to_state` (all frames at once)
    and :meth:`step` (the recurrent part) instead.
    """

    state_dtype: Optional[torch.dtype] = torch.float32
    """dtype of the gate arithmetic and the cell state ``c`` under autocast (see :meth:`_gates`); ``None``
    keeps the convolutions' low precision throughout (trunet before 2026-12, kept to measure the drift)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        kernel_size: KernelArg,
        bias: bool = True,
        *,
        spatial_dims: int = 2,
        peephole: bool = False,
    ):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if input_dim < 1 or hidden_dim < 1:
            raise ValueError(f"input_dim and hidden_dim must be positive, got {input_dim}, {hidden_dim}")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.spatial_dims = spatial_dims
        self.kernel_size = _kernel_tuple(kernel_size, spatial_dims)
        self.padding = tuple(k // 2 for k in self.kernel_size)
        self.bias = bias
        self.conv = _CONV[spatial_dims](
            input_dim + hidden_dim, 4 * hidden_dim, self.kernel_size, padding=self.padding, bias=bias
        )
        self.peephole = peephole
        if peephole:
            self.w_peephole = nn.Parameter(torch.zeros(3, hidden_dim))
        else:
            self.register_parameter("w_peephole", None)
        self._fconv = _FCONV[spatial_dims]

    def extra_repr(self) -> str:
        return f"peephole={self.peephole}"

    # -- the two halves of the gate convolution -------------------------------------------------------
    def split_weight(self) -> tuple[Tensor, Tensor]:
        """``(W_x, W_h)``: views of ``conv.weight``, shapes ``(4H, input_dim, *k)`` and ``(4H, H, *k)``."""
        # split, not indexing: its backward is one concatenation, not a zero-filled copy per part
        w_x, w_h = self.conv.weight.split([self.input_dim, self.hidden_dim], dim=1)
        return w_x, w_h

    def input_to_state(self, x: Tensor, w_x: Optional[Tensor] = None) -> Tensor:
        """``W_x * x + b`` for any number of frames folded into the batch: ``(N, input_dim, *sp) -> (N, 4H, *sp)``."""
        if w_x is None:
            w_x = self.split_weight()[0]
        return self._fconv(x, w_x, self.conv.bias, padding=self.padding)

    def step(self, gx: Tensor, state: Optional[State], w_h: Optional[Tensor] = None) -> State:
        """One recurrent step from precomputed input gates ``gx`` ``(B, 4H, *sp)``.

        ``state=None`` means a zero initial state (the hidden convolution is skipped).
        """
        if state is None:
            return self._gates(gx, None)
        h, c = state
        if w_h is None:
            w_h = self.split_weight()[1]
        return self._gates(gx + self.state_to_state(h, w_h), c)

    def state_to_state(self, h: Tensor, w_h: Tensor) -> Tensor:
        """``W_h * h``: ``(B, H, *sp) -> (B, 4H, *sp)`` (no bias: it is in the input part)."""
        if _mkldnn_would_be_skipped(h):
            out = _conv_as_two_halves(self._fconv, h, w_h, self.padding)
            if out is not None:
                return out
        return self._fconv(h, w_h, None, padding=self.padding)

    def _arithmetic_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """:attr:`state_dtype` for a half-precision ``dtype`` (bf16, fp16); any other dtype stays."""
        if self.state_dtype is not None and dtype in (torch.bfloat16, torch.float16):
            return self.state_dtype
        return dtype

    def _gates(self, a: Tensor, c_prev: Optional[Tensor]) -> State:
        """Gate arithmetic on the pre-activations ``a`` ``(B, 4H, *sp)`` (order i, f, o, g).

        Runs in float32 for half-precision ``a``: under autocast the convolutions give bf16/fp16
        pre-activations, but the cell state is carried across every frame of a cine (30 and more), and a
        bf16 ``c`` (8 bits of mantissa) rounds the small forget-gate decrements away frame after frame.
        So ``c`` is float32; ``h`` goes back in the dtype of ``a`` (the convolutions'), since it only feeds
        them. The class attribute :attr:`state_dtype` (``None``: the
        pre-activations' own dtype) exists to measure that drift. Memory: see :class:`_GateFunction`.
        """
        return _GateFunction.apply(a, c_prev, self.w_peephole, self._arithmetic_dtype(a.dtype), a.dtype)

    def forward(self, input_tensor: Tensor, cur_state: Sequence[Tensor]) -> State:
        """One time step: ``input_tensor (B, input_dim, *sp)``, ``cur_state (h, c)`` -> ``(h_next, c_next)``."""
        h, c = cur_state
        return self.step(self.input_to_state(input_tensor), (h, c))

    def init_hidden(self, batch_size: int, image_size: Sequence[int]) -> State:
        """Zero ``(h, c)`` of shape ``(batch_size, hidden_dim, *image_size)`` on the weights' device/dtype."""
        w = self.conv.weight
        shape = (batch_size, self.hidden_dim, *image_size)
        return torch.zeros(shape, device=w.device, dtype=w.dtype), torch.zeros(shape, device=w.device, dtype=w.dtype)


def _per_layer(value, num_layers: int, name: str) -> list:
    """A single value (int, or a kernel tuple) repeated, or a list with one entry per layer."""
    if isinstance(value, list):
        if len(value) != num_layers:
            raise ValueError(f"{name} has {len(value)} entries but num_layers is {num_layers}")
        return list(value)
    return [value] * num_layers


class ConvLSTM(nn.Module):
    """A stack of ConvLSTM layers run over a sequence.

    Args:
        input_dim: channels of the input.
        hidden_dim: channels per layer, an int or a list with one int per layer.
        kernel_size: an odd int, a tuple (one odd int per spatial dim), or a list of those per layer.
        num_layers: stacked layers; layer ``n`` reads layer ``n - 1``'s output sequence.
        batch_first: input and output ``(B, T, C, *sp)``; otherwise ``(T, B, C, *sp)`` for both
            (**unlike the seed**, which always returned batch-first outputs).
        bias: gate bias.
        return_all_layers: return every layer's output and last state, not only the last layer's.
        stateful: keep the last states (all layers, detached: truncated back-propagation through time) and
            start the next call from them until :meth:`reset_state`.
        spatial_dims: 2 or 3.
        peephole: per-channel peephole terms in every cell.
        bidirectional: also run each layer backwards in time (cells ``cell_list_reverse.N``) and merge the
            two output sequences with a 1x1 convolution (``merge_list.N``) to ``hidden_dim[N]`` channels.
            Not causal. The last state returned is the forward direction's; not combinable with ``stateful``.

    Input: ``(B, T, C, *sp)`` if ``batch_first`` else ``(T, B, C, *sp)``; optionally ``hidden_state``, a list
    with one ``(h, c)`` per layer, each ``(B, hidden_dim, *sp)``.

    Returns:
        ``(layer_output_list, last_state_list)`` as in the seed: a list of output sequences (same layout as
        the input, ``hidden_dim`` channels) and a list of ``(h, c)`` at the last frame, one per layer, or only
        the last layer's unless ``return_all_layers``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: Union[int, list[int]],
        kernel_size: Union[KernelArg, list[KernelArg]],
        num_layers: int,
        batch_first: bool = False,
        bias: bool = True,
        return_all_layers: bool = False,
        stateful: bool = False,
        *,
        spatial_dims: int = 2,
        peephole: bool = False,
        bidirectional: bool = False,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if bidirectional and stateful:
            raise ValueError("a bidirectional ConvLSTM cannot be stateful: the backward pass needs the whole sequence")
        kernels = _per_layer(kernel_size, num_layers, "kernel_size")
        hidden = _per_layer(hidden_dim, num_layers, "hidden_dim")
        self.input_dim = input_dim
        self.hidden_dim = hidden
        self.kernel_size = [_kernel_tuple(k, spatial_dims) for k in kernels]
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.bias = bias
        self.return_all_layers = return_all_layers
        self.stateful = stateful
        self.spatial_dims = spatial_dims
        self.bidirectional = bidirectional
        self.checkpointing = False  # recompute each time step in backward (set by the owner)
        inputs = [input_dim] + hidden[:-1]

        def cells() -> nn.ModuleList:
            return nn.ModuleList(
                ConvLSTMCell(i, h, k, bias, spatial_dims=spatial_dims, peephole=peephole)
                for i, h, k in zip(inputs, hidden, self.kernel_size)
            )

        self.cell_list = cells()
        if bidirectional:
            self.cell_list_reverse = cells()
            self.merge_list = nn.ModuleList(_CONV[spatial_dims](2 * h, h, 1) for h in hidden)
        self.last_state: Optional[list[State]] = None

    def reset_state(self) -> None:
        """Forget the carried state of a stateful layer."""
        self.last_state = None

    def forward(
        self, input_tensor: Tensor, hidden_state: Optional[Sequence[Sequence[Tensor]]] = None
    ) -> tuple[list[Tensor], list[State]]:
        expected = 3 + self.spatial_dims
        if input_tensor.dim() != expected:
            layout = "(B, T, C, *spatial)" if self.batch_first else "(T, B, C, *spatial)"
            raise ValueError(
                f"ConvLSTM(spatial_dims={self.spatial_dims}) expects a {expected}-D input {layout}, "
                f"got shape {tuple(input_tensor.shape)}"
            )
        if input_tensor.shape[2] != self.input_dim:
            raise ValueError(
                f"ConvLSTM expects {self.input_dim} input channels (dim 2), got shape {tuple(input_tensor.shape)}"
            )
        if hidden_state is None and self.stateful:
            hidden_state = self.last_state
        if hidden_state is not None and len(hidden_state) != self.num_layers:
            raise ValueError(f"hidden_state needs one (h, c) per layer ({self.num_layers}), got {len(hidden_state)}")

        outputs: list[Tensor] = []
        states: list[State] = []
        current = input_tensor
        for n in range(self.num_layers):
            init = None if hidden_state is None else tuple(hidden_state[n])
            out, last = self._run(self.cell_list[n], current, init, reverse=False)
            if self.bidirectional:
                back, _ = self._run(self.cell_list_reverse[n], current, None, reverse=True)
                out = self._merge(self.merge_list[n], out, back)
            outputs.append(out)
            states.append(last)
            current = out
        if self.stateful:
            self.last_state = [(h.detach(), c.detach()) for h, c in states]
        if not self.return_all_layers:
            outputs, states = outputs[-1:], states[-1:]
        return outputs, states

    def _run(
        self, cell: ConvLSTMCell, x: Tensor, init: Optional[State], reverse: bool
    ) -> tuple[Tensor, State]:
        """One layer, one direction. ``x`` in the layer's layout; returns the output sequence, same layout."""
        t_axis = 1 if self.batch_first else 0
        d0, d1 = x.shape[:2]
        steps = x.shape[t_axis]
        w_x, w_h = cell.split_weight()
        # all frames in one call: fold the two leading axes (whichever order they are in) into the batch
        gx = cell.input_to_state(x.reshape(d0 * d1, *x.shape[2:]), w_x)
        gx = gx.view(d0, d1, *gx.shape[1:])
        if init is not None:
            batch = x.shape[1 - t_axis]
            want = (batch, cell.hidden_dim, *x.shape[3:])
            if tuple(init[0].shape) != want or tuple(init[1].shape) != want:
                raise ValueError(
                    f"initial state shapes {tuple(init[0].shape)}, {tuple(init[1].shape)} do not match {want}"
                )
        state = init
        w_h = w_h.contiguous()
        hs: list[Tensor] = [None] * steps  # type: ignore[list-item]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        use_ckpt = self.checkpointing and torch.is_grad_enabled()
        frames = gx.unbind(t_axis)  # one backward (a stack) instead of a zero-filled gradient per frame
        for t in order:
            g_t = frames[t]
            if use_ckpt:
                state = checkpoint(cell.step, g_t, state, w_h, use_reentrant=False)
            else:
                state = cell.step(g_t, state, w_h)
            hs[t] = state[0]
        return torch.stack(hs, dim=t_axis), state  # type: ignore[return-value]

    def _merge(self, merge: nn.Module, fwd: Tensor, back: Tensor) -> Tensor:
        """1x1 conv over ``[forward, backward]`` channels, frames folded into the batch."""
        d0, d1 = fwd.shape[:2]
        both = torch.cat([fwd, back], dim=2).reshape(d0 * d1, -1, *fwd.shape[3:])
        out = merge(both)
        return out.view(d0, d1, *out.shape[1:])
