"""IPv4/IPv6 header parsing and building, and fragment reassembly."""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field

from . import checksum

PROTO_HOPOPTS = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60
PROTO_TSMP = 99

DEFAULT_TTL = 64
# Extension headers we walk over with the generic (next, len-in-8-octet-units) layout.
_V6_SIMPLE_EXT = frozenset({PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS})
_MAX_V6_EXT_HEADERS = 8

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_V6_FRAG = struct.Struct("!BBHI")


class MalformedPacket(ValueError):
    """A packet that cannot be parsed; the stack drops and counts it."""


@dataclass(slots=True)
class ParsedIP:
    """What the stack needs from an IP header.  ``payload`` is a view into the packet."""

    version: int
    src: bytes
    dst: bytes
    proto: int
    payload: memoryview
    # Fragment information (IPv4 always; IPv6 only if a Fragment header was seen).
    frag_id: int = 0
    frag_offset: int = 0
    more_fragments: bool = False
    is_fragment: bool = False
    ttl: int = 64
    #: IPv6: offset in the packet of the Next Header field that names ``proto`` (the pointer of an
    #: ICMPv6 "unrecognized next header" parameter problem); 9 (the protocol field) for IPv4
    next_header_at: int = 6


def parse(packet: bytes | bytearray | memoryview) -> ParsedIP:
    """Parse an IPv4 or IPv6 packet; raise MalformedPacket on anything inconsistent."""
    mv = memoryview(packet)
    if len(mv) < 1:
        raise MalformedPacket("empty packet")
    version = mv[0] >> 4
    if version == 4:
        return _parse_v4(mv)
    if version == 6:
        return _parse_v6(mv)
    raise MalformedPacket(f"IP version {version}")


def _parse_v4(mv: memoryview) -> ParsedIP:
    if len(mv) < 20:
        raise MalformedPacket("short IPv4 header")
    vihl, _tos, total, ident, frag, ttl, proto, _ck, src, dst = _V4.unpack_from(mv)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or ihl > len(mv):
        raise MalformedPacket("bad IHL")
    if total < ihl or total > len(mv):
        raise MalformedPacket("bad IPv4 total length")
    if not checksum.verify(mv[:ihl]):
        raise MalformedPacket("IPv4 header checksum")
    offset = (frag & 0x1FFF) * 8
    more = bool(frag & 0x2000)
    return ParsedIP(4, bytes(src), bytes(dst), proto, mv[ihl:total], ident, offset, more, more or offset != 0, ttl, 9)


def _parse_v6(mv: memoryview) -> ParsedIP:
    if len(mv) < 40:
        raise MalformedPacket("short IPv6 header")
    _vtf, plen, nh, hop, src, dst = _V6.unpack_from(mv)
    if 40 + plen > len(mv):
        raise MalformedPacket("bad IPv6 payload length")
    end = 40 + plen
    pos = 40
    ip = ParsedIP(6, bytes(src), bytes(dst), nh, mv[40:end], ttl=hop)
    for _ in range(_MAX_V6_EXT_HEADERS):
        if nh in _V6_SIMPLE_EXT:
            if nh == PROTO_HOPOPTS and pos != 40:
                # RFC 8200 §4.1: hop-by-hop options may only follow the IPv6 header itself.
                raise MalformedPacket("hop-by-hop header not first")
            if pos + 8 > end:
                raise MalformedPacket("truncated extension header")
            if nh == PROTO_ROUTING and mv[pos + 3]:
                # Segments Left > 0: we are not the final destination (RFC 8200 §4.4; type 0 is
                # deprecated by RFC 5095 and we forward nothing).
                raise MalformedPacket("routing header with segments left")
            nxt = mv[pos]
            ip.next_header_at = pos
            pos += (mv[pos + 1] + 1) * 8
            nh = nxt
        elif nh == PROTO_FRAGMENT:
            if pos + 8 > end:
                raise MalformedPacket("truncated fragment header")
            nxt, _res, off_flags, ident = _V6_FRAG.unpack_from(mv, pos)
            ip.next_header_at = pos
            pos += 8
            nh = nxt
            ip.frag_id = ident
            ip.frag_offset = off_flags & 0xFFF8
            ip.more_fragments = bool(off_flags & 1)
            ip.is_fragment = True
            # The fragmentable part starts here: headers after this one are only
            # meaningful once the datagram is reassembled (see skip_v6_extensions).
            break
        else:
            break
    else:
        raise MalformedPacket("too many extension headers")
    if pos > end:
        raise MalformedPacket("extension header overruns packet")
    ip.proto = nh
    ip.payload = mv[pos:end]
    return ip


