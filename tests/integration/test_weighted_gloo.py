"""Weighted aggregation on 3 real gloo ranks (separate processes on loopback).

Unequal batches: the aggregate equals the gradient of the mean loss over the concatenated
batches; equal batches: it equals DistributedDataParallel's; a rank with an empty batch takes
part with weight 0; allgather_varlen with uneven (and empty) pieces.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import weighted_worker as ww  # noqa: E402

from scadles.comm import make_comm  # noqa: E402

WORKER = Path(__file__).with_name("weighted_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gloo")
    env = dict(ww.subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(ww.WORLD_SIZE), LOCAL_WORLD_SIZE=str(ww.WORLD_SIZE))
    command = [sys.executable, str(WORKER), "--backend", "gloo", "--out", str(out)]
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(ww.WORLD_SIZE)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"OK rank {r}" in text, f"rank {r} failed:\n{text}"
    return ww.load_results(out)


def test_unequal_batches_give_gradient_of_mean_loss_over_union(results):
    ww.check_matches_mean_loss(results, "unequal")


def test_several_buckets_give_same_aggregate_and_count_bytes(results):
    ww.check_buckets(results)


def test_equal_batches_match_distributed_data_parallel(results):
    assert all("ddp" in r for r in results)
    ww.check_equal_batches(results)


def test_empty_batch_rank_takes_part_with_zero_weight(results):
    ww.check_matches_mean_loss(results, "empty")


def test_allgather_varlen_uneven_sizes_and_other_collectives(results):
    ww.check_collectives(results)


def test_models_identical_across_ranks(results):
    ww.check_identical_models(results)


def test_unknown_backend_is_a_clear_value_error():
    with pytest.raises(ValueError, match="unknown backend 'tcp'.*gloo, nccl, mpi"):
        make_comm("tcp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_nccl_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="nccl.*needs CUDA GPUs"):
        make_comm("nccl")


def test_single_rank_gloo_needs_no_rendezvous(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    comm = make_comm("gloo")
    try:
        assert (comm.rank, comm.world_size, comm.device) == (0, 1, torch.device("cpu"))
        t = torch.tensor([3.0])
        assert comm.allreduce_(t).item() == 3.0
        assert [x.tolist() for x in comm.allgather_varlen(torch.tensor([1, 2]))] == [[1, 2]]
    finally:
        comm.close()
