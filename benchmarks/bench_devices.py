"""Many simulated devices per rank (``--devices-per-rank``): how far one machine goes.

Part 1 (default): D = 16, 100 and 1,000 devices in 2 gloo ranks (K = D / 2 each), S10 rates,
smallcnn on Fashion-MNIST, the virtual clock with the paper's ResNet152 step and exchange
times, in-process streams, 50 steps. Per D: wall seconds per step (training only, and the
whole launch), the peak RSS of each rank process (read from /proc while it runs; shared
pages count in both), the stream time the steps covered, and the samples the buffers held at
their peak (persistence keeps a fast stream's backlog: that, not the simulation, is what
grows with D; ``--policy truncation`` bounds it).

Part 2 (``--compare OLD NEW``): two results folders of ``reproduce_cpu.sh`` (say the grid as
16 ranks x 1 and as 2 ranks x 8): every run's training wall time side by side, with steps,
samples, stream time and final top-1 of each.

    .venv/bin/python benchmarks/bench_devices.py [--devices 16,100,1000 --steps 50]
    .venv/bin/python benchmarks/bench_devices.py --compare /tmp/old/results docs/results
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rank_pids(host_pid: int) -> dict[int, int]:
    """The rank processes (pid -> parent) under the launcher ``host_pid``: the forked
    children of its rank host."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    ranks, todo = {}, [host_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"scadles.rankhost" in cmd and pid != host_pid and \
                    b"scadles.rankhost" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks[child] = pid
            todo.append(child)
    return ranks


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_devices(devices: int, args, root: Path) -> dict:
    log_dir = root / f"d{devices}"
    cmd = [sys.executable, "-m", "scadles.launch", "--mode", "scadles", "--backend", "gloo",
           "--model-name", "smallcnn", "--dataset", "fashion-mnist", "--rates", args.rates,
           "--world-size", "2", "--devices-per-rank", str(devices // 2), "--clock", "virtual",
           "--compute-model", "paper-resnet152", "--comm-model", "paper-ethernet",
           "--source", "inprocess", "--policy", args.policy, "--max-steps", str(args.steps),
           "--eval-steps", "0", "--eval-samples", "1000", "--seed", str(args.seed),
           "--log-dir", str(log_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    with open(root / f"d{devices}.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        peaks: dict[int, float] = {}
        while proc.poll() is None:
            for pid in rank_pids(proc.pid):
                rss = peak_rss_mb(pid)
                if rss is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), rss)
            time.sleep(0.5)
    total_s = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"bench_devices: the {devices}-device run failed (exit {proc.returncode}): "
                 f"see {root / f'd{devices}.out'}")
    summary = json.loads((log_dir / "run.json").read_text())["summary"]
    rows = summary["devices"]
    return {"devices": devices, "rows": len(rows), "steps": summary["steps"],
            "train_s": summary["wall_s"], "total_s": total_s,
            "stream_s": summary["stream_s"], "samples": summary["samples"],
            "rss_mb": sorted(peaks.values(), reverse=True),
            "peak_buffer": sum(d["peak_buffer"] for d in rows)}


def part1(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-devices-"))
    results = []
    for devices in (int(d) for d in args.devices.split(",")):
        print(f"bench_devices: {devices} devices in 2 ranks, {args.steps} steps ...",
              file=sys.stderr, flush=True)
        results.append(run_devices(devices, args, root))
    print(f"\n{args.rates} rates, smallcnn on Fashion-MNIST, virtual clock (paper-resnet152, "
          f"paper-ethernet), in-process streams, policy {args.policy}, 2 gloo ranks, "
          f"seed {args.seed}; {os.cpu_count()} CPU cores\n")
    print("| devices | K per rank | device rows | steps | s/step (training) | launch total s "
          "| peak RSS per rank MB | RSS sum MB | stream s covered | samples trained "
          "| buffered at peak (sum) |")
    print("|" + "---|" * 11)
    for r in results:
        rss = r["rss_mb"]
        print(f"| {r['devices']:,} | {r['devices'] // 2} | {r['rows']:,} | {r['steps']} "
              f"| {r['train_s'] / max(1, r['steps']):.2f} | {r['total_s']:.0f} "
              f"| {' / '.join(f'{x:,.0f}' for x in rss) or '?'} | {sum(rss):,.0f} "
              f"| {r['stream_s']:.1f} | {r['samples']:,} | {r['peak_buffer']:,} |")
    print(f"\nlogs: {root}")


def part2(old: Path, new: Path) -> None:
    def records(folder: Path) -> dict[str, dict]:
        return {f"{p.parent.name}/{p.stem}": json.loads(p.read_text())
                for p in sorted(folder.glob("*/*.json"))}

    a, b = records(old), records(new)
    common = [k for k in a if k in b and "summary" in a[k] and "wall_s" in a[k]["summary"]]
    if not common:
        sys.exit(f"bench_devices: no run records in both {old} and {new}")

    def shape(record):
        c = record["config"]
        return f"{c['world_size']}x{c.get('devices_per_rank', 1)}"

    print(f"\nOld: {old}  New: {new}  ({len(common)} runs in both)\n")
    print("| run | ranks x K old / new | train wall s old | new | new/old | steps old/new "
          "| samples equal | stream s old / new | final top-1 old / new |")
    print("|" + "---|" * 9)
    total_a = total_b = 0.0
    same_samples = 0
    for key in common:
        sa, sb = a[key]["summary"], b[key]["summary"]
        total_a += sa["wall_s"]
        total_b += sb["wall_s"]
        same_samples += sa["samples"] == sb["samples"]
        top = "/".join("-" if s.get("final_top1") is None else f"{s['final_top1']:.2f}"
                       for s in (sa, sb))
        print(f"| {key} | {shape(a[key])} / {shape(b[key])} | {sa['wall_s']:.1f} "
              f"| {sb['wall_s']:.1f} | {sb['wall_s'] / sa['wall_s']:.2f} "
              f"| {sa['steps']}/{sb['steps']} | {'yes' if sa['samples'] == sb['samples'] else 'NO'} "
              f"| {sa['stream_s']:.1f} / {sb['stream_s']:.1f} | {top} |")
    print(f"| **all** | | {total_a:.0f} | {total_b:.0f} | {total_b / total_a:.2f} | "
          f"| {same_samples}/{len(common)} | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="16,100,1000", help="device counts (even)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rates", default="S10")
    p.add_argument("--policy", default="persistence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), type=Path,
                   help="compare two results folders of reproduce_cpu.sh instead")
    args = p.parse_args()
    if args.compare:
        part2(*args.compare)
    else:
        part1(args)


if __name__ == "__main__":
    main()
