"""Data: the cases a run uses, before any transform touches them.

- :mod:`trunet.data.cases` -- where cases come from (a datalist JSON, an ACDC-layout root, the phantom), the
  header checks, the patient-level split and the median spacing; trunet's one ACDC discovery.
- :mod:`trunet.data.datasets` -- MONAI datasets over case records with the caching policy; the transform
  chain is passed in (the chains live in :mod:`trunet.transforms`).
- :mod:`trunet.data.cache` -- the disk cache's file format (plain tensors and values, read with
  ``weights_only=True``) and the persistent dataset that uses it.
- :mod:`trunet.data.phantom` -- the synthetic 4D cardiac cine phantom (the default data set);
  :mod:`trunet.data.artefacts` -- the frame corruptions it and the training augmentation share.

Reads files only through :mod:`trunet.io`.
"""

from __future__ import annotations

__all__ = ["PhantomCase", "simulate_case", "write_phantom_dataset"]


def __getattr__(name: str):
    # lazy, so `import trunet.data` stays cheap (nibabel/scipy load only when the phantom is used)
    if name in __all__:
        from trunet.data import phantom

        return getattr(phantom, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
