"""Postgres connections are budgeted: every API and scheduler pod that can exist at once, at pool
+ overflow, must fit database.maxConnections, or the chart refuses to render."""

from __future__ import annotations

import pytest
import yaml

from chart_helpers import CHART_DIR, EXAMPLES, FULLNAME, example_values, one, pods, render, values_error

DEFAULTS = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["database"]


def _budget(values: dict) -> int:
    """What the fleet may open, computed here independently of the template."""
    db = {**DEFAULTS, **values.get("database", {})}
    pool = {role: {**DEFAULTS["pool"][role], **db.get("pool", {}).get(role, {})} for role in ("api", "scheduler")}
    api = values.get("api", {})
    api_pods = api.get("replicas", 2)
    if api.get("autoscaling", {}).get("enabled"):
        api_pods = max(api_pods, api["autoscaling"].get("maxReplicas", 10))
    scheduler_pods = values.get("scheduler", {}).get("replicas", 2)
    per = {role: p["size"] + p["maxOverflow"] for role, p in pool.items()}
    return (api_pods + 1) * per["api"] + (scheduler_pods + 1) * per["scheduler"] + db["reservedConnections"]


def test_each_role_gets_its_pool_and_timeouts():
    objs = render({"database": {"pool": {"api": {"size": 7, "maxOverflow": 3, "timeoutSeconds": 4}},
                                "statementTimeoutSeconds": 12}})
    by_owner = {p.owner: p for p in pods(objs)}
    api = by_owner[f"Deployment/{FULLNAME}-api"].env("api")
    scheduler = by_owner[f"Deployment/{FULLNAME}-scheduler"].env("scheduler")
    assert (api["LORAFLEET_DB_POOL_SIZE"]["value"], api["LORAFLEET_DB_MAX_OVERFLOW"]["value"],
            api["LORAFLEET_DB_POOL_TIMEOUT_S"]["value"]) == ("7", "3", "4")
    assert api["LORAFLEET_DB_STATEMENT_TIMEOUT_S"]["value"] == "12"
    assert (scheduler["LORAFLEET_DB_POOL_SIZE"]["value"], scheduler["LORAFLEET_DB_MAX_OVERFLOW"]["value"]) == ("5", "5")
    assert scheduler["LORAFLEET_DB_CONNECT_TIMEOUT_S"]["value"] == "5"
    one(objs, "Deployment", f"{FULLNAME}-api")


def test_the_settings_read_what_the_chart_sets(monkeypatch):
    from service.settings import Settings

    env = {k: v["value"] for k, v in pods(render())[0].env().items() if k.startswith("LORAFLEET_DB_")}
    assert len(env) == 5, env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.db_pool_size, s.db_max_overflow, s.db_pool_timeout_s, s.db_connect_timeout_s,
            s.db_statement_timeout_s) == (10, 30, 10.0, 5, 30.0)


@pytest.mark.parametrize("values", [
    {},
    {"api": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9}}},
    {"database": {"maxConnections": 155}},  # the defaults, exactly at the budget
], ids=["defaults", "hpa-9", "defaults-at-budget"])
def test_fleets_within_the_budget_render(values):
    assert _budget(values) <= {**DEFAULTS, **values.get("database", {})}["maxConnections"]
    render(values)


@pytest.mark.parametrize("values", [
    {"database": {"maxConnections": 154}},
    {"database": {"maxConnections": 100}, "api": {"replicas": 1}, "scheduler": {"replicas": 1}},
    {"api": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 20}}},  # HPA max counts
    {"database": {"pool": {"api": {"size": 100, "maxOverflow": 100, "timeoutSeconds": 10}}}},
    {"scheduler": {"replicas": 60}},
], ids=["one-short", "small-server", "hpa-max", "big-pool", "many-schedulers"])
def test_fleets_over_the_budget_are_refused(values):
    need = _budget(values)
    err = values_error(values)
    assert f"may open {need}" in err and "database.maxConnections" in err, err


def test_examples_fit_their_budget():
    for path in EXAMPLES:
        values = example_values(path)
        assert _budget(values) <= {**DEFAULTS, **values.get("database", {})}["maxConnections"], path.name
