"""Byte-level DNS: a strict query parser and response builder for MagicDNS answers (the per-query
fast path, no dnslib objects), plus helpers that must work on any message: header-only error replies,
UDP truncation of forwarded answers, and RFC 1035 §4.2.2 / RFC 7766 two-byte length framing for TCP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_LEN = 12
#: RFC 1035 §4.2.1: the UDP limit when the client did not advertise a bigger one with EDNS.
CLASSIC_UDP_LIMIT = 512
#: Our cap on any UDP response, whatever EDNS size the client advertises (Tailscale uses 4095 too).
MAX_UDP_RESPONSE = 4095
#: A TCP DNS message can never exceed the 16-bit length prefix.
MAX_TCP_MESSAGE = 0xFFFF

FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
OPCODE_MASK = 0x7800

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
#: RFC 6891 §6.1.3: the 12-bit extended RCODE for an EDNS version we do not implement.
RCODE_BADVERS = 16
#: RFC 3225: the DNSSEC OK bit in the OPT record's TTL field (copied from query to response).
EDNS_FLAG_DO = 0x8000


def error_response(query: bytes | memoryview, rcode: int) -> bytes | None:
    """A header-only response echoing the query's ID, opcode and RD bit, or None if there is no ID.

    Used for queries too broken to echo their question (RFC 1035 allows an empty question section then).
    """
    if len(query) < 2:
        return None
    qid = (query[0] << 8) | query[1]
    flags = FLAG_QR | (rcode & 0xF)
    if len(query) >= 3:
        flags |= ((query[2] << 8) & (OPCODE_MASK | FLAG_RD))
    return struct.pack("!6H", qid, flags, 0, 0, 0, 0)


def _skip_name(msg: bytes | memoryview, pos: int) -> int:
    """Return the offset just past the (possibly compressed) name at ``pos``; raise ValueError if broken."""
    for _ in range(128):  # a name has at most 127 labels
        if pos >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(msg):
                raise ValueError("truncated compression pointer")
            return pos + 2
        if length & 0xC0:
            raise ValueError("reserved label type")
        pos += 1 + length
    raise ValueError("too many labels")


def _skip_record(msg: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Skip the resource record at ``pos``: (its type, offset after it). Raises ValueError if broken."""
    pos = _skip_name(msg, pos)
    if pos + 10 > len(msg):
        raise ValueError("record header truncated")
    rtype = (msg[pos] << 8) | msg[pos + 1]
    rdlength = (msg[pos + 8] << 8) | msg[pos + 9]
    end = pos + 10 + rdlength
    if end > len(msg):
        raise ValueError("record data truncated")
    return rtype, end


def _find_opt(response: bytes, question_end: int) -> bytes:
    """The raw OPT record of ``response`` (after its question section), or b"" if none or unparsable."""
    ancount, nscount, arcount = struct.unpack_from("!3H", response, 6)
    pos = question_end
    try:
        for _ in range(ancount + nscount):
            _rtype, pos = _skip_record(response, pos)
        for _ in range(arcount):
            start = pos
            rtype, pos = _skip_record(response, pos)
            if rtype == TYPE_OPT:
                return bytes(response[start:pos])
    except ValueError:
        pass
    return b""


def truncate_to(response: bytes, limit: int) -> bytes:
    """Return ``response`` if it fits in ``limit`` bytes, else its header and question with TC set.

    The client is expected to retry over TCP (RFC 7766). The response's OPT record is kept when it
    fits (RFC 6891 §7: a truncated response still carries OPT). If even the question does not fit or
    cannot be located, a bare header with TC set is returned.
    """
    if len(response) <= limit:
        return response
    if len(response) < HEADER_LEN:
        return response[:limit]
    qid, flags, qdcount = struct.unpack_from("!3H", response)
    end = HEADER_LEN
    try:
        for _ in range(qdcount):
            end = _skip_name(response, end) + 4
        if end > len(response) or end > limit:
            raise ValueError("question does not fit")
    except ValueError:
        qdcount, end = 0, HEADER_LEN
    opt = _find_opt(response, end) if qdcount else b""
    if end + len(opt) > limit:
        opt = b""
    header = struct.pack("!6H", qid, flags | FLAG_TC, qdcount, 0, 0, 1 if opt else 0)
    return header + bytes(response[HEADER_LEN:end]) + opt


def question_key(msg: bytes | memoryview) -> tuple[tuple[bytes, ...], int, int] | None:
    """The single question of ``msg`` as (lower-cased labels, type, class); None if it has not exactly one.

    Used to check that an upstream reply answers the question we forwarded (RFC 5452 §9.1).
    """
    if len(msg) < HEADER_LEN or ((msg[4] << 8) | msg[5]) != 1:
        return None
    try:
        labels, pos = read_name(bytes(msg), HEADER_LEN)
    except ValueError:
        return None
    if pos + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack_from("!2H", msg, pos)
    return tuple(label.lower() for label in labels), qtype, qclass


def reply_matches(query: bytes | memoryview, reply: bytes | memoryview) -> bool:
    """Whether ``reply`` is a response to ``query``: same ID, QR set, same question (name case-blind).

    Anything else (a stray or spoofed datagram, a reply to another question) must be ignored.
    """
    if len(reply) < HEADER_LEN or reply[:2] != query[:2] or not reply[2] & 0x80:
        return False
    wanted = question_key(query)
    return wanted is not None and question_key(reply) == wanted


def frame(message: bytes) -> bytes:
    """Prefix a DNS message with its two-byte length for TCP."""
    if len(message) > MAX_TCP_MESSAGE:
        raise ValueError(f"DNS message of {len(message)} bytes is too long for TCP framing")
    return struct.pack("!H", len(message)) + message


