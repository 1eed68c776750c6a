"""Pure logic of aggregation: LR scaling, the group-wide LR schedule; the dense exchange's
flat buffers and buckets."""
from __future__ import annotations

import threading

import pytest
import torch

from scadles.aggregate import (aggregation_weight, global_batch, multistep_factor, scaled_lr,
                               step_lr, warmup_lr)
from scadles.exchange.dense import DenseExchanger, flatten_grads, make_buckets, unflatten_into


class FakeGroup:
    """Stands in for a Comm: a sum-allreduce adds what the other (simulated) ranks hold."""

    device = torch.device("cpu")

    def __init__(self, others: list[float] | None = None):
        self.others = others or []

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        assert op == "sum"
        tensor += sum(self.others)
        return tensor


def test_scaled_lr_is_linear_in_global_batch():
    assert scaled_lr(0.1, 64, 64) == pytest.approx(0.1)
    assert scaled_lr(0.1, 128, 64) == pytest.approx(0.2)
    assert scaled_lr(0.4, 70, 640) == pytest.approx(0.04375)
    assert scaled_lr(0.1, 0, 64) == 0.0
    with pytest.raises(ValueError, match="reference global batch"):
        scaled_lr(0.1, 64, 0)
    with pytest.raises(ValueError, match="global batch size"):
        scaled_lr(0.1, -1, 64)


def test_warmup_climbs_linearly_in_samples_to_the_target_lr():
    assert warmup_lr(0.4, samples_after_step=100, warmup_samples=400) == pytest.approx(0.1)
    assert warmup_lr(0.4, samples_after_step=300, warmup_samples=400) == pytest.approx(0.3)
    assert warmup_lr(0.4, samples_after_step=400, warmup_samples=400) == pytest.approx(0.4)
    assert warmup_lr(0.4, samples_after_step=9000, warmup_samples=400) == pytest.approx(0.4)
    assert warmup_lr(0.4, samples_after_step=1, warmup_samples=0) == 0.4  # no warmup
    with pytest.raises(ValueError):
        warmup_lr(0.4, 1, -1)


def test_step_lr_scales_caps_and_warms_up_by_samples():
    # B = 4 x the reference: 0.4; the first step of 256 samples is half of a 512 warmup.
    assert step_lr(0.1, 256, 64, 0, scale=True, warmup_samples=512) == pytest.approx(0.2)
    assert step_lr(0.1, 256, 64, 256, scale=True, warmup_samples=512) == pytest.approx(0.4)
    assert step_lr(0.1, 256, 64, 9000, scale=True, warmup_samples=512, max_lr=0.3) == 0.3
    assert step_lr(0.1, 256, 64, 0, scale=True, warmup_samples=512, max_lr=0.3) == 0.15
    assert step_lr(0.1, 256, 64, 9000, scale=False, max_lr=0.05) == 0.1  # ddp: no cap
    assert step_lr(0.1, 64, 64, 0, scale=False, warmup_samples=256) == 0.025  # ddp warms up
    assert step_lr(0.1, 32, 64, 9000, scale=True) == pytest.approx(0.05)
    # The same samples trained, the same lr, whatever the step size: fair to both modes.
    assert step_lr(0.1, 1024, 1024, 1024, scale=False, warmup_samples=4096) == \
        step_lr(0.1, 2048, 1024, 0, scale=True, warmup_samples=4096, max_lr=0.1)


def test_multistep_factor_counts_epochs_of_group_samples():
    kw = dict(epoch_samples=1000, milestones_epochs=[2, 4], gamma=0.1)
    assert multistep_factor(0, **kw) == 1.0
    assert multistep_factor(1999, **kw) == 1.0
    assert multistep_factor(2000, **kw) == pytest.approx(0.1)
    assert multistep_factor(3999, **kw) == pytest.approx(0.1)
    assert multistep_factor(4000, **kw) == pytest.approx(0.01)
    assert multistep_factor(10**9, **kw) == pytest.approx(0.01)
    assert multistep_factor(500, 1000, [0.5], 0.2) == pytest.approx(0.2)
    assert multistep_factor(500, 1000, [], 0.2) == 1.0
    with pytest.raises(ValueError, match="epoch_samples"):
        multistep_factor(0, 0, [1], 0.1)
    with pytest.raises(ValueError, match="gamma"):
        multistep_factor(0, 10, [1], 0.0)


def test_global_batch_sums_local_batches():
    assert global_batch(FakeGroup([7, 0, 20]), 5) == 32
    with pytest.raises(ValueError):
        global_batch(FakeGroup(), -1)