def skip_v6_extensions(next_header: int, payload: memoryview) -> tuple[int, memoryview]:
    """Walk the extension headers at the start of a reassembled IPv6 payload.

    Returns the upper-layer protocol and its payload; raises MalformedPacket if
    the headers are truncated, too many, another Fragment or a hop-by-hop header appears, or a
    Routing header still has segments left.
    """
    pos = 0
    end = len(payload)
    for _ in range(_MAX_V6_EXT_HEADERS):
        if next_header in _V6_SIMPLE_EXT:
            if next_header == PROTO_HOPOPTS:
                raise MalformedPacket("hop-by-hop header not first")  # RFC 8200 §4.1: only right after the IPv6 header
            if pos + 8 > end:
                raise MalformedPacket("truncated extension header")
            if next_header == PROTO_ROUTING and payload[pos + 3]:
                raise MalformedPacket("routing header with segments left")  # RFC 8200 §4.4
            nxt = payload[pos]
            pos += (payload[pos + 1] + 1) * 8
            next_header = nxt
        elif next_header == PROTO_FRAGMENT:
            raise MalformedPacket("nested fragment header")
        else:
            break
    else:
        raise MalformedPacket("too many extension headers")
    if pos > end:
        raise MalformedPacket("extension header overruns packet")
    return next_header, payload[pos:]


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int = 0, df: bool = True,
                ttl: int = DEFAULT_TTL) -> bytes:
    """A 20-byte IPv4 header with a correct checksum."""
    total = 20 + payload_len
    hdr = bytearray(_V4.pack(0x45, 0, total, ident & 0xFFFF, 0x4000 if df else 0, ttl, proto, 0, src, dst))
    ck = checksum.checksum(hdr)
    hdr[10] = ck >> 8
    hdr[11] = ck & 0xFF
    return bytes(hdr)


def ipv6_header(src: bytes, dst: bytes, next_header: int, payload_len: int, hop_limit: int = DEFAULT_TTL) -> bytes:
    """A 40-byte IPv6 header (no extension headers)."""
    return _V6.pack(0x60000000, payload_len, next_header, hop_limit, src, dst)


#: Lengths remembered per header template.
_HEADER_CACHE_SIZE = 8


class _CachedHeaders:
    """``header(payload_len)``: a template's ``build`` as immutable bytes, cached per length
    (a bulk flow repeats one or two lengths: full segments and pure ACKs)."""

    __slots__ = ()
    _cache: dict[int, bytes]

    def build(self, payload_len: int) -> bytearray:
        raise NotImplementedError

    def header(self, payload_len: int) -> bytes:
        hdr = self._cache.get(payload_len)
        if hdr is None:
            if len(self._cache) >= _HEADER_CACHE_SIZE:
                self._cache.clear()
            hdr = self._cache[payload_len] = bytes(self.build(payload_len))
        return hdr


class IPv4HeaderTemplate(_CachedHeaders):
    """Prebuilt IPv4 header for one (src, dst, proto) flow: only length and checksum vary.

    TCP segments carry DF and ID 0 (RFC 6864 allows any ID on atomic datagrams), so
    the checksum residue of everything but the total length is precomputed.
    """

    __slots__ = ("_base", "_residue", "_cache")

    def __init__(self, src: bytes, dst: bytes, proto: int, ttl: int = DEFAULT_TTL) -> None:
        self._base = bytearray(_V4.pack(0x45, 0, 0, 0, 0x4000, ttl, proto, 0, src, dst))
        self._residue = checksum.partial(self._base)
        self._cache: dict[int, bytes] = {}

    def build(self, payload_len: int) -> bytearray:
        """A fresh header for a payload of ``payload_len`` bytes."""
        hdr = self._base[:]
        total = 20 + payload_len
        ck = checksum.finish(self._residue + total)
        hdr[2] = total >> 8
        hdr[3] = total & 0xFF
        hdr[10] = ck >> 8
        hdr[11] = ck & 0xFF
        return hdr


class IPv6HeaderTemplate(_CachedHeaders):
    """Prebuilt IPv6 header for one flow: only the payload length varies."""

    __slots__ = ("_base", "_cache")

    def __init__(self, src: bytes, dst: bytes, next_header: int, hop_limit: int = DEFAULT_TTL) -> None:
        self._base = bytearray(_V6.pack(0x60000000, 0, next_header, hop_limit, src, dst))
        self._cache: dict[int, bytes] = {}

    def build(self, payload_len: int) -> bytearray:
        """A fresh header for a payload of ``payload_len`` bytes."""
        hdr = self._base[:]
        hdr[4] = payload_len >> 8
        hdr[5] = payload_len & 0xFF
        return hdr


#: Bookkeeping a stored fragment costs beyond its bytes, counted against the memory bound (like a
#: kernel's per-buffer truesize), so 8-byte fragments cannot hold far more memory than they are charged.
FRAGMENT_OVERHEAD = 64


