"""MONAI transform chains for cines (time as the channel axis); no file formats (those are :mod:`trunet.io`).

- :mod:`trunet.transforms.cardiac`: transforms MONAI lacks (loading with the time step, temporal window,
  union-foreground patch sampling, unlabelled-frame masking).
- :mod:`trunet.transforms.compose`: ``train_transforms``, ``inference_transforms``,
  ``preprocessing_from_config``, ``invert_prediction``.

Submodules are imported explicitly (``from trunet.transforms.compose import train_transforms``) so that
importing the package does not pull in MONAI's transform stack.
"""

from __future__ import annotations

__all__: list[str] = []
