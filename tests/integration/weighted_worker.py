"""One rank of the weighted-aggregation checks, for gloo (started with the rendezvous
environment) and mpi (started by ``mpiexec``): ``python weighted_worker.py --backend B --out DIR``.

Each rank runs every scenario, saves what it saw to ``DIR/rank<r>.pt`` and prints ``OK``.
The test process computes the references on its own and compares (the ``check_*`` helpers
below are shared by ``test_weighted_gloo.py`` and ``test_weighted_mpi.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scadles.aggregate import aggregation_weight, global_batch  # noqa: E402
from scadles.comm import make_comm, share_cpu_threads  # noqa: E402
from scadles.exchange import DenseExchanger, weighted_allreduce_  # noqa: E402
from scadles.models import build_model, parameter_digest  # noqa: E402

WORLD_SIZE = 3
MODEL = dict(name="smallcnn", num_classes=5, in_channels=1, image_size=12, seed=7)
BATCHES = {"unequal": [5, 2, 9], "equal": [4, 4, 4], "empty": [6, 0, 3]}
GATHER_SIZES = [3, 0, 5]
RTOL, ATOL = 1e-5, 1e-6  # float32 sums of a few hundred terms in a different order


def scenario_data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of scenario ``name`` (every rank and the test build the same)."""
    gen = torch.Generator().manual_seed(1000 + sorted(BATCHES).index(name))
    total = sum(BATCHES[name])
    images = torch.randn(total, MODEL["in_channels"], MODEL["image_size"], MODEL["image_size"],
                         generator=gen)
    labels = torch.randint(0, MODEL["num_classes"], (total,), generator=gen)
    return images, labels


def local_slice(name: str, rank: int) -> slice:
    start = sum(BATCHES[name][:rank])
    return slice(start, start + BATCHES[name][rank])


def new_model() -> torch.nn.Module:
    return build_model(MODEL["name"], MODEL["num_classes"], MODEL["in_channels"],
                       MODEL["image_size"], MODEL["seed"])


