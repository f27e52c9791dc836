"""Cine readers and MONAI transform chains (time as the channel axis).

- :mod:`trunet.transforms.io`: ``load_cine``, ``load_label``, ``save_cine_like``, ``read_header``,
  ``CineMeta``.
- :mod:`trunet.transforms.cardiac`: transforms MONAI lacks (loading with the time step, temporal window,
  union-foreground patch sampling, unlabelled-frame masking).
- :mod:`trunet.transforms.compose`: ``train_transforms``, ``inference_transforms``,
  ``preprocessing_from_config``, ``invert_prediction``.

Submodules are imported explicitly (``from trunet.transforms.io import load_cine``) so that importing the
readers does not pull in MONAI's transform stack.
"""

from __future__ import annotations

__all__: list[str] = []
