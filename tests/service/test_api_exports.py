"""POST /v1/models/{adapter}/exports: the export object, its states and events, the run's
internal routes, downloads, and what is refused (another tenant's adapter, unmergeable methods)."""

from __future__ import annotations

from api_helpers import assert_problem
from ops_helpers import publish_export, start_run, trained_adapter
from sqlalchemy import func, select

from service.db.models import Operation

FILES = {"config.json": b'{"model_type": "llama"}', "model-00001-of-00002.safetensors": b"\x01" * 300,
         "model-00002-of-00002.safetensors": b"\x02" * 200, "tokenizer.json": b"{}"}


def _count_operations(app) -> int:
    with app.state.session_factory() as s:
        return s.scalar(select(func.count()).select_from(Operation))


def test_export_runs_through_its_states_and_downloads(client, app, tenant, other_tenant):
    adapter = trained_adapter(client, app, tenant)
    r = client.post(f"/v1/models/{adapter}/exports", json={"dtype": "bfloat16"}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    export = r.json()
    assert (export["object"], export["status"], export["adapter"], export["dtype"]) == (
        "model.export", "queued", adapter, "bfloat16")
    export_id = export["id"]
    assert client.get(f"/v1/models/{adapter}/exports", headers=tenant.headers).json()["data"][0]["id"] == export_id
    # Not downloadable before it succeeded.
    assert_problem(client.get(f"/v1/exports/{export_id}/files/config.json", headers=tenant.headers),
                   409, "export_not_ready")

    worker = start_run(app, export_id)
    r = client.post(f"/internal/v1/operations/{export_id}/events", headers=worker,
                    json={"events": [{"message": "merging", "data": {"step": 1}}]})
    assert r.status_code == 204, r.text
    key = publish_export(app, export_id, FILES)
    r = client.post(f"/internal/v1/operations/{export_id}/result", json={"manifest_key": key}, headers=worker)
    assert r.status_code == 204, r.text

    done = client.get(f"/v1/exports/{export_id}", headers=tenant.headers).json()
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    names = {f["name"] for f in done["files"]}
    assert names == set(FILES) | {"manifest.json"}
    for name, data in FILES.items():
        r = client.get(f"/v1/exports/{export_id}/files/{name}", headers=tenant.headers)
        assert r.status_code == 200 and r.content == data
    events = client.get(f"/v1/exports/{export_id}/events", params={"order": "asc"}, headers=tenant.headers).json()
    assert [e["message"] for e in events["data"]][:3] == ["Export queued", "Export status: running", "merging"]
    assert events["data"][-1]["data"] == {"from": "running", "to": "succeeded"}
    # Once it succeeded the run is over: nothing more is taken from it.
    assert_problem(client.post(f"/internal/v1/operations/{export_id}/result", json={"manifest_key": key},
                               headers=worker), 409, "run_over")
    # Another tenant sees none of it: 404 exactly like a missing export.
    for path in (f"/v1/exports/{export_id}", f"/v1/exports/{export_id}/events",
                 f"/v1/exports/{export_id}/files/config.json"):
        assert_problem(client.get(path, headers=other_tenant.headers), 404, "export_not_found")
    assert_problem(client.get("/v1/exports/export-missing", headers=tenant.headers), 404, "export_not_found")
    assert_problem(client.get(f"/v1/exports/{export_id}/files/..%2Fsecrets", headers=tenant.headers), 404,
                   "not_found", "name")


def test_a_tampered_output_fails_the_export(client, app, tenant):
    adapter = trained_adapter(client, app, tenant)
    export_id = client.post(f"/v1/models/{adapter}/exports", headers=tenant.headers).json()["id"]
    worker = start_run(app, export_id)
    key = publish_export(app, export_id, FILES, tamper="tokenizer.json")
    r = client.post(f"/internal/v1/operations/{export_id}/result", json={"manifest_key": key}, headers=worker)
    assert_problem(r, 422, "storage_error", "manifest_key")
    export = client.get(f"/v1/exports/{export_id}", headers=tenant.headers).json()
    assert export["status"] == "failed" and export["error"]["code"] == "storage_error"
    assert "tokenizer.json" in export["error"]["message"] and export["files"] is None


def test_run_reports_a_failure_in_our_words(client, app, tenant):
    adapter = trained_adapter(client, app, tenant)
    export_id = client.post(f"/v1/models/{adapter}/exports", headers=tenant.headers).json()["id"]
    worker = start_run(app, export_id)
    r = client.post(f"/internal/v1/operations/{export_id}/failure", headers=worker,
                    json={"code": "internal_error", "message": "Traceback: /srv/secret/path.py"})
    assert r.status_code == 204
    export = client.get(f"/v1/exports/{export_id}", headers=tenant.headers).json()
    assert export["status"] == "failed" and "/srv/secret" not in export["error"]["message"]


def test_tokens_speak_for_one_operation_and_run(client, app, tenant):
    adapter = trained_adapter(client, app, tenant)
    first = client.post(f"/v1/models/{adapter}/exports", headers=tenant.headers).json()["id"]
    second = client.post(f"/v1/models/{adapter}/exports", headers=tenant.headers).json()["id"]
    worker = start_run(app, first)
    start_run(app, second)
    events = {"events": [{"message": "x"}]}
    assert_problem(client.post(f"/internal/v1/operations/{second}/events", json=events, headers=worker),
                   401, "unauthorized")
    assert_problem(client.post(f"/internal/v1/operations/{first}/events", json=events,
                               headers={"Authorization": f"Bearer {tenant.key}"}), 401, "unauthorized")


def test_refused_exports_change_nothing(client, app, tenant, other_tenant):
    mine = trained_adapter(client, app, tenant)
    before = _count_operations(app)
    # Another tenant's adapter: 404 exactly like a missing one.
    assert_problem(client.post(f"/v1/models/{mine}/exports", headers=other_tenant.headers), 404,
                   "model_not_found", "adapter_id")
    assert_problem(client.post("/v1/models/ft-nope/exports", headers=tenant.headers), 404,
                   "model_not_found", "adapter_id")
    # A virtual-token method has no weights to merge.
    prefix = trained_adapter(client, app, tenant, method="p_tuning")
    body = assert_problem(client.post(f"/v1/models/{prefix}/exports", headers=tenant.headers), 422,
                          "not_mergeable", "adapter_id")
    assert "virtual tokens" in body["detail"]
    assert_problem(client.post(f"/v1/models/{mine}/exports", json={"dtype": "int4"}, headers=tenant.headers),
                   422, "validation_error")
    assert_problem(client.post(f"/v1/models/{mine}/exports", json={"max_shard_size": "lots"},
                               headers=tenant.headers), 422, "validation_error")
    assert _count_operations(app) == before


def test_sdk_exports_waits_and_downloads_verified_files(client, app, tenant, tmp_path):
    import lorafleet

    sdk = lorafleet.Client(base_url=str(client.base_url), api_key=tenant.key, http_client=client, max_retries=0)
    adapter = trained_adapter(client, app, tenant)
    export = sdk.models.exports.create(adapter, dtype="float16")
    assert (export.status, export.dtype) == ("queued", "float16")
    worker = start_run(app, export.id)
    key = publish_export(app, export.id, FILES)
    assert client.post(f"/internal/v1/operations/{export.id}/result", json={"manifest_key": key},
                       headers=worker).status_code == 204
    assert sdk.models.exports.wait(export.id, timeout=5).status == "succeeded"
    folder = sdk.models.exports.download(export.id, tmp_path / "model")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"} == FILES
    assert [e.id for e in sdk.models.exports.list(adapter)] == [export.id]
