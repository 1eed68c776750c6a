"""One run's configuration: a dataclass, its command line, and every check that exits 2.

``parse_args(argv)`` is the only place that reads arguments. It builds the parser from the
dataclass fields (flag, type and help live next to the default), fills derived defaults
(``global_bsz`` = 64 x devices, the stream length, the topic prefix) and validates. A bad
configuration prints ONE line naming the problem and the fix and exits with status 2, before
any process or broker starts. ``Config.to_argv()`` gives the flags that reproduce a config,
which is how the launcher hands it to every rank.

Environment defaults: ``KAFKA_BOOTSTRAP`` (--bootstrap), ``HOSTS``, ``NNODES``, ``NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` (multi-node runs, as torchrun takes them). Other environment
inputs checked here: ``MPIEXEC`` (which mpiexec), ``TANSU_BIN`` (the embedded broker),
``SCADLES_DATA_DIR`` (where datasets are). A bad value of any of them is one line and exit
status 2, like a bad flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from scadles.buffer import POLICIES
from scadles.inject import INJECT_FROM, INJECT_WEIGHTS
from scadles.sources import SOURCES
from streamsim.cli import DefaultsHelpFormatter
from streamsim.plan import StreamPlan
from streamsim.schedule import ARRIVALS, listed_rates

REPO = Path(__file__).resolve().parents[1]

# Allowed values come from the modules that own them: above, and in validate() the
# compression modes (scadles.exchange) and adaptive signals (scadles.compress): both import
# torch, which importing this module must not. Declared here: the modes (train.py) and backends (comm.py) own
# them but import torch; no module lists the clocks or the rank starts.
MODES = ("scadles", "ddp")
BACKENDS = ("mpi", "gloo", "nccl")
CLOCKS = ("wall", "virtual")
RANK_STARTS = ("auto", "fork", "spawn")
REF_BSZ_PER_DEVICE = 64  # the paper's per-device batch: --global-bsz defaults to 64 x W
MEASURED_STEP_GUESS_S = 10.0  # virtual clock, measured compute: a CPU step may take this long


# --help groups the flags as Config does: each title starts at the field named, in order.
HELP_GROUPS = {"mode": "what is trained", "rates": "streams", "lr": "optimization",
               "clock": "time", "eval_steps": "evaluation, checkpoints, logs",
               "compression": "compression (scadles.compress)",
               "alpha": "data injection (scadles.inject)", "hosts": "where ranks run",
               "stream_start_s": "internal"}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the problem and the fix."""


def _opt(default, help: str, flag: str | None = None, env: str | None = None,
         hidden: bool = False, kind=None):
    """A config field: its default and how it appears on the command line."""
    return field(default=default, metadata=dict(help=help, flag=flag, env=env, hidden=hidden,
                                                 kind=kind))


