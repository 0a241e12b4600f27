"""Byte-level DNS helpers that must work even on messages dnslib cannot parse.

FORMERR replies, UDP truncation of forwarded answers and the RFC 1035 §4.2.2 / RFC 7766 two-byte length
framing used over TCP.
"""

from __future__ import annotations

import struct

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


def truncate_to(response: bytes, limit: int) -> bytes:
    """Return ``response`` if it fits in ``limit`` bytes, else its header and question with TC set.

    The client is expected to retry over TCP (RFC 7766). If even the question does not fit or cannot be
    located, a bare header with TC set is returned.
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
    return struct.pack("!6H", qid, flags | FLAG_TC, qdcount, 0, 0, 0) + bytes(response[HEADER_LEN:end])


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
