"""Weighted aggregation under a real ``mpiexec -n 3`` (backend mpi: mpi4py collectives,
since this torch build has no MPI backend). Same properties as on gloo; the equal-batch case
is checked against the mean-loss reference (DistributedDataParallel needs a torch process
group, which the mpi4py path does not create)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import weighted_worker as ww  # noqa: E402

WORKER = Path(__file__).with_name("weighted_worker.py")
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    assert MPIEXEC.exists(), f"no mpiexec next to {sys.executable}: pip install mpich mpi4py"
    out = tmp_path_factory.mktemp("mpi")
    env = ww.subprocess_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [str(MPIEXEC), "-n", str(ww.WORLD_SIZE), sys.executable, str(WORKER),
         "--backend", "mpi", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mpiexec exited with {proc.returncode}:\n{text}"
    for r in range(ww.WORLD_SIZE):
        assert f"OK rank {r}" in text, text
    return ww.load_results(out)


def test_mpi_world_is_one_group_of_three(results):
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 3), (1, 3), (2, 3)]


def test_unequal_batches_give_gradient_of_mean_loss_over_union(results):
    ww.check_matches_mean_loss(results, "unequal")


def test_several_buckets_give_same_aggregate_and_count_bytes(results):
    ww.check_buckets(results)


def test_equal_batches_give_plain_average(results):
    ww.check_equal_batches(results)


def test_empty_batch_rank_takes_part_with_zero_weight(results):
    ww.check_matches_mean_loss(results, "empty")


def test_allgather_varlen_uneven_sizes_and_other_collectives(results):
    ww.check_collectives(results)


def test_models_identical_across_ranks(results):
    ww.check_identical_models(results)
