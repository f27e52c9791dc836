"""Data sets shipped with trunet: the synthetic 4D cardiac cine phantom (:mod:`trunet.data.phantom`)."""

from __future__ import annotations

__all__ = ["PhantomCase", "simulate_case", "write_phantom_dataset"]


def __getattr__(name: str):
    # lazy, so `import trunet.data` stays cheap (nibabel/scipy load only when the phantom is used)
    if name in __all__:
        from trunet.data import phantom

        return getattr(phantom, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
