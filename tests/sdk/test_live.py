"""The SDK against the real control plane (uvicorn, SQLite, local object store): every resource,
no mocks on the happy path. A scripted worker drives jobs through the internal endpoints."""

from __future__ import annotations

import asyncio
import threading

import pytest
from live_stack import FakeWorker, adapter_files, new_tenant

import lorafleet

CHAT_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]}\n'
DATASET = CHAT_LINE * 4
BASE = "lorafleet/tiny-llama"


def test_admin_tenants_keys_and_models(stack, admin):
    tenant = admin.admin.tenants.create("acme-live", max_concurrent_jobs=1, requests_per_minute=1000)
    assert tenant.id.startswith("tn_") and tenant.status == "active" and tenant.max_concurrent_jobs == 1
    assert admin.admin.tenants.retrieve(tenant.id).name == "acme-live"
    admin.admin.tenants.create("acme-live-2")
    admin.admin.tenants.create("acme-live-3")
    ids = [t.id for t in admin.admin.tenants.list(limit=1)]  # one per page: walks the cursors
    assert tenant.id in ids and len(ids) == len(set(ids)) >= 3

    key = admin.admin.api_keys.create(tenant.id, name="ci")
    assert key.key.startswith("lf-") and key.revoked_at is None
    listed = list(admin.admin.api_keys.list(tenant.id))
    assert [k.id for k in listed] == [key.id] and listed[0].key is None  # never the secret again

    client = lorafleet.Client(base_url=stack.base_url, api_key=key.key)
    assert any(m.id == BASE for m in client.models.list())
    updated = admin.admin.tenants.update(tenant.id, status="disabled")
    assert updated.status == "disabled"
    with pytest.raises(lorafleet.PermissionDeniedError) as info:
        client.files.list()
    assert info.value.request_id and info.value.code == "forbidden"
    admin.admin.tenants.update(tenant.id, status="active")
    assert client.files.list().data == []

    assert admin.admin.api_keys.revoke(key.id).revoked_at is not None
    with pytest.raises(lorafleet.AuthenticationError) as info:
        client.files.list()
    assert info.value.code == "unauthorized"

    models = {m.id: m for m in admin.admin.models.list()}
    assert set(models[BASE].methods) == set(lorafleet.types.METHODS)  # the built-in base allows every method
    extra = admin.admin.models.create("acme/tiny-copy", "builtin://lorafleet/tiny-llama",
                                      architecture="llama", methods=["lora"], max_rank=16)
    assert extra.id == "acme/tiny-copy" and extra.methods == ["lora"]
    with pytest.raises(lorafleet.ConflictError):
        admin.admin.models.create("acme/tiny-copy", "builtin://lorafleet/tiny-llama", methods=["lora"])


def test_admin_routes_refuse_a_tenant_key(stack, tenant):
    not_admin = lorafleet.Client(base_url=stack.base_url, admin_token=tenant._core.api_key)
    with pytest.raises(lorafleet.PermissionDeniedError):
        not_admin.admin.tenants.list()


def test_files_lifecycle_and_pages(tenant, tmp_path):
    path = tmp_path / "pirate.jsonl"
    path.write_bytes(DATASET)
    f = tenant.files.create(path)
    assert (f.filename, f.bytes, f.format, f.examples, f.status) == ("pirate.jsonl", len(DATASET), "chat", 4, "processed")
    assert tenant.files.retrieve(f.id).sha256 == f.sha256
    assert tenant.files.content(f.id) == DATASET
    others = [tenant.files.create(DATASET, filename=f"d{i}.jsonl").id for i in range(2)]
    assert [x.id for x in tenant.files.list(limit=1)] == list(reversed([f.id, *others]))  # newest first
    deleted = tenant.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(lorafleet.NotFoundError):
        tenant.files.retrieve(f.id)


def test_invalid_dataset_lists_every_bad_line(tenant):
    bad = CHAT_LINE + b"{not json\n" + CHAT_LINE + b'{"messages": [{"role": "user", "content": "x"}]}\n'
    with pytest.raises(lorafleet.UnprocessableEntityError) as info:
        tenant.files.create(bad, filename="bad.jsonl")
    err = info.value
    assert err.code == "invalid_training_file" and [e["line"] for e in err.errors] == [2, 4]
    assert tenant.files.list().data == []  # nothing stored


