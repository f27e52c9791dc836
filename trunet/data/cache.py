"""The disk cache of preprocessed cases (``data.cache: disk``): a file format that runs no code when read,
and the MONAI dataset that writes and reads it.

MONAI's ``PersistentDataset`` pickles each cached item and, to keep the geometry of its MetaTensors,
must read it back with ``torch.load(weights_only=False)``: anyone who can write into the cache folder (a
shared run folder) could then make training run code. Here an item is stored as plain data only --
tensors, numbers, strings, lists, tuples and dicts -- with :func:`torch.save`, and read with
``weights_only=True``, which rebuilds nothing else. A cache file is a dict::

    {"format": "trunet-cache", "version": 1, "item": <the item, encoded>}

where the encoding keeps what the transforms produce:

=====================  ===========================================================================
in the item            in the file
=====================  ===========================================================================
``MetaTensor``         ``{"__trunet__": "MetaTensor", "array": Tensor, "meta": {...}, "applied_operations":
                       [...], "is_batch": bool}`` (the affine, the time step and the inverse information)
``numpy.ndarray``      ``{"__trunet__": "ndarray", "array": Tensor}`` (same dtype and shape)
numpy scalar           ``{"__trunet__": "numpy-scalar", "array": 0-d Tensor}``
``numpy.dtype``        ``{"__trunet__": "numpy-dtype", "str": "<f4"}``
an ``Enum`` key/value  its value (MONAI's keys are string enums, equal to their value)
=====================  ===========================================================================

A cache file that cannot be read, or is not in this format (a corrupt file, an older trunet's pickle, a
file put there by someone else), is rebuilt from the source files with a warning; nothing in it is run.
"""

from __future__ import annotations

import logging
import pickle
from copy import deepcopy
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, PersistentDataset

from trunet.atomic import atomic_path

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "CacheFileError", "encode_item", "decode_item", "save_item",
           "load_item", "SafePersistentDataset"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "trunet-cache"
CACHE_VERSION = 1
_TAG = "__trunet__"


class CacheFileError(Exception):
    """A cache file is unreadable or not a trunet cache file (it is rebuilt, never a user error)."""


def encode_item(value: Any, where: str = "item") -> Any:
    """``value`` as plain data that ``torch.load(weights_only=True)`` reads (see the module docstring).

    Raises:
        TypeError: a value of another type (a transform that produces it needs an entry here).
    """
    if isinstance(value, MetaTensor):
        return {_TAG: "MetaTensor", "array": value.as_tensor(),
                "meta": encode_item(value.meta, f"{where}.meta"),
                "applied_operations": encode_item(value.applied_operations, f"{where}.applied_operations"),
                "is_batch": bool(value.is_batch)}
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: a numpy array of Python objects cannot be cached safely")
        return {_TAG: "ndarray", "array": torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return {_TAG: "numpy-scalar", "array": torch.from_numpy(np.asarray(value).copy())}
    if isinstance(value, np.dtype):
        return {_TAG: "numpy-dtype", "str": value.str}
    if isinstance(value, Enum):
        return encode_item(value.value, where)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, dict):
        if _TAG in value:
            raise TypeError(f"{where}: the key {_TAG!r} is reserved by the cache format")
        return {encode_item(k, where): encode_item(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [encode_item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: a {type(value).__name__} cannot be cached safely")


def decode_item(value: Any) -> Any:
    """The inverse of :func:`encode_item`.

    Raises:
        CacheFileError: a tagged entry that is not one :func:`encode_item` writes.
    """
    if isinstance(value, dict):
        tag = value.get(_TAG)
        if tag is None:
            return {k: decode_item(v) for k, v in value.items()}
        try:
            if tag == "MetaTensor":
                out = MetaTensor(value["array"], meta=decode_item(value["meta"]),
                                 applied_operations=decode_item(value["applied_operations"]))
                out.is_batch = bool(value["is_batch"])
                return out
            if tag == "ndarray":
                return value["array"].numpy()
            if tag == "numpy-scalar":
                return value["array"].numpy()[()]
            if tag == "numpy-dtype":
                return np.dtype(value["str"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CacheFileError(f"malformed {tag} entry ({exc})") from None
        raise CacheFileError(f"unknown entry type {tag!r}")
    if isinstance(value, list):
        return [decode_item(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode_item(v) for v in value)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def save_item(path: str | Path, item: Any) -> Path:
    """Write ``item`` (a transformed case, e.g. ``{"image": MetaTensor (T, X, Y, Z), ...}``) to ``path``
    atomically in the cache format.

    Raises:
        TypeError: the item holds a type the format does not know.
        DiskFullError: the device filled up.
    """
    payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "item": encode_item(item)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_item(path: str | Path) -> Any:
    """The item stored at ``path`` by :func:`save_item`, read with ``weights_only=True`` (no code runs).

    Raises:
        CacheFileError: the file is unreadable, corrupt, or not a trunet cache file of this version.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CacheFileError("not a trunet cache file (it holds Python objects, which trunet never "
                                 "unpickles)") from None
        raise CacheFileError(f"unreadable cache file (corrupt or truncated?): {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes make torch.load fail in arbitrary ways
        raise CacheFileError(f"unreadable cache file (corrupt or truncated?): {_first_line(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        raise CacheFileError("not a trunet cache file")
    if payload.get("version") != CACHE_VERSION:
        raise CacheFileError(f"cache format version {payload.get('version')!r}, this trunet writes "
                             f"{CACHE_VERSION}")
    if "item" not in payload:
        raise CacheFileError("a trunet cache file without an item")
    return decode_item(payload["item"])


class SafePersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` with the cache files of this module: the deterministic part of the
    transform runs once per case and is stored in ``cache_dir``; each read runs only the random part.

    A cached read returns what a fresh computation returns (MetaTensors with their affine, meta data and
    inverse information; numpy arrays stay numpy). An unreadable or foreign cache file is computed again
    and replaced, with a warning naming it.
    """

    def _cachecheck(self, item_transformed: Any) -> Any:
        """The case ``item_transformed`` after the deterministic transforms, from the cache or computed
        (and then cached)."""
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
        cache_file = Path(self.cache_dir) / f"{name}.pt"
        if cache_file.is_file():
            try:
                return load_item(cache_file)
            except CacheFileError as exc:
                logger.warning("%s: %s; rebuilding this cache file from the case's files", cache_file, exc)
        item = self._pre_transform(deepcopy(item_transformed))  # keep the hashed original as it was
        try:
            save_item(cache_file, item)
        except PermissionError as exc:
            logger.warning("%s: cannot write the cache file (%s); the case is not cached", cache_file, exc)
        return item
