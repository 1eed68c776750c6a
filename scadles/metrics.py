"""Run logs: one JSON object per line per rank, ``run.json``, and the progress line.

Only this module writes run logs. A run directory holds:

- ``rank-<r>.jsonl``: one row per line. ``{"kind": "train", "step", "clock_s" (stream
  seconds since the stream started), "local_bsz", "global_bsz", "lr", "wait_s",
  "compute_s", "sync_s", "buffer_len", "buffer_peak" (most samples held while the batch
  formed), "dropped", "truncated", "loss", "bytes_sent",
  "label_hist" (samples per label trained: {"label": count}), "seqs" (the device's own sequence numbers
  trained, as inclusive [first, last] ranges), plus the exchanger's "compressed", "ratio",
  "signal", "floats_sent", "compress_s" and, with injection, "injected", "injected_bytes"}``;
  ``{"kind": "eval", "step", "clock_s", "samples", "loss", "top1", "top5"}`` (percent,
  identical on every rank); ``{"kind": "resume", "step"}`` where a resumed run continued.
- ``run.json``: the configuration, versions, git commit, the stream plan
  (``"stream_plan"``: ``streamsim.plan.StreamPlan.to_dict``; absent in older runs), the
  partition summary (``"partition": {"labels_per_device": [[...]], "samples_per_device":
  [...]}``) and, at the end, ``"summary"`` (``"stop_reason"``: max steps, max stream time,
  streams ended or interrupted; ``"devices"``: per device, ``"rate_per_s"`` its mean rate
  over the run's stream time, ...).
- ``rank-<r>.log``: everything rank r wrote to stdout and stderr (``capture_output``), its
  log lines prefixed ``rank <r>``; ``producer.log`` likewise for the producer.
- ``tb/``: with ``--tensorboard``, TensorBoard event files of the same rows
  (``TensorBoardLog``: ``tb/group`` from rank 0, ``tb/device-<r>`` from each rank).
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
RUN_JSON = "run.json"


def rank_log_path(log_dir: str | Path, rank: int) -> Path:
    return Path(log_dir) / f"rank-{rank}.jsonl"


def rank_output_path(log_dir: str | Path, rank: int) -> Path:
    return Path(log_dir) / f"rank-{rank}.log"


def capture_output(log_dir: str | Path, rank: int, append: bool = False) -> TextIO:
    """Send this process's stdout and stderr to ``LOG_DIR/rank-<rank>.log`` (appended to
    when ``append``, as a resumed run does); return a stream on the original stdout.

    The file descriptors themselves are redirected, so what C libraries (gloo, MPI) and the
    interpreter's tracebacks write lands in the file too. What the user should still see
    (rank 0's progress and summary) is written to the returned stream, through ``Tee``."""
    path = rank_output_path(log_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return terminal


class Tee:
    """A text stream writing to the terminal and to a log: a line redrawn in place on the
    terminal (``\r...``) becomes a line of its own in the log."""

    def __init__(self, terminal: TextIO, log: TextIO):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.terminal.write(text)
        if text.startswith("\r"):
            text = text[1:].rstrip() + "\n"
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()


def seq_ranges(seqs) -> list[list[int]]:
    """Sorted sequence numbers as inclusive ranges: [0, 1, 2, 5] -> [[0, 2], [5, 5]]."""
    ranges: list[list[int]] = []
    for s in sorted(int(s) for s in seqs):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ranges


def expand_ranges(ranges) -> list[int]:
    """The inverse of ``seq_ranges``."""
    return [s for a, b in ranges for s in range(a, b + 1)]


def read_rows(log_dir: str | Path, rank: int, kind: str | None = None) -> list[dict]:
    """The rows of one rank's log (of one kind)."""
    path = rank_log_path(log_dir, rank)
    if not path.exists():
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RankLog:
    """Rows of one rank, appended and flushed one line at a time (a crash loses nothing
    written). ``resume_step``: drop rows of steps after the checkpoint the run resumes from
    (they were rolled back), then mark where it continued. ``tensorboard``: the train and
    eval rows also go to ``TensorBoardLog``."""

    def __init__(self, log_dir: str | Path, rank: int, resume_step: int | None = None,
                 tensorboard: bool = False):
        self.board = TensorBoardLog(log_dir, rank, resume_step) if tensorboard else None
        self.path = rank_log_path(log_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_rows(log_dir, rank) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        self._file = open(self.path, "a")
        if resume_step is not None:
            self.write({"kind": "resume", "step": resume_step, "time": time.time()})

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, default=_jsonable) + "\n")
        self._file.flush()
        if self.board is not None:
            self.board.write(row)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self.board is not None:
            self.board.close()


# --------------------------------------------------------------------------------------------
# TensorBoard (--tensorboard)
# --------------------------------------------------------------------------------------------

TENSORBOARD_DIR = "tb"
# Train-row fields each rank writes as ``device/<field>`` (tb/device-<rank>), and those rank 0
# writes for the group as ``group/<field>`` (tb/group); eval rows as ``eval/<field>``.
TB_DEVICE_FIELDS = ("local_bsz", "loss", "bytes_sent", "wait_s", "buffer_len", "dropped",
                    "truncated", "injected")
TB_GROUP_FIELDS = ("global_bsz", "lr", "clock_s", "compressed", "ratio")
TB_EVAL_FIELDS = ("top1", "top5", "loss")


class TensorBoardLog:
    """Per-step scalars for TensorBoard under ``LOG_DIR/tb`` (``tensorboard --logdir
    LOG_DIR/tb``), against the step.

    Every rank writes its device's scalars to ``tb/device-<rank>`` under the same tags
    (``device/local_bsz``, ``device/loss``, ``device/bytes_sent``, ...), so TensorBoard draws
    the devices of one tag in one chart. Rank 0 also writes the group's to ``tb/group``:
    ``group/global_bsz``, ``group/lr``, ``group/clock_s`` (stream seconds), the exchanger's
    ``group/compressed`` and ``group/ratio``, and at each evaluation ``eval/top1``,
    ``eval/top5`` (percent) and ``eval/loss``. A resumed run drops what was logged after its
    checkpoint (TensorBoard's purge step)."""

    def __init__(self, log_dir: str | Path, rank: int, resume_step: int | None = None,
                 flush_s: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        root = Path(log_dir) / TENSORBOARD_DIR
        purge = None if resume_step is None else resume_step + 1
        self._device = SummaryWriter(str(root / f"device-{rank}"), purge_step=purge,
                                     flush_secs=flush_s)
        self._group = (SummaryWriter(str(root / "group"), purge_step=purge, flush_secs=flush_s)
                       if rank == 0 else None)

    def write(self, row: dict) -> None:
        """One run-log row: a train row's scalars, or an eval row's (rank 0)."""
        step = row.get("step")
        if row.get("kind") == "train":
            self._add(self._device, "device", row, TB_DEVICE_FIELDS, step)
            self._add(self._group, "group", row, TB_GROUP_FIELDS, step)
        elif row.get("kind") == "eval":
            self._add(self._group, "eval", row, TB_EVAL_FIELDS, step)

    @staticmethod
    def _add(writer, prefix: str, row: dict, fields: tuple[str, ...], step: int) -> None:
        if writer is None:
            return
        for name in fields:
            value = row.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def close(self) -> None:
        for writer in (self._device, self._group):
            if writer is not None:
                writer.close()


def _jsonable(x):
    """numpy scalars and arrays, and anything else, as JSON."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# --------------------------------------------------------------------------------------------
# run.json
# --------------------------------------------------------------------------------------------

def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "numpy", "kafka-python", "mpi4py"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# What reproduce_cpu.sh writes: changes there do not make the code that ran "dirty".
RESULT_OUTPUTS = ("docs/results", "docs/RESULTS.md", "docs/figures")


def git_commit() -> str | None:
    """HEAD of the repository, with ``+dirty`` when the tree has changes (other than the
    results page's records and figures, which a reproduction rewrites as it runs)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no", "--", ".",
                                *(f":!{p}" for p in RESULT_OUTPUTS)],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_json(log_dir: str | Path, config: dict, partition: dict, **extra) -> Path:
    """Write ``run.json`` at the start of a run (atomically)."""
    path = Path(log_dir) / RUN_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "versions": versions(), "git_commit": git_commit(),
           "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "partition": partition, **extra}
    atomic_write_text(path, json.dumps(doc, indent=1, default=_jsonable) + "\n")
    return path


def config_devices(config: dict, default: int | None = None) -> int | None:
    """The devices a run simulated, from its run.json config: --world-size ranks x
    --devices-per-rank (1 in runs written before it existed)."""
    if "world_size" not in config:
        return default
    return int(config["world_size"]) * int(config.get("devices_per_rank") or 1)


def read_run_json(log_dir: str | Path) -> dict:
    path = Path(log_dir) / RUN_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_json(log_dir: str | Path, **fields) -> None:
    """Merge ``fields`` into ``run.json`` (atomically)."""
    doc = read_run_json(log_dir)
    doc.update(fields)
    atomic_write_text(Path(log_dir) / RUN_JSON,
                       json.dumps(doc, indent=1, default=_jsonable) + "\n")


# --------------------------------------------------------------------------------------------
# What rank 0 shows
# --------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress display: redrawn in place on a terminal, else a line every
    ``every_s`` seconds."""

    def __init__(self, enabled: bool = True, max_steps: int = 0, every_s: float = 5.0,
                 stream=None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last: float | None = None  # monotonic time of the last line; None: none yet
        self._width = 0

    def update(self, step: int, stream_s: float, samples: int, loss: float | None,
               top1: float | None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # The first update always shows: monotonic time counts from boot, so it may be small.
        due = self._last is None or now - self._last >= self.every_s
        if not (self.tty or force or due):
            return
        self._last = now
        total = f"/{self.max_steps}" if self.max_steps else ""
        line = (f"step {step}{total} | stream {stream_s:8.1f} s | samples {samples} | "
                f"loss {'-' if loss is None else f'{loss:.4f}'} | "
                f"top1 {'-' if top1 is None else f'{top1:.2f}%'}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (ends the progress line first)."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def format_summary(summary: dict) -> str:
    """The lines printed at the end of a run."""
    def pct(x):
        return "-" if x is None else f"{x:.2f}%"

    compressed, dense = summary.get("compressed_steps"), summary.get("dense_steps")
    cnc = summary["cnc_ratio"]
    if cnc is None:  # no dense step: all compressed (inf), or no step at all
        cnc_text = "all compressed" if compressed else "n/a"
    else:
        cnc_text = f"{cnc:.2f}"
    if compressed is not None and dense is not None:
        cnc_text += f" ({compressed} compressed / {dense} dense steps)"

    stopped = summary.get("stop_reason")
    return "\n".join([
        "== run summary",
        f"steps          {summary['steps']}" + (f" (stopped: {stopped})" if stopped else ""),
        f"stream time    {summary['stream_s']:.1f} s ({summary['samples']} samples trained)",
        f"accuracy       final top1 {pct(summary['final_top1'])}, best top1 "
        f"{pct(summary['best_top1'])}, final top5 {pct(summary.get('final_top5'))}",
        f"bytes sent     {summary['bytes_sent_total']:,} (all ranks), CNC ratio "
        f"{cnc_text}",
    ] + ([f"note           {summary['compression_hint']}"]
         if summary.get("compression_hint") else []) + [
        f"wall time      {summary['wall_s']:.1f} s",
        f"logs           {summary['log_dir']}",
    ] + format_devices(summary.get("devices") or []))


def format_devices(devices: list[dict]) -> list[str]:
    """The per-device table of the summary: what each stream delivered and what was trained
    (malformed records by kind after their total)."""
    if not devices:
        return []
    lines = ["device  rate/s  trained  mean b_i  injected  dropped  truncated  duplicate  "
             "peak buf  malformed"]
    for d in devices:
        kinds = d.get("malformed_by_kind") or {}
        by_kind = (" (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")"
                   if kinds else "")
        lines.append(f"{d['device']:>6}  {d['rate_per_s']:>6.1f}  {d['samples_trained']:>7}  "
                     f"{d['mean_local_bsz']:>8.1f}  {d.get('injected', 0):>8}  "
                     f"{d['dropped']:>7}  {d['truncated']:>9}  {d.get('duplicates', 0):>9}  "
                     f"{d['peak_buffer']:>8}  {d['malformed']:>9}{by_kind}")
    return lines
