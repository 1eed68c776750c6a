"""The results page: stored run records, the tables regenerated from them, and the check.

``execution_scripts/reproduce_cpu.sh`` stores each run's compact record (its configuration,
time model, summary, evaluations, and per-step batch sizes and times) as
``docs/results/<comparison>/<label>.json`` (``store``). Every table on ``docs/RESULTS.md``
sits between ``<!-- results:NAME -->`` and ``<!-- /results -->`` and is made by the block
function ``NAME`` from those records alone:

    python -m scadles.report --write-results docs/RESULTS.md    # regenerate tables, figures
    python -m scadles.report --verify-results docs/RESULTS.md   # exit 1 on any difference

Definitions used by the blocks (pure functions below):
- time to target: stream seconds of the first evaluation with top-1 >= target;
- speedup of a ScaDLES run: the ddp run of the same cell and seed's time to target over the
  run's. Where only one of the two reached the target, the speedup is bounded by the other
  run's end (``<`` or ``>``); a cell's speedup is the geometric mean over its seeds;
- accuracy change: top-1 of the ScaDLES run minus the ddp run's, each at the last evaluation
  at or before the stream time where the shorter of the two ended (equal stream time);
- predicted: ``scadles.predict`` on the seed's drawn rates with the run's settings, as
  step-bound - sample-bound (``predict.py`` explains both).
"""
from __future__ import annotations

import difflib
import json
import math
import re
import statistics
from pathlib import Path
from typing import Callable

RECORD_FORMAT = 1
TARGETS_PCT = (70, 75, 80, 85)
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)

# The paper's numbers (speedup over DDL; Table VI also the accuracy change in points).
PAPER_FIG6 = {("S1", "resnet152"): 3.33, ("S1", "vgg19"): 1.92,
              ("S10", "resnet152"): 3.6, ("S10", "vgg19"): 4.0}
PAPER_FIG6_NOTE = {"S2": "DDL ends more accurate", "S20": "not shown"}
PAPER_TABLE6 = {("S1", "resnet152"): (-0.06, 1.89), ("S1", "vgg19"): (-1.93, 1.56),
                ("S2", "resnet152"): (-0.32, 1.15), ("S2", "vgg19"): (-4.18, 2.83),
                ("S10", "resnet152"): (-0.13, 3.29), ("S10", "vgg19"): (-2.03, 2.06),
                ("S20", "resnet152"): (-0.21, 1.42), ("S20", "vgg19"): (-1.59, 2.13)}
VERDICT_FACTOR = 1.5  # "reproduced": within this factor of the paper's speedup


# ---------------------------------------------------------------- records

def compact(run_dir: str | Path) -> dict:
    """A run's compact record, from its ``run.json`` and rank logs."""
    from scadles.report import load_run

    run = load_run(run_dir)
    meta = json.loads((Path(run_dir) / "run.json").read_text())
    summary = dict(run.summary)
    devices = summary.pop("devices", None) or []
    for key in ("log_dir", "buffer"):
        summary.pop(key, None)
    steps = sorted({int(r["step"]) for rows in run.train.values() for r in rows})
    by_rank = {rank: {int(r["step"]): r for r in rows} for rank, rows in run.train.items()}
    ranks = sorted(by_rank)

    def column(key, reduce, default=None):
        out = []
        for s in steps:
            values = [by_rank[r][s].get(key) for r in ranks if s in by_rank[r]]
            values = [v for v in values if v is not None]
            out.append(reduce(values) if values else default)
        return out

    def first(values):
        return values[0]

    def rounded(values, digits=6):
        return [None if v is None else round(float(v), digits) for v in values]

    per_rank = {key: [[by_rank[r][s].get(key) if s in by_rank[r] else None for r in ranks]
                      for s in steps] for key in ("local_bsz",)}
    return {
        "format": RECORD_FORMAT,
        "config": meta.get("config", {}),
        "time_model": meta.get("time_model"),
        "git_commit": meta.get("git_commit"),
        "versions": meta.get("versions"),
        "summary": summary,
        "devices": devices,
        "evals": {k: [p.get(k) if k != "top1" and k != "top5" else
                      (None if p.get(k) is None else round(100 * p[k], 4))
                      for p in run.evals] for k in ("step", "clock_s", "top1", "top5", "loss")},
        "steps": {
            "step": steps,
            "clock_s": rounded(column("clock_s", max)),
            "global_bsz": column("global_bsz", first),
            "lr": rounded(column("lr", first), 8),
            "loss": rounded(column("loss", first)),
            "compute_s": rounded(column("compute_s", max)),
            "sync_s": rounded(column("sync_s", max)),
            "wait_s": rounded(column("wait_s", max)),
            "bytes_sent": column("bytes_sent", sum, 0),
            "floats_sent": column("floats_sent", sum, 0),
            "compressed": column("compressed", first),
            "signal": rounded(column("signal", statistics.fmean)),
            "buffer_peak": column("buffer_peak", max),
            "truncated": column("truncated", sum, 0),
            "dropped": column("dropped", sum, 0),
            "injected": column("injected", sum, 0),
            **per_rank,
        },
    }


