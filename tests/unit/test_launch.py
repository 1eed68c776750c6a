"""The launcher's process bookkeeping and failure reports, on tiny real child processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scadles import launch


def _zombie(code: int = 0) -> subprocess.Popen:
    """A child in its own process group that has exited but is not reaped."""
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"],
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while launch._exit_status(proc) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_exit_status_does_not_reap_so_the_group_id_stays_taken():
    proc = _zombie(code=3)
    assert launch._exit_status(proc) == 3 and proc.returncode is None
    assert _state(proc.pid) == "Z"  # still a zombie: its pid cannot be reused
    proc.wait()
    assert launch._exit_status(proc) == 3


def test_exit_status_of_a_killed_child_is_the_negative_signal():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        assert launch._exit_status(proc) is None
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while launch._exit_status(proc) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert launch._exit_status(proc) == -signal.SIGKILL
        assert launch._how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL"
    finally:
        proc.kill()
        proc.wait()


def test_only_unreaped_children_are_signalled(monkeypatch):
    """A reaped child's pid may already belong to another process: never signal it."""
    sent = []
    monkeypatch.setattr(launch.os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    proc = _zombie()
    launch._signal_group(proc, signal.SIGKILL)  # a zombie: its group id is still its own
    assert sent == [(proc.pid, signal.SIGKILL)]
    proc.wait()
    launch._signal_group(proc, signal.SIGKILL)
    assert sent == [(proc.pid, signal.SIGKILL)]


def test_stop_all_signals_before_it_reaps(monkeypatch, tmp_path):
    """_stop_all: a child that already exited gets its group signalled while still a zombie,
    and is reaped only afterwards; nothing is signalled after it was reaped."""
    events = []
    real_killpg = os.killpg

    def killpg(pid, sig):
        events.append(("signal", pid, _state(pid)))
        real_killpg(pid, sig)

    monkeypatch.setattr(launch.os, "killpg", killpg)
    runner = launch.Launcher.__new__(launch.Launcher)
    runner.broker = None
    done = _zombie()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
    runner.procs = [("rank 0", done), ("rank 1", alive)]
    runner._stop_all()
    assert done.returncode == 0 and alive.returncode == -signal.SIGTERM
    assert ("signal", done.pid, "Z") in events  # signalled while a zombie, reaped after
    before = len(events)
    runner._stop_all()  # everything is reaped now: nothing may be signalled
    assert len(events) == before


def test_the_first_failure_line_names_the_cause(tmp_path):
    first, later, plain = (tmp_path / "rank-2.log", tmp_path / "rank-0.log",
                           tmp_path / "rank-1.log")
    first.write_text("step 1\nrank 2 FAILED: Kafka broker at 127.0.0.1:9 stopped answering\n")
    time.sleep(0.02)
    later.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: peer closed\n"
                     "rank 0 FAILED: RuntimeError: peer closed\n")
    plain.write_text("step 1\n")
    path, cause = launch._first_failure([later, plain, first])
    assert path == first and cause == "Kafka broker at 127.0.0.1:9 stopped answering"
    # A named cause wins over a bare exception written at the same moment (a peer's loss).
    os.utime(later, ns=(first.stat().st_mtime_ns - 10**9,) * 2)
    assert launch._first_failure([later, first])[0] == first
    assert launch._first_failure([later])[1] == "RuntimeError: peer closed"
    producer = tmp_path / "producer.log"
    producer.write_text("[produce realtime] 1.0 s sent 10/100\nproduce: the broker did not "
                        "take a record of topic t-0: boom\n")
    assert launch._first_failure([producer])[1] == "the broker did not take a record of " \
                                                   "topic t-0: boom"
    assert launch._first_failure([plain]) == (None, None)
    assert launch._tail_lines(later, 2) == ["RuntimeError: peer closed",
                                            "rank 0 FAILED: RuntimeError: peer closed"]


@pytest.mark.parametrize("code,text", [(0, "exited with status 0"), (3, "exited with status 3"),
                                       (-15, "was killed by SIGTERM")])
def test_how_it_ended(code, text):
    assert launch._how_it_ended(code) == text
