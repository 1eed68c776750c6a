"""``python -m streamsim.topics list|delete PREFIX``: a run's topics on a broker.

Every run leaves its device topics (``PREFIX<device>``, and a resumed run's
``PREFIXresume-...``) on the broker; on an external cluster they stay until deleted:

    python -m streamsim.topics list trainer-20260101-120000-ab12cd-
    python -m streamsim.topics delete trainer-20260101-120000-ab12cd-

The broker is ``--bootstrap``, else ``$KAFKA_BOOTSTRAP``, else the running shared broker
(``python -m streamsim.broker start``); ``--kafka-config`` / ``$KAFKA_CONFIG`` gives the client
settings (SASL/SSL). ``delete`` needs a non-empty prefix and removes only topics whose names
start with it (``--dry-run`` lists them instead). Exit status: 0 done, 1 broker trouble, 2 a
bad command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

from streamsim import broker


def list_topics(bootstrap: str, prefix: str = "", client_config: dict | None = None,
                timeout_s: float = 10.0) -> list[str]:
    """The broker's topic names that start with ``prefix``, sorted (internal ones left out)."""
    from kafka.errors import KafkaError

    admin = broker.admin_client(bootstrap, timeout_s, client_config)
    try:
        with broker._quiet_kafka_logs():
            names = admin.list_topics()
    except KafkaError as e:
        raise broker.BrokerError(f"listing the topics of {bootstrap} failed: {e}") from e
    finally:
        with broker._quiet_kafka_logs():
            admin.close()
    return sorted(n for n in names if n.startswith(prefix) and not n.startswith("__"))


def delete_topics(bootstrap: str, topics: Iterable[str], client_config: dict | None = None,
                  timeout_s: float = 30.0) -> list[str]:
    """Delete ``topics``; the names deleted. A topic already gone is no error; any other
    refusal is a BrokerError naming the first topic and the broker's reason."""
    from kafka.errors import KafkaError

    topics = list(dict.fromkeys(topics))
    if not topics:
        return []
    admin = broker.admin_client(bootstrap, timeout_s, client_config)
    try:
        with broker._quiet_kafka_logs():
            result = admin.delete_topics(topics, timeout_ms=int(timeout_s * 1000),
                                         raise_errors=False)
    except KafkaError as e:
        raise broker.BrokerError(f"deleting topics on {bootstrap} failed: {e}") from e
    finally:
        with broker._quiet_kafka_logs():
            admin.close()
    outcome = {t["name"]: (t.get("error_code", 0), t.get("error_message"))
               for t in result["topics"]}
    failed = [(n, c, m) for n, (c, m) in outcome.items() if c not in (0, 3)]
    if failed:  # 3 = UNKNOWN_TOPIC_OR_PARTITION: already gone
        name, code, message = failed[0]
        raise broker.BrokerError(f"deleting topic {name!r} on {bootstrap} failed: error {code} "
                                 f"({message}); {len(failed)} topic(s) not deleted")
    return [t for t in topics if outcome.get(t, (0, None))[0] == 0]


def _bootstrap(given: str | None) -> str:
    if given:
        return given
    state = broker.status()
    if state is None:
        raise ValueError("no broker address: pass --bootstrap HOST:PORT or set "
                         "KAFKA_BOOTSTRAP (or start the shared one: python -m "
                         "streamsim.broker start)")
    return state["bootstrap"]


def main(argv: list[str] | None = None) -> int:
    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter
    from streamsim.kafkaconfig import load_client_config

    logsetup.configure("topics")
    parser = argparse.ArgumentParser(prog="python -m streamsim.topics",
                                     description="List or delete a run's topics.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("command", choices=("list", "delete"))
    parser.add_argument("prefix", nargs="?", default=None, metavar="PREFIX",
                        help="topics whose names start with it (list: all without it; "
                             "delete: required)")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP") or None,
                        help="HOST:PORT of the broker (default $KAFKA_BOOTSTRAP, else the "
                             "running shared broker)")
    parser.add_argument("--kafka-config", default=os.environ.get("KAFKA_CONFIG") or None,
                        metavar="FILE", help="Kafka client settings, key=value per line "
                        "(SASL/SSL: streamsim.kafkaconfig; default $KAFKA_CONFIG)")
    parser.add_argument("--dry-run", action="store_true",
                        help="delete: list what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    args.prefix = args.prefix or ""
    try:
        if args.command == "delete" and not args.prefix:
            raise ValueError("delete needs a PREFIX (a run's --topic-prefix, e.g. "
                             "trainer-20260101-120000-ab12cd-): it never deletes every topic")
        client_config = load_client_config(args.kafka_config)
        bootstrap = _bootstrap(args.bootstrap)
        broker.parse_bootstrap(bootstrap)
    except ValueError as e:
        print(f"topics: {e}", file=sys.stderr)
        return 2
    try:
        broker.check_reachable(bootstrap, broker.CLI_PROBE_S, client_config)
        names = list_topics(bootstrap, args.prefix, client_config)
        if args.command == "list" or args.dry_run:
            for name in names:
                print(name)
            if args.dry_run:
                print(f"{len(names)} topic(s) with prefix {args.prefix!r} on {bootstrap} "
                      f"would be deleted", file=sys.stderr)
            return 0
        deleted = delete_topics(bootstrap, names, client_config)
    except (broker.BrokerUnreachable, broker.BrokerError) as e:
        print(f"topics: {e}", file=sys.stderr)
        return 1
    for name in deleted:
        print(name)
    print(f"deleted {len(deleted)} topic(s) with prefix {args.prefix!r} on {bootstrap}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
