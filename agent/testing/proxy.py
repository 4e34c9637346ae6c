"""Proxies on loopback for tests and benchmarks: a TCP relay that adds latency or cuts a
download once, and an HTTP relay that rewrites ETags or drops conditions."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web


class Proxy:
    """Relays 127.0.0.1:<port> to ``target``.

    ``delay``: seconds each client request waits before it reaches the target
    (a WAN round trip). ``cut_after``: the first response carrying more than
    this many bytes is cut there, as a dropped connection would.
    """

    def __init__(self, target: str, *, delay: float = 0.0, cut_after: int = 0) -> None:
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.delay = delay
        self.cut_after = cut_after
        self.cuts = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._run, daemon=True).start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)

        async def upstream() -> None:
            try:
                while data := await reader.read(1 << 16):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    up_w.write(data)
                    await up_w.drain()
            finally:
                up_w.close()

        async def downstream() -> None:
            sent = 0
            try:
                while data := await up_r.read(1 << 16):
                    if self.cut_after and not self.cuts and sent + len(data) > self.cut_after:
                        writer.write(data[: self.cut_after - sent])
                        await writer.drain()
                        self.cuts += 1
                        writer.transport.abort()
                        return
                    sent += len(data)
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


class HttpProxy:
    """An HTTP relay on 127.0.0.1 that can misbehave like a caching proxy in front of a server.

    ``weak_etags``: ETag response headers become ``W/"..."`` (what a proxy
    that compresses responses does). ``drop_conditions``: If-None-Match is
    removed from requests, so the server answers 200 every time.
    ``requests`` counts what went through, per path (without the query).
    """

    def __init__(
        self, target: str, *, weak_etags: bool = False, drop_conditions: bool = False
    ) -> None:
        self.target = target.rstrip("/")
        self.weak_etags = weak_etags
        self.drop_conditions = drop_conditions
        self.requests: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def setup() -> None:
            self.session = aiohttp.ClientSession(auto_decompress=False)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.loop.run_until_complete(setup())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()  # stopped by close(): its selector and wake-up sockets go too

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        skip = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        if self.drop_conditions:
            headers.pop("If-None-Match", None)
        async with self.session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read(),
        ) as resp:
            body = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in skip}
            if self.weak_etags and "ETag" in out and not out["ETag"].startswith("W/"):
                out["ETag"] = "W/" + out["ETag"]
            return web.Response(status=resp.status, headers=out, body=body)

    def count(self, path: str) -> int:
        return self.requests.get(path, 0)

    def close(self) -> None:
        async def down() -> None:
            await self.session.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
