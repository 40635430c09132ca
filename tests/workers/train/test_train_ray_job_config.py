"""What the Ray Train driver hands its workers (no Ray needed): never a credential, and the
extra resources that place training workers."""

from __future__ import annotations

from workers.spec import Resources
from workers.train.ray_job import _forwarded_env, _worker_resources


def test_object_store_credentials_and_the_spec_never_ride_in_the_trainer_config(monkeypatch):
    # Ray keeps train_loop_config in its GCS, readable by anyone holding the Ray token: workers
    # read AWS_* from their own node's environment instead.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-H5")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-h5")
    monkeypatch.setenv("LORAFLEET_JOB_SPEC", '{"job_token": "tok"}')
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", "/models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = _forwarded_env()
    assert not [k for k in env if k.startswith("AWS_")]
    assert "secret-h5" not in str(env) and "LORAFLEET_JOB_SPEC" not in env
    assert env["LORAFLEET_MODEL_CACHE"] == "/models" and env["HF_HUB_OFFLINE"] == "1"


def test_training_workers_ask_for_the_configured_extra_resources(monkeypatch):
    monkeypatch.delenv("LORAFLEET_TRAIN_WORKER_RESOURCES", raising=False)
    assert _worker_resources(Resources(cpus_per_worker=2)) == {"CPU": 2}
    monkeypatch.setenv("LORAFLEET_TRAIN_WORKER_RESOURCES", '{"lorafleet_worker": 1}')
    assert _worker_resources(Resources(gpus_per_worker=1)) == {"CPU": 1, "GPU": 1, "lorafleet_worker": 1.0}
    assert "LORAFLEET_TRAIN_WORKER_RESOURCES" not in _forwarded_env()
