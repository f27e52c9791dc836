"""Models: ConvLSTM cells/layers (2D and 3D) and the time-resolved UNet3D."""

from __future__ import annotations

from trunet.models.clstm import ConvLSTM, ConvLSTMCell
from trunet.models.unet import TimeResolvedUNet

__all__ = ["ConvLSTM", "ConvLSTMCell", "TimeResolvedUNet"]
