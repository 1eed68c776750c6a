"""`python -m scadles.report RUN_DIR...`: plots and a markdown table from run logs.

Reads what ``metrics.py`` writes (``run.json`` and ``rank-<r>.jsonl``) and writes PNG plots
and ``report.md`` to ``--out`` (default: the first run directory's parent / ``report``).

Runs and settings. A run is named by its ``--labels`` entry or else its directory name. Runs
whose names differ only by a ``-seedN`` suffix are seeds of one *setting*: the tables show a
setting's values as mean ± sd (sample standard deviation over its seeds) and the accuracy
plot shows the mean with a ± sd band. The other plots show the first seed of each setting.

Definitions (every number in the table is computed by a pure function below):
- Logs carry top-1/top-5 in percent (as ``metrics.py`` writes them); the report works in
  fractions and prints percent.
- Evaluation rows of one step written by several ranks (sharded evaluation) are merged into
  one point: top-1/top-5/loss weighted by ``samples``, ``clock_s`` their maximum. When a rank
  file repeats a (kind, step) row, as after a resume, the last row written wins.
- final / best top-1: top-1 of the last evaluated step / the highest top-1 of any step.
- time to target: ``clock_s`` (stream seconds) of the first evaluated step, in step order,
  whose top-1 >= target; ``None`` ("not reached") when no step reaches it. ``--target`` is a
  fraction (0.8) or a percentage (80); by default it is the lowest best top-1 among the
  settings (mean over seeds), rounded down to 0.01, so that every setting reaches it (with
  seeds, possibly only some of them: the table then says k/n).
- speedup: baseline time to target / run time to target (> 1: the run is faster); for a
  setting with seeds, the ratio of the mean times over the seeds that reached the target; for
  one run of several (the "Runs" table), against the baseline run with the same seed when
  the baseline has one run per seed, else against the baseline's mean.
- peak buffer: the largest buffer any device held: the per-device peaks of the run summary
  (``devices[].peak_buffer``), or else the largest ``buffer_len`` logged at any step.
- dropped, truncated, bytes sent, injected: sums of ``dropped`` (buffer overflow),
  ``truncated`` (discarded by the truncation window; the column appears when rows carry it),
  ``bytes_sent`` and ``injected`` over all ranks and steps (bytes sent = gradient payload;
  injected data is counted separately in ``injected_bytes``).
- CNC ratio (the paper's compressed-to-non-compressed ratio): the number of training steps
  that sent compressed gradients divided by the number that sent dense ones. A step's
  decision is read from the lowest rank that logged it (the vote makes all ranks agree).
  ``inf`` when every step compressed, ``None`` (n/a) when no row carries ``compressed``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scadles.metrics import config_devices

PLOT_FILES = {
    "accuracy": "accuracy.png",
    "batch_sizes": "batch_sizes.png",
    "buffer": "buffer.png",
    "bytes": "bytes.png",
    "compression": "compression.png",
    "labels": "labels.png",
}
_SEED_SUFFIX = re.compile(r"-seed\d+$")


class ReportError(RuntimeError):
    """A problem with the inputs, reported as one line (exit code 2 from the CLI)."""


@dataclass
class Run:
    """One run's logs: configuration, merged eval points and train rows per rank."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    partition: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    train: dict[int, list[dict]] = field(default_factory=dict)  # rank -> rows by step
    evals: list[dict] = field(default_factory=list)  # merged per step, by step

    @property
    def setting(self) -> str:
        return setting_name(self.name)


# ---------------------------------------------------------------- loading

def setting_name(name: str) -> str:
    """The setting a run belongs to: its name without a trailing ``-seedN``."""
    return _SEED_SUFFIX.sub("", name)


def _read_jsonl(path: Path) -> list[dict]:
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a killed run
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return rows


