"""Models: ConvLSTM cells/layers (2D and 3D), the time-resolved UNet3D, and :func:`build_model`, the one
factory (from the config, or from what a checkpoint stores). Models know nothing of files or training."""

from __future__ import annotations

from trunet.models.clstm import ConvLSTM, ConvLSTMCell
from trunet.models.factory import ARCHITECTURES, DEFAULT_ARCHITECTURE, build_model
from trunet.models.unet import TimeResolvedUNet

__all__ = ["ConvLSTM", "ConvLSTMCell", "TimeResolvedUNet", "ARCHITECTURES", "DEFAULT_ARCHITECTURE", "build_model"]
