"""Test fixtures' building blocks for the proxy tests (a uniquely named module: tests dirs are not packages).

An h11 origin server that echoes each request as JSON, and a curl runner.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from typing import Any

import h11
import trio


async def _serve_origin_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive_some(65536))
                    except trio.BrokenResourceError:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            echo = json.dumps(
                {
                    "method": request.method.decode(),
                    "target": request.target.decode(),
                    "headers": [[n.decode(), v.decode()] for n, v in request.headers],
                    "body": body.decode("latin-1"),
                }
            ).encode()
            if request.target == b"/chunked":  # no Content-Length: the proxy must frame it itself
                headers = [("content-type", "application/json"), ("transfer-encoding", "chunked")]
                parts = [echo[: len(echo) // 2], echo[len(echo) // 2 :]]
            else:
                headers = [("content-type", "application/json"), ("content-length", str(len(echo)))]
                parts = [echo]
            headers.append(("x-origin", "yes"))
            data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
            for part in parts:
                data += conn.send(h11.Data(data=part)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()


async def serve_origin(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """An HTTP origin on 127.0.0.1 echoing requests as JSON; started with the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _serve_origin_connection, listeners)
        task_status.started(port)


def closed_port() -> int:
    """A loopback TCP port with nothing listening (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run curl (quiet, bounded in time, ignoring proxy environment variables)."""
    command = ["curl", "-sS", "--max-time", "10", *args]
    env = _env_without_proxies()
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False, env=env)


def echoed_headers(output: bytes) -> dict[str, str]:
    return {n: v for n, v in json.loads(output)["headers"]}
