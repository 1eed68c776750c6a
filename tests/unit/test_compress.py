"""Gradient compression without a process group: compressors, error feedback, signals,
the vote, settings. Multi-rank behaviour is in tests/integration/test_compress_ranks.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from scadles.compress import topk as topk_mod
from scadles.compress.adaptive import (GradNormChangeSignal, OrigSignal, PaperSignal, StepNorms,
                                       decide, energy_loss, ewma, relative_change,
                                       summed_norm_loss, vote)
from scadles.compress.identity import IdentityCompressor
from scadles.compress.memory import NoMemory, ResidualMemory
from scadles.compress.topk import TopKCompressor, index_dtype, topk_k
from scadles.exchange import (DenseExchanger, ExchangeSettings, ExchangeStats, ExchangeSummary,
                              SparseExchanger, make_exchanger)
from tests.doubles import OneRankComm, named

RTOL, ATOL = 1e-5, 1e-6  # float32 sums of a few dozen terms in a different order


# -- compressors ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 4), ()])
def test_identity_round_trip(shape, dtype):
    x = torch.randn(shape).to(dtype)
    c = IdentityCompressor()
    payload, ctx = c.compress(x, "w")
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,ratio", [((10, 20), 0.1), ((300_000,), 0.01),
                                         ((400, 500), 0.1), ((3, 3), 1.0), ((1,), 0.01)])
def test_topk_round_trip_keeps_exactly_the_largest(shape, ratio, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    c = TopKCompressor(ratio)
    (values, indices), ctx = c.compress(x, "w")
    k = topk_k(x.numel(), ratio)
    assert values.numel() == indices.numel() == k
    assert values.dtype == dtype and indices.dtype == torch.int32
    y = c.decompress((values, indices), ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    kept = indices.long()
    torch.testing.assert_close(flat_y[kept], flat_x[kept], rtol=0, atol=0)
    assert int((flat_y != 0).sum()) == k
    # The same set torch.topk picks (magnitudes are distinct for random normals).
    reference = torch.topk(flat_x.abs(), k).indices
    assert set(kept.tolist()) == set(reference.tolist())


def test_topk_sampled_selection_falls_back_when_the_sample_misleads():
    numel, k = 200_000, 2000
    picks = torch.randint(0, numel, (2000,), generator=torch.Generator().manual_seed(5))
    x = torch.rand(numel, generator=torch.Generator().manual_seed(6)) + 1.0
    x[picks] = 0.0  # the sample sees only zeros: its thresholds are useless
    idx = topk_mod.topk_indices(x, k, torch.Generator().manual_seed(5))
    assert set(idx.tolist()) == set(torch.topk(x.abs(), k).indices.tolist())


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.3])
def test_topk_sampled_selection_matches_torch_topk_with_ties(ratio):
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-50, 50, (150_000,), generator=gen).float()  # many equal magnitudes
    k = topk_k(x.numel(), ratio)
    idx = topk_mod.topk_indices(x, k, gen)
    assert idx.numel() == len(set(idx.tolist())) == k
    kth = torch.topk(x.abs(), k).values[-1]
    assert bool((x.abs()[idx] >= kth).all())


@pytest.mark.parametrize("numel,ratio,k", [(10, 0.01, 1), (1000, 0.01, 10), (1000, 0.1, 100),
                                           (99, 0.5, 49), (5, 1.0, 5), (1, 0.01, 1),
                                           (250, 0.013, 3)])
def test_k_rule(numel, ratio, k):
    assert topk_k(numel, ratio) == k == max(1, int(numel * ratio))


def test_index_dtype_is_int32_where_numel_allows():
    assert index_dtype(2 ** 31 - 1) == torch.int32
    assert index_dtype(2 ** 31) == torch.int64


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_topk_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        TopKCompressor(ratio)


# -- error feedback -----------------------------------------------------------------------------

def test_residual_memory_compensates_updates_clears_and_round_trips():
    mem, c = ResidualMemory(), TopKCompressor(0.25)
    g = torch.tensor([4.0, -1.0, 0.5, 2.0])
    payload, ctx = c.compress(g, "w")
    c.decompress_add_(g, payload, ctx, alpha=-1.0)  # what the exchanger does in its buffer
    mem.adopt_("w", g)
    torch.testing.assert_close(mem.residuals["w"], torch.tensor([0.0, -1.0, 0.5, 2.0]))
    assert mem.residuals["w"] is g  # adopted, not copied
    restored = ResidualMemory()
    restored.load_state_dict(mem.state_dict())
    ones = torch.ones(4)
    torch.testing.assert_close(restored.compensate_into_(ones, ones, 1.0, "w"),
                               torch.tensor([1.0, 0.0, 1.5, 3.0]))
    torch.testing.assert_close(restored.compensate_into_(torch.empty(4), torch.ones(4), 0.5, "w"),
                               torch.tensor([0.5, -0.5, 1.0, 2.5]))
    assert mem.compensate_into_(torch.empty(2), torch.ones(2), 1.0, "other").tolist() == [1.0, 1.0]
    mem.clear()
    assert mem.residuals == {}


def test_no_memory_drops_and_refuses_residuals_from_a_checkpoint():
    mem = NoMemory()
    assert not mem.keeps_residuals and ResidualMemory.keeps_residuals
    assert mem.compensate_into_(torch.empty(3), torch.ones(3), 0.5, "w").tolist() == [0.5] * 3
    assert mem.residuals == {} and mem.state_dict() == {"residuals": {}}
    with pytest.raises(ValueError, match="error feedback is off"):
        mem.load_state_dict({"residuals": {"w": torch.ones(3)}})


def spiky(numel, gen, spikes=5):
    """A gradient whose energy sits in a few entries (Top-k keeps almost all of it)."""
    g = 0.01 * torch.randn(numel, generator=gen)
    g[torch.randperm(numel, generator=gen)[:spikes]] = 100.0
    return g


def flat_spread(numel, gen):
    """A gradient with equal magnitudes everywhere (Top-k 10% keeps 10% of the energy)."""
    return torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)


def test_error_feedback_is_exact_over_mixed_dense_and_sparse_steps():
    """Sum of what was sent plus the residual equals the sum of the weighted gradients."""
    shapes = [(20, 10), (50,), (3, 4, 5)]
    params = named(*shapes)
    ex = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.1,
                        adaptive_signal="paper", ewma_alpha=1.0, delta_threshold=0.3)
    kinds = ["spiky", "spiky", "flat", "spiky", "flat", "flat", "spiky", "spiky", "spiky"]
    gen = torch.Generator().manual_seed(3)
    true_sum = [torch.zeros(s) for s in shapes]
    sent_sum = [torch.zeros(s) for s in shapes]
    seen = []
    for step, kind in enumerate(kinds):
        weight = 0.25 + 0.5 * (step % 3) / 2
        for (_, p), s, t in zip(params, shapes, true_sum):
            n = math.prod(s)
            p.grad = (spiky(n, gen) if kind == "spiky" else flat_spread(n, gen)).view(s)
            t.add_(weight * p.grad)
        stats = ex.exchange(params, weight, step)
        seen.append(stats["compressed"])
        for (_, p), acc in zip(params, sent_sum):
            acc.add_(p.grad)
    assert seen == [kind == "spiky" for kind in kinds]  # the mix really happened
    assert ex.memory.residuals  # the last steps were sparse and left residuals
    for (name, _), t, sent in zip(params, true_sum, sent_sum):
        residual = ex.memory.residuals.get(name, torch.zeros_like(t))
        torch.testing.assert_close(sent + residual, t, rtol=RTOL, atol=ATOL)
    summary = ex.summary()
    assert summary.compressed_steps == 6 and summary.dense_steps == 3
    assert summary.cnc_ratio == 2.0 and summary.switches == 4


def test_error_feedback_stays_exact_when_backward_accumulates_into_the_grad_buffers():
    """The trainer's loop: zero_grad(set_to_none=False), then backward adds into the .grad
    the exchanger left (a view of one of its two swapping buffers)."""
    shapes = [(300, 500), (64,), (7, 9)]  # the first layer takes the sampled selection
    params = named(*shapes)
    ex = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.05,
                        adaptive_signal="paper", ewma_alpha=1.0, delta_threshold=0.3)
    kinds = ["spiky", "spiky", "flat", "spiky", "spiky", "flat", "spiky"]
    gen = torch.Generator().manual_seed(11)
    true_sum = [torch.zeros(s) for s in shapes]
    sent_sum = [torch.zeros(s) for s in shapes]
    seen, homes = [], set()
    for step, kind in enumerate(kinds):
        weight = 0.5 + 0.25 * (step % 2)
        for (_, p), s, t in zip(params, shapes, true_sum):
            n = math.prod(s)
            g = (spiky(n, gen) if kind == "spiky" else flat_spread(n, gen)).view(s)
            if p.grad is None:
                p.grad = g.clone()
            else:  # zero_grad(set_to_none=False) + backward
                p.grad.zero_()
                p.grad.add_(g)
            t.add_(weight * g)
        stats = ex.exchange(params, weight, step)
        seen.append(stats["compressed"])
        homes.add(params[0][1].grad.data_ptr())
        for (name, p), acc in zip(params, sent_sum):
            residual = ex.memory.residuals.get(name)
            if residual is not None:  # the residual never shares memory with the .grad
                assert residual.data_ptr() != p.grad.data_ptr()
            acc.add_(p.grad)
    assert seen == [kind == "spiky" for kind in kinds]
    assert homes == {b.data_ptr() for b in ex._buffers}  # two buffers, nothing allocated
    for (name, _), t, sent in zip(params, true_sum, sent_sum):
        residual = ex.memory.residuals.get(name, torch.zeros_like(t))
        torch.testing.assert_close(sent + residual, t, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_payload_matches_torch_topk_for_every_cpu_dtype(dtype):
    x = torch.randn(400, 700, generator=torch.Generator().manual_seed(12)).to(dtype)
    (values, indices), (numel, shape) = TopKCompressor(0.02).compress(x, "w")
    assert indices.dtype == torch.int32 and values.dtype == dtype
    assert (numel, shape) == (x.numel(), x.shape)
    expected = torch.topk(x.reshape(-1).abs(), topk_k(x.numel(), 0.02)).indices
    assert sorted(indices.tolist()) == sorted(expected.tolist())
    torch.testing.assert_close(values, x.reshape(-1)[indices.long()], rtol=0, atol=0)


def test_dense_step_sends_the_residual_and_clears_it():
    params = named((100,))
    ex = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.1,
                        ewma_alpha=1.0, delta_threshold=0.3)
    gen = torch.Generator().manual_seed(4)
    params[0][1].grad = spiky(100, gen)
    g1 = params[0][1].grad.clone()
    assert ex.exchange(params, 1.0, 0)["compressed"]
    residual = ex.memory.residuals["layer0"].clone()
    assert residual.abs().sum() > 0
    params[0][1].grad = flat_spread(100, gen)
    g2 = params[0][1].grad.clone()
    assert not ex.exchange(params, 1.0, 1)["compressed"]
    torch.testing.assert_close(params[0][1].grad, g2 + residual, rtol=0, atol=0)
    assert ex.memory.residuals == {}
    assert g1.abs().sum() > 0


def test_static_without_error_feedback_keeps_no_residual_and_counts_bytes():
    shapes = [(40, 25), (7,)]
    params = named(*shapes)
    ex = make_exchanger(OneRankComm(), compression="static", compression_ratio=0.01,
                        error_feedback=False)
    expected = [TopKCompressor(0.01).compress(0.5 * p.grad if p.grad is not None
                                              else 0.5 * p.detach(), n) for n, p in params]
    for _, p in params:
        p.grad = p.detach().clone()
    stats = ex.exchange(params, 0.5, 0)
    k = topk_k(1000, 0.01) + topk_k(7, 0.01)
    assert stats["compressed"] and stats["floats_sent"] == k
    assert stats["bytes_sent"] == k * (4 + 4)  # float32 values, int32 indices
    assert stats["ratio"] == pytest.approx(k / 1007)
    assert stats["compress_s"] >= 0 and ex.memory.residuals == {}
    for (_, p), (payload, ctx) in zip(params, expected):
        torch.testing.assert_close(p.grad, TopKCompressor(0.01).decompress(payload, ctx))


def test_checkpoint_resume_continues_exactly():
    def run(steps, exchanger, params, start=0):
        gen = torch.Generator().manual_seed(100 + start)
        out = []
        for step in range(start, start + steps):
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            out.append(exchanger.exchange(params, 0.3, step))
        return out

    settings = dict(compression="adaptive", compression_ratio=0.2, adaptive_signal="paper",
                    ewma_alpha=0.5, delta_threshold=0.85)
    a_params, b_params = named((30,), (6, 6)), named((30,), (6, 6))
    a = make_exchanger(OneRankComm(), **settings)
    run(3, a, a_params)
    saved = a.state_dict()
    b = make_exchanger(OneRankComm(), **settings)
    b.load_state_dict(saved)
    stats_a, stats_b = run(3, a, a_params, start=3), run(3, b, b_params, start=3)
    assert [s["compressed"] for s in stats_a] == [s["compressed"] for s in stats_b]
    assert [s["signal"] for s in stats_a] == [s["signal"] for s in stats_b]
    for (_, pa), (_, pb) in zip(a_params, b_params):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0)
    assert a.summary() == dataclasses.replace(b.summary(),
                                              compress_s_total=a.summary().compress_s_total)
    other = make_exchanger(OneRankComm(), **dict(settings, adaptive_signal="orig"))
    with pytest.raises(ValueError, match="adaptive_signal"):
        other.load_state_dict(saved)


def test_summary_hints_when_adaptive_mode_never_takes_one_path():
    params = named((200,))
    gen = torch.Generator().manual_seed(21)
    never = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.1,
                           ewma_alpha=1.0, delta_threshold=0.05)
    for step in range(3):  # equal magnitudes: Top-10% drops 90% of the energy
        params[0][1].grad = flat_spread(200, gen)
        assert not never.exchange(params, 1.0, step)["compressed"]
    summary = never.summary()
    assert summary.signal_min == pytest.approx(0.9) == summary.signal_max
    assert summary.hint.startswith("adaptive compression never compressed: rank 0's paper "
                                      "signal ranged 0.9 to 0.9 against --delta-threshold 0.05")
    always = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.1,
                            ewma_alpha=1.0, delta_threshold=0.95)
    params[0][1].grad = flat_spread(200, gen)
    always.exchange(params, 1.0, 0)
    assert "never sent dense gradients" in always.summary().hint
    params[0][1].grad = spiky(200, gen)
    never.exchange(params, 1.0, 3)  # both paths taken now: no hint
    assert never.summary().hint is None
    static = make_exchanger(OneRankComm(), compression="static", compression_ratio=0.1)
    static.exchange(params, 1.0, 0)
    assert static.summary().hint is None


# -- signals and the vote (pure) ----------------------------------------------------------------

def test_energy_loss_and_summed_norm_loss_on_known_values():
    # g = [3, 4]: top-1 keeps 4, so 9 of 25 units of energy are dropped.
    assert energy_loss(25.0, 16.0) == pytest.approx(0.36)
    assert energy_loss(0.0, 0.0) == 0.0
    # layers [3, 4] (norm 5) and [0, 12, 5] (norm 13); kept 4 and 12: (18 - 16) / 18.
    assert summed_norm_loss([5.0, 13.0], [4.0, 12.0]) == pytest.approx(2 / 18)
    assert summed_norm_loss([0.0], [0.0]) == 0.0


def test_relative_change_and_ewma():
    assert relative_change(2.0, 3.0) == 0.5 and relative_change(2.0, 1.0) == 0.5
    assert relative_change(0.0, 0.0) == 0.0 and relative_change(0.0, 1.0) == math.inf
    assert ewma(None, 0.8, 0.1) == 0.8
    assert ewma(0.8, 0.4, 0.25) == pytest.approx(0.7)


@pytest.mark.parametrize("signal,threshold,expected", [
    (0.3, 0.3, True), (0.2999, 0.3, True), (0.3001, 0.3, False), (None, 0.3, False),
    (float("nan"), 0.3, False), (math.inf, 0.3, False), (0.0, 0.0, True)])
def test_vote(signal, threshold, expected):
    assert vote(signal, threshold) is expected


@pytest.mark.parametrize("votes,world,expected", [
    (0, 1, False), (1, 1, True), (0, 2, False), (1, 2, True),  # a tie compresses
    (1, 3, False), (2, 3, True), (2, 4, True), (1, 4, False), (5, 10, True), (4, 10, False)])
def test_decide_majority_with_ties_compressing(votes, world, expected):
    assert decide(votes, world) is expected


@pytest.mark.parametrize("votes,world", [(-1, 3), (4, 3), (0, 0)])
def test_decide_rejects_impossible_counts(votes, world):
    with pytest.raises(ValueError):
        decide(votes, world)


def test_paper_signal_is_an_ewma_of_energy_loss():
    s = PaperSignal(threshold=0.3, ewma_alpha=0.5)
    assert s.update(StepNorms([25.0], [16.0])) == pytest.approx(0.36)
    assert s.update(StepNorms([10.0, 10.0], [10.0, 6.0])) == pytest.approx(0.5 * 0.2 + 0.5 * 0.36)


def test_orig_signal_is_the_mean_since_the_epoch_started():
    s = OrigSignal(threshold=0.3)
    # sqrt of the squared norms: layers 5 and 13, kept 4 and 12 -> 2/18; then 1.0 (all lost).
    assert s.update(StepNorms([25.0, 169.0], [16.0, 144.0]), epoch=0) == pytest.approx(2 / 18)
    assert s.update(StepNorms([4.0], [0.0]), epoch=0) == pytest.approx((2 / 18 + 1.0) / 2)
    assert s.update(StepNorms([4.0], [1.0]), epoch=1) == pytest.approx(0.5)  # reset


def test_gradnorm_change_signal_compares_interval_means():
    s = GradNormChangeSignal(threshold=0.5, interval_steps=2)
    got = [s.update(StepNorms([1.0], [1.0], grad_norm=n)) for n in (1, 1, 2, 2, 2, 2, 1, 1)]
    assert got == [None, None, None, 1.0, 1.0, 0.0, 0.0, 0.5]
    assert [vote(x, s.threshold) for x in got] == [False, False, False, False, False, True,
                                                    True, True]


def test_gradnorm_change_reads_the_local_gradient_not_its_weight():
    """The same local gradient every step while only b_i / B changes (stream rates moving):
    the signal stays 0, so the rank votes to compress once two intervals are complete. Read
    from the weighted gradient (w x g + residual) it would see a 4x change: critical."""
    gen = torch.Generator().manual_seed(5)
    local = [torch.randn(50, generator=gen), torch.randn(7, generator=gen)]
    params = named((50,), (7,))
    ex = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.1,
                        adaptive_signal="gradnorm-change", gradnorm_threshold=0.5,
                        gradnorm_interval_steps=2)
    weights = [0.8, 0.8, 0.2, 0.2, 0.2, 0.2, 0.8, 0.8]
    signals, compressed = [], []
    for step, weight in enumerate(weights):
        for (_, p), g in zip(params, local):
            p.grad = g.clone()
        stats = ex.exchange(params, weight, step)
        signals.append(stats["signal"])
        compressed.append(stats["compressed"])
    assert signals == [None, None, None, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert compressed == [False, False, False, True, True, True, True, True]


def test_exchanger_reports_the_paper_signal_on_a_known_tensor():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    ex = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.25,
                        ewma_alpha=1.0, delta_threshold=0.3)
    stats = ex.exchange([("w", p)], 2.0, 0)  # weighting does not change the fraction
    assert stats["signal"] == pytest.approx(0.36) and stats["votes"] == 0
    assert not stats["compressed"]
    torch.testing.assert_close(p.grad, torch.tensor([6.0, 8.0, 0.0, 0.0]))


# -- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,value", [
    ("compression", "sparse"), ("compression_ratio", 0.0), ("compression_ratio", 2.0),
    ("compression_ratio", float("nan")), ("error_feedback", "yes"),
    ("adaptive_signal", "accordion"), ("delta_threshold", -0.1), ("ewma_alpha", 0.0),
    ("ewma_alpha", 1.5), ("gradnorm_threshold", -1.0), ("gradnorm_interval_steps", 0),
    ("gradnorm_interval_steps", 2.5)])
def test_bad_settings_raise_value_error_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        ExchangeSettings(**{setting: value})
    with pytest.raises(ValueError, match=setting):
        make_exchanger(OneRankComm(), **{"compression": "static", setting: value})


def test_none_is_the_dense_exchanger_and_settings_describe_themselves():
    assert isinstance(make_exchanger(OneRankComm()), DenseExchanger)
    assert isinstance(make_exchanger(OneRankComm(), compression="static"), SparseExchanger)
    settings = ExchangeSettings(compression="adaptive", compression_ratio=0.1)
    assert isinstance(make_exchanger(OneRankComm(), settings), SparseExchanger)
    with pytest.raises(TypeError, match="not both"):
        make_exchanger(OneRankComm(), settings, compression_ratio=0.2)
    assert "ties compress" in settings.describe() and "ratio 0.1" in settings.describe()
    assert settings.as_dict()["compression_ratio"] == 0.1 and "steps" not in settings.as_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.compression_ratio = 0.2
    assert ExchangeStats().summary(settings).cnc_ratio is None
    assert ExchangeSettings().describe().startswith("gradient compression: none")


def test_settings_from_config_take_every_compression_flag():
    from scadles.config import parse_args

    cfg = parse_args(["--compression", "adaptive", "--compressor", "qsgd",
                      "--compression-ratio", "0.2", "--adaptive-signal", "gradnorm-change",
                      "--gradnorm-threshold", "0.7", "--gradnorm-interval", "4",
                      "--delta-threshold", "0.4", "--ewma-alpha", "0.3"])
    assert ExchangeSettings.from_config(cfg) == ExchangeSettings(
        compression="adaptive", compressor="qsgd", compression_ratio=0.2,
        error_feedback=cfg.error_feedback, adaptive_signal="gradnorm-change",
        delta_threshold=0.4, ewma_alpha=0.3, gradnorm_threshold=0.7, gradnorm_interval_steps=4)


def test_both_exchangers_summarize_alike_and_resume_their_counters():
    params = named((10,), (3, 4))
    for _, p in params:
        p.grad = torch.ones_like(p)
    dense = make_exchanger(OneRankComm())
    sparse = make_exchanger(OneRankComm(), compression="static", compression_ratio=0.5)
    for ex in (dense, sparse):
        ex.exchange(params, 1.0, 0)
        assert isinstance(ex.summary(), ExchangeSummary)
    assert dense.summary().to_dict() == {
        "steps": 1, "compressed_steps": 0, "dense_steps": 1, "cnc_ratio": 0.0, "switches": 0,
        "bytes_sent_total": 88, "floats_sent_total": 22, "compress_s_total": 0.0}
    entry = sparse.summary().to_dict()
    assert list(entry) == ["steps", "compressed_steps", "dense_steps", "cnc_ratio", "switches",
                           "bytes_sent_total", "floats_sent_total", "compress_s_total",
                           "signal_min", "signal_max", "hint"]
    assert entry["compressed_steps"] == 1 and entry["cnc_ratio"] is None
    # The checkpoint layout a resume reads (and older checkpoints wrote).
    assert list(sparse.state_dict()) == ["settings", "counters", "memory", "signal"]
    assert list(sparse.state_dict()["counters"]) == [
        "steps", "compressed_steps", "dense_steps", "switches", "bytes_sent_total",
        "floats_sent_total", "compress_s_total", "last_compressed", "signal_min", "signal_max"]
    resumed = make_exchanger(OneRankComm())
    resumed.load_state_dict({"counters": {"steps": 4, "bytes_sent_total": 352,
                                          "floats_sent_total": 88}})  # an older dense one
    assert resumed.summary().dense_steps == 4 and resumed.summary().bytes_sent_total == 352


def test_orig_signal_through_the_exchanger_restarts_with_the_epoch():
    p = torch.nn.Parameter(torch.zeros(4))
    ex = make_exchanger(OneRankComm(), compression="adaptive", compression_ratio=0.25,
                        adaptive_signal="orig", delta_threshold=0.5, error_feedback=False)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])   # top-1 loses |5 - 4| / 5 = 0.2 of the norm
    assert ex.exchange([("w", p)], 1.0, 0, epoch=0)["signal"] == pytest.approx(0.2)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])   # loses |2 - 1| / 2 = 0.5
    assert ex.exchange([("w", p)], 1.0, 1, epoch=0)["signal"] == pytest.approx(0.35)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert ex.exchange([("w", p)], 1.0, 2, epoch=1)["signal"] == pytest.approx(0.2)


def test_loading_a_checkpoint_without_compression_state_is_a_clear_error():
    ex = make_exchanger(OneRankComm(), compression="static")
    with pytest.raises(ValueError, match="no compression state"):
        ex.load_state_dict({})
