"""Fault injection: does a training job that is killed, stopped, corrupted, starved of disk or doubled always
come back, or end with one clear line?

Every fault hits a real ``python -m trunet train`` process on a short run (``configs/tiny.yaml`` on a small
phantom, deterministic mode, W&B disabled, one CPU thread); afterwards the *same command* runs again
(``--resume auto``, as the Docker image's default command does) and the fault is classified:

* **recovered**: the rerun finished (exit 0) and its final checkpoint is the uninterrupted run's;
* **clean error**: the job ends with one line on stderr and a documented exit code (2, 74; 143 for a stop),
  no traceback, and no damage;
* **defect**: a traceback, a hang past the timeout, an undocumented exit code, more or less than one message
  line, a checkpoint that does not load, a temporary file left after a finished rerun, a stop slower than
  Docker's 10 s grace period, or a silent bad result (a finished run whose epoch, weights, best.pt or
  metrics.csv differ from the uninterrupted run's, a corrupted checkpoint used without complaint).

Faults (the default set; ``--quick``: one kill -9 during a save and one SIGTERM during the training steps):

1. **kill -9** (to the process group) at 10 moments drawn from ``--seed``: 7 at a time uniform over the
   uninterrupted run's wall time, 3 while a checkpoint is being written (when the atomic writer's temporary
   file ``checkpoints/.<name>.<random>.tmp.pt`` of a drawn save appears);
2. **SIGTERM in each phase**: interpreter start (before trunet's handler is installed), start-up (run folder
   created, data caching), training steps, validation, a checkpoint save (its temporary file seen) and the
   end of the run (after the last epoch's line); each stop must exit within 10 s;
3. **a corrupted checkpoint**: the job is stopped after its first checkpoint, 64 random bytes are written
   into a random weight of ``latest.pt`` (found by its bytes in the file), then the rerun, and ``trunet
   predict`` with that checkpoint, must refuse it;
4. **a full disk**: the run folder on a tmpfs of 2.5 checkpoints (room for the first epoch's ``latest.pt``
   and ``best.pt``, not for the next save), mounted in a private mount namespace (``unshare -m`` as root,
   ``unshare -rm`` in a user namespace otherwise); the job must exit 74 with one line that names the file,
   keep its earlier checkpoint and leave no temporary file; then the tmpfs is enlarged (space freed) and
   the same command must finish. Where no tmpfs can be mounted the fault is skipped with a note;
5. **two concurrent jobs**: the same command twice at the same moment on one run folder; one must be refused
   (exit 2, one line) or find the run finished, never both train.

After the fault run and after the rerun every ``*.pt`` in ``checkpoints/`` is loaded with
:func:`trunet.pipeline.checkpoint.load_checkpoint` (the injected corruption is not counted). Every
process's output is kept in ``WORK/<fault>/*.log`` with the time of each line.

Usage::

    python benchmarks/faults.py --work /tmp/faults [--seed 0] [--quick]

Prints the command, machine and date, a summary table and a table per fault; exits 1 if any defect.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trunet.atomic import TEMPORARY_PATTERN  # noqa: E402
from trunet.errors import CheckpointError  # noqa: E402
from trunet.pipeline.checkpoint import load_checkpoint  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"
RUN = {  # the run every fault interrupts: seconds on a CPU, long enough to have phases to hit
    "full": ["train.epochs=3", "train.iterations_per_epoch=3", "data.val_fraction=0.5", "train.val_cases=null"],
    "quick": ["train.epochs=2", "train.iterations_per_epoch=2", "data.val_fraction=0.5", "train.val_cases=1"],
}
COMMON = ["tracking.wandb.mode=disabled", "train.deterministic=true"]
DOCUMENTED = {0: "done", 2: "user error", 74: "full disk", 130: "SIGINT", 143: "SIGTERM"}
GRACE_S = 10.0  # docker stop's default wait before it kills
STEP = re.compile(r"^epoch (\d+)/(\d+): (\d+)/(\d+) step")
EPOCH_DONE = re.compile(r"^epoch (\d+)/(\d+)  loss")
STOPPED = re.compile(r"stopped by SIG\w+ (at epoch \d+, step \d+|during start-up)")
RESUMED = re.compile(r"resuming .* at (epoch \d+, step \d+)")
COMPARED = ("epoch", "iteration", "train_loss", "lr", "val_mean_dice")


# --- processes ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    """A finished process: exit code (negative: killed by that signal), output lines with their times."""

    label: str
    rc: Optional[int]
    lines: list[tuple[float, str]]
    seconds: float
    timed_out: bool = False
    timeout: float = 0.0
    signalled_at: Optional[float] = None

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def messages(self) -> list[str]:
        """The command line's own lines (``trunet <command>: ...``), not the log's."""
        return [line for _, line in self.lines if re.match(r"^trunet \w+: ", line)]

    @property
    def traceback(self) -> Optional[str]:
        """The last line of the first traceback in the output, or None."""
        texts = [line for _, line in self.lines]
        for i, line in enumerate(texts):
            if line.startswith("Traceback (most recent call last)"):
                tail = [t for t in texts[i + 1:] if t and not t.startswith((" ", "\t"))]
                return tail[0] if tail else "Traceback"
        return None

    @property
    def stop_seconds(self) -> Optional[float]:
        return None if self.signalled_at is None else self.seconds - self.signalled_at

    def problems(self, expected: set[int]) -> list[str]:
        """What makes this process a defect, given the exit codes it may end with."""
        if self.timed_out:
            return [f"{self.label}: still running after {self.timeout:.0f} s (hang)"]
        found = []
        if self.traceback:
            found.append(f"{self.label}: traceback ({self.traceback[:120]})")
        if self.rc not in expected:
            found.append(f"{self.label}: exit {self.rc}, expected {' or '.join(map(str, sorted(expected)))}")
        if self.rc in DOCUMENTED and self.rc != 0 and len(self.messages) != 1:
            found.append(f"{self.label}: {len(self.messages)} message lines with exit {self.rc}, expected one")
        return found

    def message(self) -> str:
        """The last message line without ``trunet <command>: [error: ]``."""
        return re.sub(r"^trunet \w+: (error: )?", "", self.messages[-1]) if self.messages else ""


class Job:
    """A running process whose merged stdout/stderr a thread reads line by line (with times since start)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], label: str):
        self.label = label
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.signalled_at: Optional[float] = None
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self._reader.start()

    def _read(self, log: Path) -> None:
        assert self.proc.stdout is not None
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"# {shlex.join(self.proc.args)}\n")
            for line in self.proc.stdout:
                t = self.elapsed()
                self.lines.append((t, line.rstrip("\n")))
                fh.write(f"{t:8.3f} {line}")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def saw(self, pattern: re.Pattern | str) -> bool:
        return any(re.search(pattern, line) for _, line in list(self.lines))

    def wait_until(self, condition: Callable[[], bool], timeout: float, interval: float = 0.001) -> bool:
        """Poll ``condition`` until it holds (True) or the process ends or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(interval)
        return False

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the job's process group (as ``docker stop``/``kill`` and Slurm do); False when the
        job had already ended."""
        if not self.alive():
            return False
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        self.signalled_at = self.elapsed()
        return True

    def finish(self, timeout: float) -> Result:
        timed_out = False
        try:
            self.proc.wait(timeout=max(1.0, timeout - self.elapsed()))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        seconds = self.elapsed()
        self._reader.join(timeout=10)
        return Result(self.label, self.proc.returncode, list(self.lines), seconds, timed_out, timeout,
                      self.signalled_at)


