"""The web console in a real browser: sign-in, upload errors, a job's live curve, cancel, the
playground, tenant isolation, markup in tenant strings, CSP, and the admin view."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from console_helpers import screenshot, sign_in, until
from live_stack import FakeWorker, adapter_files

pytestmark = pytest.mark.browser

CHAT_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]}\n'
DATASET = CHAT_LINE * 4
XSS = "<img src=x onerror=alert(1)>"
CURVE = [(1, 2.31, 1e-3), (2, 1.87, 2e-3), (3, 1.52, 2e-3), (4, 1.21, 1.6e-3), (5, 0.98, 1.1e-3), (6, 0.83, 5e-4)]


def chart_points(page) -> int:
    return page.evaluate("document.querySelector('#loss-chart').chart.data[0].length")


def metrics(step: int, loss: float, lr: float, total: int = len(CURVE)) -> dict:
    return {"type": "metrics", "message": f"step {step}/{total}: train loss {loss:.4f}",
            "data": {"step": step, "total_steps": total, "train_loss": loss, "learning_rate": lr, "eta_s": 2.0 * (total - step)}}


def api_has(stack, path: str) -> bool:
    """Whether the API documents this route: the console shows the matching button only then."""
    return path in httpx.get(stack.base_url + "/openapi.json").json()["paths"]


def run_job(stack, tenant, suffix: str, curve=CURVE) -> tuple[str, str]:
    f = tenant.client.files.create(DATASET, filename=f"{suffix}.jsonl")
    job = tenant.client.fine_tuning.jobs.create(model="lorafleet/tiny-llama", training_file=f.id, suffix=suffix)
    worker = FakeWorker(stack, job.id)
    try:
        worker.start()
        worker.events(*(metrics(*point) for point in curve))
        return job.id, worker.publish(adapter_files())
    finally:
        worker.close()


def test_csp_and_security_headers(stack):
    for path in ("/console", "/console/static/js/app.js", "/console/static/vendor/uplot/uPlot.iife.min.js"):
        r = httpx.get(stack.base_url + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(stack.base_url + "/console").text
    assert "<script>" not in page and " style=" not in page and "http" not in page  # nothing inline, nothing remote


def test_sign_in_with_a_bad_key_then_a_good_one(open_page, make_tenant, admin):
    tenant = make_tenant()
    page = open_page()
    assert page.evaluate("document.activeElement.id") == "secret"  # keyboard first: focus starts in the field
    page.keyboard.type("lf-not-a-real-key.abc")
    page.keyboard.press("Enter")
    error = page.locator("#signin-error")
    error.wait_for()
    until(page, "document.querySelector('#signin-error').textContent.length > 0")
    assert "401" in error.text_content() or "invalid" in error.text_content().lower()
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
    sign_in(page, tenant.key)
    assert tenant.key not in page.url and page.evaluate("document.cookie") == ""
    assert page.evaluate("JSON.parse(sessionStorage.getItem('lorafleet.credential')).role") == "tenant"
    page.click("#signout")
    page.wait_for_selector("#secret")
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, tenant.key)  # then the key is revoked while the jobs list polls
    for key in admin.admin.api_keys.list(tenant.id):
        admin.admin.api_keys.revoke(key.id)
    until(page, "document.querySelector('#signin-error')?.textContent.startsWith('Signed out: the API refused the key')")
    assert page.evaluate("sessionStorage.length") == 0


def test_upload_shows_the_error_at_the_bad_line(open_page, make_tenant):
    page = open_page()
    sign_in(page, make_tenant().key)
    page.click("text=New job")
    bad = CHAT_LINE + CHAT_LINE + b"{not json at all\n" + CHAT_LINE
    page.set_input_files("#file-input", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad}])
    line = page.locator("#bad-lines li[data-line='3']")
    line.wait_for()
    assert line.locator(".lineno").text_content() == "line 3"
    assert line.locator(".linetext").text_content() == "{not json at all"
    assert line.locator(".reason").text_content()
    assert page.locator("#bad-lines li").count() == 1  # only the bad line


def test_job_curve_grows_while_it_trains_then_cancel(stack, open_page, make_tenant):
    tenant = make_tenant()
    page = open_page()
    sign_in(page, tenant.key)
    page.click("text=New job")
    page.set_input_files("#file-input", files=[{"name": "pirate.jsonl", "mimeType": "application/jsonl", "buffer": DATASET}])
    page.locator("#upload-result .ok").wait_for()
    page.fill("#suffix", "pirate")
    page.fill("#hp-n_epochs", "2")
    page.select_option("#hp-lr_scheduler", "linear")
    page.click("#create-job")
    page.wait_for_url("**/console#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    job = tenant.client.fine_tuning.jobs.retrieve(job_id)
    assert job.user_provided_suffix == "pirate" and job.method["lora"]["hyperparameters"]["n_epochs"] == 2

    worker = FakeWorker(stack, job_id)
    try:
        worker.start()
        page.wait_for_selector("#job-status.s-running")
        assert chart_points(page) == 0
        for i, point in enumerate(CURVE[:4], start=1):  # each report reaches the chart: polled, not slept
            worker.events(metrics(*point))
            until(page, f"document.querySelector('#loss-chart').chart.data[0].length === {i}")
        worker.events({"type": "metrics", "message": "step 4: eval loss 1.4", "data": {"step": 4, "eval_loss": 1.4}})
        until(page, "document.querySelector('#loss-chart').chart.data[2].includes(1.4)")
        data = page.evaluate("document.querySelector('#loss-chart').chart.data")
        assert data[0] == [1, 2, 3, 4] and data[1] == [p[1] for p in CURVE[:4]] and data[3][0] == CURVE[0][2]
        assert page.locator("#job-progress progress").get_attribute("value") == "4"
        assert "ETA" in page.locator("#job-progress").text_content()
        assert page.locator("#job-summary").get_by_text("lora").count() >= 1

        if api_has(stack, "/v1/fine_tuning/jobs/{job_id}/pause"):
            page.click("#job-pause")
            until(page, "document.querySelector('#job-status').textContent === 'pausing'")
            assert page.locator("#job-pause").count() == 0 and page.locator("#job-resume").count() == 0
        else:  # absent, not broken
            assert page.locator("#job-pause").count() == 0
        page.click("#job-cancel")
        until(page, "['cancelling', 'cancelled'].includes(document.querySelector('#job-status').textContent)")
        assert tenant.client.fine_tuning.jobs.retrieve(job_id).status in ("cancelling", "cancelled")
        assert page.locator("#job-cancel").count() == 0
    finally:
        worker.close()


def test_finished_job_page_and_jobs_list(stack, open_page, make_tenant):
    tenant = make_tenant()
    job_id, adapter = run_job(stack, tenant, "pirate")
    queued = tenant.client.fine_tuning.jobs.create(  # no scheduler in this stack: it stays queued
        model="lorafleet/tiny-llama", training_file=tenant.client.files.list().data[0].id, method="qlora", suffix="bravo")
    page = open_page()
    sign_in(page, tenant.key)
    row = page.locator(f"tr[data-job='{job_id}']")
    row.wait_for()
    assert "succeeded" in row.text_content() and "pirate" in row.text_content()
    screenshot(page, "jobs")
    page.locator(f"tr[data-job='{queued.id}']").wait_for()
    page.select_option("#status-filter", "queued")
    row.wait_for(state="detached")
    assert page.locator(f"tr[data-job='{queued.id}']").count() == 1
    page.click("text=Jobs")
    page.goto(f"/console#/jobs/{job_id}")
    until(page, f"document.querySelector('#loss-chart').chart?.data[0].length === {len(CURVE)}")
    page.wait_for_selector("#job-status.s-succeeded")
    assert page.locator("#job-summary").get_by_text(adapter).count() == 1
    assert page.locator("#job-cancel").count() == 0
    screenshot(page, "job")
    page.click("text=Models")
    row = page.locator(f"tr[data-adapter='{adapter}']")
    row.wait_for()
    with page.expect_download() as download:  # fetched with the key, saved from memory
        row.get_by_role("button", name="adapter_config.json").click()
    assert download.value.suggested_filename == f"{adapter}-adapter_config.json"
    assert json.loads(Path(download.value.path()).read_text())["peft_type"] == "LORA"
    export = row.get_by_role("button", name=f"Export {adapter} merged into its base")
    if api_has(stack, "/v1/models/{adapter_id}/exports"):
        export.click()
        until(page, f"document.querySelector('#models-note').textContent.includes('of {adapter}: ')")
        exports = httpx.get(f"{stack.base_url}/v1/models/{adapter}/exports",
                            headers={"Authorization": f"Bearer {tenant.key}"}).json()["data"]
        assert [e["adapter"] for e in exports] == [adapter]
    else:  # absent, not broken
        assert export.count() == 0


def test_playground_streams_base_and_two_adapters_side_by_side(stack, open_page, make_tenant):
    tenant = make_tenant()
    adapters = [run_job(stack, tenant, name)[1] for name in ("pirate", "poet")]
    page = open_page()
    sign_in(page, tenant.key)
    page.click("text=Playground")
    page.fill("#prompt", "Who are you?")
    for adapter in adapters:
        page.check(f"[id='pick-{adapter}']")
    blends = api_has(stack, "/v1/adapters/blend")
    if blends:  # a live weighted blend of the two, as a fourth answer
        page.check("#blend-on")
        page.locator(f"[id='w-{adapters[1]}']").fill("0.5")
    else:  # absent, not broken
        assert page.locator("#blend").is_hidden()
    page.click("#send")
    if blends:
        panel = page.locator("article.answer[data-model='blend']")
        panel.and_(page.locator(".done")).wait_for()
        shown = page.evaluate("[...document.querySelectorAll('#models input[data-kind=adapter]:checked')].map(e => e.value)")
        weight = {adapters[0]: "1", adapters[1]: "0.5"}
        assert sorted(shown) == sorted(adapters)
        assert panel.locator("h2").text_content() == "blend: " + " + ".join(f"{weight[a]}×{a}" for a in shown)
        # the control plane accepted both adapters of this tenant and routed to the first
        assert panel.locator(".answer-text").text_content() == f"Ahoy from {shown[0]}"
    for model in ("lorafleet/tiny-llama", *adapters):
        panel = page.locator(f"article.answer[data-model='{model}']")
        panel.and_(page.locator(".done")).wait_for()
        routed = "base" if model == "lorafleet/tiny-llama" else model
        assert panel.locator(".answer-text").text_content() == f"Ahoy from {routed}"
        stats = panel.locator(".stats").text_content()
        assert stats.startswith("3 tokens") and "time to first token" in stats and "tokens/s" in stats  # 3 chunks streamed
    screenshot(page, "playground", full_page=True)


def test_tenant_b_sees_none_of_tenant_as(stack, open_page, make_tenant):
    a, b = make_tenant(), make_tenant()
    job_a, adapter_a = run_job(stack, a, "secret")
    file_a = a.client.files.list().data[0]
    page = open_page()
    sign_in(page, b.key)
    page.wait_for_selector("#jobs-list p.muted")  # "No jobs yet."
    assert job_a not in page.content()
    page.click("text=New job")
    page.wait_for_selector("#hp-r")
    assert file_a.id not in page.locator("#training_file").inner_html()
    page.click("text=Models")
    page.wait_for_selector("#adapters p.muted")
    assert adapter_a not in page.content()
    page.click("text=Playground")
    page.wait_for_selector("#models .check")
    assert adapter_a not in page.locator("#models").inner_html()
    page.goto(f"/console#/jobs/{job_a}")
    until(page, "document.querySelector('#flash').textContent.startsWith('not_found: ')")


def test_markup_in_tenant_strings_renders_as_text(open_page, make_tenant):
    tenant = make_tenant()
    page = open_page()
    sign_in(page, tenant.key)
    page.click("text=New job")
    name = f"{XSS}.jsonl"
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": "application/jsonl", "buffer": DATASET}])
    page.locator("#upload-result .ok strong").wait_for()
    assert page.locator("#upload-result .ok strong").text_content() == name
    until(page, f"[...document.querySelectorAll('#training_file option')].some(o => o.textContent.startsWith({name!r}))")
    page.fill("#suffix", XSS)
    page.fill("#hp-r", "0")
    page.click("#create-job")
    until(page, "document.querySelector('#err-suffix').textContent.length > 0")
    assert page.locator("#err-hp-r").text_content()  # each problem beside the field its param names
    assert page.locator("#form-error").text_content() == ""
    assert page.locator("main img").count() == 0  # no element made from a tenant's string
    assert tenant.client.fine_tuning.jobs.list().data == []  # refused, nothing created
    # the open_page fixture fails the test if a dialog fired


def test_admin_creates_a_tenant_and_a_key(stack, admin, open_page):
    page = open_page()
    sign_in(page, stack.admin_token, role="admin")
    page.fill("#tenant-name", "console-made")
    page.fill("#tenant-max_concurrent_jobs", "3")
    page.click("text=Create tenant")
    page.wait_for_selector("#keys:not([hidden]) h2")
    row = page.locator("#tenants tr", has_text="console-made")
    assert "3" in row.text_content() and "active" in row.text_content()
    page.click("#create-key")
    key = page.locator("#new-key")
    key.wait_for()
    secret = key.text_content()
    assert secret.startswith("lf-")
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "admin")
    jobs = httpx.get(stack.base_url + "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {secret}"})
    assert jobs.status_code == 200 and jobs.json()["data"] == []  # the new key works, on an empty tenant
    page.click("#keys button.danger")  # revoke it
    until(page, "!document.querySelector('#keys button.danger')")
    refused = httpx.get(stack.base_url + "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401
    page.click("button[aria-label='Disable console-made']")
    page.locator("#tenants tr", has_text="console-made").locator(".s-disabled").wait_for()
    made = [t for t in admin.admin.tenants.list() if t.name == "console-made"]
    assert [t.status for t in made] == ["disabled"]


def test_phone_width_has_no_sideways_scroll(stack, open_page, make_tenant):
    tenant = make_tenant()
    run_job(stack, tenant, "phone")
    page = open_page(390, 844)
    sign_in(page, tenant.key)
    page.wait_for_selector("#jobs-list tr[data-job]")
    for view, ready in (("#/jobs", "#jobs-list tr[data-job]"), ("#/new", "#hp-r"), ("#/playground", "#models .check"),
                        ("#/models", "#adapters tr[data-adapter]")):
        page.goto(f"/console{view}")
        page.wait_for_selector(ready)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), view
    screenshot(page, "phone-models")


def test_a_missing_chromium_fails_and_says_how_to_install_it(monkeypatch):
    from console_helpers import chromium_path

    monkeypatch.delenv("LORAFLEET_CHROMIUM", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="chromium is not installed: `make install` installs it"):
        chromium_path()
