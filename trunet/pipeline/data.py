"""Moved: case sources, checks and splits to :mod:`trunet.data.cases`, datasets and caching to
:mod:`trunet.data.datasets`, the training loader and validation dataset to
:mod:`trunet.pipeline.training.loaders`. This name keeps old imports working."""

from trunet.data.cases import (  # noqa: F401
    CaseLists,
    median_target_spacing,
    parse_info_cfg,
    read_acdc_root,
    read_datalist,
    resolve_cases,
    split_cases,
    validate_cases,
)
from trunet.data.datasets import make_dataset as _make_dataset  # noqa: F401
from trunet.data.datasets import unwrap_data_errors  # noqa: F401
from trunet.pipeline.training.loaders import build_eval_dataset, build_train_loader  # noqa: F401

__all__ = [
    "CaseLists",
    "read_datalist",
    "read_acdc_root",
    "parse_info_cfg",
    "validate_cases",
    "resolve_cases",
    "split_cases",
    "median_target_spacing",
    "build_train_loader",
    "build_eval_dataset",
    "unwrap_data_errors",
]
