"""Checkpoints: one self-contained, atomically written file per save.

A checkpoint is a plain dict saved with :func:`torch.save` and read back with ``weights_only=True``
(no pickled code runs when a checkpoint is opened; everything inside is tensors, numbers, strings,
lists and dicts). Keys:

==================  ==========================================================================
``format_version``  :data:`FORMAT_VERSION`; a newer or older layout is refused with a clear error
``trunet_version``  the package version that wrote it
``model_state``     ``model.state_dict()`` (never the DDP wrapper's ``module.`` names)
``architecture``    the network's name in :data:`trunet.models.ARCHITECTURES` (absent: ``TimeResolvedUNet``)
``model_hparams``   ``in_channels``, ``out_channels`` and the :class:`ModelConfig` fields
``config``          the resolved config as a plain dict
``classes``         class names by label value
``preprocessing``   what ``predict`` needs to prepare an image (spacing, normalisation, patch, ...)
``optimizer`` ...   ``optimizer``, ``scaler``, ``scheduler`` state dicts (``scaler`` may be None)
``epoch``           completed epochs (resume starts at this epoch)
``iteration``       optimizer steps taken in total
``rng``             :func:`capture_rng_state` (python, numpy, torch CPU, CUDA when present)
``best_metric``     best mean validation Dice so far (None before the first validation)
``metrics``         the per-epoch metric rows written to ``metrics.csv`` so far
``checksum``        :func:`payload_checksum` of everything else, checked on load
==================  ==========================================================================

Trainers may add keys (e.g. ``epoch_iteration`` for a mid-epoch stop); readers ignore unknown keys.

The checksum catches a file changed after it was written (a bad disk, a bad copy, a stray write): torch's
own format checks the zip's structure, not the values of the weights. Files without a checksum (written by
trunet before it kept one) load unchecked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trunet import __version__
from trunet.atomic import atomic_path
from trunet.config import config_for_model
from trunet.errors import CheckpointError, ConfigError
from trunet.models import ARCHITECTURES, DEFAULT_ARCHITECTURE
from trunet.models import build_model as _build_network

__all__ = [
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "model_hparams",
    "model_from_hparams",
    "inference_payload",
    "model_from_checkpoint",
    "build_model",
    "capture_rng_state",
    "restore_rng_state",
    "payload_checksum",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Layout version of the payload; bump it when a key changes meaning."""

REQUIRED_KEYS = ("format_version", "model_state", "model_hparams", "classes")
"""Keys without which a file is not a trunet checkpoint (enough for ``predict``)."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically and return the path.

    The payload goes to a temporary file in the same folder, which is flushed and fsynced, then renamed
    over ``path`` (:func:`trunet.atomic.atomic_path`): a job killed at any moment leaves either the
    previous checkpoint or the new one, never a truncated file. ``format_version`` and
    ``trunet_version`` are filled in when missing.

    Raises:
        DiskFullError: the device is full; the message names ``path`` and the space the payload needs.
    """
    payload = dict(payload)
    payload.pop("checksum", None)
    payload.setdefault("format_version", FORMAT_VERSION)
    payload.setdefault("trunet_version", __version__)
    payload["checksum"] = payload_checksum(payload)
    with atomic_path(path, size_hint=_tensor_bytes(payload)) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def payload_checksum(payload: dict[str, Any]) -> str:
    """``sha256:<hex>`` of a payload's values (tensors by dtype, shape and bytes; other values by type and
    ``repr``), the ``checksum`` key itself left out. Equal payloads give equal checksums on any device."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != "checksum"})
    return f"sha256:{digest.hexdigest()}"


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)};".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"{type(obj).__name__} {obj!r};".encode())


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload (what dominates the size of the saved file)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors land (``"cpu"`` by default).
        classes: when given, the class names the caller expects; a checkpoint trained for another
            number of classes is refused.

    Raises:
        CheckpointError: the file is missing, is not a trunet checkpoint (another kind of file, a pickle
            with code in it), is not readable (truncated), has another ``format_version``, its class
            count does not match its model or ``classes``, or its checksum does not match its content.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    if _looks_like_another_format(p):
        raise CheckpointError(f"{p}: not a trunet checkpoint (not a file written by torch.save)")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(f"{p}: not a trunet checkpoint (it holds Python objects, not only tensors "
                                  "and plain values; trunet does not run code from checkpoints)") from None
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt or truncated file?): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes make torch.load fail in arbitrary ways
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{p}: not a readable checkpoint (corrupt or truncated file?): {first_line}"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{p}: not a trunet checkpoint (holds a {type(payload).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{p}: not a trunet checkpoint (missing {', '.join(missing)})")
    version = payload["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {version} is incompatible with this trunet "
            f"(reads format {FORMAT_VERSION}; written by trunet {payload.get('trunet_version', '?')})"
        )
    n_classes = len(payload["classes"])
    out_channels = payload["model_hparams"].get("out_channels")
    if out_channels != n_classes:
        raise CheckpointError(
            f"{p}: inconsistent checkpoint: the model has {out_channels} output channels "
            f"but {n_classes} class names {list(payload['classes'])}"
        )
    if classes is not None and len(classes) != n_classes:
        raise CheckpointError(
            f"{p}: incompatible checkpoint: trained for {n_classes} classes {list(payload['classes'])}, "
            f"the config has {len(classes)} {list(classes)}"
        )
    stored = payload.get("checksum")
    if stored is not None and payload_checksum(payload) != stored:
        raise CheckpointError(f"{p}: corrupt checkpoint: its content does not match the checksum written "
                              "with it (changed after it was saved); use another checkpoint, e.g. best.pt "
                              "or a copy (to resume a run, copy its best.pt over checkpoints/latest.pt: it "
                              "holds the whole training state of its epoch)")
    return payload


def _looks_like_another_format(path: Path) -> bool:
    """True for a file whose first bytes say it is no torch file: gzip (``.nii.gz``), NIfTI, text, ...
    torch files are zip archives (``PK``; a truncated one too) or, from old torch versions, pickles
    (protocol byte ``0x80``)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return not (head == b"PK" or head[:1] == b"\x80")


