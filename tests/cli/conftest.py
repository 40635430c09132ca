from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))
from live_stack import LiveStack, start_stack  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> LiveStack:
    stack = start_stack(tmp_path_factory.mktemp("lorafleet-cli"))
    yield stack
    stack.stop()
