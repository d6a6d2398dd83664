"""``/whatif`` and ``stream-fair whatif`` on a real detector (embedded broker, basic auth), checked
against numpy and fairlearn on the produced events.

The stream is made here, not by the simulator: three groups with different score distributions
and base rates, label delays that differ by group and depend on the label, and a group too small
for ``min_samples``.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import numpy as np
import pytest
import yaml
from fairlearn.postprocessing import ThresholdOptimizer

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev.broker import create_topics, produce_events
from tests.conftest import TopicNames
from tests.helpers import cli_env, detector_config, paced, run_cli, wait_for
from tests.test_whatif import _FAIRLEARN, _np_rates, _Scores

pytestmark = pytest.mark.integration

MODEL = "loans-v2"
USER, PASSWORD = "ops", "what-if-secret"
# group -> (pairs, base rate, score separation, mean label delay for label 1 / label 0, seconds)
GROUPS = {"A": (1500, 0.45, 2.4, 0.3, 1.5), "B": (1100, 0.25, 1.3, 2.0, 0.2), "C": (800, 0.35, 0.9, 0.5, 0.5)}
TINY = ("D", 25)
EDGES = np.linspace(0.0, 1.0, 51)  # the histogram bins (docs/whatif.md)


def _events(seed: int) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, str, dict[str, Any]]] = []
    raw: dict[str, list[Any]] = {"s": [], "y": [], "g": []}
    i = 0
    specs = {**GROUPS, TINY[0]: (TINY[1], 0.4, 1.5, 0.5, 0.5)}
    for g, (n, base, sep, d1, d0) in specs.items():
        y = (rng.random(n) < base).astype(int)
        s = 1 / (1 + np.exp(-rng.normal(sep * (y - 0.5), 1.0)))
        # never within 1e-9 of a bin edge: the oracle's `score >= edge` and the binning then agree
        s = np.where(np.abs(s * 50 - np.round(s * 50)) < 1e-6, s + 1e-5, s)
        ts = np.sort(rng.uniform(1_700_000_000, 1_700_000_030, n)).tolist()
        delay = rng.exponential(np.where(y == 1, d1, d0)).tolist()
        for k in range(n):
            rid = f"r{i}"
            i += 1
            attrs = {"grp": g, "region": "north" if k % 2 else "south"}
            rows.append(
                (
                    ts[k],
                    "prediction",
                    {
                        "id": rid,
                        "ts": ts[k],
                        "model": MODEL,
                        "prediction": int(s[k] >= 0.5),
                        "score": float(s[k]),
                        "attributes": attrs,
                    },
                )
            )
            rows.append(
                (ts[k] + delay[k], "outcome", {"id": rid, "ts": ts[k] + delay[k], "label": int(y[k])})
            )
        raw["s"] += s.tolist()
        raw["y"] += y.tolist()
        raw["g"] += [g] * n
    rows.sort(key=lambda r: r[0])
    return [(kind, p) for _, kind, p in rows], {k: np.array(v) for k, v in raw.items()}


def _auth() -> str:
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def _get(url: str, auth: bool = True) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", _auth())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith(b"{") else {"raw": body.decode()}


@pytest.fixture(scope="module")
def instance(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    tmp = tmp_path_factory.mktemp("whatif")
    web = tmp / "web.yml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web.write_text(yaml.safe_dump({"basic_auth_users": {USER: hashed}}))
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, list(topics), partitions=2)
    cfg = detector_config(
        kafka_bootstrap,
        topics,
        f"stream-fair-whatif-{tag}",
        tmp / "state",
        fairness={"features": ["grp", "region"], "intersections": [], "min_samples": 100},
        schema={"score_threshold": 0.5},
        state={"checkpoint_interval": "200ms"},
        exporter={"web_config_file": str(web)},
    )
    detector = Detector(Config.model_validate(cfg), exporter_port=0)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), name="detector", daemon=True)
    thread.start()
    try:
        events, raw = _events(seed=31)
        produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, paced(events, 20_000))
        url = f"http://127.0.0.1:{detector.port}"
        n = len(raw["y"])
        query = f"{url}/whatif?model={MODEL}&feature=grp&threshold=A:0.5"

        def all_labelled() -> bool:
            code, doc = _get(query)
            return code == 200 and sum(g["n"] for g in doc["groups"].values()) == n - TINY[1]

        wait_for(all_labelled, 90, "every labelled pair in the histograms")
        yield url, raw
    finally:
        stop.set()
        thread.join(timeout=30)


def test_equal_opportunity_thresholds_are_the_brute_force_optimum(
    instance: tuple[str, dict[str, np.ndarray]],
) -> None:
    url, raw = instance
    code, doc = _get(f"{url}/whatif?model={MODEL}&feature=grp&criterion=equal_opportunity&tolerance=0.03")
    assert code == 200, doc
    assert doc["met"] is True and set(doc["groups"]) == set(GROUPS)
    assert doc["partitions"] == [0, 1] and doc["partitions_total"] == 2  # all of them: no note
    assert doc["notes"] == []
    assert "D" in doc["excluded"] and "min_samples=100" in doc["excluded"]["D"]
    # brute force over all 51^3 edge combinations, rates by numpy on the raw events
    tpr = {
        g: np.array(
            [
                _np_rates(raw["s"][raw["g"] == g], raw["y"][raw["g"] == g], t)["true_positive_rate"]
                for t in EDGES
            ]
        )
        for g in GROUPS
    }
    correct = {
        g: np.array(
            [
                _np_rates(raw["s"][raw["g"] == g], raw["y"][raw["g"] == g], t)["accuracy"] * GROUPS[g][0]
                for t in EDGES
            ]
        )
        for g in GROUPS
    }
    a, b, c = np.meshgrid(*(np.arange(51),) * 3, indexing="ij")
    rates = np.stack([tpr["A"][a], tpr["B"][b], tpr["C"][c]])
    ok = rates.max(axis=0) - rates.min(axis=0) <= 0.03 + 1e-12
    total = correct["A"][a] + correct["B"][b] + correct["C"][c]
    best = total[ok].max() / sum(v[0] for v in GROUPS.values())
    assert doc["overall"]["accuracy"]["value"] == pytest.approx(best, abs=1e-12)
    chosen = {
        g: _np_rates(raw["s"][raw["g"] == g], raw["y"][raw["g"] == g], r["rule"]["thresholds"][0])
        for g, r in doc["groups"].items()
    }
    for g, r in doc["groups"].items():
        now = _np_rates(raw["s"][raw["g"] == g], raw["y"][raw["g"] == g], 0.5)
        for name, value in chosen[g].items():
            assert r["rates"][name]["value"] == pytest.approx(value, abs=1e-12)
            assert r["rates"][name]["lower"] <= value <= r["rates"][name]["upper"]
            assert r["current_rates"][name]["value"] == pytest.approx(now[name], abs=1e-12)
        assert r["accuracy_change"]["value"] == pytest.approx(
            chosen[g]["accuracy"] - now["accuracy"], abs=1e-12
        )
    tprs = [v["true_positive_rate"] for v in chosen.values()]
    assert doc["disparities"]["equal_opportunity_difference"]["value"] == pytest.approx(max(tprs) - min(tprs))


def test_randomized_equalized_odds_agrees_with_fairlearn(instance: tuple[str, dict[str, np.ndarray]]) -> None:
    url, raw = instance
    code, doc = _get(f"{url}/whatif?model={MODEL}&feature=grp&criterion=equalized_odds&mode=randomized")
    assert code == 200, doc
    keep = raw["g"] != TINY[0]
    s = EDGES[np.searchsorted(EDGES, raw["s"][keep], side="right") - 1]  # the bins fairlearn sees
    y, g = raw["y"][keep], raw["g"][keep]
    opt = ThresholdOptimizer(
        estimator=_Scores().fit(None, None),
        constraints=_FAIRLEARN["equalized_odds"],
        prefit=True,
        predict_method="predict",
    ).fit(s[:, None], y, sensitive_features=g)
    p = opt._pmf_predict(s[:, None], sensitive_features=g)[:, 1]
    for group, r in doc["groups"].items():
        m = g == group
        tpr, fpr = np.sum(p[m] * y[m]) / np.sum(y[m]), np.sum(p[m] * (1 - y[m])) / np.sum(1 - y[m])
        # the served intervals use the expected counts rounded to integers
        assert r["rates"]["true_positive_rate"]["value"] == pytest.approx(tpr, abs=1.0 / np.sum(y[m]))
        assert r["rates"]["false_positive_rate"]["value"] == pytest.approx(fpr, abs=1.0 / np.sum(1 - y[m]))
    assert doc["overall"]["accuracy"]["value"] == pytest.approx(np.mean(p * y + (1 - p) * (1 - y)), abs=2e-3)


def test_plain_what_if_and_errors(instance: tuple[str, dict[str, np.ndarray]]) -> None:
    url, raw = instance
    base = f"{url}/whatif?model={MODEL}&feature=grp"
    code, doc = _get(base + "&" + urllib.parse.urlencode({"threshold": "B:0.4"}))
    assert code == 200, doc
    m = raw["g"] == "B"
    new, old = _np_rates(raw["s"][m], raw["y"][m], 0.4), _np_rates(raw["s"][m], raw["y"][m], 0.5)
    assert doc["groups"]["B"]["rates"]["selection_rate"]["value"] == pytest.approx(new["selection_rate"])
    assert doc["groups"]["B"]["accuracy_change"]["value"] == pytest.approx(new["accuracy"] - old["accuracy"])
    assert doc["groups"]["A"]["accuracy_change"]["value"] == 0.0
    assert {g: r["current_mismatch"] for g, r in doc["groups"].items()} == dict.fromkeys(GROUPS, 0)
    assert doc["notes"] == []
    # a wrong current threshold for A is caught against A's recorded decisions (score >= 0.5)
    code, doc = _get(base + "&" + urllib.parse.urlencode([("threshold", "B:0.4"), ("current", "A:0.4")]))
    m = raw["g"] == "A"
    assert doc["groups"]["A"]["current_mismatch"] == np.sum((raw["s"][m] >= 0.4) & (raw["s"][m] < 0.5))
    assert len(doc["notes"]) == 1 and doc["notes"][0].startswith("the recorded decisions of A are not")
    assert _get(base + "&criterion=equal_opportunity", auth=False)[0] == 401
    code, doc = _get(f"{url}/whatif?model=nope&feature=grp&criterion=equal_opportunity")
    assert code == 404 and "no labelled score histograms for model 'nope'" in doc["error"]
    assert f"('{MODEL}', 'grp')" in doc["error"]  # the known (model, feature) pairs are listed
    code, doc = _get(f"{base}&criterion=statistical_parity")
    assert code == 400 and doc["error"].startswith("unknown criterion 'statistical_parity'")
    code, doc = _get(f"{base}&threshold=D:0.3")
    assert code == 422 and "min_samples=100" in doc["error"]
    code, doc = _get(f"{url}/whatif?model={MODEL}&feature=grp")
    assert code == 400 and "criterion=" in doc["error"]


def test_cli(instance: tuple[str, dict[str, np.ndarray]], tmp_path: Path) -> None:
    url, _ = instance
    env = cli_env(STREAM_FAIR_PASSWORD=PASSWORD)
    args = ("whatif", "--url", url, "--user", USER, "--model", MODEL, "--feature", "grp")
    out = run_cli(*args, "--criterion", "demographic_parity", "--tolerance", "0.05", env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "criterion demographic_parity (deterministic, tolerance 0.05): met" in text
    assert all(f"\n{g} " in text for g in GROUPS) and "excluded D:" in text
    code, doc = _get(f"{url}/whatif?model={MODEL}&feature=grp&criterion=demographic_parity&tolerance=0.05")
    for g, r in doc["groups"].items():
        assert f"{r['accuracy_change']['value']:+.3f}" in text.split(f"\n{g} ")[1].split("\n")[0]
    as_json = run_cli(*args, "--criterion", "demographic_parity", "--tolerance", "0.05", "--json", env=env)
    assert json.loads(as_json.stdout) == doc
    bad = run_cli(
        "whatif",
        "--url",
        url,
        "--user",
        USER,
        "--model",
        "nope",
        "--feature",
        "grp",
        "--criterion",
        "equal_opportunity",
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("stream-fair: no labelled score histograms")
    assert len(bad.stderr.strip().splitlines()) == 1
    small = run_cli(*args, "--threshold", "D:0.3", env=env)
    assert small.returncode == 2 and "min_samples=100" in small.stderr
    # the server's errors name query parameters; the CLI says them as the flags the user types
    neither = run_cli(*args, env=env)
    assert (
        neither.returncode == 2
        and "--criterion" in neither.stderr
        and "--threshold GROUP:T" in neither.stderr
    )
    assert "criterion=" not in neither.stderr and "threshold=" not in neither.stderr, neither.stderr
    noauth = run_cli(*args, "--criterion", "equal_opportunity", env=cli_env())
    assert noauth.returncode == 2 and "needs credentials" in noauth.stderr
