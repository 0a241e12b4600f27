"""Audit of MagicDNS against RFC 1035/6891/7766/5452 and tailscaled: each test pins one rule.

Covered here: RD/RA flags; EDNS0 (OPT in every response to an EDNS query, BADVERS, the DO bit, OPT
kept in truncated forwarded replies); upstream replies validated by ID *and* question; never forwarding
to ourselves (100.100.100.100 in a resolver list); control entries we cannot use (ExtraRecords of other
types, bad node names, bad route keys) skipped and listed, not fatal; PTR for the 4-to-6 range; the TCP
server's bounds (connections, pipelined queries, forwarded queries in flight).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import trio
import trio.testing
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from dnstest_helpers import make_config

from tsnet.dns import wire
from tsnet.dns.config import DNSConfig
from tsnet.dns.core import Answer, Forward, MagicDNS
from tsnet.dns.server import DNSServer, UpstreamForwarder


def answer(magic: MagicDNS, query: DNSRecord, transport: str = "udp") -> DNSRecord:
    result = magic.handle_query(query.pack(), transport)  # type: ignore[arg-type]
    assert isinstance(result, Answer), result
    return DNSRecord.parse(result.response)


def opt_of(reply: DNSRecord) -> tuple[int, int, int]:
    """(udp size, extended rcode, flags) of the reply's single OPT record."""
    (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    return opt.rclass, (opt.ttl >> 24) & 0xFF, opt.ttl & 0xFFFF


def test_ra_set_only_when_rd_was_asked(magic: MagicDNS) -> None:
    recursive = answer(magic, DNSRecord.question("alpha"))
    assert recursive.header.rd == 1 and recursive.header.ra == 1
    plain = DNSRecord.question("alpha")
    plain.header.rd = 0
    reply = answer(magic, plain)
    assert reply.header.rd == 0 and reply.header.ra == 0 and reply.rr


def test_every_reply_to_an_edns_query_carries_opt(magic: MagicDNS) -> None:
    """RFC 6891 §7: NOTIMP, SERVFAIL and FORMERR replies to a parsed EDNS query also carry OPT and the question."""
    cases = [
        (DNSRecord.question("alpha.tailnet.test", "NS"), RCODE.NOTIMP, magic),
        (DNSRecord.question("version.bind", "TXT", "CH"), RCODE.NOTIMP, magic),
        (DNSRecord.question("example.com"), RCODE.SERVFAIL, MagicDNS(make_config(default_resolvers=[]))),
    ]
    for query, rcode, resolver in cases:
        query.add_ar(EDNS0(udp_len=1232))
        reply = answer(resolver, query)
        assert reply.header.rcode == rcode and reply.questions == query.questions
        assert opt_of(reply)[0] == wire.MAX_UDP_RESPONSE
    # A label containing a dot cannot be a hostname: FORMERR, still with the question and OPT.
    raw = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 1) + b"\x03a.b\x00\x00\x01\x00\x01"
    raw += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    result = magic.handle_query(raw)
    assert isinstance(result, Answer) and result.rcode == RCODE.FORMERR
    assert result.response.endswith(b"\x00" + struct.pack("!HH", 41, wire.MAX_UDP_RESPONSE) + b"\x00" * 6)
    # Forward.servfail echoes question and OPT too.
    query = DNSRecord.question("example.com")
    query.add_ar(EDNS0(udp_len=1232))
    forward = magic.handle_query(query.pack())
    assert isinstance(forward, Forward)
    reply = DNSRecord.parse(forward.servfail())
    assert reply.header.rcode == RCODE.SERVFAIL and reply.questions == query.questions and opt_of(reply)


def test_unknown_edns_version_is_badvers(magic: MagicDNS) -> None:
    """RFC 6891 §6.1.3: a version we do not implement gets BADVERS (extended RCODE 16) and our version 0."""
    query = DNSRecord.question("alpha")
    query.add_ar(EDNS0(udp_len=1232, version=1))
    reply = answer(magic, query)
    assert reply.header.rcode == 0 and reply.rr == []
    size, extended, _flags = opt_of(reply)
    assert extended == 1 and size == wire.MAX_UDP_RESPONSE  # (1 << 4) | 0 == 16, BADVERS
    (opt,) = reply.ar
    assert (opt.ttl >> 16) & 0xFF == 0  # our version
    assert magic.stats["badvers"] == 1
    # Version 0 keeps working.
    ok = DNSRecord.question("alpha")
    ok.add_ar(EDNS0(udp_len=1232))
    assert [str(rr.rdata) for rr in answer(magic, ok).rr] == ["100.64.0.1"]


