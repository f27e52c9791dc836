"""Distributed helpers: the single-process context is a no-op; real collectives over Gloo (2 CPU ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from trunet.pipeline import distributed as D


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
