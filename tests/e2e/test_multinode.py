"""A fine-tune on a two-node Ray cluster whose worker node shares no filesystem with the head.

The shape of a KubeRay deployment: the training worker runs on a separate node (its own mount
namespace, empty tmpfs over $HOME and /tmp, as a separate pod), forced there by a custom
resource only that node has. The job goes through the real API, scheduler and Ray Jobs, with an
S3 endpoint as the object store, and must succeed: nothing may depend on a path of the head's.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from e2e_stack import Stack
from workers.local_ray import join_local_ray, start_local_ray, stop_local_ray
from workers.models.registry import ensure_builtin
from workers.storage import S3Store, get_bytes, sha256_of

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo"
WORKER_RESOURCE = {"lorafleet_worker": 1}

pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def bucket(s3_credentials):
    store = S3Store(f"mn-{uuid.uuid4().hex[:10]}", "lorafleet", endpoint_url=s3_credentials["endpoint_url"],
                    access_key_id="test", secret_access_key="test")
    store.ensure_bucket()
    ensure_builtin("lorafleet/tiny-llama", store)  # so the worker node need not build it
    return store


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_credentials):
    """A head (the drivers run there) and a worker node with a private filesystem."""
    if os.geteuid() != 0:
        pytest.skip("a private filesystem for the worker node needs root (unshare --mount)")
    # Only the worker node holds the object store's credentials, in its own environment.
    head = start_local_ray(tmp_path_factory.mktemp("ray"), num_cpus=1,
                           env={"LORAFLEET_TRAIN_WORKER_RESOURCES": json.dumps(WORKER_RESOURCE)})
    worker = None
    try:
        worker = join_local_ray(head, num_cpus=2, resources=WORKER_RESOURCE, private_fs=True,
                                env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                                     "AWS_ENDPOINT_URL": s3_credentials["endpoint_url"]})
        yield head
    finally:
        if worker:
            stop_local_ray(worker)
        stop_local_ray(head)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, cluster, bucket, s3_credentials):
    s = Stack(tmp_path_factory.mktemp("mn-stack"), ray_dashboard=cluster["dashboard"])
    s.env |= {"RAY_AUTH_TOKEN_PATH": cluster["token_path"],
              "LORAFLEET_OBJECT_STORE_URL": f"s3://{bucket.bucket}/{bucket.prefix}",
              "LORAFLEET_S3_ENDPOINT_URL": s3_credentials["endpoint_url"],
              "LORAFLEET_S3_ACCESS_KEY_ID": "test", "LORAFLEET_S3_SECRET_ACCESS_KEY": "test"}
    s.env.pop("RAY_ADDRESS", None)
    s.start()
    yield s
    s.stop()


def _ray_get(cluster, path: str, **params):
    token = Path(cluster["token_path"]).read_text().strip()
    resp = httpx.get(f"{cluster['dashboard']}{path}", params=params, timeout=30,
                     headers={"Authorization": f"Bearer {token}"})
    return resp.raise_for_status().json()


def _driver_log(cluster, job_id: str) -> str:
    try:
        return _ray_get(cluster, f"/api/jobs/{job_id}/logs")["logs"][-4000:]
    except httpx.HTTPError as exc:
        return f"(no driver log: {exc})"


def test_lora_job_succeeds_with_its_worker_on_a_node_without_the_heads_filesystem(stack, cluster, bucket):
    client = stack.tenant("multi")
    data = b"".join((DEMO / "pirate_chat.jsonl").read_bytes().splitlines(keepends=True)[:32])
    file_id = client.post("/v1/files", files={"file": ("chat.jsonl", data)},
                          data={"purpose": "fine-tune"}).raise_for_status().json()["id"]
    hp = {"n_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
          "max_seq_length": 128, "r": 8}
    job_id = client.post("/v1/fine_tuning/jobs", json={
        "model": "lorafleet/tiny-llama", "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": hp}}}).raise_for_status().json()["id"]
    deadline = time.monotonic() + 300
    while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "succeeded", f"{job.get('error')}\n{_driver_log(cluster, job_id)}"
    # It trained on the worker node, the only one with the custom resource.
    nodes = _ray_get(cluster, "/api/v0/nodes", detail="true")["data"]["result"]["result"]
    (worker_node,) = [n["node_id"] for n in nodes if "lorafleet_worker" in n["resources_total"]]
    actors = _ray_get(cluster, "/api/v0/actors", detail="true", limit=1000)["data"]["result"]["result"]
    train_workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert train_workers and all(a["node_id"] == worker_node for a in train_workers), train_workers
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    assert any(e["type"] == "metrics" for e in events)
    # The adapter is in the object store, with the checksums of its manifest.
    adapter = client.get(f"/v1/adapters/{job['fine_tuned_model']}").json()
    manifest_key = next(k for k in bucket.list("tenants/") if k.endswith("/manifest.json"))
    manifest = json.loads(get_bytes(bucket, manifest_key))
    assert manifest["job_id"] == job_id and manifest["adapter_id"] == adapter["id"]
    prefix = manifest_key.rsplit("/", 1)[0]
    for name, digest in manifest["files"].items():
        assert sha256_of(bucket, f"{prefix}/{name}") == (digest["sha256"], digest["bytes"])
