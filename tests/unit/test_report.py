"""The report on hand-written logs: exact table values, every plot, the CLI and its errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from scadles import report


def write_run(root, name, config, ranks, evals=(), partition=None):
    """A run directory: run.json and rank-<r>.jsonl (train rows per rank, evals on rank 0)."""
    path = root / name
    path.mkdir()
    meta = {"config": config,
            "partition": partition or {"labels_per_device": [[0, 1], [2, 3]],
                                       "samples_per_device": [100, 100]}}
    (path / "run.json").write_text(json.dumps(meta))
    for rank, rows in enumerate(ranks):
        lines = [json.dumps({"kind": "train", **row}) for row in rows]
        if rank == 0:  # rank 0 evaluates
            lines += [json.dumps({"kind": "eval", **row}) for row in evals]
        (path / f"rank-{rank}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def train_rows(clocks, bsz, buffers, dropped, bytes_sent, compressed=None, injected=None,
               signal=None, labels=None, truncated=None):
    rows = []
    for step, clock in enumerate(clocks):
        row = {"step": step, "clock_s": clock, "local_bsz": bsz, "global_bsz": 2 * bsz,
               "lr": 0.1, "wait_s": 0.0, "compute_s": 0.1, "sync_s": 0.01,
               "buffer_len": buffers[step], "dropped": dropped[step], "loss": 2.0,
               "bytes_sent": bytes_sent[step],
               "label_hist": {str(l): 1 for l in (labels or [0])}}
        if compressed is not None:
            row.update(compressed=compressed[step], ratio=0.1, signal=signal[step],
                       floats_sent=10, compress_s=0.001)
        if truncated is not None:
            row["truncated"] = truncated[step]
        if injected is not None:
            row.update(injected=injected[step], injected_bytes=784 * injected[step])
        rows.append(row)
    return rows


@pytest.fixture
def runs_root(tmp_path):
    """ddp baseline, two seeds of scadles (adaptive compression, injection), one without evals."""
    root = tmp_path / "logs"
    root.mkdir()
    write_run(root, "ddp", {"mode": "ddp", "seed": 0, "world_size": 2, "rates": [10, 40]}, [
        train_rows([2, 4, 6, 8], 64, [70, 80, 90, 100], [0, 0, 0, 0], [1000] * 4),
        train_rows([2, 4, 6, 8], 64, [10, 20, 30, 40], [0, 0, 0, 0], [1000] * 4),
    ], evals=[{"step": 1, "clock_s": 4.0, "samples": 100, "loss": 1.5, "top1": 30, "top5": 70},
              {"step": 3, "clock_s": 8.0, "samples": 100, "loss": 1.0, "top1": 60, "top5": 90}])
    cfg = {"mode": "scadles", "world_size": 2, "compression": "adaptive",
           "delta_threshold": 0.3, "alpha": 0.5, "beta": 0.5}
    flags = [False, True, True, True]
    write_run(root, "scadles-seed0", {**cfg, "seed": 0}, [
        train_rows([1, 2, 3, 4], 10, [5, 33, 7, 8], [0, 1, 2, 0], [100, 100, 200, 200],
                   compressed=flags, signal=[0.5, 0.2, 0.1, 0.1], injected=[1, 2, 3, 4],
                   labels=[0, 1, 2], truncated=[0, 3, 0, 0]),
        train_rows([1, 2, 3, 4], 40, [3, 4, 5, 6], [5, 0, 0, 0], [100, 100, 200, 200],
                   compressed=flags, signal=[0.5, 0.2, 0.1, 0.1], injected=[0, 0, 0, 10],
                   labels=[2, 3], truncated=[2, 0, 0, 0]),
    ], evals=[{"step": 1, "clock_s": 2.0, "samples": 100, "loss": 1.4, "top1": 40, "top5": 80},
              {"step": 3, "clock_s": 4.0, "samples": 100, "loss": 1.1, "top1": 55,
               "top5": 90}])
    write_run(root, "scadles-seed1", {**cfg, "seed": 1}, [
        train_rows([1, 2, 3, 4], 10, [1, 2, 3, 4], [0, 0, 0, 0], [100] * 4,
                   compressed=flags, signal=[0.5, 0.2, 0.1, 0.1], injected=[0, 0, 0, 0]),
        train_rows([1, 2, 3, 4], 40, [1, 2, 3, 4], [0, 0, 0, 0], [100] * 4,
                   compressed=flags, signal=[0.5, 0.2, 0.1, 0.1], injected=[0, 0, 0, 0]),
    ], evals=[{"step": 1, "clock_s": 2.0, "samples": 100, "loss": 1.4, "top1": 50, "top5": 80},
              {"step": 3, "clock_s": 4.0, "samples": 100, "loss": 1.2, "top1": 52,
               "top5": 90}])
    # No eval rows, no compression or injection fields: every optional value is n/a.
    write_run(root, "plain", {"mode": "scadles", "seed": 0}, [
        train_rows([1, 2], 8, [0, 0], [0, 0], [10, 10]),
        train_rows([1, 2], 8, [0, 0], [0, 0], [10, 10]),
    ])
    return root


def table_rows(text, header):
    """Cells of the markdown table starting at the line beginning with header, by first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def load_all(root):
    return [report.load_run(root / n) for n in ("ddp", "scadles-seed0", "scadles-seed1", "plain")]