def test_another_tenants_resources_are_404(stack, admin, tenant):
    f = tenant.files.create(DATASET, filename="mine.jsonl")
    job = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    other = new_tenant(stack, admin)
    with pytest.raises(lorafleet.NotFoundError):
        other.files.retrieve(f.id)
    with pytest.raises(lorafleet.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(lorafleet.NotFoundError):
        other.fine_tuning.jobs.cancel(job.id)
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]


def test_jobs_create_list_events_cancel(tenant):
    f = tenant.files.create(DATASET, filename="d.jsonl")
    job = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id, method="qlora",
                                         hyperparameters={"r": 4, "n_epochs": 1}, suffix="pirate",
                                         seed=7, metadata={"team": "a"})
    assert job.id.startswith("ftjob-") and job.status in ("validating_files", "queued")
    assert job.method["type"] == "qlora" and job.method["qlora"]["hyperparameters"]["r"] == 4
    assert (job.user_provided_suffix, job.seed, job.metadata) == ("pirate", 7, {"team": "a"})
    second = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    assert [j.id for j in tenant.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]
    assert [j.id for j in tenant.fine_tuning.jobs.list(status="queued")] == [second.id, job.id]

    events = list(tenant.fine_tuning.jobs.list_events(job.id, order="asc", limit=1))
    assert events and events[0].type == "status" and events == sorted(events, key=lambda e: e.created_at)

    cancelled = tenant.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("cancelled", "cancelling")
    assert tenant.fine_tuning.jobs.retrieve(job.id).status == cancelled.status
    if cancelled.status == "cancelled":
        with pytest.raises(lorafleet.ConflictError) as info:
            tenant.fine_tuning.jobs.cancel(job.id)
        assert info.value.code == "invalid_transition"
    with pytest.raises(lorafleet.JobCancelledError):
        tenant.fine_tuning.jobs.wait(job.id, progress=False, poll_interval=0.1, timeout=30)


def test_validation_errors_on_job_create(tenant):
    f = tenant.files.create(DATASET, filename="d.jsonl")
    with pytest.raises(lorafleet.UnprocessableEntityError) as info:
        tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id, hyperparameters={"rank": 8})
    assert "rank" in str(info.value.message) + str(info.value.param) + str(info.value.body)
    with pytest.raises((lorafleet.NotFoundError, lorafleet.UnprocessableEntityError)):
        tenant.fine_tuning.jobs.create(model=BASE, training_file="file-missing")


def test_idempotency_key_replays_the_first_job(tenant):
    f = tenant.files.create(DATASET, filename="d.jsonl")
    first = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id, idempotency_key="once")
    again = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id, idempotency_key="once")
    assert again.id == first.id
    with pytest.raises(lorafleet.UnprocessableEntityError) as info:
        tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="x", idempotency_key="once")
    assert info.value.code == "idempotency_key_reused"


