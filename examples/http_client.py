"""Fetch a URL over the tailnet with ``Server.http_client()`` (an httpx.AsyncClient; MagicDNS names work).

    python examples/http_client.py                                   # embedded tailnet demo
    TS_CONTROL_URL=... TS_AUTHKEY=... python examples/http_client.py http://grafana/api/health
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tsnet  # noqa: E402
from _local_tailnet import local_tailnet  # noqa: E402


async def fetch(url: str, **settings: object) -> str:
    """Join as an ephemeral node, GET ``url`` over the tailnet, leave. Returns the body."""
    async with tsnet.Server(hostname=settings.pop("hostname", "http-client"), ephemeral=True, **settings) as srv:
        host = url.split("/")[2].split(":")[0]
        if not host[0].isdigit():
            await srv.wait_for_peer(host.split(".")[0], timeout=30)
        async with srv.http_client() as client:
            response = await client.get(url, timeout=30)
            response.raise_for_status()
            return response.text


async def serve_hello(srv: tsnet.Server, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A one-line HTTP server on the tailnet (for the demo)."""
    listener = await srv.listen("tcp", ":80")

    async def handle(stream: trio.abc.Stream) -> None:
        async with stream:
            await stream.receive_some(4096)
            body = b"hello from the tailnet\n"
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                  % (len(body), body))

    try:
        await trio.serve_listeners(handle, [listener], task_status=task_status)
    except* trio.ClosedResourceError:
        pass  # the node was closed


async def main() -> None:
    if os.environ.get("TS_CONTROL_URL"):
        print(await fetch(sys.argv[1]))
        return
    async with local_tailnet() as tailnet:
        settings = dict(control_url=tailnet.url, auth_key=tailnet.authkey(), **tailnet.node_settings)
        async with tsnet.Server(hostname="web", ephemeral=True, **settings) as web:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_hello, web)
                print(await fetch("http://web/", **settings), end="")
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