def test_summaries_exact(runs_root):
    ddp, s0, s1, plain = load_all(runs_root)
    base = report.summarize_run(ddp, 0.5)
    assert base["time_to_target_s"] == 8.0
    assert (base["final_top1"], base["best_top1"]) == (0.6, 0.6)
    assert base["bytes_sent"] == 8000 and base["peak_buffer"] == 100 and base["dropped"] == 0
    assert base["cnc_ratio"] is None and base["injected"] == 0 and base["truncated"] is None
    assert base["steps"] == 4 and base["stream_s"] == 8.0 and base["ranks"] == 2

    a = report.summarize_run(s0, 0.5)
    assert a["time_to_target_s"] == 4.0
    assert a["bytes_sent"] == 2 * (100 + 100 + 200 + 200)
    assert (a["compressed_steps"], a["dense_steps"], a["cnc_ratio"]) == (3, 1, 3.0)
    assert a["peak_buffer"] == 33 and a["dropped"] == 8 and a["truncated"] == 5
    assert a["injected"] == 20 and a["injected_bytes"] == 20 * 784
    assert (a["final_top1"], a["best_top1"]) == (0.55, 0.55)
    assert report.speedup(base["time_to_target_s"], a["time_to_target_s"]) == 2.0

    b = report.summarize_run(s1, 0.5)
    assert b["time_to_target_s"] == 2.0 and b["bytes_sent"] == 800 and b["peak_buffer"] == 4
    assert report.speedup(8.0, b["time_to_target_s"]) == 4.0

    setting = report.summarize_setting([a, b], base["time_to_target_s"])
    assert setting["name"] == "scadles" and setting["seeds"] == 2
    assert setting["time_to_target_s"][:2] == (3.0, pytest.approx(math.sqrt(2)))
    assert setting["speedup"] == 8.0 / 3.0
    assert setting["bytes_sent"][0] == 1000.0

    p = report.summarize_run(plain, 0.5)
    assert p["time_to_target_s"] is None and p["final_top1"] is None
    assert p["cnc_ratio"] is None and p["injected"] == 0 and p["bytes_sent"] == 40
    assert report.speedup(8.0, None) is None


def test_time_to_target_first_step_in_order():
    evals = [{"step": 5, "clock_s": 9.0, "top1": 0.9}, {"step": 2, "clock_s": 3.0, "top1": 0.7},
             {"step": 3, "clock_s": 4.0, "top1": 0.6}]  # merged points: fractions
    assert report.time_to_target(evals, 0.65) == 3.0
    assert report.time_to_target(evals, 0.7) == 3.0
    assert report.time_to_target(evals, 0.95) is None
    assert report.time_to_target([], 0.1) is None


