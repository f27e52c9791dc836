"""Weights & Biases tracking for training runs.

Everything W&B writes stays inside the run folder: ``WANDB_DIR`` is the run folder (so the run lands
in ``RUN/wandb/``), ``WANDB_DATA_DIR`` (artifact staging), ``WANDB_CACHE_DIR`` (artifact cache,
wandb-core logs) and ``WANDB_ARTIFACT_DIR`` (downloads) point under ``RUN/wandb/``. The variables are
set for the life of the tracker and restored by :meth:`Tracker.finish`. ``WANDB_CONFIG_DIR`` (the
user's W&B settings, e.g. a self-hosted ``base_url``) is only read during a run and is left alone.
wandb stages encoded media in a system temporary folder it deletes at exit (``MEDIA_TMP``); the
files it keeps are copied into ``RUN/wandb/``.

Settings: ``tracking.wandb.mode`` is ``offline`` by default (nothing leaves the machine; ``wandb sync
RUN/wandb/offline-run-*`` uploads later). The usual environment variables win over the config, so a
container or cluster job configures W&B without editing files: ``WANDB_MODE``, ``WANDB_PROJECT``,
``WANDB_ENTITY`` (and ``WANDB_API_KEY`` for ``online``). ``mode: disabled`` in the config always turns
tracking off. Only rank 0 tracks.

A W&B failure (no API key online, no network, a full disk, a bug in wandb) is logged as a warning once
and tracking switches itself off: it never stops training.

What is logged (W&B step = optimizer step):
    * ``train/loss``, ``train/lr``, ``train/samples_per_s`` (and on CUDA ``train/gpu_mem_gb``) every
      ``log_every`` steps; ``epoch/*`` summary scalars once per epoch;
    * ``val/dice/<class>``, ``val/hd95/<class>``, ``val/mean_dice``;
    * for the first ``num_val_images`` validation cases (pictures from :mod:`.media`, upsampled by an
      integer factor with nearest-neighbour repetition to at least 256 pixels on the long side, so masks
      stay crisp): a mid-slice ``wandb.Image`` at ED and ES with ``masks`` ``prediction`` and
      ``ground_truth`` and named ``class_labels`` (``val_images/<case>/ED|ES``); a cine GIF of the mid
      slice over all frames, prediction beside reference (``val_cine/<case>``, ``wandb.Video``); a montage
      of every slice at ED and ES, prediction and reference rows (``val_montage/<case>``);
    * a per-case ``wandb.Table`` (``val/cases``): Dice and HD95 per class, LV/RV EDV, ESV and EF predicted
      and reference; for the shown cases the LV/RV volume curves as an image (``val_volumes/<case>``; not a
      table cell, since an offline run keeps only the type name of media inside a table);
    * checkpoints as artifacts of type ``model`` with aliases ``best`` and ``latest``.

Bytes per validation, measured by ``tests/test_tracking.py`` on two phantom cases of the demo's size (about
3 mm in plane, 50-70 pixels across, 10-14 slices, 20-25 frames): about 2.0 MB with ``num_val_images: 2``,
i.e. ~1 MB per shown case: the cine GIF ~0.75-0.9 MB (460 x 288 and 548 x 212 pixels: two panels of at
least 256 pixels), the montage ~150-200 kB (1276 x 584 and 1932 x 432, 64-colour PNG), the ED/ES stills
with their masks ~7 kB each (228 x 288, 272 x 212), the volume curves ~19 kB (400 x 240), the table <1 kB. The
total grows with ``num_val_images`` only, not with the number of validation cases.

GIFs are encoded here with Pillow (a dependency of matplotlib) and handed to ``wandb.Video`` as bytes:
``wandb.Video`` only encodes raw arrays through ``moviepy`` + ``imageio``, which are not dependencies
of trunet.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from trunet.atomic import write_text
from trunet.config import Config, WandbConfig
from trunet.pipeline.training import media

__all__ = [
    "Tracker",
    "resolve_wandb_settings",
    "wandb_env",
    "overlay_frames",
    "encode_gif",
    "mid_slice_images",
]

logger = logging.getLogger(__name__)

RUN_ID_FILE = "trunet-run-id"
"""File in ``RUN/wandb/`` holding the W&B run id, so ``--resume`` continues the same W&B run."""


def wandb_env(run_dir: str | os.PathLike) -> dict[str, str]:
    """The environment variables that keep every W&B file inside ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    base = run_dir / "wandb"
    return {
        "WANDB_DIR": str(run_dir),
        "WANDB_DATA_DIR": str(base / "data"),
        "WANDB_CACHE_DIR": str(base / "cache"),
        "WANDB_ARTIFACT_DIR": str(base / "artifacts"),
    }


