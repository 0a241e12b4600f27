"""The trio DNS server on 127.0.0.1: UDP, TCP, forwarding with split DNS, TCP retry and failures."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from dnslib import RCODE, DNSRecord
from dnstest_helpers import make_config

from tsnet.dns import wire
from tsnet.dns.config import DNSConfig
from tsnet.dns.core import MagicDNS
from tsnet.dns.server import DNSServer, UpstreamForwarder, parse_nameserver


async def udp_ask(port: int, query: bytes) -> bytes:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(query)
        with trio.fail_after(5):
            return await sock.recv(65535)


async def tcp_ask(port: int, *queries: bytes) -> list[bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"".join(wire.frame(q) for q in queries))
        decoder = wire.TCPFrameDecoder()
        replies: list[bytes] = []
        with trio.fail_after(5):
            while len(replies) < len(queries):
                data = await stream.receive_some(65535)
                assert data, "server closed early"
                replies += decoder.feed(data)
        return replies


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[tuple[int, MagicDNS]]:
    """A second MagicDNS acting as the corp nameserver (authoritative for corp.example)."""
    big = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(60)]  # > 512 bytes of A records
    config = DNSConfig.build(base_domain="corp.example", hosts={"wiki": ["10.1.2.3"], "big": big})
    magic = MagicDNS(config)
    host, port = await nursery.start(DNSServer(magic).serve)
    yield port, magic


@pytest.fixture
async def server(nursery: trio.Nursery, upstream: tuple[int, MagicDNS]) -> AsyncIterator[tuple[int, MagicDNS]]:
    up_port = upstream[0]
    magic = MagicDNS(make_config(routes={"corp.example": [f"127.0.0.1:{up_port}"]}, default_resolvers=[]))
    _host, port = await nursery.start(DNSServer(magic, UpstreamForwarder(timeout=2)).serve)
    yield port, magic


async def test_udp_local_answer_and_nxdomain(server: tuple[int, MagicDNS]) -> None:
    port, _ = server
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("alpha.tailnet.test").pack()))
    assert [str(rr.rdata) for rr in reply.rr] == ["100.64.0.1"]
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("zz.tailnet.test").pack()))
    assert reply.header.rcode == RCODE.NXDOMAIN


async def test_dnslib_client_over_udp_and_tcp(server: tuple[int, MagicDNS]) -> None:
    port, _ = server
    for tcp in (False, True):
        q = DNSRecord.question("gamma", "AAAA")
        raw = await trio.to_thread.run_sync(lambda: q.send("127.0.0.1", port, tcp=tcp, timeout=5))
        assert [str(rr.rdata) for rr in DNSRecord.parse(raw).rr] == ["fd7a:115c:a1e0::3"]


async def test_tcp_pipelined_queries(server: tuple[int, MagicDNS]) -> None:
    port, _ = server
    q1, q2 = DNSRecord.question("alpha"), DNSRecord.question("beta")
    replies = [DNSRecord.parse(r) for r in await tcp_ask(port, q1.pack(), q2.pack())]
    by_id = {r.header.id: [str(rr.rdata) for rr in r.rr] for r in replies}
    assert by_id == {q1.header.id: ["100.64.0.1"], q2.header.id: ["100.64.0.2"]}


async def test_garbage_over_udp_gets_formerr_and_server_survives(server: tuple[int, MagicDNS]) -> None:
    port, magic = server
    reply = await udp_ask(port, b"\xab\xcd\x01\x00garbage")
    assert reply[:2] == b"\xab\xcd" and reply[3] & 0xF == RCODE.FORMERR
    assert DNSRecord.parse(await udp_ask(port, DNSRecord.question("alpha").pack())).rr


async def test_tcp_zero_length_frame_closes_connection(server: tuple[int, MagicDNS]) -> None:
    port, magic = server
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x00\x00")
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
    assert magic.stats["tcp_bad_framing"] == 1


async def test_split_dns_forwarding(server: tuple[int, MagicDNS], upstream: tuple[int, MagicDNS]) -> None:
    port, _ = server
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("wiki.corp.example").pack()))
    assert [str(rr.rdata) for rr in reply.rr] == ["10.1.2.3"]
    assert upstream[1].stats["answered"] == 1
    # The upstream's NXDOMAIN comes back unchanged.
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("nope.corp.example").pack()))
    assert reply.header.rcode == RCODE.NXDOMAIN
    # No default resolvers: anything else is SERVFAIL.
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("example.com").pack()))
    assert reply.header.rcode == RCODE.SERVFAIL


async def test_forwarder_retries_truncated_over_tcp(server: tuple[int, MagicDNS]) -> None:
    port, _ = server
    # Our client over TCP: the upstream's UDP answer is truncated, the forwarder retries over TCP.
    (raw,) = await tcp_ask(port, DNSRecord.question("big.corp.example").pack())
    reply = DNSRecord.parse(raw)
    assert reply.header.tc == 0 and len(reply.rr) == 60
    # Our client over UDP without EDNS: the full answer is cut to 512 bytes with TC set.
    raw = await udp_ask(port, DNSRecord.question("big.corp.example").pack())
    assert len(raw) <= 512 and DNSRecord.parse(raw).header.tc == 1


async def test_dead_nameserver_gives_servfail(nursery: trio.Nursery) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    magic = MagicDNS(make_config(default_resolvers=["https://dns.invalid/dns-query", f"127.0.0.1:{dead_port}"]))
    _host, port = await nursery.start(DNSServer(magic, UpstreamForwarder(timeout=2)).serve)
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("example.com").pack()))
    assert reply.header.rcode == RCODE.SERVFAIL


async def test_failing_forwarder_is_contained(nursery: trio.Nursery) -> None:
    async def broken(_forward: object) -> bytes:
        raise RuntimeError("boom")

    magic = MagicDNS(make_config())
    _host, port = await nursery.start(DNSServer(magic, broken).serve)
    reply = DNSRecord.parse(await udp_ask(port, DNSRecord.question("example.com").pack()))
    assert reply.header.rcode == RCODE.SERVFAIL and magic.stats["forward_error"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", ("1.2.3.4", 53)),
        ("1.2.3.4:5353", ("1.2.3.4", 5353)),
        ("[::1]:54", ("::1", 54)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("https://dns.example/dns-query", None),
        ("1.2.3.4:0", None),
        ("host:53", None),
        ("[::1]x", None),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_nameserver(text) == expected


class ChannelSocket:
    """A socket-like object over memory channels, standing in for the netstack's UDP endpoint."""

    def __init__(self) -> None:
        self.inbound_send, self.inbound = trio.open_memory_channel[tuple[bytes, object]](10)
        self.outbound, self.outbound_receive = trio.open_memory_channel[tuple[bytes, object]](10)

    async def recvfrom(self, bufsize: int) -> tuple[bytes, object]:
        return await self.inbound.receive()

    async def sendto(self, data: bytes, address: object) -> int:
        await self.outbound.send((data, address))
        return len(data)


