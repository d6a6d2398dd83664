"""The detector config that matches a synthetic scenario (``stream-fair simulate --print-config``).

A scenario's sensitive features become ``fairness.features`` (reference: the most common value,
ties to the alphabetically last, so ``sex`` gets ``Male`` and ``race`` gets ``White``); an
intersectional affected cell becomes ``fairness.intersections``. Everything else keeps the
documented defaults, so the printed file is a readable starting point for a real config.

>>> from stream_fair.dev.simulate import SCENARIOS
>>> cfg = scenario_config(SCENARIOS["lending"](), "localhost:9092")
>>> [(f["name"], f["reference"]) for f in cfg["fairness"]["features"]]
[('sex', 'Male'), ('race', 'White'), ('age', '25-44')]
>>> cfg["fairness"]["intersections"]
[['race', 'sex']]
>>> scenario_config(SCENARIOS["bias_onset"](), "localhost:9092")["fairness"]["features"]
[{'name': 'group', 'reference': 'A'}]
"""

from __future__ import annotations

from typing import Any

import yaml

from stream_fair.dev.simulate import Scenario


def reference_group(shares: dict[str, float]) -> str:
    """The most common value; ties go to the alphabetically last (``Male`` over ``Female``)."""
    return max(shares, key=lambda v: (shares[v], v))


def scenario_config(
    scenario: Scenario,
    bootstrap_servers: str,
    predictions_topic: str = "predictions",
    outcomes_topic: str = "outcomes",
    *,
    group_id: str | None = None,
) -> dict[str, Any]:
    """A config (as a dict) for ``stream-fair run`` on the topics the scenario was produced to."""
    features = [
        {"name": name, "reference": reference_group(dict(shares))}
        for name, shares in scenario.features.items()
    ]
    intersections: list[list[str]] = []
    if scenario.affected and "&" in scenario.affected:
        intersections.append([part.partition("=")[0] for part in scenario.affected.split("&")])
    return {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "group_id": group_id or f"stream-fair-{scenario.name.replace('_', '-')}",
        },
        "topics": {
            "predictions": predictions_topic,
            "outcomes": outcomes_topic,
            "dead_letters": "stream-fair-dead-letters",
        },
        "fairness": {"features": features, "intersections": intersections},
        # the simulated model decides score >= 0.5: the threshold what-ifs (/whatif) start from it
        "schema": {"score_threshold": 0.5},
    }


def scenario_config_yaml(scenario: Scenario, bootstrap_servers: str, **kwargs: Any) -> str:
    """:func:`scenario_config` as commented YAML, ready for ``--config``."""
    body = yaml.safe_dump(scenario_config(scenario, bootstrap_servers, **kwargs), sort_keys=False)
    return (
        f"# stream-fair config for the simulated {scenario.name!r} stream "
        "(stream-fair simulate --print-config)\n"
        f"# {scenario.description}\n"
        "# Every key and its default: docs/configuration.md\n" + body
    )
