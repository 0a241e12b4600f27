"""The HTTP proxy on loopback, driven by curl and raw sockets."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import trio
from proxytest_helpers import closed_port, curl, echoed_headers

from tsnet.proxy import Credentials, LoopbackProxy, ProxyServer


async def raw_exchange(proxy: LoopbackProxy, data: bytes) -> bytes:
    """Send ``data`` and read until the proxy closes the connection."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
        return b"".join(chunks)


async def test_absolute_form_get_via_tailnet_name(proxy: LoopbackProxy, origin_port: int) -> None:
    url = f"http://web.tailnet.test:{origin_port}/path?q=1"
    result = await curl(
        "-x", proxy.http_url, "-H", "Connection: x-drop", "-H", "X-Drop: 1", "-H", "X-Keep: 2",
        "-H", "Proxy-Connection: keep-alive", url,
    )
    assert result.returncode == 0, result.stderr
    echo = json.loads(result.stdout)
    assert echo["method"] == "GET" and echo["target"] == "/path?q=1"
    headers = echoed_headers(result.stdout)
    assert headers["host"] == f"web.tailnet.test:{origin_port}"
    assert headers["x-keep"] == "2"
    # Hop-by-hop headers, and the ones named in Connection, do not reach the origin.
    assert not {"x-drop", "connection", "proxy-connection"} & set(headers)


async def test_short_name_post_and_chunked_response(proxy: LoopbackProxy, origin_port: int) -> None:
    result = await curl("-x", proxy.http_url, "--data-binary", "hello body", f"http://web:{origin_port}/chunked")
    assert result.returncode == 0, result.stderr
    echo = json.loads(result.stdout)
    assert echo["method"] == "POST" and echo["body"] == "hello body"
    assert echoed_headers(result.stdout)["host"] == f"web:{origin_port}"


async def test_large_chunked_upload_with_expect(
    proxy: LoopbackProxy, origin_port: int, tmp_path: Path
) -> None:
    body = "x" * 200_000
    (tmp_path / "body").write_text(body)
    result = await curl(
        "-x", proxy.http_url, "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
        "--data-binary", f"@{tmp_path / 'body'}", f"http://127.0.0.1:{origin_port}/upload",
    )
    assert result.returncode == 0, result.stderr
    echo = json.loads(result.stdout)
    assert len(echo["body"]) == len(body)
    assert "expect" not in echoed_headers(result.stdout)


async def test_keep_alive_serves_several_requests(
    proxy: LoopbackProxy, proxy_server: ProxyServer, origin_port: int
) -> None:
    base = f"http://web.tailnet.test:{origin_port}"
    result = await curl("-x", proxy.http_url, f"{base}/one", f"{base}/two")
    assert result.returncode == 0, result.stderr
    targets = [json.loads(line)["target"] for line in result.stdout.replace(b"}{", b"}\n{").splitlines()]
    assert targets == ["/one", "/two"]
    assert proxy_server.stats["http_forward"] == 2


async def test_connect_tunnel_with_curl(proxy: LoopbackProxy, proxy_server: ProxyServer, origin_port: int) -> None:
    result = await curl("-p", "-x", proxy.http_url, f"http://web.tailnet.test:{origin_port}/tunnelled")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["target"] == "/tunnelled"
    assert proxy_server.stats["http_connect"] == 1


async def test_failed_dial_is_502_with_reason(proxy: LoopbackProxy) -> None:
    port = closed_port()
    result = await curl("-D", "-", "-o", "/dev/null", "-x", proxy.http_url, f"http://127.0.0.1:{port}/")
    head = result.stdout.decode().lower()
    assert head.startswith("http/1.1 502")
    assert "tailscale-connect-error: " in head and "refused" in head
    # CONNECT gets the same treatment (curl reports the failed tunnel).
    raw = await raw_exchange(proxy, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 502") and b"tailscale-connect-error: " in raw.lower()


async def test_unknown_tailnet_name_is_502(proxy: LoopbackProxy) -> None:
    raw = await raw_exchange(proxy, b"GET http://nope.tailnet.test/ HTTP/1.1\r\nHost: nope.tailnet.test\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 502") and b"name resolution failed" in raw


async def test_origin_form_and_garbage_are_400(proxy: LoopbackProxy) -> None:
    raw = await raw_exchange(proxy, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400") and b"absolute URL or CONNECT" in raw
    raw = await raw_exchange(proxy, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    raw = await raw_exchange(proxy, b"CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    raw = await raw_exchange(proxy, b"GET https://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 501")


async def test_basic_auth(auth_proxy: LoopbackProxy, credentials: Credentials, origin_port: int) -> None:
    url = f"http://web.tailnet.test:{origin_port}/secret"
    plain = LoopbackProxy(auth_proxy.host, auth_proxy.port, None).http_url
    result = await curl("-D", "-", "-o", "/dev/null", "-x", plain, url)
    head = result.stdout.decode().lower()
    assert head.startswith("http/1.1 407") and 'proxy-authenticate: basic realm="tsnet"' in head
    wrong = LoopbackProxy(auth_proxy.host, auth_proxy.port, Credentials("alice", "nope")).http_url
    result = await curl("-D", "-", "-o", "/dev/null", "-x", wrong, url)
    assert result.stdout.startswith(b"HTTP/1.1 407")
    result = await curl("-x", auth_proxy.http_url, url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["target"] == "/secret"
    # The credentials are for the proxy only: they never reach the origin.
    assert "proxy-authorization" not in echoed_headers(result.stdout)
    # CONNECT without credentials is refused too.
    token = base64.b64encode(b"alice:wrong").decode()
    raw = await raw_exchange(
        auth_proxy,
        f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode(),
    )
    assert raw.startswith(b"HTTP/1.1 407")


async def _broken_origin(stream: trio.SocketStream, reply: bytes) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        await stream.send_all(reply)


async def test_upstream_failures(nursery: trio.Nursery, proxy: LoopbackProxy) -> None:
    async def start(reply: bytes) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, lambda s: _broken_origin(s, reply), listeners)
        return listeners[0].socket.getsockname()[1]

    # Closes without answering: the client gets a 502 naming the problem.
    silent = await start(b"")
    result = await curl("-D", "-", "-o", "/dev/null", "-x", proxy.http_url, f"http://127.0.0.1:{silent}/")
    assert result.stdout.lower().startswith(b"http/1.1 502") and b"tailscale-connect-error" in result.stdout.lower()
    # Garbage instead of HTTP: also 502.
    garbage = await start(b"SSH-2.0-OpenSSH\r\n\r\n")
    result = await curl("-D", "-", "-o", "/dev/null", "-x", proxy.http_url, f"http://127.0.0.1:{garbage}/")
    assert result.stdout.startswith(b"HTTP/1.1 502")
    # Dies mid-body: the response has started, so the client connection is cut (curl sees a short body).
    partial = await start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    result = await curl("-x", proxy.http_url, f"http://127.0.0.1:{partial}/")
    assert result.returncode != 0 and result.stdout == b"short"