def test_do_bit_is_copied_into_our_opt(magic: MagicDNS) -> None:
    """RFC 3225 §3: the DO bit of the query is copied into the response."""
    query = DNSRecord.question("alpha")
    query.add_ar(EDNS0(udp_len=1232, flags="do"))
    assert opt_of(answer(magic, query))[2] == wire.EDNS_FLAG_DO
    plain = DNSRecord.question("alpha")
    plain.add_ar(EDNS0(udp_len=1232))
    assert opt_of(answer(magic, plain))[2] == 0


def test_truncated_forwarded_reply_keeps_its_opt() -> None:
    """RFC 6891 §7: the minimal truncated response is header, question and OPT."""
    query = DNSRecord.question("example.com", "TXT")
    query.add_ar(EDNS0(udp_len=600))
    reply = query.reply()
    for i in range(20):
        reply.add_answer(*DNSRecord.question("x").replyZone(f'example.com 60 TXT "{"y" * 60}{i}"').rr)
    reply.add_ar(EDNS0(udp_len=1232))
    packed = reply.pack()
    cut = DNSRecord.parse(Forward(("127.0.0.1",), query.pack(), 600).finish(packed))
    assert cut.header.tc == 1 and cut.rr == [] and cut.questions == query.questions
    assert [rr.rtype for rr in cut.ar] == [QTYPE.OPT] and cut.ar[0].rclass == 1232
    # No OPT upstream: none invented.
    plain = DNSRecord.parse(wire.truncate_to(DNSRecord.parse(packed).pack()[: len(packed) - 11], 512))
    assert plain.header.tc == 1 and plain.ar == []


def test_reply_must_answer_the_same_question() -> None:
    """RFC 5452 §9.1: an upstream reply is accepted only if ID, QR and the question all match."""
    query = DNSRecord.question("example.com")
    right = query.reply()
    assert wire.reply_matches(query.pack(), right.pack())
    other = DNSRecord.question("evil.example", "A")
    other.header.id = query.header.id
    assert not wire.reply_matches(query.pack(), other.reply().pack())
    aaaa = DNSRecord.question("example.com", "AAAA")
    aaaa.header.id = query.header.id
    assert not wire.reply_matches(query.pack(), aaaa.reply().pack())
    no_question = bytearray(right.pack()[:12])
    no_question[4:6] = b"\x00\x00"
    assert not wire.reply_matches(query.pack(), bytes(no_question))
    # Case does not matter (0x20 upstreams may echo either way).
    mixed = DNSRecord.question("ExAmPlE.CoM")
    mixed.header.id = query.header.id
    assert wire.reply_matches(query.pack(), mixed.reply().pack())


