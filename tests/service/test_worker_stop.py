"""A training run stops once it is over: workers.train.report.HttpReporter.should_stop against
the real internal routes (uvicorn serving create_app, both databases).

Not only a cancel: a requeued run, a run a newer one replaced (409 run_over) and a run whose
token the control plane no longer takes (401) must stop training, or they burn GPUs for a
result nobody will accept.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from api_helpers import running_job

from service.db.models import Job
from service.jobs import states
from service.security import job_token
from service.settings import Settings
from workers.train.report import HttpReporter

ATTEMPT = 1


@pytest.fixture
def running(client, app, tenant):
    """A running job (its first run) and that run's token."""
    return running_job(client, app, tenant, ATTEMPT)


def _reporter(live_url: str, job_id: str, token: str) -> HttpReporter:
    return HttpReporter(live_url, job_id, token, flush_interval=60, status_interval=0, attempts=1)


def _set(app, job_id: str, **values) -> None:
    with app.state.session_factory() as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(**values))
        s.commit()


@pytest.mark.parametrize("ending", ["cancelling", "requeued", "replaced", "timed_out", "foreign_token"])
def test_a_run_that_is_over_stops_training(live_url, app, running, ending):
    job_id, token = running
    reporter = _reporter(live_url, job_id, token)
    try:
        assert reporter.should_stop() is False  # the current run of a running job goes on
        if ending == "cancelling":
            _set(app, job_id, status=states.CANCELLING)
        elif ending == "requeued":  # status poll: 200 "queued" (the next run is not started yet)
            _set(app, job_id, status=states.QUEUED)
        elif ending == "replaced":  # status poll: 409 run_over
            _set(app, job_id, attempts=ATTEMPT + 1)
        elif ending == "timed_out":
            _set(app, job_id, status=states.FAILED, error_code="timeout")
        else:  # status poll: 401 (a token of another secret: as good as expired)
            reporter.close()
            reporter = _reporter(live_url, job_id, job_token(job_id, ATTEMPT, Settings(internal_secret="x"),
                                                             ttl_s=3600))
        assert reporter.should_stop() is True
    finally:
        reporter.close()


def test_a_new_run_of_the_same_job_goes_on(live_url, app, running):
    """The run that replaced a stale one is the current run: it trains on."""
    job_id, _ = running
    _set(app, job_id, attempts=ATTEMPT + 1)
    reporter = _reporter(live_url, job_id, job_token(job_id, ATTEMPT + 1, app.state.settings, ttl_s=3600))
    try:
        assert reporter.should_stop() is False
    finally:
        reporter.close()
