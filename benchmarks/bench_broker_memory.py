"""How many device topics the embedded broker (Tansu, memory storage, no retention) holds.

It keeps every record in memory for the life of a run. This measures its resident memory per
record for Fashion-MNIST-sized (1x28x28) and CIFAR-sized (3x32x32) samples: it produces
``--records`` records of each into a fresh embedded broker (one topic per device, virtual
pace) and reads the broker process's RSS before and after. From that, at the paper's mean
per-device rates (S1 38, S10 64, S20 256, S2 300 samples/s), the device-minutes of stream
that ``--memory-gb`` of broker memory holds.

    .venv/bin/python benchmarks/bench_broker_memory.py [--records 200000 --memory-gb 16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamsim.broker import EmbeddedBroker  # noqa: E402
from streamsim.datasets import ArrayDataset  # noqa: E402
from streamsim.produce import produce  # noqa: E402
from streamsim.schedule import RateSchedule  # noqa: E402
from streamsim.stream import DeviceStream  # noqa: E402

RATES = {"S1": 38.0, "S10": 64.0, "S20": 256.0, "S2": 300.0}  # mean samples/s per device


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure(shape: tuple[int, int, int], records: int, devices: int) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(512, *shape), dtype=np.uint8)
    dataset = ArrayDataset("bench", np.arange(512) % 10, 10, images)
    rate = 1000.0
    duration_s = records / devices / rate
    streams = [DeviceStream(dataset, np.arange(512), RateSchedule([(0, rate)]), d, seed=1)
               for d in range(devices)]
    with EmbeddedBroker() as broker:
        time.sleep(1.0)
        before = rss_mb(broker.process.pid)
        summary = produce(broker.bootstrap, streams, dataset, duration_s, "virtual",
                          "bench-")
        time.sleep(2.0)
        after = rss_mb(broker.process.pid)
    n = summary["records"]
    return {"shape": "x".join(map(str, shape)), "records": n,
            "payload": int(np.prod(shape)), "before_mb": before, "after_mb": after,
            "bytes_per_record": (after - before) * 2**20 / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--memory-gb", type=float, default=16.0,
                   help="broker memory to size against (this machine: 24 GB in all)")
    args = p.parse_args()
    rows = [measure(shape, args.records, args.devices) for shape in ((1, 28, 28), (3, 32, 32))]
    print(f"\nEmbedded broker (Tansu, memory storage), {args.devices} topics, "
          f"{args.records:,} records per sample size\n")
    print("| sample | pixel bytes | records | broker RSS before / after MB | bytes per record "
          "| overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['payload']:,} | {r['records']:,} | {r['before_mb']:.0f} / "
              f"{r['after_mb']:.0f} | {r['bytes_per_record']:,.0f} | "
              f"{r['bytes_per_record'] / r['payload']:.2f}x |")
    budget = args.memory_gb * 2**30
    print(f"\nDevice-minutes of stream in {args.memory_gb:g} GB of broker memory "
          f"(devices x minutes), at the paper's mean rates:\n")
    print("| sample | " + " | ".join(f"{k} ({v:g}/s)" for k, v in RATES.items()) + " |")
    print("|---|" + "---|" * len(RATES))
    for r in rows:
        cells = [f"{budget / (r['bytes_per_record'] * rate * 60):,.0f}"
                 for rate in RATES.values()]
        print(f"| {r['shape']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
