"""YAML config -> validated, typed :class:`Config`.

A config file has five sections, each a dataclass below: ``data``, ``model``, ``train``, ``infer`` and
``tracking``. Every key has a default, so a file only states what differs. Unknown keys and values of
the wrong type are :class:`~trunet.errors.ConfigError` naming the key and the file. Command-line
overrides ``key.sub=value`` are parsed as YAML scalars/lists (``train.lr=0.001``,
``train.patch_size=[64,64,8]``, ``model.clstm_levels=bottleneck``).

The resolved config (file + overrides + defaults) is saved in every run folder and in every checkpoint,
so a run can be repeated and ``predict`` needs nothing but the checkpoint.

Hand-written rather than a library (pydantic, OmegaConf): neither is a dependency of the design card,
and the validation needed (nested dataclasses, Optional, Literal, fixed-length tuples) fits in one page.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from trunet.atomic import write_yaml
from trunet.errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "AugmentConfig",
    "InferConfig",
    "TrackingConfig",
    "WandbConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_for_model",
    "save_config",
    "CorruptionKind",
    "ConfigError",
]

Triple = tuple[int, int, int]
TripleF = tuple[float, float, float]
CorruptionKind = Literal["dropout", "noise", "blur", "ghost", "misaligned", "missing"]
"""The kinds of :data:`trunet.data.artefacts.CORRUPTIONS` (a test keeps the two equal)."""


@dataclass
class DataConfig:
    """Where the cases come from and how they are preprocessed.

    Attributes:
        root: a datalist JSON, an ACDC-layout root, or ``None`` for the built-in phantom.
        phantom_cases / phantom_seed: size and seed of the phantom generated when ``root`` is None.
        classes: class names; the index is the label value (ACDC: 0 bg, 1 RV, 2 MYO, 3 LV).
        ignore_index: label value of unlabelled frames (sparse ED/ES labels).
        target_spacing: resampling target in mm, NIfTI voxel order (x, y, z); ``None`` = the training
            set's median in-plane spacing with the slice spacing kept, as nnU-Net does for ACDC.
        val_fraction / split_seed: patient-level split of the training list when it has no validation list.
        allow_3d: accept a 3D image as a cine of one frame (with a warning) instead of an error.
        cache: ``memory`` (CacheDataset), ``disk`` (PersistentDataset in the run folder) or ``none``.
        num_workers: DataLoader workers for training.
    """

    root: Optional[str] = None
    phantom_cases: int = 12
    phantom_seed: int = 0
    classes: list[str] = field(default_factory=lambda: ["background", "RV", "MYO", "LV"])
    ignore_index: int = 255
    target_spacing: Optional[TripleF] = None
    val_fraction: float = 0.2
    split_seed: int = 0
    allow_3d: bool = False
    cache: Literal["memory", "disk", "none"] = "memory"
    num_workers: int = 2


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`trunet.models.TimeResolvedUNet` (see its docstring)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320])
    strides: list[Triple] = field(
        default_factory=lambda: [(2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 1)]
    )
    kernel_sizes: Optional[list[Triple]] = None
    clstm_levels: Union[Literal["all", "bottleneck"], list[int]] = "all"
    clstm_reduction: int = 1
    bidirectional: bool = False
    peephole: bool = False
    deep_supervision: bool = False
    checkpointing: bool = False

    @property
    def size_divisor(self) -> Triple:
        """What every input size (x, y, z) must be a multiple of: the product of :attr:`strides`, the same
        rule as :attr:`trunet.models.TimeResolvedUNet.size_divisor`."""
        scale = [1, 1, 1]
        for stride in self.strides:
            scale = [a * int(b) for a, b in zip(scale, stride)]
        return tuple(scale)  # type: ignore[return-value]


@dataclass
class AugmentConfig:
    """Training augmentation. Spatial transforms are identical for all frames of a sample."""

    rotate_deg: float = 15.0  # in-plane (about the slice axis) only
    rotate_prob: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    scale_prob: float = 0.2
    elastic_prob: float = 0.0
    flip_prob: float = 0.0  # per in-plane axis; off by default (RV/LV sides are anatomical)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    contrast_prob: float = 0.15
    noise_std: float = 0.1
    noise_prob: float = 0.15
    blur_prob: float = 0.1
    low_res_prob: float = 0.1
    # frame corruption (trunet.data.artefacts): each frame of a sample is spoilt with this probability
    # while its label stays, so a temporal model learns to borrow from its neighbours; 0 = off
    corrupt_prob: float = 0.0
    corrupt_kinds: list[CorruptionKind] = field(
        default_factory=lambda: ["dropout", "noise", "blur", "ghost", "misaligned", "missing"]
    )
    corrupt_strength: tuple[float, float] = (0.3, 1.0)


@dataclass
class TrainConfig:
    """The training job.

    Attributes:
        patch_size: spatial patch (x, y, z) in voxels at the target spacing.
        time_window: ``T_train`` consecutive frames per sample (cyclic), at least one labelled.
        batch_size: samples per step (per process under DDP).
        epochs / iterations_per_epoch: an epoch is a fixed number of steps, as in nnU-Net.
        foreground_oversample: probability that a patch is centred on foreground.
        optimizer: ``sgd`` (Nesterov, momentum 0.99 as nnU-Net) or ``adamw``.
        warmup_epochs / poly_power: linear warm-up, then poly decay ``(1 - e/E) ** power``.
        grad_clip: max gradient norm (``0`` = off).
        dice / dice_weight / ce_weight: the soft Dice + cross-entropy loss. ``dice: batch`` is nnU-Net's
            batch Dice, one Dice per class over all labelled frames of a batch pooled; ``dice: frame`` is one
            Dice per class and labelled frame, averaged, so that a small end-systolic cavity counts as much
            as a large end-diastolic one (pooled, the ED voxels outweigh the ES errors).
        amp: autocast (bf16 where the device supports it, else fp16 + GradScaler).
        val_every: validate every N epochs on whole validation cases (sliding window).
        deterministic: deterministic algorithms and seeded workers (exact resume on CPU).
        max_nonfinite: consecutive non-finite losses tolerated before the job stops.
        consistency_weight: weight of the corruption-consistency loss: on every frame of a sample with
            corrupted frames (``augment.corrupt_prob``), the KL divergence from the model's own prediction on
            the uncorrupted sample (no gradient) to its prediction on the corrupted one. Dense supervision
            for the unlabelled spoilt frames (ED/ES-only labels leave most frames without any); ``0`` = off.
    """

    patch_size: Triple = (160, 160, 8)
    time_window: int = 8
    batch_size: int = 2
    epochs: int = 500
    iterations_per_epoch: int = 250
    foreground_oversample: float = 0.33
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    warmup_epochs: int = 0
    poly_power: float = 0.9
    grad_clip: float = 12.0
    amp: bool = True
    dice: Literal["batch", "frame"] = "batch"
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    val_every: int = 5
    val_cases: Optional[int] = None  # validate on the first N validation cases (None = all)
    seed: int = 0
    deterministic: bool = False
    max_nonfinite: int = 5
    consistency_weight: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class InferConfig:
    """Sliding-window inference (validation during training and ``trunet predict``)."""

    overlap: float = 0.5
    sw_batch_size: int = 1
    time_overlap: int = 2  # frames shared by consecutive time windows of a long series
    tta: bool = False
    postprocess: bool = True
    repair_frames: bool = True  # interpolate frames whose masks break from their neighbours (spoilt frames)
    repair_min_drop: float = 0.1  # Dice below the series' typical agreement for a frame to count as spoilt
    exclude_atrium: bool = True  # basal LV cavity < min_enclosed surrounded by MYO is atrium (SCMR)
    min_enclosed: float = 0.5  # fraction of the LV cavity's outline that must be myocardium at the base
    cyclic: bool = False  # the cine is one heartbeat: wrap frames around its ends so the first and last see neighbours
    cpu_stitch_voxels: int = 64_000_000  # stitch on the CPU above this many output voxels
    cpu_bf16: Optional[bool] = None  # bf16 autocast on the CPU; None: exactly where the CPU has bf16 instructions


@dataclass
class WandbConfig:
    """Weights & Biases. ``mode`` offline unless the user configures an API key and asks for online."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "trunet"
    entity: Optional[str] = None
    log_every: int = 10  # steps
    num_val_images: int = 2  # validation cases shown as images and cine GIFs
    log_checkpoints: bool = True


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """The whole resolved config. ``source`` is the file it came from (not saved)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), ready for YAML, JSON, W&B and checkpoints."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it in canonical form (tuples, floats)."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' must be {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise fail("a mapping")
        return _build(hint, value, key, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({_type_name(hint)})")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} values")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0]
        coerced = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return coerced if origin is list else tuple(coerced)
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"config type {hint!r} of '{key}' is not supported")  # a bug, not a user error


def _build(cls: type, mapping: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{full}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], full, source)
    return cls(**kwargs)


def config_from_dict(mapping: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested mapping (e.g. a checkpoint's saved config) into a :class:`Config`."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(mapping).__name__}")
    config = _build(Config, mapping, "", source)
    _check_values(config, source)
    return config


def config_for_model(model: dict[str, Any], source: str, **sections: Any) -> Config:
    """A validated config whose ``model`` section is ``model``, for rebuilding a network from stored arguments
    (a checkpoint's, the planner's cache key): ``train.patch_size`` defaults to the model's size divisor, so
    the patch check of :func:`config_from_dict` never rejects a model for a patch nobody asked for."""
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: 'model' must be a mapping, got {type(model).__name__}")
    divisor = _build(ModelConfig, model, "model", source).size_divisor
    train = dict(sections.pop("train", None) or {})
    train.setdefault("patch_size", list(divisor))
    return config_from_dict({**sections, "model": model, "train": train}, source)


def _check_values(config: Config, source: str) -> None:
    """Checks that need more than one key or a range."""
    m, t, d = config.model, config.train, config.data
    if len(m.channels) < 2:
        raise ConfigError(f"{source}: 'model.channels' needs at least two stages, got {m.channels}")
    if len(m.strides) != len(m.channels) - 1:
        raise ConfigError(
            f"{source}: 'model.strides' needs one (x, y, z) stride per downsampling, i.e. "
            f"len(model.channels) - 1 = {len(m.channels) - 1} entries, got {len(m.strides)}"
        )
    if m.kernel_sizes is not None and len(m.kernel_sizes) != len(m.channels):
        raise ConfigError(f"{source}: 'model.kernel_sizes' needs one entry per stage ({len(m.channels)})")
    if isinstance(m.clstm_levels, list) and any(not 0 <= i < len(m.channels) for i in m.clstm_levels):
        raise ConfigError(f"{source}: 'model.clstm_levels' must be level indices in 0..{len(m.channels) - 1}")
    if m.clstm_reduction < 1:
        raise ConfigError(f"{source}: 'model.clstm_reduction' must be at least 1, got {m.clstm_reduction}")
    a = t.augment
    if not 0.0 <= a.corrupt_prob <= 1.0:
        raise ConfigError(f"{source}: 'train.augment.corrupt_prob' must be in [0, 1], got {a.corrupt_prob}")
    if not a.corrupt_kinds:
        raise ConfigError(f"{source}: 'train.augment.corrupt_kinds' must name at least one kind")
    if not 0.0 <= a.corrupt_strength[0] <= a.corrupt_strength[1] <= 1.0:
        raise ConfigError(f"{source}: 'train.augment.corrupt_strength' must be (lo, hi) with "
                          f"0 <= lo <= hi <= 1, got {list(a.corrupt_strength)}")
    if t.dice not in ("batch", "frame"):
        raise ConfigError(f"{source}: 'train.dice' must be 'batch' or 'frame', got {t.dice!r}")
    if t.consistency_weight < 0:
        raise ConfigError(f"{source}: 'train.consistency_weight' must be >= 0, got {t.consistency_weight}")
    if t.consistency_weight > 0 and a.corrupt_prob == 0:
        raise ConfigError(f"{source}: 'train.consistency_weight' needs corrupted frames to compare: set "
                          "'train.augment.corrupt_prob' above 0 or the weight to 0")
    if len(d.classes) < 2:
        raise ConfigError(f"{source}: 'data.classes' needs background and at least one structure")
    positive = {
        "train.time_window": t.time_window,
        "train.batch_size": t.batch_size,
        "train.epochs": t.epochs,
        "train.iterations_per_epoch": t.iterations_per_epoch,
        "train.val_every": t.val_every,
        "train.max_nonfinite": t.max_nonfinite,
        "infer.sw_batch_size": config.infer.sw_batch_size,
        "data.phantom_cases": d.phantom_cases,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {value}")
    if any(p < 1 for p in t.patch_size):
        raise ConfigError(f"{source}: 'train.patch_size' must be positive, got {list(t.patch_size)}")
    _check_patch_size(t.patch_size, m.size_divisor, source)
    if t.lr <= 0:
        raise ConfigError(f"{source}: 'train.lr' must be positive, got {t.lr}")
    for key, value in {
        "train.foreground_oversample": t.foreground_oversample,
        "data.val_fraction": d.val_fraction,
        "infer.overlap": config.infer.overlap,
    }.items():
        if not 0.0 <= value < 1.0 + (key == "train.foreground_oversample"):
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {value}")
    if d.target_spacing is not None and any(s <= 0 for s in d.target_spacing):
        raise ConfigError(f"{source}: 'data.target_spacing' must be positive, got {list(d.target_spacing)}")


def _check_patch_size(patch_size: Triple, divisor: Triple, source: str) -> None:
    """The one check of the patch against the model's size divisor, made when the config is loaded so a bad
    patch fails before data or model are touched."""
    bad = [(axis, int(p), d) for axis, p, d in zip("XYZ", patch_size, divisor) if p < d or p % d]
    if not bad:
        return
    hints = []
    for axis, p, d in bad:
        below, above = (p // d) * d, max(1, math.ceil(p / d)) * d
        hints.append(f"{axis}={p} is not a multiple of {d} (nearest that work: "
                     f"{f'{below} or {above}' if below else above})")
    raise ConfigError(
        f"{source}: 'train.patch_size' {list(patch_size)} does not fit the model: every axis must be a "
        f"multiple of the model's size_divisor {tuple(divisor)} (the product of model.strides); "
        + "; ".join(hints)
    )


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(mapping: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``mapping`` with ``key.sub=value`` overrides applied (validated later)."""
    import copy

    result = copy.deepcopy(mapping)
    for text in overrides:
        parts, value = _parse_override(text)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (``None``: defaults only), apply overrides, validate.

    Raises:
        ConfigError: missing or unparsable file, unknown key, wrong type, bad value; the message names
            the file (or ``command line`` for an override) and the key.
    """
    mapping: Any = {}
    source = "<defaults>"
    if path is not None:
        source = os.fspath(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            mapping = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc})".replace("\n", " ")) from None
        if not isinstance(mapping, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if overrides:
        mapping = apply_overrides(mapping, overrides)
        source = f"{source} + command-line overrides"
    return config_from_dict(mapping, source)


def save_config(config: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_yaml(path, config.to_dict())
