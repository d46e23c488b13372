"""A fault-injecting TCP proxy for tests: asyncio, on 127.0.0.1 and a free port, in front of one
upstream address.

::

    proxy = await FaultProxy("127.0.0.1:50051").start()
    client = AsyncClient(proxy.target)
    proxy.cut()               # reset every open connection (both sides see a RST)
    proxy.blackhole()         # keep sockets open, forward nothing: a half-open link
    proxy.blackhole(False)    # forward again, including what was held meanwhile
    proxy.delay = 0.05        # add latency to every chunk, each direction
    await proxy.refuse()      # stop listening: connect() is refused
    await proxy.refuse(False)
    await proxy.stop()

A blackhole holds bytes (and end-of-stream) in the proxy rather than dropping them, as a
stalled network path does: nothing gets through until it lifts, and nothing is corrupted.
"""

from __future__ import annotations

import asyncio
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.close()


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host = host
        self.upstream_port = int(port)
        self.port = _free_port()
        self.delay = 0.0
        self.accepted = 0
        self.cuts = 0
        self._gate = asyncio.Event()
        self._gate.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                writer.transport.abort()  # upstream down: the client sees a reset
                return
            link = _Link(writer, up_writer)
            self._links.add(link)
            link.tasks = [
                asyncio.create_task(self._pipe(reader, up_writer, link)),
                asyncio.create_task(self._pipe(up_reader, writer, link)),
            ]
            try:
                await asyncio.gather(*link.tasks, return_exceptions=True)
            finally:
                self._links.discard(link)
                link.close()
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's stream server logs a handler that ends cancelled).
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while True:
                data = await src.read(65536)
                await self._gate.wait()  # blackholed: hold the bytes (or the EOF) here
                if not data:
                    break
                if self.delay:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.close()  # either side gone: so is the other (gRPC never half-closes TCP)

    def cut(self) -> int:
        """Reset every connection open now; returns how many there were."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.cuts += 1
        return len(links)

    def blackhole(self, on: bool = True) -> None:
        """Stop (or resume) forwarding on every connection, old and new."""
        if on:
            self._gate.clear()
        else:
            self._gate.set()

    async def refuse(self, on: bool = True) -> None:
        """Stop listening (connections are refused), or listen again on the same port.
        Connections open already are left alone."""
        if on and self._server is not None:
            self._server.close()
            self._server = None
        elif not on and self._server is None:
            await self._listen()

    async def stop(self) -> None:
        """Stop listening, reset every connection, end every task."""
        self._gate.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=5)
