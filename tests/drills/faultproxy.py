"""A TCP proxy that can cut a link on demand: the fault injector of the drills.

``FaultProxy(upstream_port)`` listens on a loopback port of its own and forwards every byte to
the upstream (Postgres, the S3 endpoint, ...). ``cut()`` does what an outage does to a client:
new connections are refused and every open one is reset (RST, both sides), so a pooled
connection is dead, not merely idle. ``restore()`` listens again on the same port.
``cut_when(pattern, seconds)`` times an outage to the byte: the cut starts when a client sends
a request matching ``pattern`` (say, the control plane reading an adapter's manifest), and
ends by itself ``seconds`` later. It runs an asyncio loop in a daemon thread; the methods are
called from the test's thread.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import struct
import threading

from workers.local_ray import free_port

CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, like a vanished peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.connections = 0  # accepted since start, for the drill's record
        self.fired: list[tuple[str, float]] = []  # (pattern, time.monotonic()) of each cut_when
        self._triggers: list[tuple[re.Pattern[bytes], float]] = []
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="faultproxy")
        self._thread.start()
        self.restore()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # --- public, called from the test thread
    @property
    def is_cut(self) -> bool:
        return self._server is None

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def cut_when(self, pattern: bytes, seconds: float) -> None:
        """Arm a one-shot outage; armed ones fire in order, the next only after the previous."""
        self._loop.call_soon_threadsafe(self._triggers.append, (re.compile(pattern), seconds))

    def close(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- on the proxy's loop
    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()  # the port refuses from now on
            await self._server.wait_closed()
            self._server = None
        for client, upstream in list(self._pairs):
            _reset(client)
            _reset(upstream)
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, watch=True), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    watch: bool = False) -> None:
        try:
            while data := await reader.read(CHUNK):
                if watch and self._triggers and self._triggers[0][0].search(data):
                    pattern, seconds = self._triggers.pop(0)
                    self.fired.append((pattern.pattern.decode(), time.monotonic()))
                    await self._cut()  # this request dies with its connection
                    self._loop.call_later(seconds, lambda: asyncio.ensure_future(self._listen()))
                    return
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other direction may still be talking
        except (ConnectionError, OSError):
            writer.transport.abort()