@dataclass
class Config:
    # -- what is trained ------------------------------------------------------------------
    mode: str = _opt("scadles", "scadles (rate-proportional batches, weighted aggregation) "
                                "or ddp (fixed batch, waits for the slowest stream)")
    backend: str = _opt("gloo", "mpi | gloo | nccl")
    model_name: str = _opt("smallcnn", "resnet152 | vgg19 | resnet18 | smallcnn | smallcnn-bn "
                                       "| MODULE:CALLABLE (README: Extending)")
    dataset: str = _opt("fashion-mnist", "cifar10 | cifar100 | fashion-mnist | imagefolder "
                                         "| synthetic | MODULE:CALLABLE")
    data_dir: str | None = _opt(None, "where the dataset is (default: <repo>/data, and "
                                      "Debian's place for Fashion-MNIST)")
    download: bool = _opt(False, "download the dataset if it is missing")
    image_size: int = _opt(224, "side of imagefolder images after resizing")
    partition: str = _opt("iid", "iid | noniid | dirichlet:ALPHA")
    world_size: int = _opt(2, "number of ranks (processes); each simulates "
                              "--devices-per-rank devices, one stream each")
    devices_per_rank: int = _opt(1, "devices each rank simulates (scadles.devices): the run "
                                    "has --world-size x K devices, identical to as many "
                                    "ranks of one device; K > 1 needs --clock virtual")
    seed: int = _opt(0, "seed of the model, partition, rates and streams")
    # -- streams --------------------------------------------------------------------------
    rates: str = _opt("S10", "samples/s per device: a list ('10,20,40'), S1 | S2 | S10 | S20, "
                             "normal:MEAN,SD, uniform:LO,HI, piecewise 0:64,300:16, or a CSV")
    rate_schedule: str | None = _opt(None, "rates over time: constant | rotate:SEC | "
                                           "scale:T:F,T:F")
    arrivals: str = _opt("even", "even | poisson")
    duration_s: float | None = _opt(None, "stream length in seconds (default: enough for "
                                          "--max-steps / --max-stream-s)")
    source: str = _opt("kafka", "kafka (real broker) | inprocess (same streams, no broker)")
    bootstrap: str | None = _opt(None, "external Kafka HOST:PORT (default: $KAFKA_BOOTSTRAP, "
                                       "else an embedded broker is started)",
                                 env="KAFKA_BOOTSTRAP")
    topic_prefix: str | None = _opt(None, "device topics are PREFIX<rank> (default: trainer-, "
                                          "run-unique on an external broker)")
    kafka_config: str | None = _opt(None, "FILE of Kafka client settings, key=value per line "
                                          "(SASL/SSL, timeouts: streamsim.kafkaconfig), for "
                                          "every client (default: $KAFKA_CONFIG)",
                                    env="KAFKA_CONFIG")
    replication_factor: int = _opt(1, "replicas of each topic the run creates (an external "
                                      "cluster may want 3)")
    # -- optimization ---------------------------------------------------------------------
    lr: float = _opt(0.1, "base learning rate (for a global batch of --global-bsz)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(1e-4, "SGD weight decay")
    gamma: float = _opt(0.1, "learning-rate decay at each milestone")
    milestones: list = _opt(None, "comma-separated epochs (of samples trained by the whole "
                                  "group) where the learning rate decays", kind="floats")
    global_bsz: int | None = _opt(None, "reference global batch of --lr (default 64 x "
                                        "devices); scadles scales lr by B / this")
    train_bsz: int = _opt(64, "ddp: fixed batch per device")
    min_train_bsz: int = _opt(8, "scadles: smallest local batch a device waits for (b_min); "
                                 "0 lets a device with no data take part with weight 0")
    max_train_bsz: int = _opt(64, "scadles: largest local batch")
    window_s: float = _opt(1.0, "scadles: stream seconds between steps")
    step_when_full: bool = _opt(False, "scadles: a device whose buffer holds "
                                       "--max-train-bsz samples steps without waiting out "
                                       "the window (not in the paper)")
    warmup_epochs: float = _opt(0.1, "learning-rate warmup over this many epochs of samples "
                                     "trained by the whole group: a step after which s of "
                                     "them were trained uses min(1, s / warmup) of its lr, in "
                                     "both modes (0: none)")
    max_lr: float = _opt(0.1, "cap on the scaled learning rate (0: none); the default is the "
                              "largest lr the default model (smallcnn) trains at stably: "
                              "0.15 diverges at a global batch of 16k, 0.2 at 1.5k")
    policy: str = _opt("persistence", "persistence | truncation")
    buffer_capacity: int = _opt(10_000, "samples a device buffer holds; overflow drops the "
                                        "oldest")
    # -- time -----------------------------------------------------------------------------
    clock: str = _opt("wall", "wall (real time) | virtual (simulated stream time)")
    compute_model: str = _opt("measured", "compute seconds per step: measured | fixed:SEC | "
                                          "linear:A,B (A + B x batch); ';' between devices")
    comm_model: str = _opt("auto", "sync seconds per step on the virtual clock: measured | "
                                   "fixed:SEC | link:MBIT_PER_S[,LATENCY_S] | auto (measured "
                                   "with a measured compute model, else 0)")
    stream_delay_s: float = _opt(0.0, "wall clock: start the streams this many seconds after "
                                      "launch, so that the ranks are up before the first "
                                      "sample arrives (0: at launch)")
    max_steps: int = _opt(500, "stop after this many steps (0: no limit)")
    max_stream_s: float | None = _opt(None, "stop after this many stream seconds")
    # -- evaluation, checkpoints, logs ------------------------------------------------------
    eval_steps: int = _opt(50, "evaluate on the test split every N steps (0: only at the end)")
    eval_every_s: float = _opt(0.0, "also evaluate at the first step past every SEC of stream "
                                    "time (0: off): the same time resolution for modes whose "
                                    "steps differ in length")
    eval_samples: int = _opt(2000, "test samples per evaluation (0: the whole split)")
    checkpoint_every: int = _opt(0, "checkpoint every N steps (0: never)")
    resume: bool = _opt(False, "continue the run in --log-dir from its last checkpoint")
    log_dir: str | None = _opt(None, "where logs go (default: <repo>/logs/<run name>)")
    tensorboard: bool = _opt(False, "also write per-step scalars for TensorBoard under "
                                    "LOG_DIR/tb (needs the tensorboard package)")
    # -- compression (scadles.compress) -----------------------------------------------------
    compression: str = _opt("none", "none | static | adaptive")
    compressor: str = _opt("topk", "what --compression static/adaptive sends: topk | qsgd | "
                                   "identity | MODULE:CLASS")
    compression_ratio: float = _opt(0.01, "Top-k: fraction of gradient elements sent (given "
                                          "as ratio= to a compressor that takes it)")
    error_feedback: bool = _opt(True, "turn off error feedback (residuals)",
                                flag="--no-error-feedback")
    delta_threshold: float = _opt(0.3, "adaptive: compress when the signal is at most this")
    adaptive_signal: str = _opt("paper", "adaptive: paper | orig | gradnorm-change")
    ewma_alpha: float = _opt(0.1, "adaptive (paper signal): weight of the newest value in "
                                  "the EWMA")
    gradnorm_threshold: float = _opt(0.5, "adaptive (gradnorm-change): relative change of "
                                          "the gradient norm marking a critical region")
    gradnorm_interval: int = _opt(10, "adaptive (gradnorm-change): steps per interval")
    # -- data injection (scadles.inject) ----------------------------------------------------
    alpha: float = _opt(0.0, "injection: fraction of the other devices drawn from each step "
                             "(0: off)")
    beta: float = _opt(0.0, "injection: fraction of a chosen device's window taken")
    inject_from: str = _opt("devices", "injection source: devices | pool")
    pool_topic: str | None = _opt(None, "injection: the shared pool topic (--inject-from pool)")
    inject_weight: str = _opt("all", "injection: all (injected samples count in b_i, the "
                                     "paper's choice) | local (b_i = local samples only)")
    # -- where ranks run ------------------------------------------------------------------
    hosts: str | None = _opt(None, "multi-node: host1:4,host2:4 (ranks per host)", env="HOSTS")
    nnodes: int = _opt(1, "multi-node: number of nodes (each runs the launcher)", env="NNODES")
    node_rank: int = _opt(0, "multi-node: this node (0 starts the producer)", env="NODE_RANK")
    master_addr: str | None = _opt(None, "rendezvous address (rank 0's host)",
                                   env="MASTER_ADDR")
    master_port: int | None = _opt(None, "rendezvous port (default: a free one)",
                                   env="MASTER_PORT")
    rank_start: str = _opt("auto", "how a node's gloo/nccl ranks start: fork (from one "
                                   "process that imported torch and loaded the data once; "
                                   "CPU only), spawn (an interpreter each), auto (fork for "
                                   "gloo, spawn for nccl)")
    # -- internal: set by the launcher, or test hooks -----------------------------------------
    stream_start_s: float | None = _opt(None, "event time of stream second 0", hidden=True)
    run_id: str | None = _opt(None, "run identifier", hidden=True)
    fail_at_step: int = _opt(0, "test hook: rank --fail-rank dies at this step", hidden=True)
    fail_rank: int = _opt(-1, "test hook: the rank that dies (-1: the last)", hidden=True)
    rank_log: bool = _opt(False, "write this rank's stdout and stderr to LOG_DIR/rank-R.log "
                                 "(the launcher sets it)", hidden=True)

    # -- derived --------------------------------------------------------------------------
    @property
    def devices(self) -> int:
        """D = --world-size x --devices-per-rank: the simulated edge devices."""
        return self.world_size * self.devices_per_rank

    def device_view(self) -> "Config":
        """This run as one device per rank (D ranks of one device): what each simulated
        device trains with, so that it behaves exactly as its own process would."""
        return dataclasses.replace(self, world_size=self.devices, devices_per_rank=1)

    def stream_plan(self, stream_start_s: float | None = None) -> StreamPlan:
        """This run's streams (``streamsim.plan``): one per device (D of them), from
        --partition, --rates, --rate-schedule, --arrivals, --seed and --duration-s, starting
        at ``stream_start_s`` (default: this config's, None while not fixed yet)."""
        start = self.stream_start_s if stream_start_s is None else stream_start_s
        return StreamPlan(devices=self.devices, rates=self.rates, partition=self.partition,
                          rate_schedule=self.rate_schedule, arrivals=self.arrivals,
                          seed=self.seed, stream_start_s=start, duration_s=self.duration_s)

    @property
    def ref_global_bsz(self) -> int:
        return self.global_bsz or REF_BSZ_PER_DEVICE * self.devices

    @property
    def pool_rate_per_s(self) -> float:
        """The injection pool's rate (--inject-from pool), enough for every device's share:
        the largest local batch per window."""
        return self.max_train_bsz / self.window_s

    @property
    def host_slots(self) -> list[tuple[str, int]]:
        """[(host, ranks)] from --hosts, else equal shares over --nnodes local nodes."""
        if self.hosts:
            return _parse_hosts(self.hosts)
        per_node = self.world_size // max(1, self.nnodes)
        return [(f"node{i}", per_node) for i in range(self.nnodes)]

    @property
    def num_nodes(self) -> int:
        return len(self.host_slots)

    @property
    def single_machine(self) -> bool:
        """Every rank runs on this machine (no HOSTS, one node): servers bind loopback."""
        return not self.hosts and self.nnodes == 1

    def local_ranks(self) -> range:
        """The global ranks this node runs."""
        slots = self.host_slots
        first = sum(n for _, n in slots[:self.node_rank])
        return range(first, first + slots[self.node_rank][1])

    def to_argv(self) -> list[str]:
        """Flags that reproduce this config exactly (what the launcher gives each rank)."""
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                if value != f.default:
                    argv.append(flag)
            elif value is not None and value != []:
                if f.metadata["kind"] == "floats":
                    value = ",".join(_num(v) for v in value)
                argv += [flag, _num(value) if isinstance(value, float) else str(value)]
        return argv

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def _parse_floats(text: str) -> list[float]:
    return [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]


def _parse_hosts(text: str) -> list[tuple[str, int]]:
    slots = []
    for item in text.split(","):
        host, sep, count = item.strip().rpartition(":")
        if not sep or not host or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--hosts {text!r}: {item!r} is not HOST:RANKS; write it like "
                              f"host1:4,host2:4")
        slots.append((host, int(count)))
    return slots


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str):
    """Print ONE line naming the problem and the fix; exit with status 2."""
    print(f"config error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_parser(prog: str = "python -m scadles.launch") -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description="ScaDLES: distributed training on "
                                                   "streaming data (scadles or ddp mode).",
                            formatter_class=DefaultsHelpFormatter)
    group = parser
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if f.name in HELP_GROUPS:
            group = parser.add_argument_group(HELP_GROUPS[f.name])
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        help_text = argparse.SUPPRESS if meta["hidden"] else meta["help"]
        if f.type in ("bool", bool):
            action = "store_false" if f.default else "store_true"
            group.add_argument(flag, dest=f.name, action=action, help=help_text)
            continue
        kind = meta["kind"]
        annotation = str(f.type)
        if kind == "floats":
            typ = str
        elif annotation.startswith("int"):
            typ = int
        elif annotation.startswith("float"):
            typ = float
        else:
            typ = str
        default = f.default
        if meta["env"] and os.environ.get(meta["env"], "") != "":
            default = os.environ[meta["env"]]
            if typ is int and not re.fullmatch(r"-?\d+", default.strip()):
                fail(f"environment variable {meta['env']}={default!r} is not an integer; "
                     f"set it to a number or unset it")
            default = typ(default)
        group.add_argument(flag, dest=f.name, type=typ, default=default,
                           metavar=f.name.upper(), help=help_text)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "python -m scadles.launch",
               check_environment: bool = True) -> Config:
    """Parse, fill derived defaults and validate; exits 2 with one line on a bad config."""
    args = build_parser(prog).parse_args(argv)
    values = vars(args)
    if isinstance(values.get("milestones"), str):
        try:
            values["milestones"] = _parse_floats(values["milestones"])
        except ValueError:
            fail(f"--milestones {values['milestones']!r}: give epochs as numbers, e.g. "
                 f"--milestones 75,150,225")
    if values.get("milestones") is None:
        values["milestones"] = []
    cfg = Config(**values)
    try:
        validate(cfg, check_environment=check_environment)
        resolve(cfg)
    except ConfigError as e:
        fail(str(e))
    return cfg


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _one_of(name: str, value, choices, fix: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; use one of {', '.join(choices)}"
                          + (f" ({fix})" if fix else ""))


