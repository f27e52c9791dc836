"""Moved to :mod:`trunet.pipeline.inference.postprocess`; this name keeps old imports working."""

from trunet.pipeline.inference.postprocess import keep_largest_components, probabilities_to_labels  # noqa: F401

__all__ = ["keep_largest_components", "probabilities_to_labels"]
