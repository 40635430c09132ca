"""The official ``openai`` package against a real uvicorn server: our API is OpenAI-shaped."""

from __future__ import annotations

import io

import openai
import pytest
from api_helpers import CHAT_LINE, new_tenant


def test_openai_client_drives_the_fine_tuning_api(client, live_url):
    tenant = new_tenant(client)
    oa = openai.OpenAI(base_url=f"{live_url}/v1", api_key=tenant.key, max_retries=0)

    f = oa.files.create(file=("train.jsonl", io.BytesIO(CHAT_LINE * 4)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.status == "processed" and f.bytes == len(CHAT_LINE) * 4

    job = oa.fine_tuning.jobs.create(
        model="lorafleet/tiny-llama", training_file=f.id, suffix="pirate", seed=3,
        hyperparameters={"n_epochs": 2},
        extra_body={"method": {"type": "qlora", "qlora": {"hyperparameters": {"r": 4}}}})
    assert job.status == "queued" and job.user_provided_suffix == "pirate" and job.seed == 3
    assert job.hyperparameters.n_epochs == 2
    assert job.method.type == "qlora"

    assert oa.fine_tuning.jobs.retrieve(job.id).id == job.id
    listed = oa.fine_tuning.jobs.list(limit=10)
    assert [j.id for j in listed.data] == [job.id]

    cancelled = oa.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    events = oa.fine_tuning.jobs.list_events(job.id, limit=10)
    # status changes, newest first (other events, e.g. the `auto` choices, carry no "to")
    assert [e.data["to"] for e in events.data if e.data and "to" in e.data] == ["cancelled", "queued", "validating_files"]
    assert list(oa.fine_tuning.jobs.checkpoints.list(job.id).data) == []
    assert "lorafleet/tiny-llama" in [m.id for m in oa.models.list().data]

    # Our problem+json carries OpenAI's error body, so the client raises the right class.
    with pytest.raises(openai.NotFoundError) as err:
        oa.fine_tuning.jobs.retrieve("ftjob-missing")
    assert err.value.code == "not_found"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oa.files.create(file=("bad.jsonl", io.BytesIO(b"nope\n")), purpose="fine-tune")
    assert err.value.code == "invalid_training_file"
    with pytest.raises(openai.ConflictError):
        oa.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_url}/v1", api_key="lf-wrong", max_retries=0).models.list()
