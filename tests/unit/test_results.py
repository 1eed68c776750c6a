"""The results page's pure parts: records -> metrics, verdicts, blocks, render and verify."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scadles import results

REPO = Path(__file__).resolve().parents[2]


def record(evals, steps=None, devices=None, **config):
    """A compact record with evaluations [(step, clock_s, top1)]."""
    steps = steps or [(s, c) for s, c, _ in evals]
    cfg = {"mode": "scadles", "compute_model": "paper-resnet152", "comm_model": "paper-ethernet",
           "min_train_bsz": 8, "max_train_bsz": 1024, "window_s": 1.0, "train_bsz": 64,
           "policy": "persistence", "compression": "none", "world_size": 2, "seed": 0}
    cfg.update(config)
    return {"format": 1, "config": cfg, "summary": {"steps": len(steps), "final_top1": evals[-1][2],
                                                     "samples": 100, "stop_reason": "max steps"},
            "devices": devices or [{"device": 0, "rate_per_s": 20.0, "peak_buffer": 40,
                                    "dropped": 0}, {"device": 1, "rate_per_s": 10.0,
                                                    "peak_buffer": 50, "dropped": 0}],
            "evals": {"step": [e[0] for e in evals], "clock_s": [e[1] for e in evals],
                      "top1": [e[2] for e in evals], "top5": [None] * len(evals),
                      "loss": [None] * len(evals)},
            "steps": {"step": [s for s, _ in steps], "clock_s": [c for _, c in steps],
                      "global_bsz": [64] * len(steps), "bytes_sent": [10] * len(steps),
                      "local_bsz": [[32, 32]] * len(steps)}}


def test_time_to_target_accuracy_at_equal_time_and_bounds():
    ddp = record([(1, 10.0, 50.0), (2, 20.0, 76.0), (3, 30.0, 80.0)])
    fast = record([(1, 4.0, 60.0), (2, 8.0, 77.0), (3, 12.0, 78.0)])
    assert results.time_to(ddp, 75) == 20.0 and results.time_to(fast, 75) == 8.0
    assert results.paired_speedup(ddp, fast, 75) == (2.5, "=")
    # Equal stream time: the faster run ended at 12 s, where ddp had 50%.
    assert results.accuracy_change(ddp, fast) == pytest.approx(28.0)
    never = record([(1, 40.0, 60.0)])
    assert results.paired_speedup(ddp, never, 75) == (0.5, "<")  # at most 20 / 40
    assert results.paired_speedup(never, fast, 75) == (5.0, ">")  # at least 40 / 8
    assert results.paired_speedup(never, never, 75) == (None, "n/a")
    assert results.bytes_to(ddp, 20.0) == 20 and results.bytes_to(ddp, None) == 30


def test_verdict_rule():
    assert results.speedup_verdict([(3.0, "="), (3.5, "=")], 3.29) == "reproduced"
    assert results.speedup_verdict([(1.2, "="), (1.5, "=")], 3.29) == "partly"
    assert results.speedup_verdict([(0.8, "="), (3.0, "=")], 1.5) == "partly"  # not every seed
    assert results.speedup_verdict([(0.5, "<"), (0.9, "=")], 1.5) == "not reproduced"
    assert results.speedup_verdict([(None, "n/a")], 1.5) == "not reproduced"


def test_grid_blocks_pair_runs_by_cell_and_seed_and_predict():
    ddp = record([(1, 10.0, 50.0), (2, 20.0, 76.0)], mode="ddp")
    fig6 = record([(1, 5.0, 60.0), (2, 10.0, 77.0)])
    records = {"grid/resnet152-S10-ddp-seed0": ddp, "grid/resnet152-S10-fig6-seed0": fig6,
               "grid/resnet152-S10-fig6-seed1": fig6}  # seed 1 has no ddp: left out
    text = results.block_grid_fig6(records)
    row = next(line for line in text.splitlines() if line.startswith("| S10 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["S10", "resnet152", "1", "10.0"]
    assert cells[6] == "2.00x" and cells[8] == "3.60x" and cells[-1] == "partly"
    low, high = cells[5].rstrip("x").split("–")
    assert 0 < float(low) <= float(high)


def test_fig6_cell_the_paper_does_not_show_gets_no_verdict():
    ddp = record([(1, 10.0, 50.0), (2, 20.0, 76.0)], mode="ddp")
    slow = record([(1, 30.0, 60.0), (2, 40.0, 77.0)])
    text = results.block_grid_fig6({"grid/vgg19-S20-ddp-seed0": ddp,
                                    "grid/vgg19-S20-fig6-seed0": slow})
    row = next(line for line in text.splitlines() if line.startswith("| S20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[8] == "not shown" and cells[-1] == "no claim (ddp faster)"
    fast = record([(1, 5.0, 60.0), (2, 10.0, 77.0)])
    text = results.block_grid_fig6({"grid/vgg19-S20-ddp-seed0": ddp,
                                    "grid/vgg19-S20-fig6-seed0": fast})
    assert "| no claim (ScaDLES faster) |" in text


def test_render_verify_and_unknown_blocks(tmp_path):
    folder = tmp_path / "results" / "window"
    folder.mkdir(parents=True)
    (folder / "ddp-seed0.json").write_text(json.dumps(record([(1, 10.0, 80.0)])))
    page = tmp_path / "RESULTS.md"
    page.write_text("# p\n<!-- results:window -->\nstale\n<!-- /results -->\ntext 1.0\n")
    results.write(page, figures=False)
    text = page.read_text()
    assert "stale" not in text and "| ddp | 1 | 10 | 1.00x | 80.00 |" in text
    assert text.endswith("<!-- /results -->\ntext 1.0\n")  # prose kept as written
    assert results.verify(page) == (True, "")
    page.write_text(text.replace("80.00", "81.00"))
    same, diff = results.verify(page)
    assert not same and "-| ddp | 1 | 10 | 1.00x | 81.00" in diff
    page.write_text("<!-- results:nonesuch -->\n<!-- /results -->\n")
    with pytest.raises(results.ResultsError, match="unknown results block"):
        results.verify(page)


def test_the_repositorys_results_page_matches_its_records():
    """The acceptance command on the committed page and records."""
    proc = subprocess.run([sys.executable, "-m", "scadles.report", "--verify-results",
                           "docs/RESULTS.md"], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
