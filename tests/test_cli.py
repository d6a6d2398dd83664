"""The command line: bad configs and unreachable brokers end with status 2 and one line on stderr.

Every case runs ``python -m stream_fair`` as a subprocess, as a user would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import cli_env, free_port, run_cli, write_config

SECRET = "hunter2-very-secret"

# (name, YAML text, words the one line must contain: the key and the fix)
BAD_CONFIGS = [
    (
        "unknown_key",
        "kafka:\n  bootstrap_server: localhost:9092\n",
        ["'kafka.bootstrap_server'", "remove it or check its spelling"],
    ),
    ("bad_duration", "join:\n  ttl: soon\n", ["join.ttl", "expected a duration such as 90s"]),
    ("sasl_without_mechanism", "kafka:\n  security_protocol: SASL_SSL\n", ["kafka.sasl_mechanism", "SASL_"]),
    ("invalid_yaml", "kafka: [\n  bootstrap_servers\n", ["not valid YAML", "fix the syntax"]),
    (
        "unknown_intersection_feature",
        "fairness:\n  features: [sex]\n  intersections: [[sex, race]]\n",
        ["fairness.intersections", "'race'", "add it there first"],
    ),
    ("top_level_not_a_mapping", "- kafka\n", ["top level must be a mapping"]),
]


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


@pytest.mark.parametrize(("name", "text", "words"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, name: str, text: str, words: list[str]) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert line.startswith("stream-fair: config error:"), line
    for word in words:
        assert word in line, (word, line)
    assert result.stdout == ""


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("run", "--config", str(missing))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert str(missing) in line and "no such file" in line and "pass the path" in line


def test_check_config_refuses_a_bad_environment_override() -> None:
    result = run_cli("check-config", env=cli_env(STREAM_FAIR_JOIN__TTL="forever"))
    assert result.returncode == 2 and result.stdout == ""
    line = _one_line(result.stderr)
    assert "join.ttl" in line and "expected a duration" in line


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "sasl.yaml",
        {
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "svc-fair",
            },
        },
    )
    env = cli_env(STREAM_FAIR_KAFKA__SASL_PASSWORD=SECRET, STREAM_FAIR_KAFKA__SSL_PASSWORD=SECRET)
    result = run_cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout and SECRET not in result.stderr
    printed: dict[str, Any] = yaml.safe_load(result.stdout)
    kafka = printed["kafka"]
    assert kafka["sasl_username"] == "svc-fair"  # not a secret: shown
    assert kafka["sasl_password"] and set(kafka["sasl_password"]) == {"*"}
    assert kafka["ssl_password"] and set(kafka["ssl_password"]) == {"*"}
    # the password really was loaded: without it the SCRAM config is refused
    missing = run_cli("check-config", "--config", str(path))
    assert missing.returncode == 2 and "sasl_password" in _one_line(missing.stderr)


def _run_config(tmp_path: Path, bootstrap: str, **topics: str) -> Path:
    return write_config(
        tmp_path / "run.yaml",
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "request_timeout_ms": 2000,
                "group_id": "stream-fair-cli-test",
            },
            "topics": {"predictions": "predictions", "outcomes": "outcomes", **topics},
            "state": {"path": str(tmp_path / "state.db")},
            "exporter": {"host": "127.0.0.1", "port": 0},
            # INFO would add the informational "exporter on ..." line; warnings and errors must not
            "log_level": "WARNING",
        },
    )


def test_run_against_unreachable_broker_exits_2_quickly(tmp_path: Path) -> None:
    path = _run_config(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    result = run_cli("run", "--config", str(path), timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert line.startswith("stream-fair: kafka error: cannot connect to kafka.bootstrap_servers=")
    assert "check the address" in line
    # bounded by request_timeout_ms (2 s) plus start-up, not kafka-python's 30 s default
    assert elapsed < 20, f"took {elapsed:.1f} s"


@pytest.mark.integration
def test_run_with_missing_topic_exits_2(kafka_bootstrap: str, tmp_path: Path) -> None:
    tag = str(time.monotonic_ns())
    path = _run_config(tmp_path, kafka_bootstrap, predictions=f"absent-p-{tag}", outcomes=f"absent-o-{tag}")
    result = run_cli("run", "--config", str(path), timeout=60)
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert f"topics.predictions='absent-p-{tag}' does not exist" in line, line
    assert "create it or fix topics.predictions" in line
