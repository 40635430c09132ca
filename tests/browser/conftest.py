"""The console in headless Chromium (Debian's `chromium`, driven by Playwright's pip wheel) against
the real control plane of tests/sdk/live_stack.py: one stack and one browser per session.

Nothing here skips: without chromium or playwright the tests fail and say `make install`
installs them."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))  # live_stack beside the SDK tests

import lorafleet  # noqa: E402
from console_helpers import INSTALL_HINT, chromium_path  # noqa: E402
from live_stack import LiveStack, start_stack  # noqa: E402


# Per module: sync_playwright keeps an asyncio loop running in this thread until it closes, so
# a session-long browser would break every later test that calls asyncio.run.
@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright package is not installed: {INSTALL_HINT}", pytrace=False)
    executable = chromium_path()
    with sync_playwright() as p:
        # Playwright's own browser download cannot work here: it drives the system chromium.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> LiveStack:
    s = start_stack(tmp_path_factory.mktemp("console-stack"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def admin(stack) -> lorafleet.Client:
    with lorafleet.Client(base_url=stack.base_url, admin_token=stack.admin_token, api_key="unused") as c:
        yield c


@dataclass
class Tenant:
    id: str
    key: str
    client: lorafleet.Client


@pytest.fixture
def make_tenant(stack, admin):
    """make_tenant() -> a new tenant with its API key and an SDK client on it."""
    made: list[Tenant] = []

    def make() -> Tenant:
        t = admin.admin.tenants.create(f"t-{uuid.uuid4().hex[:8]}")
        key = admin.admin.api_keys.create(t.id, name="browser").key
        made.append(Tenant(t.id, key, lorafleet.Client(base_url=stack.base_url, api_key=key, max_retries=1)))
        return made[-1]

    yield make
    for t in made:
        t.client.close()


class Watched:
    """A page whose dialogs (an alert from injected markup), uncaught errors and console errors
    (CSP refusals land there) fail the test; a 4xx answer the test provoked is not one."""

    def __init__(self, page):
        self.page, self.problems = page, []
        page.on("dialog", lambda d: (self.problems.append(f"dialog fired: {d.message!r}"), d.dismiss()))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                and self.problems.append(f"console error: {m.text}"))


@pytest.fixture
def open_page(browser, stack):
    """open_page(width=1280, height=800) -> a fresh context's page at /console, watched."""
    contexts, watched = [], []

    def make(width: int = 1280, height: int = 800):
        ctx = browser.new_context(viewport={"width": width, "height": height}, base_url=stack.base_url)
        contexts.append(ctx)
        w = Watched(ctx.new_page())
        watched.append(w)
        w.page.goto("/console")
        return w.page

    yield make
    problems = [p for w in watched for p in w.problems]
    for ctx in contexts:
        ctx.close()
    assert not problems, problems
