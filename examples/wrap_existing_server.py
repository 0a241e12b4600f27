"""Put an existing server on the tailnet, three ways:

1. ``serve_asgi``: an ASGI app (FastAPI, Starlette, ... or the tiny one below) served on a tailnet
   listener by a minimal HTTP/1.1 server (h11), with the caller's tailnet identity in the scope.
2. ``serve_http_server``: the standard library's ``http.server`` on a tailnet listener, via
   ``tsnet.blocking`` (its ``Listener`` works as the server's socket).
3. ``Server.serve_forward(80, "127.0.0.1:8080")``: forward tailnet connections to a server already
   listening on localhost, untouched.

    python examples/wrap_existing_server.py          # embedded tailnet demo of all three
"""

from __future__ import annotations

import http.server
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tsnet  # noqa: E402
from _local_tailnet import local_tailnet  # noqa: E402
from tsnet import blocking  # noqa: E402

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that greets the tailnet user by node name."""
    assert scope["type"] == "http"
    who = scope.get("tailnet_whois")
    body = f"hello {who.node.name if who else 'stranger'}, you asked for {scope['path']}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def serve_asgi(srv: tsnet.Server, app: ASGIApp, port: int = 80, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on tailnet ``:port`` (one request per connection; enough for a demo or admin UI)."""
    listener = await srv.listen("tcp", f":{port}")

    async def handle(stream: Any) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            request, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if request is None:
                return
            client = stream.remote_address
            target = request.target.decode()
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": request.method.decode(), "scheme": "http",
                "path": target.split("?")[0], "query_string": target.partition("?")[2].encode(),
                "headers": [(k.lower(), v) for k, v in request.headers],
                "client": client, "server": stream.local_address,
                "tailnet_whois": srv.whois(client[0]),  # who is calling: node + user
            }
            sent_body = False

            async def receive() -> dict[str, Any]:
                nonlocal sent_body
                if sent_body:
                    return {"type": "http.disconnect"}
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", [])) + [(b"connection", b"close")]
                    await stream.send_all(conn.send(h11.Response(status_code=message["status"], headers=headers)))
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        await stream.send_all(conn.send(h11.Data(data=message["body"])))
                    if not message.get("more_body"):
                        await stream.send_all(conn.send(h11.EndOfMessage()))

            await app(scope, receive, send)

    task_status.started()
    async with listener:
        await trio.serve_listeners(handle, [listener])


class HelloHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"http.server on the tailnet says hi to {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve_http_server(node: blocking.Server, port: int = 8000) -> tuple[http.server.HTTPServer, threading.Thread]:
    """Serve ``HelloHandler`` with the standard library's HTTPServer on tailnet ``:port``, in a thread."""
    listener = node.listen("tcp", f":{port}")
    httpd = http.server.HTTPServer(("127.0.0.1", 0), HelloHandler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = listener  # accept()/fileno()/close() are all it needs
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return httpd, thread


async def demo(settings: dict[str, Any]) -> list[str]:
    """All three ways on one tailnet; returns what a visitor node fetched."""
    results = []
    async with tsnet.Server(hostname="app", ephemeral=True, **settings) as app_node, \
            tsnet.Server(hostname="visitor", ephemeral=True, **settings) as visitor:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_asgi, app_node, hello_app, 80)
            # 3. serve_forward: an OS-socket server on localhost, reachable as app:8080 on the tailnet.
            local = await trio.open_tcp_listeners(0, host="127.0.0.1")
            local_port = local[0].socket.getsockname()[1]

            async def local_server(stream: trio.SocketStream) -> None:
                async with stream:
                    await stream.receive_some(4096)
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\nConnection: close\r\n\r\n"
                                          b"from localhost :)\n")

            nursery.start_soon(trio.serve_listeners, local_server, local)
            await nursery.start(app_node.serve_forward, 8080, f"127.0.0.1:{local_port}")
            await visitor.wait_for_peer("app")
            async with visitor.http_client() as client:
                results.append((await client.get("http://app/asgi", timeout=10)).text)
                results.append((await client.get("http://app:8080/", timeout=10)).text)
            nursery.cancel_scope.cancel()
    # 2. http.server through tsnet.blocking (its own trio loop in a thread).
    def blocking_part() -> str:
        with blocking.Server(hostname="stdlib", ephemeral=True, **settings) as node, \
                blocking.Server(hostname="visitor2", ephemeral=True, **settings) as visitor2:
            httpd, thread = serve_http_server(node, 8000)
            try:
                visitor2.wait_for_peer("stdlib")
                return visitor2.http_client().get("http://stdlib:8000/", timeout=10).text
            finally:
                httpd.shutdown()
                httpd.server_close()
                thread.join(5)

    results.append(await trio.to_thread.run_sync(blocking_part))
    return results


async def main() -> None:
    if os.environ.get("TS_CONTROL_URL"):
        for line in await demo({}):
            print(line, end="")
        return
    async with local_tailnet() as tailnet:
        for line in await demo(dict(control_url=tailnet.url, auth_key=tailnet.authkey(), **tailnet.node_settings)):
            print(line, end="")


if __name__ == "__main__":
    trio.run(main)
