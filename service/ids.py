"""Public object ids and timestamps.

Ids are time-ordered (a 48-bit millisecond clock, then random bits, in base32 hex, which sorts
like the bytes it encodes): ``ORDER BY id`` is creation order, so a cursor page is a plain
range scan on the (tenant_id, id) index and needs no separate sequence column.
"""

from __future__ import annotations

import base64
import os
import threading
import time

_lock = threading.Lock()
_last = 0


def _sortable_token() -> str:
    """26 sortable characters: ms clock (strictly increasing in this process) + 80 random bits."""
    global _last
    with _lock:
        ms = max(time.time_ns() // 1_000_000, _last + 1)
        _last = ms
    raw = ms.to_bytes(6, "big") + os.urandom(10)
    return base64.b32hexencode(raw).decode().rstrip("=").lower()


def new_id(prefix: str) -> str:
    """``prefix`` + sortable token, e.g. ``ftjob-01j...``; prefixes carry their own separator."""
    return prefix + _sortable_token()


def now() -> int:
    """Timestamps are integer Unix seconds, as in the API."""
    return int(time.time())
