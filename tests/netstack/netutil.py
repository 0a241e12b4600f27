"""Packet builders/parsers for netstack tests (independent of tsnet.netstack's own code) and an in-memory link."""

from __future__ import annotations

import ipaddress
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import trio

A4, B4 = "100.64.0.1", "100.64.0.2"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def csum(data: bytes) -> int:
    """RFC 1071 checksum, the slow obvious way."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def raw(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = raw(src), raw(dst)
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0, frag: int = 0x4000,
         ttl: int = 64, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, frag, ttl, proto, 0,
                      raw(src), raw(dst)) + options
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64, raw(src), raw(dst)) + payload


def ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return ipv4(src, dst, proto, payload) if ":" not in src else ipv6(src, dst, proto, payload)


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"",
        window: int = 65535, options: bytes = b"") -> bytes:
    off = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0) + options + data
    ck = csum(pseudo(src, dst, 6, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", ck) + seg[18:]
    return ip(src, dst, 6, seg)


def udp(src: str, dst: str, sport: int, dport: int, data: bytes, *, zero_checksum: bool = False) -> bytes:
    length = 8 + len(data)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    ck = 0 if zero_checksum else (csum(pseudo(src, dst, 17, length) + seg) or 0xFFFF)
    return ip(src, dst, 17, seg[:6] + struct.pack("!H", ck) + seg[8:])


def echo_request(src: str, dst: str, ident: int, seq: int, data: bytes = b"") -> bytes:
    if ":" not in src:
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
        body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        return ipv4(src, dst, 1, body)
    body = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", csum(pseudo(src, dst, 58, len(body)) + body)) + body[4:]
    return ipv6(src, dst, 58, body)


@dataclass
class Parsed:
    version: int
    src: str
    dst: str
    proto: int
    payload: bytes
    df: bool = False
    frag: int = 0


def parse(packet: bytes | bytearray) -> Parsed:
    """Parse an outgoing packet, asserting the IP header (and its checksum) is sane."""
    packet = bytes(packet)
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 15) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        assert total == len(packet)
        assert csum(packet[:ihl]) == 0, "bad IPv4 header checksum"
        frag = struct.unpack_from("!H", packet, 6)[0]
        assert frag & 0x3FFF == 0, "we never send fragments"
        return Parsed(4, str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20])),
                      packet[9], packet[ihl:], bool(frag & 0x4000), frag)
    assert v == 6
    plen = struct.unpack_from("!H", packet, 4)[0]
    assert plen + 40 == len(packet)
    return Parsed(6, str(ipaddress.IPv6Address(packet[8:24])), str(ipaddress.IPv6Address(packet[24:40])),
                  packet[6], packet[40:])


def l4_ok(p: Parsed) -> bool:
    """The transport checksum (TCP/UDP/ICMPv6 with pseudo-header; ICMPv4 without) is right."""
    if p.proto == 1:
        return csum(p.payload) == 0
    return csum(pseudo(p.src, p.dst, p.proto, len(p.payload)) + p.payload) == 0


@dataclass
class TCPSeg:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    data: bytes


def parse_tcp(p: Parsed) -> TCPSeg:
    assert p.proto == 6 and l4_ok(p)
    sport, dport, seq, ack, off, flags, window, _ck, _u = struct.unpack_from("!HHIIBBHHH", p.payload)
    return TCPSeg(sport, dport, seq, ack, flags, window, p.payload[(off >> 4) * 4:])


class Link:
    """Joins two NetStacks in memory: each one's output is delivered to the other by a task,
    in the batches it was produced (no recursion between the two stacks)."""

    def __init__(self) -> None:
        self.a_to_b_send, self.a_to_b_recv = trio.open_memory_channel[list](10_000)
        self.b_to_a_send, self.b_to_a_recv = trio.open_memory_channel[list](10_000)
        self.packets = 0
        self.drop_filter = None  # optional callable(packet) -> True to drop

    def sender(self, chan):
        def send(packets):
            chan.send_nowait(list(packets))
        return send

    async def pump(self, chan, net) -> None:
        async for batch in chan:
            if self.drop_filter is not None:
                batch = [p for p in batch if not self.drop_filter(p)]
            self.packets += len(batch)
            net.deliver(batch)


@asynccontextmanager
async def netstack_pair(tcp_options=None, *, v6: bool = False) -> AsyncIterator[tuple]:
    """Two NetStacks (A: 100.64.0.1 + fd7a:115c:a1e0::1, B: ...2) joined by a Link; yields (a, b, link)."""
    from tsnet.netstack.sockets import NetStack
    from tsnet.netstack.stack import Stack
    from tsnet.netstack.tcp import TCPOptions

    opts = tcp_options or TCPOptions()
    link = Link()
    now = trio.current_time()
    a = NetStack(Stack([A4, A6], now=now, tcp_options=opts), link.sender(link.a_to_b_send))
    b = NetStack(Stack([B4, B6], now=now, tcp_options=opts), link.sender(link.b_to_a_send))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        nursery.start_soon(link.pump, link.a_to_b_recv, b)
        nursery.start_soon(link.pump, link.b_to_a_recv, a)
        try:
            yield a, b, link
        finally:
            nursery.cancel_scope.cancel()
