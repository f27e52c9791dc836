"""The training loader and the validation dataset: case records + the transform chains of
:mod:`trunet.transforms.compose` + the caching of :mod:`trunet.data.datasets`.

Every training batch is a function of ``(train.seed, epoch, rank, step)`` alone (:class:`StepBatchSampler`
draws its cases, :class:`SeededItems` seeds each sample's random transforms), in every process and worker.
So a job restarted at any step draws the batches an uninterrupted run would have drawn there -- never
epoch 0's again -- whatever ``train.deterministic`` says and however many workers there are.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch
from monai.data import DataLoader, Dataset

from trunet.config import Config
from trunet.data.cases import check_trainable
from trunet.data.datasets import make_dataset
from trunet.pipeline.training.debug import derived_seed
from trunet.transforms.compose import inference_transforms, preprocessing_from_config, train_transforms

__all__ = ["build_train_loader", "build_eval_dataset", "StepBatchSampler", "SeededItems"]


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(case index, sample seed)`` pairs: the batch of step ``s`` of epoch ``e`` holds
    ``batch_size`` cases drawn with replacement by a generator seeded with ``derived_seed(seed, e, rank, s)``,
    each with its own seed for the random transforms.

    :meth:`set_window` chooses the steps the next pass yields (the rest of an epoch after a restart).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, steps: int):
        if num_items < 1:
            raise ValueError("StepBatchSampler needs at least one item")
        self.num_items, self.batch_size, self.seed, self.rank = int(num_items), int(batch_size), int(seed), int(rank)
        self.epoch, self.start, self.steps = 0, 0, int(steps)

    def set_window(self, epoch: int, start: int, steps: int) -> None:
        """The next pass yields steps ``start .. start + steps - 1`` of ``epoch``."""
        self.epoch, self.start, self.steps = int(epoch), int(start), int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.start + self.steps):
            step_seed = derived_seed(self.seed, self.epoch, self.rank, step)
            generator = torch.Generator().manual_seed(step_seed)
            cases = torch.randint(self.num_items, (self.batch_size,), generator=generator).tolist()
            yield [(int(i), derived_seed(step_seed, j)) for j, i in enumerate(cases)]


class SeededItems(torch.utils.data.Dataset):
    """``dataset[(index, seed)]``: the random transforms of ``dataset.transform`` are seeded with ``seed``
    before ``dataset[index]`` is produced, so a sample does not depend on the process or worker that makes
    it, nor on what that worker made before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        self.dataset.transform.set_random_state(seed=seed)
        return self.dataset[index]



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
    :class:`StepBatchSampler` seeded with ``train.seed``, ``rank``, the epoch and the step, so every process
    and every step draws different samples; the trainer calls ``loader.batch_sampler.set_window`` before
    each pass. The
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
    sampler = StepBatchSampler(len(dataset), t.batch_size, t.seed, rank, t.iterations_per_epoch)
    workers = int(config.data.num_workers)
    # the generator only seeds the workers' start-up state, which SeededItems overrides per sample
    generator = torch.Generator().manual_seed(derived_seed(t.seed, rank))
    return DataLoader(
        SeededItems(dataset), batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, generator=generator,
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