def _run_worker(stack, job_id: str, files: dict[str, bytes]) -> threading.Thread:
    def work():
        worker = FakeWorker(stack, job_id)
        try:
            worker.start()
            worker.events(
                {"type": "metrics", "message": "step 1", "data": {"step": 1, "total_steps": 2, "train_loss": 2.0}},
                {"type": "metrics", "message": "step 2", "data": {"step": 2, "total_steps": 2, "train_loss": 1.0, "eta_s": 0}})
            worker.checkpoint(2)
            worker.publish(files)
        finally:
            worker.close()

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_wait_download_models_and_inference(stack, admin, tenant, tmp_path, capsys):
    f = tenant.files.create(DATASET, filename="d.jsonl")
    job = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="pirate")
    files = adapter_files()
    worker = _run_worker(stack, job.id, files)
    seen = []
    done = tenant.fine_tuning.jobs.wait(job.id, poll_interval=0.1, timeout=60, on_event=seen.append)
    worker.join()
    adapter_id = done.fine_tuned_model
    assert done.status == "succeeded" and adapter_id.startswith("ft-tiny-llama-pirate-")
    assert [e.data["step"] for e in seen if e.type == "metrics"] == [1, 2]
    assert "2/2 loss 1.0000" in capsys.readouterr().err  # the progress bar (rich)

    ckpts = list(tenant.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [2] and ckpts[0].fine_tuning_job_id == job.id

    adapter = tenant.adapters.retrieve(adapter_id)
    assert adapter.job_id == job.id and {x.name for x in adapter.files} >= set(files)
    folder = tenant.adapters.download(adapter_id, tmp_path / "adapter")
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    assert (folder / "manifest.json").exists()

    models = {m.id: m for m in tenant.models.list()}
    assert models[adapter_id].owned_by == tenant.tenant_id and models[BASE].owned_by == "lorafleet"
    assert tenant.models.retrieve(adapter_id).id == adapter_id

    answer = tenant.chat.completions.create(model=adapter_id, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == f"Ahoy from {adapter_id}"
    tokens = [c.choices[0].delta.content for c in tenant.chat.completions.create(
        model=adapter_id, messages=[{"role": "user", "content": "hi"}], stream=True)]
    assert tokens == ["Ahoy", " from ", adapter_id]
    text = [c.choices[0].text for c in tenant.completions.create(model=BASE, prompt="hi", stream=True)]
    assert "".join(text) == "Ahoy from base"
    assert tenant.completions.create(model=adapter_id, prompt="hi").choices[0].text.endswith(adapter_id)

    other = new_tenant(stack, admin)
    for call in (lambda: other.chat.completions.create(model=adapter_id, messages=[{"role": "user", "content": "hi"}]),
                 lambda: other.completions.create(model=adapter_id, prompt="hi", stream=True),
                 lambda: other.adapters.download(adapter_id, tmp_path / "stolen"),
                 lambda: other.models.retrieve(adapter_id)):
        with pytest.raises(lorafleet.NotFoundError):
            call()
    assert not (tmp_path / "stolen").exists()

    assert tenant.models.delete(adapter_id).deleted
    with pytest.raises(lorafleet.NotFoundError):
        tenant.models.retrieve(adapter_id)


def test_wait_raises_the_jobs_error(stack, tenant):
    f = tenant.files.create(DATASET, filename="d.jsonl")
    job = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    worker = FakeWorker(stack, job.id)
    worker.start()
    worker.fail("training_diverged", "loss became NaN at step 3")
    worker.close()
    with pytest.raises(lorafleet.JobFailedError) as info:
        tenant.fine_tuning.jobs.wait(job.id, progress=False, poll_interval=0.1, timeout=30)
    assert info.value.code == "training_diverged" and "NaN" in info.value.message


def test_async_client_against_the_service(stack, tenant):
    async def main():
        async with lorafleet.AsyncClient(base_url=stack.base_url, api_key=tenant._core.api_key) as client:
            f = await client.files.create(DATASET, filename="a.jsonl")
            job = await client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
            got = await client.fine_tuning.jobs.retrieve(job.id)
            ids = [j.id async for j in client.fine_tuning.jobs.list(limit=1)]
            page = await client.files.list()
            stream = await client.chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True)
            tokens = [c.choices[0].delta.content async for c in stream]
            with pytest.raises(lorafleet.NotFoundError):
                await client.fine_tuning.jobs.retrieve("ftjob-nope")
            return job, got, ids, page, tokens

    job, got, ids, page, tokens = asyncio.run(main())
    assert got.id == job.id and ids == [job.id] and page.data[0].filename == "a.jsonl"
    assert "".join(tokens) == "Ahoy from base"


def test_real_peft_adapter_roundtrip(stack, tenant, tmp_path):
    """What download writes is what PeftModel.from_pretrained loads."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=2, max_position_embeddings=32))

    trained = peft.get_peft_model(tiny(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    trained.save_pretrained(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir() if p.is_file()}
    f = tenant.files.create(DATASET, filename="d.jsonl")
    job = tenant.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    _run_worker(stack, job.id, files).join()
    adapter_id = tenant.fine_tuning.jobs.wait(job.id, progress=False, poll_interval=0.1, timeout=30).fine_tuned_model
    folder = tenant.adapters.download(adapter_id, tmp_path / "dl")
    loaded = peft.PeftModel.from_pretrained(tiny(), folder)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits)