def temporaries(folder: Path) -> list[Path]:
    """The atomic writer's temporary files in ``folder`` (a kill during a write leaves them)."""
    return sorted(p for p in folder.glob(TEMPORARY_PATTERN) if p.is_file()) if folder.is_dir() else []


def phase_at(lines: list[tuple[float, str]], t: float) -> str:
    """Where a fresh run was at time ``t``, from the lines it had printed by then."""
    seen = [line for tt, line in lines if tt <= t]
    if not seen:
        return "interpreter start (imports)"
    if not any(line.startswith("training on ") for line in seen):
        return "start-up (data, model)"
    for line in reversed(seen):
        if line.startswith("done: "):
            return "end of run"
        m = EPOCH_DONE.match(line)
        if m:
            return "end of run" if m[1] == m[2] else f"after epoch {m[1]} (saving or next step)"
        m = STEP.match(line)
        if m:
            return f"epoch {m[1]}, " + ("end (validation, saves)" if m[3] == m[4] else f"step {int(m[3]) + 1}")
    return "epoch 1, step 1"


# --- the benchmark -----------------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    outcome: str = "recovered"  # recovered | clean error | defect
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    weights_equal: Optional[bool] = None

    def note(self) -> str:
        return "; ".join([*self.problems, *self.notes]).replace("|", "/")


