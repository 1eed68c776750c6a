"""The training loop of one rank (``python -m scadles.train``, started by ``scadles.launch``).

Each rank is one edge device (or, with ``--devices-per-rank K``, K of them, each running this
loop in a thread of its own as if it were a rank: ``scadles.devices``): it consumes its own
stream into a buffer and trains synchronously with the others. One loop, two modes:

- ``scadles``: every ``--window-s`` of stream time a device trains on what its buffer holds
  (b_i samples, between ``--min-train-bsz`` and ``--max-train-bsz``); the global batch
  B = sum b_i; each device's mean gradient is weighted by b_i / B, so the update is the
  gradient of the mean loss over all the samples trained; lr = base lr x B / --global-bsz.
- ``ddp``: the baseline; every device waits for a fixed --train-bsz samples, equal weights
  1 / W, base lr.

Both: SGD with momentum and weight decay, the learning rate decaying by --gamma at
--milestones epochs of samples trained by the whole group (the same on every rank).

Time: on a virtual clock a step costs its compute time (measured or modelled) plus its sync
time plus the wait for data; after each step every rank's clock moves to the group's
latest, so in ddp mode the slowest stream sets the pace. Evaluation does not move stream time.

Stops are agreed: every reason to stop (--max-steps, --max-stream-s, the streams ending,
SIGINT) is decided on numbers the ranks have exchanged in the same collective, so every rank
leaves the loop after the same step, on either clock. After SIGINT the run ends with the
summary so far (``stop_reason`` "interrupted"); a second SIGINT stops the rank at once.

Failures: a known one (the broker gone, a stalled stream, missing data) is one line
``rank R FAILED: ...`` on stderr and exit status 3; anything else leaves its traceback and
exit status 1. Under the launcher, stdout and stderr go to ``LOG_DIR/rank-R.log``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from scadles import checkpoint, metrics
from scadles.aggregate import aggregation_weight, multistep_factor, step_lr
from scadles.buffer import StreamBuffer, StreamStalled
from scadles.clock import CommModel, ComputeModel, VirtualClock, WallClock
from scadles.comm import env_rank, make_comm, share_cpu_threads
from scadles.config import Config, parse_args
from scadles.devices import devices_in_process, exclusive, run_devices
from scadles.exchange import ExchangeSettings, make_exchanger
from scadles.models import build_model
from scadles.optim import SGD
from scadles.sources import (InProcessSource, KafkaSource, SharedConsumer, SourceError,
                             sources_factory)
from streamsim import logsetup
from streamsim.broker import BrokerUnreachable
from streamsim.datasets import DatasetError, load_dataset
from streamsim.kafkaconfig import load_client_config
from streamsim.plan import StreamPlan, default_stream_start_s
from streamsim.plugins import PluginError

FAIL_EXIT = 17  # exit status of the --fail-at-step test hook
KNOWN_FAILURE_EXIT = 3  # a failure with a one-line cause (FAILED_MARK)
FAILED_MARK = "FAILED: "  # "rank R FAILED: <cause>": the line the launcher reports
KNOWN_FAILURES = (BrokerUnreachable, StreamStalled, SourceError, DatasetError, PluginError)
EVAL_BATCH = 500


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------

def agree_run_info(comm, cfg: Config) -> dict:
    """Rank 0's topic prefix, stream start and run id, on every rank (ranks on other nodes
    were started by another launcher)."""
    info = {"topic_prefix": cfg.topic_prefix, "run_id": cfg.run_id,
            "stream_start_s": cfg.stream_start_s}
    if info["stream_start_s"] is None:
        info["stream_start_s"] = default_stream_start_s(virtual=cfg.clock == "virtual")
    data = json.dumps(info).encode() if comm.rank == 0 else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=comm.device)
    comm.broadcast_(length, src=0)
    buf = torch.zeros(int(length.item()), dtype=torch.uint8, device=comm.device)
    if comm.rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    comm.broadcast_(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


_STREAMS: dict[tuple, list] = {}  # device_streams, built once per process
_STREAMS_LOCK = threading.Lock()


def device_streams(plan: StreamPlan, train_set):
    """Every device's stream of ``plan``, exactly as the producer builds it (for in-process
    sources). Built once per process: streams are stateless (every iteration starts
    afresh), so the devices a rank simulates (``--devices-per-rank``) share them."""
    key = (id(train_set), plan)
    with _STREAMS_LOCK:
        if key not in _STREAMS:
            _STREAMS[key] = plan.streams(train_set)
        return _STREAMS[key]


def open_source(cfg: Config, plan: StreamPlan, info: dict, device: int, train_set, start,
                streams=None, group: str | None = None, share: int = 1):
    """The source of device ``device``'s stream: its Kafka topic or the in-process twin of
    ``plan``'s stream (``streams``: ``device_streams``; ``share``: devices in this process,
    which split the in-process sources' read-ahead)."""
    if cfg.source == "inprocess":
        return InProcessSource(streams[device], train_set, plan.stream_start_s,
                               plan.duration_s, start=start if isinstance(start, int) else 0,
                               chunk_bytes=InProcessSource.CHUNK_BYTES // max(1, share))
    prefix = info["topic_prefix"]
    settings = load_client_config(cfg.kafka_config)
    shared = None
    if share > 1:  # the process's devices read their topics through one consumer
        first = device - device % share
        shared = SharedConsumer.of_process(
            cfg.bootstrap, group or f"{prefix}trainer-{first}-{first + share - 1}", settings)
    return KafkaSource(cfg.bootstrap, f"{prefix}{device}",
                       group or f"{prefix}trainer-{device}", device,
                       num_classes=train_set.num_classes, sample_shape=train_set.sample_shape,
                       start=start, consumer_settings=settings, shared=shared)


def make_injector(cfg: Config, rank: int, info: dict, plan: StreamPlan, train_set, streams):
    """The data injector (``scadles.inject``) of this device, or None when it is off."""
    if cfg.alpha <= 0:
        return None
    from scadles import inject

    factory = sources_factory(cfg, rank, train_set, plan, streams,
                              topic_prefix=info["topic_prefix"])
    return inject.make_injector(cfg, rank, factory)


def to_tensors(batch, mean: torch.Tensor, std: torch.Tensor, device: torch.device):
    """uint8 images -> normalized float tensors on ``device``, and int64 labels."""
    x = torch.from_numpy(batch.images).to(device, non_blocking=True).float().div_(255)
    x = (x - mean) / std
    y = torch.from_numpy(batch.labels).to(device, non_blocking=True)
    return x, y


def average_buffers_(model: torch.nn.Module, comm) -> None:
    """Average the floating-point buffers (batch-norm running statistics) over the ranks.

    Each rank's running statistics follow its own stream; the evaluated (and checkpointed)
    model uses their average, identical on every rank. Training (batch statistics) is not
    affected."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers or comm.world_size == 1:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    comm.allreduce_(flat, op="sum").div_(comm.world_size)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


@torch.no_grad()
def evaluate(model, comm, test_set, eval_idx: np.ndarray, mean, std, device) -> dict:
    """Loss, top-1 and top-5 (percent) on ``eval_idx``, sharded over the ranks and summed."""
    average_buffers_(model, comm)
    model.eval()
    mine = eval_idx[comm.rank::comm.world_size]
    k = min(5, test_set.num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for start in range(0, len(mine), EVAL_BATCH):
        idx = mine[start:start + EVAL_BATCH]
        x = torch.from_numpy(test_set.batch_pixels(idx)).to(device).float().div_(255)
        x = (x - mean) / std
        y = torch.from_numpy(test_set.labels[idx]).to(device)
        logits = model(x)
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(y[:, None])
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(len(idx)), dtype=torch.float64,
                                            device=device)])
    comm.allreduce_(totals, op="sum")
    loss, top1, top5, count = totals.tolist()
    model.train()
    count = max(count, 1.0)
    return {"samples": int(count), "loss": loss / count, "top1": 100.0 * top1 / count,
            "top5": 100.0 * top5 / count}


def label_hist(labels: np.ndarray) -> dict[str, int]:
    """Samples per label, as JSON keeps it: {"3": 12, "7": 4} (labels absent: not listed)."""
    values, counts = np.unique(labels, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def gather_json(comm, obj, decode: bool = True) -> list:
    """Every rank's JSON-able ``obj``, indexed by rank (one allgather of their bytes);
    ``decode=False``: take part, return [] (decoding D objects on each of D simulated
    devices would cost D squared)."""
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    gathered = comm.allgather_varlen(data.to(comm.device))
    if not decode:
        return []
    return [json.loads(t.cpu().numpy().tobytes().decode()) for t in gathered]


def device_summary(comm, plan: StreamPlan, stream_s: float, samples_trained: int,
                   buffer_stats: dict, steps: int, injection: dict | None) -> list[dict]:
    """Per device, over the whole run (a resumed run included): the mean stream rate over
    the run's ``stream_s`` stream seconds (``plan``'s schedule), samples trained from its
    own stream, mean local batch, injected, dropped, truncated and duplicate records, the
    peak buffer and malformed records (total and per kind), gathered from every rank; on
    rank 0 (the one that writes the summary), [] on the others."""
    malformed = buffer_stats["malformed"]
    mine = {"samples_trained": int(samples_trained),
            "injected": int((injection or {}).get("injected", 0)),
            "dropped": int(buffer_stats["dropped"]), "truncated": int(buffer_stats["truncated"]),
            "duplicates": int(buffer_stats["duplicates"]),
            "peak_buffer": int(buffer_stats["peak_buffer_len"]),
            "malformed": int(sum(malformed.values())),
            "malformed_by_kind": {k: int(n) for k, n in sorted(malformed.items())}}
    gathered = gather_json(comm, mine, decode=comm.rank == 0)
    if not gathered:
        return []
    rates = plan.mean_rates(stream_s)
    rows = []
    for device, row in enumerate(gathered):
        rows.append({"device": device, "rate_per_s": rates[device], **row,
                     "mean_local_bsz": row["samples_trained"] / steps if steps else 0.0})
    return rows


def agree(comm, values: list[float], op: str = "sum") -> list[float]:
    """One small allreduce of a few numbers."""
    t = torch.tensor(values, dtype=torch.float64, device=comm.device)
    return comm.allreduce_(t, op=op).tolist()


class StopRequest:
    """Set by SIGINT (the launcher forwards the user's Ctrl-C): the rank asks the group to
    stop after the current step. A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopRequest":
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train(cfg: Config, comm, display=None, stop_requested: StopRequest | None = None) -> dict:
    """Run the loop; returns the run summary. ``display``: where rank 0's progress and
    summary go (default stdout); ``stop_requested``: the SIGINT flag (default: never)."""
    wall_start = time.time()
    rank, world_size, device = comm.rank, comm.world_size, comm.device
    if world_size != cfg.world_size:
        raise RuntimeError(f"rank {rank} sees a world of {world_size} rank(s) but --world-size "
                           f"is {cfg.world_size}: start the ranks with python -m scadles.launch")
    stop_requested = stop_requested or StopRequest()
    display = display or sys.stdout
    share_cpu_threads(comm)
    info = agree_run_info(comm, cfg)
    stream_start_s = info["stream_start_s"]
    plan = cfg.stream_plan(stream_start_s)
    progress = metrics.Progress(enabled=rank == 0, max_steps=cfg.max_steps, stream=display)

    # Data: the training split for shapes and statistics (and in-process streams), the test
    # split for evaluation.
    train_set = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.download, cfg.image_size,
                             cfg.seed)
    test_set = load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.download, cfg.image_size,
                            cfg.seed)
    channels, height, _ = train_set.sample_shape
    mean = torch.tensor(train_set.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(train_set.std, device=device).view(1, -1, 1, 1)
    eval_rng = np.random.default_rng([cfg.seed, 0xE7A1])
    eval_count = len(test_set) if cfg.eval_samples == 0 else min(cfg.eval_samples,
                                                                   len(test_set))
    eval_idx = np.sort(eval_rng.permutation(len(test_set))[:eval_count])
    epoch_samples = len(train_set)

    # Model, optimizer, gradient exchange: identical on every rank (same seed).
    with exclusive(comm):  # simulated devices (--devices-per-rank) take turns here
        model = build_model(cfg.model_name, train_set.num_classes, channels, height,
                            seed=cfg.seed).to(device)
        torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout etc. differ across ranks
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dense_bytes = sum(p.numel() * p.element_size() for _, p in named_params)
    for _, p in named_params:
        p.grad = torch.zeros_like(p)  # an empty batch contributes zero gradients
    optimizer = SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay)
    exchanger = make_exchanger(comm, ExchangeSettings.from_config(cfg))

    # Time.
    clock = VirtualClock(start_s=stream_start_s) if cfg.clock == "virtual" else WallClock()
    compute_model = ComputeModel(cfg.compute_model)
    comm_model = CommModel(cfg.comm_model).for_compute(compute_model)

    # Where the run starts: from scratch, or from the latest checkpoint.
    step, samples_global, best_top1, last_eval = 0, 0, None, None
    samples_trained = 0  # from this device's own stream, over the whole run
    last_step_s = stream_start_s
    start_offset: str | int = "beginning"
    rank_state = None
    if cfg.resume:
        shared, rank_state = checkpoint.load(cfg.log_dir, rank, map_location=device)
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
        step, samples_global = shared["step"], shared["samples_global"]
        best_top1, last_eval = shared["best_top1"], shared["last_eval"]
        clock.advance_to(shared["clock_s"])
        last_step_s = rank_state["last_step_s"]
        start_offset = rank_state["offset"]
        exchanger.load_state_dict(rank_state["exchanger"])
        with exclusive(comm):
            checkpoint.set_rng_state(rank_state["rng"])
        samples_trained = rank_state.get("samples_trained", 0)
        progress.note(f"resuming at step {step} (stream time "
                      f"{shared['clock_s'] - stream_start_s:.1f} s) from {cfg.log_dir}")
    rows = metrics.RankLog(cfg.log_dir, rank, resume_step=step if cfg.resume else None,
                           tensorboard=cfg.tensorboard)

    streams = device_streams(plan, train_set) if cfg.source == "inprocess" else None
    buffer = StreamBuffer(open_source(cfg, plan, info, rank, train_set, start_offset, streams,
                                      share=devices_in_process(comm)),
                          cfg.policy, cfg.buffer_capacity, cfg.window_s,
                          stop_requested=stop_requested)
    if rank_state is not None and "buffer" in rank_state:
        buffer.load_state_dict(rank_state["buffer"])
    injector = make_injector(cfg, rank, info, plan, train_set, streams)
    if injector is not None and rank_state is not None and "injector" in rank_state:
        injector.load_state_dict(rank_state["injector"])

    def run_eval() -> dict:
        nonlocal best_top1, last_eval
        result = evaluate(model, comm, test_set, eval_idx, mean, std, device)
        last_eval = {"kind": "eval", "step": step,
                     "clock_s": round(clock.now() - stream_start_s, 6), **result}
        rows.write(last_eval)
        best_top1 = result["top1"] if best_top1 is None else max(best_top1, result["top1"])
        progress.note(f"eval step {step}: loss {result['loss']:.4f}, top1 "
                      f"{result['top1']:.2f}%, top5 {result['top5']:.2f}% "
                      f"(stream {last_eval['clock_s']:.1f} s)")
        return last_eval

    def save_checkpoint() -> None:
        average_buffers_(model, comm)  # every rank holds the buffers that are saved
        shared = None
        if rank == 0:
            shared = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "step": step, "samples_global": samples_global,
                      "clock_s": clock.now(), "best_top1": best_top1, "last_eval": last_eval,
                      "config": cfg.to_dict()}
        with exclusive(comm):
            rng = checkpoint.rng_state()
        mine = {"offset": committed_offset, "last_step_s": last_step_s,
                "rng": rng, "exchanger": exchanger.state_dict(),
                "buffer": buffer.state_dict(), "samples_trained": samples_trained}
        if injector is not None:
            mine["injector"] = injector.state_dict()
        checkpoint.save(cfg.log_dir, step, rank, mine, shared, comm.barrier)

    loss_value = None
    committed_offset = start_offset if isinstance(start_offset, int) else 0
    # --eval-every-s: the next stream time (seconds since the start) that triggers an eval
    next_eval_s = math.inf
    if cfg.eval_every_s:
        resumed_s = clock.now() - stream_start_s
        next_eval_s = (math.floor(resumed_s / cfg.eval_every_s) + 1) * cfg.eval_every_s

    def end_of_step() -> tuple[bool, bool]:
        """The group's latest clock (every rank moves to it), and whether any rank was
        interrupted or (wall clock) is past --max-stream-s: one small max-allreduce."""
        over = (not clock.is_virtual and cfg.max_stream_s is not None
                and clock.now() - stream_start_s >= cfg.max_stream_s)
        t_end, interrupted, any_over = agree(
            comm, [clock.now(), float(stop_requested()), float(over)], op="max")
        clock.advance_to(t_end)
        return interrupted > 0, any_over > 0

    stop_reason = "max steps"
    group_interrupted, group_over = end_of_step()
    while True:
        # -- stop? Every rank decides on numbers agreed in the last collective: the group's
        # clock, the step, and the flags of end_of_step.
        stream_s = clock.now() - stream_start_s
        if group_interrupted:
            stop_reason = "interrupted"
            break
        if cfg.max_steps and step >= cfg.max_steps:
            break
        if cfg.max_stream_s is not None and (stream_s >= cfg.max_stream_s if clock.is_virtual
                                             else group_over):
            stop_reason = "max stream time"
            break

        # -- a batch from the stream (plus injected samples).
        if cfg.mode == "scadles":
            batch = buffer.next_window_batch(clock, cfg.min_train_bsz, cfg.max_train_bsz,
                                             last_step_s, cfg.step_when_full)
        else:
            batch = buffer.next_fixed_batch(clock, cfg.train_bsz)
        last_step_s = clock.now()
        local_seqs = metrics.seq_ranges(batch.seqs)
        local_count = len(batch)
        inj = {}
        if injector is not None:
            batch, inj = injector.augment(batch, clock, step + 1)
        local_bsz = len(batch)
        weight_bsz = int(inj.get("weight_bsz", local_bsz))

        # -- b_i -> B, whether the streams have ended, and whether a rank was interrupted
        # while it waited for data (one small allreduce).
        t_sync = time.perf_counter()
        ended = batch.ended and local_count == 0
        short = cfg.mode == "ddp" and local_count < cfg.train_bsz
        global_bsz, n_ended, n_short, n_interrupted = (
            int(v) for v in agree(comm, [weight_bsz, ended, short, stop_requested()]))
        agree_s = time.perf_counter() - t_sync
        if n_interrupted:
            stop_reason = "interrupted"
            break
        if n_short or n_ended == world_size:
            stop_reason = "streams ended"
            break
        if cfg.fail_at_step and step + 1 == cfg.fail_at_step and \
                rank == (cfg.fail_rank if cfg.fail_rank >= 0 else world_size - 1):
            print(f"rank {rank} {FAILED_MARK}failing at step {step + 1} (--fail-at-step test "
                  f"hook)", file=sys.stderr, flush=True)
            os._exit(FAIL_EXIT)
        if global_bsz == 0:  # nobody has data yet (--min-train-bsz 0): let time pass
            group_interrupted, group_over = end_of_step()
            continue
        step += 1

        # -- forward / backward on the local batch (mean loss); simulated devices
        # (--devices-per-rank) take turns, each timed on its own.
        with exclusive(comm):
            t_compute = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            if local_bsz > 0:
                model.train()
                x, y = to_tensors(batch, mean, std, device)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                loss_value = loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            measured_compute_s = time.perf_counter() - t_compute

        # -- weighted aggregation: every .grad becomes sum_i (b_i / B) g_i.
        # (ddp: equal batches, so b_i / B is the plain average.)
        weight = aggregation_weight(weight_bsz, global_bsz)
        t_exchange = time.perf_counter()
        exchange = exchanger.exchange(named_params, weight, step,
                                      epoch=samples_global // epoch_samples)
        measured_sync_s = time.perf_counter() - t_exchange + agree_s

        # -- learning rate: linear scaling (scadles) and the group's MultiStep schedule.
        factor = multistep_factor(samples_global, epoch_samples, cfg.milestones, cfg.gamma)
        lr = step_lr(cfg.lr, global_bsz, cfg.global_bsz, samples_global,
                     scale=cfg.mode == "scadles", max_lr=cfg.max_lr,
                     warmup_samples=round(cfg.warmup_epochs * epoch_samples)) * factor
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        samples_global += global_bsz
        samples_trained += local_count
        committed_offset = buffer.commit_used()

        # -- time: this step's compute and sync, then the group's latest clock.
        compute_s = compute_model.seconds(measured_compute_s, local_bsz, rank)
        sync_s = comm_model.seconds(measured_sync_s, exchange["bytes_sent"],
                                    compressed=exchange["compressed"],
                                    dense_bytes=dense_bytes, world_size=world_size)
        clock.advance(compute_s + sync_s)
        group_interrupted, group_over = end_of_step()
        stream_s = clock.now() - stream_start_s

        row = {"kind": "train", "step": step, "device": rank, "clock_s": round(stream_s, 6),
               "local_bsz": local_bsz, "global_bsz": global_bsz, "weight": weight, "lr": lr,
               "wait_s": batch.wait_s,
               "compute_s": compute_s, "sync_s": sync_s, "buffer_len": batch.buffer_len,
               "buffer_peak": batch.buffer_peak,
               "dropped": batch.dropped, "truncated": batch.truncated,
               "duplicates": batch.duplicates,
               "loss": loss_value if local_bsz > 0 else None,
               "label_hist": label_hist(batch.labels),
               "seqs": local_seqs, **exchange,
               **{k: v for k, v in inj.items() if k != "weight_bsz"}}
        rows.write(row)
        progress.update(step, stream_s, samples_global, loss_value,
                        None if last_eval is None else last_eval["top1"])

        if (cfg.eval_steps and step % cfg.eval_steps == 0) or stream_s >= next_eval_s:
            run_eval()
            if cfg.eval_every_s:
                next_eval_s = (math.floor(stream_s / cfg.eval_every_s) + 1) * cfg.eval_every_s
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint()

    # -- the end: a last evaluation (not after SIGINT: the user wants out), the summary, a
    # clean close.
    if stop_reason != "interrupted" and (last_eval is None or last_eval["step"] != step):
        run_eval()
    progress.close()
    ex_summary = exchanger.summary()
    bytes_sent_total = int(agree(comm, [ex_summary.bytes_sent_total])[0])
    final = last_eval or {}
    stream_s = clock.now() - stream_start_s
    summary = {"steps": step, "stream_s": stream_s,
               "samples": samples_global, "stop_reason": stop_reason,
               "final_top1": final.get("top1"), "final_top5": final.get("top5"),
               "best_top1": best_top1, "bytes_sent_total": bytes_sent_total,
               "cnc_ratio": ex_summary.cnc_ratio,
               "compressed_steps": ex_summary.compressed_steps,
               "dense_steps": ex_summary.dense_steps, "compression_hint": ex_summary.hint,
               "wall_s": time.time() - wall_start, "log_dir": cfg.log_dir,
               "buffer": buffer.stats(),
               "devices": device_summary(comm, plan, stream_s, samples_trained,
                                         buffer.stats(), step,
                                         injector.summary() if injector else None)}
    if injector is not None:
        summary["injection"] = injector.summary()
        injector.close()
    if rank == 0:
        metrics.update_run_json(cfg.log_dir, summary=summary, exchanger=ex_summary.to_dict())
        print(metrics.format_summary(summary), file=display, flush=True)
    buffer.close()
    rows.close()
    return summary


def exit_now(code: int, backend: str) -> None:
    """Exit without the interpreter's teardown of torch (seconds on a loaded machine):
    everything was closed and flushed already. After a clean run MPI is finalized first;
    after a failure it is not (finalizing waits for the other ranks, which may wait for this
    one: the MPI launcher stops them when a rank exits unfinalized)."""
    if backend == "mpi" and code == 0:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, exit_fast: bool = False) -> int:
    cfg = parse_args(argv, prog="python -m scadles.train")
    rank = env_rank()
    display = sys.stdout
    if cfg.rank_log:  # started by the launcher: this rank's output goes to rank-R.log
        terminal = metrics.capture_output(cfg.log_dir, rank, append=cfg.resume)
        display = metrics.Tee(terminal, sys.stdout) if rank == 0 else sys.stdout
    # into the rank's log file everything; on a terminal shared with other ranks, warnings
    logsetup.configure(f"rank {rank}", logging.INFO if cfg.rank_log else logging.WARNING)
    stop_requested = StopRequest().install()
    code = 0
    try:
        comm = make_comm(cfg.backend)
        if cfg.devices_per_rank > 1:  # this rank simulates K devices (scadles.devices)
            share_cpu_threads(comm)
            for split in ("train", "test"):  # loaded once, shared by the devices
                load_dataset(cfg.dataset, split, cfg.data_dir, cfg.download, cfg.image_size,
                             cfg.seed)
            run_devices(cfg, comm, train, display, stop_requested)
        else:
            train(cfg, comm, display, stop_requested)
        comm.close()
    except KNOWN_FAILURES as e:
        code = KNOWN_FAILURE_EXIT
        print(f"rank {rank} {FAILED_MARK}{e}", file=sys.stderr, flush=True)
    except BaseException as e:  # the traceback stays in the log; the cause is its last line
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
        traceback.print_exc()
        print(f"rank {rank} {FAILED_MARK}{type(e).__name__}: {e}".rstrip(": "),
              file=sys.stderr, flush=True)
    if exit_fast or code:
        exit_now(code, cfg.backend)
    return code


if __name__ == "__main__":
    sys.exit(main(exit_fast=True))