def test_aggregation_weight():
    assert aggregation_weight(16, 64) == 0.25
    assert aggregation_weight(0, 64) == 0.0
    assert aggregation_weight(0, 0) == 0.0
    assert sum(aggregation_weight(b, 37) for b in (5, 0, 32)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="does not fit"):
        aggregation_weight(65, 64)


class ThreadGroup:
    """A simulated group of ranks, one thread each: a sum-allreduce returns the sum of what
    every rank contributed to that call (a barrier per call), like a real group."""

    device = torch.device("cpu")

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._lock = threading.Lock()
        self._sum: torch.Tensor | None = None

    def comm(self, rank: int) -> "ThreadGroup._Rank":
        return ThreadGroup._Rank(self, rank)

    class _Rank:
        def __init__(self, group, rank):
            self.group, self.rank, self.device = group, rank, group.device

        def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
            assert op == "sum"
            g = self.group
            if g._barrier.wait() == 0:
                g._sum = torch.zeros_like(tensor)
            g._barrier.wait()
            with g._lock:
                g._sum += tensor
            g._barrier.wait()
            tensor.copy_(g._sum)
            g._barrier.wait()
            return tensor


def run_ranks(local_batches: list[list[int]], lr_of_step) -> list[list[float]]:
    """Each rank in its own thread: per step, the group's B from its own local batch (one
    allreduce), then ``lr_of_step(rank state, B, local, step)``; the lrs per rank."""
    world_size = len(local_batches[0])
    group = ThreadGroup(world_size)
    lrs: list[list[float]] = [[] for _ in range(world_size)]

    def rank_main(rank: int) -> None:
        comm, state = group.comm(rank), {"samples_global": 0, "samples_local": 0}
        for step, local in enumerate(local_batches, start=1):
            bsz = global_batch(comm, local[rank])
            lrs[rank].append(lr_of_step(state, bsz, local[rank], step))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return lrs


EPOCH, BASE_LR, REF_BSZ, WARMUP = 600, 0.4, 3 * 16, 150


def loop_lr(state: dict, global_bsz: int, local_bsz: int, step: int) -> float:
    """What train.py does per step: scaled, capped, warmed-up lr times the group's
    MultiStep factor; warmup and decay count the group's samples."""
    factor = multistep_factor(state["samples_global"], EPOCH, [2], gamma=0.1)
    lr = step_lr(BASE_LR, global_bsz, REF_BSZ, state["samples_global"], scale=True,
                 warmup_samples=WARMUP, max_lr=0.9) * factor
    state["samples_global"] += global_bsz
    return lr


def test_lr_schedule_is_the_groups_on_every_rank_with_unequal_batches():
    """Three ranks whose streams give different batch sizes every step compute their lr from
    their own local batch through a real sum (threads, a barrier per allreduce): at every
    step all three equal the lr of the union batch, computed here from the batches
    directly, and the decay comes when the group (not any one rank) has seen 2 epochs.
    A loop that counted a rank's own samples for the schedule fails this test (checked)."""
    gen = torch.Generator().manual_seed(0)
    rates = [10, 20, 40]
    batches = [[int(r + torch.randint(-5, 6, (1,), generator=gen)) for r in rates]
               for _ in range(40)]
    expected, seen, decay_step = [], 0, None
    for step, local in enumerate(batches, start=1):
        union = sum(local)
        if seen >= 2 * EPOCH and decay_step is None:
            decay_step = step
        lr = min(BASE_LR * union / REF_BSZ, 0.9) * min(1.0, (seen + union) / WARMUP)
        expected.append(lr * (0.1 if decay_step else 1.0))
        seen += union
    assert decay_step is not None and 10 < decay_step < 40  # 2 epochs reached mid-run

    lrs = run_ranks(batches, loop_lr)
    for rank_lrs in lrs:
        assert rank_lrs == pytest.approx(expected, rel=1e-12)

    def own_samples_lr(state, global_bsz, local_bsz, step):  # the bug this test guards
        factor = multistep_factor(state["samples_local"] * 3, EPOCH, [2], gamma=0.1)
        lr = step_lr(BASE_LR, global_bsz, REF_BSZ, state["samples_local"] * 3, scale=True,
                     warmup_samples=WARMUP, max_lr=0.9) * factor
        state["samples_local"] += local_bsz
        return lr

    wrong = run_ranks(batches, own_samples_lr)
    assert wrong[0] != pytest.approx(expected, rel=1e-12)
    assert wrong[0] != wrong[2]  # the ranks would decay at different steps


