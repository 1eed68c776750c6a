"""Plug-ins by import path: models, datasets and compressors from outside the package
(``tests/plugins``), their one-line errors, QSGD, and the exchanger's general payload path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scadles.compress import check_compressor, make_compressor
from scadles.compress.qsgd import QSGDCompressor
from scadles.compress.topk import TopKCompressor
from scadles.config import parse_args
from scadles.exchange import ExchangeSettings, make_exchanger
from scadles.models import build_model
from streamsim.datasets import ArrayDataset, load_dataset
from streamsim.plugins import PluginError, load_object
from tests.doubles import OneRankComm, named

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
RTOL, ATOL = 1e-5, 1e-6
GOOD = ["--source", "inprocess", "--model-name", "mymodels:tiny", "--dataset", "mydata:stripes",
        "--compression", "static", "--compressor", "mycomp:RandomK"]


@pytest.fixture(autouse=True)
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    for name in ("KAFKA_BOOTSTRAP", "SCADLES_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)



# -- resolution -------------------------------------------------------------------------------

def test_plugins_resolve_and_build(tmp_path):
    cfg = parse_args([*GOOD, "--log-dir", str(tmp_path)])
    assert (cfg.model_name, cfg.dataset, cfg.compressor) == ("mymodels:tiny", "mydata:stripes",
                                                              "mycomp:RandomK")
    assert "--compressor" in cfg.to_argv() and "mycomp:RandomK" in cfg.to_argv()
    train = load_dataset("mydata:stripes", "train", seed=1)
    assert isinstance(train, ArrayDataset) and train.sample_shape == (1, 8, 8)
    assert train.num_classes == 4 and len(train) == 400
    assert load_dataset("mydata:stripes", "train", seed=1) is train  # cached like built-ins
    model = build_model("mymodels:tiny", 4, 1, 8, seed=0)
    again = build_model("mymodels:tiny", 4, 1, 8, seed=0)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)  # seeded, as the built-ins


def test_default_log_dir_names_a_plugin_model_without_its_colon():
    cfg = parse_args(GOOD)
    assert Path(cfg.log_dir).name.startswith("mymodels.tiny-scadles-")


BAD = {
    "module missing": (["--model-name", "nosuchmodule:tiny"], "PYTHONPATH"),
    "attribute missing": (["--model-name", "mymodels:huge"], "has no 'huge'"),
    "not callable": (["--model-name", "mymodels:NOT_CALLABLE"], "not callable"),
    "not module:name": (["--model-name", "mymodels:"], "MODULE:NAME"),
    "model returns a str": (["--model-name", "mymodels:not_a_module"], "torch.nn.Module"),
    "model raises": (["--model-name", "mymodels:raises"], "RuntimeError: no such architecture"),
    "dataset returns a list": (["--dataset", "mydata:not_a_dataset"], "ArrayDataset"),
    "dataset missing": (["--dataset", "mydata:nothing"], "has no 'nothing'"),
    "payload not tensors": (["--compressor", "mycomp:PayloadNotTensors"], "list of tensors"),
    "no decompress": (["--compressor", "mycomp:NoDecompress"], "decompress"),
    "decompress wrong shape": (["--compressor", "mycomp:WrongShape"], "shape and dtype"),
    "unknown built-in compressor": (["--compressor", "powersgd"], "--compressor"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_broken_plugin_exits_2_with_one_line(name, capsys):
    argv, mentions = BAD[name]
    flag = argv[0]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--source", "inprocess", "--compression", "static", "--dataset",
                    "mydata:stripes", *argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), lines
    assert flag in lines[0] and mentions in lines[0], lines[0]


def test_load_object_names_the_flag():
    with pytest.raises(PluginError, match="--dataset 'a.b:c'.*cannot import 'a.b'"):
        load_object("a.b:c", "--dataset")
    assert load_object("mycomp:RandomK", "--compressor").__name__ == "RandomK"


# -- compressors: construction ------------------------------------------------------------------

def test_ratio_goes_to_a_constructor_that_takes_it():
    assert make_compressor("mycomp:RandomK", 0.25).ratio == 0.25
    assert make_compressor("topk", 0.05).compression_ratio == 0.05
    assert isinstance(make_compressor("qsgd", 0.05), QSGDCompressor)  # no ratio: ignored
    check_compressor("mycomp:RandomK", 0.3)
    settings = ExchangeSettings(compression="static", compressor="qsgd")
    assert "qsgd" in settings.describe() and "ratio" not in settings.describe()
    assert "mycomp:RandomK, ratio 0.2" in ExchangeSettings(
        compression="static", compressor="mycomp:RandomK", compression_ratio=0.2).describe()
    with pytest.raises(ValueError, match="compressor"):
        ExchangeSettings(compressor="nope")


# -- QSGD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 4), ()])
def test_qsgd_round_trip_is_within_one_level(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    c = QSGDCompressor(seed=0)
    payload, ctx = c.compress(x, "w")
    norm, levels = payload
    assert norm.dtype == torch.float32 and norm.shape == (1,)
    assert levels.dtype == torch.int8 and levels.numel() == x.numel()
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    bound = float(x.norm()) / c.levels
    assert float((y - x).abs().max()) <= bound * (1 + 1e-5) + 1e-7
    assert torch.all(torch.sign(y) * torch.sign(x) >= 0)  # signs kept (or zero)


def test_qsgd_is_unbiased_and_zero_stays_zero():
    x = torch.tensor([0.5, -0.25, 0.1, 0.0, 1.0])
    c = QSGDCompressor(levels=2, seed=5)
    mean = torch.stack([c.decompress(*c.compress(x, "w")) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, x, rtol=0, atol=0.03)
    payload, ctx = c.compress(torch.zeros(6), "z")
    assert torch.equal(c.decompress(payload, ctx), torch.zeros(6))
    out = torch.ones(5)
    payload, ctx = c.compress(x, "w")
    c.decompress_add_(out, payload, ctx, alpha=-2.0)
    torch.testing.assert_close(out, 1 - 2 * c.decompress(payload, ctx))
    with pytest.raises(ValueError, match="levels"):
        QSGDCompressor(levels=200)


# -- the general payload path ----------------------------------------------------------------------

def test_identity_through_the_general_path_is_the_dense_weighted_gradient():
    params = named((20, 10), (50,), ())
    expected = [0.3 * p.detach().clone() for _, p in params]
    for _, p in params:
        p.grad = p.detach().clone()
    ex = make_exchanger(OneRankComm(), compression="static", compressor="identity")
    stats = ex.exchange(params, 0.3, 0)
    for (_, p), e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
    assert stats["compressed"] and stats["floats_sent"] >= 251
    assert stats["bytes_sent"] == 8 * 4 + 4 * 200 + 4 * 50 + 8  # header, layers (8-aligned)
    assert ex.memory.residuals and all(float(r.abs().max()) == 0
                                       for r in ex.memory.residuals.values())


class TopKWithoutFastPath:
    """Top-k through the contract's two methods only (the general path)."""

    def __init__(self, ratio: float):
        self.inner = TopKCompressor(ratio)

    def compress(self, tensor, name):
        return self.inner.compress(tensor, name)

    def decompress(self, payload, ctx):
        return self.inner.decompress(payload, ctx)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_topk_gives_the_same_steps_through_either_path(error_feedback):
    shapes = [(300, 500), (64,), (7, 9)]
    fast, general = named(*shapes), named(*shapes)
    settings = dict(compression="static", compression_ratio=0.05,
                    error_feedback=error_feedback)
    ex_fast = make_exchanger(OneRankComm(), **settings)
    ex_general = make_exchanger(OneRankComm(), **settings)
    ex_general.compressor, ex_general._sparse_payload = TopKWithoutFastPath(0.05), False
    ex_general._decompress_add = None
    gen = torch.Generator().manual_seed(8)
    for step in range(4):
        for (_, a), (_, b) in zip(fast, general):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ex_fast.exchange(fast, 0.7, step)
        ex_general.exchange(general, 0.7, step)
        for (_, a), (_, b) in zip(fast, general):
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    for name in ex_fast.memory.residuals:
        torch.testing.assert_close(ex_general.memory.residuals[name],
                                   ex_fast.memory.residuals[name], rtol=0, atol=ATOL)


