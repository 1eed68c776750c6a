"""What a run shows besides its logs: one short virtual-clock run through the launcher and the
real broker with --tensorboard leaves TensorBoard event files under LOG_DIR/tb with the scalars
of every step, and ends with the command that makes its plots (what `make report` runs for the
latest run)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scadles.metrics import read_rows

REPO = Path(__file__).resolve().parents[2]
# kafka-python loads its protocol schemas through a deprecated importlib.resources call
pytestmark = pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files in ``folder`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(broker, tmp_path_factory):
    """The launcher's stdout and the run's LOG_DIR (the only run in its logs folder)."""
    log_dir = tmp_path_factory.mktemp("logs") / "run"
    args = ["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--backend", "gloo",
            "--world-size", "2", "--rates", "10,30", "--clock", "virtual",
            "--compute-model", "fixed:0.5", "--max-steps", "3", "--eval-steps", "2",
            "--eval-samples", "200", "--bootstrap", broker, "--log-dir", str(log_dir),
            "--tensorboard"]
    proc = subprocess.run([sys.executable, "-m", "scadles.launch", *args], env=repo_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, log_dir


def repo_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_tensorboard_scalars_of_every_step(run):
    _, log_dir = run
    tb = log_dir / "tb"
    assert sorted(p.name for p in tb.iterdir()) == ["device-0", "device-1", "group"]
    for folder in tb.iterdir():
        assert list(folder.glob("events.out.tfevents.*")), folder

    group = scalars(tb / "group")
    rows = read_rows(log_dir, 0, "train")
    assert group["group/global_bsz"] == [(r["step"], r["global_bsz"]) for r in rows]
    assert [s for s, _ in group["group/lr"]] == [1, 2, 3]
    assert group["group/lr"][-1][1] > 0
    evals = read_rows(log_dir, 0, "eval")
    assert [s for s, _ in group["eval/top1"]] == [r["step"] for r in evals] == [2, 3]
    assert [v for _, v in group["eval/top1"]] == [float(r["top1"]) for r in evals]
    assert "device/local_bsz" not in group
    for rank in (0, 1):
        device = scalars(tb / f"device-{rank}")
        rows = read_rows(log_dir, rank, "train")
        assert device["device/local_bsz"] == [(r["step"], r["local_bsz"]) for r in rows]
        assert device["device/bytes_sent"] == [(r["step"], r["bytes_sent"]) for r in rows]
        assert [s for s, _ in device["device/loss"]] == [r["step"] for r in rows
                                                         if r["loss"] is not None]
        assert "group/lr" not in device and "eval/top1" not in device


def test_the_run_ends_with_the_command_that_makes_its_plots(run):
    stdout, log_dir = run
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("launch: plots: ")
    command = shlex.split(last[len("launch: plots: "):])
    assert command[:3] == [sys.executable, "-m", "scadles.report"] and str(log_dir) in command
    proc = subprocess.run(command, env=repo_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (log_dir / "report" / "report.md").is_file()
    assert (log_dir / "report" / "accuracy.png").stat().st_size > 0


def test_make_report_makes_the_plots_of_the_latest_run(run, tmp_path):
    _, log_dir = run
    older = log_dir.parent / "older"  # a run.json older than the run's: not the latest
    older.mkdir(exist_ok=True)
    (older / "run.json").write_text("{}")
    os.utime(older / "run.json", (0, 0))
    out = log_dir / "report"
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    proc = subprocess.run(["make", "-s", "report", f"LOGS={log_dir.parent}",
                           f"PY={sys.executable}"], env=repo_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"report written to {out / 'report.md'}" in proc.stdout
    assert (out / "batch_sizes.png").stat().st_size > 0
    empty = subprocess.run(["make", "-s", "report", f"LOGS={tmp_path}", f"PY={sys.executable}"],
                           env=repo_env(), cwd=REPO, capture_output=True, text=True)
    assert empty.returncode != 0 and "no run in" in empty.stdout


def test_a_resumed_run_drops_the_scalars_after_its_checkpoint(tmp_path):
    """Steps after the checkpoint were rolled back: TensorBoard shows each step once, with
    the values the run logs keep."""
    args = ["--world-size", "2", "--rates", "10,30", "--clock", "virtual", "--compute-model",
            "fixed:0.5", "--eval-steps", "2", "--eval-samples", "100", "--source",
            "inprocess", "--log-dir", str(tmp_path), "--tensorboard", "--checkpoint-every", "2"]
    for extra in (["--max-steps", "3"], ["--max-steps", "5", "--resume"]):
        proc = subprocess.run([sys.executable, "-m", "scadles.launch", *args, *extra],
                              env=repo_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    group = scalars(tmp_path / "tb" / "group")
    rows = read_rows(tmp_path, 0, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert group["group/global_bsz"] == [(r["step"], r["global_bsz"]) for r in rows]
    assert [s for s, _ in group["eval/top1"]] == [r["step"] for r in
                                                 read_rows(tmp_path, 0, "eval")] == [2, 4, 5]