def _last_per_step(rows: list[dict]) -> list[dict]:
    """Rows by step; a repeated step (a resumed run) keeps the row written last."""
    by_step = {}
    for row in rows:
        if "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def merge_evals(rows: list[dict]) -> list[dict]:
    """One eval point per step from the eval rows of all ranks (weighted by ``samples``)."""
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), []).append(row)
    merged = []
    for step in sorted(by_step):
        group = by_step[step]
        weights = np.array([float(r.get("samples") or 1.0) for r in group])
        point = {"step": step, "clock_s": max(float(r.get("clock_s", 0.0)) for r in group),
                 "samples": int(sum(r.get("samples") or 0 for r in group))}
        for key, scale in (("loss", 1.0), ("top1", 0.01), ("top5", 0.01)):  # % -> fraction
            pairs = [(float(r[key]), w) for r, w in zip(group, weights) if r.get(key) is not None]
            if pairs:
                values, w = np.array(pairs).T
                point[key] = float(np.dot(values, w) / w.sum()) * scale
        merged.append(point)
    return merged


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read ``run.json`` (optional) and every ``rank-<r>.jsonl`` of a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (pass the LOG_DIR of a run)")
    files = sorted(path.glob("rank-*.jsonl"))
    ranks = {}
    for f in files:
        m = re.fullmatch(r"rank-(\d+)\.jsonl", f.name)
        if m:
            ranks[int(m.group(1))] = f
    if not ranks:
        raise ReportError(f"{path}: no rank-<r>.jsonl logs here (pass the LOG_DIR of a "
                          "finished or running training run)")
    meta = {}
    if (path / "run.json").is_file():
        try:
            meta = json.loads((path / "run.json").read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{path / 'run.json'}: not valid JSON ({e})")
    run = Run(path=path, name=name or path.resolve().name,
              config=meta.get("config") or {}, partition=meta.get("partition") or {},
              summary=meta.get("summary") or {})
    eval_rows = []
    for rank in sorted(ranks):
        rows = _read_jsonl(ranks[rank])
        run.train[rank] = _last_per_step([r for r in rows if r.get("kind") == "train"])
        eval_rows += _last_per_step([r for r in rows if r.get("kind") == "eval"])
    run.evals = merge_evals(eval_rows)
    if not any(run.train.values()) and not run.evals:
        raise ReportError(f"{path}: the rank logs hold no train or eval rows yet")
    return run


# ---------------------------------------------------------------- pure metrics

def time_to_target(evals: list[dict], target: float) -> float | None:
    """Stream seconds of the first eval point (in step order) with top1 >= target."""
    for point in sorted(evals, key=lambda p: p["step"]):
        if point.get("top1") is not None and point["top1"] >= target:
            return float(point["clock_s"])
    return None


def speedup(baseline_s: float | None, run_s: float | None) -> float | None:
    """Baseline time to target / run time to target; None if either did not reach it."""
    if baseline_s is None or run_s is None:
        return None
    if run_s <= 0:
        return math.inf if baseline_s > 0 else 1.0
    return baseline_s / run_s


def step_decisions(train: dict[int, list[dict]]) -> dict[int, bool]:
    """step -> compressed, from the lowest rank that logged the step with a decision."""
    decisions: dict[int, bool] = {}
    for rank in sorted(train, reverse=True):
        for row in train[rank]:
            if row.get("compressed") is not None:
                decisions[int(row["step"])] = bool(row["compressed"])
    return decisions


def cnc_ratio(train: dict[int, list[dict]]) -> float | None:
    """Compressed steps / dense steps (inf: all compressed; None: no decisions logged)."""
    decisions = step_decisions(train)
    if not decisions:
        return None
    compressed = sum(decisions.values())
    dense = len(decisions) - compressed
    return compressed / dense if dense else math.inf


def _rows(train: dict[int, list[dict]]):
    for rank in sorted(train):
        yield from train[rank]


def _sum(train: dict[int, list[dict]], key: str) -> int:
    return int(sum(row.get(key) or 0 for row in _rows(train)))


def _fraction(percent: float | None) -> float | None:
    return None if percent is None else percent / 100


def peak_buffer(run: Run, rows: list[dict]) -> int | None:
    """The largest buffer any device held: the run summary's per-device peaks (measured
    before each batch is taken) when present, else the largest ``buffer_len`` logged after
    a batch (which under truncation is often 0)."""
    peaks = [int(d["peak_buffer"]) for d in run.summary.get("devices") or []
             if d.get("peak_buffer") is not None]
    logged = [int(r["buffer_len"]) for r in rows if r.get("buffer_len") is not None]
    return max(peaks + logged, default=None)


def summarize_run(run: Run, target: float) -> dict:
    """The table's values for one run (numbers, None where not applicable)."""
    rows = list(_rows(run.train))
    decisions = step_decisions(run.train)
    top1 = [p["top1"] for p in run.evals if p.get("top1") is not None]
    final = top1[-1] if top1 else _fraction(run.summary.get("final_top1"))
    clocks = [float(r["clock_s"]) for r in rows + run.evals if r.get("clock_s") is not None]
    return {
        "name": run.name,
        "setting": run.setting,
        "path": str(run.path),
        "mode": run.config.get("mode"),
        "seed": run.config.get("seed"),
        "ranks": len(run.train),
        "steps": len({int(r["step"]) for r in rows}),
        "stream_s": max(clocks) if clocks else None,
        "final_top1": final,
        "best_top1": max(top1) if top1 else final,
        "time_to_target_s": time_to_target(run.evals, target),
        "peak_buffer": peak_buffer(run, rows),
        "dropped": _sum(run.train, "dropped"),
        "truncated": (_sum(run.train, "truncated")
                      if any("truncated" in r for r in rows) else None),
        "bytes_sent": _sum(run.train, "bytes_sent"),
        "compressed_steps": sum(decisions.values()),
        "dense_steps": len(decisions) - sum(decisions.values()),
        "cnc_ratio": cnc_ratio(run.train),
        "injected": _sum(run.train, "injected"),
        "injected_bytes": _sum(run.train, "injected_bytes"),
    }


def mean_sd(values: list) -> tuple[float | None, float | None, int]:
    """(mean, sample sd or None for one value, count) over the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    if any(math.isinf(x) for x in xs):
        return math.inf, None, len(xs)
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None), len(xs)


def summarize_setting(summaries: list[dict], baseline_time_s: float | None) -> dict:
    """A setting's row: per numeric key (mean, sd, n) over seeds, and its speedup."""
    keys = ("steps", "stream_s", "final_top1", "best_top1", "time_to_target_s", "peak_buffer",
            "dropped", "truncated", "bytes_sent", "cnc_ratio", "injected", "injected_bytes")
    row = {"name": summaries[0]["setting"], "seeds": len(summaries),
           "mode": summaries[0]["mode"]}
    for key in keys:
        row[key] = mean_sd([s[key] for s in summaries])
    row["speedup"] = speedup(baseline_time_s, row["time_to_target_s"][0])
    return row


def default_target(runs: list[Run]) -> float | None:
    """The lowest best top-1 among the settings (mean over seeds), rounded down to 0.01."""
    bests = {}
    for run in runs:
        top1 = [p["top1"] for p in run.evals if p.get("top1") is not None]
        if top1:
            bests.setdefault(run.setting, []).append(max(top1))
    if not bests:
        return None
    return math.floor(min(np.mean(v) for v in bests.values()) * 100 + 1e-9) / 100


def settings(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by setting, in the order the settings first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return groups


# ---------------------------------------------------------------- markdown

def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


def _num(x, digits=1):
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:,.{digits}f}"


def _count(x):
    """Counts: whole numbers as such, means of counts with one decimal."""
    if x is None or math.isinf(x):
        return _num(x)
    return _num(x, 0 if float(x).is_integer() else 1)


def _bytes(x):
    if x is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _stat(triple, fmt, seeds):
    mean, sd, n = triple
    if mean is None:
        return "n/a"
    text = fmt(mean)
    if sd is not None:
        text += f" ± {fmt(sd)}"
    if n < seeds:
        text += f" ({n}/{seeds})"
    return text


def _speedup_text(x):
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}x")


