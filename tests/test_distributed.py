"""Distributed helpers: the single-process context is a no-op; real collectives over Gloo (2 CPU ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trunet.pipeline.training import distributed as D

REPO = Path(__file__).resolve().parents[1]


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with D.distributed_context() as ctx:
        assert ctx.is_main and not ctx.distributed and ctx.world_size == 1
        assert ctx.device == D.pick_device(0)
        D.barrier(ctx)
        t = torch.tensor([2.0, 4.0])
        assert torch.equal(D.all_reduce_mean(t, ctx), t)
        assert D.all_reduce_mean(3.0, ctx) == 3.0
        assert D.all_gather_objects({"a": 1}, ctx) == [{"a": 1}]
        assert D.broadcast_object("x", ctx) == "x"
    assert D.launcher_world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert D.launcher_world_size() == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with D.distributed_context() as ctx:
        mean = D.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]), ctx)
        scalar = D.all_reduce_mean(float(rank + 1), ctx)
        gathered = D.all_gather_objects({"rank": rank}, ctx)
        D.barrier(ctx)
        from_zero = D.broadcast_object(f"hello from {rank}", ctx)
        queue.put((rank, ctx.backend, mean.tolist(), scalar, gathered, from_zero))


def test_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    results = sorted(queue.get() for _ in range(2))
    for rank, backend, mean, scalar, gathered, from_zero in results:
        assert backend == "gloo"
        assert mean == pytest.approx([0.5, 5.0]) and scalar == pytest.approx(1.5)
        assert gathered == [{"rank": 0}, {"rank": 1}]
        assert from_zero == "hello from 0"


def _torchrun(run: Path, datalist: Path, debug: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRUNET_DEBUG_DIR=str(debug), WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "trunet", "train", "--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(datalist),
           "--run-dir", str(run), "tracking.wandb.mode=disabled", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 Gloo ranks: identical weights on both ranks, checkpoints written by rank 0 only,
    and --resume under torchrun continues the run."""
    from trunet.data.phantom import write_phantom_dataset
    from trunet.pipeline.checkpoint import load_checkpoint, model_from_checkpoint
    from trunet.pipeline.training import parameter_checksum

    datalist = write_phantom_dataset(tmp_path / "phantom", cases=4, seed=0, inplane_scale=2.5, max_frames=6)
    run, debug = tmp_path / "run", tmp_path / "debug"
    result = _torchrun(run, datalist, debug, "train.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    result = _torchrun(run, datalist, debug, "train.epochs=2", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]

    params0 = (debug / "rank0-params.txt").read_text().splitlines()
    params1 = (debug / "rank1-params.txt").read_text().splitlines()
    assert [line.split()[1] for line in params0] == ["1", "2"]
    assert params0 == params1  # same weights on both ranks after every epoch
    saves = (debug / "rank0-saves.txt").read_text().splitlines()
    assert not (debug / "rank1-saves.txt").exists()  # rank 1 never writes a checkpoint
    assert [s.split()[0].rsplit("/", 1)[-1] for s in saves].count("latest.pt") == 2  # once per epoch

    latest = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert latest["epoch"] == 2 and latest["iteration"] == 4
    assert repr(parameter_checksum(model_from_checkpoint(latest))) == params0[-1].split()[2]
    log = (run / "log.txt").read_text()
    assert "x 2 processes (gloo)" in log and "resuming" in log
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,2,") and rows[2].startswith("2,4,")
