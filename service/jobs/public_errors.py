"""What a tenant reads when a job fails for a reason of ours: stable codes and our own words.

Text from Ray, boto/the object store, torch or any other library can carry file paths,
tracebacks, bucket names and endpoints of our infrastructure. It stays in our logs, under the
job id; the job's ``error.message`` and its events carry only the words below.

Failures the tenant can act on (``workers.spec.USER_ERROR_CODES``: their data, their
hyperparameters) keep the worker's own message: our code writes it for the tenant, naming the
line or the parameter to fix.
"""

from __future__ import annotations

import logging

from workers.spec import USER_ERROR_CODES

log = logging.getLogger("lorafleet.jobs")

_PUBLIC = {
    "storage_error": "The job could not read or write its files in our object store. "
                     "This is a problem on our side; please retry the job.",
    "base_model_load_failed": "The base model could not be loaded for this job. "
                              "This is a problem on our side; please retry the job.",
    "worker_lost": "The training run stopped unexpectedly. This is a problem on our side; "
                   "please retry the job.",
    "internal_error": "An internal error stopped the job. This is a problem on our side; "
                      "please retry the job.",
}
_DEFAULT = _PUBLIC["internal_error"]


def public_failure_message(code: str) -> str:
    """Our words for a platform failure ``code`` (any unknown code reads as internal_error)."""
    return _PUBLIC.get(code, _DEFAULT)


def tenant_failure_message(job_id: str, code: str, raw: str | None) -> str:
    """The message a job failed with ``code`` shows its tenant.

    A tenant-actionable code keeps ``raw`` (our workers' words for the tenant); any other code
    gets our fixed words, and ``raw`` goes to our log with the job id.
    """
    if code in USER_ERROR_CODES and raw:
        return raw
    if raw:
        log.warning("job %s failed (%s): %s", job_id, code, raw[:4000])
    return public_failure_message(code)
