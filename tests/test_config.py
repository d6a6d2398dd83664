"""Configuration: defaults, YAML + environment, one-line errors naming the key, docs kept true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from stream_fair import config as cfgmod
from stream_fair.config import Config, ConfigError, load

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_documented_example_loads() -> None:
    cfg = load(ROOT / "docs" / "config.example.yaml", environ={})
    assert [f.name for f in cfg.fairness.features] == ["sex", "race", "age_band"]
    assert cfg.fairness.features[2].path == "applicant.age_band"
    assert cfg.windows == [3600.0, 86400.0] and cfg.window_resolution == 300.0
    assert cfg.join.ttl == 7 * 86400
    assert load(environ={}) == Config()


def test_environment_overrides_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka: {bootstrap_servers: a:1, group_id: g}\nwindows: [1h]\n")
    cfg = load(
        path,
        environ={
            "STREAM_FAIR_KAFKA__BOOTSTRAP_SERVERS": "b:2",
            "STREAM_FAIR_WINDOWS": "[15m, 1h]",
            "STREAM_FAIR_EXPORTER__PORT": "9999",
            "STREAM_FAIR_TEST_BOOTSTRAP": "ignored: test-suite variable",
        },
    )
    assert cfg.kafka.bootstrap_servers == "b:2" and cfg.kafka.group_id == "g"
    assert cfg.windows == [900.0, 3600.0] and cfg.exporter.port == 9999


def test_secrets_are_masked_everywhere() -> None:
    cfg = load(
        environ={
            "STREAM_FAIR_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "STREAM_FAIR_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAM_FAIR_KAFKA__SASL_USERNAME": "u",
            "STREAM_FAIR_KAFKA__SASL_PASSWORD": "hunter2",
        }
    )
    assert cfg.kafka.sasl_password is not None
    assert cfg.kafka.sasl_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfgmod.redacted(cfg))


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"STREAM_FAIR_KAFKA__BOOTSTRAP": "x"}, "unknown key 'kafka.bootstrap'"),
        ({"STREAM_FAIR_JOIN__TTL": "soon"}, "join.ttl: expected a duration"),
        ({"STREAM_FAIR_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "needs kafka.sasl_mechanism"),
        ({"STREAM_FAIR_KAFKA__SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol"),
        ({"STREAM_FAIR_WINDOWS": "[7m]"}, "not a multiple of window_resolution"),
        (
            {"STREAM_FAIR_FAIRNESS__INTERSECTIONS": "[[sex, race]]"},
            "'sex', which is not in fairness.features",
        ),
        ({"STREAM_FAIR_FAIRNESS__CREDIBLE_LEVEL": "95"}, "fairness.credible_level"),
        ({"STREAM_FAIR_FEEDBACK": "{bogus: 1}"}, "unknown key 'bogus'"),
        ({"STREAM_FAIR_FEEDBACK": "{period: 5m}"}, "not a multiple of alarm_slot 10m: set feedback.period"),
        (
            {"STREAM_FAIR_FEEDBACK": "{period: 1h, alarm_slot: 7m}"},
            "(e.g. alarm_slot: 400s; on existing state a change of either is a start-over",
        ),
        (
            {"STREAM_FAIR_FEEDBACK": "{loop_window: 6}"},
            "loop_min_periods 8 exceeds the 7 periods loop_window 6",
        ),
        ({"STREAM_FAIR_FEEDBACK": "{delay_quantiles: [50, 90]}"}, "delay_quantiles are fractions in (0, 1)"),
        ({"STREAM_FAIR_FEEDBACK": "{fast_alpha: 0.01}"}, "need 0 < slow_alpha < fast_alpha <= 1"),
        ({"STREAM_FAIR_FEEDBACK": "{detector: ADWIN}"}, "unknown detector 'ADWIN'"),
        (
            {"STREAM_FAIR_FEEDBACK": "{detector_params: {bogus: 1}}"},
            "detector_params {'bogus': 1} do not fit",
        ),
        ({"STREAM_FAIR_FEEDBACK": '{min_samples: "100"}'}, "min_samples: expected a whole number"),
        ({"STREAM_FAIR_FEEDBACK": '{use_scores: "false"}'}, "use_scores: expected true or false"),
        ({"STREAM_FAIR_FEEDBACK": "{reference_periods: 0}"}, "reference_periods must be at least 1"),
        (
            {"STREAM_FAIR_FAIRNESS__THRESHOLDS": "{demographic_parity_diff: 0.1}"},
            "unknown disparity 'demographic_parity_diff'",
        ),
        (
            {"STREAM_FAIR_FAIRNESS__THRESHOLDS": "{demographic_parity_ratio: 80}"},
            "threshold demographic_parity_ratio = 80.0 is out of range",
        ),
        (
            {"STREAM_FAIR_FAIRNESS": "{features: [sex, race], intersections: [[race, sex], [sex, race]]}"},
            "fairness.intersections lists sex&race twice",
        ),
        ({"STREAM_FAIR_TOPICS": "{predictions: a, outcomes: a}"}, "topics.outcomes is the same topic"),
        (
            {"STREAM_FAIR_TOPICS": "{outcomes: b, dead_letters: b}"},
            "topics.dead_letters is the input topic 'b'",
        ),
        ({"STREAM_FAIR_WINDOW_RESOLUTION": "1h"}, "windows entry 1h is a single window_resolution step"),
        ({"STREAM_FAIR_SCHEMA__PREDICTION__PREDICTION": "null"}, "schema.score_threshold"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(environ=environ)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config error: ")
    assert expected in message


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("topics.dead_letters", "bad topic!"),
        ("topics.predictions", "."),
        ("topics.outcomes", ".."),
        ("topics.predictions", ""),
        ("topics.outcomes", "o" * 250),
        ("topics.dead_letters", "dead/letters"),
        ("state.changelog_topic", "changelog ü"),
    ],
)
def test_an_illegal_topic_name_is_one_line_naming_the_key(tmp_path: Path, key: str, name: str) -> None:
    """Review finding: ``topics.dead_letters: "bad topic!"`` passed check-config, and the run then
    retried its dead-letter writes forever. Every configured topic name now follows Kafka's rule."""
    section, leaf = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {leaf: name}}, allow_unicode=True))
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"config error: {key}: "), message
    assert "legal Kafka topic name" in message or "too long: Kafka allows 1-249" in message, message


