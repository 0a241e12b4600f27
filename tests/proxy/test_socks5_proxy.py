"""The SOCKS5 proxy on loopback: curl through it, raw refusals, UDP ASSOCIATE with a DNS query."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct

import pytest
import trio
from dnslib import DNSRecord
from proxytest_helpers import closed_port, curl

from tsnet.dns import DNSServer, MagicDNS
from tsnet.proxy import Credentials, LoopbackProxy, ProxyServer
from tsnet.proxy.socks5 import build_udp_datagram, encode_address, parse_udp_datagram


async def receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < n:
            chunk = await stream.receive_some(n - len(data))
            if not chunk:
                break
            data += chunk
    return data


async def read_reply(stream: trio.abc.Stream) -> tuple[int, str, int]:
    head = await receive_exactly(stream, 4)
    assert head[0] == 5, head
    if head[3] == 1:
        addr = socket.inet_ntop(socket.AF_INET, await receive_exactly(stream, 4))
    elif head[3] == 4:
        addr = socket.inet_ntop(socket.AF_INET6, await receive_exactly(stream, 16))
    else:
        addr = (await receive_exactly(stream, (await receive_exactly(stream, 1))[0])).decode()
    (port,) = struct.unpack("!H", await receive_exactly(stream, 2))
    return head[1], addr, port


async def open_socks(proxy: LoopbackProxy, command: int, host: str, port: int) -> tuple[trio.SocketStream, tuple]:
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    await stream.send_all(b"\x05\x01\x00" + bytes((5, command, 0)) + encode_address(host, port))
    assert await receive_exactly(stream, 2) == b"\x05\x00"
    return stream, await read_reply(stream)


async def read_until_close(stream: trio.abc.Stream) -> bytes:
    out = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            out += chunk
    return out


@pytest.mark.parametrize("name", ["web.tailnet.test", "web", "127.0.0.1"])
async def test_curl_socks5_hostname(proxy: LoopbackProxy, origin_port: int, name: str) -> None:
    result = await curl("--socks5-hostname", proxy.address, f"http://{name}:{origin_port}/via-socks")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["target"] == "/via-socks"


async def test_curl_socks5h_url_with_auth(auth_proxy: LoopbackProxy, origin_port: int) -> None:
    url = f"http://web.tailnet.test:{origin_port}/authed"
    result = await curl("-x", auth_proxy.socks5_url, url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["target"] == "/authed"
    wrong = LoopbackProxy(auth_proxy.host, auth_proxy.port, Credentials("alice", "wrong"))
    result = await curl("-x", wrong.socks5_url, url)
    assert result.returncode != 0 and result.stdout == b""
    none = LoopbackProxy(auth_proxy.host, auth_proxy.port, None)
    result = await curl("-x", none.socks5_url, url)
    assert result.returncode != 0 and result.stdout == b""


async def test_connect_relays_both_ways_with_bind_address(proxy: LoopbackProxy, origin_port: int) -> None:
    stream, (code, bind_host, bind_port) = await open_socks(proxy, 1, "web.tailnet.test", origin_port)
    assert code == 0 and bind_host == "127.0.0.1" and bind_port > 0
    async with stream:
        await stream.send_all(b"GET /raw HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        response = await read_until_close(stream)
    assert response.startswith(b"HTTP/1.1 200") and b'"/raw"' in response


@pytest.mark.parametrize(
    ("host", "code"),
    [("nope.tailnet.test", 0x04), ("127.0.0.1", 0x05)],
)
async def test_connect_failures_map_to_reply_codes(proxy: LoopbackProxy, host: str, code: int) -> None:
    stream, (reply, _h, _p) = await open_socks(proxy, 1, host, closed_port())
    async with stream:
        assert reply == code
        assert await read_until_close(stream) == b""


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5b" + b"\x00" * 6),  # SOCKS4
        (b"\x05\x01\x02", b"\x05\xff"),  # only user/pass offered, none configured
        (b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x07\x00\x01" + b"\x00" * 6),
        (b"\x05\x01\x00\x05\x01\x00\x09junk", b"\x05\x00\x05\x08\x00\x01" + b"\x00" * 6),
        (b"\x05\x01\x00\x06\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x01\x00\x01" + b"\x00" * 6),
    ],
)
async def test_clean_refusals(proxy: LoopbackProxy, proxy_server: ProxyServer, data: bytes, expected: bytes) -> None:
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with stream:
        await stream.send_all(data)
        assert await read_until_close(stream) == expected
    assert proxy_server.stats["socks5_rejected"] == 1


async def test_truncated_greeting_then_eof(proxy: LoopbackProxy, proxy_server: ProxyServer) -> None:
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with stream:
        await stream.send_all(b"\x05\x03\x00")
        await stream.send_eof()
        assert await read_until_close(stream) == b""
    # The proxy still serves the next client.
    stream, (code, _h, _p) = await open_socks(proxy, 1, "127.0.0.1", closed_port())
    await stream.aclose()
    assert code == 0x05


async def test_udp_associate_dns_query(nursery: trio.Nursery, proxy: LoopbackProxy, magic: MagicDNS) -> None:
    _host, dns_port = await nursery.start(DNSServer(magic).serve)
    control, (code, relay_host, relay_port) = await open_socks(proxy, 3, "0.0.0.0", 0)
    assert code == 0 and relay_host == "127.0.0.1"
    async with control:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            await udp.bind(("127.0.0.1", 0))
            for target in ("127.0.0.1", "dns.tailnet.test"):  # by address and by tailnet name
                query = DNSRecord.question("web.tailnet.test")
                await udp.sendto(build_udp_datagram(target, dns_port, query.pack()), (relay_host, relay_port))
                with trio.fail_after(5):
                    data, source = await udp.recvfrom(65535)
                assert source == (relay_host, relay_port)
                datagram = parse_udp_datagram(data)
                assert (datagram.host, datagram.port) == (target, dns_port)
                reply = DNSRecord.parse(datagram.payload)
                assert reply.header.id == query.header.id
                assert [str(rr.rdata) for rr in reply.rr] == ["127.0.0.1"]
            # Datagrams from another source address are ignored; fragments are dropped.
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                await stranger.bind(("127.0.0.1", 0))
                await stranger.sendto(build_udp_datagram("127.0.0.1", dns_port, b"x" * 20), (relay_host, relay_port))
            fragment = b"\x00\x00\x01" + build_udp_datagram("127.0.0.1", dns_port, b"y")[3:]
            await udp.sendto(fragment, (relay_host, relay_port))
            query = DNSRecord.question("alpha.tailnet.test")  # still works after the junk
            await udp.sendto(build_udp_datagram("127.0.0.1", dns_port, query.pack()), (relay_host, relay_port))
            with trio.fail_after(5):
                data, _ = await udp.recvfrom(65535)
            assert DNSRecord.parse(parse_udp_datagram(data).payload).header.id == query.header.id


async def test_udp_associate_without_udp_dialer_is_refused(nursery: trio.Nursery) -> None:
    server = ProxyServer(dial_udp=None)
    proxy = await nursery.start(server.serve)
    stream, (code, _h, _p) = await open_socks(proxy, 3, "0.0.0.0", 0)
    async with stream:
        assert code == 0x01


def test_loopback_urls() -> None:
    info = LoopbackProxy("127.0.0.1", 1080, Credentials("tsnet", "p@ss/word"))
    assert info.address == "127.0.0.1:1080"
    assert info.socks5_url == "socks5h://tsnet:p%40ss%2Fword@127.0.0.1:1080"
    assert info.http_url == "http://tsnet:p%40ss%2Fword@127.0.0.1:1080"
    assert LoopbackProxy("::1", 8080, None).http_url == "http://[::1]:8080"
    generated = ProxyServer.generate_credentials()
    assert generated.username == "tsnet" and len(generated.password) >= 24


async def test_silent_clients_are_dropped_after_the_handshake_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    server = ProxyServer(handshake_timeout=10)
    proxy = await nursery.start(server.serve)
    for opening in (b"", b"\x05\x01"):  # nothing at all, and a greeting cut short
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
        async with stream:
            await stream.send_all(opening)
            start = trio.current_time()
            with trio.fail_after(60):
                assert await stream.receive_some(100) == b""
            assert trio.current_time() - start >= 10
    assert server.stats.get("socks5_handshake_timeout") == 1


async def test_ipv6_loopback_listener(nursery: trio.Nursery, proxy_server: ProxyServer, origin_port: int) -> None:
    proxy = await nursery.start(proxy_server.serve, "::1")
    assert proxy.address.startswith("[::1]:")
    for flag in ("--socks5-hostname", "-x"):
        target = proxy.address if flag != "-x" else proxy.http_url
        result = await curl(flag, target, f"http://web.tailnet.test:{origin_port}/v6")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["target"] == "/v6"


async def test_half_close_and_bulk_data_survive_the_relay(nursery: trio.Nursery, proxy: LoopbackProxy) -> None:
    """The origin reads until EOF, then answers with a digest: needs EOF propagation and no lost bytes."""

    async def digest_server(stream: trio.SocketStream) -> None:
        async with stream:
            hasher, size = hashlib.sha256(), 0
            while data := await stream.receive_some(65536):
                hasher.update(data)
                size += len(data)
            await stream.send_all(f"{size} {hasher.hexdigest()}".encode())

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, digest_server, listeners)
    port = listeners[0].socket.getsockname()[1]
    payload = os.urandom(3 * 1024 * 1024 + 17)
    stream, (code, _h, _p) = await open_socks(proxy, 1, "web.tailnet.test", port)
    assert code == 0
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        answer = await read_until_close(stream)
    assert answer.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
