"""The embedded broker: the shared CLI broker, private brokers, topics, unreachable errors."""
import os
import subprocess
import sys
import time

import pytest

from streamsim import broker as brokerlib


def _cli(args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "streamsim.broker", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not brokerlib._pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_cli_start_reuses_reports_status_and_stops(tmp_path, repo_env):
    state = tmp_path / "state" / "broker.json"
    args = ["--state-file", str(state)]
    started = _cli(["start", *args], repo_env)
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    assert started.stdout == bootstrap + "\n"  # the address is the only line on stdout
    assert bootstrap.startswith("127.0.0.1:")
    try:
        pid = brokerlib.status(state)["pid"]
        brokerlib.check_reachable(bootstrap, timeout_s=5)

        again = _cli(["start", *args], repo_env)  # reuses the running broker
        assert again.returncode == 0 and again.stdout.strip() == bootstrap
        assert brokerlib.status(state)["pid"] == pid

        shown = _cli(["status", *args], repo_env)
        assert shown.returncode == 0 and bootstrap in shown.stdout and str(pid) in shown.stdout
    finally:
        stopped = _cli(["stop", *args], repo_env)
    assert stopped.returncode == 0
    assert _gone(pid, 7)
    assert not state.exists()
    shown = _cli(["status", *args], repo_env)
    assert shown.returncode == 1 and "not running" in shown.stdout


def test_state_dir_from_environment(tmp_path, repo_env):
    env = dict(repo_env, SCADLES_STATE_DIR=str(tmp_path))
    started = _cli(["start"], env)
    assert started.returncode == 0, started.stderr
    try:
        assert (tmp_path / "broker.json").exists()
        state = brokerlib.status(tmp_path / "broker.json")
        assert state["bootstrap"] == started.stdout.strip()
    finally:
        assert _cli(["stop"], env).returncode == 0


def test_create_topics_one_partition_idempotent(broker, unique_name):
    topics = [f"{unique_name}{d}" for d in range(3)]
    brokerlib.create_topics(broker, topics)
    brokerlib.create_topics(broker, topics)  # existing topics are fine
    admin = brokerlib.admin_client(broker)
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(topics)}
    finally:
        admin.close()
    assert described == {t: 1 for t in topics}
    with pytest.raises(ValueError, match="partition"):
        brokerlib.create_topics(broker, topics[:1], partitions=2)


def test_check_reachable_names_address_and_fix():
    port = brokerlib.free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(brokerlib.BrokerUnreachable) as err:
        brokerlib.check_reachable(f"127.0.0.1:{port}", timeout_s=1)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "python -m streamsim.broker start" in message
    assert "KAFKA_BOOTSTRAP" in message and "\n" not in message
    with pytest.raises(ValueError, match="HOST:PORT"):
        brokerlib.check_reachable("no-port-here", timeout_s=1)


def test_unreachable_broker_cli_errors_within_15s(repo_env):
    address = f"127.0.0.1:{brokerlib.free_port()}"  # nothing listens there
    commands = [
        ["streamsim.produce", "--bootstrap", address, "--dataset", "fashion-mnist",
         "--world-size", "2", "--rates", "10 20", "--duration", "5", "--pace", "virtual"],
        ["streamsim.inspect", "--bootstrap", address, "--topic", "trainer-0"],
    ]
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", *c], env=repo_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in commands]  # side by side: each waits out its 10 s probe
    results = [(p, *p.communicate(timeout=60)) for p in procs]
    assert time.monotonic() - started < 15
    for proc, _out, err in results:
        assert proc.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and address in lines[0] and "unreachable" in lines[0], err


def test_embedded_broker_stops_and_dies_with_its_parent(repo_env):
    with brokerlib.EmbeddedBroker() as b:
        pid = b.process.pid
        brokerlib.check_reachable(b.bootstrap, timeout_s=5)
    assert _gone(pid, 7)
    # a parent killed with SIGKILL runs no cleanup: the parent-death signal stops the broker
    child = subprocess.run(
        [sys.executable, "-c", "import os, signal\n"
         "from streamsim.broker import EmbeddedBroker\n"
         "b = EmbeddedBroker().start()\n"
         "print(b.process.pid, flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)\n"],
        env=repo_env, capture_output=True, text=True, timeout=60)
    assert child.returncode == -9, child.stderr
    assert _gone(int(child.stdout.strip()), 7)


def test_find_tansu_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TANSU_BIN", str(tmp_path / "missing"))
    with pytest.raises(brokerlib.BrokerError, match="TANSU_BIN"):
        brokerlib.find_tansu()
    monkeypatch.delenv("TANSU_BIN")
    assert os.access(brokerlib.find_tansu(), os.X_OK)
