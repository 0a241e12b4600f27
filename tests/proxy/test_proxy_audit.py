"""Audit of the SOCKS5 and HTTP proxies against RFC 1928/9110/9112 and tailscaled: each test pins one rule.

HTTP: ambiguous Content-Length + Transfer-Encoding refused (no request smuggling), an upstream reply
with both is re-framed by its chunking, Via added both ways, Max-Forwards for OPTIONS/TRACE, a dial
timeout is 504, the request head has one deadline however slowly it trickles. SOCKS5: CONNECT to an
IPv6 literal with an IPv6 BND.ADDR, a dial timeout is "TTL expired", the default listener is loopback.
Policy: a tailnet-only proxy (``other=deny_dial``) refuses everything else with SOCKS5 0x02 / HTTP 403.
Bounds: at most ``max_connections`` clients at once.
"""

from __future__ import annotations

import base64
import inspect
import ipaddress
import json
import socket
import struct

import trio
import trio.testing
from proxytest_helpers import curl, echoed_headers

from tsnet.dns import MagicDNS, NameResolver
from tsnet.proxy import Credentials, LoopbackProxy, ProxyServer, deny_dial, direct_dial, route_by_address
from tsnet.proxy.socks5 import encode_address


async def exchange(host: str, port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the peer closes."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


async def start_raw_origin(nursery: trio.Nursery, reply: bytes, seen: list[bytes], host: str = "127.0.0.1") -> int:
    """An origin that records what it receives (until a blank line) and answers ``reply``."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            seen.append(data)
            await stream.send_all(reply)

    listeners = await trio.open_tcp_listeners(0, host=host)
    await nursery.start(trio.serve_listeners, handler, listeners)
    return listeners[0].socket.getsockname()[1]


async def test_content_length_with_transfer_encoding_is_refused(
    nursery: trio.Nursery, proxy: LoopbackProxy, proxy_server: ProxyServer
) -> None:
    """RFC 9112 §6.3: forwarding both framings lets the origin read a different body (smuggling)."""
    seen: list[bytes] = []
    port = await start_raw_origin(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seen)
    smuggle = (
        f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    reply = await exchange(proxy.host, proxy.port, smuggle)
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1") == 1
    assert seen == [] and proxy_server.stats["http_ambiguous_framing"] == 1


async def test_upstream_reply_with_both_framings_follows_the_chunking(
    nursery: trio.Nursery, proxy: LoopbackProxy
) -> None:
    seen: list[bytes] = []
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    port = await start_raw_origin(nursery, body, seen)
    result = await curl("-D", "-", "-x", proxy.http_url, f"http://127.0.0.1:{port}/")
    assert result.returncode == 0, result.stderr
    head, _, payload = result.stdout.partition(b"\r\n\r\n")
    assert payload == b"hello" and b"content-length: 3" not in head.lower()


async def test_via_is_added_both_ways(proxy: LoopbackProxy, origin_port: int) -> None:
    """RFC 9110 §7.6.3: a proxy adds a Via entry to each message it forwards."""
    result = await curl("-D", "-", "-x", proxy.http_url, "-H", "Via: 1.0 upstream-proxy", f"http://web:{origin_port}/v")
    assert result.returncode == 0, result.stderr
    head, _, payload = result.stdout.partition(b"\r\n\r\n")
    vias = [v for n, v in json.loads(payload)["headers"] if n == "via"]
    assert vias == ["1.0 upstream-proxy", "1.1 tsnet"]
    assert b"via: 1.1 tsnet" in head.lower()
    assert echoed_headers(payload)["host"] == f"web:{origin_port}"


async def _hang(host: str, port: int) -> trio.abc.Stream:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_http_dial_timeout_is_504(autojump_clock: trio.abc.Clock) -> None:
    server = ProxyServer(_hang, connect_timeout=5, handshake_timeout=5)
    for request in (b"GET http://slow.example/ HTTP/1.1\r\nHost: slow.example\r\n\r\n",
                    b"CONNECT slow.example:443 HTTP/1.1\r\nHost: slow.example\r\n\r\n"):
        client, served = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_stream, served)
            await client.send_all(request)
            reply = b""
            with trio.fail_after(60):
                while chunk := await client.receive_some(4096):
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 504") and b"tailscale-connect-error: connection timed out" in reply


async def test_slowly_trickled_request_head_hits_one_deadline(autojump_clock: trio.abc.Clock) -> None:
    """A byte every few seconds must not keep a connection open forever (each read is quick)."""
    server = ProxyServer(handshake_timeout=10)
    client, served = trio.testing.memory_stream_pair()
    head = b"GET http://web.example/ HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    closed_at: list[float] = []

    async def trickle() -> None:
        for byte in head:
            try:
                await client.send_all(bytes((byte,)))
            except trio.BrokenResourceError:
                return
            await trio.sleep(3)  # the client's pace (virtual time), not synchronisation

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, served)
        nursery.start_soon(trickle)
        start = trio.current_time()
        with trio.fail_after(600):
            while await client.receive_some(4096):
                pass
        closed_at.append(trio.current_time() - start)
        nursery.cancel_scope.cancel()
    # The first read gets up to 10 s, then the head as a whole another 10 s.
    assert closed_at[0] <= 25


async def _socks_request(stream: trio.abc.Stream, host: str, port: int) -> bytes:
    await stream.send_all(b"\x05\x01\x00\x05\x01\x00" + encode_address(host, port))
    out = b""
    with trio.fail_after(60):
        while chunk := await stream.receive_some(4096):
            out += chunk
            if len(out) >= 2 + 10:
                break
    return out


async def test_socks5_dial_timeout_is_ttl_expired(autojump_clock: trio.abc.Clock) -> None:
    server = ProxyServer(_hang, connect_timeout=5)
    client, served = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, served)
        reply = await _socks_request(client, "192.0.2.1", 80)
    assert reply[:2] == b"\x05\x00" and reply[2:4] == b"\x05\x06"


async def test_socks5_connect_to_ipv6_literal(nursery: trio.Nursery, proxy: LoopbackProxy) -> None:
    seen: list[bytes] = []
    port = await start_raw_origin(nursery, b"v6 hello", seen, host="::1")
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with stream:
        await stream.send_all(b"\x05\x01\x00\x05\x01\x00" + encode_address("::1", port))
        head = b""
        with trio.fail_after(5):
            while len(head) < 2 + 4 + 16 + 2:
                head += await stream.receive_some(2 + 4 + 16 + 2 - len(head))
        assert head[:2] == b"\x05\x00" and head[2:6] == b"\x05\x00\x00\x04"  # succeeded, IPv6 BND.ADDR
        assert socket.inet_ntop(socket.AF_INET6, head[6:22]) == "::1"
        assert struct.unpack("!H", head[22:24])[0] > 0
        await stream.send_all(b"ping\r\n\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b"v6 hello"
    assert seen == [b"ping\r\n\r\n"]


async def test_listener_is_loopback_by_default(nursery: trio.Nursery) -> None:
    assert inspect.signature(ProxyServer.serve).parameters["host"].default == "127.0.0.1"
    info = await nursery.start(ProxyServer().serve)
    assert info.host == "127.0.0.1"
    # Reachable on loopback; the kernel reports the listener's own address as the peer's name.
    stream = await trio.open_tcp_stream("127.0.0.1", info.port)
    async with stream:
        assert stream.socket.getpeername() == ("127.0.0.1", info.port)


async def test_tailnet_only_proxy_refuses_other_destinations(
    nursery: trio.Nursery, magic: MagicDNS, origin_port: int
) -> None:
    """With ``other=deny_dial`` nothing outside the tailnet is reachable: SOCKS5 0x02, HTTP 403."""
    tailnet = ipaddress.ip_network("127.0.0.1/32")  # stands in for the peers' addresses in this test
    dial = route_by_address(lambda ip: ip in tailnet, direct_dial, deny_dial)
    server = ProxyServer(dial, dial_udp=None, resolve=NameResolver(magic, upstream=None), connect_timeout=5)
    proxy = await nursery.start(server.serve)
    ok = await curl("-x", proxy.http_url, f"http://web.tailnet.test:{origin_port}/in")
    assert ok.returncode == 0 and json.loads(ok.stdout)["target"] == "/in"
    for request in (
        f"GET http://127.0.0.2:{origin_port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
        f"CONNECT 127.0.0.2:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        reply = await exchange(proxy.host, proxy.port, request.encode())
        assert reply.startswith(b"HTTP/1.1 403") and b"not on the tailnet" in reply
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with stream:
        reply = await _socks_request(stream, "127.0.0.2", origin_port)
    assert reply[2:4] == b"\x05\x02"
    # Without a resolver a name cannot be classified, so it is refused too.
    bare = ProxyServer(dial, dial_udp=None)
    bare_proxy = await nursery.start(bare.serve)
    reply = await exchange(bare_proxy.host, bare_proxy.port, b"CONNECT web.tailnet.test:80 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403")


async def test_max_forwards_for_options_and_trace(
    nursery: trio.Nursery, auth_proxy: LoopbackProxy, credentials: Credentials, origin_port: int
) -> None:
    """RFC 9110 §7.6.2: at Max-Forwards 0 we answer as the final recipient; otherwise we decrement it."""
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    auth = f"Proxy-Authorization: Basic {token}\r\n"
    seen: list[bytes] = []
    port = await start_raw_origin(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seen)
    trace = await exchange(
        auth_proxy.host,
        auth_proxy.port,
        f"TRACE http://127.0.0.1:{port}/t HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n{auth}X-Mine: 1\r\n\r\n".encode(),
    )
    head, _, body = trace.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: message/http" in head.lower()
    assert body.startswith(b"TRACE http://127.0.0.1:") and b"x-mine: 1" in body.lower()
    assert b"proxy-authorization" not in body.lower() and token.encode() not in body
    options = await exchange(
        auth_proxy.host, auth_proxy.port,
        f"OPTIONS http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n{auth}\r\n".encode(),
    )
    assert options.startswith(b"HTTP/1.1 200") and b"allow: " in options.lower()
    assert seen == []
    forwarded = await curl("-x", auth_proxy.http_url, "-X", "OPTIONS", "-H", "Max-Forwards: 3",
                           f"http://127.0.0.1:{origin_port}/o")
    assert forwarded.returncode == 0, forwarded.stderr
    assert echoed_headers(forwarded.stdout)["max-forwards"] == "2"
    # Other methods carry Max-Forwards unchanged (it only applies to OPTIONS and TRACE).
    get = await curl("-x", auth_proxy.http_url, "-H", "Max-Forwards: 0", f"http://127.0.0.1:{origin_port}/g")
    assert echoed_headers(get.stdout)["max-forwards"] == "0"


async def test_connection_limit(nursery: trio.Nursery) -> None:
    server = ProxyServer(max_connections=1, handshake_timeout=600)
    held, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, served)
    await trio.testing.wait_all_tasks_blocked()
    extra, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, served)
    with trio.fail_after(5):
        assert await extra.receive_some(10) == b""
    assert server.stats["connection_limit"] == 1
    await held.aclose()
    await trio.testing.wait_all_tasks_blocked()
    again, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, served)
    await again.send_all(b"\x05\x01\x02")  # served again: a real SOCKS5 answer (no acceptable method)
    with trio.fail_after(5):
        assert await again.receive_some(10) == b"\x05\xff"


async def test_connect_200_has_no_framing_then_raw_bytes(nursery: trio.Nursery, proxy: LoopbackProxy) -> None:
    """RFC 9110 §9.3.6: no Content-Length / Transfer-Encoding in a 2xx to CONNECT; bytes after it are the tunnel."""
    seen: list[bytes] = []
    port = await start_raw_origin(nursery, b"raw reply", seen)
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with stream:
        # Tunnel bytes sent right behind the request (before the 200) must not be lost.
        await stream.send_all(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\nearly\r\n\r\n".encode())
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
    assert data == b"HTTP/1.1 200 Connection established\r\n\r\nraw reply"
    assert seen == [b"early\r\n\r\n"]
