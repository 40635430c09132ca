"""The chart's scheduler: autoscaling mode off by default, Ray Jobs in flight bounded, and the
cluster / queue-wait / wall-clock limits reach the scheduler as the settings it reads."""

from __future__ import annotations

import pytest
from chart_helpers import FULLNAME, pod, render

from service.settings import Settings

SCHEDULER = f"Deployment/{FULLNAME}-scheduler"


def _env(values: dict) -> dict[str, str]:
    return {k: v["value"] for k, v in pod(render(values), SCHEDULER).env().items() if "value" in v}


def test_defaults_turn_autoscaling_off_and_bound_ray_jobs_in_flight():
    env = _env({})
    assert env["LORAFLEET_RAY_AUTOSCALING"] == "false"
    assert env["LORAFLEET_MAX_RAY_JOBS_IN_FLIGHT"] == "32"
    assert env["LORAFLEET_MAX_QUEUE_WAIT_S"] == "604800" and env["LORAFLEET_MAX_JOB_WALL_CLOCK_S"] == "86400"
    assert "LORAFLEET_CLUSTER_MAX_GPUS" not in env
    # What the scheduler process makes of them.
    s = Settings.model_validate({k[len("LORAFLEET_"):].lower(): v for k, v in env.items()
                                 if k in ("LORAFLEET_RAY_AUTOSCALING", "LORAFLEET_MAX_RAY_JOBS_IN_FLIGHT")})
    assert s.ray_autoscaling is False and s.max_ray_jobs_in_flight == 32


def test_autoscaling_plans_against_the_cluster_maximum():
    env = _env({"scheduler": {"rayAutoscaling": True, "clusterMaxGpus": 64, "maxRayJobsInFlight": 8}})
    assert env["LORAFLEET_RAY_AUTOSCALING"] == "true" and env["LORAFLEET_CLUSTER_MAX_GPUS"] == "64"
    assert env["LORAFLEET_MAX_RAY_JOBS_IN_FLIGHT"] == "8"
    with pytest.raises(Exception, match="clusterMaxGpus"):
        render({"scheduler": {"rayAutoscaling": True}})
