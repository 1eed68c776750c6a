"""``python -m scadles.launch``: one run, start to finish. The only module that starts processes.

1. Validate the configuration (a bad one exits 2 with one line, before anything starts).
2. Kafka (``--source kafka``, node 0 only): the external broker of ``--bootstrap`` /
   ``KAFKA_BOOTSTRAP`` (nothing is started; topics get a run-unique prefix unless
   ``--topic-prefix`` is given), else a private embedded broker, stopped at the end. Create
   the device topics, start the producer (``python -m streamsim.produce``, paced ``virtual``
   for ``--clock virtual``, ``realtime`` for ``wall``) with the run's stream start time.
3. Write ``run.json`` (the partition summary included) and print the partition.
4. Start the ranks: ``mpi`` -> ``mpiexec -n W python -m scadles.train ...`` (the venv's
   mpiexec, with a hostfile from ``--hosts``); ``gloo``/``nccl`` -> this node's ranks as
   subprocesses with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
   (torchrun's variables; multi-node: every node runs the launcher with ``NNODES``,
   ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
5. Wait. Ctrl-C, SIGTERM or any rank (or the producer) failing stops EVERY process it started
   (each in its own process group) and exits non-zero.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from scadles import metrics  # not checkpoint: it imports torch, which the launcher need not
from scadles.config import REPO, Config, fail, find_mpiexec, parse_args
from streamsim.record import VIRTUAL_EPOCH_S

STOP_GRACE_S = 10.0


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
        self.log_dir = Path(cfg.log_dir)
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
            if cfg.backend == "mpi" and cfg.node_rank != 0:
                say(f"node {cfg.node_rank}: mpiexec on node 0 starts every rank; nothing to do")
                return 0
            if cfg.node_rank == 0:
                self._prepare_streams()
            self._start_ranks()
            return self._wait()
        except Interrupted as e:
            say(f"{e}: stopping every process")
            return 128 + e.signum
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        raise Interrupted(signum)

    # -- streams: broker, topics, producer, run.json --------------------------------------------

    def _prepare_streams(self) -> None:
        cfg = self.cfg
        if cfg.resume:
            self._resume_settings()
        partition = self._partition_summary()
        if cfg.source == "kafka":
            self._start_kafka()
        if cfg.stream_start_s is None:
            cfg.stream_start_s = (VIRTUAL_EPOCH_S if cfg.clock == "virtual"
                                  else time.time() + cfg.stream_delay_s)
        if cfg.source == "kafka":
            self._start_producer()
            if cfg.alpha > 0 and cfg.inject_from == "pool":
                self._start_pool_producer()
        if cfg.resume:
            metrics.update_run_json(self.log_dir, resumed=metrics.read_run_json(
                self.log_dir).get("resumed", []) + [{"at": time.time(),
                                                     "topic_prefix": cfg.topic_prefix}])
        else:
            metrics.write_run_json(self.log_dir, cfg.to_dict(), partition,
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

    def _partition_summary(self) -> dict:
        from streamsim.datasets import DatasetError, load_dataset
        from streamsim.partition import make_partition

        cfg = self.cfg
        try:
            train_set = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.download,
                                     cfg.image_size, cfg.seed)
        except DatasetError as e:
            raise SystemExit(f"launch: {e}")
        part = make_partition(train_set.labels, cfg.world_size, cfg.partition, cfg.seed)
        print(part.format(), flush=True)
        return part.summary()

    def _start_kafka(self) -> None:
        from streamsim import broker

        cfg = self.cfg
        if cfg.bootstrap:
            try:
                broker.check_reachable(cfg.bootstrap, timeout_s=15)
            except broker.BrokerUnreachable as e:
                raise SystemExit(f"launch: {e}")
            say(f"external Kafka at {cfg.bootstrap}, topics {cfg.topic_prefix}0..")
        else:
            self.broker = broker.EmbeddedBroker()
            self.broker.__enter__()
            cfg.bootstrap = self.broker.bootstrap
            say(f"embedded broker at {cfg.bootstrap}")
        broker.create_topics(cfg.bootstrap, [f"{cfg.topic_prefix}{d}"
                                             for d in range(cfg.world_size)])

    def _start_producer(self) -> None:
        cfg = self.cfg
        cmd = [sys.executable, "-m", "streamsim.produce", "--bootstrap", cfg.bootstrap,
               "--dataset", cfg.dataset, "--partition", cfg.partition,
               "--world-size", str(cfg.world_size), "--rates", cfg.rates,
               "--arrivals", cfg.arrivals, "--duration", repr(cfg.duration_s),
               "--pace", "virtual" if cfg.clock == "virtual" else "realtime",
               "--seed", str(cfg.seed), "--topic-prefix", cfg.topic_prefix,
               "--start-time", repr(cfg.stream_start_s),
               "--image-size", str(cfg.image_size)]
        if cfg.data_dir:
            cmd += ["--data-dir", cfg.data_dir]
        if cfg.rate_schedule:
            cmd += ["--rate-schedule", cfg.rate_schedule]
        log_file = open(self.log_dir / "producer.log", "ab")
        self.producer = self._spawn("producer", cmd, self.env, stdout=log_file)
        log_file.close()
        say(f"producer started ({'virtual' if cfg.clock == 'virtual' else 'realtime'} pace, "
            f"{cfg.duration_s:g} s of stream; output in {self.log_dir / 'producer.log'})")

    def _start_pool_producer(self) -> None:
        """The shared injection pool: an IID sample of the training set on --pool-topic."""
        from scadles.inject import default_pool_rate

        cfg = self.cfg
        cmd = [sys.executable, "-m", "scadles.inject", "fill-pool", "--bootstrap",
               cfg.bootstrap, "--dataset", cfg.dataset, "--topic", cfg.pool_topic,
               "--rate", repr(default_pool_rate(cfg)), "--duration", repr(cfg.duration_s),
               "--pace", "virtual" if cfg.clock == "virtual" else "realtime",
               "--seed", str(cfg.seed), "--arrivals", cfg.arrivals,
               "--start-time", repr(cfg.stream_start_s), "--image-size", str(cfg.image_size)]
        if cfg.data_dir:
            cmd += ["--data-dir", cfg.data_dir]
        log_file = open(self.log_dir / "pool-producer.log", "ab")
        self.pool_producer = self._spawn("pool producer", cmd, self.env, stdout=log_file)
        log_file.close()
        say(f"pool producer started on topic {cfg.pool_topic}")

    # -- ranks ------------------------------------------------------------------------------

    def _start_ranks(self) -> None:
        cfg = self.cfg
        train = [sys.executable, "-m", "scadles.train"]
        if cfg.backend == "mpi":
            cmd = [find_mpiexec(), "-n", str(cfg.world_size)]
            if cfg.hosts:
                hostfile = self.log_dir / "hostfile"
                hostfile.write_text("".join(f"{h}:{n}\n" for h, n in cfg.host_slots))
                cmd += ["-f", str(hostfile)]
            env = dict(self.env, WORLD_SIZE=str(cfg.world_size))
            for name in ("RANK", "LOCAL_RANK", "MASTER_PORT"):
                env.pop(name, None)
            self._spawn("mpiexec", cmd + train + cfg.to_argv(), env)
            say(f"started {cfg.world_size} ranks with mpiexec")
            return
        master_addr = cfg.master_addr or (cfg.host_slots[0][0] if cfg.hosts else "127.0.0.1")
        master_port = cfg.master_port or free_port()
        ranks = cfg.local_ranks()
        for local_rank, rank in enumerate(ranks):
            env = dict(self.env, RANK=str(rank), WORLD_SIZE=str(cfg.world_size),
                       LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(len(ranks)),
                       NODE_RANK=str(cfg.node_rank), NNODES=str(cfg.num_nodes),
                       MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            self._spawn(f"rank {rank}", train + cfg.to_argv(), env)
        say(f"started ranks {ranks.start}..{ranks.stop - 1} of {cfg.world_size} "
            f"({cfg.backend}, rendezvous {master_addr}:{master_port})")

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict, stdout=None) -> subprocess.Popen:
        """Start ``cmd`` in a process group of its own (so stopping it stops its children)."""
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=stdout,
                                stderr=subprocess.STDOUT if stdout else None,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def _wait(self) -> int:
        """Until every rank finished (0), or something failed (its exit status)."""
        producers = {self.producer: "producer.log", self.pool_producer: "pool-producer.log"}
        ranks = [(n, p) for n, p in self.procs if p not in producers]
        while True:
            for name, proc in ranks:
                code = proc.poll()
                if code not in (None, 0):
                    say(f"{name} failed with exit status {code}: stopping every process")
                    return code if code > 0 else 1
            for proc, log_name in producers.items():
                code = None if proc is None else proc.poll()
                if code not in (None, 0):
                    tail = _tail(self.log_dir / log_name)
                    say(f"{log_name[:-4]} failed with exit status {code}: {tail}")
                    return code if code > 0 else 1
            if all(p.poll() == 0 for _, p in ranks):
                say(f"done; logs in {self.log_dir}")
                return 0
            time.sleep(0.2)

    def _stop_all(self) -> None:
        """SIGTERM every process group still running, SIGKILL what outlives the grace."""
        running = [(n, p) for n, p in self.procs if p.poll() is None]
        for _, proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for _, proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs:
            _signal_group(proc, signal.SIGKILL)  # stragglers and their children
            if proc.poll() is None:
                proc.wait()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no output)"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return Launcher(cfg).run()


if __name__ == "__main__":
    status = main()
    # Every process it started is stopped: skip the interpreter's slow teardown of torch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
