"""Runs fine-tunes as Ray Jobs through the Ray dashboard's Job Submission API.

The control plane talks to Ray only here, over HTTP (no Ray driver connection), so the API and
scheduler images need no GPU stack. The submission id of a job's first run is the job id: Ray
refuses a second submission with the same id, so a job can never run twice at once.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from enum import Enum

import httpx

from service.scheduling.policy import Capacity

log = logging.getLogger(__name__)


class RunState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"  # Ray has no record of the submission

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.UNKNOWN)


@dataclass(frozen=True)
class ClusterResources:
    total: Capacity
    available: Capacity  # not held by anything: our runs, serving replicas, other Ray work


class LauncherError(Exception):
    """Ray could not be reached or refused the request."""


class RayUnavailable(LauncherError):
    """Ray's dashboard did not answer: nothing about any one job can be learned this tick."""


class SubmissionRefused(LauncherError):
    """Ray answered, and would not accept this one submission."""


def ray_token_from_env() -> str | None:
    """Ray's own token sources, in Ray's order: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return open(path).read().strip()
    return None


def submission_id(job_id: str, attempt: int) -> str:
    """Attempt 1 runs as the job id itself; a retry after a crashed run gets its own id."""
    return job_id if attempt <= 1 else f"{job_id}-r{attempt}"


class RayJobLauncher:
    def __init__(self, address: str, *, entrypoint: str | None = None, token: str | None = None,
                 timeout: float = 10.0):
        headers = {}
        token = token or ray_token_from_env()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.address = address.rstrip("/")
        self.entrypoint = entrypoint or f"{shlex.quote(sys.executable)} -m workers.train.ray_job"
        self._http = httpx.Client(base_url=self.address, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"Ray dashboard at {self.address} unreachable: {exc}") from exc

    def submit(self, sub_id: str, *, env: dict[str, str], num_cpus: float = 0,
               num_gpus: float = 0, entrypoint: str | None = None) -> None:
        """Submit (a fine-tune, or ``entrypoint``: an export or blend); a submission id Ray
        already knows is left alone (idempotent)."""
        body = {
            "entrypoint": entrypoint or self.entrypoint,
            "submission_id": sub_id,
            "runtime_env": {"env_vars": env},
            "metadata": {"lorafleet_job": sub_id},
            "entrypoint_num_cpus": num_cpus,
            "entrypoint_num_gpus": num_gpus,
        }
        resp = self._request("POST", "/api/jobs/", json=body)
        if resp.status_code == 200:
            return
        if self.state(sub_id) is not RunState.UNKNOWN:
            return  # already submitted: never start a second run
        if resp.status_code >= 500:
            raise RayUnavailable(f"Ray could not take submission {sub_id}: {resp.status_code} {resp.text[:300]}")
        raise SubmissionRefused(f"Ray refused submission {sub_id}: {resp.status_code} {resp.text[:300]}")

    def state(self, sub_id: str) -> RunState:
        resp = self._request("GET", f"/api/jobs/{sub_id}")
        if resp.status_code == 404:
            return RunState.UNKNOWN
        if resp.status_code != 200:
            raise LauncherError(f"Ray job status {sub_id}: {resp.status_code} {resp.text[:300]}")
        return RunState(resp.json()["status"])

    def message(self, sub_id: str) -> str:
        resp = self._request("GET", f"/api/jobs/{sub_id}")
        return resp.json().get("message") or "" if resp.status_code == 200 else ""

    def stop(self, sub_id: str) -> None:
        resp = self._request("POST", f"/api/jobs/{sub_id}/stop")
        if resp.status_code not in (200, 404):
            raise LauncherError(f"Ray could not stop {sub_id}: {resp.status_code} {resp.text[:300]}")

    def resources(self) -> ClusterResources:
        """The cluster's CPUs and GPUs, in all and not held now, as Ray's autoscaler reports them.

        Held includes the serving replicas' share, so what training may take follows serving.
        """
        resp = self._request("GET", "/api/cluster_status")
        if resp.status_code != 200:
            raise RayUnavailable(f"Ray cluster status: {resp.status_code}")
        usage = resp.json()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
        used_cpu, total_cpu = usage.get("CPU", [0, 0])
        used_gpu, total_gpu = usage.get("GPU", [0, 0])
        return ClusterResources(total=Capacity(cpus=total_cpu, gpus=total_gpu),
                                available=Capacity(cpus=max(0.0, total_cpu - used_cpu),
                                                   gpus=max(0.0, total_gpu - used_gpu)))


def job_env(spec_json: str, *, s3_endpoint_url: str | None = None, threads: int = 1) -> dict[str, str]:
    """What a run gets through its Ray Job: its spec (with its per-run job token) and settings.

    Never a credential of ours: anything here is readable by whoever holds the Ray token (every
    Ray pod). Object-store credentials live in the Ray pods' own environment (a Secret or the
    pod's workload identity), and workers read them from there; the database URL, admin token
    and internal secret never leave the control plane.
    """
    env = {"LORAFLEET_JOB_SPEC": spec_json, "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if s3_endpoint_url:  # an address, not a secret
        env["AWS_ENDPOINT_URL"] = s3_endpoint_url
    json.loads(spec_json)  # fail here, not in the worker, on a malformed spec
    return env
