"""The Ray Job entrypoint: ``python -m workers.train.ray_job --spec spec.json`` (or env
LORAFLEET_JOB_SPEC holding the JSON). The scheduler submits it with submission_id = job id.

A thin Ray Train (v2) TorchTrainer around workers.train.loop.run_training: Ray gives the
workers, DDP process group and restarts (FailureConfig); the loop does everything else,
including resuming from its own checkpoints in the object store after a restart.

Nothing here needs a filesystem shared by the nodes (on Kubernetes the head and worker pods
share none). Rank 0 streams events and checkpoints to the control plane while training and
posts the outcome (result or failure) itself; it hands the outcome to this driver through a
small actor (OutcomeBox), not through a Ray Train checkpoint, so Ray Train's storage_path is
only ever touched by its controller, which runs beside this driver. The driver posts only what
no worker can: that the workers kept dying.

A TrainingError (the tenant's data, the model, a diverged run, the store) is an answer, not a
crash: the worker returns it instead of raising, so Ray does not retry what would fail again.
Only lost or crashed workers are retried.

Object-store credentials are never passed through here: Ray keeps a trainer's config and a Ray
Job's runtime_env in its GCS, readable by anyone holding the Ray token. Workers read AWS_* from
their own process environment, i.e. their Ray node's (the pod's env / Secret).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from workers.spec import TrainJobSpec, TrainResult

log = logging.getLogger("lorafleet.train")
MAX_FAILURES = 2
# Forwarded from the driver to the workers: HF offline mode, model cache, tokenizer threads and
# the test hook that records worker pids. Never AWS_* (see the module docstring).
FORWARDED_ENV_PREFIXES = ("HF_", "LORAFLEET_", "TOKENIZERS_")
NOT_FORWARDED = ("LORAFLEET_JOB_SPEC", "LORAFLEET_TRAIN_WORKER_RESOURCES")
# Extra Ray resources every training worker asks for, as JSON (e.g. '{"gpu_pool": 1}'): set in
# the head's environment to keep training on the nodes that offer them.
WORKER_RESOURCES_ENV = "LORAFLEET_TRAIN_WORKER_RESOURCES"


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k not in NOT_FORWARDED}


def _reporter(spec: TrainJobSpec, rank: int):
    from workers.train.report import HttpReporter, MemoryReporter, NullReporter

    if rank != 0:
        return NullReporter()
    if spec.control_plane_url and spec.job_token:
        return HttpReporter(spec.control_plane_url, spec.job_id, spec.job_token)
    return MemoryReporter()


class OutcomeBox:
    """Holds the run's outcome, from rank 0 to the driver (a Ray actor: no shared filesystem)."""

    def __init__(self):
        self._outcome: dict | None = None

    def put(self, outcome: dict) -> None:
        self._outcome = outcome

    def get(self) -> dict | None:
        return self._outcome


def deliver(reporter, outcome: dict) -> dict:
    """Post the outcome to the control plane (rank 0, HttpReporter); returns it with
    ``delivered``. A result the control plane did not take leaves the run failed to Ray: the
    scheduler then requeues the job, and the next run re-posts the published adapter."""
    try:
        if outcome["status"] == "succeeded":
            reporter.result(TrainResult.model_validate(outcome["result"]))
        elif outcome["status"] == "failed":
            reporter.failure(outcome["code"], outcome["message"], outcome.get("param"))
        return outcome | {"delivered": True}
    except Exception as exc:  # noqa: BLE001 - ConnectionError after retries, or a 4xx answer
        log.error("the control plane did not take the %s outcome: %s", outcome["status"], exc)
        return outcome | {"delivered": False}


