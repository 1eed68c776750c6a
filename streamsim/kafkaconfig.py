"""Kafka client settings from a file (``--kafka-config FILE``): how to reach an external
cluster (SASL, SSL, timeouts), for every client a run makes.

One ``key=value`` per line; blank lines and lines starting with ``#`` are skipped; spaces
around the key and the value are dropped. A key is a kafka-python client setting, written
as its keyword (``security_protocol``) or in the Java clients' dotted form
(``security.protocol``). The same settings go to the admin client, the producers and the
consumers, so a key must be a setting all three take (a connection setting); the settings
that shape the streams (``acks``, ``linger_ms``, ``enable_auto_commit``, ...) stay the run's
own. A value takes the type of the setting's default: a whole number, ``true``/``false``, a
version ``2.8.0`` for ``api_version``, else text. For example::

    security_protocol=SASL_SSL
    sasl_mechanism=SCRAM-SHA-512
    sasl_plain_username=alice
    sasl_plain_password=...
    ssl_cafile=/etc/kafka/ca.pem

A bad line is a ``ValueError`` naming the file, the line number and the fix.
"""
from __future__ import annotations

from pathlib import Path

# Connection settings the run keeps for itself: the address has its own flag, and a device's
# records must stay in order (one request in flight).
RESERVED = {"bootstrap_servers": "give the address with --bootstrap / KAFKA_BOOTSTRAP",
            "max_in_flight_requests_per_connection": "the producers keep one request in "
                                                     "flight so that records stay in order"}
# Settings whose default is None but whose value is a number, or a Python object.
_INT_SETTINGS = {"receive_buffer_bytes", "send_buffer_bytes"}
_OBJECT_SETTINGS = {"sasl_oauth_token_provider", "ssl_context"}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _tables() -> dict[str, dict]:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    return {"admin client": KafkaAdminClient.DEFAULT_CONFIG,
            "producer": KafkaProducer.DEFAULT_CONFIG, "consumer": KafkaConsumer.DEFAULT_CONFIG}


def client_settings() -> dict:
    """Every setting the admin client, the producer and the consumer all take, with its
    default (kafka-python's own tables)."""
    tables = list(_tables().values())
    common = set(tables[0]).intersection(*tables[1:])
    return {key: tables[0][key] for key in sorted(common)}


def parse_client_config(text: str, source: str = "--kafka-config") -> dict:
    """The settings of a ``key=value`` text; ValueError naming ``source`` and the line."""
    known = client_settings()
    settings: dict = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def bad(why: str) -> ValueError:  # never quotes the line: it may hold a password
            return ValueError(f"{source} line {number}: {why}")

        key, sep, value = line.partition("=")
        key, value = key.strip().replace(".", "_"), value.strip()
        if not sep or not key:
            raise bad("not key=value, e.g. security_protocol=SASL_SSL")
        if key in RESERVED:
            raise bad(f"{key} cannot be set here: {RESERVED[key]}")
        if key not in known:
            roles = [role for role, table in _tables().items() if key in table]
            what = (f"a {' and '.join(roles)} setting, which the run sets itself" if roles
                    else "no kafka-python client setting")
            raise bad(f"{key} is {what}: the file takes connection settings (security_protocol, "
                      f"sasl_*, ssl_*, request_timeout_ms, client_id, api_version, ...)")
        if key in settings:
            raise bad(f"{key} is set twice")
        try:
            settings[key] = _typed(key, value, known[key])
        except ValueError as e:
            raise bad(str(e)) from None
    return settings


def _typed(key: str, value: str, default):
    if isinstance(default, bool):
        if value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{key} is true or false, not {value!r}")
    if isinstance(default, int) or key in _INT_SETTINGS:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} is a whole number, not {value!r}") from None
    if key == "api_version":
        parts = value.split(".")
        if not all(p.isdigit() for p in parts) or not 2 <= len(parts) <= 3:
            raise ValueError(f"api_version is a broker version like 2.8.0, not {value!r}")
        return tuple(int(p) for p in parts)
    if key in _OBJECT_SETTINGS or (default is not None and not isinstance(default, str)):
        raise ValueError(f"{key} takes a Python object, which a file cannot give")
    if not value:
        raise ValueError(f"{key} has no value")
    return value


def load_client_config(path: str | Path | None) -> dict:
    """The settings in the file at ``path`` ({} for None); ValueError (one line) when it
    cannot be read or a line is bad."""
    if path is None or path == "":
        return {}
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(f"--kafka-config {path}: cannot read it ({reason})") from None
    return parse_client_config(text, f"--kafka-config {path}")
