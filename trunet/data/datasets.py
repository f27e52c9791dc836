"""MONAI datasets over case records: the caching policy (memory, disk, none) and DataErrors that reach the
user as one line. The transforms are passed in; this module composes none."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import Compose, Randomizable

from trunet.data.cache import SafePersistentDataset
from trunet.errors import TrunetError
from trunet.progress import is_terminal

__all__ = ["unwrap_data_errors", "make_dataset"]


@contextlib.contextmanager
def unwrap_data_errors() -> Iterator[None]:
    """Re-raise the :class:`~trunet.errors.TrunetError` behind MONAI's ``RuntimeError("applying transform")``.

    MONAI's ``Compose`` wraps every exception of a transform in a ``RuntimeError``; a bad input found while
    loading (NaN, label values, truncated data) must reach the CLI as the one-line ``DataError``.
    """
    try:
        yield
    except RuntimeError as exc:
        cause: Optional[BaseException] = exc
        while cause is not None and not isinstance(cause, TrunetError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


class _Unwrapping:
    """Dataset mixin: items that fail with a data error raise the DataError itself."""

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        with unwrap_data_errors():
            return super().__getitem__(index)  # type: ignore[misc]


class _Dataset(_Unwrapping, Dataset):
    pass


class _CacheDataset(_Unwrapping, CacheDataset):
    pass


class _PersistentDataset(_Unwrapping, SafePersistentDataset):
    pass


def make_dataset(cases: list[dict], transform, cache: str, cache_dir: Optional[str | os.PathLike],
                  preprocessing: dict, tag: str) -> Dataset:
    """A dataset over ``cases`` whose deterministic transforms are cached per ``cache``.

    Every case's deterministic part runs once here, in this process (``memory``: cached; ``disk``: the
    persistent cache under ``cache_dir`` is filled or read, in the safe format of :mod:`trunet.data.cache`;
    ``none``: computed and dropped), so a bad input raises its DataError now rather than inside a
    DataLoader worker.
    """
    with unwrap_data_errors():
        if cache == "memory":
            threads = max(1, min(4, os.cpu_count() or 1))  # nibabel's gzip and torch release the GIL
            return _CacheDataset(cases, transform, cache_rate=1.0, num_workers=threads, progress=len(cases) > 4 and is_terminal())
        if cache == "disk":
            if cache_dir is None:
                raise ValueError("data.cache = disk needs a cache_dir")
            key = json.dumps({"pre": preprocessing, "tag": tag}, sort_keys=True)
            digest = hashlib.sha1(key.encode()).hexdigest()[:12]
            # trunet's cache files keep the MetaTensors' geometry and are read with weights_only=True
            # (trunet.data.cache): a file someone else put in the cache folder runs no code
            ds = _PersistentDataset(cases, transform, cache_dir=Path(cache_dir) / f"{tag}-{digest}")
            for case in cases:
                item = ds._cachecheck(case)  # fill (or read) the cache now; MONAI has no public warm-up
                image = item["image"] if isinstance(item, dict) else None
                if not isinstance(image, MetaTensor) or tuple(image.affine.shape) != (4, 4):
                    raise RuntimeError(f"persistent cache {ds.cache_dir} lost the geometry of {case['image']}")
            return ds
        ds = _Dataset(cases, transform)
        first_random = transform.get_index_of_first(lambda t: isinstance(t, Randomizable))
        check = transform if first_random is None else Compose(transform.transforms[:first_random])
        for case in cases:
            check(dict(case))
        return ds
