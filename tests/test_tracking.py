"""W&B tracking: settings precedence, GIF encoding, an offline run read back from its .wandb file,
everything inside the run folder, and failures that switch tracking off instead of stopping training."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from trunet.config import WandbConfig, load_config
from trunet.pipeline.training.tracking import Tracker, encode_gif, overlay_frames, resolve_wandb_settings, wandb_env
from wandb_records import history_keys, read_wandb_records, records_of, wandb_files


def test_settings_precedence():
    cfg = WandbConfig(mode="offline", project="from-config", entity=None)
    assert resolve_wandb_settings(cfg, {}) == {"mode": "offline", "project": "from-config", "entity": None}
    env = {"WANDB_MODE": "online", "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "lab"}
    assert resolve_wandb_settings(cfg, env) == {"mode": "online", "project": "from-env", "entity": "lab"}
    assert resolve_wandb_settings(WandbConfig(mode="disabled"), env)["mode"] == "disabled"
    assert resolve_wandb_settings(cfg, {"WANDB_MODE": "dryrun"})["mode"] == "offline"


def test_gif_has_every_frame():
    image = np.random.default_rng(0).random((5, 16, 12))
    seg = np.zeros((5, 16, 12), dtype=np.int64)
    seg[:, 4:8, 4:8] = 3
    frames = overlay_frames(image, seg)
    assert frames.shape == (5, 16, 12, 3) and frames.dtype == np.uint8
    assert frames[0, 5, 5, 0] > frames[0, 5, 5, 2]  # LV drawn red
    gif = Image.open(io.BytesIO(encode_gif(frames, fps=5)))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (12, 16)


def _case(rng: np.random.Generator, t: int = 6):
    image = rng.random((t, 16, 16, 4)).astype(np.float32)
    label = np.zeros((t, 16, 16, 4), dtype=np.int64)
    label[:, 4:10, 4:10] = 3
    label[:, 3:11, 3:4] = 2
    label[1:4] = 255  # unlabelled frames (sparse labels)
    pred = np.zeros_like(label)
    pred[:, 5:10, 4:10] = 3
    return {"case_id": "patient001", "image": image, "pred": pred, "label": label,
            "frames": {"ED": 0, "ES": 4}}


def test_offline_run_written_inside_run_folder(tmp_path, monkeypatch, configs_dir):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = load_config(configs_dir / "tiny.yaml")
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")

    tracker = Tracker(config, run_dir)
    assert tracker.active and os.environ["WANDB_DIR"] == str(run_dir.resolve())
    tracker.log({"train/loss": 1.5, "train/lr": 0.001}, step=1)
    tracker.log_validation(
        2,
        {"val/mean_dice": 0.75, "val/dice/LV": 0.9},
        [{"case_id": "patient001", "dice/LV": 0.9, "hd95/LV": 2.0}],
        [_case(np.random.default_rng(0))],
    )
    tracker.log_checkpoint(checkpoint, aliases=["best", "latest"], metadata={"epoch": 1})
    tracker.summary({"best_mean_dice": 0.75})
    tracker.finish()
    assert "WANDB_DIR" not in os.environ  # restored

    assert not any(p.is_file() for p in home.rglob("*")), "W&B wrote outside the run folder"
    (wandb_file,) = wandb_files(run_dir)
    records = read_wandb_records(wandb_file)
    keys = history_keys(records)
    assert {"train/loss", "train/lr", "val/mean_dice", "val/dice/LV"} <= keys
    assert "val_images/patient001/ED._type" in keys and "val_images/patient001/ES._type" in keys
    assert "val_cine/patient001._type" in keys and "val/cases._type" in keys
    rows = {r["step"]["num"]: r["item"] for r in records_of(records, "history")}
    assert rows[1]["train/loss"] == 1.5
    assert rows[2]["val_cine/patient001._type"] == "video-file"
    assert rows[2]["val_cine/patient001.path"].endswith(".gif")
    assert rows[2]["val_images/patient001/ED._type"] == "image-file"
    assert rows[2]["val/cases._type"] == "table-file"
    for frame in ("ED", "ES"):
        for mask in ("prediction", "ground_truth"):
            assert rows[2][f"val_images/patient001/{frame}.masks.{mask}._type"] == "mask"
    # masks and their named class labels go to the run config
    config_updates = records_of(records, "config")
    labels = config_updates[-1]["update"]["_wandb"]["mask/class_labels"]
    assert labels["val_images/patient001/ED_wandb_delimeter_prediction"]["value"] == {
        "0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    assert "val_images/patient001/ES_wandb_delimeter_ground_truth" in labels
    files = [f["path"] for rec in records_of(records, "files") for f in rec["files"]]
    assert any(p.endswith(".mask.png") for p in files) and any(p.endswith(".gif") for p in files)
    models = [a for a in records_of(records, "artifact") if a.get("type") == "model"]
    assert len(models) == 1 and set(models[0]["aliases"]) >= {"best", "latest"}
    assert models[0]["name"] == f"model-{wandb_file.stem.split('-', 1)[1]}"
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert all(str(p).startswith(str(run_dir)) for p in written)
    assert list((run_dir / "wandb").glob("*run-*/files/media/videos/**/*.gif"))


def test_disabled_writes_nothing(tmp_path, configs_dir):
    config = load_config(configs_dir / "tiny.yaml", ["tracking.wandb.mode=disabled"])
    tracker = Tracker(config, tmp_path / "run")
    assert not tracker.active
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert not (tmp_path / "run").exists()
    assert not Tracker(load_config(configs_dir / "tiny.yaml"), tmp_path / "run2", enabled=False).active


def test_wandb_failures_only_warn(tmp_path, monkeypatch, configs_dir, caplog):
    import wandb

    config = load_config(configs_dir / "tiny.yaml")

    def broken_init(*args, **kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = Tracker(config, tmp_path / "run")
    assert not tracker.active
    assert "W&B tracking switched off" in caplog.text and "api_key" in caplog.text
    tracker.log({"train/loss": 1.0}, step=1)  # no-op, no exception
    tracker.log_validation(1, {"val/mean_dice": 0.5}, [], [])
    tracker.finish()
    assert "WANDB_DIR" not in os.environ or os.environ["WANDB_DIR"] != str((tmp_path / "run").resolve())


def test_failure_while_logging_switches_off(tmp_path, monkeypatch, configs_dir, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(load_config(configs_dir / "tiny.yaml"), tmp_path / "run")
    assert tracker.active

    def broken_log(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker.run, "log", broken_log)
    tracker.log({"train/loss": 1.0}, step=1)
    assert not tracker.active and "No space left" in caplog.text
    tracker.log({"train/loss": 1.0}, step=2)
    tracker.finish()


def test_env_points_inside_run(tmp_path):
    env = wandb_env(tmp_path / "r")
    assert env["WANDB_DIR"] == str((tmp_path / "r").resolve())
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):
        assert env[key].startswith(str((tmp_path / "r" / "wandb").resolve()))


def _demo_sized_case(index: int) -> dict:
    """A validation visual of the demo's size: a phantom cine at about 3 mm in plane (the demo trains at
    3 x 3 x 8 mm), the reference labelled at ED and ES only, the prediction the label shifted by one voxel."""
    from trunet.data.phantom import simulate_case

    case = simulate_case(0, index, inplane_scale=2.0)
    image, label = np.moveaxis(case.image, -1, 0), np.moveaxis(case.label, -1, 0).astype(np.int64)
    pred = np.roll(label, 1, axis=1)
    sparse = np.full_like(label, 255)
    sparse[[case.ed, case.es]] = label[[case.ed, case.es]]
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    vol = np.stack([(pred == c).sum(axis=(1, 2, 3)) for c in range(4)], 1) * voxel_ml
    ref = np.full(vol.shape, np.nan)
    ref[[case.ed, case.es]] = np.stack([(label[[case.ed, case.es]] == c).sum(axis=(1, 2, 3)) for c in range(4)], 1) * voxel_ml
    return {"case_id": f"patient{index + 1:03d}", "image": image, "pred": pred, "label": sparse,
            "frames": {"ED": case.ed, "ES": case.es}, "volumes": {"pred": vol, "ref": ref}}


def test_dashboard_media_are_readable_and_bounded(tmp_path, monkeypatch, configs_dir):
    """What the dashboard shows for one validation of two demo-sized cases: sizes and bytes read back
    from the offline run's files."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = load_config(configs_dir / "tiny.yaml", ["tracking.wandb.num_val_images=2"])
    run_dir = tmp_path / "run"
    tracker = Tracker(config, run_dir)
    visuals = [_demo_sized_case(0), _demo_sized_case(1)]
    rows = [{"case_id": v["case_id"], "dice/LV": 0.9, "LV_EDV_pred": 1.0, "LV_EDV_ref": 1.1} for v in visuals]
    tracker.log_validation(5, {"val/mean_dice": 0.8}, rows, visuals)
    tracker.finish()
    (wandb_file,) = wandb_files(run_dir)
    item = {r["step"]["num"]: r["item"] for r in records_of(read_wandb_records(wandb_file), "history")}[5]
    media_dir = wandb_file.parent / "files"
    sizes: dict[str, dict] = {}

    def png(key: str) -> Image.Image:
        return Image.open(media_dir / item[f"{key}.path"])

    for visual in visuals:
        case = visual["case_id"]
        t, x, y, z = visual["image"].shape
        factor = -(-256 // max(x, y))  # the smallest integer factor reaching 256 pixels
        ed = png(f"val_images/{case}/ED")
        assert ed.size == (x * factor, y * factor) and max(ed.size) >= 256
        mask = Image.open(media_dir / item[f"val_images/{case}/ED.masks.prediction.path"])
        assert mask.size == ed.size
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2, 3}  # upsampled without blending classes
        np.testing.assert_array_equal(np.asarray(mask)[::factor, ::factor], visual["pred"][visual["frames"]["ED"], :, :, z // 2].T)
        gif = Image.open(media_dir / item[f"val_cine/{case}.path"])
        assert gif.n_frames == t and gif.size == (2 * x * factor + 4, y * factor)  # prediction | reference
        montage = png(f"val_montage/{case}")
        tile = -(-96 // max(x, y))
        assert montage.size == (z * (x * tile + 2), 4 * (y * tile + 2))  # slices x (ED, ES) x (pred, ref)
        sizes[case] = {"still": ed.size, "gif": gif.size, "montage": montage.size}
        assert png(f"val_volumes/{case}").size == (400, 240)
    table = json.loads((media_dir / item["val/cases.path"]).read_text())
    assert table["columns"] == ["case_id", "dice/LV", "LV_EDV_pred", "LV_EDV_ref"]
    media_files = [p for p in (media_dir / "media").rglob("*") if p.is_file()]
    per_validation = sum(p.stat().st_size for p in media_files)
    print(f"bytes per validation (2 demo-sized cases): {per_validation}; sizes {sizes}; " + ", ".join(
        f"{p.parent.name}/{p.name[:12]} {p.stat().st_size}" for p in sorted(media_files)))
    assert per_validation < 2_500_000  # ~1.1 MB per shown case, bounded by tracking.wandb.num_val_images
