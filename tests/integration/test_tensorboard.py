"""--tensorboard: a short virtual-clock run through the launcher and the real broker leaves
TensorBoard event files under LOG_DIR/tb with the scalars of every step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scadles.metrics import read_rows

REPO = Path(__file__).resolve().parents[2]
# TensorBoard's event reader still uses a deprecated importlib.resources call
pytestmark = pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files in ``folder`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_of_every_step(broker, repo_env, tmp_path):
    args = ["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--backend", "gloo",
            "--world-size", "2", "--rates", "10,30", "--clock", "virtual",
            "--compute-model", "fixed:0.5", "--max-steps", "3", "--eval-steps", "2",
            "--eval-samples", "200", "--bootstrap", broker, "--log-dir", str(tmp_path),
            "--tensorboard"]
    proc = subprocess.run([sys.executable, "-m", "scadles.launch", *args], env=repo_env,
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tb = tmp_path / "tb"
    assert sorted(p.name for p in tb.iterdir()) == ["device-0", "device-1", "group"]
    for folder in tb.iterdir():
        assert list(folder.glob("events.out.tfevents.*")), folder

    group = scalars(tb / "group")
    rows = read_rows(tmp_path, 0, "train")
    assert group["group/global_bsz"] == [(r["step"], r["global_bsz"]) for r in rows]
    assert [s for s, _ in group["group/lr"]] == [1, 2, 3]
    assert group["group/lr"][-1][1] > 0
    evals = read_rows(tmp_path, 0, "eval")
    assert [s for s, _ in group["eval/top1"]] == [r["step"] for r in evals] == [2, 3]
    assert [v for _, v in group["eval/top1"]] == [float(r["top1"]) for r in evals]
    assert "device/local_bsz" not in group
    for rank in (0, 1):
        device = scalars(tb / f"device-{rank}")
        rows = read_rows(tmp_path, rank, "train")
        assert device["device/local_bsz"] == [(r["step"], r["local_bsz"]) for r in rows]
        assert device["device/bytes_sent"] == [(r["step"], r["bytes_sent"]) for r in rows]
        assert [s for s, _ in device["device/loss"]] == [r["step"] for r in rows
                                                         if r["loss"] is not None]
        assert "group/lr" not in device and "eval/top1" not in device
