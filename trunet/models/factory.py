"""The one model factory: a network from the config, or from the architecture name and arguments a checkpoint
stores."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import torch
from torch import nn

from trunet.config import Config
from trunet.models.unet import TimeResolvedUNet

__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "build_model"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"TimeResolvedUNet": TimeResolvedUNet}
"""Networks by the name a checkpoint stores under ``architecture``."""

DEFAULT_ARCHITECTURE = "TimeResolvedUNet"


def build_model(
    config: Config,
    *,
    in_channels: int = 1,
    out_channels: Optional[int] = None,
    architecture: str = DEFAULT_ARCHITECTURE,
    initialise: bool = True,
) -> nn.Module:
    """A fresh network for ``config.model``, on the CPU in training mode.

    Args:
        config: the resolved config (its ``model`` section are the constructor arguments).
        in_channels: C of the input ``(B, T, C, X, Y, Z)``.
        out_channels: K; default one per ``data.classes``.
        architecture: a key of :data:`ARCHITECTURES`.
        initialise: ``False`` skips the random initialisation (built on the meta device, then zero-filled):
            for measuring memory, which does not depend on the values.

    Example::

        >>> from trunet.config import config_from_dict
        >>> config = config_from_dict({"model": {"channels": [4, 8], "strides": [[2, 2, 1]]}})
        >>> build_model(config).size_divisor
        (2, 2, 1)
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    kwargs: dict[str, Any] = dict(
        in_channels=in_channels,
        out_channels=len(config.data.classes) if out_channels is None else out_channels,
        **dataclasses.asdict(config.model),
    )
    cls = ARCHITECTURES[architecture]
    if initialise:
        return cls(**kwargs).train()
    with torch.device("meta"):
        model = cls(**kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.zero_()
    return model.train()