async def test_serves_socket_like_objects_and_memory_streams(nursery: trio.Nursery) -> None:
    magic = MagicDNS(make_config())
    server = DNSServer(magic)
    fake = ChannelSocket()
    nursery.start_soon(server.serve_udp, fake)
    query = DNSRecord.question("alpha.tailnet.test")
    peer = ("100.64.0.7", 40000)
    await fake.inbound_send.send((query.pack(), peer))
    with trio.fail_after(5):
        reply, address = await fake.outbound_receive.receive()
    assert address == peer and [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["100.64.0.1"]

    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    await client.send_all(wire.frame(DNSRecord.question("beta").pack()))
    decoder = wire.TCPFrameDecoder()
    replies: list[bytes] = []
    with trio.fail_after(5):
        while not replies:
            replies = decoder.feed(await client.receive_some(65535))
    assert [str(rr.rdata) for rr in DNSRecord.parse(replies[0]).rr] == ["100.64.0.2"]
    await client.send_eof()
    with trio.fail_after(5):
        assert await client.receive_some(10) == b""


async def test_tcp_idle_connections_are_closed(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    server = DNSServer(MagicDNS(make_config()), tcp_idle_timeout=30)
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    start = trio.current_time()
    with trio.fail_after(120):
        assert await client.receive_some(10) == b""
    assert trio.current_time() - start >= 30


async def test_forwarder_ignores_mismatched_replies(nursery: trio.Nursery) -> None:
    """A stray datagram with the wrong ID (or a query, not a reply) is skipped, not relayed."""
    upstream = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await upstream.bind(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    async def fake_nameserver() -> None:
        with upstream:
            data, source = await upstream.recvfrom(65535)
            query = DNSRecord.parse(data)
            wrong = query.reply()
            wrong.header.id ^= 0xFFFF
            await upstream.sendto(wrong.pack(), source)
            await upstream.sendto(data, source)  # the query echoed back: QR clear
            right = query.reply()
            right.add_answer(*DNSRecord.question("x").replyZone(f"{query.q.qname} 60 A 192.0.2.7").rr)
            await upstream.sendto(right.pack(), source)

    nursery.start_soon(fake_nameserver)
    magic = MagicDNS(make_config(default_resolvers=[f"127.0.0.1:{port}"]))
    query = DNSRecord.question("example.com")
    result = magic.handle_query(query.pack())
    with trio.fail_after(5):
        reply = DNSRecord.parse(await UpstreamForwarder(timeout=5)(result))  # type: ignore[arg-type]
    assert reply.header.id == query.header.id and [str(rr.rdata) for rr in reply.rr] == ["192.0.2.7"]
