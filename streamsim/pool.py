"""The shared injection pool: an IID sample of the whole training set, streamed on one topic.

``make_pool_stream`` is the pool's stream: every sample of the dataset, replayed in a fresh
shuffled order each pass, at one rate, its records carrying device id ``POOL_DEVICE``.
``fill_pool`` (and its command line) writes it onto a topic through ``streamsim.produce``;
the launcher starts it for ``--inject-from pool``. Trainers read the pool with their own
offsets (``scadles.inject``); in-process runs generate the identical records from
``make_pool_stream`` without a broker.

    python -m streamsim.pool --bootstrap 127.0.0.1:9092 --dataset fashion-mnist \\
        --topic pool --rate 64 --duration 60 --pace virtual --seed 0
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

import numpy as np

from streamsim.schedule import ARRIVALS, RateSchedule
from streamsim.stream import DeviceStream

POOL_DEVICE = 0xFFFF  # device id written in pool records (the header's device is uint16)


def make_pool_stream(dataset, rate_per_s: float, seed: int,
                     arrivals: str = "even") -> DeviceStream:
    """The pool's stream: the whole training set (an IID sample), replayed in a fresh
    shuffled order each pass, at ``rate_per_s``; records carry device id ``POOL_DEVICE``."""
    if not rate_per_s > 0:
        raise ValueError(f"pool rate {rate_per_s}: must be > 0 samples/s")
    return DeviceStream(dataset, np.arange(len(dataset)), RateSchedule([(0.0, rate_per_s)]),
                        POOL_DEVICE, seed, arrivals)


def fill_pool(bootstrap: str, dataset, topic: str, rate_per_s: float, duration_s: float,
              pace: str, seed: int, start_time_s: float | None = None,
              arrivals: str = "even", stop: threading.Event | None = None,
              client_config: dict | None = None, replication_factor: int = 1) -> dict:
    """Stream an IID sample of ``dataset`` (``make_pool_stream``) onto ``topic`` for
    ``duration_s`` stream seconds, then an end-of-stream marker; a summary.

    The producer is ``streamsim.produce.produce`` with one stream on an explicit topic: the
    same records, timestamps, deadline pacing and send-failure accounting (``failed`` in the
    summary). ``stop`` (or SIGINT/SIGTERM in the main thread) ends it early; the marker is
    still written. ``client_config``: connection settings (SASL/SSL, ...);
    ``replication_factor``: of the pool topic when it is created."""
    from streamsim.produce import produce

    stream = make_pool_stream(dataset, rate_per_s, seed, arrivals)
    summary = produce(bootstrap, [stream], dataset, duration_s, pace,
                      start_time_s=start_time_s, workers=1, stop=stop, topics=[topic],
                      client_config=client_config, replication_factor=replication_factor)
    return {"topic": topic, "records": summary["records"], "failed": summary["failed"],
            "stream_s": summary["stream_s"], "rate_per_s": rate_per_s, "pace": pace,
            "start_time_s": summary["start_time_s"], "elapsed_s": summary["elapsed_s"],
            "interrupted": summary["interrupted"]}


def main(argv: list[str] | None = None) -> int:
    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter
    from streamsim.produce import PACES

    logsetup.configure("pool")
    parser = argparse.ArgumentParser(prog="python -m streamsim.pool",
                                     description="Stream an IID sample of a dataset onto the "
                                                 "shared injection pool topic (--inject-from "
                                                 "pool).",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT of the broker")
    parser.add_argument("--kafka-config", default=os.environ.get("KAFKA_CONFIG") or None,
                        metavar="FILE", help="Kafka client settings, key=value per line "
                        "(SASL/SSL: streamsim.kafkaconfig; default $KAFKA_CONFIG)")
    parser.add_argument("--replication-factor", type=int, default=1,
                        help="replicas of the pool topic when it is created")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--image-size", type=int, default=224, help="imagefolder only")
    parser.add_argument("--topic", required=True, help="the pool topic (--pool-topic)")
    parser.add_argument("--rate", type=float, required=True, help="samples/s")
    parser.add_argument("--duration", type=float, required=True, help="stream seconds")
    parser.add_argument("--pace", choices=PACES, required=True)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the replay order (and of poisson arrivals)")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="even",
                        help="arrival times at --rate")
    parser.add_argument("--start-time", type=float, default=None,
                        help="event-time origin, epoch seconds (default: now for realtime, "
                             "VIRTUAL_EPOCH_S for virtual)")
    args = parser.parse_args(argv)

    from streamsim.broker import BrokerError, BrokerUnreachable
    from streamsim.datasets import DatasetError, load_dataset
    from streamsim.kafkaconfig import load_client_config

    try:
        client_config = load_client_config(args.kafka_config)
        dataset = load_dataset(args.dataset, "train", args.data_dir, False, args.image_size,
                               args.seed)
    except (ValueError, DatasetError) as e:
        print(f"pool: {e}", file=sys.stderr)
        return 2
    try:  # SIGINT/SIGTERM stop it cleanly (produce's handlers)
        summary = fill_pool(args.bootstrap, dataset, args.topic, args.rate, args.duration,
                            args.pace, args.seed, args.start_time, args.arrivals,
                            client_config=client_config,
                            replication_factor=args.replication_factor)
    except ValueError as e:
        print(f"pool: {e}", file=sys.stderr)
        return 2
    except (BrokerUnreachable, BrokerError, RuntimeError) as e:  # a failed send included
        print(f"pool: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"pool {summary['topic']}: {summary['records']} records over "
          f"{summary['stream_s']:g} s of stream ({summary['rate_per_s']:g}/s, "
          f"{summary['pace']}) in {summary['elapsed_s']:.1f} s", flush=True)
    if summary["failed"]:
        print(f"pool: {summary['failed']} records could not be written to "
              f"{summary['topic']} (the broker refused them): see the log above; rerun "
              "python -m streamsim.pool once the broker is healthy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