def local_backward(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Mean loss over the local batch, backward; an empty batch leaves ``.grad`` as None."""
    model.zero_grad(set_to_none=True)
    if len(labels):
        F.cross_entropy(model(images), labels).backward()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference_grads(name: str) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over the concatenation of every rank's batch."""
    model = new_model()
    images, labels = scenario_data(name)
    local_backward(model, images, labels)
    return grads_of(model)


def run_rank(backend: str, out_dir: Path) -> None:
    comm = make_comm(backend, timeout_s=60)
    share_cpu_threads(comm)
    rank = comm.rank
    assert comm.world_size == WORLD_SIZE, comm
    result: dict = {"rank": rank, "world_size": comm.world_size, "digest": {}}

    for name in ("unequal", "empty"):
        model = new_model()
        result["digest"][name] = parameter_digest(model)
        images, labels = scenario_data(name)
        part = local_slice(name, rank)
        local_backward(model, images[part], labels[part])
        bsz = global_batch(comm, len(labels[part]))
        result[f"{name}_global_bsz"] = bsz
        weight = aggregation_weight(len(labels[part]), bsz)
        weighted_allreduce_(comm, list(model.parameters()), weight)
        result[name] = grads_of(model)

    # Same property through the exchanger, with buckets small enough to split the model.
    model = new_model()
    images, labels = scenario_data("unequal")
    part = local_slice("unequal", rank)
    local_backward(model, images[part], labels[part])
    exchanger = DenseExchanger(comm, bucket_cap_mb=0.01)
    weight = aggregation_weight(len(labels[part]), sum(BATCHES["unequal"]))
    stats = exchanger.exchange(list(model.named_parameters()), weight, step=0)
    result["buckets"] = grads_of(model)
    result["buckets_stats"] = stats
    result["buckets_summary"] = exchanger.summary().to_dict()
    result["num_buckets"] = len(exchanger._buckets)

    # Equal batches: ours (weight 1/W) against DistributedDataParallel where torch has it.
    model = new_model()
    images, labels = scenario_data("equal")
    part = local_slice("equal", rank)
    local_backward(model, images[part], labels[part])
    weight = aggregation_weight(BATCHES["equal"][rank], sum(BATCHES["equal"]))
    weighted_allreduce_(comm, list(model.parameters()), weight)
    result["equal"] = grads_of(model)
    if backend == "gloo":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(new_model())
        local_backward(ddp, images[part], labels[part])
        result["ddp"] = grads_of(ddp.module)

    # Collectives on their own.
    mine = torch.arange(GATHER_SIZES[rank], dtype=torch.float32) + 10 * rank
    result["gather_f32"] = comm.allgather_varlen(mine)
    result["gather_i32"] = comm.allgather_varlen(mine.to(torch.int32))
    result["max"] = comm.allreduce_(torch.tensor([float(rank), -float(rank)]), op="max")
    result["bcast"] = comm.broadcast_(torch.full((4,), float(rank)), src=WORLD_SIZE - 1)
    result["noncontig_f16"] = comm.allreduce_(
        (torch.arange(6.0).reshape(2, 3) * (rank + 1)).to(torch.float16).t())
    comm.barrier()
    torch.save(result, out_dir / f"rank{rank}.pt")
    comm.close()
    print(f"OK rank {rank}", flush=True)


# -- checks shared by the gloo and mpi tests ------------------------------------------------

def subprocess_env() -> dict[str, str]:
    """The environment for rank processes: the repository on PYTHONPATH."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def load_results(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{name}: {m}")


def check_matches_mean_loss(results: list[dict], scenario: str) -> None:
    """Every rank ends with the gradient of the mean loss over the concatenated batches."""
    expected = reference_grads(scenario)
    for r in results:
        assert r[f"{scenario}_global_bsz"] == sum(BATCHES[scenario])
        assert_grads_close(r[scenario], expected)


def check_buckets(results: list[dict]) -> None:
    expected = reference_grads("unequal")
    numel = sum(p.numel() for p in new_model().parameters())
    for r in results:
        assert r["num_buckets"] > 1
        assert_grads_close(r["buckets"], expected)
        stats = r["buckets_stats"]
        assert stats == {"compressed": False, "ratio": 1.0, "signal": None,
                         "bytes_sent": 4 * numel, "floats_sent": numel, "compress_s": 0.0}
        assert r["buckets_summary"]["bytes_sent_total"] == 4 * numel


def check_equal_batches(results: list[dict]) -> None:
    expected = reference_grads("equal")
    for r in results:
        assert_grads_close(r["equal"], expected)
        if "ddp" in r:
            assert_grads_close(r["equal"], r["ddp"])


def check_collectives(results: list[dict]) -> None:
    for r in results:
        for key, dtype in (("gather_f32", torch.float32), ("gather_i32", torch.int32)):
            got = r[key]
            assert [g.numel() for g in got] == GATHER_SIZES
            for src, g in enumerate(got):
                assert g.dtype == dtype
                torch.testing.assert_close(
                    g, (torch.arange(GATHER_SIZES[src], dtype=torch.float32) + 10 * src).to(dtype),
                    rtol=0, atol=0)
        torch.testing.assert_close(r["max"], torch.tensor([2.0, 0.0]), rtol=0, atol=0)
        torch.testing.assert_close(r["bcast"], torch.full((4,), 2.0), rtol=0, atol=0)
        expected = (torch.arange(6.0).reshape(2, 3) * 6).to(torch.float16).t()
        torch.testing.assert_close(r["noncontig_f16"], expected, rtol=0, atol=0)


def check_identical_models(results: list[dict]) -> None:
    digests = {r["digest"]["unequal"] for r in results} | {r["digest"]["empty"] for r in results}
    assert digests == {parameter_digest(new_model())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run_rank(args.backend, args.out)
