"""execution_scripts/reproduce_cpu.sh: the QUICK smoke run end to end, and a failing run.

The smoke run trains every comparison for real (gloo ranks, the embedded Kafka broker for the
injection and compression comparisons, in-process streams for the others) at a tiny scale and
checks the reports: one folder per comparison with report.md, every plot non-empty, and a
table row for every run.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "execution_scripts" / "reproduce_cpu.sh"
COMPARISONS = ["tta-S10", "tta-S1", "buffer", "inject", "compression"]
PLOTS = ["accuracy.png", "batch_sizes.png", "buffer.png", "bytes.png", "compression.png",
         "labels.png"]


def _env(out: Path, **settings) -> dict:
    """The environment of a script run: nothing the script reads leaks in from the caller."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOURCE", "MODEL", "ONLY", "EXTRA_ARGS", "QUICK", "REPORT_ONLY")}
    env.update(OUT=str(out), **settings)
    return env


@pytest.mark.timeout(900)
def test_quick_run_produces_every_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=_env(out, QUICK="1"),
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = out / "report" / "index.md"
    assert f"report: {index}" in proc.stdout
    assert index.is_file()
    text = index.read_text()
    for comparison in COMPARISONS:
        assert f"## {comparison}" in text
        folder = out / "report" / comparison
        report = (folder / "report.md").read_text()
        for plot in PLOTS:
            assert (folder / plot).stat().st_size > 0, (comparison, plot)
            assert f"]({comparison}/{plot})" in text  # the index links the comparison's plots
        runs = sorted(p for p in (out / comparison).iterdir() if (p / "run.json").is_file())
        assert runs, comparison
        # One seed per setting in QUICK mode: the settings table has one row per run, named
        # by its label (the run's setting), and the settings list names every directory.
        table = [line for line in report.splitlines()
                 if re.match(r"\| \S+ \| 1 \| (scadles|ddp) \|", line)]
        assert len(table) == len(runs), (comparison, table)
        for run in runs:
            assert f"`{run}`" in report
    for comparison in ("tta-S10", "tta-S1"):  # ScaDLES against ddp of the same seed
        paired = (out / "report" / comparison / "paired.md").read_text()
        assert re.search(r"^\| 0 \| [\d.]+ \|", paired, re.M), paired
        assert (out / "report" / comparison / "seed0" / "accuracy.png").stat().st_size > 0
    # Progress lines name the run and how far it is.
    assert re.search(r"\[1/11 scadles-S10-seed0\] step \d+", proc.stdout)
    assert "all 11 runs done" in proc.stdout
    # The buffer comparison's peak table: persistence holds more than truncation.
    peaks = (out / "report" / "buffer" / "peak_buffers.md").read_text()
    row = next(line for line in peaks.splitlines() if line.startswith("| 0 |"))
    held_p, held_t = (int(v.strip().replace(",", "")) for v in row.split("|")[2:4])
    assert held_p > held_t > 0


def test_failing_run_stops_the_script_with_its_output(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO,
                          env=_env(out, QUICK="1", ONLY="buffer", MODEL="no-such-model"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "run 'persistence-seed0' (buffer) FAILED" in proc.stderr
    assert "no-such-model" in proc.stderr  # the tail of the run's output explains why
    assert not (out / "report").exists()  # nothing after the failing run