def _cnc_text(x, digits=2):
    return "n/a" if x is None else ("all compressed" if math.isinf(x) else f"{x:.{digits}f}")


def render_markdown(runs: list[Run], target: float | None, target_note: str,
                    baseline: str | None, plots: dict[str, Path]) -> str:
    """The report page: settings table, per-run table when seeds exist, plots, definitions."""
    groups = settings(runs)
    per_run = {run.name: summarize_run(run, target if target is not None else math.inf)
               for run in runs}
    base_time = None
    base_by_seed: dict = {}  # a run's speedup is against the baseline run of its seed
    if baseline is not None:
        base_time = mean_sd([per_run[r.name]["time_to_target_s"] for r in groups[baseline]])[0]
        seeds = [per_run[r.name]["seed"] for r in groups[baseline]]
        if None not in seeds and len(set(seeds)) == len(seeds):
            base_by_seed = {per_run[r.name]["seed"]: per_run[r.name]["time_to_target_s"]
                            for r in groups[baseline]}
    target_label = "n/a" if target is None else f"{100 * target:.1f}%"
    lines = ["# ScaDLES run report", ""]
    lines.append(f"Target top-1: **{target_label}** ({target_note}). Baseline for speedup: "
                 f"**{baseline or 'none'}**." + ("" if baseline else
                                                 " Pass `--baseline RUN` to compute speedups."))
    lines.append("")
    truncation = any(s["truncated"] is not None for s in per_run.values())
    trunc_head = "Truncated | " if truncation else ""
    lines.append(f"| Setting | Seeds | Mode | Steps | Stream time (s) | Final top-1 (%) | "
                 f"Best top-1 (%) | Time to {target_label} (s) | Speedup | Peak buffer | "
                 f"Dropped | {trunc_head}Bytes sent | CNC ratio | Injected |")
    lines.append("|" + "---|" * (14 + truncation))
    for name, members in groups.items():
        s = summarize_setting([per_run[r.name] for r in members], base_time)
        n = s["seeds"]
        ttt = s["time_to_target_s"]
        ttt_text = (f"not reached (0/{n})" if ttt[0] is None
                    else _stat(ttt, lambda v: _num(v, 1), n))
        lines.append("| " + " | ".join([
            name, str(n), str(s["mode"] or "?"),
            _stat(s["steps"], _count, n),
            _stat(s["stream_s"], lambda v: _num(v, 1), n),
            _stat(s["final_top1"], _pct, n), _stat(s["best_top1"], _pct, n),
            ttt_text, _speedup_text(s["speedup"]) + ("" if ttt[2] in (0, n) else
                                                     f" ({ttt[2]}/{n})"),
            _stat(s["peak_buffer"], _count, n),
            _stat(s["dropped"], _count, n),
            *([_stat(s["truncated"], _count, n)] if truncation else []),
            _stat(s["bytes_sent"], _bytes, n), _stat(s["cnc_ratio"], _cnc_text, n),
            _stat(s["injected"], _count, n)]) + " |")
    lines += ["",
              "Seeds: runs named alike apart from a `-seedN` suffix; their values are "
              "mean ± sample sd, with (k/n) where only k of n seeds have a value. "
              "Time to target: stream seconds at the first evaluation with top-1 >= target. "
              "Speedup: baseline time to target / this time (settings: ratio of the seed means; "
              "runs: against the baseline run with the same seed). "
              "Peak buffer: largest buffer any device held at a step. Dropped (buffer overflow), "
              "truncated (outside the truncation window), bytes sent (gradient payload) and "
              "injected: summed over ranks and steps. CNC ratio: "
              "steps that sent compressed gradients / steps that sent dense ones (n/a: no "
              "compression decisions logged).", ""]
    if any(len(m) > 1 for m in groups.values()):
        lines += ["## Runs", "",
                  "| Run | Seed | Final top-1 (%) | Best top-1 (%) | Time to target (s) | "
                  f"Speedup | Peak buffer | Dropped | {trunc_head}Bytes sent | CNC ratio | "
                  "Injected |",
                  "|" + "---|" * (11 + truncation)]
        for run in runs:
            s = per_run[run.name]
            lines.append("| " + " | ".join([
                run.name, str(s["seed"] if s["seed"] is not None else "?"),
                _pct(s["final_top1"]), _pct(s["best_top1"]),
                "not reached" if s["time_to_target_s"] is None
                else _num(s["time_to_target_s"], 1),
                _speedup_text(speedup(base_by_seed.get(s["seed"], base_time),
                                      s["time_to_target_s"])),
                _count(s["peak_buffer"]), _count(s["dropped"]),
                *([_count(s["truncated"])] if truncation else []), _bytes(s["bytes_sent"]),
                _cnc_text(s["cnc_ratio"]), _count(s["injected"])]) + " |")
        lines.append("")
    lines += ["## Settings", "", "| Run | Directory | Mode | Model | Dataset | Devices | Rates | "
              "Policy | Compression | Injection (alpha, beta) | Seed |", "|" + "---|" * 11]
    for run in runs:
        c = run.config
        rates = c.get("rates")
        if isinstance(rates, list):
            rates = ",".join(f"{r:g}" if isinstance(r, (int, float)) else str(r)
                             for r in rates[:8]) + (",..." if len(rates) > 8 else "")
        lines.append("| " + " | ".join(str(v) for v in [
            run.name, f"`{run.path}`", c.get("mode", "?"), c.get("model_name", "?"),
            c.get("dataset", "?"), config_devices(c, len(run.train)), rates or "?",
            c.get("policy", "?"), c.get("compression", "none"),
            f"{c.get('alpha', 0)}, {c.get('beta', 0)}", c.get("seed", "?")]) + " |")
    lines += ["", "## Plots", ""]
    captions = {
        "accuracy": "Test top-1 against stream time (mean ± sd band over seeds)",
        "batch_sizes": "Global and per-device batch sizes over steps",
        "buffer": "Buffer length over stream time (mean over devices, min-max band)",
        "bytes": "Cumulative gradient bytes sent by all devices",
        "compression": "Compression decisions (and signal) over steps",
        "labels": "Labels trained per device (share of each device's samples; dots: the "
                  "device's own partition labels)",
    }
    for key, path in plots.items():
        lines += [f"### {captions[key]}", "", f"![{key}]({path.name})", ""]
    lines.append("Plots other than accuracy show the first seed of each setting.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_title(run: Run) -> str:
    """A run as plots name it: its setting, rate set and seed."""
    c = run.config
    rates = c.get("rates")
    rates = rates if isinstance(rates, str) and len(rates) <= 12 else None
    parts = [run.setting] + ([rates] if rates and rates not in run.setting else []) + (
        [f"seed {c['seed']}"] if c.get("seed") is not None else [])
    return ", ".join(parts)


def _common_title(runs: list[Run]) -> str:
    """What the runs of a plot share: rate set and seed(s), e.g. ' (S10, seeds 0, 1)'."""
    rates = {str(r.config.get("rates")) for r in runs if r.config.get("rates") is not None}
    seeds = sorted({r.config.get("seed") for r in runs if r.config.get("seed") is not None})
    parts = []
    if len(rates) == 1 and len(next(iter(rates))) <= 12:
        parts.append(next(iter(rates)))
    if seeds:
        parts.append(("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds)))
    return f" ({', '.join(parts)})" if parts else ""


def _train_series(run: Run, key: str, reduce=max):
    """(steps, clock_s, reduced value over ranks) per step for one train field."""
    per_step: dict[int, list] = {}
    clock: dict[int, float] = {}
    for row in _rows(run.train):
        step = int(row["step"])
        if row.get(key) is not None:
            per_step.setdefault(step, []).append(float(row[key]))
        clock[step] = max(clock.get(step, 0.0), float(row.get("clock_s") or 0.0))
    steps = sorted(per_step)
    return (np.array(steps), np.array([clock[s] for s in steps]),
            np.array([reduce(per_step[s]) for s in steps]))


def _grid(plt, n, width=5.0, height=3.2):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _integer_ticks(ax, y=False):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _save(plt, fig, path) -> None:
    """Write one figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _finish_over_time(ax, drawn: bool, ylabel: str, empty_text: str, title: str) -> None:
    """Label a plot against stream time (legend, grid), or say why it is empty; title it."""
    if drawn:
        ax.set_xlabel("stream time (s)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        _empty(ax, empty_text)
    ax.set_title(title)


def plot_accuracy(runs, target, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for name, members in settings(runs).items():
        curves = [(np.array([p["clock_s"] for p in r.evals if p.get("top1") is not None]),
                   np.array([p["top1"] for p in r.evals if p.get("top1") is not None]))
                  for r in members]
        curves = [(t, y) for t, y in curves if len(t)]
        if not curves:
            continue
        drawn = True
        lo = max(t[0] for t, _ in curves)
        hi = min(t[-1] for t, _ in curves)
        if len(curves) > 1 and hi > lo:
            grid = np.unique(np.concatenate([t[(t >= lo) & (t <= hi)] for t, _ in curves]))
            ys = np.array([np.interp(grid, t, y) for t, y in curves]) * 100
            mean, sd = ys.mean(axis=0), ys.std(axis=0, ddof=1)
            line, = ax.plot(grid, mean, label=f"{name} (n={len(curves)})")
            ax.fill_between(grid, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        else:
            t, y = curves[0]
            ax.plot(t, y * 100, marker="o", markersize=3, label=name)
    if target is not None and drawn:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1,
                   label=f"target {100 * target:.1f}%")
    _finish_over_time(ax, drawn, "test top-1 (%)", "no evaluation rows in these runs",
                      "Accuracy against stream time" + _common_title(runs))
    _save(plt, fig, path)


def plot_batch_sizes(reps, path):
    plt = _plt()
    fig, axes = _grid(plt, len(reps) + 1)
    for run in reps:
        steps, _, bsz = _train_series(run, "global_bsz")
        axes[0].plot(steps, bsz, label=_run_title(run))
    axes[0].set_title("global batch size B")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("samples")
    _integer_ticks(axes[0])
    axes[0].legend(fontsize=7)
    for ax, run in zip(axes[1:], reps):
        for rank in sorted(run.train):
            rows = [r for r in run.train[rank] if r.get("local_bsz") is not None]
            ax.plot([r["step"] for r in rows], [r["local_bsz"] for r in rows],
                    linewidth=1, label=f"device {rank}" if rank < 10 else None)
        ax.set_title(f"{_run_title(run)}: local batch per device", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("samples")
        _integer_ticks(ax)
        ax.legend(fontsize=6, title="first ten devices" if len(run.train) > 10 else None,
                  title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_buffer(reps, path):
    """Per step, the most samples each device held while its batch formed (``buffer_peak``;
    older logs: ``buffer_len``, what was left after the batch): mean over devices, min-max
    band. Truncation empties its buffer every step, so only the peak shows what it held."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    peak = 0.0
    for run in reps:
        key = "buffer_peak" if any("buffer_peak" in r for r in _rows(run.train)) \
            else "buffer_len"
        _, t, mean = _train_series(run, key, reduce=np.mean)
        if not len(t):
            continue
        _, _, lo = _train_series(run, key, reduce=min)
        _, _, hi = _train_series(run, key, reduce=max)
        line, = ax.plot(t, mean, label=_run_title(run))
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15)
        peak = max(peak, float(hi.max()))
    if peak > 0:
        ax.set_yscale("symlog", linthresh=1)
    _finish_over_time(ax, peak > 0, "most samples held during the step",
                      "no buffer lengths logged (or all zero)",
                      "Buffer per device (mean, min-max band)")
    _save(plt, fig, path)


def plot_bytes(runs, path):
    """Cumulative gradient bytes of every run (seeds of a setting share a colour)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    any_bytes = False
    colors = {}
    for run in runs:
        _, t, total = _train_series(run, "bytes_sent", reduce=sum)
        if len(t):
            any_bytes = True
            color = colors.get(run.setting)
            line, = ax.plot(t, np.cumsum(total) / 1e6, color=color, linewidth=1,
                            label=None if color else run.setting)
            colors.setdefault(run.setting, line.get_color())
    _finish_over_time(ax, any_bytes, "cumulative MB of gradients sent (all devices)",
                      "no bytes_sent logged", "Gradient bytes sent (one line per seed)")
    _save(plt, fig, path)


def plot_compression(reps, path):
    plt = _plt()
    with_decisions = [r for r in reps if step_decisions(r.train)]
    fig, axes = _grid(plt, max(1, len(with_decisions)), height=2.8)
    if not with_decisions:
        _empty(axes[0], "no run logged compression decisions")
    for ax, run in zip(axes, with_decisions):
        decisions = step_decisions(run.train)
        steps = np.array(sorted(decisions))
        flags = np.array([decisions[s] for s in steps], dtype=float)
        ax.fill_between(steps, 0, flags, step="mid", alpha=0.3, color="tab:orange",
                        label="compressed")
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([0, 1], ["dense", "compressed"])
        ax.set_xlabel("step")
        _integer_ticks(ax)
        ax.set_title(f"{_run_title(run)}: CNC ratio {_cnc_text(cnc_ratio(run.train))}",
                     fontsize=9)
        s_steps, _, signal = _train_series(run, "signal", reduce=np.mean)
        if len(s_steps):
            twin = ax.twinx()
            twin.plot(s_steps, signal, color="tab:blue", linewidth=1, label="signal")
            threshold = run.config.get("delta_threshold")
            if run.config.get("compression") == "adaptive" and isinstance(threshold,
                                                                          (int, float)):
                twin.axhline(threshold, color="grey", linestyle="--", linewidth=1,
                             label=f"δ = {threshold:g}")
            twin.set_ylabel("signal (mean over devices)", fontsize=8)
            twin.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def label_matrix(run: Run) -> np.ndarray:
    """(devices, classes) counts of trained samples per label, summed over steps."""
    counts: dict[int, dict[int, int]] = {}
    for rank in sorted(run.train):
        for row in run.train[rank]:
            for label, n in (row.get("label_hist") or {}).items():
                per = counts.setdefault(rank, {})
                per[int(label)] = per.get(int(label), 0) + int(n)
    own = run.partition.get("labels_per_device") or []
    labels = [l for per in counts.values() for l in per] + [l for ls in own for l in ls]
    classes = max(labels) + 1 if labels else 0
    devices = max(list(counts) + [len(own) - 1, len(run.train) - 1]) + 1
    matrix = np.zeros((devices, classes), dtype=np.int64)
    for rank, per in counts.items():
        for label, n in per.items():
            matrix[rank, label] = n
    return matrix


def plot_labels(reps, path):
    plt = _plt()
    fig, axes = _grid(plt, len(reps), height=3.6)
    for ax, run in zip(axes, reps):
        matrix = label_matrix(run)
        if matrix.sum() == 0:
            _empty(ax, f"{run.setting}: no label_hist logged")
            continue
        share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        own = run.partition.get("labels_per_device") or []
        pts = [(label, dev) for dev, ls in enumerate(own) for label in ls]
        if pts and matrix.shape[1] <= 40:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=8, c="white", marker="o", edgecolors="black", linewidths=0.4)
        ax.set_xlabel("label")
        ax.set_ylabel("device")
        _integer_ticks(ax, y=True)
        ax.set_title(f"{_run_title(run)}: labels trained", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------- entry point

def resolve_baseline(runs: list[Run], baseline: str | None) -> str | None:
    """The baseline setting: named by run dir, run name or setting; else the only ddp one."""
    if baseline is None:
        ddp = [name for name, members in settings(runs).items()
               if members[0].config.get("mode") == "ddp"]
        return ddp[0] if len(ddp) == 1 else None
    for run in runs:
        if baseline in (run.name, run.setting) or (
                Path(baseline).exists() and Path(baseline).resolve() == run.path.resolve()):
            return run.setting
    raise ReportError(f"--baseline {baseline}: not one of the runs (give a run directory, "
                      "a run label or a setting name)")


def write_report(runs: list[Run], out_dir: Path, target: float | None = None,
                 baseline: str | None = None) -> Path:
    """Write every plot and ``report.md`` to ``out_dir``; return the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_baseline(runs, baseline)
    note = "given with --target"
    if target is None:
        target = default_target(runs)
        note = "default: the lowest best top-1 among the settings, rounded down to 0.01"
    if base is not None and baseline is None:
        note += "; baseline by default: the only ddp setting"
    reps = [members[0] for members in settings(runs).values()]
    plots = {key: out_dir / name for key, name in PLOT_FILES.items()}
    plot_accuracy(runs, target, plots["accuracy"])
    plot_batch_sizes(reps, plots["batch_sizes"])
    plot_buffer(reps, plots["buffer"])
    plot_bytes(runs, plots["bytes"])
    plot_compression(reps, plots["compression"])
    plot_labels(reps, plots["labels"])
    report = out_dir / "report.md"
    report.write_text(render_markdown(runs, target, note, base, plots))
    return report


def parse_target(text: str) -> float:
    """A target accuracy as a fraction: 0.8 or 80 (percent) both mean 80%."""
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction (0.8) or a percent (80)")
    return value / 100 if value > 1 else value


def main(argv: list[str] | None = None) -> int:
    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter

    logsetup.configure("report")
    parser = argparse.ArgumentParser(prog="python -m scadles.report", description=__doc__.split(
        "\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="LOG_DIR of a run")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: first RUN_DIR's parent / report)")
    parser.add_argument("--target", type=parse_target, default=None,
                        help="target top-1 as a fraction or percent (default: the lowest best "
                             "top-1 among the settings)")
    parser.add_argument("--baseline", default=None,
                        help="run directory, label or setting that speedups are measured "
                             "against (default: the only ddp setting, if exactly one)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated names, one per RUN_DIR (a -seedN suffix groups "
                             "seeds)")
    parser.add_argument("--write-results", metavar="PAGE", type=Path, default=None,
                        help="regenerate the tables (and figures) of a results page from the "
                             "stored records next to it (docs/results/)")
    parser.add_argument("--verify-results", metavar="PAGE", type=Path, default=None,
                        help="regenerate a results page's tables from its stored records and "
                             "exit 1 on any difference")
    args = parser.parse_args(argv)
    if args.write_results or args.verify_results:
        return _results_page(args.write_results, args.verify_results)
    if not args.run_dirs:
        parser.error("give at least one RUN_DIR (or --write-results / --verify-results PAGE)")
    try:
        labels = [None] * len(args.run_dirs)
        if args.labels is not None:
            labels = [l.strip() for l in args.labels.split(",")]
            if len(labels) != len(args.run_dirs) or not all(labels):
                raise ReportError(f"--labels has {len(labels)} names for {len(args.run_dirs)} "
                                  "run directories: give one non-empty name per RUN_DIR")
        runs = [load_run(d, name) for d, name in zip(args.run_dirs, labels)]
        if args.baseline and not any(args.baseline in (r.name, r.setting) for r in runs) \
                and Path(args.baseline).is_dir() and not any(
                    Path(args.baseline).resolve() == r.path.resolve() for r in runs):
            runs.insert(0, load_run(args.baseline))
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ReportError(f"two runs are both named {dup!r}: pass --labels to tell them "
                              "apart")
        out = args.out or Path(args.run_dirs[0]).resolve().parent / "report"
        report = write_report(runs, out, args.target, args.baseline)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {report} ({len(PLOT_FILES)} plots in {report.parent})")
    return 0


def _results_page(write_page: Path | None, verify_page: Path | None) -> int:
    """--write-results / --verify-results (``scadles.results``)."""
    from scadles import results

    try:
        if write_page:
            results.write(write_page)
            print(f"{write_page}: tables and figures regenerated from "
                  f"{results.results_dir_of(write_page)}")
        if verify_page:
            same, diff = results.verify(verify_page)
            if not same:
                sys.stdout.write(diff)
                print(f"{verify_page}: differs from its stored records (above); regenerate it "
                      f"with --write-results", file=sys.stderr)
                return 1
            print(f"{verify_page}: every table matches the stored records")
    except results.ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
