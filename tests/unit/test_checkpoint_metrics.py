"""Run logs and checkpoints, without processes: ranges, resume truncation, atomic latest."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from scadles import checkpoint, metrics


def test_seq_ranges_round_trip():
    seqs = [5, 0, 1, 2, 7, 8, 10]
    ranges = metrics.seq_ranges(seqs)
    assert ranges == [[0, 2], [5, 5], [7, 8], [10, 10]]
    assert metrics.expand_ranges(ranges) == sorted(seqs)
    assert metrics.seq_ranges([]) == []


def test_rank_log_resume_drops_rolled_back_rows(tmp_path):
    log = metrics.RankLog(tmp_path, 1)
    for step in range(1, 6):
        log.write({"kind": "train", "step": step})
    log.write({"kind": "eval", "step": 5})
    log.close()
    resumed = metrics.RankLog(tmp_path, 1, resume_step=3)
    resumed.write({"kind": "train", "step": 4})
    resumed.close()
    rows = metrics.read_rows(tmp_path, 1)
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 1), ("train", 2), ("train", 3), ("resume", 3), ("train", 4)]
    fresh = metrics.RankLog(tmp_path, 1)  # a new run in the same folder starts afresh
    fresh.close()
    assert metrics.read_rows(tmp_path, 1) == []


def test_run_json_written_then_summarized(tmp_path):
    metrics.write_run_json(tmp_path, {"world_size": 2}, {"labels_per_device": [[0], [1]],
                                                         "samples_per_device": [3, 4]})
    metrics.update_run_json(tmp_path, summary={"steps": 7})
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["config"] == {"world_size": 2}
    assert doc["partition"]["samples_per_device"] == [3, 4]
    assert doc["summary"] == {"steps": 7}
    assert doc["versions"]["python"] and "torch" in doc["versions"]


def test_progress_lines_without_a_terminal():
    out = io.StringIO()
    progress = metrics.Progress(enabled=True, max_steps=10, every_s=3600, stream=out)
    progress.update(1, 1.0, 64, 2.3, None)
    progress.update(2, 2.0, 128, 2.2, None)  # within every_s: not shown
    progress.note("eval step 2")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/10") and "loss 2.3000" in lines[0]
    assert lines[1:] == ["eval step 2"]


@pytest.mark.parametrize("boot_s", [0.0, 0.5, 59.0, 1e6])
def test_progress_first_update_shows_whatever_the_monotonic_clock_reads(monkeypatch, boot_s):
    """Monotonic time counts from boot: on a machine up for seconds it is small."""
    now = [boot_s]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    progress = metrics.Progress(enabled=True, every_s=60, stream=out)
    progress.update(1, 1.0, 64, 2.3, None)
    now[0] += 59.9
    progress.update(2, 2.0, 128, 2.2, None)  # within every_s of the first: not shown
    now[0] += 0.1
    progress.update(3, 3.0, 192, 2.1, None)  # every_s after the first: shown
    assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == ["step 1", "step 3"]


def test_checkpoint_latest_is_always_complete(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for step in (3, 6, 9):
        for rank in (1, 0):  # rank 0 last: it publishes
            checkpoint.save(tmp_path, step, rank, {"offset": 10 * step + rank},
                            {"step": step, "w": torch.ones(2) * step} if rank == 0 else None,
                            barrier=lambda: None)
    assert checkpoint.latest(tmp_path).name == "step-00000009"
    shared, mine = checkpoint.load(tmp_path, 1)
    assert shared["step"] == 9 and torch.equal(shared["w"], torch.full((2,), 9.0))
    assert mine == {"offset": 91}
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-00000006", "step-00000009"]
    # A checkpoint being written (no shared.pt yet) is never the latest.
    checkpoint.atomic_save({"offset": 1}, checkpoint.step_dir(tmp_path, 12) / "rank-1.pt")
    assert checkpoint.latest(tmp_path).name == "step-00000009"
    assert not list((tmp_path / "checkpoints").rglob("*.tmp"))


def test_run_summary_shows_the_compression_hint_only_when_there_is_one():
    summary = {"steps": 5, "stream_s": 5.0, "samples": 320, "final_top1": 50.0,
               "best_top1": 55.0, "final_top5": 90.0, "bytes_sent_total": 1000,
               "cnc_ratio": None, "compressed_steps": 0, "dense_steps": 5, "wall_s": 1.0,
               "log_dir": "/tmp/x"}
    text = metrics.format_summary(dict(summary, compression_hint="adaptive compression never"
                                                                 " compressed: raise it"))
    assert "note           adaptive compression never compressed: raise it" in text.splitlines()
    assert "note" not in metrics.format_summary(summary)


def test_capture_output_sends_the_rank_to_its_log_and_keeps_the_terminal(tmp_path):
    """What Python, C code and a traceback write goes to rank-R.log; rank 0's display (the
    Tee) reaches the original stdout too, a redrawn progress line as a line of its own."""
    import subprocess
    import sys

    code = ("import os, sys; from scadles import metrics\n"
            f"terminal = metrics.capture_output({str(tmp_path)!r}, 3)\n"
            "print('python stdout'); print('python stderr', file=sys.stderr)\n"
            "os.write(2, b'c-level stderr\\n')\n"
            "tee = metrics.Tee(terminal, sys.stdout)\n"
            "tee.write('\\rstep 1   '); tee.write('summary\\n'); tee.flush()\n"
            "raise RuntimeError('boom')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stdout == b"\rstep 1   summary\n" and proc.stderr == b""
    log = (tmp_path / "rank-3.log").read_text()
    for text in ("python stdout", "python stderr", "c-level stderr", "step 1\nsummary\n",
                 "RuntimeError: boom"):
        assert text in log
