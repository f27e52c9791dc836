"""The training loader and the validation dataset: case records + the transform chains of
:mod:`trunet.transforms.compose` + the caching of :mod:`trunet.data.datasets`."""

from __future__ import annotations

import os
from typing import Optional

import torch
from monai.data import DataLoader, Dataset

from trunet.config import Config
from trunet.data.cases import check_trainable
from trunet.data.datasets import make_dataset
from trunet.transforms.compose import inference_transforms, preprocessing_from_config, train_transforms

__all__ = ["build_train_loader", "build_eval_dataset"]


def build_train_loader(
    config: Config,
    cases: list[dict],
    target_spacing: tuple[float, float, float] | list[float],
    cache_dir: Optional[str | os.PathLike],
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """The training DataLoader: one pass = one epoch of ``train.iterations_per_epoch`` batches.

    Cases are drawn with replacement (a fresh random patch, window and augmentation each time) by a
    sampler seeded with ``train.seed`` and ``rank``, so every process draws different samples. The
    deterministic part of :func:`~trunet.transforms.compose.train_transforms` is cached per
    ``data.cache`` (``memory``: CacheDataset; ``disk``: PersistentDataset under ``cache_dir``; ``none``).

    Yields:
        dicts with ``image`` float32 ``(B, T_train, *patch)``, ``label`` int64 ``(B, T_train, *patch)``
        (``ignore_index`` on unlabelled frames), ``frame_mask`` bool ``(B, T_train)``, ``case_id`` list of
        str.
    Raises:
        DataError: no cases, or a case without label.
    """
    check_trainable(cases)
    transform = train_transforms(config, target_spacing)
    pre = preprocessing_from_config(config, target_spacing)
    dataset = make_dataset(cases, transform, config.data.cache, cache_dir, pre, "train")
    t = config.train
    generator = torch.Generator().manual_seed(int(t.seed) * 1000 + int(rank))
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=t.iterations_per_epoch * t.batch_size, generator=generator
    )
    workers = int(config.data.num_workers)
    return DataLoader(
        dataset, batch_size=t.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, generator=generator,
    )


def build_eval_dataset(config: Config, cases: list[dict], preprocessing: dict) -> Dataset:
    """Whole preprocessed cases for validation/prediction (:func:`inference_transforms`, invertible).

    Items: ``image`` float32 MetaTensor ``(T, X', Y', Z')``; ``label`` uint8 MetaTensor (when the case has
    one); ``frame_mask`` bool ``(T,)``; ``case_id``; ``ed``/``es`` (int, -1 unknown). Cached in memory when
    ``data.cache == "memory"``.
    """
    transform = inference_transforms(preprocessing)
    cache = "memory" if config.data.cache == "memory" else "none"
    return make_dataset(cases, transform, cache, None, preprocessing, "eval")
