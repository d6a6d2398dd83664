"""Transport options and selection, without a broker: SASL/SSL mapped for both clients, the extra.

The options are checked against the clients themselves: kafka-python's option names, and
librdkafka creating a client that reads the TLS files and decrypts the key with the mapped password.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stream_fair import transport
from stream_fair.config import Config
from stream_fair.errors import BrokerError
from tests.helpers import cli_env, run_cli, write_config


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA-less self-signed certificate and its key, encrypted with the password ``key-secret``."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make a test certificate (Debian package openssl)"
    d = tmp_path_factory.mktemp("kafka-tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=kafka",
         "-passout", "pass:key-secret", "-keyout", str(d / "client.key"), "-out", str(d / "client.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


def _secure(tls: Path, **kafka: Any) -> Config:
    return Config.model_validate(
        {
            "kafka": {
                "transport": "confluent",
                "bootstrap_servers": "kafka-1:9093, kafka-2:9093",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "detector",
                "sasl_password": "sasl-secret",
                "ssl_cafile": str(tls / "client.crt"),
                "ssl_certfile": str(tls / "client.crt"),
                "ssl_keyfile": str(tls / "client.key"),
                "ssl_password": "key-secret",
                "ssl_check_hostname": False,
                **kafka,
            }
        }
    )


def test_sasl_and_ssl_options_for_kafka_python(tls: Path) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    from stream_fair.transport.kafka_python import client_options

    opts = client_options(_secure(tls, transport="kafka-python").kafka)
    assert opts == {
        "bootstrap_servers": ["kafka-1:9093", "kafka-2:9093"],
        "client_id": "stream-fair",
        "security_protocol": "SASL_SSL",
        "request_timeout_ms": 30000,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "detector",
        "sasl_plain_password": "sasl-secret",
        "ssl_check_hostname": False,
        "ssl_cafile": str(tls / "client.crt"),
        "ssl_certfile": str(tls / "client.crt"),
        "ssl_keyfile": str(tls / "client.key"),
        "ssl_password": "key-secret",
    }
    for client in (KafkaConsumer, KafkaProducer):  # every option is one the client knows
        assert set(opts) <= set(client.DEFAULT_CONFIG), set(opts) - set(client.DEFAULT_CONFIG)
    plain = client_options(Config.model_validate({"kafka": {"ssl_cafile": "/nowhere"}}).kafka)
    assert not any(k.startswith(("ssl_", "sasl_")) for k in plain)  # TLS files only with SSL


def test_sasl_and_ssl_options_for_confluent(tls: Path) -> None:
    from confluent_kafka import KafkaException, Producer

    from stream_fair.transport.confluent import client_config

    conf = client_config(_secure(tls).kafka)
    assert {k: v for k, v in conf.items() if k not in ("logger", "error_cb")} == {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "client.id": "stream-fair",
        "security.protocol": "SASL_SSL",
        "socket.timeout.ms": 30000,
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "detector",
        "sasl.password": "sasl-secret",
        "ssl.endpoint.identification.algorithm": "none",
        "ssl.ca.location": str(tls / "client.crt"),
        "ssl.certificate.location": str(tls / "client.crt"),
        "ssl.key.location": str(tls / "client.key"),
        "ssl.key.password": "key-secret",
    }
    # librdkafka reads the files and decrypts the key with the mapped password when it is created
    Producer(conf).flush(0)
    with pytest.raises(KafkaException, match=r"ssl\.key"):
        Producer(client_config(_secure(tls, ssl_password="wrong").kafka))
    wrong = _secure(tls, ssl_password="wrong")
    with pytest.raises(BrokerError, match="confluent-kafka client refused the kafka settings"):
        transport.get(wrong.kafka).letter_producer(wrong, 1000)
    checked = client_config(_secure(tls, ssl_check_hostname=True).kafka)
    assert checked["ssl.endpoint.identification.algorithm"] == "https"


def test_a_missing_confluent_extra_is_one_config_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml",
        {"kafka": {"transport": "confluent"}, "fairness": {"features": ["sex"]},
         "exporter": {"host": "127.0.0.1", "port": 0}},
    )  # fmt: skip
    # the package made unimportable, as it is where the extra was not installed
    code = (
        "import sys; sys.modules['confluent_kafka'] = None\n"
        "from stream_fair.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for command in ("run", "check-config"):
        result = subprocess.run(
            [sys.executable, "-c", code, command, "--config", str(path)],
            capture_output=True, text=True, timeout=60, env=cli_env(),
        )  # fmt: skip
        assert result.returncode == 2, result
        assert result.stderr.splitlines() == [f"stream-fair: {transport.ERR_CONFLUENT_MISSING}"]
    assert "kafka.transport" in transport.ERR_CONFLUENT_MISSING
    assert "pip install 'stream-fair[confluent]'" in transport.ERR_CONFLUENT_MISSING
    # with the package there, the same config is fine
    assert run_cli("check-config", "--config", str(path)).returncode == 0


def test_a_bad_transport_value_is_one_config_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml",
        {"kafka": {"transport": "librdkafka"}, "fairness": {"features": ["sex"]},
         "exporter": {"host": "127.0.0.1", "port": 0}},
    )  # fmt: skip
    for command in ("run", "check-config"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2, result
        [line] = result.stderr.splitlines()
        assert line.startswith("stream-fair: config error: kafka.transport: "), line
        assert "'kafka-python' or 'confluent'" in line, line  # the fix: the values it takes
