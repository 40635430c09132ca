"""The Ray Job entrypoint: ``python -m workers.train.ray_job --spec spec.json`` (or env
LORAFLEET_JOB_SPEC holding the JSON). The scheduler submits it with submission_id = job id.

A thin Ray Train (v2) TorchTrainer around workers.train.loop.run_training: Ray gives the
workers, DDP process group and restarts (FailureConfig); the loop does everything else,
including resuming from its own checkpoints in the object store after a restart. Rank 0 streams
events and checkpoints to the control plane while training; this driver posts the outcome.

A TrainingError (the tenant's data, the model, a diverged run, the store) is an answer, not a
crash: the worker returns it instead of raising, so Ray does not retry what would fail again.
Only lost or crashed workers are retried.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from workers.spec import TrainJobSpec, TrainResult

log = logging.getLogger("lorafleet.train")
OUTCOME = "outcome.json"
MAX_FAILURES = 2
# Forwarded to the workers whatever the driver's runtime_env: object-store credentials, HF
# offline mode, model cache and the test hook that records worker pids.
FORWARDED_ENV_PREFIXES = ("AWS_", "HF_", "LORAFLEET_", "TOKENIZERS_")


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k != "LORAFLEET_JOB_SPEC"}


def _reporter(spec: TrainJobSpec, rank: int):
    from workers.train.report import HttpReporter, MemoryReporter, NullReporter

    if rank != 0:
        return NullReporter()
    if spec.control_plane_url and spec.job_token:
        return HttpReporter(spec.control_plane_url, spec.job_id, spec.job_token)
    return MemoryReporter()


def train_worker(config: dict) -> None:
    """Runs in each Ray Train worker process."""
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
        result = run_training(spec, store=open_store(spec.object_store_url), reporter=reporter,
                              device=ray.train.torch.get_device(), world=world)
        outcome = {"status": "succeeded", "result": result.model_dump(mode="json")}
    except TrainingError as exc:
        outcome = {"status": "failed", "code": exc.code, "message": exc.message, "param": exc.param}
    except TrainingCancelled as exc:
        outcome = {"status": "cancelled", "message": str(exc)}
    finally:
        if hasattr(reporter, "close"):
            reporter.close()
    # Ray Train v2 hands the driver only checkpointed metrics, so the outcome rides on one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if world.rank == 0:
            (Path(tmp) / OUTCOME).write_text(json.dumps(outcome))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"status": outcome["status"]}, checkpoint=checkpoint)


def run(spec: TrainJobSpec) -> dict:
    """Train on the connected Ray cluster and return the outcome dict (status, result | code)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = spec.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    storage = os.environ.get("LORAFLEET_RAY_STORAGE_PATH", str(Path.home() / ".cache" / "lorafleet" / "ray-train"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump_json(), "env": _forwarded_env()},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=spec.job_id, storage_path=storage,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and its causes: workers kept dying
        log.exception("training workers failed")
        return {"status": "failed", "code": "worker_lost",
                "message": f"training workers failed {MAX_FAILURES + 1} times: {type(exc).__name__}: {exc}"}
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / OUTCOME).read_text())


def post_outcome(spec: TrainJobSpec, outcome: dict) -> None:
    from workers.train.report import HttpReporter

    if not (spec.control_plane_url and spec.job_token):
        return
    reporter = HttpReporter(spec.control_plane_url, spec.job_id, spec.job_token)
    try:
        if outcome["status"] == "succeeded":
            reporter.result(TrainResult.model_validate(outcome["result"]))
        elif outcome["status"] == "failed":
            reporter.failure(outcome["code"], outcome["message"], outcome.get("param"))
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
    log.info("job %s: %s", spec.job_id, json.dumps(outcome))
    post_outcome(spec, outcome)
    print(json.dumps({"job_id": spec.job_id, **outcome}), flush=True)
    return 0 if outcome["status"] in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
