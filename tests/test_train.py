"""The training job on a tiny phantom: the CLI end to end (run folder, checkpoints, W&B records), exact
resume, SIGTERM, non-finite losses, config and run-folder errors, sparse ED/ES labels, and the loss."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trunet.cli import main
from trunet.errors import TrunetError
from trunet.models import TimeResolvedUNet
from trunet.pipeline import checkpoint as ckpt
from trunet.pipeline import training as T
from trunet.pipeline.training import trainer as trainer_module
from trunet.pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from trunet.pipeline.precision import autocast_dtype
from trunet.config import load_config
from wandb_records import history_keys, read_wandb_records, records_of, wandb_files

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
QUIET = ["tracking.wandb.mode=disabled"]


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    """4 small phantom cases (coarse in-plane grid, 6 frames) in ACDC layout + datalist.json."""
    from trunet.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(out, cases=4, seed=0, inplane_scale=2.5, max_frames=6)
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("TRUNET_DEBUG_NAN_STEPS", None)
    return env


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trunet", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=REPO)


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _train(run: Path, phantom: Path, *overrides: str, resume: bool | str = False) -> Path:
    config = load_config(TINY, [f"data.root={phantom / 'datalist.json'}", *QUIET, *overrides])
    return T.run_training(config, run_dir=run, resume=resume, config_path=TINY)


# --- units -----------------------------------------------------------------------------------------


def test_loss_matches_monai_on_dense_labels():
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, 5, 2)
    label = torch.randint(0, 4, (2, 3, 6, 5, 2))
    ours = T.MaskedDiceCELoss(4)(logits, label, torch.ones(2, 3, dtype=torch.bool))
    x, y = logits.flatten(0, 1), label.flatten(0, 1)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    ref = F.cross_entropy(x, y) + dice(x, y.unsqueeze(1))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_per_frame_dice_weighs_a_small_frame_as_much_as_a_large_one():
    """train.dice: frame is the mean of one Dice per labelled frame (MONAI's DiceLoss per sample), so
    errors on a frame with a small structure cost more than in the pooled batch Dice."""
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 6, 5, 2)
    label = torch.randint(0, 4, (1, 3, 6, 5, 2))
    mask = torch.tensor([[True, False, True]])
    ours = T.MaskedDiceCELoss(4, ce_weight=0.0, per_frame=True)(logits, label, mask)
    x, y = logits[0, [0, 2]], label[0, [0, 2]]
    ref = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=False)(x, y.unsqueeze(1))
    assert torch.allclose(ours, ref, atol=1e-6)
    # frame 0 has a large LV, frame 1 a small one that the prediction overshoots
    label = torch.zeros(1, 2, 8, 8, 1, dtype=torch.long)
    label[0, 0, :6, :6] = 3
    label[0, 1, :2, :2] = 3
    logits = torch.full((1, 2, 4, 8, 8, 1), -5.0)
    logits[:, :, 0] = 5.0
    logits[0, 0, 3, :6, :6] = 10.0
    logits[0, 1, 3, :4, :4] = 10.0  # 16 voxels predicted for 4
    both = torch.ones(1, 2, dtype=torch.bool)
    pooled = T.MaskedDiceCELoss(4, ce_weight=0.0)(logits, label, both)
    per_frame = T.MaskedDiceCELoss(4, ce_weight=0.0, per_frame=True)(logits, label, both)
    assert per_frame > pooled


def test_unlabelled_frames_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, 6, 6, 2, requires_grad=True)
    label = torch.randint(0, 4, (2, 4, 6, 6, 2))
    frame_mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    label[~frame_mask] = 255
    loss = T.DeepSupervisionLoss(T.MaskedDiceCELoss(4))(
        [logits, logits[..., ::2, ::2, :]], label, frame_mask)  # deep supervision path too
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.count_nonzero(logits.grad[~frame_mask]) == 0
    assert all(torch.count_nonzero(g) > 0 for g in logits.grad[frame_mask])
    none = T.MaskedDiceCELoss(4)(logits, label, torch.zeros(2, 4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_deep_supervision_and_schedule_helpers():
    assert T.deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    label = torch.tensor([1, 255, 3, 2, 0, 255, 3, 3]).reshape(1, 1, 4, 2, 1)
    small = T.downsample_label(label, (2, 1, 1))
    assert small.shape == (1, 1, 2, 1, 1) and small.dtype == label.dtype
    assert set(small.unique().tolist()) <= set(label.unique().tolist())  # nearest: no new values
    assert (T.downsample_label(torch.full((1, 2, 4, 4, 2), 255), (2, 2, 1)) == 255).all()
    f = T.poly_lr_lambda(total_steps=100, warmup_steps=10, power=0.9)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5**0.9) and f(100) == 0.0
    assert autocast_dtype(torch.device("cpu"), True) == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), False) is None
    assert T.default_run_dir("configs/demo.yaml").parent == Path("runs")
    assert T.default_run_dir("configs/demo.yaml").name.startswith("demo-")


# --- end to end ------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, phantom):
    run = tmp_path / "run"
    result = _cli("--config", str(TINY), "--data", str(phantom / "datalist.json"), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("config.yaml", "splits.json", "metrics.csv", "log.txt", "checkpoints/latest.pt",
                 "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["iteration"] for r in rows] == ["2", "4"]
    for r in rows:
        assert float(r["train_loss"]) > 0 and 0.0 <= float(r["val_mean_dice"]) <= 1.0
        assert float(r["val_dice_LV"]) >= 0 and r["val_hd95_RV"] != ""
    log = (run / "log.txt").read_text()
    assert "epoch 2/2" in log and "val Dice RV" in log
    # stderr is a pipe here, as in Docker/Slurm/CI: plain progress lines (log_every = 1), no '\r' bars
    assert "\r" not in result.stderr and "epoch 1/2: 1/2 step" in result.stderr
    assert "epoch 2/2: 2/2 step" in log

    latest = load_checkpoint(run / "checkpoints" / "latest.pt", classes=["background", "RV", "MYO", "LV"])
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert latest["epoch"] == 2 and latest["iteration"] == 4 and latest["optimizer"]["state"]
    assert best["best_metric"] == max(float(r["val_mean_dice"]) for r in rows)
    assert latest["preprocessing"]["target_spacing"] == [4.0, 4.0, 8.0]
    assert [m["train_loss"] for m in latest["metrics"]] == [float(r["train_loss"]) for r in rows]
    model = model_from_checkpoint(best)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 1, 32, 32, 4))
    assert out.shape == (1, 3, 4, 32, 32, 4)

    (wandb_file,) = wandb_files(run)
    records = read_wandb_records(wandb_file)
    keys = history_keys(records)
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/mean_dice", "val/dice/LV", "val/hd95/MYO",
            "epoch/train_loss"} <= keys
    assert any(k.startswith("val_images/") and k.endswith("masks.prediction._type") for k in keys)
    assert any(k.startswith("val_cine/") and k.endswith("._type") for k in keys)
    assert "val/cases._type" in keys
    run_config = records_of(records, "run")[0]["config"]["update"]
    assert "train" in run_config and "model" in run_config
    models = [a for a in records_of(records, "artifact") if a.get("type") == "model"]
    aliases = [set(a["aliases"]) for a in models]
    assert any("best" in a for a in aliases) and any("latest" in a for a in aliases)
    assert not any(p.name.startswith(".") and p.suffix == ".tmp" for p in run.rglob("*"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "latest.pt")["model_state"]


@pytest.mark.parametrize("stop", ["killed after an epoch", "SIGTERM mid-epoch"])
def test_resume_equals_uninterrupted(tmp_path, phantom, monkeypatch, stop):
    overrides = ["train.epochs=2", "train.iterations_per_epoch=3", "train.deterministic=true",
                 "data.val_fraction=0"]
    straight = _train(tmp_path / "straight", phantom, *overrides)

    class Killed(Exception):
        pass

    if stop == "killed after an epoch":
        original = T.Trainer._end_epoch

        def end_epoch_then_die(self, seconds):
            original(self, seconds)
            if self.epoch == 1:
                raise Killed  # the job dies right after epoch 1's checkpoint

        monkeypatch.setattr(T.Trainer, "_end_epoch", end_epoch_then_die)
        with pytest.raises(Killed):
            _train(tmp_path / "stopped", phantom, *overrides)
        expected = (1, 0)
    else:
        original = T.Trainer.step

        def signal_during_step_4(self, batch, stop_request):
            if self.iteration == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 4 (epoch 2, step 2 of 3)
            return original(self, batch, stop_request)

        monkeypatch.setattr(T.Trainer, "step", signal_during_step_4)
        with pytest.raises(T.TrainingInterrupted):
            _train(tmp_path / "stopped", phantom, *overrides)
        expected = (1, 1)
    monkeypatch.undo()
    payload = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "latest.pt")
    assert (payload["epoch"], payload["epoch_iteration"]) == expected
    _train(tmp_path / "stopped", phantom, *overrides, resume=True)

    a, b = _metrics(straight), _metrics(tmp_path / "stopped")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # bit-identical floats (repr)
    wa = load_checkpoint(straight / "checkpoints" / "latest.pt")["model_state"]
    wb = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "latest.pt")["model_state"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_kill_between_the_last_epochs_writes_loses_no_result(tmp_path, phantom, monkeypatch):
    """The end of an epoch writes best.pt, metrics.csv and latest.pt. A job killed just before best.pt or
    metrics.csv in the last epoch, then run again, ends with the uninterrupted run's best.pt and metrics.csv:
    latest.pt is written last, so a rerun never finds the run finished with them missing."""
    overrides = ["train.epochs=2", "train.deterministic=true", "data.val_fraction=0.5"]
    straight = _train(tmp_path / "straight", phantom, *overrides)
    best = load_checkpoint(straight / "checkpoints" / "best.pt")
    assert best["epoch"] == 2  # the last epoch is the best: a lost best.pt would show

    class Killed(Exception):
        pass

    armed, target = [False], [""]
    end_epoch, save_checkpoint = T.Trainer._end_epoch, ckpt.save_checkpoint
    write_text = trainer_module.write_text

    def last_end_epoch(self, seconds):
        armed[0] = self.epoch + 1 == self.t.epochs
        return end_epoch(self, seconds)

    def dies_before(write):
        def wrapped(path, *args):
            if armed[0] and Path(path).name == target[0]:
                raise Killed(path)
            return write(path, *args)
        return wrapped

    def timeless(rows):
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "epoch_seconds")} for r in rows]

    for name in ("best.pt", "metrics.csv"):
        run = tmp_path / name
        target[0] = name
        monkeypatch.setattr(T.Trainer, "_end_epoch", last_end_epoch)
        monkeypatch.setattr(ckpt, "save_checkpoint", dies_before(save_checkpoint))
        monkeypatch.setattr(trainer_module, "write_text", dies_before(write_text))
        with pytest.raises(Killed):
            _train(run, phantom, *overrides)
        monkeypatch.undo()
        _train(run, phantom, *overrides, resume="auto")
        assert timeless(_metrics(run)) == timeless(_metrics(straight)), name
        again = load_checkpoint(run / "checkpoints" / "best.pt")
        assert again["epoch"] == 2 and all(torch.equal(again["model_state"][k], v)
                                           for k, v in best["model_state"].items()), name
        assert _weights(run).keys() == _weights(straight).keys()
        assert all(torch.equal(a, b) for a, b in zip(_weights(run).values(), _weights(straight).values())), name


def test_sigterm_saves_and_resumes(tmp_path, phantom):
    """SIGTERM to the whole process group (as Slurm sends it), data workers included."""
    run = tmp_path / "run"
    args = ["--config", str(TINY), "--data", str(phantom / "datalist.json"), "--run-dir", str(run),
            *QUIET, "data.num_workers=1", "train.epochs=1000", "data.val_fraction=0"]
    proc = subprocess.Popen([sys.executable, "-m", "trunet", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, start_new_session=True)
    latest = run / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert latest.exists(), (proc.communicate()[1][-2000:] if proc.poll() is not None
                             else "no checkpoint in time")
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "latest.pt is saved" in stderr
    payload = load_checkpoint(latest)
    stopped_epoch = payload["epoch"]
    assert 1 <= stopped_epoch < 1000
    assert payload["iteration"] == 2 * stopped_epoch + payload["epoch_iteration"]
    assert not [p for p in latest.parent.iterdir() if p.name != "latest.pt"]  # no temporary files

    result = _cli(*args[:-2], *QUIET, f"train.epochs={stopped_epoch + 1}", "data.val_fraction=0", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, stopped_epoch + 2))
    assert load_checkpoint(latest)["iteration"] == 2 * (stopped_epoch + 1)


def test_nonfinite_loss_skipped_then_stops(tmp_path, phantom, monkeypatch, caplog):
    monkeypatch.setenv("TRUNET_DEBUG_NAN_STEPS", "1")
    run = _train(tmp_path / "one", phantom, "data.val_fraction=0", "train.max_nonfinite=2")
    rows = _metrics(run)
    assert [r["skipped_steps"] for r in rows] == ["1", "0"]
    assert "non-finite loss at epoch 1, step 2: step skipped" in caplog.text
    assert rows[0]["train_loss"] != "" and float(rows[0]["train_loss"]) > 0  # the mean of the finite step

    monkeypatch.setenv("TRUNET_DEBUG_NAN_STEPS", "3,4,5")
    with pytest.raises(TrunetError, match="non-finite loss in 3 consecutive steps") as info:
        _train(tmp_path / "many", phantom, "data.val_fraction=0", "train.epochs=3", "train.max_nonfinite=3")
    assert "latest.pt (epoch 2)" in str(info.value)
    assert load_checkpoint(tmp_path / "many" / "checkpoints" / "latest.pt")["epoch"] == 2


def test_user_errors_are_one_line(tmp_path, phantom, capsys, monkeypatch, caplog):
    data = ["--data", str(phantom / "datalist.json")]

    def fails(*args: str) -> str:
        assert main(["train", "--config", str(TINY), *data, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("trunet train: error:") and "\n" not in err and "Traceback" not in err
        return err

    assert "unknown key 'train.foo'" in fails("--run-dir", str(tmp_path / "a"), "train.foo=1")
    assert "'train.lr' must be a number" in fails("--run-dir", str(tmp_path / "a"), "train.lr=fast")
    assert "does not fit the model" in fails("--run-dir", str(tmp_path / "b"), *QUIET,
                                             "train.patch_size=[30,30,4]")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert "not empty" in fails("--run-dir", str(busy))
    assert (busy / "notes.txt").read_text() == "keep me"
    assert "nothing to resume" in fails("--run-dir", str(tmp_path / "none"), "--resume")
    assert "--resume needs --run-dir" in fails("--resume")
    assert "data root not found" in fails("--run-dir", str(tmp_path / "c"), "--data",
                                          str(tmp_path / "missing"))

    run = tmp_path / "done"
    monkeypatch.setenv("SLURM_NTASKS", "2")  # e.g. srun -n 2 without torchrun
    assert main(["train", "--config", str(TINY), *data, "--run-dir", str(run), *QUIET, "train.epochs=1",
                 "data.val_fraction=0"]) == 0
    capsys.readouterr()
    assert "2 processes were launched but WORLD_SIZE is 1" in caplog.text
    assert "changes the training (model.channels" in fails("--run-dir", str(run), "--resume", *QUIET,
                                                           "data.val_fraction=0", "model.channels=[4,8,32]")


def test_sparse_acdc_labels_touch_no_unlabelled_frame(tmp_path, phantom, monkeypatch):
    """Train on the ACDC layout (ED/ES labels only): only the labelled frames of a window reach the decoder
    and the loss (the others pass the encoder and the ConvLSTMs), and every one of them gets gradient."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    decoded: list[torch.Tensor] = []
    original = T.DeepSupervisionLoss.forward
    original_forward = TimeResolvedUNet.forward

    def recording_model(self, x, decode=None):
        decoded.append(None if decode is None else decode.detach().clone())
        return original_forward(self, x, decode=decode)

    def recording_forward(self, outputs, label, frame_mask):
        first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        first.register_hook(lambda g: seen.append((g.detach().clone(), frame_mask.detach().clone(), label)))
        return original(self, outputs, label, frame_mask)

    monkeypatch.setattr(TimeResolvedUNet, "forward", recording_model)
    monkeypatch.setattr(T.DeepSupervisionLoss, "forward", recording_forward)
    config = load_config(TINY, [f"data.root={phantom}", *QUIET, "train.epochs=1",
                                "train.iterations_per_epoch=3", "train.time_window=4",
                                "model.deep_supervision=true"])
    run = T.run_training(config, run_dir=tmp_path / "acdc", config_path=TINY)
    assert len(seen) == 3  # validation calls the model too, without decode
    steps = [d for d in decoded if d is not None][:3]
    assert len(steps) == 3
    assert any((~d).any() for d in steps), "expected unlabelled frames in the sampled windows"
    for (grad, mask, label), decode in zip(seen, steps):
        assert grad.shape[:2] == (1, int(decode.sum())) and mask.all()
        assert all((frame != 255).any() for frame in label[0])  # every decoded frame carries labels
        assert all(torch.count_nonzero(g) > 0 for g in grad[0])
    assert float(_metrics(run)[0]["val_mean_dice"]) >= 0.0


# --- production jobs: restarts, locks, stops, full disks -----------------------------------------------


def _absolute_datalist(phantom: Path, dest: Path, broken: bool = False) -> Path:
    """The phantom's datalist with absolute paths (the first image missing when ``broken``)."""
    lists = json.loads((phantom / "datalist.json").read_text())
    for items in lists.values():
        for item in items:
            for key in ("image", "label"):
                item[key] = str(phantom / item[key])
    if broken:
        lists["training"][0]["image"] = str(phantom / "gone_4d.nii.gz")
    dest.write_text(json.dumps(lists))
    return dest


def _one_line(capsys) -> str:
    """The command's message: the last line on stderr (after any progress bars), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("trunet train: "), err[-2000:]
    return line


def test_a_failed_start_does_not_block_the_same_command(tmp_path, phantom, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY), "--run-dir", str(run), *QUIET, "data.val_fraction=0", "train.epochs=1"]
    bad = _absolute_datalist(phantom, tmp_path / "bad.json", broken=True)
    assert main([*args, "--data", str(bad)]) == 2
    assert "gone_4d.nii.gz: file not found" in _one_line(capsys)
    assert not run.exists()  # the data is checked before anything is written

    # a start killed before its first checkpoint (kill -9 during caching or a checkpoint write)
    (run / "checkpoints").mkdir(parents=True)
    (run / "log.txt").write_text("2026-01-01 INFO trunet: generating ...\n")
    (run / "splits.json").write_text("{}")
    stale = run / "checkpoints" / ".latest.pt.x1y2z3.tmp.pt"
    stale.write_bytes(b"")
    assert main([*args, "--data", str(phantom / "datalist.json"), "--resume"]) == 2
    err = _one_line(capsys)
    assert f"{run}: nothing to resume" in err and "ended before its first checkpoint" in err
    assert main([*args, "--data", str(phantom / "datalist.json")]) == 0  # the same command as the failed one
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["epoch"] == 1
    assert not stale.exists()
    assert "ended before its first checkpoint: starting afresh" in (run / "log.txt").read_text()


def test_sigterm_during_start_up_ends_the_job_at_once(tmp_path, phantom, monkeypatch, capsys):
    """A signal while the data is cached (or W&B starts) ends the job within seconds, not after the step."""

    class NoHandler(Exception):
        pass

    def not_ours(signum, frame):
        raise NoHandler  # what would have killed the job: trunet had no handler in place yet

    previous = signal.signal(signal.SIGTERM, not_ours)
    signalled: list[float] = []

    def slow_caching(*args, **kwargs):
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # caching a large dataset
        raise AssertionError("the signal did not end the start-up")

    monkeypatch.setattr(trainer_module, "build_train_loader", slow_caching)
    run = tmp_path / "run"
    try:
        code = main(["train", "--config", str(TINY), "--data", str(phantom / "datalist.json"), "--run-dir",
                     str(run), "--resume", "auto", *QUIET])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM and time.monotonic() - signalled[0] < 10
    assert "stopped by SIGTERM during start-up" in _one_line(capsys)
    assert "ended: interrupted: stopped by SIGTERM during start-up" in (run / "log.txt").read_text()
    assert not (run / "checkpoints" / "latest.pt").exists()


def test_sigterm_in_validation_and_uploads_saves_within_seconds(tmp_path, phantom, monkeypatch):
    """The stop flag is checked before every validation case and before the end-of-run uploads; the run
    resumed after a stop in validation ends as an uninterrupted one."""
    from trunet.pipeline.inference.predictor import Predictor
    from trunet.pipeline.training.tracking import Tracker

    overrides = ["train.deterministic=true", "data.val_fraction=0.5", "train.val_cases=null"]
    straight = _train(tmp_path / "straight", phantom, *overrides)
    cases, signalled = [], []
    predict_case = Predictor.predict_case

    def predict_then_signal(self, *args, **kwargs):
        out = predict_case(self, *args, **kwargs)
        cases.append(1)
        signalled.append(time.time())
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Predictor, "predict_case", predict_then_signal)
    run = tmp_path / "run"
    with pytest.raises(T.TrainingInterrupted):
        _train(run, phantom, *overrides)
    latest = run / "checkpoints" / "latest.pt"
    assert len(cases) == 1  # the second validation case was not started
    assert latest.stat().st_mtime - signalled[0] < 10
    payload = load_checkpoint(latest)
    assert (payload["epoch"], payload["epoch_iteration"]) == (0, 2) and payload["metrics"] == []
    monkeypatch.undo()

    uploads = []

    def upload_then_signal(self, path, aliases, metadata=None):
        uploads.append(aliases)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Tracker, "log_checkpoint", upload_then_signal)
    _train(run, phantom, *overrides, resume="auto")
    assert uploads == [["best"]]  # "latest" skipped: the stop came during the first upload
    assert [r["val_mean_dice"] for r in _metrics(run)] == [r["val_mean_dice"] for r in _metrics(straight)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(run).values(), _weights(straight).values()))


def test_a_stopped_job_restarts_with_the_same_command_to_the_same_weights(tmp_path, phantom):
    """start -> SIGTERM -> the same command (``--resume auto``, as in the Docker image) -> done, with the
    weights of an uninterrupted run (train.deterministic)."""
    def command(run: Path) -> list[str]:
        return ["--config", str(TINY), "--data", str(phantom / "datalist.json"), "--run-dir", str(run),
                "--resume", "auto", *QUIET, "train.deterministic=true", "data.val_fraction=0",
                "train.epochs=12", "train.iterations_per_epoch=3"]

    straight = tmp_path / "straight"
    assert _cli(*command(straight)).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trunet", "train", *command(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, start_new_session=True)
    latest = run / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert load_checkpoint(latest)["epoch"] < 12
    again = _cli(*command(run))
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["train_loss"] for r in _metrics(run)] == [r["train_loss"] for r in _metrics(straight)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(run).values(), _weights(straight).values()))
    assert _cli(*command(run)).returncode == 0  # and once more: a finished run is a finished job


def test_restarts_draw_new_batches(tmp_path, phantom, monkeypatch):
    """Non-deterministic mode too: a restart draws the batches of its (epoch, step), not epoch 0's again."""
    drawn: dict[int, tuple] = {}
    step = T.Trainer.step

    def recording_step(self, batch, stop):
        drawn[self.iteration] = (tuple(batch["case_id"]), float(batch["image"].double().sum()))
        return step(self, batch, stop)

    monkeypatch.setattr(T.Trainer, "step", recording_step)
    run = tmp_path / "run"
    overrides = ["data.val_fraction=0", "train.batch_size=2"]
    for epochs in (1, 2, 3):  # three (re)starts of one run, at steps 0, 2 and 4
        _train(run, phantom, *overrides, f"train.epochs={epochs}", resume=epochs > 1)
    assert sorted(drawn) == list(range(6))
    first_of_each_start = [drawn[0], drawn[2], drawn[4]]
    assert len(set(first_of_each_start)) == 3, first_of_each_start


def test_a_second_job_on_a_locked_run_folder_is_refused(tmp_path, phantom, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trunet.pipeline.training.rundir import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    args = ["train", "--config", str(TINY), "--data", str(phantom / "datalist.json"), "--run-dir", str(run),
            "--resume", "auto", *QUIET, "data.val_fraction=0", "train.epochs=1"]
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(args) == 2
        err = _one_line(capsys)
        assert f"{run}: the run folder is in use by another trunet process (pid {holder.pid} on " in err
        assert sorted(p.name for p in run.iterdir()) == ["trunet.lock"]  # refused before writing anything
    finally:
        holder.kill()  # dies holding the lock: the kernel releases it
        holder.wait()
    assert main(args) == 0
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["epoch"] == 1


def test_a_full_disk_is_one_logged_line_and_keeps_the_last_checkpoint(tmp_path, phantom, monkeypatch, capsys):
    saves = []
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 part of a zip")
        try:  # as torch's stream writer reports a failed write
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY), "--data", str(phantom / "datalist.json"), "--run-dir", str(run),
            "--resume", "auto", *QUIET, "data.val_fraction=0"]
    assert main(args) == 74
    err = _one_line(capsys)
    latest = run / "checkpoints" / "latest.pt"
    assert f"{latest}: no space left on device (" in err and " needed); free some space" in err
    assert err.split("error: ", 1)[1] in (run / "log.txt").read_text().splitlines()[-1]
    assert load_checkpoint(latest)["epoch"] == 1  # the earlier checkpoint is intact
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]

    (latest.parent / ".latest.pt.k1ll3d.tmp.pt").write_bytes(b"")  # what a kill -9 during a save leaves
    monkeypatch.undo()
    assert main(args) == 0  # space is back: the same command finishes the run
    assert load_checkpoint(latest)["epoch"] == 2
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]


