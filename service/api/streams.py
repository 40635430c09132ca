"""Streaming object-store bytes into a response."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from workers.storage import CHUNK


def iter_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Chunks of an open object, closed at the end (Starlette runs this in a worker thread)."""
    with stream:
        while data := stream.read(CHUNK):
            yield data