class Bench:
    def __init__(self, work: Path, seed: int, quick: bool, timeout: Optional[float]):
        self.work = work
        self.rng = random.Random(seed)
        self.quick = quick
        self.overrides = [*COMMON, *RUN["quick" if quick else "full"]]
        values = dict(o.split("=", 1) for o in self.overrides)
        self.epochs = int(values["train.epochs"])
        self.steps = int(values["train.iterations_per_epoch"])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRUNET_DEBUG")}
        self.env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.timeout_arg = timeout
        self.timeout = timeout or 300.0
        self.datalist = self.phantom()
        self.reference: dict[str, torch.Tensor] = {}
        self.reference_best: tuple[int, dict[str, torch.Tensor]] = (0, {})
        self.reference_rows: list[dict[str, str]] = []
        self.reference_seconds = 0.0
        self.save_times: list[float] = []
        self.checkpoint_bytes = 0
        self.cases = ""

    # -- set-up ----------------------------------------------------------------------------------
    def phantom(self) -> Path:
        """4 small phantom cases (coarse in-plane grid, 6 frames), as the test suite uses; kept between runs."""
        folder = self.work / "phantom"
        datalist = folder / "datalist.json"
        if not datalist.is_file():
            from trunet.data.phantom import write_phantom_dataset

            write_phantom_dataset(folder, cases=4, seed=0, inplane_scale=2.5, max_frames=6)
        return datalist

    def argv(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "trunet", "train", "--config", str(TINY), "--data", str(self.datalist),
                "--run-dir", str(run_dir), "--resume", "auto", *self.overrides]

    def folder(self, name: str) -> Path:
        """A clean folder for one fault (its run folder is ``<folder>/run``)."""
        folder = self.work / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    def start(self, folder: Path, label: str, run_dir: Optional[Path] = None) -> Job:
        return Job(self.argv(run_dir or folder / "run"), folder / f"{label}.log", self.env, label)

    def run_reference(self) -> None:
        """The uninterrupted run: its weights and metrics, wall time and the moments of its saves."""
        folder = self.folder("uninterrupted")
        job = self.start(folder, "run")
        seen: dict[str, float] = {}
        checkpoints = folder / "run" / "checkpoints"
        while job.alive():
            for p in temporaries(checkpoints):
                seen.setdefault(p.name, job.elapsed())
            time.sleep(0.001)
        result = job.finish(self.timeout)
        if result.rc != 0:
            raise SystemExit(f"the uninterrupted run failed (exit {result.rc}); see {folder / 'run.log'}")
        self.reference_seconds = result.seconds
        self.save_times = sorted(seen.values())
        latest = checkpoints / "latest.pt"
        self.checkpoint_bytes = latest.stat().st_size
        self.reference = load_checkpoint(latest)["model_state"]
        best = load_checkpoint(checkpoints / "best.pt")
        self.reference_best = (best["epoch"], best["model_state"])
        self.reference_rows = metrics(folder / "run")
        self.cases = next((line.split(": ", 1)[1].split(",")[0] for line in result.text.splitlines()
                           if line.startswith("training on ")), "?")
        if self.timeout_arg is None:
            self.timeout = max(120.0, 10 * result.seconds)

    # -- checks ----------------------------------------------------------------------------------
    def census(self, fault: Fault, run_dir: Path, injected: tuple[str, ...] = ()) -> None:
        """Load every checkpoint in ``run_dir/checkpoints``; count the corrupt ones (not the injected)."""
        folder = run_dir / "checkpoints"
        for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
            if path.name.startswith("."):
                continue
            fault.checked += 1
            try:
                load_checkpoint(path)
            except CheckpointError as exc:
                if path.name not in injected:
                    fault.corrupt.append(path.name)
                    fault.problems.append(f"{path.name} does not load ({str(exc).split(': ', 1)[-1][:80]})")

    def finished(self, fault: Fault, run_dir: Path) -> None:
        """A rerun that exited 0: the run must be complete and equal to the uninterrupted one."""
        latest = run_dir / "checkpoints" / "latest.pt"
        try:
            payload = load_checkpoint(latest)
        except CheckpointError as exc:
            fault.problems.append(f"finished without a loadable latest.pt ({exc})")
            fault.weights_equal = False
            return
        if (payload["epoch"], payload["iteration"]) != (self.epochs, self.epochs * self.steps):
            fault.problems.append(f"finished at epoch {payload['epoch']}, step {payload['iteration']}, expected "
                                  f"{self.epochs}, {self.epochs * self.steps}")
        fault.weights_equal = same_weights(payload["model_state"], self.reference)
        if not fault.weights_equal:
            fault.problems.append("final weights differ from the uninterrupted run's")
        try:
            best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
        except CheckpointError:
            best = None  # missing (a corrupt one is counted by census)
        epoch, weights = self.reference_best
        if best is None or best["epoch"] != epoch or not same_weights(best["model_state"], weights):
            fault.problems.append("best.pt " + ("is missing" if best is None else f"holds epoch {best['epoch']}")
                                  + f", the uninterrupted run's holds epoch {epoch}")
        rows = metrics(run_dir)
        if [{k: r.get(k) for k in COMPARED} for r in rows] != \
                [{k: r.get(k) for k in COMPARED} for r in self.reference_rows]:
            fault.problems.append("metrics.csv differs from the uninterrupted run's")
        left = temporaries(run_dir) + temporaries(run_dir / "checkpoints")
        if left:
            fault.problems.append(f"temporary files left after the rerun: {', '.join(p.name for p in left)}")

    def rerun(self, fault: Fault, folder: Path, expected: set[int] = frozenset({0})) -> Result:
        """The same command again; its exit, the checkpoints, and the final state when it finished."""
        result = self.start(folder, "rerun").finish(self.timeout)
        fault.problems += result.problems(set(expected))
        run_dir = folder / "run"
        if result.rc == 0:
            self.finished(fault, run_dir)
        how = self.resumed(result)
        if "temporary file(s) left" in result.text:
            how += " (removed a killed write's temporary file)"
        if result.rc == 0:
            fault.notes.append(f"rerun {how}, exit 0 in {result.seconds:.1f} s")
        return result

    def resumed(self, result: Result) -> str:
        """How a rerun began: resumed where, found the run finished, or started (afresh)."""
        m = RESUMED.search(result.text)
        if m:
            epoch = int(re.search(r"epoch (\d+)", m[1])[1])
            return "found the run finished" if epoch > self.epochs else f"resumed at {m[1]}"
        return "started afresh" if "starting afresh" in result.text else "started"

    @staticmethod
    def conclude(fault: Fault, final: Result) -> Fault:
        fault.outcome = "defect" if fault.problems else "recovered" if final.rc == 0 else "clean error"
        return fault

    # -- faults ----------------------------------------------------------------------------------
    def kill9(self, index: int, at: float | None, save: int | None) -> Fault:
        """kill -9 at ``at`` seconds after the start, or when the ``save``-th checkpoint write has begun."""
        where = f"at {at:.1f} s" if at is not None else f"during save {save} of {len(self.save_times)}"
        fault = Fault(f"kill -9 #{index} {where}")
        folder = self.folder(f"kill9-{index:02d}")
        job = self.start(folder, "fault")
        checkpoints = folder / "run" / "checkpoints"
        if at is not None:
            job.wait_until(lambda: job.elapsed() >= at, self.timeout, interval=0.005)
        else:
            seen: set[str] = set()

            def nth_save() -> bool:
                seen.update(p.name for p in temporaries(checkpoints))
                return len(seen) >= save

            job.wait_until(nth_save, self.timeout, interval=0.0005)
        killed = job.signal(signal.SIGKILL)
        first = job.finish(self.timeout)
        if killed:
            left = temporaries(checkpoints)
            during = f"; inside a save (left {left[0].name}, {left[0].stat().st_size} B)" if left else ""
            fault.notes.append(f"killed at {first.signalled_at:.1f} s, "
                               f"{phase_at(first.lines, first.signalled_at or 0.0)}{during}")
            fault.problems += first.problems({-signal.SIGKILL})
        else:
            fault.notes.append(f"the run had ended (exit {first.rc}) before the kill")
            fault.problems += first.problems({0})
        self.census(fault, folder / "run")
        return self.conclude(fault, self.rerun(fault, folder))

    def sigterm(self, phase: str) -> Fault:
        """SIGTERM at a phase of the run; the job must stop within the grace period with one line (143)."""
        fault = Fault(f"SIGTERM during {phase}")
        folder = self.folder("sigterm-" + re.sub(r"\W+", "-", phase).strip("-"))
        run_dir = folder / "run"
        job = self.start(folder, "fault")
        e, k, n = self.epochs, self.steps, self.epochs
        expected = {128 + signal.SIGTERM}
        if phase.startswith("interpreter start"):
            job.wait_until(lambda: job.elapsed() >= 0.3, self.timeout)
            expected |= {-signal.SIGTERM}  # before trunet's handler: the default action, as a shell's 143
        elif phase.startswith("start-up"):
            job.wait_until(lambda: (run_dir / "log.txt").exists(), self.timeout, interval=0.0005)
        elif phase == "training steps":
            job.wait_until(lambda: job.saw(rf"^epoch {min(2, e)}/{n}: 1/{k} step"), self.timeout)
        elif phase == "validation":
            job.wait_until(lambda: job.saw(rf"^epoch 1/{n}: {k}/{k} step"), self.timeout)
            time.sleep(0.2)
        elif phase == "a checkpoint save":
            job.wait_until(lambda: bool(temporaries(run_dir / "checkpoints")), self.timeout, interval=0.0005)
        elif phase == "the end of the run":
            job.wait_until(lambda: job.saw(rf"^epoch {n}/{n}  loss"), self.timeout)
            expected |= {0, -signal.SIGTERM}  # finished and saved: 0, or killed after the handler is gone
        tmp_seen = [p.name for p in temporaries(run_dir / "checkpoints")]
        if not job.signal(signal.SIGTERM):
            fault.notes.append("the run ended before the signal")
        first = job.finish(self.timeout)
        fault.problems += first.problems(expected)
        if first.signalled_at is not None:
            landed = phase_at(first.lines, first.signalled_at)
            if tmp_seen:
                landed += f": writing {tmp_seen[0]}"
            stop = first.stop_seconds or 0.0
            said = STOPPED.search(first.text)
            code = ("killed by the default action (a shell's 143)" if first.rc == -signal.SIGTERM
                    else f"exit {first.rc}")
            fault.notes.append(f"signal at {first.signalled_at:.1f} s ({landed}); {code} after {stop:.1f} s"
                               + (f", 'stopped by SIGTERM {said[1]}'" if said else ""))
            if stop > GRACE_S and not first.timed_out:
                fault.problems.append(f"stopped {stop:.1f} s after SIGTERM (> {GRACE_S:.0f} s grace period)")
            latest = run_dir / "checkpoints" / "latest.pt"
            if phase == "validation" and first.rc == 128 + signal.SIGTERM and latest.is_file():
                payload = load_checkpoint(latest)
                if (payload["epoch"], payload.get("epoch_iteration")) == (0, k):
                    fault.notes.append("latest.pt holds epoch 1's steps, not its validation")
        self.census(fault, run_dir)
        return self.conclude(fault, self.rerun(fault, folder))

    def corrupt_checkpoint(self) -> Fault:
        """Stop after the first checkpoint, write 64 random bytes into a weight of latest.pt, run again."""
        fault = Fault("corrupted checkpoint (64 random bytes in a weight of latest.pt)")
        folder = self.folder("corrupt-checkpoint")
        run_dir = folder / "run"
        latest = run_dir / "checkpoints" / "latest.pt"
        job = self.start(folder, "fault")
        job.wait_until(lambda: latest.is_file(), self.timeout)
        job.signal(signal.SIGTERM)
        first = job.finish(self.timeout)
        fault.problems += first.problems({128 + signal.SIGTERM})
        if not latest.is_file():
            fault.problems.append("no latest.pt to corrupt")
            return self.conclude(fault, first)
        name, offset = inject_bytes(latest, self.rng)
        fault.notes.append(f"64 bytes at byte {offset} of {name}")
        self.census(fault, run_dir, injected=("latest.pt",))
        final = self.rerun(fault, folder, expected={2})
        if final.rc == 2 and "corrupt checkpoint" not in final.message():
            fault.problems.append(f"refused, but not for the corruption: {final.message()[:100]}")
        elif final.rc == 2:
            fault.notes.append(f"rerun: exit 2, '{shorten(final.message(), run_dir)}'")
        if final.rc == 0:
            fault.problems.append("the corrupted checkpoint was used silently")
        predict = Job([sys.executable, "-m", "trunet", "predict", "--checkpoint", str(latest), "--input",
                       str(first_image(self.datalist)), "--output", str(folder / "pred"), "--device", "cpu"],
                      folder / "predict.log", self.env, "predict").finish(self.timeout)
        fault.problems += predict.problems({2})
        if predict.rc == 2:
            fault.notes.append("predict with it: exit 2, the same line")
        self.census(fault, run_dir, injected=("latest.pt",))
        return self.conclude(fault, final)

    def concurrent(self) -> Fault:
        """The same command twice at the same moment on one run folder."""
        fault = Fault("two concurrent jobs on one run folder")
        folder = self.folder("concurrent")
        jobs = [self.start(folder, "job-a"), self.start(folder, "job-b")]
        results = [job.finish(self.timeout) for job in jobs]
        for r in results:
            fault.problems += r.problems({0, 2})
        trained = [r for r in results if any(STEP.match(line) for _, line in r.lines)]
        refused = [r for r in results if r.rc == 2]
        if len(trained) > 1:
            fault.problems.append("both jobs trained in the folder")
        for r in refused:
            if "in use by another trunet process" not in r.message():
                fault.problems.append(f"{r.label} refused for another reason: {r.message()[:100]}")
        fault.notes.append(", ".join(f"{r.label}: exit {r.rc} in {r.seconds:.1f} s" for r in results))
        if refused:
            fault.notes.append(f"'{shorten(refused[0].message(), folder / 'run')}'")
        self.census(fault, folder / "run")
        return self.conclude(fault, self.rerun(fault, folder))

    def full_disk(self, method: list[str]) -> Fault:
        """The run folder on a small tmpfs: exit 74 with one line, then more space and the same command."""
        fault = Fault("full disk (tmpfs of 2.5 checkpoints)")
        folder = self.folder("full-disk")
        mount = folder / "mnt"
        mount.mkdir()
        size = int(2.5 * self.checkpoint_bytes)
        script = folder / "inside.sh"
        limit = int(self.timeout)
        script.write_text(f"""set -u
mnt="$1"; out="$2"; shift 2
mount -t tmpfs -o size={size} trunet-faults "$mnt" || exit 97
timeout -s KILL {limit} "$@" > "$out/fault.log" 2>&1; echo $? > "$out/fault.rc"
cp -a "$mnt/run" "$out/after-fault"
mount -o remount,size=256m "$mnt"
timeout -s KILL {limit} "$@" > "$out/rerun.log" 2>&1; echo $? > "$out/rerun.rc"
cp -a "$mnt/run" "$out/final"
""")
        argv = [*method, "sh", str(script), str(mount), str(folder), *self.argv(mount / "run")]
        outer = Job(argv, folder / "namespace.log", self.env, "namespace").finish(3 * self.timeout)
        if outer.rc != 0 or not (folder / "rerun.rc").is_file():
            fault.problems.append(f"the tmpfs run did not complete (exit {outer.rc}; see {folder})")
            return self.conclude(fault, outer)
        first, final = (read_result(folder, label, limit) for label in ("fault", "rerun"))
        after = folder / "after-fault"
        if first.rc == 0:
            fault.outcome = "not reached"
            fault.notes.append(f"the disk never filled (the run fitted in {size} B): the fault was not reached")
            return fault
        fault.problems += first.problems({74})
        if first.rc == 74:
            fault.notes.append(f"exit 74, '{shorten(first.message(), mount / 'run')}'")
            last = (after / "log.txt").read_text().strip().splitlines()[-1:]
            if not last or "no space left on device" not in last[0]:
                fault.problems.append("log.txt does not end with why the job ended")
            left = temporaries(after / "checkpoints") + temporaries(after)
            if left:
                fault.problems.append(f"partial files left: {', '.join(p.name for p in left)}")
        self.census(fault, after)
        fault.problems += final.problems({0})
        if final.rc == 0:
            self.finished(fault, folder / "final")
            fault.notes.append(f"with space freed the rerun {self.resumed(final)}, exit 0")
        self.census(fault, folder / "final")
        fault.notes.append(f"tmpfs in a private mount namespace ({' '.join(method)})")
        return self.conclude(fault, final)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Every tensor of two state dicts equal, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_result(folder: Path, label: str, timeout: float) -> Result:
    """A process run inside the full-disk namespace, from its log and exit-code files."""
    rc = int((folder / f"{label}.rc").read_text().strip())
    lines = [(0.0, line) for line in (folder / f"{label}.log").read_text().splitlines()]
    # the shell reports a signal as 128 + n; `timeout -s KILL` ends a hang with 137
    return Result(label, rc, lines, 0.0, timed_out=rc == 137, timeout=timeout)


