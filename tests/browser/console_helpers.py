"""Helpers of the browser tests (a module of its own: `conftest` is a name every test folder has)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).with_name("screenshots")  # git-ignored; docs/img holds the README's copies
INSTALL_HINT = "`make install` installs it (apt-get install -y chromium; the playwright wheel from the test extra)"


def chromium_path() -> str:
    path = os.environ.get("LORAFLEET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"chromium is not installed: {INSTALL_HINT}", pytrace=False)
    return path


def sign_in(page, secret: str, role: str = "tenant") -> None:
    page.select_option("#role", role)
    page.fill("#secret", secret)
    page.press("#secret", "Enter")
    page.wait_for_selector("#jobs-list" if role == "tenant" else "#tenants table")


def until(page, js: str, timeout_s: float = 20) -> None:
    """Polls a JS expression until it is truthy. page.wait_for_function would evaluate a string in
    the page, which the console's CSP (no 'unsafe-eval') rightly refuses."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {js}"
        page.wait_for_timeout(50)


def screenshot(page, name: str, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)
