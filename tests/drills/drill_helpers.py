"""Small helpers the drills share: tiny fine-tunes through the REST API, and their record."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo"
TERMINAL = {"succeeded", "failed", "cancelled"}
# A handful of optimizer steps: the drills are about what survives an outage, not about loss.
TINY = {"n_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
        "max_seq_length": 128, "r": 4, "checkpoint_steps": 2}


def upload(client, lines: int = 32, name: str = "pirate_chat.jsonl") -> str:
    data = b"".join((DEMO / name).read_bytes().splitlines(keepends=True)[:lines])
    resp = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def job_body(file_id: str, **hp) -> dict:
    return {"model": "lorafleet/tiny-llama", "training_file": file_id, "suffix": "drill",
            "method": {"type": "lora", "lora": {"hyperparameters": {**TINY, **hp}}}}


def create(client, file_id: str, **hp) -> str:
    resp = client.post("/v1/fine_tuning/jobs", json=job_body(file_id, **hp))
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def events(client, job_id: str) -> list[dict]:
    out, after = [], None
    while True:
        params = {"order": "asc", "limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).raise_for_status().json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def runs_of(client, job_id: str) -> dict[str, int]:
    """How often the job went `running`, began training, and published (each should be 1)."""
    evs = events(client, job_id)
    return {
        "running": sum(e["type"] == "status" and (e["data"] or {}).get("to") == "running" for e in evs),
        "trained": sum(e["message"].startswith("training lora adapter") for e in evs),
        "published": sum(e["message"] == "adapter published" for e in evs),
        "reposted": sum(e["message"].startswith("adapter already published") for e in evs),
    }


def status(client, job_id: str) -> str:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").raise_for_status().json()["status"]


def wait_until(what: str, predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := predicate():
                return value
        except Exception:  # noqa: BLE001 - e.g. the API answering 503 mid-drill: ask again
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def wait_terminal(client, job_ids: list[str], timeout: float = 300) -> dict[str, str]:
    def done():
        got = {j: status(client, j) for j in job_ids}
        return got if all(s in TERMINAL for s in got.values()) else None
    return wait_until(f"jobs {job_ids} to finish", done, timeout, interval=1)


def has_progress(client, job_id: str, min_step: int = 1) -> bool:
    return any(e["type"] == "metrics" and (e["data"] or {}).get("step", 0) >= min_step
               for e in events(client, job_id))


def assert_adapter_verified(client, store, job_id: str) -> str:
    """The job's adapter is in the store, every file matching the checksum its row records."""
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    adapter = client.get(f"/v1/adapters/{job['fine_tuned_model']}").raise_for_status().json()
    names = {f["name"] for f in adapter["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= names
    for f in adapter["files"]:
        data = client.get(f"/v1/adapters/{adapter['id']}/files/{f['name']}").raise_for_status().content
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (f["sha256"], f["bytes"]), f["name"]
    return adapter["id"]


def server_log(stack) -> str:
    return (stack.data_dir / "server.log").read_text(errors="replace")


def record(name: str, result: dict) -> None:
    """Print a drill's figures (run pytest with -s to see them); LORAFLEET_DRILL_REPORT=path
    also appends them there as JSON lines."""
    line = json.dumps({"drill": name, **result}, sort_keys=True)
    print(f"\nDRILL {line}")
    if path := os.environ.get("LORAFLEET_DRILL_REPORT"):
        with open(path, "a") as f:
            f.write(line + "\n")