@dataclass(slots=True)
class _Partial:
    deadline: float
    pieces: list[tuple[int, int, bytes]] = field(default_factory=list)  # sorted by offset, disjoint
    total: int | None = None
    size: int = 0  # payload bytes held
    charged: int = 0  # what this datagram counts against the memory bound


class Reassembler:
    """Bounded, timed reassembly of fragmented datagrams (RFC 791 / RFC 8200 §4.5).

    Overlapping fragments drop the whole datagram (RFC 5722 / RFC 1858 defence), and the
    fragments of that datagram still to come are dropped too until its reassembly time
    would have run out (RFC 5722 §4). An exact duplicate of a fragment we hold (the network
    may duplicate packets) is dropped alone (RFC 8200 §4.5); one with other bytes at the
    same place is an overlap. A datagram may have at most ``max_fragments`` pieces.
    Memory is bounded: above ``high_water`` bytes (payload plus :data:`FRAGMENT_OVERHEAD`
    per fragment) the oldest datagrams are evicted until usage is below ``low_water``.
    """

    def __init__(self, timeout: float = 30.0, high_water: int = 4 << 20, low_water: int = 3 << 20,
                 max_datagram: int = 65535, max_fragments: int = 128, max_dead: int = 1024) -> None:
        self.timeout = timeout
        self.high_water = high_water
        self.low_water = low_water
        self.max_datagram = max_datagram
        self.max_fragments = max_fragments
        self.memory = 0
        self.dropped = 0  # datagrams given up (overlap, inconsistency, too many pieces, timeout, memory)
        self.duplicates = 0  # exact duplicate fragments ignored
        self._partials: OrderedDict[tuple, _Partial] = OrderedDict()
        # Datagrams dropped for an overlap or inconsistency -> when to forget them (bounded, oldest first).
        self._dead: OrderedDict[tuple, float] = OrderedDict()
        self.max_dead = max_dead

    def __len__(self) -> int:
        return len(self._partials)

    def add(self, key: tuple, offset: int, data: bytes | memoryview, more: bool, now: float) -> bytes | None:
        """Add one fragment; return the whole payload once complete, else None."""
        self.expire(now)
        if key in self._dead:
            return None
        end = offset + len(data)
        if end > self.max_datagram or (more and len(data) % 8):
            self._kill(key, now)
            return None
        part = self._partials.get(key)
        if part is None:
            part = _Partial(now + self.timeout)
            self._partials[key] = part
        if not more:
            if part.total is not None and part.total != end:
                self._kill(key, now)
                return None
            if part.pieces and part.pieces[-1][1] > end:
                self._kill(key, now)  # data beyond the end this fragment declares
                return None
            part.total = end
        elif part.total is not None and end > part.total:
            self._kill(key, now)
            return None
        pieces = part.pieces
        i = bisect_left(pieces, (offset,))
        if i < len(pieces) and pieces[i][0] == offset and pieces[i][1] == end:
            if pieces[i][2] == data:
                self.duplicates += 1
                return None
            self._kill(key, now)
            return None
        if (i > 0 and pieces[i - 1][1] > offset) or (i < len(pieces) and pieces[i][0] < end):
            self._kill(key, now)
            return None
        if len(pieces) >= self.max_fragments:
            self._kill(key, now)
            return None
        pieces.insert(i, (offset, end, bytes(data)))
        part.size += len(data)
        charge = len(data) + FRAGMENT_OVERHEAD
        part.charged += charge
        self.memory += charge
        if part.total is not None and part.size == part.total:
            del self._partials[key]
            self.memory -= part.charged
            return b"".join(p[2] for p in pieces)
        if self.memory > self.high_water:
            while self._partials and self.memory > self.low_water:
                old_key = next(iter(self._partials))
                self._drop(old_key)
        return None

    def _drop(self, key: tuple) -> None:
        part = self._partials.pop(key, None)
        if part is not None:
            self.memory -= part.charged
        self.dropped += 1

    def _kill(self, key: tuple, now: float) -> None:
        """Drop the datagram and refuse its later fragments (RFC 5722 §4) until it would have timed out."""
        self._drop(key)
        self._dead[key] = now + self.timeout
        self._dead.move_to_end(key)  # (keeps the dict in deadline order: ``now`` never goes back)
        while len(self._dead) > self.max_dead:
            self._dead.popitem(last=False)

    def expire(self, now: float) -> None:
        """Forget datagrams whose reassembly time ran out (oldest are first in the dict)."""
        while self._partials:
            key, part = next(iter(self._partials.items()))
            if part.deadline > now:
                break
            self._drop(key)
        dead = self._dead
        while dead:
            key, t = next(iter(dead.items()))
            if t > now:
                break
            del dead[key]

    def next_deadline(self) -> float | None:
        """When the oldest pending datagram times out."""
        if not self._partials:
            return None
        return next(iter(self._partials.values())).deadline