def resolve_wandb_settings(cfg: WandbConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``mode``, ``project`` and ``entity`` for ``wandb.init``.

    The config's ``mode: disabled`` always wins; otherwise ``WANDB_MODE``, ``WANDB_PROJECT`` and
    ``WANDB_ENTITY`` from the environment override the config's values.
    """
    environ = os.environ if environ is None else environ
    if cfg.mode == "disabled":
        mode = "disabled"
    else:
        mode = environ.get("WANDB_MODE") or cfg.mode
        if mode == "dryrun":  # wandb's old name for offline
            mode = "offline"
    return {
        "mode": mode,
        "project": environ.get("WANDB_PROJECT") or cfg.project,
        "entity": environ.get("WANDB_ENTITY") or cfg.entity,
    }


def overlay_frames(image: np.ndarray, seg: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Colour overlays of a segmentation on grey frames: ``(T, H, W)`` intensities and integer labels ->
    ``(T, H, W, 3)`` uint8 RGB (background grey); see :func:`media.overlay`."""
    return media.overlay(media.to_uint8(image), seg, alpha)


def encode_gif(frames: np.ndarray, fps: float = 10.0, colors: int = 64) -> bytes:
    """``(T, H, W, 3)`` uint8 frames -> the bytes of a looping GIF (Pillow), ``colors`` colours per frame."""
    from PIL import Image

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"encode_gif needs (T, H, W, 3) uint8 frames, got shape {frames.shape}")
    # one 64-colour palette per frame without dithering: the noise of MR images dithered into a GIF
    # compresses badly, and 64 colours keep the grey ramp and the class colours apart (~20% fewer bytes
    # than Pillow's default 256 colours on a phantom cine)
    images = [Image.fromarray(f).quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
              for f in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:],
        duration=max(20, int(round(1000.0 / fps))), loop=0, optimize=True,
    )
    return buffer.getvalue()


def _palette_image(rgb: np.ndarray, colors: int = 64) -> Any:
    """An RGB array as a 64-colour palette PIL image (no dithering): a PNG of a third of the bytes."""
    from PIL import Image

    return Image.fromarray(rgb).quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def mid_slice_images(
    image: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray | None,
    frames: Mapping[str, int],
    classes: Sequence[str],
    case_id: str,
    min_long_side: int = media.MIN_LONG_SIDE,
) -> dict[str, Any]:
    """``wandb.Image`` of the mid slice at the named frames, with prediction and ground-truth masks, image
    and masks upsampled together (nearest) to ``min_long_side`` pixels on the long side.

    Args:
        image / pred / label: ``(T, X, Y, Z)`` arrays of one case (label may be None).
        frames: e.g. ``{"ED": 0, "ES": 9}``.
        classes: class names by label value (``class_labels`` of the masks).
    Returns:
        ``{"ED": wandb.Image, "ES": wandb.Image}``. Slices are shown transposed to (Y, X) rows/columns.
    """
    import wandb

    z = image.shape[-1] // 2
    f = media.upsample_factor(image.shape[1:3][::-1], min_long_side)
    class_labels = {i: name for i, name in enumerate(classes)}
    out = {}
    for name, t in frames.items():
        prediction = media.upsample(np.asarray(pred[t, :, :, z]).T.astype(np.uint8), f)
        masks = {"prediction": {"mask_data": prediction, "class_labels": class_labels}}
        if label is not None:
            gt = np.asarray(label[t, :, :, z]).T.astype(np.int64)
            gt = np.where((gt >= 0) & (gt < len(classes)), gt, 0).astype(np.uint8)
            masks["ground_truth"] = {"mask_data": media.upsample(gt, f), "class_labels": class_labels}
        out[name] = wandb.Image(
            media.upsample(media.to_uint8(image[t, :, :, z].T), f), masks=masks,
            caption=f"{case_id} {name} (frame {t}, slice {z}, x{f} nearest)",
        )
    return out