async def test_forwarder_skips_a_reply_to_another_question(nursery: trio.Nursery) -> None:
    upstream = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await upstream.bind(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    async def fake_nameserver() -> None:
        with upstream:
            data, source = await upstream.recvfrom(65535)
            query = DNSRecord.parse(data)
            spoof = DNSRecord.question("other.example")
            spoof.header.id = query.header.id
            forged = spoof.reply()
            forged.add_answer(*DNSRecord.question("x").replyZone("other.example 60 A 192.0.2.66").rr)
            await upstream.sendto(forged.pack(), source)
            right = query.reply()
            right.add_answer(*DNSRecord.question("x").replyZone(f"{query.q.qname} 60 A 192.0.2.7").rr)
            await upstream.sendto(right.pack(), source)

    nursery.start_soon(fake_nameserver)
    magic = MagicDNS(make_config(default_resolvers=[f"127.0.0.1:{port}"]))
    result = magic.handle_query(DNSRecord.question("example.com").pack())
    assert isinstance(result, Forward)
    with trio.fail_after(5):
        reply = DNSRecord.parse(await UpstreamForwarder(timeout=5)(result))
    assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.7"]


def test_unservable_extra_records_are_skipped_like_tailscaled() -> None:
    dns_json = {
        "Routes": {"tn.test.": []},
        "ExtraRecords": [
            {"Name": "alias.tn.test", "Type": "CNAME", "Value": "alpha.tn.test"},
            {"Name": "txt.tn.test", "Type": "TXT", "Value": "hello"},
            {"Name": "bad.tn.test", "Type": "A", "Value": "not-an-ip"},
            {"Name": "svc.tn.test", "Type": "A", "Value": "100.64.0.50"},
        ],
    }
    config = DNSConfig.from_control(dns_json, {"alpha.tn.test.": ["100.64.0.1/32"]})
    magic = MagicDNS(config)
    assert magic.lookup("svc.tn.test").addresses == (ipaddress.ip_address("100.64.0.50"),)
    assert magic.lookup("alpha").status == "found"
    assert magic.lookup("alias.tn.test").status == "nxdomain"


def test_ptr_for_4to6_addresses_names_the_ipv4_node(magic: MagicDNS) -> None:
    """fd7a:115c:a1e0:ab12:4843:cd96:62xx:xxxx carries 100.x.x.x; tailscaled answers its PTR with that node."""
    mapped = ipaddress.ip_address("fd7a:115c:a1e0:ab12:4843:cd96:6240:2").reverse_pointer  # 100.64.0.2
    reply = answer(magic, DNSRecord.question(mapped, "PTR"))
    assert [str(rr.rdata) for rr in reply.rr] == ["beta.tailnet.test."]
    unknown = ipaddress.ip_address("fd7a:115c:a1e0:ab12:4843:cd96:6240:99").reverse_pointer
    assert answer(magic, DNSRecord.question(unknown, "PTR")).header.rcode == RCODE.NXDOMAIN


async def _read_replies(stream: trio.abc.Stream, count: int) -> list[bytes]:
    decoder = wire.TCPFrameDecoder()
    replies: list[bytes] = []
    while len(replies) < count:
        data = await stream.receive_some(65535)
        assert data
        replies += decoder.feed(data)
    return replies


async def test_tcp_pipelining_is_bounded_per_connection(nursery: trio.Nursery) -> None:
    """A client pipelining many forwarded queries gets at most max_tcp_pipelined in progress at once."""
    release = trio.Event()
    in_progress = 0
    peak = 0

    async def slow_forwarder(forward: Forward) -> bytes:
        nonlocal in_progress, peak
        in_progress += 1
        peak = max(peak, in_progress)
        await release.wait()
        in_progress -= 1
        return forward.servfail()

    server = DNSServer(MagicDNS(make_config()), slow_forwarder, max_tcp_pipelined=4)
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    queries = [DNSRecord.question(f"h{i}.example.com") for i in range(20)]
    await client.send_all(b"".join(wire.frame(q.pack()) for q in queries))
    await trio.testing.wait_all_tasks_blocked()
    assert peak == 4
    release.set()
    with trio.fail_after(5):
        replies = [DNSRecord.parse(r) for r in await _read_replies(client, 20)]
    assert sorted(r.header.id for r in replies) == sorted(q.header.id for q in queries)
    assert peak == 4


async def test_tcp_forwards_share_the_inflight_limit(nursery: trio.Nursery) -> None:
    """Forwarded TCP queries count against max_inflight_forwards; the excess gets SERVFAIL at once."""
    release = trio.Event()

    async def slow_forwarder(forward: Forward) -> bytes:
        await release.wait()
        return forward.servfail()

    magic = MagicDNS(make_config())
    server = DNSServer(magic, slow_forwarder, max_inflight_forwards=2, max_tcp_pipelined=8)
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    queries = [DNSRecord.question(f"h{i}.example.com") for i in range(3)]
    await client.send_all(b"".join(wire.frame(q.pack()) for q in queries))
    with trio.fail_after(5):
        (first,) = await _read_replies(client, 1)
    assert DNSRecord.parse(first).header.id == queries[2].header.id
    assert DNSRecord.parse(first).header.rcode == RCODE.SERVFAIL and magic.stats["forward_overload"] == 1
    release.set()
    with trio.fail_after(5):
        assert len(await _read_replies(client, 2)) == 2


async def test_tcp_connection_limit(nursery: trio.Nursery) -> None:
    """RFC 7766 §6.2.2: connections beyond max_tcp_connections are closed; freed slots are reused."""
    magic = MagicDNS(make_config())
    server = DNSServer(magic, max_tcp_connections=2)
    held = []
    for _ in range(2):
        client, served = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_tcp_stream, served)
        held.append(client)
    await trio.testing.wait_all_tasks_blocked()
    extra, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    with trio.fail_after(5):
        assert await extra.receive_some(10) == b""
    assert magic.stats["tcp_connection_refused"] == 1
    await held[0].send_eof()
    with trio.fail_after(5):
        assert await held[0].receive_some(10) == b""
    again, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    await again.send_all(wire.frame(DNSRecord.question("alpha").pack()))
    with trio.fail_after(5):
        (raw,) = await _read_replies(again, 1)
    assert [str(rr.rdata) for rr in DNSRecord.parse(raw).rr] == ["100.64.0.1"]


