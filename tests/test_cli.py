"""The command line: bad configs, busy ports and unreachable brokers end with status 2 and one
line on stderr (an unreachable broker after one progress line per retry); --help documents every
option.

Every case runs ``python -m stream_fair`` as a subprocess, as a user would.
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_fair import cli
from tests.helpers import cli_env, free_port, run_cli, transport, write_config

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
    # was "Input should be a valid dictionary or instance of TopicsConfig": a class name, no fix
    ("empty_section", "topics:\n", ["topics must be a mapping of keys, got nothing", "remove the section"]),
    ("section_as_list", "kafka: [localhost]\n", ["kafka must be a mapping of keys, got list"]),
    # was accepted: the run then retried its dead-letter writes forever
    (
        "illegal_topic_name",
        'topics:\n  dead_letters: "bad topic!"\n',
        ["topics.dead_letters", "not a legal Kafka topic name", "e.g. 'bad-topic'"],
    ),
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


def test_a_directory_as_config_is_one_line(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(tmp_path))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert f"--config {tmp_path} is a directory" in line and "no such file" not in line


def test_check_config_refuses_a_bad_environment_override() -> None:
    result = run_cli("check-config", env=cli_env(STREAM_FAIR_JOIN__TTL="forever"))
    assert result.returncode == 2 and result.stdout == ""
    line = _one_line(result.stderr)
    assert "join.ttl" in line and "expected a duration" in line
    assert "STREAM_FAIR_JOIN__TTL (environment)" in line  # the key is in no file: name the variable
    typo = run_cli("check-config", env=cli_env(STREAM_FAIR_KAFKA__BOOTSTRAP="x:1"))
    assert typo.returncode == 2
    line = _one_line(typo.stderr)
    assert "STREAM_FAIR_KAFKA__BOOTSTRAP (environment)" in line and "unknown key 'kafka.bootstrap'" in line


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "sasl.yaml",
        {
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "svc-fair",
            },
            "fairness": {"features": ["sex"]},
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


def test_check_config_says_what_a_scoreless_schema_leaves_off(tmp_path: Path) -> None:
    """Models without a score are valid, so this is a note on stderr, not an error: the
    estimate, calibration and what-if series would otherwise just be absent."""
    features = {"fairness": {"features": ["sex"]}}
    path = write_config(tmp_path / "scoreless.yaml", {"schema": {"prediction": {"score": None}}, **features})
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    line = _one_line(result.stderr)
    assert line.startswith("stream-fair: note: schema.prediction.score is null"), line
    assert "label-free estimates" in line and "what-ifs" in line, line
    assert yaml.safe_load(result.stdout)["schema"]["prediction"]["score"] is None
    scored = run_cli("check-config", "--config", str(write_config(tmp_path / "scored.yaml", features)))
    assert scored.returncode == 0 and scored.stderr == "", scored.stderr


def _run_config(
    tmp_path: Path,
    bootstrap: str,
    *,
    request_timeout_ms: int = 2000,
    port: int = 0,
    host: str = "127.0.0.1",
    **topics: str,
) -> Path:
    return write_config(
        tmp_path / "run.yaml",
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "request_timeout_ms": request_timeout_ms,
                "group_id": "stream-fair-cli-test",
                "transport": transport(),
            },
            "topics": {"predictions": "predictions", "outcomes": "outcomes", **topics},
            "fairness": {"features": ["sex"]},
            "state": {"path": str(tmp_path / "state")},
            "exporter": {"host": host, "port": port},
            # INFO would add the informational "exporter on ..." line; warnings and errors must not
            "log_level": "WARNING",
        },
    )


@pytest.mark.transports
def test_run_against_unreachable_broker_reports_retries_then_one_line(tmp_path: Path) -> None:
    path = _run_config(tmp_path, f"127.0.0.1:{free_port()}", request_timeout_ms=4000)  # nothing listens
    result = run_cli("run", "--config", str(path), timeout=60)
    assert result.returncode == 2, result
    *progress, last = result.stderr.splitlines()
    assert last.startswith("stream-fair: kafka error: cannot connect to kafka.bootstrap_servers=")
    assert "connection refused" in last and "check the address" in last
    # progress while it retries, one line per attempt, not silence
    assert len(progress) >= 2, result.stderr
    assert all(
        "waiting for Kafka at 127.0.0.1:" in line and "connection refused" in line for line in progress
    )
    assert [int(m) for line in progress for m in re.findall(r"attempt (\d+)", line)] == list(
        range(1, len(progress) + 1)
    )
    assert not (tmp_path / "state").exists()  # nothing on disk before the broker answers
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.transports
def test_unresolvable_kafka_host_is_one_line_at_once(tmp_path: Path) -> None:
    path = _run_config(tmp_path, "no-such-host.invalid:9092")
    result = run_cli("run", "--config", str(path), timeout=60)
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert "cannot resolve host 'no-such-host.invalid'" in line and "check the address" in line
    assert list(tmp_path.iterdir()) == [path]


def test_busy_exporter_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = _run_config(tmp_path, f"127.0.0.1:{free_port()}", port=port)
        result = run_cli("run", "--config", str(path), timeout=60)
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "set exporter.port" in line
    assert list(tmp_path.iterdir()) == [path]  # checked before any state file


def test_unresolvable_exporter_host_is_one_line(tmp_path: Path) -> None:
    path = _run_config(tmp_path, f"127.0.0.1:{free_port()}", host="no-such-host.invalid")
    result = run_cli("run", "--config", str(path), timeout=60)
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert "exporter.host 'no-such-host.invalid' does not resolve" in line


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("fairness:\n  features: [r\xe9gion]\n".encode("latin-1"))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert str(path) in line and "is not UTF-8" in line and "save the file as UTF-8" in line


def test_run_without_config_refuses_to_measure_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_fair", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert "no fairness.features configured" in line and "--config FILE" in line
    assert list(tmp_path.iterdir()) == []  # no state directory either


def test_run_reads_the_config_named_by_stream_fair_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", {"join": {"ttl": "soon"}})
    result = run_cli("run", env=cli_env(STREAM_FAIR_CONFIG=str(path)))
    assert result.returncode == 2 and "join.ttl" in _one_line(result.stderr)


def test_run_never_imports_the_dev_tooling(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from stream_fair import cli\n"
        "from stream_fair.app import Detector\n"
        "cli.parser(dev=False).parse_args(['run', '--config', 'x.yaml'])\n"
        "bad = sorted(m for m in sys.modules if m.startswith('stream_fair.dev'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


# -- --help ------------------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_each_subcommand_help_documents_every_option(command: str) -> None:
    sub = _subparsers()[command]
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert sub.description and len(sub.description.splitlines()[0]) < 100  # a one-line summary first
    assert sub.description.splitlines()[0] in text
    assert "`" * 2 not in result.stdout, "literal RST backticks in --help"
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings}: no help"
        for option in action.option_strings:
            assert option in text, option
        assert " ".join(action.help.split()) in text, action.help
        if action.choices:
            assert "{" + ",".join(map(str, action.choices)) + "}" in text, action.choices
        default = action.default
        if not (default is None or default is False or default == []):  # unset defaults say nothing
            assert f"(default: {default})" in text or "(default:" in action.help, (command, action.dest)


def test_top_level_help_lists_every_command_with_a_line() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name, sub in _subparsers().items():
        assert re.search(rf"^\s+{re.escape(name)}\b", result.stdout, re.M), name
        assert sub.description
    assert "`" * 2 not in result.stdout


def test_simulate_scenario_choices_are_the_simulator_table() -> None:
    from stream_fair.dev.simulate import SCENARIOS

    [scenario] = [a for a in _subparsers()["simulate"]._actions if a.dest == "scenario"]
    assert sorted(scenario.choices or []) == sorted(SCENARIOS)
    bad = run_cli("simulate", "--scenario", "nope", "--print-config")
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


@pytest.mark.integration
@pytest.mark.transports
def test_run_with_missing_topic_exits_2(kafka_bootstrap: str, tmp_path: Path) -> None:
    tag = str(time.monotonic_ns())
    path = _run_config(tmp_path, kafka_bootstrap, predictions=f"absent-p-{tag}", outcomes=f"absent-o-{tag}")
    result = run_cli("run", "--config", str(path), timeout=60)
    assert result.returncode == 2, result
    line = _one_line(result.stderr)
    assert f"topics.predictions='absent-p-{tag}' does not exist" in line, line
    assert "create it or fix topics.predictions" in line


@pytest.mark.parametrize("scenario", ["lending", "bias_onset", "feedback_loop"])
def test_simulate_prints_the_config_that_reads_its_stream(tmp_path: Path, scenario: str) -> None:
    from stream_fair import config as sf_config
    from stream_fair.dev.simulate import SCENARIOS

    result = run_cli(
        "simulate", "--scenario", scenario, "--bootstrap-servers", "kafka:9092", "--print-config",
        "--predictions-topic", "p", "--outcomes-topic", "o",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = tmp_path / "sim.yaml"
    path.write_text(result.stdout, encoding="utf-8")
    cfg = sf_config.load(path, environ={})
    s = SCENARIOS[scenario]()
    assert [f.name for f in cfg.fairness.features] == list(s.features)
    assert all(f.reference in s.features[f.name] for f in cfg.fairness.features)
    assert (cfg.topics.predictions, cfg.topics.outcomes) == ("p", "o")
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.fairness.intersections == ([["race", "sex"]] if scenario == "lending" else [])


def test_client_log_lines_are_passed_once_per_kind_then_counted() -> None:
    """A Kafka client's repeated lines (every reconnect attempt, librdkafka's queued lines
    handed over at once) pass once per kind per 10 s, the next one saying how many were held
    back; our own lines always pass."""
    repeats = cli.ClientRepeats(every=0.3)

    def line(name: str, text: str, *args: Any) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, text, args, None)

    refused = "FAIL [%s] Connect to ipv4#127.0.0.1:%d failed: Connection refused (after %dms)"
    passed = [repeats.filter(line("stream_fair.librdkafka", refused, "c-1", 9092, i)) for i in range(1000)]
    assert passed == [True] + [False] * 999  # only the numbers differ: one kind
    other = line("kafka.conn", "Connection failed: KafkaConnectionError: 111 ECONNREFUSED")
    assert repeats.filter(other) and not repeats.filter(line("kafka.conn", other.msg))
    ours = [repeats.filter(line("stream_fair", "checkpoint failed, retrying in 1 s")) for _ in range(5)]
    assert all(ours)
    time.sleep(0.35)
    later = line("stream_fair.librdkafka", refused, "c-1", 9092, 5)
    assert repeats.filter(later)
    assert later.getMessage().endswith("(after 5ms) (999 more like it held back)")
    assert not repeats.filter(line("stream_fair.librdkafka", refused, "c-1", 9092, 6))


@pytest.mark.parametrize(
    ("name", "cfg", "words"),
    [
        ("no_features", {}, ["configures no fairness.features", "add the sensitive attributes"]),
        (
            "missing_ca",
            {"kafka": {"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}},
            ["kafka.ssl_cafile", "cannot read '/nonexistent/ca.pem'", "mount the PEM file"],
        ),
        (
            "missing_web_config",
            {"exporter": {"web_config_file": "/nonexistent/web.yml"}},
            ["exporter.web_config_file", "/nonexistent/web.yml"],
        ),
    ],
)
def test_check_config_refuses_what_run_refuses(
    tmp_path: Path, name: str, cfg: dict[str, Any], words: list[str]
) -> None:
    """Review finding: these passed ``check-config`` (exit 0) and then stopped ``run``; a missing CA
    file even surfaced as "the broker did not answer" after the broker wait. Both now give the same
    one line, and ``run`` gives it before it waits for any broker."""
    features = {} if name == "no_features" else {"fairness": {"features": ["sex"]}}
    path = write_config(tmp_path / f"{name}.yaml", {**features, **cfg})
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(path), timeout=60)
        assert result.returncode == 2, (command, result)
        line = _one_line(result.stderr)
        for word in words:
            assert word in line, (command, word, line)
        if name == "no_features":
            assert str(path) in line and "--config FILE" not in line, line


def test_a_leftover_ssl_file_is_harmless_without_ssl(tmp_path: Path) -> None:
    """The transports read kafka.ssl_* only for SSL and SASL_SSL: a PLAINTEXT config keeping an old
    ssl_cafile ran before, and must still pass (review finding on the startup check)."""
    cfg = {"kafka": {"ssl_cafile": "/nonexistent/ca.pem"}, "fairness": {"features": ["sex"]}}
    result = run_cli("check-config", "--config", str(write_config(tmp_path / "plain.yaml", cfg)))
    assert result.returncode == 0, result.stderr
