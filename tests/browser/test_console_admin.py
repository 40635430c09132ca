"""The admin view's cluster sections in a real browser: the queue by tenant with a queued job,
running jobs, capacity as the scheduler recorded it, serving's adapter cache; kept current."""

from __future__ import annotations

import time

import httpx
import pytest
from console_helpers import screenshot, sign_in, until
from live_stack import FakeWorker, adapter_files

from service.db.session import make_engine, make_session_factory
from service.launcher import ClusterResources
from service.scheduling.observed import ClusterRecorder
from service.scheduling.policy import Capacity

pytestmark = pytest.mark.browser

DATASET = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]}\n' * 4
MODEL = "lorafleet/tiny-llama"


def _record_capacity(stack, total: Capacity, available: Capacity, training: Capacity) -> None:
    """What the scheduler leader writes each tick (the live stack runs no scheduler: FakeWorker plays it)."""
    engine = make_engine(stack.database_url)
    try:
        ClusterRecorder(make_session_factory(engine)).record(
            ClusterResources(total=total, available=available), training=training, now=time.time())
    finally:
        engine.dispose()


def test_admin_view_shows_queue_capacity_and_serving(stack, open_page, make_tenant):
    tenant = make_tenant()
    f = tenant.client.files.create(DATASET, filename="admin.jsonl")
    queued = tenant.client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="waits")
    running = tenant.client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="runs")
    done = tenant.client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="done")
    for job_id, publish in ((running.id, False), (done.id, True)):
        worker = FakeWorker(stack, job_id)
        try:
            worker.start()
            adapter_id = worker.publish(adapter_files()) if publish else None
        finally:
            worker.close()
        if adapter_id:
            for _ in range(2):  # serving's cache: a miss, then a hit
                tenant.client.chat.completions.create(model=adapter_id, messages=[{"role": "user", "content": "hi"}])
    _record_capacity(stack, total=Capacity(cpus=16, gpus=2), available=Capacity(cpus=10, gpus=1),
                     training=Capacity(cpus=4, gpus=1))

    page = open_page()
    sign_in(page, stack.admin_token, role="admin")
    row = page.locator(f"#queue tr[data-tenant='{tenant.id}']")
    row.wait_for()
    cells = row.locator("td").all_text_contents()
    assert cells[0].startswith("t-") and cells[1:4] == ["1", "1", "0"]  # queued, running, paused
    assert cells[4] == "1 CPU · 0 GPU" and cells[6].endswith("ago")
    assert page.locator(f"#queue tr[data-job='{running.id}']").count() == 1
    assert page.locator(f"#queue tr[data-job='{queued.id}']").count() == 0  # queued is not running

    capacity = dict(zip(page.locator("#capacity dt").all_text_contents(),
                        page.locator("#capacity dd").all_text_contents(), strict=True))
    assert capacity["Total"] == "16 CPU · 2 GPU" and capacity["Free"] == "10 CPU · 1 GPU"
    assert capacity["Used"] == "6 CPU · 1 GPU" and capacity["Fine-tuning"] == "4 CPU · 1 GPU"
    assert capacity["Serving and other"] == "2 CPU · 0 GPU" and "by the scheduler" in capacity["Seen"]

    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    served = httpx.get(stack.base_url + "/v1/admin/serving", headers=admin).json()
    host = served["replica"]["caches"][0]
    assert served["reachable"] is True and host["hits"] >= 1 and host["resident_adapters"] >= 1
    assert page.locator("#serving-state").text_content().startswith("Reachable")
    # No inference runs meanwhile: the page shows these very counts (cells: tier, resident, used,
    # free, hit rate, hits / misses, evictions).
    cells = page.locator("#serving tr[data-cache=host] td").all_text_contents()
    assert cells[1] == str(host["resident_adapters"]) and cells[4] == f"{100 * host['hit_rate']:.1f}%"
    assert cells[5] == f"{host['hits']} / {host['misses']}"

    # Kept current: one more queued job shows without a reload.
    tenant.client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="later")
    until(page, f"document.querySelector(\"#queue tr[data-tenant='{tenant.id}'] td:nth-child(2)\").textContent === '2'")
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "admin_cluster", full_page=True)
