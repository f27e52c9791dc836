"""The time-resolved UNet3D: a per-frame nnU-Net-style 3D UNet whose bottleneck and chosen skip levels
run through 3D ConvLSTMs, so every frame of a cine sees the frames before it (and after it, when
bidirectional)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from trunet.models.blocks import Decoder, Encoder, TemporalCLSTM
from trunet.models.clstm import State

__all__ = ["TimeResolvedUNet"]

Triple = tuple[int, int, int]
TripleArg = Union[int, Sequence[int]]


def _triples(values: Sequence[TripleArg], name: str, count: int) -> list[Triple]:
    """A list of ints or 3-sequences of positive ints -> list of 3-tuples of length ``count``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of (x, y, z) triples, got {values!r}")
    if len(values) != count:
        raise ValueError(f"{name} needs {count} entries, got {len(values)}: {list(values)!r}")
    out = []
    for v in values:
        t = (v, v, v) if isinstance(v, int) else tuple(v)
        if len(t) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in t):
            raise ValueError(f"{name}: every entry must be a positive int or 3 positive ints, got {v!r}")
        out.append(t)
    return out


class TimeResolvedUNet(nn.Module):
    """UNet3D with ConvLSTM3D layers for 4D (cine) segmentation.

    Everything that is not recurrent (encoder, decoder, heads) runs on the ``B*T`` frames folded into the
    batch. The recurrence lives in :class:`~trunet.models.blocks.TemporalCLSTM` modules on the levels named
    by ``clstm_levels`` (residual: features + ConvLSTM output). Unidirectional by default, so the output at
    frame ``t`` depends on frames ``0..t`` only (causal).

    Args:
        in_channels: image channels ``C`` (1 for cine MRI).
        out_channels: classes ``K``.
        channels: features per level, level 0 = full resolution, the last = bottleneck.
        strides: one ``(sx, sy, sz)`` per downsampling (``len(channels) - 1``), so anisotropic data can be
            pooled in-plane first; lists or tuples.
        kernel_sizes: one ``(kx, ky, kz)`` (odd) per level, default 3x3x3 everywhere; also the ConvLSTM
            kernel at that level.
        clstm_levels: ``"all"``, ``"bottleneck"`` or a sequence of level indices (0 = full resolution;
            empty = no recurrence, a per-frame 3D UNet).
        clstm_reduction: the ConvLSTMs run on ``C // clstm_reduction`` channels behind 1x1 projections
            (see :class:`~trunet.models.blocks.TemporalCLSTM`); 1 = on all ``C`` channels.
        bidirectional: ConvLSTMs also run backwards in time (not causal).
        peephole: peephole terms in the ConvLSTM cells.
        deep_supervision: in training mode return logits of every decoder level.
        checkpointing: recompute encoder/decoder stages and ConvLSTM time steps in backward
            (``torch.utils.checkpoint``, non-reentrant): same gradients, less activation memory.

    Input ``(B, T, C, X, Y, Z)`` with ``X, Y, Z`` multiples of :attr:`size_divisor`.

    Returns:
        logits ``(B, T, K, X, Y, Z)``; with ``deep_supervision`` in training mode a list: that, then the
        lower-resolution logits ``(B, T, K, X / P_l, ...)`` for levels ``l = 1 .. len(channels) - 2``, where
        ``P_l`` = :attr:`level_scales` ``[l]``.

    Example::

        >>> import torch
        >>> net = TimeResolvedUNet(1, 4, channels=[4, 8], strides=[(2, 2, 1)])
        >>> net.size_divisor
        (2, 2, 1)
        >>> net(torch.randn(1, 3, 1, 8, 8, 2)).shape  # (B, T, C, X, Y, Z) -> (B, T, K, X, Y, Z)
        torch.Size([1, 3, 4, 8, 8, 2])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        channels: Sequence[int] = (32, 64, 128, 256, 320),
        strides: Sequence[TripleArg] = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 1)),
        kernel_sizes: Sequence[TripleArg] | None = None,
        clstm_levels: Union[str, Sequence[int]] = "all",
        clstm_reduction: int = 1,
        bidirectional: bool = False,
        peephole: bool = False,
        deep_supervision: bool = False,
        checkpointing: bool = False,
    ):
        super().__init__()
        channels = list(channels)
        if len(channels) < 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels must be at least two positive ints, got {channels!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        levels = len(channels)
        strides_t = _triples(strides, "strides", levels - 1)
        kernels_t = _triples(kernel_sizes if kernel_sizes is not None else [3] * levels, "kernel_sizes", levels)
        if any(k % 2 == 0 for t in kernels_t for k in t):
            raise ValueError(f"kernel_sizes must be odd, got {kernels_t}")
        if clstm_levels == "all":
            temporal_levels = list(range(levels))
        elif clstm_levels == "bottleneck":
            temporal_levels = [levels - 1]
        elif isinstance(clstm_levels, Sequence) and not isinstance(clstm_levels, str):
            temporal_levels = sorted(set(clstm_levels))
            if not all(isinstance(i, int) and 0 <= i < levels for i in temporal_levels):
                raise ValueError(f"clstm_levels must be level indices in 0..{levels - 1}, got {clstm_levels!r}")
        else:
            raise ValueError(f"clstm_levels must be 'all', 'bottleneck' or a list of levels, got {clstm_levels!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.strides = strides_t
        self.kernel_sizes = kernels_t
        self.clstm_levels = temporal_levels
        self.bidirectional = bidirectional
        self.deep_supervision = deep_supervision
        scales = [(1, 1, 1)]
        for s in strides_t:
            scales.append(tuple(a * b for a, b in zip(scales[-1], s)))
        self.level_scales: list[Triple] = scales  # type: ignore[assignment]
        self.size_divisor: Triple = scales[-1]  # type: ignore[assignment]

        self.encoder = Encoder(in_channels, channels, strides_t, kernels_t)
        self.temporal = nn.ModuleDict(
            {
                str(l): TemporalCLSTM(channels[l], kernels_t[l], bidirectional=bidirectional, peephole=peephole,
                                      reduction=clstm_reduction)
                for l in temporal_levels
            }
        )
        self.decoder = Decoder(channels, strides_t, kernels_t, out_channels, deep_supervision)
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self._checkpointing = bool(value)
        self.encoder.checkpointing = self.decoder.checkpointing = self._checkpointing
        for module in self.temporal.values():
            module.checkpointing = self._checkpointing

    @property
    def causal(self) -> bool:
        """Whether the output at frame ``t`` depends only on frames ``<= t``."""
        return not self.bidirectional

    def check_input_size(self, spatial_size: Sequence[int]) -> None:
        """Raise a ValueError naming the sizes that work if ``(X, Y, Z)`` is not a multiple of :attr:`size_divisor`."""
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3:
            raise ValueError(f"expected a spatial size (X, Y, Z), got {spatial_size!r}")
        bad = [(axis, s, d) for axis, s, d in zip("XYZ", size, self.size_divisor) if s < d or s % d]
        if not bad:
            return
        hints = []
        for axis, s, d in bad:
            below = (s // d) * d
            above = max(1, math.ceil(s / d)) * d
            near = f"{below} or {above}" if below else f"{above}"
            hints.append(f"{axis}={s} is not a multiple of {d} (nearest that work: {near})")
        raise ValueError(
            f"spatial size {size} does not fit the model's strides {self.strides}: every size must be a "
            f"multiple of size_divisor {self.size_divisor}; " + "; ".join(hints)
            + f"; e.g. {self.fit_size(size)} after padding"
        )

    def fit_size(self, spatial_size: Sequence[int]) -> Triple:
        """The smallest size ``>= spatial_size`` the model accepts (per axis, the next multiple of the divisor)."""
        return tuple(max(1, math.ceil(int(s) / d)) * d for s, d in zip(spatial_size, self.size_divisor))  # type: ignore[return-value]

    def forward(self, x: Tensor, decode: Optional[Tensor] = None) -> Union[Tensor, list[Tensor]]:
        """Logits of every frame, or of the frames marked in ``decode`` only.

        Args:
            x: ``(B, T, C, X, Y, Z)``.
            decode: optional ``(B, T)`` bool: decode these frames only, after the ConvLSTMs have seen them
                all. Training on ED/ES labels needs the logits of the labelled frames only (one or two of a
                window's ``T``); the decoder is most of a step's work, so a step runs 1.4-1.7x faster
                (BENCHMARKS.md, "Model"). Same logits for the frames kept as a full forward.

        Returns:
            ``(B, T, K, X, Y, Z)`` (a list of resolutions with deep supervision in training mode); with
            ``decode``: ``(1, N, K, X, Y, Z)`` for its ``N`` marked frames, in ``(b, t)`` order (all frames
            when none is marked).
        """
        all_levels = self.deep_supervision and self.training
        logits, _ = self._run(x, None, all_levels, decode)
        return logits if all_levels else logits[0]

    def forward_streaming(self, x: Tensor, state: Optional[dict[str, State]] = None) -> tuple[Tensor, dict[str, State]]:
        """The next frames of a series, continuing from the ConvLSTM state of the frames before them.

        Running a series ``(B, T, C, X, Y, Z)`` in consecutive time chunks, each call given the state the
        previous one returned, gives the same logits as one :meth:`forward` over all ``T`` frames (to float
        rounding), while memory holds one chunk's activations: how inference streams a long cine.
        Causal models only (a bidirectional model needs the frames after the chunk).

        Args:
            x: the chunk ``(B, T_chunk, C, X, Y, Z)``.
            state: what the previous call returned; ``None`` = start of the series (zero state).

        Returns:
            ``(logits (B, T_chunk, K, X, Y, Z), state)``; ``state`` maps each ConvLSTM level (as a string) to
            its ``(h, c)``, each ``(B, C_l // clstm_reduction, X / P_l, ...)``.
        """
        if self.bidirectional:
            raise ValueError("forward_streaming needs a causal model; this one is bidirectional")
        logits, new_state = self._run(x, state if state is not None else {}, all_levels=False)
        return logits[0], new_state

    def _run(
        self, x: Tensor, state: Optional[dict[str, State]], all_levels: bool, decode: Optional[Tensor] = None
    ) -> tuple[list[Tensor], dict[str, State]]:
        """Logits of the decoder levels asked for; ``state`` None = plain forward (no state returned);
        ``decode``: see :meth:`forward`."""
        if x.dim() != 6:
            raise ValueError(f"TimeResolvedUNet expects input (B, T, C, X, Y, Z), got shape {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(
                f"TimeResolvedUNet expects C={self.in_channels} channels at dim 2, got shape {tuple(x.shape)}"
            )
        self.check_input_size(x.shape[3:])
        batch, frames = x.shape[:2]
        features = self.encoder(x.reshape(batch * frames, *x.shape[2:]))
        new_state: dict[str, State] = {}
        for level, module in self.temporal.items():
            if state is None:
                features[int(level)] = module(features[int(level)], batch)
            else:
                features[int(level)], new_state[level] = module.run(features[int(level)], batch, state.get(level))
        if decode is not None:
            if tuple(decode.shape) != (batch, frames):
                raise ValueError(f"decode must be (B, T) = {(batch, frames)}, got {tuple(decode.shape)}")
            keep = decode.reshape(-1).to(device=x.device, dtype=torch.bool)
            if bool(keep.any()):
                features = [f[keep] for f in features]
                batch, frames = 1, int(keep.sum())
        logits = [y.view(batch, frames, *y.shape[1:]) for y in self.decoder(features, all_levels=all_levels)]
        return logits, new_state
