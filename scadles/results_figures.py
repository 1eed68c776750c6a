"""The results page's figures, drawn from the stored run records alone (``scadles.results``).

``write_all(records, folder)`` writes every figure whose records exist; each plot's title
names the rate set, the time model and the seed it shows.
"""
from __future__ import annotations

from pathlib import Path

from scadles.metrics import config_devices
from scadles.results import RATE_SETS, TIMINGS, evals, grid_cells, paired_speedup

DRAWS = 300  # rate draws per rate set for the predicted speedups
METHOD_LABELS = {"ddp": "ddp (batch 64, persistence)",
                 "fig6": "ScaDLES, weighted aggregation (Fig. 6)",
                 "full": "ScaDLES full: truncation + adaptive Top-k (Table VI)",
                 "bounded": "ScaDLES, b_max 64 and --step-when-full (not in the paper)"}
TIMING_LABELS = {"resnet152": "ResNet152 on K80", "vgg19": "VGG19 on K80"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)


def speedup_against_slowest_rate(records: dict, path: Path, target_pct: float = 75) -> bool:
    """Predicted speedup bounds over many rate draws, and every run as a point."""
    from scadles.predict import predict
    from streamsim.schedule import parse_rates

    cells = grid_cells(records)
    if not cells:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=True)
    colors = {"resnet152": "tab:blue", "vgg19": "tab:red"}
    for ax, method in zip(axes, ("fig6", "full", "bounded")):
        if not any(m == method for _, _, m in cells):
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(METHOD_LABELS[method], fontsize=10)
            continue
        for timing in TIMINGS:
            for rates in RATE_SETS:
                runs = cells.get((timing, rates, method), {})
                ddps = cells.get((timing, rates, "ddp"), {})
                if not runs:
                    continue
                c = next(iter(runs.values()))["config"]
                ratio = c["compression_ratio"] if c.get("compression", "none") != "none" else None
                xs, lows, highs = [], [], []
                for draw in range(DRAWS):
                    r = parse_rates(rates, config_devices(c), 10_000 + draw)
                    p = predict(r, compute_model=c["compute_model"], comm_model=c["comm_model"],
                                b_min=c["min_train_bsz"], b_max=c["max_train_bsz"],
                                window_s=c["window_s"], train_bsz=c["train_bsz"],
                                policy=c["policy"], compression_ratio=ratio,
                                step_when_full=bool(c.get("step_when_full")))
                    xs.append(min(r))
                    lows.append(p.low)
                    highs.append(p.high)
                ax.vlines(xs, lows, highs, color=colors[timing], alpha=0.06, linewidth=2)
                for seed, run in runs.items():
                    if seed not in ddps:
                        continue
                    value, relation = paired_speedup(ddps[seed], run, target_pct)
                    if value is None:
                        continue
                    x = min(float(d["rate_per_s"]) for d in run["devices"])
                    marker = {"=": "o", "<": "v", ">": "^"}[relation]
                    ax.scatter([x], [value], color=colors[timing], marker=marker, s=40,
                               edgecolors="black", linewidths=0.5, zorder=3)
        for timing in TIMINGS:
            ax.scatter([], [], color=colors[timing], marker="o", edgecolors="black",
                       label=f"measured, {TIMING_LABELS[timing]} (v: at most, ^: at least)")
            ax.plot([], [], color=colors[timing], alpha=0.4, linewidth=4,
                    label=f"predicted range over {DRAWS} draws per rate set")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("slowest stream's rate (samples/s)")
        ax.set_title(METHOD_LABELS[method], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel(f"speedup over ddp, time to {target_pct:g}% top-1")
    _save(plt, fig, path)
    return True


def grid_accuracy(records: dict, path: Path, seed: int = 0) -> bool:
    """Top-1 against stream time for every cell's three methods, one seed."""
    cells = grid_cells(records)
    panels = [(rates, timing) for rates in RATE_SETS for timing in TIMINGS
              if (timing, rates, "ddp") in cells and seed in cells[(timing, rates, "ddp")]]
    if not panels:
        return False
    plt = _plt()
    rows = -(-len(panels) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (rates, timing) in zip(axes.flat, panels):
        for method in ("ddp", "fig6", "full", "bounded"):
            run = cells.get((timing, rates, method), {}).get(seed)
            if run is None:
                continue
            points = [p for p in evals(run) if p["top1"] is not None]
            ax.plot([p["clock_s"] for p in points], [p["top1"] for p in points],
                    label=METHOD_LABELS[method], linewidth=1.2)
        ax.set_title(f"{rates}, {TIMING_LABELS[timing]} timing, seed {seed}", fontsize=9)
        ax.set_xlabel("stream time (s)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _save(plt, fig, path)
    return True


def grid_batch_sizes(records: dict, path: Path, rates: str = "S10", timing: str = "resnet152",
                     seed: int = 0) -> bool:
    cells = grid_cells(records)
    runs = {m: cells.get((timing, rates, m), {}).get(seed) for m in ("ddp", "fig6", "full")}
    if not any(runs.values()):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for method, run in runs.items():
        if run is None:
            continue
        s = run["steps"]
        axes[0].plot(s["clock_s"], s["global_bsz"], label=METHOD_LABELS[method])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("stream time (s)")
    axes[0].set_ylabel("global batch B (samples)")
    axes[0].set_title(f"Global batch, {rates}, {TIMING_LABELS[timing]} timing, seed {seed}",
                      fontsize=9)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    run = runs.get("fig6") or runs.get("full")
    if run is not None:
        s = run["steps"]
        for device in range(len(s["local_bsz"][0]) if s["local_bsz"] else 0):
            axes[1].plot(s["clock_s"], [row[device] for row in s["local_bsz"]], linewidth=0.8,
                         label=f"device {device}" if device < 4 else None)
        axes[1].set_xlabel("stream time (s)")
        axes[1].set_ylabel("local batch b_i (samples)")
        method = "fig6" if runs.get("fig6") is not None else "full"
        axes[1].set_title(f"Local batches, {METHOD_LABELS[method]}", fontsize=9)
        axes[1].legend(fontsize=7, title="first four of the devices", title_fontsize=7)
        axes[1].grid(alpha=0.3)
    _save(plt, fig, path)
    return True


def buffer_length(records: dict, path: Path, seed: int = 0) -> bool:
    runs = {p: records.get(f"buffer/{p}-seed{seed}") for p in ("persistence", "truncation")}
    if not all(runs.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, run in runs.items():
        s = run["steps"]
        ax.plot(s["clock_s"], s["buffer_peak"], label=policy)
    ax.set_yscale("log")
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("most samples a device held during the step")
    c = runs["persistence"]["config"]
    ax.set_title(f"Buffer peak per step (largest device), {config_devices(c)} devices, "
                 f"{c['rates']}, seed {seed}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(plt, fig, path)
    return True


def clocks(records: dict, path: Path) -> bool:
    wall, virtual = records.get("clocks/wall"), records.get("clocks/virtual")
    if not wall or not virtual:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run in (("wall clock", wall), ("virtual replay", virtual)):
        s = run["steps"]
        durations = [b - a for a, b in zip([0.0] + s["clock_s"][:-1], s["clock_s"])]
        axes[0].plot(s["step"], durations, label=label, linewidth=1)
        axes[1].plot(s["step"], s["global_bsz"], label=label, linewidth=1)
        points = [p for p in evals(run) if p["top1"] is not None]
        axes[2].plot([p["step"] for p in points], [p["top1"] for p in points], marker="o",
                     markersize=3, label=label)
    for ax, ylabel in zip(axes, ("step duration (s)", "global batch B", "test top-1 (%)")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    c = wall["config"]
    axes[0].set_title(f"{config_devices(c)} devices at {c['rates']} samples/s, seed {c['seed']}",
                      fontsize=9)
    _save(plt, fig, path)
    return True


def tablev(records: dict, path: Path) -> bool:
    runs = {n: r for n, r in records.items() if n.startswith("tablev/")
            and r["config"].get("compression") == "adaptive"}
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_ratio: dict[float, list] = {}
    for run in runs.values():
        c, s = run["config"], run["summary"]
        by_ratio.setdefault(c["compression_ratio"], []).append(
            (c["delta_threshold"], s.get("compressed_steps") or 0, s.get("steps") or 1,
             s["final_top1"]))
    for ratio, points in sorted(by_ratio.items()):
        points.sort()
        axes[0].plot([p[0] for p in points], [p[1] / p[2] for p in points], marker="o",
                     label=f"CR {ratio:g}")
        axes[1].plot([p[0] for p in points], [p[3] for p in points], marker="o",
                     label=f"CR {ratio:g}")
    dense = records.get("tablev/none")
    if dense:
        axes[1].axhline(dense["summary"]["final_top1"], color="grey", linestyle="--",
                        label="no compression")
    axes[0].set_ylabel("share of steps compressed")
    axes[1].set_ylabel("final top-1 (%)")
    for ax in axes:
        ax.set_xlabel("δ (compress when the signal is at most δ)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    c = next(iter(runs.values()))["config"]
    fig.suptitle(f"Adaptive Top-k, {config_devices(c)} devices, {c['rates']}, seed {c['seed']}",
                 fontsize=10)
    _save(plt, fig, path)
    return True


def inject_accuracy(records: dict, path: Path) -> bool:
    runs = {n.split("/", 1)[1]: r for n, r in records.items() if n.startswith("inject/")}
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, run in sorted(runs.items()):
        points = [p for p in evals(run) if p["top1"] is not None]
        ax.plot([p["clock_s"] for p in points], [p["top1"] for p in points], marker="o",
                markersize=3, label=label)
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("test top-1 (%)")
    c = next(iter(runs.values()))["config"]
    ax.set_title(f"{config_devices(c)} one-label devices ({c['model_name']}), with and without "
                 "injection", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


FIGURES = {
    "grid-speedup.png": speedup_against_slowest_rate,
    "grid-accuracy.png": grid_accuracy,
    "grid-batch-sizes.png": grid_batch_sizes,
    "buffer-length.png": buffer_length,
    "clocks.png": clocks,
    "tablev.png": tablev,
    "inject-accuracy.png": inject_accuracy,
}


def write_all(records: dict, folder: Path) -> list[Path]:
    """Every figure that has its records, into ``folder``; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    return [folder / name for name, draw in FIGURES.items() if draw(records, folder / name)]