def test_cnc_ratio_edge_cases():
    def rows(flags):
        return {0: [{"step": i, "compressed": f} for i, f in enumerate(flags)]}
    assert report.cnc_ratio(rows([True, True])) == math.inf
    assert report.cnc_ratio(rows([False, False])) == 0.0
    assert report.cnc_ratio(rows([True, False, False, True, True])) == 1.5
    assert report.cnc_ratio({0: [{"step": 0}]}) is None
    # The lowest rank decides a step it logged; rank 1 fills a step rank 0 lacks.
    mixed = {0: [{"step": 0, "compressed": True}], 1: [{"step": 0, "compressed": False},
                                                      {"step": 1, "compressed": False}]}
    assert report.step_decisions(mixed) == {0: True, 1: False}


def test_sharded_evals_merge_and_resume_duplicates(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    rank0 = [{"kind": "train", "step": 0, "clock_s": 1.0, "bytes_sent": 5, "buffer_len": 2},
             {"kind": "train", "step": 1, "clock_s": 2.0, "bytes_sent": 5, "buffer_len": 9},
             # resumed from step 0: the rewritten step 1 replaces the first one
             {"kind": "train", "step": 1, "clock_s": 2.0, "bytes_sent": 7, "buffer_len": 3},
             {"kind": "eval", "step": 1, "clock_s": 2.0, "samples": 100, "top1": 50}]
    rank1 = [{"kind": "train", "step": 0, "clock_s": 1.0, "bytes_sent": 5},
             {"kind": "eval", "step": 1, "clock_s": 2.5, "samples": 300, "top1": 90}]
    for rank, rows in enumerate((rank0, rank1)):
        (path / f"rank-{rank}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + '\n{"kind": "tra')  # torn last line
    run = report.load_run(path)
    assert run.name == "run" and run.config == {}
    assert len(run.evals) == 1
    assert run.evals[0]["top1"] == pytest.approx(0.8)
    assert run.evals[0]["clock_s"] == 2.5 and run.evals[0]["samples"] == 400
    s = report.summarize_run(run, 0.8)
    assert s["bytes_sent"] == 5 + 7 + 5 and s["peak_buffer"] == 3
    assert s["time_to_target_s"] == 2.5


def test_settings_targets_and_labels(runs_root):
    runs = load_all(runs_root)
    assert list(report.settings(runs)) == ["ddp", "scadles", "plain"]
    assert report.setting_name("x-seed12") == "x" and report.setting_name("seedy") == "seedy"
    # Best top-1: ddp 0.6, scadles mean(0.55, 0.52) = 0.535 -> 0.53.
    assert report.default_target(runs) == 0.53
    assert report.resolve_baseline(runs, None) == "ddp"  # the only ddp setting
    assert report.resolve_baseline(runs, str(runs_root / "scadles-seed1")) == "scadles"
    with pytest.raises(report.ReportError, match="--baseline"):
        report.resolve_baseline(runs, "nope")
    matrix = report.label_matrix(runs[1])
    assert matrix.tolist() == [[4, 4, 4, 0], [0, 0, 4, 4]]
    assert report.parse_target("80") == 0.8 and report.parse_target("0.5") == 0.5


def test_write_report_plots_and_table(runs_root, tmp_path):
    out = tmp_path / "out"
    path = report.write_report(load_all(runs_root), out, target=0.5, baseline="ddp")
    assert path == out / "report.md"
    for name in report.PLOT_FILES.values():
        png = out / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    assert "| Setting | Seeds | Mode |" in text
    table = table_rows(text, "| Setting |")
    runs_table = table_rows(text, "| Run | Seed |")
    assert table["scadles"][7:10] == ["3.0 ± 1.4", "2.67x", "18.5 ± 20.5"]  # ttt, speedup, peak
    assert table["scadles"][10:] == ["4 ± 5.7", "5 (1/2)", "1.00 kB ± 283 B", "3.00 ± 0.00",
                                     "10 ± 14.1"]
    assert table["ddp"][7:13] == ["8.0", "1.00x", "100", "0", "n/a", "8.00 kB"]
    assert table["ddp"][13:] == ["n/a", "0"]
    assert table["plain"][5:9] == ["n/a", "n/a", "not reached (0/1)", "n/a"]
    assert runs_table["scadles-seed0"][4:] == ["4.0", "2.00x", "33", "8", "5", "1.20 kB", "3.00",
                                               "20"]
    assert runs_table["scadles-seed1"][4:6] == ["2.0", "4.00x"]
    for name in report.PLOT_FILES.values():
        assert f"]({name})" in text
    assert "CNC ratio: steps that sent compressed gradients / steps that sent dense" in text


def test_cli(runs_root, tmp_path, repo_env):
    dirs = [str(runs_root / n) for n in ("ddp", "scadles-seed0", "scadles-seed1")]
    done = subprocess.run([sys.executable, "-m", "scadles.report", *dirs, "--target", "50",
                           "--baseline", dirs[0], "--labels", "DDL,ours-seed0,ours-seed1"],
                          capture_output=True, text=True, env=repo_env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = runs_root / "report"
    assert str(out / "report.md") in done.stdout
    text = (out / "report.md").read_text()
    assert "| ours | 2 |" in text and "| DDL | 1 |" in text and "Time to 50.0%" in text


@pytest.mark.parametrize("case", ["empty", "labels"])
def test_cli_errors(runs_root, tmp_path, repo_env, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"empty": [str(empty)],
            "labels": [str(runs_root / "ddp"), "--labels", "a,b"]}[case]
    done = subprocess.run([sys.executable, "-m", "scadles.report", *args],
                          capture_output=True, text=True, env=repo_env, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert (str(empty) if case == "empty" else "--labels") in lines[0]
    assert not (tmp_path / "report").exists()


def test_truncated_column_only_when_logged(runs_root):
    ddp, _, _, plain = load_all(runs_root)
    text = report.render_markdown([ddp, plain], 0.5, "given", "ddp", plots={})
    assert "Truncated" not in text
    assert table_rows(text, "| Setting |")["ddp"][9:12] == ["100", "0", "8.00 kB"]


def test_peak_buffer_prefers_the_summary_peaks():
    from types import SimpleNamespace

    rows = [{"buffer_len": 0}, {"buffer_len": 3}]  # truncation: logged after each batch
    with_peaks = SimpleNamespace(summary={"devices": [{"peak_buffer": 40}, {"peak_buffer": 7}]})
    assert report.peak_buffer(with_peaks, rows) == 40
    assert report.peak_buffer(SimpleNamespace(summary={}), rows) == 3
    assert report.peak_buffer(SimpleNamespace(summary={}), []) is None


def test_runs_table_pairs_each_run_with_the_baseline_run_of_its_seed(runs_root, tmp_path):
    # A second ddp seed that reaches 50% at 12 s (seed 0: 8 s): the setting mean is 10 s.
    write_run(runs_root, "ddp-seed1", {"mode": "ddp", "seed": 1, "world_size": 2,
                                       "rates": [10, 40]}, [
        train_rows([2, 4, 6, 8], 64, [70, 80, 90, 100], [0, 0, 0, 0], [1000] * 4),
        train_rows([2, 4, 6, 8], 64, [10, 20, 30, 40], [0, 0, 0, 0], [1000] * 4),
    ], evals=[{"step": 2, "clock_s": 6.0, "samples": 100, "loss": 1.5, "top1": 30, "top5": 70},
              {"step": 4, "clock_s": 12.0, "samples": 100, "loss": 1.0, "top1": 60,
               "top5": 90}])
    runs = [report.load_run(runs_root / n)
            for n in ("ddp", "ddp-seed1", "scadles-seed0", "scadles-seed1")]
    text = report.render_markdown(runs, 0.5, "given", "ddp", plots={})
    runs_table = table_rows(text, "| Run | Seed |")
    assert runs_table["scadles-seed0"][4:6] == ["4.0", "2.00x"]   # 8 s / 4 s, seed 0's
    assert runs_table["scadles-seed1"][4:6] == ["2.0", "6.00x"]   # 12 s / 2 s, seed 1's
    assert runs_table["ddp-seed1"][4:6] == ["12.0", "1.00x"]
    assert table_rows(text, "| Setting |")["scadles"][8] == "3.33x"  # 10 s / 3 s: the means
