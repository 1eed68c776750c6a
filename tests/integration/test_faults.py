"""Faults in real runs: a broker killed mid-run, a bad broker address, agreed stops, and
what listens on the network.

Every run goes through the launcher as a user's would (real broker, real gloo groups, real
mpiexec), on the wall clock where the fault matters there, and small: smallcnn,
Fashion-MNIST, 2-3 ranks, seconds of stream.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scadles.metrics import read_rows
from streamsim.broker import EmbeddedBroker

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 180
# Real time, a run that would go on for minutes: the tests stop it.
WALL = ["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--clock", "wall",
        "--max-steps", "500", "--eval-steps", "0", "--eval-samples", "200",
        "--world-size", "2", "--rates", "40,80"]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP", "HOSTS", "NNODES", "NODE_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME",
                        "UCX_NET_DEVICES", "FI_TCP_IFACE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


class Run:
    """A launcher running in the background, its output in a file."""

    def __init__(self, args: list[str], log_dir: Path, env: dict):
        self.log_dir = log_dir
        self.out_path = log_dir.with_name(log_dir.name + ".out")
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "scadles.launch", *args,
                                          "--log-dir", str(log_dir)], env=env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for_steps(self, steps: int, world_size: int, timeout_s: float = 120) -> None:
        """Until every rank logged ``steps`` training steps."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the run ended early:\n{self.output[-3000:]}"
            if all(len(read_rows(self.log_dir, r, "train")) >= steps
                   for r in range(world_size)):
                return
            time.sleep(0.3)
        raise AssertionError(f"no {steps} steps in {timeout_s} s:\n{self.output[-3000:]}")

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def listening(pids: list[int]) -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP socket of ``pids`` (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        owners = [int(part.split(",")[0]) for part in line.split("pid=")[1:]]
        if set(owners) & set(pids):
            found.append((fields[3], line.split("users:")[1]))
    return found


def assert_loopback_only(run: Run) -> list[tuple[str, str]]:
    sockets = listening(descendants(run.proc.pid))
    assert sockets, "nothing listens: the check would prove nothing"
    wide = [(addr, who) for addr, who in sockets if not addr.startswith("127.0.0.1:")]
    assert not wide, f"listening beyond loopback: {wide}"
    return sockets


def tansu_of(run: Run) -> int:
    for pid in descendants(run.proc.pid):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if Path(argv0.decode()).name == "tansu":
            return pid
    raise AssertionError("the launcher started no broker")


def assert_broker_named(run: Run, code: int, bootstrap_hint: str) -> None:
    output = run.output
    assert code != 0, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    last = output.strip().splitlines()[-1]
    assert "broker" in last and bootstrap_hint in last, output[-3000:]
    assert (run.log_dir / "rank-0.log").is_file()


def test_a_bad_broker_address_stops_a_script_with_one_line(tmp_path):
    """KAFKA_BOOTSTRAP without a port: exit 2, one line naming it, before anything starts."""
    env = clean_env(KAFKA_BOOTSTRAP="localhost", LOG_DIR=str(tmp_path / "run"),
                    PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "execution_scripts" / "streamsim_resnet152.sh")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "KAFKA_BOOTSTRAP 'localhost'" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_killing_the_embedded_broker_stops_a_gloo_run_naming_it(tmp_path):
    """gloo, wall clock, the launcher's own broker. While it trains, every socket of the run
    listens on 127.0.0.1 only; kill -9 of the broker then stops every process within 30 s,
    the launcher's last line names the broker, and its output holds no traceback."""
    run = Run([*WALL, "--backend", "gloo"], tmp_path / "run", clean_env())
    try:
        run.wait_for_steps(2, 2)
        sockets = assert_loopback_only(run)
        started = descendants(run.proc.pid)[1:]  # broker, producer, ranks
        broker_pid = tansu_of(run)
        assert any(f"pid={broker_pid}," in who for _, who in sockets)
        os.kill(broker_pid, signal.SIGKILL)
        killed = time.monotonic()
        code = run.wait(timeout_s=60)
        took_s = time.monotonic() - killed
    finally:
        run.stop()
    assert took_s < 30, took_s
    assert_broker_named(run, code, "127.0.0.1:")
    assert "embedded Kafka broker" in run.output and "SIGKILL" in run.output
    assert len(started) >= 4 and not [p for p in started if Path(f"/proc/{p}").exists()]


def test_killing_an_external_broker_stops_an_mpi_run_naming_it(tmp_path):
    """mpi (mpiexec), wall clock, an external broker (KAFKA_BOOTSTRAP). While it trains, the
    run's sockets (mpiexec, ranks, producer) listen on 127.0.0.1 only; killing the broker
    stops every process within 30 s with one line naming its address."""
    broker = EmbeddedBroker().start()
    try:
        run = Run([*WALL, "--backend", "mpi"], tmp_path / "run",
                  clean_env(KAFKA_BOOTSTRAP=broker.bootstrap))
        try:
            run.wait_for_steps(2, 2)
            assert_loopback_only(run)
            broker.process.kill()
            killed = time.monotonic()
            code = run.wait(timeout_s=60)
            took_s = time.monotonic() - killed
        finally:
            run.stop()
    finally:
        broker.stop()
    assert took_s < 30, took_s
    assert_broker_named(run, code, broker.bootstrap)
    assert "KAFKA_BOOTSTRAP" in run.output.strip().splitlines()[-1]


def _stop_agreed(log_dir: Path, world_size: int, reason: str) -> dict:
    run = json.loads((log_dir / "run.json").read_text())
    summary = run["summary"]
    assert summary["stop_reason"] == reason
    steps = [len(read_rows(log_dir, r, "train")) for r in range(world_size)]
    assert steps == [summary["steps"]] * world_size and summary["steps"] > 0
    assert len(summary["devices"]) == world_size
    return summary


@pytest.mark.parametrize("repeat", [0, 1])
def test_wall_clock_max_stream_s_stops_every_rank_after_the_same_step(repeat, tmp_path):
    """--max-stream-s on the wall clock with three ranks whose streams differ (each rank
    reaches the limit at its own time): the stop is agreed, so no rank is left waiting in a
    collective; repeated, it never hangs."""
    args = ["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--clock", "wall",
            "--source", "inprocess", "--backend", "gloo", "--world-size", "3",
            "--rates", "15,40,90", "--max-steps", "0", "--max-stream-s", "4",
            "--stream-delay-s", "15",  # the streams start once the ranks are up
            "--window-s", "0.5", "--eval-steps", "0", "--eval-samples", "200",
            "--seed", str(repeat), "--log-dir", str(tmp_path / "run")]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "scadles.launch", *args], env=clean_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _stop_agreed(tmp_path / "run", 3, "max stream time")
    assert 4 <= summary["stream_s"] < 4 + 10
    assert time.monotonic() - started < 120


