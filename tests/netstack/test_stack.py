"""The sans-IO Stack: ICMP, UDP, RST for closed ports, fragments, IPv6 extension headers, bad input."""

from __future__ import annotations

import errno
import struct

import pytest

from tests.netstack.netutil import (
    A4, A6, ACK, B4, B6, FIN, RST, SYN, csum, echo_request, ipv4, ipv6, l4_ok, parse, parse_tcp, pseudo, raw, tcp, udp,
)
from tsnet.netstack.stack import Stack


def make(now: float = 0.0, **kw) -> Stack:
    return Stack([A4, A6], now=now, **kw)


def out(stack: Stack) -> list:
    return [parse(p) for p in stack.packets_to_send()]


@pytest.mark.parametrize("src,dst", [(B4, A4), (B6, A6)])
def test_echo_reply(src: str, dst: str) -> None:
    s = make()
    s.receive_packet(echo_request(src, dst, 0x1234, 7, b"hello ping"), 1.0)
    [r] = out(s)
    assert (r.src, r.dst) == (dst, src)
    assert l4_ok(r)
    kind, code, _ck, ident, seq = struct.unpack_from("!BBHHH", r.payload)
    assert (kind, code, ident, seq) == ((0, 0, 0x1234, 7) if r.version == 4 else (129, 0, 0x1234, 7))
    assert r.payload[8:] == b"hello ping"
    assert s.counters.icmp_echo_replies == 1


def test_echo_with_bad_checksum_ignored() -> None:
    s = make()
    pkt = bytearray(echo_request(B6, A6, 1, 1, b"x"))
    pkt[-1] ^= 0xFF
    s.receive_packet(bytes(pkt), 0.0)
    assert s.packets_to_send() == []
    assert s.counters.bad_checksum == 1


def test_echo_rate_limited() -> None:
    s = make(icmp_rate=1000.0, icmp_burst=50)
    s.receive_packets([echo_request(B4, A4, 1, i) for i in range(200)], 0.0)
    assert len(s.packets_to_send()) == 50
    assert s.counters.icmp_rate_limited == 150
    s.receive_packets([echo_request(B4, A4, 1, i) for i in range(20)], 0.010)  # 10 ms refills 10 tokens
    assert len(s.packets_to_send()) == 10


def test_not_for_us_dropped() -> None:
    s = make()
    s.receive_packets([echo_request(A4, B4, 1, 1), udp(A6, B6, 1, 2, b"x")], 0.0)
    assert s.packets_to_send() == []
    assert s.counters.not_for_us == 2


@pytest.mark.parametrize("src,dst", [(B4, A4), (B6, A6)])
def test_rst_for_closed_tcp_port(src: str, dst: str) -> None:
    s = make()
    s.receive_packet(tcp(src, dst, 40000, 80, 1000, 0, SYN), 0.0)
    [r] = out(s)
    seg = parse_tcp(r)
    assert (r.src, r.dst, seg.sport, seg.dport) == (dst, src, 80, 40000)
    assert seg.flags == RST | ACK and seg.seq == 0 and seg.ack == 1001
    # A segment with ACK gets a RST whose seq is that ack.
    s.receive_packet(tcp(src, dst, 40000, 80, 5000, 777, ACK | FIN, b"data"), 0.0)
    seg = parse_tcp(out(s)[0])
    assert seg.flags == RST and seg.seq == 777
    # Never answer a RST.
    s.receive_packet(tcp(src, dst, 40000, 80, 5000, 777, RST), 0.0)
    assert s.packets_to_send() == []
    assert s.counters.tcp_rst_sent == 2


def test_tcp_bad_checksum_counted() -> None:
    s = make()
    pkt = bytearray(tcp(B4, A4, 40000, 80, 1000, 0, SYN))
    pkt[-1] ^= 1  # the urgent pointer: only the checksum notices
    s.receive_packet(bytes(pkt), 0.0)
    assert s.packets_to_send() == [] and s.counters.bad_checksum == 1