def find_mpiexec() -> str | None:
    """The mpiexec of the MPI mpi4py was built against (next to this Python), else PATH's;
    ``$MPIEXEC`` overrides both."""
    override = os.environ.get("MPIEXEC")
    if override:
        return override if shutil.which(override) else None
    here = Path(sys.executable).parent / "mpiexec"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("mpiexec")


def validate(cfg: Config, check_environment: bool = True) -> None:
    """Raise ConfigError naming the first problem found and how to fix it."""
    _validate_addresses(cfg)
    _one_of("--mode", cfg.mode, MODES)
    _one_of("--backend", cfg.backend, BACKENDS)
    _one_of("--policy", cfg.policy, POLICIES)
    _one_of("--clock", cfg.clock, CLOCKS)
    _one_of("--source", cfg.source, SOURCES)
    _one_of("--arrivals", cfg.arrivals, ARRIVALS)
    _one_of("--inject-from", cfg.inject_from, INJECT_FROM)
    _one_of("--inject-weight", cfg.inject_weight, INJECT_WEIGHTS)
    _one_of("--rank-start", cfg.rank_start, RANK_STARTS)
    if cfg.rank_start == "fork" and cfg.backend == "nccl":
        raise ConfigError("--rank-start fork cannot start nccl ranks (a CUDA context does not "
                          "survive a fork): use --rank-start spawn or auto")

    from scadles.compress.adaptive import SIGNALS as ADAPTIVE_SIGNALS
    from scadles.exchange.settings import MODES as COMPRESSIONS

    _one_of("--compression", cfg.compression, COMPRESSIONS)
    _one_of("--adaptive-signal", cfg.adaptive_signal, ADAPTIVE_SIGNALS)
    _validate_plugins(cfg, check_environment)
    if not re.fullmatch(r"iid|noniid|dirichlet:\d*\.?\d+(e-?\d+)?", cfg.partition) \
            or (cfg.partition.startswith("dirichlet:") and not float(cfg.partition[10:]) > 0):
        raise ConfigError(f"unknown --partition {cfg.partition!r}; use iid, noniid or "
                          f"dirichlet:ALPHA with ALPHA > 0")

    if cfg.kafka_config:
        from streamsim.kafkaconfig import load_client_config

        try:
            load_client_config(cfg.kafka_config)
        except ValueError as e:
            raise ConfigError(f"{e} (KAFKA_CONFIG / --kafka-config)") from None
        if cfg.source == "kafka" and not cfg.bootstrap:
            raise ConfigError(f"--kafka-config/KAFKA_CONFIG {cfg.kafka_config} is for an "
                              f"external Kafka, but none is given: set KAFKA_BOOTSTRAP "
                              f"(--bootstrap), or unset KAFKA_CONFIG for the embedded broker "
                              f"(plain connections on loopback)")
    positive_ints = dict(world_size=cfg.world_size, devices_per_rank=cfg.devices_per_rank,
                         train_bsz=cfg.train_bsz,
                         replication_factor=cfg.replication_factor,
                         max_train_bsz=cfg.max_train_bsz, buffer_capacity=cfg.buffer_capacity,
                         image_size=cfg.image_size)
    if cfg.global_bsz is not None:
        positive_ints["global_bsz"] = cfg.global_bsz
    for name, value in positive_ints.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    non_negative = dict(min_train_bsz=cfg.min_train_bsz, max_steps=cfg.max_steps,
                        eval_steps=cfg.eval_steps, eval_samples=cfg.eval_samples,
                        checkpoint_every=cfg.checkpoint_every, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, fail_at_step=cfg.fail_at_step,
                        warmup_epochs=cfg.warmup_epochs, max_lr=cfg.max_lr,
                        eval_every_s=cfg.eval_every_s)
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be >= 0")
    if cfg.min_train_bsz > cfg.max_train_bsz:
        raise ConfigError(f"--min-train-bsz {cfg.min_train_bsz} > --max-train-bsz "
                          f"{cfg.max_train_bsz}: the smallest batch cannot exceed the largest")
    batch_needed = cfg.train_bsz if cfg.mode == "ddp" else cfg.min_train_bsz
    if batch_needed > cfg.buffer_capacity:
        raise ConfigError(f"a batch of {batch_needed} cannot form in a buffer of "
                          f"{cfg.buffer_capacity}: raise --buffer-capacity")
    for name in ("lr", "window_s", "gamma"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    for name in ("duration_s", "max_stream_s"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be > 0 seconds")
    if cfg.max_steps == 0 and cfg.max_stream_s is None and cfg.duration_s is None:
        raise ConfigError("no end: --max-steps 0 needs --max-stream-s or --duration-s")
    if any(m < 0 for m in cfg.milestones) or cfg.milestones != sorted(cfg.milestones):
        raise ConfigError(f"--milestones {cfg.milestones}: epochs must be >= 0 and increasing")
    if not 0 < cfg.compression_ratio <= 1:
        raise ConfigError(f"--compression-ratio {cfg.compression_ratio}: must be in (0, 1]")
    if cfg.delta_threshold < 0 or cfg.gradnorm_threshold < 0:
        raise ConfigError("--delta-threshold and --gradnorm-threshold must be >= 0")
    if not 0 < cfg.ewma_alpha <= 1:
        raise ConfigError(f"--ewma-alpha {cfg.ewma_alpha}: must be in (0, 1]")
    if cfg.gradnorm_interval < 1:
        raise ConfigError(f"--gradnorm-interval {cfg.gradnorm_interval}: must be >= 1")
    for name in ("alpha", "beta"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be in [0, 1]")
    if cfg.inject_from == "pool" and cfg.alpha > 0 and not cfg.pool_topic:
        raise ConfigError("--inject-from pool needs --pool-topic TOPIC")

    from scadles.clock import CommModel, ComputeModel

    try:
        compute = ComputeModel(cfg.compute_model)
    except ValueError as e:
        raise ConfigError(f"bad --compute-model: {e}") from None
    if cfg.stream_delay_s < 0 or not math.isfinite(cfg.stream_delay_s):
        raise ConfigError(f"--stream-delay-s {cfg.stream_delay_s}: must be >= 0 seconds")
    if cfg.stream_delay_s and cfg.clock != "wall":
        raise ConfigError("--stream-delay-s delays a real-time stream: it needs --clock wall "
                          "(a virtual clock waits for the ranks anyway)")
    if compute.deterministic and cfg.clock == "wall":
        raise ConfigError(f"--compute-model {cfg.compute_model} models time on a virtual "
                          f"clock only: add --clock virtual or use --compute-model measured")
    try:
        CommModel(cfg.comm_model)
    except ValueError as e:
        raise ConfigError(f"bad --comm-model: {e}") from None

    listed = listed_rates(cfg.rates)
    if listed is not None:
        if len(listed) != cfg.devices:
            raise ConfigError(f"--rates lists {len(listed)} rate(s) for {cfg.devices} "
                              f"device(s) (--world-size x --devices-per-rank): give one rate "
                              f"per device or change --world-size")
        if min(float(v) for v in listed) <= 0:
            raise ConfigError(f"--rates {cfg.rates!r}: every rate must be > 0 samples/s")
    try:
        cfg.stream_plan()
    except ValueError as e:
        raise ConfigError(f"bad --rates/--rate-schedule: {e}") from None
    if cfg.devices_per_rank > 1 and cfg.clock != "virtual":
        raise ConfigError(f"--devices-per-rank {cfg.devices_per_rank} simulates devices in "
                          f"turn, which real time cannot: add --clock virtual, or use "
                          f"--devices-per-rank 1 (one process per device) on the wall clock")

    _validate_placement(cfg)
    if cfg.resume:
        from scadles import checkpoint

        if not cfg.log_dir or checkpoint.latest(cfg.log_dir) is None:
            raise ConfigError(f"--resume: no checkpoint in --log-dir {cfg.log_dir}: give the "
                              f"log dir of a run that had --checkpoint-every set")
    if check_environment:
        _validate_environment(cfg)


def _validate_plugins(cfg: Config, check_environment: bool) -> None:
    """--dataset, --model-name, --compressor: a built-in name, or MODULE:NAME imported and
    tried here (streamsim.plugins), so a broken plug-in is one line before anything starts.
    With ``check_environment``, a plug-in dataset is loaded and a plug-in model built."""
    from scadles.compress import COMPRESSORS, check_compressor
    from scadles.models import MODELS, build_model, model_builder
    from streamsim.datasets import DATASETS, DatasetError, dataset_loader, load_dataset
    from streamsim.plugins import PluginError, is_import_path

    for flag, value, names in (("--dataset", cfg.dataset, DATASETS),
                               ("--model-name", cfg.model_name, MODELS),
                               ("--compressor", cfg.compressor, COMPRESSORS)):
        if not is_import_path(value):
            _one_of(flag, value, list(names), fix="or MODULE:NAME from PYTHONPATH")
    try:
        dataset_loader(cfg.dataset)
        model_builder(cfg.model_name)
        if is_import_path(cfg.compressor):
            check_compressor(cfg.compressor, cfg.compression_ratio)
        if check_environment and (is_import_path(cfg.dataset) or is_import_path(cfg.model_name)):
            splits = ("train", "test") if is_import_path(cfg.dataset) else ("train",)
            try:
                train, *_ = [load_dataset(cfg.dataset, split, cfg.data_dir, cfg.download,
                                          cfg.image_size, cfg.seed) for split in splits]
            except DatasetError:
                return  # missing data: reported where it is loaded, as for the built-ins
            channels, height, _ = train.sample_shape
            build_model(cfg.model_name, train.num_classes, channels, height, cfg.seed)
    except PluginError as e:
        raise ConfigError(str(e)) from None


def _validate_addresses(cfg: Config) -> None:
    """The broker and rendezvous addresses, from flags or the environment."""
    from streamsim.broker import parse_addresses

    if cfg.bootstrap is not None:
        try:
            parse_addresses(cfg.bootstrap)
        except ValueError:
            raise ConfigError(f"--bootstrap/KAFKA_BOOTSTRAP {cfg.bootstrap!r} is not "
                              f"HOST:PORT: give the broker's port too, e.g. "
                              f"KAFKA_BOOTSTRAP=127.0.0.1:9092 (a comma list for several), "
                              f"or unset it to start an embedded broker") from None
    if cfg.master_addr is not None:
        addr = cfg.master_addr.strip()
        if not addr or re.search(r"\s", addr):
            raise ConfigError(f"--master-addr/MASTER_ADDR {cfg.master_addr!r} is not a host "
                              f"name: set it to rank 0's host, e.g. MASTER_ADDR=10.0.0.1")
        if ":" in addr and not _is_ipv6(addr):
            raise ConfigError(f"--master-addr/MASTER_ADDR {cfg.master_addr!r} holds a port: "
                              f"set MASTER_ADDR to the host only and MASTER_PORT to the port")
    if cfg.master_port is not None and not 0 < cfg.master_port < 65536:
        raise ConfigError(f"--master-port/MASTER_PORT {cfg.master_port}: must be a port "
                          f"number in 1..65535")


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(text.strip("[]")).version == 6
    except ValueError:
        return False


def _validate_placement(cfg: Config) -> None:
    if cfg.nnodes < 1:
        raise ConfigError(f"--nnodes/NNODES {cfg.nnodes}: must be >= 1")
    if cfg.hosts:
        slots = _parse_hosts(cfg.hosts)
        total = sum(n for _, n in slots)
        if total != cfg.world_size:
            raise ConfigError(f"--hosts/HOSTS {cfg.hosts!r} has {total} slot(s) for world size "
                              f"{cfg.world_size}: make the counts add up to --world-size")
        if cfg.nnodes not in (1, len(slots)):
            raise ConfigError(f"NNODES={cfg.nnodes} but HOSTS lists {len(slots)} host(s): "
                              f"unset NNODES or make them agree")
    elif cfg.world_size % cfg.nnodes:
        raise ConfigError(f"world size {cfg.world_size} does not split evenly over "
                          f"{cfg.nnodes} nodes: set HOSTS=host1:N,host2:M")
    nodes = len(_parse_hosts(cfg.hosts)) if cfg.hosts else cfg.nnodes
    if not 0 <= cfg.node_rank < nodes:
        raise ConfigError(f"--node-rank/NODE_RANK {cfg.node_rank}: must be in [0, {nodes})")
    if nodes > 1 and cfg.source == "kafka" and not cfg.bootstrap:
        raise ConfigError("a multi-node run needs an external broker every node reaches: set "
                          "KAFKA_BOOTSTRAP=HOST:PORT (or --bootstrap)")
    if nodes > 1 and cfg.source == "inprocess":
        pass  # each rank generates its own stream: fine on any node
    if nodes > 1 and cfg.backend != "mpi" and not cfg.master_port:
        raise ConfigError("a multi-node gloo/nccl run needs MASTER_ADDR and MASTER_PORT "
                          "(rank 0's host and a free port), the same on every node")


def _validate_environment(cfg: Config) -> None:
    """Checks of this machine: the MPI launcher, the broker binary, the data folder, GPUs."""
    if cfg.backend == "mpi" and find_mpiexec() is None:
        if os.environ.get("MPIEXEC"):
            raise ConfigError(f"MPIEXEC={os.environ['MPIEXEC']!r} is not an executable "
                              f"mpiexec: fix the path or unset MPIEXEC to use the venv's")
        raise ConfigError("--backend mpi needs mpiexec and none was found: install the venv "
                          "(make venv: mpich) or use --backend gloo")
    if cfg.source == "kafka" and not cfg.bootstrap and cfg.node_rank == 0:
        from streamsim.broker import BrokerError, find_tansu

        try:
            find_tansu()
        except BrokerError as e:
            raise ConfigError(f"no embedded broker to start: {e}; or set "
                              f"KAFKA_BOOTSTRAP=HOST:PORT to use a running Kafka") from None
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package, which is not "
                          "installed: make venv (requirements.txt pins it), or drop "
                          "--tensorboard")
    data_env = os.environ.get("SCADLES_DATA_DIR")
    if data_env and not cfg.data_dir and not Path(data_env).is_dir():
        raise ConfigError(f"SCADLES_DATA_DIR={data_env!r} is not a directory: point it at "
                          f"the data folder, or unset it (default <repo>/data)")
    if cfg.backend == "nccl":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need = max(n for _, n in cfg.host_slots) if cfg.hosts or cfg.nnodes > 1 \
            else cfg.world_size
        if gpus == 0:
            raise ConfigError("--backend nccl needs CUDA GPUs and none is visible: use "
                              "--backend gloo or mpi on CPU machines")
        if gpus < need:
            raise ConfigError(f"--backend nccl runs one rank per GPU: {need} rank(s) on this "
                              f"node but {gpus} GPU(s) visible; lower --world-size or use gloo")


# --------------------------------------------------------------------------------------------
# Derived defaults
# --------------------------------------------------------------------------------------------

def resolve(cfg: Config) -> None:
    """Fill the defaults that depend on other settings (in place)."""
    if cfg.global_bsz is None:
        cfg.global_bsz = REF_BSZ_PER_DEVICE * cfg.devices
    if cfg.duration_s is None:
        cfg.duration_s = default_duration_s(cfg)
    if cfg.run_id is None:
        cfg.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if cfg.log_dir is None:
        model = cfg.model_name.replace(":", ".")  # a plug-in's module:callable
        cfg.log_dir = str(REPO / "logs" / f"{model}-{cfg.mode}-{cfg.run_id}")
    cfg.log_dir = str(Path(cfg.log_dir).resolve())
    if cfg.kafka_config:  # every process reads it, and the launcher starts them in <repo>
        cfg.kafka_config = str(Path(cfg.kafka_config).resolve())
    if cfg.topic_prefix is None:
        # A private embedded broker holds only this run; an external one is shared.
        cfg.topic_prefix = f"trainer-{cfg.run_id}-" if cfg.bootstrap else "trainer-"


def default_duration_s(cfg: Config) -> float:
    """A stream long enough for the run to reach --max-steps (or --max-stream-s).

    A scadles step spans at least --window-s of stream time and the time the slowest stream
    takes to deliver --min-train-bsz samples; a ddp step at least the time
    the slowest stream takes to deliver --train-bsz samples; a modelled compute time may be
    longer, and a measured one on a virtual clock is guessed at up to 10 s. Half again as
    much plus 10 s covers the rest (slower steps need --duration-s). On a wall clock a long
    stream costs nothing: the producer is stopped when training ends.
    """
    if cfg.max_stream_s is not None:
        return math.ceil(cfg.max_stream_s + 2 * cfg.window_s + 5)
    from scadles.clock import ComputeModel

    schedules = cfg.stream_plan().schedules
    slowest = min(min(r for _, r in s.segments) for s in schedules) or 1.0
    # scadles also waits for --min-train-bsz samples from the slowest stream.
    step_s = (max(cfg.window_s, cfg.min_train_bsz / slowest) if cfg.mode == "scadles"
              else cfg.train_bsz / slowest)
    compute = ComputeModel(cfg.compute_model)
    if compute.deterministic:
        bsz = cfg.max_train_bsz if cfg.mode == "scadles" else cfg.train_bsz
        step_s = max(step_s, max(compute.seconds(0.0, bsz, r) for r in range(cfg.devices)))
    elif cfg.clock == "virtual":
        step_s = max(step_s, MEASURED_STEP_GUESS_S)
    return float(math.ceil(1.5 * cfg.max_steps * step_s + 10))