def test_ctrl_c_stops_after_an_agreed_step_and_records_the_summary(tmp_path):
    """SIGINT to the launcher (a user's Ctrl-C): every rank stops after the same step, and
    run.json holds the summary so far with stop_reason "interrupted"."""
    run = Run(["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--clock", "wall",
               "--source", "inprocess", "--backend", "gloo", "--world-size", "2",
               "--rates", "20,60", "--max-steps", "500", "--eval-steps", "0",
               "--eval-samples", "200"], tmp_path / "run", clean_env())
    try:
        run.wait_for_steps(2, 2)
        run.proc.send_signal(signal.SIGINT)
        code = run.wait(timeout_s=60)
    finally:
        run.stop()
    assert code == 130, run.output[-3000:]
    summary = _stop_agreed(tmp_path / "run", 2, "interrupted")
    assert summary["steps"] < 500
    assert "(stopped: interrupted)" in run.output


def test_malformed_records_of_every_rank_reach_run_json_by_kind(broker, tmp_path):
    """Malformed records on rank 1's topic only (ahead of its stream): run.json's device
    table has them per kind for device 1 (gathered from that rank, not rank 0's), and the
    printed table shows the kinds."""
    import numpy as np
    from kafka import KafkaProducer

    from streamsim import record
    from streamsim.broker import create_topics

    prefix = f"malformed-{os.getpid()}-{tmp_path.name}-"
    create_topics(broker, [f"{prefix}0", f"{prefix}1"])
    good = record.encode(1, 0, 3, np.zeros((1, 28, 28), np.uint8))
    bad = [b"XX" + good[2:], b"XX" + good[2:], record.encode(1, 0, 99, np.zeros((1, 28, 28),
                                                                                np.uint8)),
           good[:10]]
    producer = KafkaProducer(bootstrap_servers=broker)
    for value in bad:
        producer.send(f"{prefix}1", value, partition=0,
                      timestamp_ms=int(record.VIRTUAL_EPOCH_S * 1000))
    producer.flush()
    producer.close()
    args = ["--model-name", "smallcnn", "--dataset", "fashion-mnist", "--backend", "gloo",
            "--clock", "virtual", "--compute-model", "linear:0.05,0.002", "--world-size", "2",
            "--rates", "10,20", "--max-steps", "3", "--eval-steps", "0", "--eval-samples", "100",
            "--bootstrap", broker, "--topic-prefix", prefix, "--log-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "scadles.launch", *args], env=clean_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    devices = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]["devices"]
    assert devices[0]["malformed"] == 0 and devices[0]["malformed_by_kind"] == {}
    assert devices[1]["malformed_by_kind"] == {"label": 1, "magic": 2, "short": 1}
    assert devices[1]["malformed"] == 4 and devices[1]["samples_trained"] > 0
    assert "4 (label 1, magic 2, short 1)" in proc.stdout
