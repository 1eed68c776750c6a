"""Compressed gradient exchange on 3 real ranks: gloo (separate processes on loopback) and
mpi (``mpiexec -n 3``, through mpi4py).

- ratio 1.0 equals the dense weighted aggregation (and ``DenseExchanger``);
- uneven k across ranks (per-rank ratios, layers of different sizes, different weights, a
  rank without a gradient) equals the sum of each rank's Top-k of its weighted gradient;
- the vote: ranks with different signals all take the majority path;
- a tiny adaptive training run switches from dense to compressed when the threshold forces it;
- the general payload path (any compressor): QSGD, and a payload whose length differs across
  ranks, equal the sum of each rank's decompressed payload.

This file is also the worker: ``python test_compress_ranks.py --backend B --out DIR`` runs
every scenario on one rank and saves what it saw to ``DIR/rank<r>.pt``; the tests compute
the references themselves and compare.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scadles.compress.topk import TopKCompressor, topk_k  # noqa: E402
from scadles.exchange import make_exchanger  # noqa: E402

WORLD_SIZE = 3
RTOL, ATOL = 1e-5, 1e-6  # float32 sums of three terms, in a different order than allreduce
SHAPES = [(16, 8), (8,), (4, 4, 3, 3), (1,), (300,)]
BATCHES = [3, 5, 8]                     # local batch sizes: weights b_i / B
UNEVEN_RATIOS = [0.05, 0.2, 0.5]        # per-rank Top-k ratios
UNEVEN_NO_GRAD = (1, 2)                 # rank 1 has no gradient for layer 2
VOTE_KINDS = [["spiky", "spiky", "flat"],  # step 0: two of three vote to compress
              ["spiky", "flat", "flat"]]   # step 1: one of three does
TINY_STEPS = 8


def weight(rank: int) -> float:
    return BATCHES[rank] / sum(BATCHES)


def rank_grads(scenario: int, rank: int, step: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * scenario + 100 * step + rank)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def vote_grads(step: int, rank: int) -> list[torch.Tensor]:
    """Spiky gradients (Top-k keeps nearly all their energy: signal ~0) or flat ones (equal
    magnitudes: Top-k 10% keeps 10% of the energy: signal 0.9)."""
    gen = torch.Generator().manual_seed(50_000 + 100 * step + rank)
    out = []
    for s in SHAPES:
        n = torch.Size(s).numel()
        if VOTE_KINDS[step][rank] == "spiky":
            g = 0.001 * torch.randn(n, generator=gen)
            g[torch.randperm(n, generator=gen)[: max(1, n // 50)]] = 10.0
        else:
            g = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        out.append(g.view(s))
    return out


def as_params(grads: list[torch.Tensor]) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for i, (g, shape) in enumerate(zip(grads, SHAPES)):
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = g.clone() if g is not None else None
        named.append((f"layer{i}", p))
    return named


def grads(named) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for _, p in named]


class ThresholdSparse:
    """Entries with |x| >= THRESHOLD as (values, indices), with neither ``sparse_payload`` nor
    ``decompress_add_``: the general path, with payload lengths that differ across ranks."""

    THRESHOLD = 0.3

    def compress(self, tensor, name):
        flat = tensor.reshape(-1)
        indices = (flat.abs() >= self.THRESHOLD).nonzero().squeeze(1)
        return [flat[indices], indices], tensor.shape

    def decompress(self, payload, ctx):
        values, indices = payload
        out = torch.zeros(ctx).reshape(-1)
        out[indices] = values
        return out.view(ctx)


def qsgd_seed(rank: int) -> int:
    return 700 + rank


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


# -- the worker --------------------------------------------------------------------------------

def run_rank(backend: str, out_dir: Path) -> None:
    from scadles.exchange import DenseExchanger
    from scadles.comm import make_comm

    torch.set_num_threads(1)
    comm = make_comm(backend, timeout_s=60)
    rank = comm.rank
    assert comm.world_size == WORLD_SIZE, comm
    result: dict = {"rank": rank}

    # 1. Ratio 1.0 (two steps: the residual stays zero) and the dense exchanger.
    ex = make_exchanger(comm, compression="static", compression_ratio=1.0)
    result["full"] = []
    for step in range(2):
        named = as_params(rank_grads(1, rank, step))
        stats = ex.exchange(named, weight(rank), step)
        result["full"].append({"grads": grads(named), "stats": stats})
    result["full_residual_abs"] = float(sum(r.abs().sum() for r in ex.memory.residuals.values()))
    named = as_params(rank_grads(1, rank, 0))
    DenseExchanger(comm).exchange(named, weight(rank), 0)
    result["dense"] = grads(named)

    # 2. Uneven k: per-rank ratio, a rank without one layer's gradient.
    g = rank_grads(2, rank)
    if rank == UNEVEN_NO_GRAD[0]:
        g[UNEVEN_NO_GRAD[1]] = None
    named = as_params(g)
    ex = make_exchanger(comm, compression="static", compression_ratio=UNEVEN_RATIOS[rank],
                        error_feedback=False)
    result["uneven_stats"] = ex.exchange(named, weight(rank), 0)
    result["uneven"] = grads(named)

    # 3. The vote: signals differ across ranks, every rank takes the majority's path.
    ex = make_exchanger(comm, compression="adaptive", compression_ratio=0.1, ewma_alpha=1.0,
                        delta_threshold=0.3, error_feedback=False)
    result["vote"] = []
    for step in range(len(VOTE_KINDS)):
        named = as_params(vote_grads(step, rank))
        stats = ex.exchange(named, weight(rank), step)
        result["vote"].append({"grads": grads(named), "stats": stats})

    # 4. A tiny adaptive run: gradnorm-change has no signal for its first two intervals
    # (dense), then any finite change is below a huge threshold (compressed).
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = make_exchanger(comm, compression="adaptive", compression_ratio=0.25,
                        adaptive_signal="gradnorm-change", gradnorm_interval_steps=2,
                        gradnorm_threshold=1e6)
    gen = torch.Generator().manual_seed(900 + rank)
    result["tiny"] = []
    for step in range(TINY_STEPS):
        x = torch.randn(BATCHES[rank], 6, generator=gen)
        y = torch.randint(0, 3, (BATCHES[rank],), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        result["tiny"].append(ex.exchange(list(model.named_parameters()), weight(rank), step))
        opt.step()
    result["tiny_params"] = [p.detach().clone() for p in model.parameters()]
    result["tiny_summary"] = ex.summary().to_dict()

    # 5. The general payload path: QSGD (seeded per rank), then a payload whose length
    # differs across ranks (and is empty for the layer rank 1 has no gradient for).
    from scadles.compress.qsgd import QSGDCompressor
    from scadles.exchange import ExchangeSettings, SparseExchanger

    for key, compressor in (("qsgd", QSGDCompressor(seed=qsgd_seed(rank))),
                            ("threshold", ThresholdSparse())):
        g = rank_grads(5, rank)
        if rank == UNEVEN_NO_GRAD[0]:
            g[UNEVEN_NO_GRAD[1]] = None
        named = as_params(g)
        ex = SparseExchanger(comm, ExchangeSettings(compression="static"), compressor)
        result[f"{key}_stats"] = ex.exchange(named, weight(rank), 0)
        result[key] = grads(named)

    comm.barrier()
    torch.save(result, out_dir / f"rank{rank}.pt")
    comm.close()
    print(f"OK rank {rank}", flush=True)


# -- launching ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _launch(backend: str, out: Path) -> list[dict]:
    worker = [sys.executable, str(Path(__file__).resolve()), "--backend", backend,
              "--out", str(out)]
    env = _env()
    if backend == "gloo":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
        procs = [subprocess.Popen(worker, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(WORLD_SIZE)]
    else:
        mpiexec = Path(sys.executable).with_name("mpiexec")
        assert mpiexec.exists() or shutil.which("mpiexec"), "mpiexec is missing from the venv"
        launcher = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
        procs = [subprocess.Popen([launcher, "-n", str(WORLD_SIZE), *worker], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join(outputs)
    assert all(p.returncode == 0 for p in procs), f"{backend} ranks failed:\n{text}"
    for r in range(WORLD_SIZE):
        assert f"OK rank {r}" in text, f"rank {r} did not finish:\n{text}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module", params=["gloo", "mpi"])
def results(request, tmp_path_factory) -> list[dict]:
    return _launch(request.param, tmp_path_factory.mktemp(request.param))


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m: f"layer{i}: {m}")


def weighted_sum(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(weight(r) * per_rank[r][i] for r in range(WORLD_SIZE))
            for i in range(len(SHAPES))]


def topk_sum(per_rank: list[list[torch.Tensor | None]], ratios: list[float]):
    out = [torch.zeros(s) for s in SHAPES]
    for r in range(WORLD_SIZE):
        c = TopKCompressor(ratios[r])
        for i, g in enumerate(per_rank[r]):
            if g is not None:
                payload, ctx = c.compress(weight(r) * g, f"layer{i}")
                out[i] += c.decompress(payload, ctx)
    return out


# -- the tests ---------------------------------------------------------------------------------

def test_ratio_one_equals_dense_weighted_aggregation(results):
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    for step in range(2):
        expected = weighted_sum([rank_grads(1, r, step) for r in range(WORLD_SIZE)])
        for res in results:
            got = res["full"][step]
            assert_all_close(got["grads"], expected)
            assert got["stats"]["compressed"] and got["stats"]["ratio"] == 1.0
            assert got["stats"]["bytes_sent"] == numel * (4 + 4)
    for res in results:
        assert_all_close(res["full"][0]["grads"], res["dense"])
        assert res["full_residual_abs"] == 0.0


def test_uneven_k_across_ranks_sums_each_ranks_topk(results):
    per_rank = [rank_grads(2, r) for r in range(WORLD_SIZE)]
    per_rank[UNEVEN_NO_GRAD[0]][UNEVEN_NO_GRAD[1]] = None
    expected = topk_sum(per_rank, UNEVEN_RATIOS)
    sent = []
    for res in results:
        assert_all_close(res["uneven"], expected)
        r = res["rank"]
        k = sum(topk_k(torch.Size(s).numel(), UNEVEN_RATIOS[r]) for s in SHAPES)
        assert res["uneven_stats"]["floats_sent"] == k
        assert res["uneven_stats"]["bytes_sent"] == 8 * k
        sent.append(k)
    assert len(set(sent)) == WORLD_SIZE  # really uneven


def test_vote_makes_every_rank_take_the_majority_path(results):
    ratios = [0.1] * WORLD_SIZE
    for step, kinds in enumerate(VOTE_KINDS):
        per_rank = [vote_grads(step, r) for r in range(WORLD_SIZE)]
        majority = 2 * kinds.count("spiky") >= WORLD_SIZE
        expected = topk_sum(per_rank, ratios) if majority else weighted_sum(per_rank)
        for res in results:
            stats = res["vote"][step]["stats"]
            assert stats["compressed"] is majority
            assert stats["votes"] == kinds.count("spiky")
            own = kinds[res["rank"]]
            assert (stats["signal"] <= 0.3) is (own == "spiky"), stats  # signals differ
            assert_all_close(res["vote"][step]["grads"], expected)


def test_the_general_payload_path_sums_each_ranks_decompressed_payload(results):
    from scadles.compress.qsgd import QSGDCompressor

    per_rank = [rank_grads(5, r) for r in range(WORLD_SIZE)]
    per_rank[UNEVEN_NO_GRAD[0]][UNEVEN_NO_GRAD[1]] = None
    for key, make in (("qsgd", lambda r: QSGDCompressor(seed=qsgd_seed(r))),
                      ("threshold", lambda r: ThresholdSparse())):
        expected = [torch.zeros(s) for s in SHAPES]
        for r in range(WORLD_SIZE):
            c = make(r)
            for i, (g, s) in enumerate(zip(per_rank[r], SHAPES)):
                g = torch.zeros(s) if g is None else weight(r) * g
                expected[i] += c.decompress(*c.compress(g, f"layer{i}"))
        sent = set()
        for res in results:
            assert res[f"{key}_stats"]["compressed"]
            assert_all_close(res[key], expected)
            sent.add(res[f"{key}_stats"]["bytes_sent"])
        assert len(sent) == (1 if key == "qsgd" else WORLD_SIZE)  # threshold: uneven


def test_tiny_adaptive_run_switches_and_ranks_stay_identical(results):
    path = [s["compressed"] for s in results[0]["tiny"]]
    # The step that completes the second interval (step 3) has the first signal.
    assert path == [False] * 3 + [True] * (TINY_STEPS - 3)
    for res in results:
        assert [s["compressed"] for s in res["tiny"]] == path
        assert res["tiny_summary"]["switches"] == 1
        assert res["tiny_summary"]["cnc_ratio"] == (TINY_STEPS - 3) / 3
        for a, b in zip(res["tiny_params"], results[0]["tiny_params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run_rank(args.backend, args.out)