def test_emulated_bf16_gpu_takes_fp16_with_the_grad_scaler(monkeypatch, phantom, tmp_path):
    """A GPU whose bf16 is only emulated (V100, T4) gets fp16 autocast and an enabled GradScaler; the step
    runs that path (here on the CPU, which has fp16 autocast and a CPU GradScaler) and the loss is finite."""
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert autocast_dtype(torch.device("cuda"), True) == torch.float16 and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype(torch.device("cuda"), True) == torch.bfloat16

    from trunet.pipeline.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "autocast_dtype", lambda device, amp=True: torch.float16 if amp else None)
    seen = []
    step = T.Trainer.step

    def recording_step(self, batch, stop):
        loss, stopped = step(self, batch, stop)
        seen.append((self.amp_dtype, self.scaler.is_enabled(), loss))
        return loss, stopped

    monkeypatch.setattr(T.Trainer, "step", recording_step)
    run = _train(tmp_path / "fp16", phantom, "train.amp=true", "train.epochs=1", "train.iterations_per_epoch=3")
    assert len(seen) == 3
    assert all(dtype == torch.float16 and scaled for dtype, scaled, _ in seen)
    assert all(loss is not None and math.isfinite(loss) for *_, loss in seen), seen
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["scaler"] is not None  # its state is kept


def test_resume_with_more_epochs_rescales_the_schedule(tmp_path, phantom, monkeypatch):
    """A finished run resumed with a larger train.epochs trains its extra steps at the rates of a run planned
    that long from the start (kept as it was, the poly decay had reached 0 and they trained at rate 0)."""
    overrides = ("train.iterations_per_epoch=3", "train.warmup_epochs=1")
    run = _train(tmp_path / "run", phantom, *overrides)
    assert float(_metrics(run)[-1]["lr"]) == 0.0  # 2 epochs x 3 steps: decayed to 0
    rates = []
    step = T.Trainer.step

    def recording_step(self, batch, stop):
        rates.append(self.optimizer.param_groups[0]["lr"])
        return step(self, batch, stop)

    monkeypatch.setattr(T.Trainer, "step", recording_step)
    _train(run, phantom, *overrides, "train.epochs=4", resume=True)
    planned = T.poly_lr_lambda(total_steps=12, warmup_steps=3, power=0.9)
    assert rates == pytest.approx([1e-3 * planned(s) for s in range(6, 12)], rel=1e-5)
    assert min(rates) > 0
    assert [int(r["iteration"]) for r in _metrics(run)] == [3, 6, 9, 12]
