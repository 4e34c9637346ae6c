"""A TCP proxy on loopback for tests and benchmarks: adds latency, or cuts a download once."""

from __future__ import annotations

import asyncio
import threading


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