async def test_tcp_queries_sent_before_eof_are_still_answered(nursery: trio.Nursery) -> None:
    """RFC 7766 §6.2.4: a client may half-close after its queries; the answers still come."""
    server = DNSServer(MagicDNS(make_config()))
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    queries = [DNSRecord.question("alpha"), DNSRecord.question("beta")]
    await client.send_all(b"".join(wire.frame(q.pack()) for q in queries))
    await client.send_eof()
    with trio.fail_after(5):
        replies = await _read_replies(client, 2)
        assert await client.receive_some(10) == b""
    assert len(replies) == 2


def test_magicdns_never_forwards_to_itself() -> None:
    """A resolver list naming 100.100.100.100 (as the OS config often does) must not loop back to us."""
    quad100 = ["100.100.100.100", "100.100.100.100:53", "[fd7a:115c:a1e0::53]:53", "fd7a:115c:a1e0::53"]
    magic = MagicDNS(make_config(default_resolvers=[*quad100, "127.0.0.1:5398"], routes={"corp.example": quad100}))
    query = DNSRecord.question("example.com").pack()
    assert magic.handle_query(query) == Forward(("127.0.0.1:5398",), query, 512)
    reply = answer(magic, DNSRecord.question("wiki.corp.example"))
    assert reply.header.rcode == RCODE.SERVFAIL and magic.stats["servfail_no_upstream"] == 1


def test_unusable_nodes_and_routes_from_control_are_skipped_and_listed() -> None:
    upstream = [{"Addr": "127.0.0.1"}]
    dns_json = {"Routes": {"tn.test.": [], "bad..suffix": upstream, "corp.example": upstream}}
    nodes = {"alpha.tn.test.": ["100.64.0.1/32"], "bad..name.tn.test.": ["100.64.0.2/32"], "beta.tn.test.": ["nope"]}
    config = DNSConfig.from_control(dns_json, nodes)
    magic = MagicDNS(config)
    assert magic.lookup("alpha").addresses == (ipaddress.ip_address("100.64.0.1"),)
    assert magic.lookup("beta.tn.test").status == "nxdomain"
    assert isinstance(magic.handle_query(DNSRecord.question("x.corp.example").pack()), Forward)
    assert len(config.skipped) == 3 and any("bad..suffix" in line for line in config.skipped)


async def test_tcp_trickling_client_is_closed_like_an_idle_one(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Bytes that never complete a query do not keep a connection (and one of its slots) alive."""
    magic = MagicDNS(make_config())
    server = DNSServer(magic, tcp_idle_timeout=30)
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_tcp_stream, served)
    message = wire.frame(DNSRecord.question("alpha").pack())
    start = trio.current_time()
    await client.send_all(message)  # one complete query resets the clock
    with trio.fail_after(5):
        assert len(await _read_replies(client, 1)) == 1

    async def trickle() -> None:
        for byte in message:  # the next query, one byte every 10 s: would take minutes
            try:
                await client.send_all(bytes((byte,)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(10)  # the client's pace in virtual time, not synchronisation

    nursery.start_soon(trickle)
    with trio.fail_after(300):
        assert await client.receive_some(10) == b""
    assert trio.current_time() - start <= 30 + 1
    assert magic.stats["tcp_idle_closed"] == 1