def _params_with_grads() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (5,), (2, 2, 3), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = None if i == 2 else torch.randn(p.shape, generator=gen)
    return params


def test_flatten_unflatten_round_trip_with_missing_grad_as_zeros():
    params = _params_with_grads()
    flat, layout = flatten_grads(params)
    assert flat.shape == (12 + 5 + 12 + 1,) and flat.dtype == torch.float32
    assert [(s.offset, s.numel, tuple(s.shape)) for s in layout] == [
        (0, 12, (4, 3)), (12, 5, (5,)), (17, 12, (2, 2, 3)), (29, 1, (1,))]
    torch.testing.assert_close(flat[17:29], torch.zeros(12), rtol=0, atol=0)

    fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    unflatten_into(flat, fresh)
    for p, q in zip(params, fresh):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert q.grad.shape == p.shape and q.grad.dtype == p.dtype
        torch.testing.assert_close(q.grad, expected, rtol=0, atol=0)
    # Writing into existing grads keeps the tensors (optimizers may hold them).
    before = [q.grad for q in fresh]
    unflatten_into(flat * 2, fresh)
    assert all(a is q.grad for a, q in zip(before, fresh))
    torch.testing.assert_close(fresh[0].grad, 2 * params[0].grad, rtol=0, atol=0)


def test_flat_buffer_errors():
    params = _params_with_grads()
    with pytest.raises(ValueError, match="does not match"):
        unflatten_into(torch.zeros(3), params)
    with pytest.raises(ValueError, match="one dtype"):
        flatten_grads([torch.nn.Parameter(torch.zeros(2)),
                       torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="at least one"):
        flatten_grads([])


def test_buckets_respect_cap_and_dtype():
    mb = 1024 * 1024
    params = [torch.zeros(mb // 4), torch.zeros(mb // 4), torch.zeros(3 * mb // 4),
              torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    assert make_buckets(params, bucket_cap_mb=2) == [[0, 1], [2], [3, 4]]
    assert make_buckets(params, bucket_cap_mb=0.5) == [[0], [1], [2], [3, 4]]
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        make_buckets(params, 0)


def test_dense_exchanger_applies_weight_and_reports_stats():
    params = _params_with_grads()
    expected = [0.25 * (p.grad if p.grad is not None else torch.zeros_like(p)) for p in params]
    exchanger = DenseExchanger(FakeGroup(), bucket_cap_mb=25)
    stats = exchanger.exchange([(f"p{i}", p) for i, p in enumerate(params)], weight=0.25, step=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
    assert stats == {"compressed": False, "ratio": 1.0, "signal": None, "bytes_sent": 4 * 30,
                     "floats_sent": 30, "compress_s": 0.0}
    exchanger.exchange([(f"p{i}", p) for i, p in enumerate(params)], weight=1.0, step=1)
    assert exchanger.summary().to_dict() == {
        "steps": 2, "compressed_steps": 0, "dense_steps": 2, "cnc_ratio": 0.0, "switches": 0,
        "compress_s_total": 0.0, "bytes_sent_total": 240, "floats_sent_total": 60}
    resumed = DenseExchanger(FakeGroup())
    resumed.load_state_dict(exchanger.state_dict())  # a resumed run counts the whole run
    assert resumed.summary() == exchanger.summary()
    resumed.load_state_dict({})  # a checkpoint without counters starts from zero
    assert resumed.summary().steps == 0


def test_grad_buckets_are_reused_and_fill_missing_grads():
    params = _params_with_grads()
    exchanger = DenseExchanger(FakeGroup(), bucket_cap_mb=48 / 2**20)  # 12 floats a bucket
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    exchanger.exchange(named, weight=1.0, step=0)
    buffers = exchanger._buckets.buffers
    assert [b.numel() for b in buffers] == [12, 5, 12, 1]
    torch.testing.assert_close(params[2].grad, torch.zeros(2, 2, 3), rtol=0, atol=0)
    params[2].grad = None  # an empty batch on the next step
    exchanger.exchange(named, weight=3.0, step=1)
    assert all(a is b for a, b in zip(buffers, exchanger._buckets.buffers))
    torch.testing.assert_close(params[2].grad, torch.zeros(2, 2, 3), rtol=0, atol=0)
    # A different parameter list gets its own buffers.
    exchanger.exchange(named[:2], weight=1.0, step=2)
    assert len(exchanger._buckets) == 2
