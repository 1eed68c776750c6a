"""``python -m scadles.launch``: one run, start to finish. The only module that starts processes.

1. Validate the configuration (a bad one exits 2 with one line, before anything starts).
2. Kafka (``--source kafka``, node 0 only): the external broker of ``--bootstrap`` /
   ``KAFKA_BOOTSTRAP`` (nothing is started; topics get a run-unique prefix unless
   ``--topic-prefix`` is given), else a private embedded broker, stopped at the end. Create
   the device topics.
3. Fix the stream start time, build the run's ``StreamPlan`` (``streamsim.plan``) once and
   print its partition; start the producer on it (``python -m streamsim.produce``, paced
   ``virtual`` for ``--clock virtual``, ``realtime`` for ``wall``); write ``run.json`` (the
   plan and the partition summary included).
4. Start the ranks, each writing its stdout and stderr to ``LOG_DIR/rank-R.log`` (rank 0's
   progress and summary also reach this terminal). ``mpi`` -> ``mpiexec -n W python -m
   scadles.train ...`` (the venv's MPICH; multi-node: hydra with a hostfile from
   ``--hosts``); ``gloo``/``nccl`` -> this node's ranks as subprocesses with ``RANK``,
   ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun's variables; multi-node: every node runs the
   launcher with ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
5. Wait. Any rank or producer failing, or the embedded broker dying, stops EVERY process it
   started (each in its own process group) and exits non-zero with one line naming the
   cause (the broker when it is gone) and the last lines of the failing process's log.
   Ctrl-C asks the ranks to stop after their current step and write their summary (a
   second Ctrl-C, or SIGTERM, stops everything at once).

Loopback only on one machine (no ``HOSTS``, ``NNODES`` 1): the broker listens on 127.0.0.1;
gloo/nccl meet through a file store (no rendezvous port), gloo's own connections and nccl's
bootstrap are bound to the loopback interface (``GLOO_SOCKET_IFNAME=lo``,
``NCCL_SOCKET_IFNAME=lo``); mpi runs under MPICH's single-machine process manager
``mpiexec.gforker`` (no control port; hydra's binds every interface) with the ranks' network
module on loopback (``UCX_NET_DEVICES=lo``, ``FI_TCP_IFACE=lo``). Settings already in the
environment are left alone.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scadles import metrics  # not checkpoint: it imports torch, which the launcher need not
from scadles.config import REPO, Config, fail, find_mpiexec, parse_args
from streamsim import logsetup
from streamsim.plan import StreamPlan, default_stream_start_s

STOP_GRACE_S = 10.0
INTERRUPT_GRACE_S = 120.0  # Ctrl-C: how long the ranks may take to finish their step
LOG_TAIL_LINES = 5
RANK_HOST = "rankhost"  # the process that forks a node's gloo ranks (scadles.rankhost)
FAILED_LINE = re.compile(r"^rank \d+ FAILED: (.*)$")  # what scadles.train prints on failure
LOOPBACK_IFACE = "lo"
# MPICH's network modules (UCX, the default of the venv's MPICH, and libfabric): loopback
MPI_LOOPBACK_ENV = {"UCX_NET_DEVICES": LOOPBACK_IFACE, "FI_TCP_IFACE": LOOPBACK_IFACE,
                    "FI_SOCKETS_IFACE": LOOPBACK_IFACE}


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def say(message: str) -> None:
    print(f"launch: {message}", flush=True)


def report_command(log_dir: str | Path) -> str:
    """The one command that makes a run's plots and report.md (in LOG_DIR/report); what
    ``make report`` runs for the latest run."""
    log_dir = Path(log_dir)
    return (f"{shlex.quote(sys.executable)} -m scadles.report {shlex.quote(str(log_dir))} "
            f"--out {shlex.quote(str(log_dir / 'report'))}")


def time_model(cfg: Config) -> dict:
    """How stream time is charged (run.json's ``time_model``): the compute and comm models
    resolved, with the model and hardware a paper preset stands for."""
    from scadles.clock import CommModel, ComputeModel

    compute = ComputeModel(cfg.compute_model)
    return {"clock": cfg.clock, "compute": compute.describe(),
            "comm": CommModel(cfg.comm_model).for_compute(compute).describe()}


class Launcher:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.producer: subprocess.Popen | None = None
        self.pool_producer: subprocess.Popen | None = None
        self.broker = None
        self.plan: StreamPlan | None = None  # the run's streams, once the start is fixed
        self.log_dir = Path(cfg.log_dir)
        self.rendezvous_dir: str | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["PYTHONUNBUFFERED"] = "1"

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            say(f"logs in {self.log_dir}")
            if cfg.backend == "mpi" and cfg.node_rank != 0:
                say(f"node {cfg.node_rank}: mpiexec on node 0 starts every rank; nothing to do")
                return 0
            if cfg.node_rank == 0:
                self._prepare_streams()
            self._start_ranks()
            return self._wait()
        except Interrupted as e:
            if e.signum == signal.SIGINT:
                return self._interrupt()
            say(f"{e}: stopping every process")
            return 128 + e.signum
        finally:
            for s in previous:  # the cleanup runs to its end (it is bounded in time)
                signal.signal(s, signal.SIG_IGN)
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.rendezvous_dir is not None:
                shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    def _on_signal(self, signum, frame):
        raise Interrupted(signum)

    def _interrupt(self) -> int:
        """Ctrl-C: every rank finishes its step, agrees to stop and writes the summary so
        far; a second Ctrl-C (or SIGTERM) stops everything at once."""
        say("SIGINT: the ranks stop after their current step and write their summary "
            "(Ctrl-C again stops every process now)")
        try:
            for proc in self._ranks():
                _signal_group(proc, signal.SIGINT)
            for proc in (self.producer, self.pool_producer):
                if proc is not None:
                    _signal_group(proc, signal.SIGINT)  # flush, end-of-stream markers
            deadline = time.monotonic() + INTERRUPT_GRACE_S
            while time.monotonic() < deadline and any(_exit_status(p) is None
                                                       for p in self._ranks()):
                time.sleep(0.1)
            say(f"stopped on SIGINT; logs in {self.log_dir}")
        except Interrupted:
            say("stopping every process now")
        return 128 + signal.SIGINT

    def _ranks(self) -> list[subprocess.Popen]:
        producers = (self.producer, self.pool_producer)
        return [p for _, p in self.procs if p not in producers]

    # -- streams: broker, topics, producer, run.json --------------------------------------------

    def _prepare_streams(self) -> None:
        cfg = self.cfg
        if cfg.resume:
            self._resume_settings()
        labels = self._train_labels()
        if cfg.source == "kafka":
            self._start_kafka()
        if cfg.stream_start_s is None:
            cfg.stream_start_s = default_stream_start_s(virtual=cfg.clock == "virtual",
                                                        delay_s=cfg.stream_delay_s)
        self.plan = cfg.stream_plan()
        part = self.plan.make_partition(labels)
        print(part.format(), flush=True)
        if cfg.source == "kafka":
            self._start_producer()
            if cfg.alpha > 0 and cfg.inject_from == "pool":
                self._start_pool_producer()
        if cfg.resume:
            metrics.update_run_json(self.log_dir, resumed=metrics.read_run_json(
                self.log_dir).get("resumed", []) + [{"at": time.time(),
                                                     "topic_prefix": cfg.topic_prefix}])
        else:
            metrics.write_run_json(self.log_dir, cfg.to_dict(), part.summary(),
                                   stream_plan=self.plan.to_dict(),
                                   time_model=time_model(cfg))

    def _resume_settings(self) -> None:
        """A resumed run replays the same streams: same start time, fresh topics (the stream
        is produced again and read from the checkpoint's offsets)."""
        cfg = self.cfg
        original = metrics.read_run_json(self.log_dir).get("config", {})
        if cfg.stream_start_s is None:
            cfg.stream_start_s = original.get("stream_start_s")
        cfg.topic_prefix = f"{cfg.topic_prefix}resume-{cfg.run_id}-"
        from scadles import checkpoint

        folder = checkpoint.latest(self.log_dir)
        say(f"resuming from {folder}")

    def _train_labels(self):
        """The training split's labels, all the partition needs (loaded before anything
        starts, so missing data is one line)."""
        from streamsim.datasets import DatasetError, load_dataset

        cfg = self.cfg
        try:
            return load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.download,
                                cfg.image_size, cfg.seed).labels
        except DatasetError as e:
            raise SystemExit(f"launch: {e}")

    def _start_kafka(self) -> None:
        from streamsim import broker

        cfg = self.cfg
        try:
            if cfg.bootstrap:
                broker.check_reachable(cfg.bootstrap, timeout_s=15,
                                       client_config=self.client_config)
                say(f"external Kafka at {cfg.bootstrap}, topics {cfg.topic_prefix}0..")
            else:
                self.broker = broker.EmbeddedBroker()
                self.broker.__enter__()
                cfg.bootstrap = self.broker.bootstrap
                say(f"embedded broker at {cfg.bootstrap}")
            broker.create_topics(cfg.bootstrap, [f"{cfg.topic_prefix}{d}"
                                                 for d in range(cfg.devices)],
                                 replication_factor=cfg.replication_factor,
                                 client_config=self.client_config)
        except (broker.BrokerUnreachable, broker.BrokerError, ValueError) as e:
            raise SystemExit(f"launch: {e}")

    def _start_producer(self) -> None:
        """``python -m streamsim.produce`` streaming the run's plan (its flags)."""
        cfg, plan = self.cfg, self.plan
        cmd = [sys.executable, "-m", "streamsim.produce", "--bootstrap", cfg.bootstrap,
               "--dataset", cfg.dataset, "--partition", plan.partition,
               "--world-size", str(plan.devices), "--rates", plan.rates,
               "--arrivals", plan.arrivals, "--duration", repr(plan.duration_s),
               "--pace", "virtual" if cfg.clock == "virtual" else "realtime",
               "--seed", str(plan.seed), "--topic-prefix", cfg.topic_prefix,
               "--start-time", repr(plan.stream_start_s),
               "--image-size", str(cfg.image_size)]
        if cfg.data_dir:
            cmd += ["--data-dir", cfg.data_dir]
        if plan.rate_schedule:
            cmd += ["--rate-schedule", plan.rate_schedule]
        cmd += self._kafka_args()
        log_file = open(self.log_dir / "producer.log", "ab")
        self.producer = self._spawn("producer", cmd, self.env, stdout=log_file)
        log_file.close()
        say(f"producer started ({'virtual' if cfg.clock == 'virtual' else 'realtime'} pace, "
            f"{cfg.duration_s:g} s of stream; output in {self.log_dir / 'producer.log'})")

    def _start_pool_producer(self) -> None:
        """The shared injection pool: an IID sample of the training set on --pool-topic."""
        cfg, plan = self.cfg, self.plan
        cmd = [sys.executable, "-m", "streamsim.pool", "--bootstrap", cfg.bootstrap,
               "--dataset", cfg.dataset, "--topic", cfg.pool_topic,
               "--rate", repr(cfg.pool_rate_per_s), "--duration", repr(plan.duration_s),
               "--pace", "virtual" if cfg.clock == "virtual" else "realtime",
               "--seed", str(plan.seed), "--arrivals", plan.arrivals,
               "--start-time", repr(plan.stream_start_s), "--image-size", str(cfg.image_size)]
        if cfg.data_dir:
            cmd += ["--data-dir", cfg.data_dir]
        cmd += self._kafka_args()
        log_file = open(self.log_dir / "pool-producer.log", "ab")
        self.pool_producer = self._spawn("pool producer", cmd, self.env, stdout=log_file)
        log_file.close()
        say(f"pool producer started on topic {cfg.pool_topic}")

    def _kafka_args(self) -> list[str]:
        """A producer's --kafka-config and --replication-factor: the run's."""
        args = ["--replication-factor", str(self.cfg.replication_factor)]
        return args + (["--kafka-config", self.cfg.kafka_config] if self.cfg.kafka_config
                       else [])

    @functools.cached_property
    def client_config(self) -> dict:
        from streamsim.kafkaconfig import load_client_config

        return load_client_config(self.cfg.kafka_config)

    # -- ranks ------------------------------------------------------------------------------

    def _start_ranks(self) -> None:
        cfg = self.cfg
        cfg.rank_log = True
        train = [sys.executable, "-m", "scadles.train"] + cfg.to_argv()
        if cfg.backend == "mpi":
            self._start_mpi_ranks(train)
            return
        ranks = cfg.local_ranks()
        base = dict(self.env, WORLD_SIZE=str(cfg.world_size), LOCAL_WORLD_SIZE=str(len(ranks)),
                    NODE_RANK=str(cfg.node_rank), NNODES=str(cfg.num_nodes))
        if cfg.single_machine:
            # No rendezvous port: the ranks meet through a file; gloo binds loopback.
            self.rendezvous_dir = tempfile.mkdtemp(prefix="scadles-rendezvous-")
            store = str(Path(self.rendezvous_dir) / "store")
            base["SCADLES_RENDEZVOUS_FILE"] = store
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                base.pop(name, None)
            if _has_interface(LOOPBACK_IFACE):  # gloo's pairs, nccl's bootstrap
                base.setdefault("GLOO_SOCKET_IFNAME" if cfg.backend == "gloo"
                                else "NCCL_SOCKET_IFNAME", LOOPBACK_IFACE)
            where = f"rendezvous file {store}, loopback only"
        else:
            master_addr = cfg.master_addr or (cfg.host_slots[0][0] if cfg.hosts
                                              else "127.0.0.1")
            master_port = cfg.master_port or free_port()
            base.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            base.pop("SCADLES_RENDEZVOUS_FILE", None)
            where = f"rendezvous {master_addr}:{master_port}"
        if cfg.rank_start == "fork" or (cfg.rank_start == "auto" and cfg.backend == "gloo"):
            # One process imports torch and loads the data, then forks every rank
            # (scadles.rankhost); its own notes go to rankhost.log.
            host = [sys.executable, "-m", "scadles.rankhost", "--ranks",
                    f"{ranks.start}:{ranks.stop}", "--"] + train[3:]
            with open(self.log_dir / "rankhost.log", "ab") as err:
                self._spawn(RANK_HOST, host, base, stderr=err)
            where += ", forked from one process"
        else:
            for local_rank, rank in enumerate(ranks):
                self._spawn(f"rank {rank}", train,
                            dict(base, RANK=str(rank), LOCAL_RANK=str(local_rank)))
        say(f"started ranks {ranks.start}..{ranks.stop - 1} of {cfg.world_size} "
            f"({cfg.backend}, {where}); their output is in {self.log_dir}/rank-*.log")

    def _start_mpi_ranks(self, train: list[str]) -> None:
        """mpiexec for every rank. One machine: MPICH's gforker (no listening socket) and the
        network module on loopback; several: hydra with a hostfile."""
        cfg = self.cfg
        mpiexec = find_mpiexec()
        env = dict(self.env, WORLD_SIZE=str(cfg.world_size))
        for name in ("RANK", "LOCAL_RANK", "MASTER_PORT", "SCADLES_RENDEZVOUS_FILE"):
            env.pop(name, None)
        if cfg.single_machine:
            gforker = Path(mpiexec).with_name("mpiexec.gforker")
            for name, value in MPI_LOOPBACK_ENV.items():
                env.setdefault(name, value)
            if gforker.is_file() and os.access(gforker, os.X_OK):
                cmd, where = [str(gforker), "-n", str(cfg.world_size)], "gforker, loopback only"
            else:
                cmd = [mpiexec, "-n", str(cfg.world_size)]
                where = (f"no mpiexec.gforker beside {mpiexec}: its control port listens on "
                         f"every interface")
        else:
            hostfile = self.log_dir / "hostfile"
            hostfile.write_text("".join(f"{h}:{n}\n" for h, n in cfg.host_slots))
            cmd, where = [mpiexec, "-n", str(cfg.world_size), "-f", str(hostfile)], "hydra"
        with open(self.log_dir / "mpiexec.log", "ab") as err:  # the MPI launcher's own notes
            self._spawn("mpiexec", cmd + train, env, stderr=err)
        say(f"started {cfg.world_size} ranks with mpiexec ({where}); their output is in "
            f"{self.log_dir}/rank-*.log")

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict, stdout=None,
               stderr=None) -> subprocess.Popen:
        """Start ``cmd`` in a process group of its own (so stopping it stops its children).
        It is reaped only by ``_stop_all``, after its group was signalled: until then its
        pid (and so its group id) cannot be taken by another process."""
        if stdout is not None and stderr is None:
            stderr = subprocess.STDOUT
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=stdout, stderr=stderr,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def _wait(self) -> int:
        """Until every rank finished (0), or something failed (its exit status, after one
        line naming the cause)."""
        producers = {self.producer: "producer.log", self.pool_producer: "pool-producer.log"}
        ranks = [(n, p) for n, p in self.procs if p not in producers]
        while True:
            if self.broker is not None and self.broker.process is not None \
                    and self.broker.process.poll() is not None:
                self._report_broker_lost(f"the embedded broker (pid {self.broker.process.pid})"
                                         f" {_how_it_ended(self.broker.process.returncode)}")
                return 1
            failed = [(n, p, code) for n, p in ranks
                      if (code := _exit_status(p)) not in (None, 0)]
            if failed:
                return self._report_failure(failed)
            for proc, log_name in producers.items():
                code = None if proc is None else _exit_status(proc)
                if code not in (None, 0):
                    return self._report_failure([(log_name[:-4], proc, code)])
            if all(_exit_status(p) == 0 for _, p in ranks):
                say(f"done; logs in {self.log_dir}")
                say(f"plots: {report_command(self.log_dir)}")
                return 0
            time.sleep(0.2)

    # -- failures ---------------------------------------------------------------------------

    def _report_failure(self, failed: list[tuple[str, subprocess.Popen, int]]) -> int:
        """One line for the first failure (a dead broker before anything it caused), then the
        last lines of that process's log."""
        name, proc, code = failed[0]
        status = code if code > 0 else 1
        lost = self._broker_gone()
        if lost is not None:
            self._report_broker_lost(lost)
            return status
        logs = [self._log_of(n) for n, _, _ in failed]
        if name in ("mpiexec", RANK_HOST):  # which rank: the one whose failure came first
            logs = sorted(self.log_dir.glob("rank-*.log"))
        culprit, cause = _first_failure(logs)
        if culprit is None:
            culprit = self._log_of(name)
            cause = _last_line(culprit) or "no output"
        else:  # report that process (its own exit status, when the launcher started it)
            codes = {self._log_of(n): c for n, _, c in failed}
            name = culprit.stem.replace("-", " ") if culprit.stem.startswith("rank-") else name
            code = codes.get(culprit, code)
        status = code if code > 0 else 1
        say(f"{name} failed ({_how_it_ended(code)}): {cause}")
        tail = _tail_lines(culprit, LOG_TAIL_LINES)
        if tail:
            say(f"last lines of {culprit}:")
            for line in tail:
                print(f"  | {line}", flush=True)
        say("stopping every process")
        return status

    def _log_of(self, name: str) -> Path:
        if name.startswith("rank "):
            return metrics.rank_output_path(self.log_dir, int(name.split()[1]))
        return self.log_dir / f"{name.replace(' ', '-')}.log"

    def _broker_gone(self) -> str | None:
        """Why the run's broker is gone, or None while it answers (or there is none)."""
        from streamsim import broker

        if self.cfg.source != "kafka" or not self.cfg.bootstrap or self.cfg.node_rank != 0:
            return None
        if self.broker is not None and self.broker.process is not None:
            code = self.broker.process.poll()
            if code is not None:
                return f"the embedded broker (pid {self.broker.process.pid}) {_how_it_ended(code)}"
        reason = broker.probe(self.cfg.bootstrap, timeout_s=3.0)
        return None if reason is None else f"it is unreachable ({reason})"

    def _report_broker_lost(self, why: str) -> None:
        embedded = self.broker is not None
        what = "embedded Kafka broker" if embedded else "Kafka broker (KAFKA_BOOTSTRAP)"
        fix = ("rerun (an embedded broker keeps nothing: the run restarts its streams)"
               if embedded else "check that it runs and is reachable from here, then rerun")
        if (self.log_dir / "checkpoints" / "latest").is_file():
            fix += "; RESUME=1 (--resume) continues from the last checkpoint"
        say(f"the {what} at {self.cfg.bootstrap} is gone: {why}. Stopping every process; "
            f"{fix}")

    def _stop_all(self) -> None:
        """SIGTERM every process group not yet reaped, SIGKILL what outlives the grace, then
        reap. A child that exited is a zombie until reaped, so its group id cannot have been
        reused: only groups of children known to be alive or unreaped are signalled."""
        running = [p for _, p in self.procs if _exit_status(p) is None]
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while running and time.monotonic() < deadline:
            running = [p for p in running if _exit_status(p) is None]
            time.sleep(0.05)
        for _, proc in self.procs:
            _signal_group(proc, signal.SIGKILL)  # stragglers and their children
        for _, proc in self.procs:
            proc.wait()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def _exit_status(proc: subprocess.Popen) -> int | None:
    """``proc``'s exit status (negative: killed by that signal) without reaping it, or None
    while it runs."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere
        return proc.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal ``proc``'s process group, only while ``proc`` is not reaped (alive or a
    zombie), so its pid cannot belong to another process."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _has_interface(name: str) -> bool:
    try:
        return any(n == name for _, n in socket.if_nameindex())
    except OSError:
        return False


def _tail_lines(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def _last_line(path: Path) -> str | None:
    tail = _tail_lines(path, 1)
    return tail[0] if tail else None


def _first_failure(logs: list[Path]) -> tuple[Path | None, str | None]:
    """The log with the failure that came first, and its cause: of the logs ending in a
    failure line (``rank R FAILED: ...``, or a producer's ``produce: ...``), one with a named
    cause before one with a bare exception (``RuntimeError: ...``, typically a rank that lost
    a peer), then the one written first (the earliest modification time). (None, None) when
    no log has a failure line."""
    found = []
    for path in logs:
        for line in reversed(_tail_lines(path, 20)):
            match = FAILED_LINE.match(line)
            if match or re.match(r"^(produce|pool): ", line):
                cause = match.group(1) if match else line.split(": ", 1)[1]
                bare = re.match(r"^[\w.]*(Error|Exception|Interrupt)\w*: ", cause) is not None
                try:
                    found.append((bare, path.stat().st_mtime_ns, path, cause))
                except OSError:
                    pass
                break
    if not found:
        return None, None
    _, _, path, cause = min(found, key=lambda f: (f[0], f[1]))
    return path, cause


def main(argv: list[str] | None = None) -> int:
    logsetup.configure("launch")
    cfg = parse_args(argv)
    return Launcher(cfg).run()


def console_main() -> None:
    """``python -m scadles.launch`` and the ``scadles-launch`` script: main() on sys.argv, then
    exit at once. Every process it started is stopped: skip the interpreter's slow teardown
    of torch."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
