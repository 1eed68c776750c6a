"""execution_scripts/reproduce_cpu.sh: the QUICK smoke run end to end, and a failing run.

The smoke run trains every comparison for real (gloo ranks; the embedded Kafka broker for
tablev, clocks and inject, in-process streams for the others; a real-time run for clocks) at
a tiny scale, stores every run's compact record, regenerates a results page from them and
verifies it. The test checks the records, the page's tables, the figures, the per-comparison
reports, and that the page check fails once a number on the page is changed by hand.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "execution_scripts" / "reproduce_cpu.sh"
# QUICK: grid S10,S2 x {ddp, fig6, full, bounded} x {resnet152, vgg19} seed 0; the rest one
# seed.
RECORDS = {"grid": 16, "ablations": 8, "window": 3, "tablev": 2, "clocks": 2, "buffer": 2,
           "inject": 6}
PLOTS = ["accuracy.png", "batch_sizes.png", "buffer.png", "bytes.png", "compression.png",
         "labels.png"]


def _env(out: Path, **settings) -> dict:
    """The environment of a script run: nothing the script reads leaks in from the caller."""
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", SCRIPT.read_text()))
    assert {"ONLY", "QUICK", "RESULTS_DIR", "PAGE", "GRID_RATES"} <= read
    env = {k: v for k, v in os.environ.items() if k not in read | {"EXTRA_ARGS"}}
    env.update(OUT=str(out), **settings)
    return env


@pytest.mark.timeout(900)
def test_quick_run_stores_records_and_a_verified_results_page(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=_env(out, QUICK="1"),
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total = sum(RECORDS.values())
    assert f"all {total} runs done" in proc.stdout
    assert re.search(rf"\[1/{total} resnet152-S10-ddp-seed0\] step \d+", proc.stdout)
    for comparison, n in RECORDS.items():
        records = sorted((out / "results" / comparison).glob("*.json"))
        assert len(records) == n, (comparison, records)
        for path in records:
            doc = json.loads(path.read_text())
            assert doc["format"] == 1 and doc["evals"]["top1"], path
            assert doc["time_model"]["clock"] == doc["config"]["clock"], path
    grid = json.loads((out / "results" / "grid" / "vgg19-S2-full-seed0.json").read_text())
    assert grid["time_model"]["compute"]["preset"] == "paper-vgg19"
    assert grid["time_model"]["comm"]["charged_model"] == "VGG19"
    assert grid["config"]["policy"] == "truncation" and grid["config"]["max_train_bsz"] == 1024
    assert len(grid["steps"]["local_bsz"][0]) == 4  # per device
    provenance = json.loads((out / "results" / "provenance.json").read_text())["comparisons"]
    assert set(provenance) == set(RECORDS)
    assert all(p["quick"] is True and p["wall_s"] > 0 for p in provenance.values())

    page = out / "RESULTS.md"
    text = page.read_text()
    for rates in ("S10", "S2"):
        for timing in ("resnet152", "vgg19"):
            assert re.search(rf"^\| {rates} \| {timing} \| 1 \|", text, re.M), (rates, timing)
    assert "| wall clock (Kafka, measured compute) | virtual replay |" in text
    for figure in ("grid-speedup.png", "grid-accuracy.png", "clocks.png", "buffer-length.png"):
        assert (out / "figures" / figure).stat().st_size > 0, figure
    for comparison in ("window", "tablev", "clocks", "buffer", "inject"):
        for plot in PLOTS:
            assert (out / "report" / comparison / plot).stat().st_size > 0, (comparison, plot)

    verify = [sys.executable, "-m", "scadles.report", "--verify-results", str(page)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert subprocess.run(verify, cwd=REPO, env=env, capture_output=True).returncode == 0
    # A number typed over on the page: the check names the difference and fails.
    row = next(line for line in text.splitlines() if line.startswith("| S10 | resnet152 |"))
    page.write_text(text.replace(row, row.replace("| 1 |", "| 2 |", 1)))
    proc = subprocess.run(verify, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "| S10 | resnet152 | 2 |" in proc.stdout


def test_failing_run_stops_the_script_with_its_output(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO,
                          env=_env(out, QUICK="1", ONLY="buffer", MODEL="no-such-model"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "run 'persistence-seed0' (buffer) FAILED" in proc.stderr
    assert "no-such-model" in proc.stderr  # the tail of the run's output explains why
    assert not (out / "report").exists()  # nothing after the failing run
    assert not (out / "results" / "buffer").exists()  # and no record of it