class TCPFrameDecoder:
    """Splits a TCP byte stream into DNS messages (two-byte big-endian length prefix).

    Feed it whatever arrived; it returns the complete messages and keeps the remainder. A zero length
    prefix is a protocol error (RFC 7766 leaves no use for it) and raises ValueError.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Add received bytes; return every message now complete, in order."""
        self._buffer += data
        messages: list[bytes] = []
        pos = 0
        buf = self._buffer
        while len(buf) - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if length == 0:
                raise ValueError("zero-length DNS message on TCP")
            if len(buf) - pos - 2 < length:
                break
            messages.append(bytes(buf[pos + 2 : pos + 2 + length]))
            pos += 2 + length
        if pos:
            del buf[:pos]
        return messages

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete message."""
        return len(self._buffer)


TYPE_OPT = 41
_MAX_NAME_WIRE = 255


@dataclass(frozen=True, slots=True)
class Query:
    """The parts of a query the resolver needs. ``question`` is the raw question section (name case kept)."""

    id: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    question: bytes
    #: The EDNS UDP payload size the client advertised, or None without an OPT record.
    edns_size: int | None
    #: The EDNS version of the client's OPT record (0 without one).
    edns_version: int = 0
    #: The OPT record's flags (the DO bit), copied into our OPT (RFC 3225).
    edns_flags: int = 0


def read_name(msg: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    """Read a (possibly compressed) name at ``pos``: (labels, offset after it). Raises ValueError.

    Compression pointers must point strictly backwards and past the header, which rules out loops.
    """
    labels: list[bytes] = []
    end: int | None = None
    total = 1
    limit = pos
    while True:
        if pos >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(msg):
                raise ValueError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            if end is None:
                end = pos + 2
            if target >= limit or target < HEADER_LEN:
                raise ValueError("bad compression pointer")
            pos = limit = target
            continue
        if length & 0xC0:
            raise ValueError("reserved label type")
        if length == 0:
            return tuple(labels), (end if end is not None else pos + 1)
        total += length + 1
        if total > _MAX_NAME_WIRE or pos + 1 + length > len(msg):
            raise ValueError("name too long or truncated")
        labels.append(msg[pos + 1 : pos + 1 + length])
        pos += 1 + length


def parse_query(msg: bytes) -> Query:
    """Strictly parse a standard query: one question, no answer/authority records, at most one OPT.

    Raises ValueError for anything malformed (the caller answers FORMERR).
    """
    if len(msg) < HEADER_LEN:
        raise ValueError("message shorter than a header")
    qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", msg)
    if qdcount != 1 or ancount or nscount:
        raise ValueError("a query has exactly one question and no answers")
    labels, pos = read_name(msg, HEADER_LEN)
    if pos + 4 > len(msg):
        raise ValueError("question truncated")
    qtype, qclass = struct.unpack_from("!2H", msg, pos)
    question = msg[HEADER_LEN : pos + 4]
    pos += 4
    edns_size: int | None = None
    edns_version = edns_flags = 0
    for _ in range(arcount):
        _name, pos = read_name(msg, pos)
        if pos + 10 > len(msg):
            raise ValueError("additional record truncated")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", msg, pos)
        pos += 10 + rdlength
        if pos > len(msg):
            raise ValueError("additional record data truncated")
        if rtype == TYPE_OPT:
            if edns_size is not None:
                raise ValueError("more than one OPT record")  # RFC 6891 §6.1.1
            edns_size = rclass
            edns_version = (ttl >> 16) & 0xFF
            edns_flags = ttl & EDNS_FLAG_DO
    return Query(qid, flags, labels, qtype, qclass, question, edns_size, edns_version, edns_flags)


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of a dotted ASCII name."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        out.append(len(raw))
        out += raw
    out.append(0)
    return bytes(out)


def _opt_record(extended_rcode: int, flags: int) -> bytes:
    """Our OPT record: root owner, our UDP size, the upper RCODE bits, version 0 and the echoed flags."""
    return b"\x00" + struct.pack("!HHBBHH", TYPE_OPT, MAX_UDP_RESPONSE, extended_rcode, 0, flags, 0)


def build_response(
    query: Query,
    rcode: int,
    answers: list[tuple[int, bytes]],
    ttl: int,
    limit: int,
    *,
    authoritative: bool = True,
) -> bytes:
    """A response echoing ``query``'s question; ``answers`` are (type, rdata) for its name.

    ``rcode`` may be an extended (12-bit) RCODE such as :data:`RCODE_BADVERS`; its upper bits go into
    the OPT record, which is present exactly when the query had one (RFC 6891 §7). Answers that do not
    fit in ``limit`` bytes are left off (whole records) and TC is set.
    """
    flags = FLAG_QR | (query.flags & FLAG_RD) | (rcode & 0xF)
    if authoritative:
        flags |= 0x0400  # AA
    if query.flags & FLAG_RD:
        flags |= 0x0080  # RA: we recurse (forward) on the client's behalf
    opt = _opt_record(rcode >> 4, query.edns_flags) if query.edns_size is not None else b""
    room = limit - HEADER_LEN - len(query.question) - len(opt)
    records = []
    for rtype, rdata in answers:
        # The owner name is a pointer to the question name at offset 12.
        record = b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata
        if len(record) > room:
            flags |= FLAG_TC
            break
        room -= len(record)
        records.append(record)
    header = struct.pack("!6H", query.id, flags, 1, len(records), 0, 1 if opt else 0)
    return header + query.question + b"".join(records) + opt