def store(run_dir: str | Path, path: str | Path) -> Path:
    """Write ``run_dir``'s compact record to ``path`` (a .json file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(compact(run_dir), separators=(",", ":")) + "\n")
    return path


def load_records(results_dir: str | Path) -> dict[str, dict]:
    """Every stored record under ``results_dir``: "comparison/label" -> record."""
    root = Path(results_dir)
    records = {}
    for path in sorted(root.glob("*/*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT:
            records[f"{path.parent.name}/{path.stem}"] = doc
    return records


# ---------------------------------------------------------------- pure metrics

def evals(record: dict) -> list[dict]:
    e = record["evals"]
    return [dict(zip(e, values)) for values in zip(*e.values())]


def end_s(record: dict) -> float:
    """The stream time the run ended at (its last step or evaluation)."""
    clocks = [c for c in record["steps"]["clock_s"] + record["evals"]["clock_s"]
              if c is not None]
    return max(clocks) if clocks else 0.0


def time_to(record: dict, target_pct: float) -> float | None:
    """Stream seconds of the first evaluation with top-1 >= ``target_pct``."""
    for point in sorted(evals(record), key=lambda p: p["step"]):
        if point["top1"] is not None and point["top1"] >= target_pct:
            return float(point["clock_s"])
    return None


def top1_at(record: dict, t_s: float) -> float | None:
    """Top-1 (%) of the last evaluation at or before stream time ``t_s``."""
    before = [p for p in evals(record) if p["clock_s"] <= t_s + 1e-9 and p["top1"] is not None]
    return before[-1]["top1"] if before else None


def paired_speedup(ddp: dict, run: dict, target_pct: float) -> tuple[float | None, str]:
    """(speedup, relation): relation ``=`` (both reached the target), ``<`` / ``>`` (a bound:
    only ddp / only the run reached it), ``n/a`` (neither)."""
    t_d, t_r = time_to(ddp, target_pct), time_to(run, target_pct)
    if t_d is not None and t_r is not None:
        return t_d / t_r if t_r > 0 else math.inf, "="
    if t_d is not None:
        return t_d / end_s(run), "<"
    if t_r is not None:
        return end_s(ddp) / t_r, ">"
    return None, "n/a"


def accuracy_change(ddp: dict, run: dict) -> float | None:
    """Top-1 points of ``run`` minus ``ddp``'s at the stream time the shorter one ended."""
    t_s = min(end_s(ddp), end_s(run))
    a, b = top1_at(run, t_s), top1_at(ddp, t_s)
    return None if a is None or b is None else a - b


def bytes_to(record: dict, t_s: float | None) -> int:
    """Gradient bytes all devices sent until stream time ``t_s`` (the whole run if None)."""
    steps = record["steps"]
    return int(sum(b for b, c in zip(steps["bytes_sent"], steps["clock_s"])
                   if t_s is None or (c is not None and c <= t_s + 1e-9)))


def peak_buffer(record: dict) -> int:
    peaks = [int(d.get("peak_buffer") or 0) for d in record["devices"]]
    return max(peaks, default=0)


def capped(record: dict) -> bool:
    """The buffer capacity dropped samples (so the peak is the capacity, not the demand)."""
    return any(int(d.get("dropped") or 0) > 0 for d in record["devices"])


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def speedup_verdict(pairs: list[tuple[float | None, str]], paper: float | None) -> str:
    """reproduced: every seed faster than ddp and the geometric mean within
    ``VERDICT_FACTOR`` of the paper's; partly: faster on the geometric mean only, or
    outside that factor; not reproduced: not faster (or never reaching the target)."""
    values = [v for v, rel in pairs if v is not None]
    if not values or any(rel == "n/a" for _, rel in pairs):
        return "not reproduced"
    g = geomean(values)
    if g is None or g <= 1:
        return "not reproduced"
    every = all(v > 1 and not (rel == "<" and v <= 1) for v, rel in pairs)
    near = paper is not None and paper / VERDICT_FACTOR <= g <= paper * VERDICT_FACTOR
    return "reproduced" if every and near else "partly"


# ---------------------------------------------------------------- formatting

def _fmt_speedup(value: float | None, relation: str = "=") -> str:
    if value is None:
        return "n/a"
    prefix = {"<": "< ", ">": "> "}.get(relation, "")
    return f"{prefix}{value:.2f}x"


def _fmt(value, digits=1, suffix="") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:+.1f}"
    return f"{statistics.fmean(values):+.1f} ± {statistics.stdev(values):.1f}"


def _spread(pairs: list[tuple[float | None, str]]) -> str:
    """' (mean ± sd)' of the seeds' speedups when there are two or more."""
    values = [v for v, _ in pairs if v is not None]
    if len(values) < 2:
        return ""
    return f" ({statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the grid