def train_worker(config: dict) -> None:
    """Runs in each Ray Train worker process."""
    import ray
    import ray.train
    import ray.train.torch

    from workers.storage import open_store
    from workers.train.errors import TrainingCancelled, TrainingError
    from workers.train.loop import World, run_training

    os.environ.update(config["env"])
    spec = TrainJobSpec.model_validate_json(config["spec"])
    ctx = ray.train.get_context()
    world = World(rank=ctx.get_world_rank(), size=ctx.get_world_size())
    if pid_dir := os.environ.get("LORAFLEET_TRAIN_PID_DIR"):
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{world.rank}-{os.getpid()}").write_text(str(os.getpid()))
    reporter = _reporter(spec, world.rank)
    try:
        try:
            result = run_training(spec, store=open_store(spec.object_store_url), reporter=reporter,
                                  device=ray.train.torch.get_device(), world=world)
            outcome = {"status": "succeeded", "result": result.model_dump(mode="json")}
        except TrainingError as exc:
            outcome = {"status": "failed", "code": exc.code, "message": exc.message, "param": exc.param}
        except TrainingCancelled as exc:
            outcome = {"status": "cancelled", "message": str(exc)}
        if world.rank == 0:
            ray.get(config["outcome_box"].put.remote(deliver(reporter, outcome)))
    finally:
        if hasattr(reporter, "close"):
            reporter.close()


def _worker_resources(res) -> dict[str, float]:
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    if extra := os.environ.get(WORKER_RESOURCES_ENV):
        per_worker |= {k: float(v) for k, v in json.loads(extra).items()}
    return per_worker


def run(spec: TrainJobSpec) -> dict:
    """Train on the connected Ray cluster and return the outcome dict (status, result | code,
    delivered)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = spec.resources
    box = ray.remote(num_cpus=0)(OutcomeBox).remote()
    # Ray Train's own files (run state, no checkpoint of ours) go to its controller, which Ray
    # places on this driver's node: a scratch dir here is enough, and is removed afterwards.
    storage = os.environ.get("LORAFLEET_RAY_STORAGE_PATH") or tempfile.mkdtemp(prefix="lorafleet-ray-train-")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump_json(), "env": _forwarded_env(), "outcome_box": box},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker=_worker_resources(res)),
        run_config=RunConfig(name=spec.job_id, storage_path=storage,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    try:
        trainer.fit()
        outcome = ray.get(box.get.remote())
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and its causes: workers kept dying
        log.exception("training workers failed")
        return {"status": "failed", "code": "worker_lost", "delivered": False,
                "message": f"training workers failed {MAX_FAILURES + 1} times: {type(exc).__name__}: {exc}"}
    finally:
        if "LORAFLEET_RAY_STORAGE_PATH" not in os.environ:
            shutil.rmtree(storage, ignore_errors=True)
    if outcome is None:  # fit() returned, yet rank 0 never finished: not a result to trust
        return {"status": "failed", "code": "worker_lost", "delivered": False,
                "message": "the training workers ended without an outcome"}
    return outcome


def post_failure(spec: TrainJobSpec, outcome: dict) -> None:
    """The driver's own report: only for a failure no worker lived to post."""
    from workers.train.report import HttpReporter

    if not (spec.control_plane_url and spec.job_token):
        return
    reporter = HttpReporter(spec.control_plane_url, spec.job_id, spec.job_token)
    try:
        outcome.update(deliver(reporter, outcome))
    finally:
        reporter.close()


def load_spec(path: str | None) -> TrainJobSpec:
    if path:
        return TrainJobSpec.model_validate_json(Path(path).read_text())
    if raw := os.environ.get("LORAFLEET_JOB_SPEC"):
        return TrainJobSpec.model_validate_json(raw)
    raise SystemExit("no job spec: pass --spec PATH or set LORAFLEET_JOB_SPEC")


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description="Run one LoRA Fleet fine-tune on Ray Train")
    parser.add_argument("--spec", help="path to a TrainJobSpec JSON file (default: env LORAFLEET_JOB_SPEC)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = load_spec(args.spec)
    ray.init()  # RAY_ADDRESS / the Ray Job's cluster; a local one when run by hand
    outcome = run(spec)
    if outcome.get("code") == "worker_lost":
        post_failure(spec, outcome)
    log.info("job %s: %s", spec.job_id, json.dumps(outcome))
    print(json.dumps({"job_id": spec.job_id, **outcome}), flush=True)
    # Exit 0 only when the control plane has the outcome (or there is none to tell): otherwise
    # the scheduler sees a failed Ray Job and requeues it; the rerun re-posts the adapter.
    delivered = outcome.get("delivered") or not (spec.control_plane_url and spec.job_token)
    return 0 if outcome["status"] in ("succeeded", "cancelled") and delivered else 1


if __name__ == "__main__":
    sys.exit(main())
