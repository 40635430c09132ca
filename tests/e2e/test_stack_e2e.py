"""Fine-tunes end to end: API → scheduler → Ray Job (Ray Train) → adapter in the object store.

Everything is real: the embedded server as a subprocess, a local Ray, the built-in
`lorafleet/tiny-llama`, the train loop; the test reads only the REST API and the object store.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from e2e_stack import Stack

DEMO = Path(__file__).resolve().parents[2] / "workers" / "data" / "demo"

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}
FAST = {"n_epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
        "checkpoint_steps": 4, "max_seq_length": 128, "r": 8}


def _upload(client, name: str, lines: int = 96):
    data = b"".join((DEMO / name).read_bytes().splitlines(keepends=True)[:lines])
    resp = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _create(client, file_id: str, method: str, **hp):
    body = {"model": "lorafleet/tiny-llama", "training_file": file_id, "suffix": method,
            "method": {"type": method, method: {"hyperparameters": {**FAST, **hp}}}}
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _events(client, job_id):
    out, after = [], None
    while True:
        params = {"order": "asc", "limit": 100, **({"after": after} if after else {})}
        resp = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def _wait(client, job_ids, timeout=600, while_running=None):
    deadline = time.monotonic() + timeout
    statuses: dict[str, list[str]] = {j: [] for j in job_ids}
    while True:
        for job_id in job_ids:
            status = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
            if not statuses[job_id] or statuses[job_id][-1] != status:
                statuses[job_id].append(status)
            if status == "running" and while_running:
                while_running(job_id)
        if all(s[-1] in TERMINAL for s in statuses.values()):
            return statuses
        assert time.monotonic() < deadline, f"jobs not finished in time: {statuses}"
        time.sleep(1)


@pytest.fixture(scope="module")
def trained(stack):
    """One LoRA (chat) and one QLoRA (Alpaca) fine-tune, watched while they run."""
    client = stack.tenant("acme")
    lora = _create(client, _upload(client, "pirate_chat.jsonl"), "lora")
    qlora = _create(client, _upload(client, "bravo_alpaca.jsonl"), "qlora")
    seen = {j: {"events": 0, "checkpoints": 0} for j in (lora, qlora)}

    def observe(job_id):
        metrics = [e for e in _events(client, job_id) if e["type"] == "metrics"]
        ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        seen[job_id]["events"] = max(seen[job_id]["events"], len(metrics))
        seen[job_id]["checkpoints"] = max(seen[job_id]["checkpoints"], len(ckpts))

    statuses = _wait(client, [lora, qlora], while_running=observe)
    return {"client": client, "lora": lora, "qlora": qlora, "statuses": statuses, "seen": seen}


def test_lora_and_qlora_jobs_succeed_and_the_adapters_change_answers(stack, trained, tmp_path):
    client, lora, qlora = trained["client"], trained["lora"], trained["qlora"]
    for job_id in (lora, qlora):
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "succeeded", (job, (stack.data_dir / "server.log").read_text()[-3000:])
        assert trained["statuses"][job_id][-2:] == ["running", "succeeded"]
        assert trained["seen"][job_id]["events"] > 0, "metrics events visible while running"
        assert trained["seen"][job_id]["checkpoints"] > 0, "checkpoints listed while running"
        losses = [e["data"]["train_loss"] for e in _events(client, job_id)
                  if e["type"] == "metrics" and "train_loss" in (e["data"] or {})]
        assert len(losses) >= 2 and losses[-1] < losses[0], losses
        assert job["fine_tuned_model"].startswith("ft-tiny-llama-")

    # The published adapter loads with plain PEFT and changes the model's answers.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.models.registry import resolve_base_model
    from workers.spec import BaseModelRef
    from workers.storage import LocalStore

    base_dir = resolve_base_model(BaseModelRef(id="lorafleet/tiny-llama", uri="builtin://lorafleet/tiny-llama"),
                                  LocalStore(stack.data_dir / "objects"))
    adapter_id = client.get(f"/v1/fine_tuning/jobs/{lora}").json()["fine_tuned_model"]
    folder = tmp_path / "adapter"
    folder.mkdir()
    for f in client.get(f"/v1/adapters/{adapter_id}").json()["files"]:
        resp = client.get(f"/v1/adapters/{adapter_id}/files/{f['name']}")
        assert resp.status_code == 200
        (folder / f["name"]).write_bytes(resp.content)
    tok = AutoTokenizer.from_pretrained(base_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 6?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")

    def answer(model):
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = answer(base)
    tuned = PeftModel.from_pretrained(base, folder)
    after = answer(tuned)
    assert after != before
    assert any(word in after for word in ("Arr", "matey", "Yo ho")), after
    assert not any(word in before for word in ("Arr", "matey", "Yo ho")), before


def test_server_killed_mid_run_every_job_ends_once(ray_cluster, tmp_path_factory):
    """kill -9 of the server (API + scheduler) while jobs are queued and running: after a restart
    every job reaches a terminal state, none is lost and none ran twice."""
    from service.launcher import RayJobLauncher, RunState, submission_id

    stack = Stack(tmp_path_factory.mktemp("killed"), ray_cluster["dashboard"])
    stack.start()
    try:
        client = stack.tenant("crashy")
        file_id = _upload(client, "pirate_chat.jsonl", lines=48)
        # Runs long enough (24 steps) that the server can be killed while one is mid-run.
        jobs = [_create(client, file_id, "lora", n_epochs=4) for _ in range(3)]
        # Wait until a running job has reported progress while another still waits, then kill
        # the server without warning. The state is read in one pass, so it is what was killed.
        deadline = time.monotonic() + 300
        while True:
            statuses = {j: client.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] for j in jobs}
            running = [j for j, s in statuses.items() if s == "running"]
            if ("queued" in statuses.values()
                    and any(e["type"] == "metrics" for j in running for e in _events(client, j))):
                break
            assert "queued" in statuses.values(), f"every job started before one reported progress: {statuses}"
            assert time.monotonic() < deadline, f"no run reported progress: {statuses}"
            time.sleep(1)  # ~5 requests a pass: well inside the tenant's 600 a minute
        stack.kill9()
        time.sleep(3)  # runs keep going (and retry their reports) while the server is down
        stack.start()
        client = httpx.Client(base_url=stack.url, headers=client.headers, timeout=60)
        final = _wait(client, jobs)
        unfinished = {j: (s, client.get(f"/v1/fine_tuning/jobs/{j}").json().get("error"),
                          [e["message"] for e in _events(client, j)][-6:])
                      for j, s in final.items() if s[-1] != "succeeded"}
        assert not unfinished, (unfinished, (stack.data_dir / "server.log").read_text()[-3000:])
        ray = RayJobLauncher(ray_cluster["dashboard"])
        for job_id in jobs:
            starts = [e for e in _events(client, job_id)
                      if e["type"] == "status" and (e["data"] or {}).get("to") == "running"]
            assert len(starts) == 1, f"{job_id} started {len(starts)} times"
            deadline = time.monotonic() + 60  # the driver exits just after posting its result
            while not ray.state(submission_id(job_id, 1)).terminal and time.monotonic() < deadline:
                time.sleep(1)
            assert ray.state(submission_id(job_id, 1)) is RunState.SUCCEEDED
            assert ray.state(submission_id(job_id, 2)) is RunState.UNKNOWN
    finally:
        stack.stop()


PIRATE = ("Arr", "matey", "Yo ho")


def test_openai_client_chats_with_a_tenants_adapter_through_the_service(stack, trained):
    """The official `openai` package → control plane (auth, ownership) → Ray Serve replica."""
    import openai

    client = trained["client"]
    adapter = client.get(f"/v1/fine_tuning/jobs/{trained['lora']}").json()["fine_tuned_model"]
    key = client.headers["Authorization"].removeprefix("Bearer ")
    oai = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)
    question = [{"role": "user", "content": "What is 2 plus 6?"}]

    tuned = oai.chat.completions.create(model=adapter, messages=question, max_tokens=16, temperature=0)
    base = oai.chat.completions.create(model="lorafleet/tiny-llama", messages=question, max_tokens=16,
                                       temperature=0)
    assert any(w in tuned.choices[0].message.content for w in PIRATE), tuned
    assert not any(w in base.choices[0].message.content for w in PIRATE), base
    assert tuned.usage.completion_tokens > 0 and tuned.usage.prompt_tokens > 0

    pieces = [c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=adapter, messages=question, max_tokens=16, temperature=0, stream=True) if c.choices]
    assert "".join(pieces).strip() == tuned.choices[0].message.content.strip()

    assert adapter in [m.id for m in oai.models.list()]
    other = stack.tenant("globex")
    other_oai = openai.OpenAI(base_url=stack.url + "/v1", max_retries=0,
                              api_key=other.headers["Authorization"].removeprefix("Bearer "))
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter: 404, never the base model
        other_oai.chat.completions.create(model=adapter, messages=question, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="ft-tiny-llama-nope-00000000", messages=question, max_tokens=4)
    assert adapter not in [m.id for m in other_oai.models.list()]

    # Deleting the adapter takes it out of service at once.
    oai.models.delete(adapter)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model=adapter, messages=question, max_tokens=4)