@pytest.mark.parametrize("src,dst", [(B4, A4), (B6, A6)])
def test_udp_port_unreachable(src: str, dst: str) -> None:
    s = make()
    pkt = udp(src, dst, 5555, 9999, b"anyone?")
    s.receive_packet(pkt, 0.0)
    [r] = out(s)
    assert (r.src, r.dst) == (dst, src)
    assert l4_ok(r)
    if r.version == 4:
        assert (r.proto, r.payload[0], r.payload[1]) == (1, 3, 3)
    else:
        assert (r.proto, r.payload[0], r.payload[1]) == (58, 1, 4)
    assert r.payload[8:] == pkt  # the whole offending packet is quoted
    assert s.counters.udp_no_port == 1


def test_udp_receive_send_and_connected_mode() -> None:
    s = make()
    ep = s.udp_bind(port=5353)
    s.receive_packets([udp(B4, A4, 1111, 5353, b"one"), udp(B6, A6, 2222, 5353, b"two")], 0.0)
    assert list(ep.queue) == [(b"one", (raw(B4), 1111)), (b"two", (raw(B6), 2222))]
    assert s.take_changed() == [ep] and not ep.app_changed
    s.udp_sendto(ep, b"reply", raw(B4), 1111, 0.0)
    [r] = out(s)
    assert (r.src, r.dst, r.proto) == (A4, B4, 17) and l4_ok(r)
    assert struct.unpack_from("!HHH", r.payload) == (5353, 1111, 13) and r.payload[8:] == b"reply"
    ep.queue.clear()
    s.udp_connect(ep, B4, 1111)
    s.receive_packets([udp(B4, A4, 1112, 5353, b"stranger"), udp(B4, A4, 1111, 5353, b"peer")], 0.0)
    assert [d for d, _ in ep.queue] == [b"peer"]
    assert s.counters.udp_wrong_peer == 1


def test_udp_checksum_rules() -> None:
    s = make()
    ep = s.udp_bind(port=53)
    s.receive_packet(udp(B4, A4, 1, 53, b"v4 no checksum", zero_checksum=True), 0.0)
    s.receive_packet(udp(B6, A6, 1, 53, b"v6 zero is invalid", zero_checksum=True), 0.0)
    bad = bytearray(udp(B4, A4, 1, 53, b"corrupt"))
    bad[-1] ^= 0x40
    s.receive_packet(bytes(bad), 0.0)
    assert [d for d, _ in ep.queue] == [b"v4 no checksum"]
    assert s.counters.bad_checksum == 2
    # A computed checksum of 0 goes out as 0xFFFF: find a payload that sums to that.
    for i in range(70000):
        payload = struct.pack("!I", i)
        seg = struct.pack("!HHHH", 53, 7, 12, 0) + payload
        if csum(pseudo(A4, B4, 17, 12) + seg) == 0:
            break
    else:  # pragma: no cover
        raise AssertionError("no zero-checksum payload found")
    s.udp_sendto(ep, payload, B4, 7, 0.0)
    [r] = out(s)
    assert r.payload[6:8] == b"\xff\xff" and l4_ok(r)


def test_udp_size_limits_and_errors() -> None:
    s = make()
    ep = s.udp_bind()
    assert 49152 <= ep.port <= 65535
    s.udp_sendto(ep, b"x" * 1252, B4, 9, 0.0)
    s.udp_sendto(ep, b"x" * 1232, B6, 9, 0.0)
    assert [len(p) for p in s.packets_to_send()] == [1280, 1280]
    with pytest.raises(OSError) as e4:
        s.udp_sendto(ep, b"x" * 1253, B4, 9, 0.0)
    with pytest.raises(OSError) as e6:
        s.udp_sendto(ep, b"x" * 1233, B6, 9, 0.0)
    assert e4.value.errno == e6.value.errno == errno.EMSGSIZE
    with pytest.raises(OSError) as inuse:
        s.udp_bind(port=ep.port)
    assert inuse.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as notours:
        s.udp_bind("100.64.0.99", 1)
    assert notours.value.errno == errno.EADDRNOTAVAIL
    only_v4 = Stack([A4], now=0.0)
    with pytest.raises(OSError):
        only_v4.udp_sendto(only_v4.udp_bind(), b"x", B6, 9, 0.0)


