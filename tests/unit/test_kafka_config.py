"""--kafka-config: parsing the key=value file of Kafka client settings, and its checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from scadles.config import parse_args
from streamsim.kafkaconfig import client_settings, load_client_config, parse_client_config

# kafka-python loads its protocol schemas through a deprecated importlib.resources call
pytestmark = pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning")


def test_settings_take_the_type_of_their_default_and_either_spelling():
    text = """
# an external cluster
security.protocol = SASL_SSL
sasl_mechanism=SCRAM-SHA-512
sasl_plain_username=alice
sasl_plain_password=s3cr=t#1
ssl_check_hostname=false
request_timeout_ms=45000
api_version=2.8.0
send_buffer_bytes=131072
"""
    assert parse_client_config(text) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice", "sasl_plain_password": "s3cr=t#1",
        "ssl_check_hostname": False, "request_timeout_ms": 45000, "api_version": (2, 8, 0),
        "send_buffer_bytes": 131072}
    assert parse_client_config("\n# nothing\n\n") == {}


@pytest.mark.parametrize("line,why", [
    ("security_protocol SASL_SSL", "not key=value"),
    ("=SASL_SSL", "not key=value"),
    ("acks=all", "acks is a producer setting, which the run sets itself"),
    ("enable.auto.commit=true", "enable_auto_commit is a consumer setting"),
    ("no_such_setting=1", "no_such_setting is no kafka-python client setting"),
    ("bootstrap.servers=kafka:9092", "--bootstrap / KAFKA_BOOTSTRAP"),
    ("max_in_flight_requests_per_connection=5", "one request in flight"),
    ("request_timeout_ms=30s", "request_timeout_ms is a whole number, not '30s'"),
    ("ssl_check_hostname=maybe", "ssl_check_hostname is true or false"),
    ("api_version=latest", "api_version is a broker version like 2.8.0"),
    ("ssl_context=mine", "ssl_context takes a Python object"),
    ("socket_options=[]", "socket_options takes a Python object"),
    ("sasl_mechanism=", "sasl_mechanism has no value"),
])
def test_a_bad_line_is_named_by_its_number(line, why):
    with pytest.raises(ValueError) as e:
        parse_client_config(f"# settings\nclient_id=run\n{line}\n", "--kafka-config F")
    message = str(e.value)
    assert message.startswith("--kafka-config F line 3: ") and why in message
    assert "\n" not in message


def test_a_setting_twice_and_a_password_is_never_quoted():
    with pytest.raises(ValueError) as e:
        parse_client_config("sasl_plain_password=hunter2\nsasl.plain.password=hunter3\n")
    assert "line 2: sasl_plain_password is set twice" in str(e.value)
    assert "hunter" not in str(e.value)
    with pytest.raises(ValueError) as e:
        parse_client_config("hunter2\n")
    assert "hunter" not in str(e.value)


def test_every_accepted_key_is_a_setting_of_all_three_clients():
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    for key in client_settings():
        for client in (KafkaAdminClient, KafkaProducer, KafkaConsumer):
            assert key in client.DEFAULT_CONFIG


def test_load_reads_a_file_and_names_one_it_cannot_read(tmp_path):
    path = tmp_path / "client.properties"
    path.write_text("security_protocol=SSL\nssl_cafile=/etc/ca.pem\n")
    assert load_client_config(path) == {"security_protocol": "SSL", "ssl_cafile": "/etc/ca.pem"}
    assert load_client_config(None) == {}
    with pytest.raises(ValueError, match=r"--kafka-config .*missing: cannot read it"):
        load_client_config(tmp_path / "missing")


def test_config_checks_the_file_at_config_time_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "kafka.conf"
    path.write_text("security_protocol=SSL\nlinger.ms=5\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--kafka-config", str(path), "--source", "inprocess"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--kafka-config {path} line 2: linger_ms is a producer setting" in err


def test_config_takes_kafka_config_from_the_environment_as_an_absolute_path(
        tmp_path, monkeypatch):
    (tmp_path / "kafka.conf").write_text("client_id=scadles\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAFKA_CONFIG", "kafka.conf")
    cfg = parse_args(["--source", "inprocess"])
    assert cfg.kafka_config == str(tmp_path / "kafka.conf")
    assert Path(cfg.kafka_config).is_absolute()
    assert ["--kafka-config", cfg.kafka_config] == cfg.to_argv()[
        cfg.to_argv().index("--kafka-config"):][:2]  # what every rank is given
    assert cfg.replication_factor == 1


def test_replication_factor_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--replication-factor", "0", "--source", "inprocess"])
    assert exit_info.value.code == 2
    assert "--replication-factor 0: must be a positive integer" in capsys.readouterr().err


def test_kafka_config_without_an_external_broker_is_one_line_and_exit_2(tmp_path, capsys,
                                                                        monkeypatch):
    """The embedded broker takes plain loopback connections: SASL/SSL settings meant for a
    cluster would only make its clients hang."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    path = tmp_path / "kafka.conf"
    path.write_text("security_protocol=SASL_SSL\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--kafka-config", str(path)], check_environment=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is for an external Kafka" in err
    assert parse_args(["--kafka-config", str(path), "--bootstrap", "kafka.example:9093"],
                      check_environment=False).kafka_config == str(path)