def inject_bytes(path: Path, rng: random.Random) -> tuple[str, int]:
    """Overwrite 64 bytes of one weight tensor of a checkpoint in place; return the weight's name and the
    file offset. The tensor's bytes are found in the file (torch stores them uncompressed, once)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    data = path.read_bytes()
    names = [k for k, v in state.items() if v.is_floating_point() and v.numel() * v.element_size() >= 256]
    rng.shuffle(names)
    for name in names:
        blob = state[name].contiguous().numpy().tobytes()
        start = data.find(blob)
        if start >= 0 and data.find(blob, start + 1) < 0:
            offset = start + rng.randrange(0, len(blob) - 64 + 1)
            with open(path, "r+b") as fh:
                fh.seek(offset)
                fh.write(rng.randbytes(64))
            return name, offset
    raise RuntimeError(f"{path}: no weight found by its bytes")


def first_image(datalist: Path) -> Path:
    entry = json.loads(datalist.read_text())["training"][0]
    return datalist.parent / entry["image"]


def shorten(message: str, run_dir: Path) -> str:
    """A message with the run folder written as RUN and a lock holder as N on HOST (the table is read on
    other machines)."""
    message = re.sub(r"\(pid \d+ on [^)]*\)", "(pid N on HOST)", message.replace(str(run_dir), "RUN"))
    return message.replace("|", "/")


def tmpfs_method(probe: Path) -> tuple[Optional[list[str]], str]:
    """How this machine can mount a small tmpfs without touching the host's mounts: ``unshare -m`` (root,
    a private mount namespace) or ``unshare -rm`` (an unprivileged user namespace); None and why not."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None, "no unshare(1) here (Linux util-linux) to mount a private tmpfs"
    probe.mkdir(parents=True, exist_ok=True)
    errors = []
    for method in (["unshare", "-m"], ["unshare", "-rm"]):
        try:
            proc = subprocess.run([*method, "sh", "-c", 'mount -t tmpfs -o size=1m probe "$0" && touch "$0/x"',
                                   str(probe)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{' '.join(method)}: {exc}")
            continue
        if proc.returncode == 0:
            return method, ""
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        errors.append(f"{' '.join(method)}: {last}")
    return None, "cannot mount a tmpfs here (" + "; ".join(errors) + ")"


def machine() -> str:
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs{load}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder (phantom, one folder per fault)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments and the corrupted bytes")
    parser.add_argument("--quick", action="store_true",
                        help="a 2 x 2-step run and two faults: kill -9 during a save, SIGTERM during the steps")
    parser.add_argument("--only", default=None, metavar="TEXT[,TEXT]",
                        help="run only the faults whose names contain one of these, e.g. 'SIGTERM,full disk'")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which a process counts as hung (default: 10x the uninterrupted run, "
                             "at least 120)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    date = _dt.datetime.now().astimezone().isoformat(timespec="minutes")
    args.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.work.resolve(), args.seed, args.quick, args.timeout)
    bench.run_reference()

    faults: list[Fault] = []
    skipped: list[str] = []
    saves = max(1, len(bench.save_times))
    kills = 1 if args.quick else 10
    at_saves = set(range(kills)) if args.quick else set(bench.rng.sample(range(kills), 3))
    plan: list[tuple[str, Callable[[], Fault]]] = []
    for i in range(kills):
        if i in at_saves:  # the n-th checkpoint write of the run
            kill = partial(bench.kill9, i + 1, None, bench.rng.randint(1, saves))
        else:  # a moment of the uninterrupted run's wall time
            kill = partial(bench.kill9, i + 1, bench.rng.uniform(0.02, 0.98) * bench.reference_seconds, None)
        plan.append((f"kill -9 #{i + 1}", kill))
    phases = (["training steps"] if args.quick else
              ["interpreter start (imports)", "start-up (run folder, data caching)", "training steps",
               "validation", "a checkpoint save", "the end of the run"])
    plan += [(f"SIGTERM during {p}", partial(bench.sigterm, p)) for p in phases]
    if not args.quick:
        plan.append(("corrupted checkpoint", bench.corrupt_checkpoint))
        plan.append(("full disk", lambda: bench.full_disk(method)))
        plan.append(("two concurrent jobs", bench.concurrent))
    if args.only:
        plan = [(name, make) for name, make in plan if any(s in name for s in args.only.split(","))]
    method: Optional[list[str]] = None
    if any(name == "full disk" for name, _ in plan):
        method, why = tmpfs_method(bench.work / "tmpfs-probe")
        if method is None:
            skipped.append(f"full disk: skipped: {why}; not faked")
            plan = [(name, make) for name, make in plan if name != "full disk"]
    for _, make in plan:
        fault = make()
        faults.append(fault)
        print(f"[{time.monotonic() - started:6.0f} s] {fault.name}: {fault.outcome}", file=sys.stderr, flush=True)

    command = shlex.join(["python", "benchmarks/faults.py", *(sys.argv[1:] if argv is None else argv)])
    tried = [f for f in faults if f.outcome != "not reached"]
    finished = [f for f in tried if f.weights_equal is not None]
    checked = sum(f.checked for f in tried)
    corrupt = sum(len(f.corrupt) for f in tried)
    defects = [f for f in tried if f.outcome == "defect"]
    print(f"command: `{command}`  ")
    print(f"machine: {machine()}  ")
    print(f"date: {date}; wall time {time.monotonic() - started:.0f} s  ")
    print(f"run: `python -m trunet train --config configs/tiny.yaml --data PHANTOM/datalist.json --run-dir RUN "
          f"--resume auto {' '.join(bench.overrides)}` (4 phantom cases: {bench.cases}; one CPU thread); "
          f"uninterrupted: {bench.reference_seconds:.1f} s, {len(bench.save_times)} checkpoint saves "
          f"seen, latest.pt {bench.checkpoint_bytes / 1e6:.2f} MB; hang timeout {bench.timeout:.0f} s")
    print()
    print("| faults tried | recovered | clean errors | defects | checkpoints corrupt | final weights equal to an "
          "uninterrupted run |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(tried)} | {sum(f.outcome == 'recovered' for f in tried)} | "
          f"{sum(f.outcome == 'clean error' for f in tried)} | {len(defects)} | {corrupt} of {checked} loaded | "
          f"{sum(bool(f.weights_equal) for f in finished)} of {len(finished)} finished runs |")
    print()
    print("| # | fault | outcome | note |")
    print("|---|---|---|---|")
    for i, f in enumerate(faults, 1):
        outcome = f"**{f.outcome}**" if f.outcome == "defect" else f.outcome
        print(f"| {i} | {f.name} | {outcome} | {f.note()} |")
    for line in skipped:
        print(f"\n{line}")
    return 1 if defects else 0


if __name__ == "__main__":
    raise SystemExit(main())