def model_hparams(config: Any) -> dict[str, Any]:
    """Constructor arguments of the model for a :class:`~trunet.config.Config` (plain types)."""
    return {"in_channels": 1, "out_channels": len(config.data.classes), **config.to_dict()["model"]}


def model_from_hparams(hparams: dict[str, Any], architecture: str = DEFAULT_ARCHITECTURE) -> torch.nn.Module:
    """A fresh (untrained) network from ``model_hparams`` through :func:`trunet.models.build_model`.

    The :class:`~trunet.config.ModelConfig` part is validated (and lists turned into tuples) by the config
    loader, so a hand-edited or old checkpoint fails with a clear error instead of deep in the model.
    """
    hparams = dict(hparams)
    in_channels = hparams.pop("in_channels", 1)
    out_channels = hparams.pop("out_channels")
    config = config_for_model(hparams, source="checkpoint model_hparams")
    return _build_network(config, in_channels=in_channels, out_channels=out_channels, architecture=architecture)


def inference_payload(model: torch.nn.Module, config: Any, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint that ``predict`` needs: weights, the architecture's name and arguments, the
    resolved config, class names and preprocessing (target spacing, normalisation, patch, time window). The
    trainer adds its optimizer, scheduler, RNG and progress to this; a model made elsewhere needs nothing
    more to be served."""
    return {
        "format_version": FORMAT_VERSION,
        "model_state": model.state_dict(),
        "architecture": next((name for name, cls in ARCHITECTURES.items() if type(model) is cls),
                             DEFAULT_ARCHITECTURE),
        "model_hparams": model_hparams(config),
        "config": config.to_dict(),
        "classes": list(config.data.classes),
        "preprocessing": preprocessing,
    }


def model_from_checkpoint(checkpoint_payload: dict[str, Any]) -> torch.nn.Module:
    """The trained model of a checkpoint payload (from :func:`load_checkpoint`), in eval mode on CPU.

    Raises:
        CheckpointError: the architecture or hyper-parameters are invalid or the weights do not fit the model.
    """
    try:
        model = model_from_hparams(checkpoint_payload["model_hparams"],
                                   checkpoint_payload.get("architecture", DEFAULT_ARCHITECTURE))
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint model_hparams are not usable: {exc}") from None
    try:
        model.load_state_dict(checkpoint_payload["model_state"])
    except RuntimeError as exc:
        summary = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"checkpoint weights do not fit its model: {summary}") from None
    return model.eval()


build_model = model_from_checkpoint
"""The old name of :func:`model_from_checkpoint` (kept for existing imports)."""


def capture_rng_state() -> dict[str, Any]:
    """All random states a training step can touch, as tensors and plain lists.

    Returns a dict with ``python`` (``random.getstate()`` as lists), ``numpy`` (the legacy global
    ``np.random`` state: name, key as an int64 tensor, pos, has_gauss, cached_gaussian), ``torch``
    (CPU generator state) and, when CUDA is initialised, ``cuda`` (one state per visible device).
    Plain types keep the checkpoint loadable with ``weights_only=True``.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_key.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA only where the device count matches)."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_key, np_pos, np_has_gauss, np_cached = state["numpy"]
    np_key = np.asarray(np_key.cpu() if isinstance(np_key, torch.Tensor) else np_key).astype(np.uint32)
    np.random.set_state((np_name, np_key, int(np_pos), int(np_has_gauss), float(np_cached)))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            logger.warning(
                "checkpoint holds CUDA random states for %d devices, %d are visible: "
                "CUDA states not restored",
                len(cuda_states), torch.cuda.device_count(),
            )
