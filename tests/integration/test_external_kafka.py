"""External Kafka, against the real embedded broker: the settings of --kafka-config reach the
admin client, the producers and every consumer; --replication-factor reaches topic creation;
`python -m streamsim.topics delete PREFIX` removes a run's topics and nothing else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scadles.config import parse_args
from scadles.sources import sources_factory
from scadles.train import open_source
from streamsim.broker import admin_client, create_topics
from streamsim.datasets import ArrayDataset
from streamsim.inspect import inspect_topic
from streamsim.kafkaconfig import load_client_config
from streamsim.produce import _make_producer, produce
from streamsim.record import VIRTUAL_EPOCH_S, EndOfStream
from streamsim.schedule import RateSchedule
from streamsim.stream import DeviceStream

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 8, 8)
# kafka-python loads its protocol schemas through a deprecated importlib.resources call
pytestmark = pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning")


@pytest.fixture
def kafka_config(tmp_path, unique_name) -> Path:
    """Settings a plaintext broker accepts, each visible in a client's ``config``."""
    path = tmp_path / "client.properties"
    path.write_text(f"# the test's client settings\nclient.id={unique_name}client\n"
                    f"security_protocol=PLAINTEXT\nmetadata_max_age_ms=123456\n"
                    f"reconnect_backoff_ms=77\n")
    return path


def replicas(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = admin_client(bootstrap)
    try:
        return {t["name"]: len(t["partitions"][0]["replica_nodes"])
                for t in admin.describe_topics(topics)}
    finally:
        admin.close()


def topics_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "KAFKA_CONFIG")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "streamsim.topics", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_settings_reach_every_client(broker, unique_name, kafka_config):
    settings = load_client_config(kafka_config)
    client_id = f"{unique_name}client"

    def has_settings(config: dict) -> bool:
        return (config["client_id"] == client_id and config["metadata_max_age_ms"] == 123456
                and config["reconnect_backoff_ms"] == 77)

    admin = admin_client(broker, 5.0, settings)
    assert has_settings(admin.config)
    admin.close()
    producer = _make_producer(broker, settings, "virtual")
    assert has_settings(producer.config)
    assert producer.config["acks"] == 1 and producer.config["linger_ms"] == 20  # the run's own
    producer.close()

    # A stream produced with the settings onto topics with 2 replicas, read back by the
    # trainer's source, the injector's and inspect, all with the run's settings.
    data = ArrayDataset("tiny", np.arange(40) % 10, 10,
                        np.zeros((40, *SHAPE), dtype=np.uint8))
    stream = DeviceStream(data, np.arange(40), RateSchedule([(0, 10.0)]), 0, seed=1)
    summary = produce(broker, [stream], data, 2.0, "virtual", topic_prefix=unique_name,
                      client_config=settings, replication_factor=2)
    assert summary["records"] == 20
    assert replicas(broker, [f"{unique_name}0"]) == {f"{unique_name}0": 2}

    cfg = parse_args(["--bootstrap", broker, "--kafka-config", str(kafka_config),
                      "--world-size", "1", "--rates", "10", "--topic-prefix", unique_name],
                     check_environment=False)
    info = {"topic_prefix": unique_name, "stream_start_s": VIRTUAL_EPOCH_S}
    plan = cfg.stream_plan(VIRTUAL_EPOCH_S)
    sources = [open_source(cfg, plan, info, 0, data, "beginning"),
               sources_factory(cfg, 0, data, plan, None, unique_name)(0)]
    for source in sources:
        try:
            assert has_settings(source._consumer.consumer.config)
            got, deadline = [], time.monotonic() + 20
            while not got or not isinstance(got[-1][1], EndOfStream):
                assert time.monotonic() < deadline
                got += source.poll(0.2)
            assert len(got) == 21  # 20 samples and the end-of-stream marker
        finally:
            source.close()
    assert inspect_topic(broker, f"{unique_name}0", idle_s=0.5, timeout_s=30,
                         client_config=settings)["samples"] == 20


def test_a_run_through_the_launcher_then_topics_delete(broker, unique_name, kafka_config,
                                                       tmp_path):
    """A run on an external broker with --kafka-config and --replication-factor 2 leaves its
    topics (2 replicas each); topics delete PREFIX removes exactly those."""
    other = f"{unique_name}other-0"  # another run's topic: left alone
    create_topics(broker, [other])
    log_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "KAFKA_CONFIG")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    prefix = f"{unique_name}run-"
    proc = subprocess.run(
        [sys.executable, "-m", "scadles.launch", "--bootstrap", broker, "--topic-prefix",
         prefix, "--kafka-config", str(kafka_config), "--replication-factor", "2",
         "--world-size", "2", "--rates", "20,20", "--clock", "virtual", "--compute-model",
         "fixed:0.5", "--max-steps", "2", "--eval-steps", "0", "--eval-samples", "100",
         "--log-dir", str(log_dir)], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_config = json.loads((log_dir / "run.json").read_text())["config"]
    assert run_config["kafka_config"] == str(kafka_config)
    assert run_config["replication_factor"] == 2
    topics = [f"{prefix}0", f"{prefix}1"]
    assert replicas(broker, topics) == {t: 2 for t in topics}

    listed = topics_cli("list", prefix, "--bootstrap", broker)
    assert listed.returncode == 0 and listed.stdout.split() == topics
    dry = topics_cli("delete", prefix, "--bootstrap", broker, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.split() == topics
    deleted = topics_cli("delete", prefix, "--bootstrap", broker, "--kafka-config",
                         str(kafka_config))
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.split() == topics and "deleted 2 topic(s)" in deleted.stderr
    after = topics_cli("list", unique_name, "--bootstrap", broker)
    assert after.stdout.split() == [other]
    again = topics_cli("delete", prefix, "--bootstrap", broker)
    assert again.returncode == 0 and "deleted 0 topic(s)" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["delete"], "delete needs a PREFIX"),
    (["delete", "x-", "--bootstrap", "nohost"], "expected HOST:PORT"),
])
def test_topics_bad_command_lines_are_one_line_and_exit_2(args, message):
    proc = topics_cli(*args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_topics_bad_kafka_config_is_one_line_and_exit_2(broker, tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("security_protocol=SSL\nacks=all\n")
    proc = topics_cli("list", "--bootstrap", broker, "--kafka-config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"topics: --kafka-config {bad} line 2: acks is a producer "
                                   f"setting, which the run sets itself: the file takes "
                                   f"connection settings (security_protocol, sasl_*, ssl_*, "
                                   f"request_timeout_ms, client_id, api_version, ...)")
