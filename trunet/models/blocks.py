"""Building blocks of :class:`~trunet.models.unet.TimeResolvedUNet`: encoder, decoder, temporal skip.

The per-frame convolution stages are MONAI's nnU-Net blocks (``UnetBasicBlock``: two convs, each followed
by InstanceNorm and LeakyReLU; ``UnetUpBlock``: transposed conv, concatenation with the skip, a basic
block; ``UnetOutBlock``: 1x1 head). Encoder and decoder only ever see frames folded into the batch,
``(B*T, C, X, Y, Z)``; :class:`TemporalCLSTM` is the one place where time is unfolded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trunet.models.clstm import ConvLSTM, State

__all__ = ["Encoder", "Decoder", "TemporalCLSTM", "NORM", "ACT"]

Triple = tuple[int, int, int]

NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": True})
"""InstanceNorm with affine parameters (nnU-Net). No BatchNorm: the frames of one case are not i.i.d."""
ACT: tuple[str, dict[str, Any]] = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def run_stage(module: Callable[..., Tensor], *args: Tensor, recompute: bool = False) -> Tensor:
    """``module(*args)``, recomputed in backward instead of storing activations when ``recompute``."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Encoder(nn.Module):
    """Stage ``l`` maps level ``l - 1`` to level ``l``; stage 0 keeps the resolution, stage ``l > 0``
    downsamples with a strided first convolution by ``strides[l - 1]``.

    Args:
        in_channels: input channels.
        channels: output channels per stage (level).
        strides: one ``(sx, sy, sz)`` per downsampling, ``len(channels) - 1`` of them.
        kernel_sizes: one ``(kx, ky, kz)`` per stage.

    ``forward(x (N, in_channels, X, Y, Z))`` -> list of features per level, level ``l`` of shape
    ``(N, channels[l], X / Px_l, Y / Py_l, Z / Pz_l)`` with ``P_l`` the product of the first ``l`` strides.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        strides: Sequence[Triple],
        kernel_sizes: Sequence[Triple],
    ):
        super().__init__()
        ins = [in_channels, *channels[:-1]]
        steps = [(1, 1, 1), *strides]
        self.stages = nn.ModuleList(
            UnetBasicBlock(3, i, o, kernel_size=k, stride=s, norm_name=NORM, act_name=ACT)
            for i, o, k, s in zip(ins, channels, kernel_sizes, steps)
        )
        self.checkpointing = False

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = run_stage(stage, x, recompute=self.checkpointing)
            features.append(x)
        return features


class Decoder(nn.Module):
    """Upsampling path: transposed convs with kernel = stride (exact alignment at every level, since the
    model only accepts sizes its strides divide), concatenation with the skip, a basic block, a 1x1 head.

    ``forward(features)`` (the encoder's list, deepest last) -> list of logits, full resolution first; with
    ``deep_supervision`` (and ``all_levels=True``) also the logits of every lower decoder level,
    ``(N, out_channels, *level_size)`` for levels ``0 .. len(channels) - 2``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[Triple],
        kernel_sizes: Sequence[Triple],
        out_channels: int,
        deep_supervision: bool = False,
    ):
        super().__init__()
        levels = len(channels) - 1
        # ups[l] brings level l + 1 up to level l
        self.ups = nn.ModuleList(
            UnetUpBlock(
                3,
                channels[l + 1],
                channels[l],
                kernel_size=kernel_sizes[l],
                stride=1,
                upsample_kernel_size=strides[l],
                norm_name=NORM,
                act_name=ACT,
            )
            for l in range(levels)
        )
        n_heads = levels if deep_supervision else 1
        self.heads = nn.ModuleList(UnetOutBlock(3, channels[l], out_channels) for l in range(n_heads))
        self.checkpointing = False

    def forward(self, features: Sequence[Tensor], all_levels: bool = False) -> list[Tensor]:
        x = features[-1]
        outputs: list[Tensor] = []
        for l in range(len(self.ups) - 1, -1, -1):
            x = run_stage(self.ups[l], x, features[l], recompute=self.checkpointing)
            if l < len(self.heads) and (all_levels or l == 0):
                outputs.append(self.heads[l](x))
        outputs.reverse()
        return outputs


class TemporalCLSTM(nn.Module):
    """A one-layer 3D ConvLSTM over the frames of a level's features, added residually.

    ``forward(features (B*T, C, X, Y, Z), batch=B) -> features + H`` where ``H`` ``(B*T, C, X, Y, Z)`` is the
    ConvLSTM output. Residual rather than replacing the features: at initialisation the network is a
    working per-frame UNet plus a small temporal correction, the encoder keeps an identity gradient path
    past the recurrence (no vanishing through ``T`` sigmoid gates), and the unbounded InstanceNorm/LeakyReLU
    features are not squashed into ``tanh``'s (-1, 1) on their way to the decoder.

    With ``reduction`` ``r > 1`` the recurrence runs on a narrow state: a 1x1 convolution reduces the
    ``C`` features to ``max(1, C // r)`` channels, the ConvLSTM runs on those, and a 1x1 convolution brings
    its output back to ``C``. A ConvLSTM gate convolution maps ``input + hidden`` to ``4 x hidden``
    channels, so its cost falls about as ``1 / r**2``: what makes bidirectional ConvLSTMs at every level
    affordable (what a spoilt frame needs from its neighbours is where the anatomy is, a few channels).

    Args:
        channels: feature channels of the level.
        kernel_size: the level's kernel.
        bidirectional / peephole: see :class:`~trunet.models.clstm.ConvLSTM`.
        reduction: channel reduction ``r`` of the recurrent state (1 = ConvLSTM on all ``C`` channels,
            no projections).
    """

    def __init__(self, channels: int, kernel_size: Triple, bidirectional: bool = False, peephole: bool = False,
                 reduction: int = 1):
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {reduction!r}")
        hidden = channels if reduction == 1 else max(1, channels // reduction)
        self.reduce = nn.Conv3d(channels, hidden, 1) if reduction > 1 else None
        self.expand = nn.Conv3d(hidden, channels, 1) if reduction > 1 else None
        self.clstm = ConvLSTM(
            hidden,
            hidden,
            kernel_size,
            1,
            batch_first=True,
            spatial_dims=3,
            peephole=peephole,
            bidirectional=bidirectional,
        )

    @property
    def checkpointing(self) -> bool:
        return self.clstm.checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self.clstm.checkpointing = value

    def forward(self, features: Tensor, batch: int) -> Tensor:
        return self.run(features, batch)[0]

    def run(self, features: Tensor, batch: int, state: Optional[State] = None) -> tuple[Tensor, State]:
        """``forward`` from a given state, also returning the state after the last frame.

        Args:
            features: ``(B*T, C, X, Y, Z)``, frames of each sample consecutive.
            batch: ``B``.
            state: ``(h, c)``, each ``(B, C // r, X, Y, Z)``, the state after the frame before the first one
                (``None`` = zero state). Only for a causal (unidirectional) layer: a bidirectional one's
                backward direction needs the frames after the last.

        Returns:
            ``(features + H, (h, c))``: so running a series in consecutive chunks, each from the state the
            previous chunk returned, gives the one-pass result.
        """
        if state is not None and self.clstm.bidirectional:
            raise ValueError("a bidirectional ConvLSTM cannot continue from a carried state")
        x = features if self.reduce is None else self.reduce(features)
        seq = x.view(batch, x.shape[0] // batch, *x.shape[1:])
        (out,), (last,) = self.clstm(seq, None if state is None else [state])
        out = out.reshape(x.shape)
        return features + (out if self.expand is None else self.expand(out)), last
