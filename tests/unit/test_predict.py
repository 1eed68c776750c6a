"""The closed-form pace predictions (scadles.predict), checked against the rules by hand."""
from __future__ import annotations

import pytest

from scadles.predict import ddp_pace, predict, scadles_pace


def linear(a, b):
    return lambda batch: a + b * batch


def test_ddp_waits_for_the_slowest_stream_or_the_compute():
    pace = ddp_pace([16, 64, 128], 64, linear(0.5, 0.01), exchange_s=0.2)
    assert pace.step_s == pytest.approx(4.0) and pace.global_bsz == 192
    fast = ddp_pace([640, 640], 64, linear(0.5, 0.01), exchange_s=0.2)
    assert fast.step_s == pytest.approx(0.5 + 0.64 + 0.2)


def test_scadles_window_bound_when_compute_is_short():
    pace = scadles_pace([16, 32], 8, 64, 1.0, linear(0.05, 0.002), 0.0)
    assert pace.step_s == pytest.approx(1.0) and pace.local_bsz == (16, 32)
    # b_min from a slow stream stretches the step: 8 samples at 2/s take 4 s.
    slow = scadles_pace([2, 32], 8, 64, 1.0, linear(0.05, 0.002), 0.0)
    assert slow.step_s == pytest.approx(4.0) and slow.local_bsz == (8, 64)


def test_scadles_persistence_grows_to_b_max_when_compute_bound_truncation_does_not():
    # c(b) = 0.02 b: a stream faster than 50/s cannot be trained at line rate.
    pers = scadles_pace([100, 20], 8, 1024, 1.0, linear(0.0, 0.02), 0.5)
    assert pers.local_bsz[0] == 1024 and pers.step_s == pytest.approx(1024 * 0.02 + 0.5)
    trunc = scadles_pace([100, 20], 8, 1024, 1.0, linear(0.0, 0.02), 0.5, "truncation")
    assert trunc.local_bsz == (100, 20) and trunc.step_s == pytest.approx(2.5)


def test_step_when_full_readies_a_full_buffer_before_the_window():
    pace = scadles_pace([128, 256], 8, 64, 1.0, linear(0.0, 0.001), 0.0, step_when_full=True)
    assert pace.step_s == pytest.approx(0.5) and pace.local_bsz == (64, 64)
    assert scadles_pace([128, 256], 8, 64, 1.0, linear(0.0, 0.001), 0.0).step_s == 1.0


def test_prediction_bounds_with_the_paper_presets():
    rates = [20.0] * 15 + [10.0]
    p = predict(rates, compute_model="paper-resnet152", comm_model="paper-ethernet",
                b_max=1024, policy="truncation")
    assert p.ddp.step_s == pytest.approx(6.4)  # 64 samples of the 10/s stream
    assert p.step_bound == pytest.approx(p.ddp.step_s / p.scadles.step_s)
    assert p.sample_bound == pytest.approx(p.scadles.samples_per_s / p.ddp.samples_per_s)
    assert p.low <= p.high
    # Top-k 0.1 allgathered over 16 ranks sends more than a dense ring allreduce.
    sparse = predict(rates, compute_model="paper-resnet152", comm_model="paper-ethernet",
                     b_max=1024, policy="truncation", compression_ratio=0.1)
    assert sparse.scadles.step_s > p.scadles.step_s