@pytest.mark.parametrize("compressor", ["qsgd", "mycomp:RandomK"])
def test_error_feedback_is_exact_for_any_payload(compressor):
    """Sent plus residual equals the weighted gradients, over compressed and dense steps."""
    shapes = [(20, 10), (50,), (3, 4, 5)]
    params = named(*shapes)
    ex = make_exchanger(OneRankComm(), compression="static", compressor=compressor,
                        compression_ratio=0.3)
    gen = torch.Generator().manual_seed(3)
    true_sum = [torch.zeros(s) for s in shapes]
    sent_sum = [torch.zeros(s) for s in shapes]
    for step in range(5):
        weight = 0.25 + 0.25 * (step % 3)
        for (_, p), s, t in zip(params, shapes, true_sum):
            p.grad = torch.randn(s, generator=gen)
            t.add_(weight * p.grad)
        stats = ex.exchange(params, weight, step)
        assert stats["compressed"] and stats["bytes_sent"] > 0
        for (_, p), acc in zip(params, sent_sum):
            acc.add_(p.grad)
    for (name, _), t, sent in zip(params, true_sum, sent_sum):
        torch.testing.assert_close(sent + ex.memory.residuals[name], t, rtol=RTOL, atol=ATOL)
    assert ex.state_dict()["settings"]["compressor"] == compressor


def test_qsgd_sends_about_a_quarter_and_adaptive_mode_reads_its_kept_norm():
    params = named((1000,))
    params[0][1].grad = torch.randn(1000)
    ex = make_exchanger(OneRankComm(), compression="adaptive", compressor="qsgd",
                        adaptive_signal="paper", ewma_alpha=1.0, delta_threshold=1.0)
    stats = ex.exchange(params, 1.0, 0)
    assert stats["compressed"] and 0 <= stats["signal"] < 0.2
    assert stats["bytes_sent"] == 8 * 3 + 8 + 1000  # header, norm (padded), int8 levels
    assert stats["ratio"] == pytest.approx(stats["bytes_sent"] / 4 / 1000)


def test_a_checkpoint_of_another_compressor_is_refused():
    ex = make_exchanger(OneRankComm(), compression="static", compressor="qsgd")
    saved = ex.state_dict()
    other = make_exchanger(OneRankComm(), compression="static")
    with pytest.raises(ValueError, match="compressor"):
        other.load_state_dict(saved)


def test_the_datasets_command_shows_a_plugin(tmp_path):
    """``python -m streamsim.datasets mydata:stripes``: run as __main__, the plug-in's
    ArrayDataset (from the imported streamsim.datasets) is still recognized."""
    import os
    import subprocess
    import sys

    repo = PLUGINS.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGINS), str(repo)]))
    ok = subprocess.run([sys.executable, "-m", "streamsim.datasets", "mydata:stripes",
                         "--split", "test"], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "stripes test: 100 samples, shape (1, 8, 8)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "streamsim.datasets", "mydata:not_a_dataset"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ArrayDataset" in bad.stderr