GRID_NAME = re.compile(r"grid/(?P<timing>[a-z0-9]+)-(?P<rates>S\d+)-(?P<method>[\w.]+)"
                       r"-seed(?P<seed>\d+)")
RATE_SETS = ("S1", "S2", "S10", "S20")
TIMINGS = ("resnet152", "vgg19")


def grid_cells(records: dict[str, dict]) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(timing, rates, method) -> {seed: record} for the records named grid/..."""
    cells: dict[tuple[str, str, str], dict[int, dict]] = {}
    for name, record in records.items():
        m = GRID_NAME.fullmatch(name)
        if m:
            key = (m["timing"], m["rates"], m["method"])
            cells.setdefault(key, {})[int(m["seed"])] = record
    return cells


def predicted(record: dict):
    """``scadles.predict`` for a ScaDLES run's settings and its devices' rates (a compressed
    exchange when it compressed at all)."""
    from scadles.predict import predict

    c = record["config"]
    rates = [float(d["rate_per_s"]) for d in record["devices"]]
    ratio = c.get("compression_ratio") if c.get("compression", "none") != "none" else None
    return predict(rates, compute_model=c["compute_model"], comm_model=c["comm_model"],
                   b_min=c["min_train_bsz"], b_max=c["max_train_bsz"],
                   window_s=c["window_s"], train_bsz=c["train_bsz"], policy=c["policy"],
                   compression_ratio=ratio, step_when_full=bool(c.get("step_when_full")))


def mean_step_s(record: dict) -> float | None:
    """Stream seconds per training step (the last step's clock over the step count)."""
    steps = record["steps"]
    return steps["clock_s"][-1] / len(steps["step"]) if steps["step"] else None


def _cell_rows(cells, method: str, target_pct: float, paper_speedup: Callable,
               extra: Callable[..., list[str]] | None = None) -> list[list[str]]:
    """One row per (rates, timing) cell of ``method`` against ddp; ``extra(rates, timing,
    runs, ddps)`` adds the last columns."""
    rows = []
    for rates in RATE_SETS:
        for timing in TIMINGS:
            runs, ddps = cells.get((timing, rates, method), {}), cells.get((timing, rates, "ddp"), {})
            seeds = sorted(set(runs) & set(ddps))
            if not seeds:
                continue
            preds = [predicted(runs[s]) for s in seeds]
            pairs = [paired_speedup(ddps[s], runs[s], target_pct) for s in seeds]
            g = geomean([v for v, _ in pairs])
            relations = {rel for _, rel in pairs}
            paper = paper_speedup(rates, timing)
            slowest = [min(float(d["rate_per_s"]) for d in runs[s]["devices"]) for s in seeds]
            step_d = statistics.fmean(p.ddp.step_s for p in preds)
            step_s = statistics.fmean(p.scadles.step_s for p in preds)
            meas_d = statistics.fmean(mean_step_s(ddps[s]) for s in seeds)
            meas_s = statistics.fmean(mean_step_s(runs[s]) for s in seeds)
            row = [rates, timing, str(len(seeds)),
                   ", ".join(f"{r:.1f}" for r in slowest),
                   f"{step_d:.2f} / {step_s:.2f} → {meas_d:.2f} / {meas_s:.2f}",
                   f"{statistics.fmean(p.low for p in preds):.2f}–"
                   f"{statistics.fmean(p.high for p in preds):.2f}x",
                   ", ".join(_fmt_speedup(v, rel) for v, rel in pairs),
                   _fmt_speedup(g, "<" if relations == {"<"} else
                                (">" if relations == {">"} else "=")) + _spread(pairs),
                   "n/a" if paper is None else (paper if isinstance(paper, str)
                                                else f"{paper:.2f}x"),
                   _mean_sd([accuracy_change(ddps[s], runs[s]) for s in seeds])]
            if extra:
                row += extra(rates, timing, {s: runs[s] for s in seeds},
                             {s: ddps[s] for s in seeds})
            rows.append(row)
    return rows


def block_grid_fig6(records: dict, target_pct: float = 75) -> str:
    """ScaDLES with weighted aggregation alone (persistence) against ddp: the paper's Fig. 6."""
    cells = grid_cells(records)

    def paper(rates, timing):
        return PAPER_FIG6.get((rates, timing), PAPER_FIG6_NOTE.get(rates))

    def verdict(rates, timing, runs, ddps):
        seeds = sorted(runs)
        if rates == "S2":  # the paper: DDL ends more accurate
            changes = [accuracy_change(ddps[s], runs[s]) for s in seeds]
            changes = [c for c in changes if c is not None]
            if changes and all(c < 0 for c in changes):
                return ["reproduced (ddp more accurate)"]
            if changes and statistics.fmean(changes) < 0:
                return ["partly (ddp more accurate on average)"]
            return ["not reproduced (ScaDLES as accurate)"]
        pairs = [paired_speedup(ddps[s], runs[s], target_pct) for s in seeds]
        claim = PAPER_FIG6.get((rates, timing))
        if claim is None:  # Fig. 6 shows no such cell: nothing to reproduce, say which won
            faster = speedup_verdict(pairs, None) != "not reproduced"
            return ["no claim (ScaDLES faster)" if faster else "no claim (ddp faster)"]
        return [speedup_verdict(pairs, claim)]

    rows = _cell_rows(cells, "fig6", target_pct, paper, verdict)
    return _table(["Rates", "Timing", "Seeds", "Slowest stream (samples/s)",
                   "Step (s), ddp / ScaDLES: predicted → measured", "Predicted speedup",
                   f"Speedup to {target_pct:g}% per seed", "Geo. mean (mean ± sd)", "Paper (Fig. 6)",
                   "Accuracy change (pts)", "Verdict"], rows)


def block_grid_table6(records: dict, target_pct: float = 75) -> str:
    """The full system (truncation, adaptive Top-k) against ddp: the paper's Table VI."""
    cells = grid_cells(records)

    def paper(rates, timing):
        acc, speedup = PAPER_TABLE6[(rates, timing)]
        return f"{speedup:.2f}x, {acc:+.2f}"

    def extra(rates, timing, runs, ddps):
        seeds = sorted(runs)
        paper_acc, paper_speedup = PAPER_TABLE6[(rates, timing)]
        pairs = [paired_speedup(ddps[s], runs[s], target_pct) for s in seeds]
        verdict = speedup_verdict(pairs, paper_speedup)
        changes = [accuracy_change(ddps[s], runs[s]) for s in seeds]
        changes = [c for c in changes if c is not None]
        if verdict != "not reproduced" and changes and \
                statistics.fmean(changes) < paper_acc - 2:
            verdict = "partly" if verdict == "reproduced" else "not reproduced"
            verdict += " (accuracy)"
        peak_s = statistics.fmean(peak_buffer(runs[s]) for s in seeds)
        peak_d = statistics.fmean(peak_buffer(ddps[s]) for s in seeds)
        cap_d = any(capped(ddps[s]) for s in seeds)
        ratios = []
        for s in seeds:
            t_s, t_d = time_to(runs[s], target_pct), time_to(ddps[s], target_pct)
            if t_s is not None and t_d is not None and bytes_to(ddps[s], t_d):
                ratios.append(bytes_to(runs[s], t_s) / bytes_to(ddps[s], t_d))
        decisions = ", ".join(f"{runs[s]['summary'].get('compressed_steps') or 0}:"
                              f"{runs[s]['summary'].get('dense_steps') or 0}" for s in seeds)
        return [f"{peak_s:,.0f} / {peak_d:,.0f}{' (capacity)' if cap_d else ''}",
                "n/a" if not ratios else f"{statistics.fmean(ratios):.2f}",
                decisions, verdict]

    rows = _cell_rows(cells, "full", target_pct, paper, extra)
    return _table(["Rates", "Timing", "Seeds", "Slowest stream (samples/s)",
                   "Step (s), ddp / ScaDLES: predicted → measured", "Predicted speedup",
                   f"Speedup to {target_pct:g}% per seed", "Geo. mean (mean ± sd)",
                   "Paper (Table VI): speedup, accuracy change", "Accuracy change (pts)",
                   "Peak buffer ScaDLES / ddp (mean)", "Bytes to target / ddp's",
                   "Compressed : dense steps per seed", "Verdict"], rows)


def block_grid_bounded(records: dict, target_pct: float = 75) -> str:
    """Not in the paper: ScaDLES with ddp's batch as b_max and --step-when-full, against ddp."""
    cells = grid_cells(records)

    def verdict(rates, timing, runs, ddps):
        pairs = [paired_speedup(ddps[s], runs[s], target_pct) for s in sorted(runs)]
        g = geomean([v for v, _ in pairs])
        if g is None or any(rel == "n/a" for _, rel in pairs):
            return ["n/a"]
        return ["faster than ddp" if g > 1.05 else ("as fast as ddp" if g >= 0.95
                                                    else "slower than ddp")]

    rows = _cell_rows(cells, "bounded", target_pct, lambda rates, timing: "not in the paper",
                      verdict)
    return _table(["Rates", "Timing", "Seeds", "Slowest stream (samples/s)",
                   "Step (s), ddp / ScaDLES: predicted → measured", "Predicted speedup",
                   f"Speedup to {target_pct:g}% per seed", "Geo. mean (mean ± sd)", "Paper",
                   "Accuracy change (pts)", "Against ddp (±5%)"], rows)


def block_grid_targets(records: dict) -> str:
    """Speedup (geometric mean over seeds) at several targets, from the same runs."""
    cells = grid_cells(records)
    rows = []
    for method in ("fig6", "full", "bounded"):
        for rates in RATE_SETS:
            for timing in TIMINGS:
                runs, ddps = cells.get((timing, rates, method), {}), \
                    cells.get((timing, rates, "ddp"), {})
                seeds = sorted(set(runs) & set(ddps))
                if not seeds:
                    continue
                row = [method, rates, timing]
                for target in TARGETS_PCT:
                    pairs = [paired_speedup(ddps[s], runs[s], target) for s in seeds]
                    reached = sum(rel in ("=", ">") for _, rel in pairs)
                    reached_d = sum(rel in ("=", "<") for _, rel in pairs)
                    rels = {rel for _, rel in pairs}
                    g = geomean([v for v, _ in pairs])
                    rel = "<" if rels == {"<"} else (">" if rels == {">"} else "=")
                    row.append(f"{_fmt_speedup(g, rel)} ({reached}/{reached_d}/{len(seeds)})")
                rows.append(row)
    return _table(["Method", "Rates", "Timing"]
                  + [f"{t}% (ScaDLES/ddp reached, of seeds)" for t in TARGETS_PCT], rows)


def block_grid_runs(records: dict, target_pct: float = 75) -> str:
    """Every grid run: steps, stream time, mean batch, time to target, final top-1."""
    rows = []
    for name, record in sorted(records.items(), key=lambda kv: _grid_sort(kv[0])):
        m = GRID_NAME.fullmatch(name)
        if not m:
            continue
        s, steps = record["summary"], record["steps"]
        t = time_to(record, target_pct)
        pred = predicted(record)
        pace = pred.ddp if m["method"] == "ddp" else pred.scadles
        rows.append([m["timing"], m["rates"], m["method"], m["seed"],
                     f"{min(float(d['rate_per_s']) for d in record['devices']):.1f}",
                     f"{pace.step_s:.2f} → {mean_step_s(record):.2f}",
                     "-" if m["method"] == "ddp" else f"{pred.low:.2f}–{pred.high:.2f}x",
                     str(s["steps"]), f"{end_s(record):,.0f}",
                     f"{statistics.fmean(steps['global_bsz']):,.0f}" if steps["global_bsz"]
                     else "n/a",
                     "not reached" if t is None else f"{t:,.0f}",
                     f"{s['final_top1']:.2f}", s.get("stop_reason", "?")])
    return _table(["Timing", "Rates", "Method", "Seed", "Slowest stream",
                   "Step (s): predicted → measured", "Predicted speedup", "Steps",
                   "Stream time (s)", "Mean global batch", f"Time to {target_pct:g}% (s)",
                   "Final top-1 (%)", "Stopped by"], rows)


def _grid_sort(name: str):
    m = GRID_NAME.fullmatch(name)
    if not m:
        return (9, name)
    return (TIMINGS.index(m["timing"]) if m["timing"] in TIMINGS else 9,
            RATE_SETS.index(m["rates"]) if m["rates"] in RATE_SETS else 9,
            m["method"], int(m["seed"]))


def _versus(records: dict, comparison: str, baseline: str, target_pct: float,
            label_re: str) -> list[list[str]]:
    """Rows of runs named ``comparison/<label>-seedN`` against ``<baseline>-seedN``."""
    pattern = re.compile(rf"{comparison}/(?P<label>{label_re})-seed(?P<seed>\d+)")
    runs: dict[str, dict[int, dict]] = {}
    for name, record in records.items():
        m = pattern.fullmatch(name)
        if m:
            runs.setdefault(m["label"], {})[int(m["seed"])] = record
    base = runs.get(baseline, {})
    rows = []
    for label in sorted(runs, key=lambda l: (l != baseline, l)):
        seeds = sorted(runs[label])
        pairs = [paired_speedup(base[s], runs[label][s], target_pct) for s in seeds
                 if s in base]
        rows.append([label, str(len(seeds)),
                     ", ".join("not reached" if time_to(runs[label][s], target_pct) is None
                               else f"{time_to(runs[label][s], target_pct):,.0f}"
                               for s in seeds),
                     "1.00x" if label == baseline else
                     (", ".join(_fmt_speedup(v, rel) for v, rel in pairs) or "n/a"),
                     ", ".join(f"{runs[label][s]['summary']['final_top1']:.2f}"
                               for s in seeds),
                     ", ".join(f"{mean_step_s(runs[label][s]):.2f}" for s in seeds)])
    return rows


ABLATION_NAME = re.compile(r"ablations/(?P<timing>[a-z0-9]+)-(?P<rates>S\d+)-"
                           r"(?P<method>[\w.-]+?)-seed(?P<seed>\d+)")


def block_ablations(records: dict, target_pct: float = 75) -> str:
    """Each ablation against its ddp baseline (the model without batch norm has its own), and
    the grid run it varies against the grid's ddp, for the same seed."""
    cells = grid_cells(records)
    ablations: dict[tuple, dict] = {}
    for name, record in records.items():
        m = ABLATION_NAME.fullmatch(name)
        if m:
            ablations[(m["timing"], m["rates"], m["method"], int(m["seed"]))] = record
    rows = []
    for (timing, rates, method, seed), record in sorted(ablations.items()):
        nobn = method.endswith("-nobn") and method != "ddp-nobn"
        base = (ablations.get((timing, rates, "ddp-nobn", seed)) if nobn
                else cells.get((timing, rates, "ddp"), {}).get(seed))
        varied = method.split("-", 1)[0]  # ddp, fig6 or full: the grid run it varies
        grid = cells.get((timing, rates, varied), {}).get(seed)
        grid_ddp = cells.get((timing, rates, "ddp"), {}).get(seed)
        if base is None:
            continue
        v, rel = paired_speedup(base, record, target_pct)
        if grid is not None and grid_ddp is not None and grid is not grid_ddp:
            vg, relg = paired_speedup(grid_ddp, grid, target_pct)
            grid_text = f"{varied}: {_fmt_speedup(vg, relg)}"
        else:
            grid_text = f"{varied}: 1.00x"
        t = time_to(record, target_pct)
        rows.append([method, rates, timing, str(seed), f"{mean_step_s(record):.2f}",
                     "not reached" if t is None else f"{t:,.0f}",
                     f"{_fmt_speedup(v, rel)} (over {'ddp-nobn' if nobn else 'grid ddp'})",
                     grid_text, f"{record['summary']['final_top1']:.2f}",
                     f"{max((p['top1'] for p in evals(record) if p['top1'] is not None), default=0):.2f}"])
    return _table(["Run", "Rates", "Timing", "Seed", "Mean step (s)",
                   f"Time to {target_pct:g}% (s)", "Speedup over its ddp",
                   "The grid run it varies, over grid ddp", "Final top-1 (%)",
                   "Best top-1 (%)"], rows)


def block_window(records: dict, target_pct: float = 75) -> str:
    """ddp, ScaDLES as the paper defines the window, and --step-when-full."""
    rows = _versus(records, "window", "ddp", target_pct, r"[\w.-]+?")
    return _table(["Run", "Seeds", f"Time to {target_pct:g}% (s) per seed",
                   "Speedup over ddp per seed", "Final top-1 (%) per seed",
                   "Mean step (s) per seed"], rows)


def block_tablev(records: dict) -> str:
    """Adaptive Top-k over delta x compression ratio: CNC, accuracy, floats sent."""
    pattern = re.compile(r"tablev/(?P<label>[\w.-]+)")
    dense = records.get("tablev/none")
    dense_floats = sum(dense["steps"]["floats_sent"]) / len(dense["steps"]["step"]) \
        if dense and dense["steps"]["step"] else None
    rows = []
    for name, record in sorted(records.items()):
        m = pattern.fullmatch(name)
        if not m:
            continue
        c, s, steps = record["config"], record["summary"], record["steps"]
        per_step = sum(steps["floats_sent"]) / len(steps["step"]) if steps["step"] else 0
        cnc = s.get("cnc_ratio")
        rows.append([c.get("compression", "none"),
                     "-" if c.get("compression") == "none" else f"{c['compression_ratio']:g}",
                     "-" if c.get("compression") != "adaptive" else f"{c['delta_threshold']:g}",
                     str(s["steps"]),
                     "n/a" if cnc is None else ("all" if math.isinf(cnc) else f"{cnc:.2f}"),
                     f"{s['final_top1']:.2f}", f"{s['best_top1']:.2f}",
                     f"{per_step / dense_floats:.3f}" if dense_floats else "n/a",
                     f"{mean_step_s(record):.2f}"])
    rows.sort(key=lambda r: (r[0] != "none", r[1], r[2]))
    return _table(["Compression", "CR", "δ", "Steps", "CNC", "Final top-1 (%)",
                   "Best top-1 (%)", "Floats sent per step / dense", "Mean step (s)"], rows)


def block_clocks(records: dict) -> str:
    """A real-time run over the embedded broker against its virtual-clock replay."""
    wall, virtual = records.get("clocks/wall"), records.get("clocks/virtual")
    if not wall or not virtual:
        return "(no clocks/wall and clocks/virtual records)\n"
    sw, sv = wall["steps"], virtual["steps"]
    n = min(len(sw["step"]), len(sv["step"]))

    def deltas(clocks):
        return [b - a for a, b in zip([0.0] + clocks[:-1], clocks)]

    dw, dv = deltas(sw["clock_s"][:n]), deltas(sv["clock_s"][:n])
    bw, bv = sw["global_bsz"][:n], sv["global_bsz"][:n]
    lw = [x for row in sw["local_bsz"][:n] for x in row]
    lv = [x for row in sv["local_bsz"][:n] for x in row]
    ew = {p["step"]: p["top1"] for p in evals(wall)}
    ev = {p["step"]: p["top1"] for p in evals(virtual)}
    both = sorted(set(ew) & set(ev))

    def mad(a, b):
        return statistics.fmean(abs(x - y) for x, y in zip(a, b)) if a else float("nan")

    rows = [
        ["steps compared", str(len(sw["step"])), str(len(sv["step"])), str(n)],
        ["compute model", wall["config"]["compute_model"], virtual["config"]["compute_model"],
         ""],
        ["comm model", wall["config"]["comm_model"], virtual["config"]["comm_model"], ""],
        ["mean step (s)", f"{statistics.fmean(dw):.3f}", f"{statistics.fmean(dv):.3f}",
         f"mean abs. difference per step {mad(dw, dv):.3f} s"],
        ["stream time at step n (s)", f"{sw['clock_s'][n - 1]:.1f}",
         f"{sv['clock_s'][n - 1]:.1f}",
         f"{100 * (sv['clock_s'][n - 1] / sw['clock_s'][n - 1] - 1):+.1f}%"],
        ["mean global batch", f"{statistics.fmean(bw):.1f}", f"{statistics.fmean(bv):.1f}",
         f"mean abs. difference per step {mad(bw, bv):.1f}"],
        ["mean local batch", f"{statistics.fmean(lw):.1f}", f"{statistics.fmean(lv):.1f}",
         f"mean abs. difference per device and step {mad(lw, lv):.1f}"],
        ["mean wait per step after the first (s)",
         f"{statistics.fmean(sw['wait_s'][1:n] or [0.0]):.3f}",
         f"{statistics.fmean(sv['wait_s'][1:n] or [0.0]):.3f}", ""],
        ["top-1 at the common evaluations (%)",
         ", ".join(f"{ew[s]:.1f}" for s in both), ", ".join(f"{ev[s]:.1f}" for s in both),
         f"mean abs. difference {mad([ew[s] for s in both], [ev[s] for s in both]):.2f} pts"
         if both else ""],
    ]
    return _table(["", "wall clock (Kafka, measured compute)", "virtual replay",
                   "difference"], rows)


def block_buffer(records: dict) -> str:
    """Persistence against truncation on fast streams: the most samples a device held."""
    pattern = re.compile(r"buffer/(?P<policy>persistence|truncation)-seed(?P<seed>\d+)")
    by_seed: dict[int, dict[str, dict]] = {}
    for name, record in records.items():
        m = pattern.fullmatch(name)
        if m:
            by_seed.setdefault(int(m["seed"]), {})[m["policy"]] = record
    rows = []
    for seed in sorted(by_seed):
        p, t = by_seed[seed].get("persistence"), by_seed[seed].get("truncation")
        if not p or not t:
            continue
        rows.append([str(seed), f"{end_s(p):,.0f}", f"{peak_buffer(p):,}", f"{peak_buffer(t):,}",
                     f"{peak_buffer(p) / max(peak_buffer(t), 1):,.0f}x",
                     f"{p['summary']['samples']:,} / {t['summary']['samples']:,}",
                     f"{sum(t['steps']['truncated']):,}",
                     f"{p['summary']['final_top1']:.2f} / {t['summary']['final_top1']:.2f}"])
    return _table(["Seed", "Stream time (s)", "Peak buffer, persistence",
                   "Peak buffer, truncation", "Ratio", "Samples trained, pers. / trunc.",
                   "Truncated", "Final top-1 pers. / trunc. (%)"], rows)


def block_inject(records: dict, target_pct: float = 70) -> str:
    """One-label devices without and with randomized data injection."""
    rows = []
    for name, record in sorted(records.items()):
        if not name.startswith("inject/"):
            continue
        s, c = record["summary"], record["config"]
        t = time_to(record, target_pct)
        best = max((p["top1"] for p in evals(record) if p["top1"] is not None), default=None)
        rows.append([name.split("/", 1)[1], c.get("model_name", "?"), c.get("partition", "?"),
                     f"{c.get('alpha', 0):g}", f"{s['samples']:,}",
                     f"{sum(record['steps']['injected']):,}", f"{s['final_top1']:.2f}",
                     _fmt(best, 2), f"{s['final_top5']:.2f}",
                     "not reached" if t is None else f"{t:,.0f}"])
    return _table(["Run", "Model", "Partition", "alpha = beta", "Samples trained", "Injected",
                   "Final top-1 (%)",
                   "Best top-1 (%)", "Final top-5 (%)", f"Time to {target_pct:g}% (s)"], rows)


def block_compute_fit(results_dir: Path) -> str:
    """The presets' shape: the real models' step time on this CPU, and the fitted line."""
    path = results_dir / "compute_fit.json"
    if not path.is_file():
        return "(no compute_fit.json)\n"
    doc = json.loads(path.read_text())
    rows = []
    for name, r in doc["models"].items():
        fit = [r["A_s"] + r["B_s"] * b for b in r["batches"]]
        worst = max(abs(f - t) / t for f, t in zip(fit, r["seconds"]))
        rows.append([name, f"{r['params'] / 1e6:.1f}M",
                     ", ".join(f"{b}: {t:.2f}" for b, t in zip(r["batches"], r["seconds"])),
                     f"{r['A_s']:.3f} + {r['B_s']:.4f} x b", f"{100 * worst:.0f}%",
                     f"{r['A_in_samples']:.1f}",
                     f"{r['scaled_A_s']:.3f} + {r['scaled_B_s']:.5f} x b"])
    return (f"Measured {doc['measured_at']} on {doc['device']} (torch {doc['torch']}, median "
            f"of {doc['repeats']}):\n\n" + _table(
                ["Model", "Params (CIFAR variant)", "Step time (s) by batch",
                 "Fit A + B x b (s)", "Worst fit error", "A / B (samples)",
                 "Preset: scaled to the paper's batch-64 time"], rows))


def block_provenance(results_dir: Path, records: dict) -> str:
    """Which invocation of the script made which comparison's records, at which commit."""
    path = results_dir / "provenance.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    runs: dict[str, list[str]] = {}
    by_key: dict[str, dict] = {}
    for comparison, run in sorted((doc.get("comparisons") or {}).items()):
        key = json.dumps({k: run.get(k) for k in ("commit", "started")}, sort_keys=True)
        runs.setdefault(key, []).append(comparison)
        by_key[key] = run
    lines = [f"{len(records)} stored run records (`results/` next to this page)."]
    for key, comparisons in runs.items():
        run = by_key[key]
        counted = sum(1 for name in records if name.split("/", 1)[0] in comparisons)
        lines.append(f"- {', '.join(comparisons)} ({counted} records): `{run.get('command')}` "
                     f"at commit `{run.get('commit')}`"
                     f"{' with uncommitted changes' if run.get('dirty') else ''}, started "
                     f"{run.get('started')}, {run.get('wall_s')} s of wall time on "
                     f"{run.get('cpus')} CPU cores{' (QUICK=1)' if run.get('quick') else ''}.")
    commits = sorted({str(r.get("git_commit")) for r in records.values()})
    lines.append("- Commits the runs recorded: " + ", ".join(f"`{c}`" for c in commits) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the page

def blocks(results_dir: Path, records: dict) -> dict[str, Callable[[], str]]:
    """Block name -> the function that writes it."""
    return {
        "provenance": lambda: block_provenance(results_dir, records),
        "compute-fit": lambda: block_compute_fit(results_dir),
        "grid-fig6": lambda: block_grid_fig6(records),
        "grid-table6": lambda: block_grid_table6(records),
        "grid-bounded": lambda: block_grid_bounded(records),
        "grid-targets": lambda: block_grid_targets(records),
        "grid-runs": lambda: block_grid_runs(records),
        "ablations": lambda: block_ablations(records),
        "window": lambda: block_window(records),
        "tablev": lambda: block_tablev(records),
        "clocks": lambda: block_clocks(records),
        "buffer": lambda: block_buffer(records),
        "inject": lambda: block_inject(records),
    }


class ResultsError(RuntimeError):
    """A page or a records folder that cannot be rendered; one line."""


def render(page_text: str, results_dir: Path) -> str:
    """``page_text`` with every results block regenerated from ``results_dir``."""
    records = load_records(results_dir)
    makers = blocks(results_dir, records)
    unknown = [m[2] for m in BLOCK.finditer(page_text) if m[2] not in makers]
    if unknown:
        raise ResultsError(f"unknown results block(s) {', '.join(unknown)}; known: "
                           + ", ".join(makers))
    return BLOCK.sub(lambda m: m[1] + makers[m[2]]() + m[4], page_text)


def results_dir_of(page: Path) -> Path:
    return page.resolve().parent / "results"


def verify(page: str | Path) -> tuple[bool, str]:
    """(matches, unified diff): the page against its tables regenerated from the records."""
    page = Path(page)
    if not page.is_file():
        raise ResultsError(f"{page}: no such page")
    folder = results_dir_of(page)
    if not folder.is_dir():
        raise ResultsError(f"{folder}: no stored records next to the page (run "
                           "execution_scripts/reproduce_cpu.sh)")
    text = page.read_text()
    if not BLOCK.search(text):
        raise ResultsError(f"{page}: no <!-- results:NAME --> blocks to verify")
    fresh = render(text, folder)
    diff = "".join(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True),
                                        f"{page} (as written)", f"{page} (regenerated)"))
    return fresh == text, diff


def write(page: str | Path, figures: bool = True) -> Path:
    """Regenerate the page's blocks (and its figures) in place."""
    page = Path(page)
    folder = results_dir_of(page)
    page.write_text(render(page.read_text(), folder))
    if figures:
        from scadles import results_figures

        results_figures.write_all(load_records(folder), page.resolve().parent / "figures")
    return page


def main(argv: list[str] | None = None) -> int:
    """``python -m scadles.results store RUN_DIR OUT.json``: one run's compact record."""
    import argparse
    import sys

    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter

    logsetup.configure("results")

    p = argparse.ArgumentParser(prog="python -m scadles.results",
                                description="Store a run's compact record for the results page",
                                formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("store", help="write RUN_DIR's compact record to OUT (.json)",
                       formatter_class=DefaultsHelpFormatter)
    s.add_argument("run_dir")
    s.add_argument("out")
    args = p.parse_args(argv)
    from scadles.report import ReportError

    try:
        path = store(args.run_dir, args.out)
    except (ReportError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"stored {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