def test_udp_queue_bounded() -> None:
    s = make(udp_queue_limit=10)
    ep = s.udp_bind(port=7)
    s.receive_packets([udp(B4, A4, 1, 7, b"%d" % i) for i in range(25)], 0.0)
    assert len(ep.queue) == 10 and ep.dropped == 15 and s.counters.udp_queue_full == 15


def test_icmp_port_unreachable_fails_connected_udp() -> None:
    s = make()
    ep = s.udp_bind(port=4000)
    s.udp_connect(ep, B4, 53)
    s.udp_sendto(ep, b"query", B4, 53, 0.0)
    [sent] = s.packets_to_send()
    quote = bytes(sent)[:28]
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quote
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s.take_changed()
    s.receive_packet(ipv4(B4, A4, 1, body), 0.0)
    assert isinstance(ep.error, ConnectionRefusedError)
    assert s.take_changed() == [ep]


def fragments_v4(src: str, dst: str, proto: int, payload: bytes, size: int, ident: int = 99) -> list[bytes]:
    frags = []
    for off in range(0, len(payload), size):
        more = off + size < len(payload)
        frags.append(ipv4(src, dst, proto, payload[off:off + size], ident=ident,
                          frag=(0x2000 if more else 0) | (off // 8)))
    return frags


def fragments_v6(src: str, dst: str, nh: int, payload: bytes, size: int, ident: int = 99) -> list[bytes]:
    frags = []
    for off in range(0, len(payload), size):
        more = off + size < len(payload)
        fh = struct.pack("!BBHI", nh, 0, off | (1 if more else 0), ident)
        frags.append(ipv6(src, dst, 44, fh + payload[off:off + size]))
    return frags


def udp_segment(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    pkt = udp(src, dst, sport, dport, data)
    return pkt[20:] if ":" not in src else pkt[40:]


def test_fragments_in_order_and_out_of_order_v4() -> None:
    s = make()
    ep = s.udp_bind(port=7)
    data = bytes(range(256)) * 12  # 3072 bytes
    frags = fragments_v4(B4, A4, 17, udp_segment(B4, A4, 1, 7, data), 1200)
    s.receive_packets(frags, 0.0)
    s.receive_packets(list(reversed(fragments_v4(B4, A4, 17, udp_segment(B4, A4, 1, 7, data[::-1]), 600, 5))), 0.1)
    assert [d for d, _ in ep.queue] == [data, data[::-1]]
    assert s.counters.reassembled == 2


def test_fragments_v6_with_extension_header_after_fragment_header() -> None:
    s = make()
    ep = s.udp_bind(port=7)
    data = b"v6 fragmented " * 200
    # Destination options (8 bytes, next header UDP) inside the fragmentable part.
    dstopts = struct.pack("!BB6x", 17, 0)
    frags = fragments_v6(B6, A6, 60, dstopts + udp_segment(B6, A6, 1, 7, data), 1000)
    s.receive_packets(frags[1:] + frags[:1], 0.0)
    assert [d for d, _ in ep.queue] == [data]


def test_fragment_overlap_dropped() -> None:
    s = make()
    ep = s.udp_bind(port=7)
    seg = udp_segment(B4, A4, 1, 7, b"o" * 2000)
    frags = fragments_v4(B4, A4, 17, seg, 1000)
    overlapping = ipv4(B4, A4, 17, seg[504:1504], ident=99, frag=0x2000 | (504 // 8))
    s.receive_packets([frags[0], overlapping] + frags[1:], 0.0)
    assert not ep.queue
    assert s._reassembler.dropped >= 1


def test_fragment_timeout_and_timer() -> None:
    s = make(reassembly_timeout=30.0)
    ep = s.udp_bind(port=7)
    frags = fragments_v4(B4, A4, 17, udp_segment(B4, A4, 1, 7, b"t" * 2000), 1000)
    s.receive_packet(frags[0], 10.0)
    assert s.get_timer() == 40.0
    s.handle_timer(40.0)
    assert s.get_timer() is None
    s.receive_packets(frags[1:], 41.0)  # the first half is gone: no datagram
    assert not ep.queue


def test_fragment_timeout_v6_is_60s() -> None:
    s = make()
    ep = s.udp_bind(port=7)
    frags = fragments_v6(B6, A6, 17, udp_segment(B6, A6, 1, 7, b"t" * 2000), 1000)
    s.receive_packet(frags[0], 10.0)
    assert s.get_timer() == 70.0
    s.receive_packets(frags[1:], 69.0)  # still in time
    assert [d for d, _ in ep.queue] == [b"t" * 2000]
    assert s.get_timer() is None


def test_fragment_memory_bounded() -> None:
    s = make(reassembly_memory=64 * 1024)
    for ident in range(500):  # 500 incomplete datagrams of 1000 bytes each
        s.receive_packet(fragments_v4(B4, A4, 17, udp_segment(B4, A4, 1, 7, b"m" * 2000), 1000, ident)[0], 0.0)
    assert s._reassembler.memory <= 64 * 1024
    assert len(s._reassembler) < 100


def test_ipv6_extension_headers_skipped() -> None:
    s = make()
    ep = s.udp_bind(port=7)
    seg = udp_segment(B6, A6, 1, 7, b"behind hop-by-hop and routing")
    routing = struct.pack("!BB6x", 17, 0)
    hbh = struct.pack("!BB6x", 43, 0)
    s.receive_packet(ipv6(B6, A6, 0, hbh + routing + seg), 0.0)
    assert [d for d, _ in ep.queue] == [b"behind hop-by-hop and routing"]
    # An echo request behind a destination-options header is answered too.
    echo = echo_request(B6, A6, 1, 2, b"e")[40:]
    s.receive_packet(ipv6(B6, A6, 60, struct.pack("!BB6x", 58, 0) + echo), 0.0)
    [r] = out(s)
    assert r.payload[0] == 129 and l4_ok(r)


def test_ipv4_options_tolerated() -> None:
    s = make()
    ep = s.udp_bind(port=7)
    seg = udp_segment(B4, A4, 1, 7, b"with options")
    s.receive_packet(ipv4(B4, A4, 17, seg, options=b"\x01\x01\x01\x00"), 0.0)
    assert [d for d, _ in ep.queue] == [b"with options"]


def test_malformed_packets_counted_not_raised() -> None:
    s = make()
    bad_ck = bytearray(echo_request(B4, A4, 1, 1))
    bad_ck[10] ^= 0xFF  # IPv4 header checksum
    samples = [
        b"", b"\x45", b"\x60" + b"\x00" * 10, b"\x10" * 40, bytes(bad_ck),
        ipv4(B4, A4, 17, b"\x00\x01"),  # short UDP header
        ipv4(B4, A4, 6, b"\x00" * 10),  # short TCP header
        ipv6(B6, A6, 0, b"\x11\x05" + b"\x00" * 6),  # hop-by-hop claims 48 bytes
        ipv4(B4, A4, 1, b"\x08\x00"),  # short ICMP
        ipv4(B4, A4, 47, b"gre?"),  # unknown protocol
    ]
    s.receive_packets(samples, 0.0)
    c = s.counters
    assert c.packets_received == len(samples)
    assert c.malformed + c.unknown_protocol + c.bad_checksum == len(samples)
    assert c.internal_errors == 0
    # The only reply: ICMP protocol unreachable for the GRE packet (RFC 1122 §3.2.2.1).
    [r] = out(s)
    assert (r.dst, r.proto, r.payload[:2]) == (B4, 1, bytes((3, 2)))


def test_set_addresses() -> None:
    s = make()
    s.set_addresses(["100.64.0.9"])
    s.receive_packets([echo_request(B4, A4, 1, 1), echo_request(B4, "100.64.0.9", 1, 2)], 0.0)
    [r] = out(s)
    assert r.src == "100.64.0.9"