class Tracker:
    """One W&B run for one training run (a no-op object when disabled or not on rank 0).

    Args:
        config: the resolved config (logged as the run's config).
        run_dir: the run folder; W&B writes only under ``run_dir/wandb``.
        enabled: False on ranks other than 0.
        resume: continue the W&B run whose id is stored in ``run_dir/wandb/trunet-run-id``.
        name: the run's display name (default: the run folder's name).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        resume: bool = False,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.tracking.wandb
        self.run_dir = Path(run_dir)
        self.classes = list(config.data.classes)
        self.run: Any = None
        self._saved_env: dict[str, str | None] = {}
        settings = resolve_wandb_settings(self.cfg)
        self.mode = settings["mode"] if enabled else "disabled"
        if self.mode == "disabled":
            return
        self._set_env()
        try:
            import wandb

            id_file = self.run_dir / "wandb" / RUN_ID_FILE
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
            self.run = wandb.init(
                dir=str(self.run_dir.resolve()),
                mode=self.mode,
                project=settings["project"],
                entity=settings["entity"],
                config=config.to_dict(),
                name=name or self.run_dir.name,
                id=run_id,
                resume="allow" if run_id else None,
                job_type="train",
            )
            if run_id is None:
                write_text(id_file, self.run.id + "\n")
            logger.info("W&B %s run %s in %s", self.mode, self.run.id, self.run_dir / "wandb")
        except Exception as exc:  # noqa: BLE001 - a tracking failure must never stop training
            self._fail("wandb.init", exc)

    @property
    def active(self) -> bool:
        """True while a W&B run is open."""
        return self.run is not None

    def _set_env(self) -> None:
        for key, value in wandb_env(self.run_dir).items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def _fail(self, what: str, exc: BaseException) -> None:
        message = " ".join(str(exc).split())[:300]
        logger.warning("W&B tracking switched off after an error in %s: %s: %s", what, type(exc).__name__,
                       message)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        self._restore_env()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars (or media) at ``step``."""
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=int(step))
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def log_validation(
        self,
        step: int,
        scalars: Mapping[str, float],
        per_case: Sequence[Mapping[str, Any]],
        visuals: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Log one validation.

        Args:
            step: the optimizer step.
            scalars: e.g. ``{"val/mean_dice": 0.9, "val/dice/LV": 0.95, ...}``.
            per_case: one row per case (``case_id`` first, then numbers), shown as a ``wandb.Table``.
            visuals: per shown case a dict with ``case_id``, ``image``, ``pred``, ``label`` (``(T, X, Y,
                Z)`` arrays; ``label`` may be None) and ``frames`` (e.g. ``{"ED": 0, "ES": 9}``).
        """
        if self.run is None:
            return
        try:
            import wandb

            data: dict[str, Any] = dict(scalars)
            for visual in visuals[: max(0, self.cfg.num_val_images)]:
                case_id = str(visual["case_id"])
                image, pred, label = visual["image"], visual["pred"], visual.get("label")
                images = mid_slice_images(image, pred, label, visual["frames"], self.classes, case_id)
                for frame_name, img in images.items():
                    data[f"val_images/{case_id}/{frame_name}"] = img
                z = image.shape[-1] // 2
                gif = io.BytesIO(encode_gif(media.compare_panels(image, pred, label, z)))
                data[f"val_cine/{case_id}"] = wandb.Video(
                    gif, caption=f"{case_id} slice {z}: prediction (left), reference (right)", format="gif"
                )
                frames = visual["frames"]
                data[f"val_montage/{case_id}"] = wandb.Image(
                    _palette_image(media.montage(image, pred, label, frames)),
                    caption=f"{case_id}: every slice at " + ", ".join(f"{k} (frame {v})" for k, v in frames.items())
                    + "; rows prediction / reference",
                )
                if visual.get("volumes") is not None:  # not a table cell: offline, wandb drops media in tables
                    data[f"val_volumes/{case_id}"] = wandb.Image(media.volume_curve(
                        visual["volumes"]["pred"], visual["volumes"]["ref"], self.classes,
                        f"{case_id}: volumes, prediction (line) and reference (dots)"))
            if per_case:
                columns = list(per_case[0].keys())
                data["val/cases"] = wandb.Table(
                    columns=columns, data=[[row.get(c) for c in columns] for row in per_case]
                )
            self.run.log(data, step=int(step))
        except Exception as exc:  # noqa: BLE001
            self._fail("log_validation", exc)

    def log_checkpoint(
        self, path: str | os.PathLike, aliases: Sequence[str], metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Log a checkpoint file as a ``model`` artifact named ``model-<run id>`` with ``aliases``.

        Offline, wandb copies the file into ``RUN/wandb/data/artifacts/staging`` until ``wandb sync``;
        the trainer therefore logs checkpoints when training ends, not at every save.
        """
        if self.run is None or not self.cfg.log_checkpoints:
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=dict(metadata or {}))
            artifact.add_file(str(path), name=Path(path).name)
            self.run.log_artifact(artifact, aliases=list(aliases))
        except Exception as exc:  # noqa: BLE001
            self._fail("log_checkpoint", exc)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (e.g. the best Dice)."""
        if self.run is None:
            return
        try:
            for key, value in values.items():
                self.run.summary[key] = value
        except Exception as exc:  # noqa: BLE001
            self._fail("summary", exc)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (flushes the ``.wandb`` file) and restore the environment."""
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:  # noqa: BLE001
                logger.warning("W&B finish failed: %s: %s", type(exc).__name__, exc)
        self._restore_env()