def test_legal_topic_names_pass_and_the_group_id_must_name_legal_internal_topics() -> None:
    legal = {"predictions": "a" * 249, "outcomes": "ns.outcomes_v2-1", "dead_letters": "..."}
    assert load(environ={"STREAM_FAIR_TOPICS": str(legal)}).topics.outcomes == "ns.outcomes_v2-1"
    # with the changelog on, <group_id>-stream-fair-{changelog,leader,increments} are topics too
    for group in ("fraud team", "g" * 227):
        with pytest.raises(ConfigError) as err:
            load(environ={"STREAM_FAIR_KAFKA__GROUP_ID": group})
        message = str(err.value)
        assert "\n" not in message and message.startswith("config error: kafka.group_id "), message
        assert f"names the topic '{group}-stream-fair-" in message, message
        assert "use a group id of 1-226 of a-z A-Z 0-9 . _ -" in message, message
    assert load(environ={"STREAM_FAIR_KAFKA__GROUP_ID": "g" * 226}).kafka.group_id == "g" * 226
    changelog_off = {"STREAM_FAIR_KAFKA__GROUP_ID": "fraud team", "STREAM_FAIR_STATE__CHANGELOG": "false"}
    assert load(environ=changelog_off).kafka.group_id == "fraud team"  # no topic named after it


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad, environ={})


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_every_config_key_is_in_the_reference() -> None:
    """docs/configuration.md stays true: each key appears (by its last component) in its section."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"^## (\S+)[^\n]*\n(.*?)(?=^## |\Z)", doc, flags=re.S | re.M))
    missing = []
    for key in _fields(Config):
        top, *rest = key.split(".")
        body = sections.get(top, "") + sections.get(f"{top},", "")
        if top in ("windows", "window_resolution"):
            body = sections.get("windows,", "")
        if not rest and (top in sections or f"{top}," in sections):
            continue  # a top-level key with its own section
        leaf = rest[-1] if rest else top
        if f"`{leaf}`" not in body and f".{leaf}`" not in body and f"`{leaf}," not in body:
            missing.append(key)
    assert not missing, f"undocumented config keys: {missing}"


SASL = {
    "STREAM_FAIR_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "STREAM_FAIR_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
}
TRICKY = ["p@ss #1", "'quoted'", "2024-01-01", "12345", "null", " spaced ", "yes", "[a, b]", "a: b", "~"]


@pytest.mark.parametrize("secret", TRICKY)
def test_secrets_from_the_environment_are_verbatim(secret: str) -> None:
    # an optional plain string is unset by null or ~, a secret never
    user = "u" if secret in ("null", "~") else secret
    env = {**SASL, "STREAM_FAIR_KAFKA__SASL_USERNAME": user, "STREAM_FAIR_KAFKA__SASL_PASSWORD": secret}
    cfg = load(environ=env)
    assert cfg.kafka.sasl_password is not None and cfg.kafka.sasl_password.get_secret_value() == secret
    assert cfg.kafka.sasl_username == user


def test_plain_string_keys_are_verbatim_too() -> None:
    cfg = load(
        environ={"STREAM_FAIR_KAFKA__GROUP_ID": "2024-01-01", "STREAM_FAIR_TOPICS__PREDICTIONS": "0x1F"}
    )
    assert cfg.kafka.group_id == "2024-01-01" and cfg.topics.predictions == "0x1F"  # YAML: 31
    assert load(environ={"STREAM_FAIR_TOPICS__DEAD_LETTERS": "null"}).topics.dead_letters is None


@pytest.mark.parametrize("secret", TRICKY)
def test_secrets_from_files_are_verbatim(tmp_path: Path, secret: str) -> None:
    (tmp_path / "user").write_text(secret)  # as Kubernetes mounts a Secret key: no newline
    (tmp_path / "password").write_text(secret + "\n")  # as `echo` writes it: one newline dropped
    (tmp_path / "c.yaml").write_text(f"kafka: {{sasl_password_file: {tmp_path / 'password'}}}\n")
    cfg = load(
        tmp_path / "c.yaml", environ={**SASL, "STREAM_FAIR_KAFKA__SASL_USERNAME_FILE": str(tmp_path / "user")}
    )
    assert cfg.kafka.sasl_password is not None and cfg.kafka.sasl_password.get_secret_value() == secret
    assert cfg.kafka.sasl_username == secret
    assert secret.strip() not in str(cfgmod.redacted(cfg).get("kafka", {}).get("sasl_password"))


def test_secret_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(environ={"STREAM_FAIR_KAFKA__SASL_PASSWORD_FILE": str(tmp_path / "absent")})
    assert "\n" not in str(err.value)
    assert "kafka.sasl_password_file: cannot read" in str(err.value) and "mount the secret" in str(err.value)
    (tmp_path / "p").write_text("x")
    with pytest.raises(ConfigError, match="set kafka.sasl_password or kafka.sasl_password_file, not both"):
        load(
            environ={
                "STREAM_FAIR_KAFKA__SASL_PASSWORD_FILE": str(tmp_path / "p"),
                "STREAM_FAIR_KAFKA__SASL_PASSWORD": "y",
            }
        )


def test_thresholds_that_never_flag_are_accepted() -> None:
    """A ratio's 0 or a difference's 1 is how a team silences one disparity: valid, not out of range."""
    cfg = load(
        environ={"STREAM_FAIR_FAIRNESS__THRESHOLDS": "{demographic_parity_ratio: 0, accuracy_difference: 1}"}
    )
    assert cfg.fairness.thresholds == {"demographic_parity_ratio": 0.0, "accuracy_difference": 1.0}
