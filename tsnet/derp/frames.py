"""DERP frame codec (sans-IO).

Every frame is ``type(1) || length(4, big-endian) || payload(length)``. This module
turns typed frames into bytes and bytes into typed frames; it never touches a
socket. :class:`FrameReader` accumulates a byte stream and yields whole frames,
rejecting a frame whose declared length is over the reader's limit before any of
its payload is buffered, so an attacker cannot make us allocate a huge buffer.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "DISCO_MAGIC",
    "FRAME_HEADER_LEN",
    "KEEPALIVE_INTERVAL",
    "KEY_LEN",
    "MAGIC",
    "MAX_CLIENT_FRAME",
    "MAX_CLIENT_INFO_LEN",
    "MAX_INFO_LEN",
    "MAX_PACKET_SIZE",
    "MIN_CLIENT_INFO_LEN",
    "NONCE_LEN",
    "PROTOCOL_VERSION",
    "ClientInfoFrame",
    "ClosePeer",
    "DerpProtocolError",
    "ForwardPacket",
    "Frame",
    "FrameReader",
    "FrameType",
    "Health",
    "KeepAlive",
    "NotePreferred",
    "PeerGone",
    "PeerGoneReason",
    "PeerPresent",
    "PeerPresentFlags",
    "Ping",
    "Pong",
    "RecvPacket",
    "Restarting",
    "SendPacket",
    "ServerInfoFrame",
    "ServerKey",
    "UnknownFrame",
    "WatchConns",
    "decode_frame",
    "encode_frame",
    "encode_header",
    "looks_like_disco",
]

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑"
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"  # "TS💬"
KEY_LEN = 32
NONCE_LEN = 24
FRAME_HEADER_LEN = 5
PROTOCOL_VERSION = 2
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
MAX_CLIENT_INFO_LEN = 256 << 10
MIN_CLIENT_INFO_LEN = KEY_LEN + NONCE_LEN  # key + nonce; the box adds 16 more but derper checks 56
# Largest frame a server accepts from a client: ForwardPacket (two keys + max packet).
MAX_CLIENT_FRAME = 2 * KEY_LEN + MAX_PACKET_SIZE
KEEPALIVE_INTERVAL = 60.0
_DISCO_MIN_LEN = 62  # magic(6) + disco key(32) + nonce(24)

_HDR = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")


class DerpProtocolError(Exception):
    """The peer broke the DERP protocol; the one connection it arrived on must be closed."""


class FrameType(enum.IntEnum):
    """DERP frame type bytes."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    """Why a PeerGone frame was sent."""

    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    MESH_CONN_BROKE = 0xF0  # client-internal, never on the wire


class PeerPresentFlags(enum.IntFlag):
    """Flag bits at the end of a PeerPresent frame."""

    NONE = 0x00
    REGULAR = 0x01
    MESH_PEER = 0x02
    PROBER = 0x04
    NOT_IDEAL = 0x08


def looks_like_disco(packet: bytes | memoryview) -> bool:
    """True if ``packet`` is shaped like a disco message (magic prefix and long enough)."""
    return len(packet) >= _DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC


def encode_header(frame_type: int, length: int) -> bytes:
    """The 5-byte frame header."""
    return _HDR.pack(frame_type, length)


def _key(value: bytes, what: str) -> bytes:
    value = bytes(value)
    if len(value) != KEY_LEN:
        raise ValueError(f"{what}: expected a {KEY_LEN}-byte key, got {len(value)} bytes")
    return value


# ---------------------------------------------------------------------------------------------
# Typed frames. Keys are raw 32-byte strings: cheap to hash on the relay hot path.


@dataclass(frozen=True, slots=True)
class ServerKey:
    """0x01: the server's public key, preceded by the protocol magic."""

    server_key: bytes


@dataclass(frozen=True, slots=True)
class ClientInfoFrame:
    """0x02: client key and a NaCl box (``nonce || box``) holding the ClientInfo JSON."""

    client_key: bytes
    sealed: bytes


@dataclass(frozen=True, slots=True)
class ServerInfoFrame:
    """0x03: ``nonce || box`` holding the ServerInfo JSON, sealed to the client key."""

    sealed: bytes


@dataclass(frozen=True, slots=True)
class SendPacket:
    """0x04: client asks the server to deliver ``packet`` to ``dst``."""

    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    """0x05: server delivers ``packet`` sent by ``src``."""

    src: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """0x06: no-op that keeps the client's read deadline alive."""


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """0x07: whether this server's region is the client's home."""

    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    """0x08: ``peer`` is no longer reachable through this server."""

    peer: bytes
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """0x09: ``peer`` connected (sent to mesh watchers). ``addr`` is (ip, port) if known."""

    peer: bytes
    addr: tuple[str, int] | None = None
    flags: int = PeerPresentFlags.NONE


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """0x0a: a mesh peer forwards ``packet`` from ``src`` to our local client ``dst``."""

    src: bytes
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class WatchConns:
    """0x10: a mesh peer subscribes to PeerPresent / PeerGone."""


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """0x11: a privileged client asks the server to close every connection of ``peer``."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """0x12: asks for a Pong with the same 8 bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """0x13: the answer to a Ping."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    """0x14: server health problem text; empty clears it."""

    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    """0x15: the server is going away; reconnect after ``reconnect_in_ms``, keep trying ``try_for_ms``."""

    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame type this codec does not know; receivers skip it."""

    frame_type: int
    payload: bytes


Frame = (
    ServerKey
    | ClientInfoFrame
    | ServerInfoFrame
    | SendPacket
    | RecvPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | ForwardPacket
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
    | UnknownFrame
)


def _addr_bytes(addr: tuple[str, int]) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return ip.packed + struct.pack(">H", addr[1])


def _payload(frame: Frame) -> tuple[int, bytes]:
    match frame:
        case SendPacket(dst, packet):
            if len(packet) > MAX_PACKET_SIZE:
                raise ValueError(f"packet of {len(packet)} bytes exceeds DERP max {MAX_PACKET_SIZE}")
            return FrameType.SEND_PACKET, _key(dst, "dst") + bytes(packet)
        case RecvPacket(src, packet):
            return FrameType.RECV_PACKET, _key(src, "src") + bytes(packet)
        case ServerKey(server_key):
            return FrameType.SERVER_KEY, MAGIC + _key(server_key, "server key")
        case ClientInfoFrame(client_key, sealed):
            return FrameType.CLIENT_INFO, _key(client_key, "client key") + bytes(sealed)
        case ServerInfoFrame(sealed):
            return FrameType.SERVER_INFO, bytes(sealed)
        case KeepAlive():
            return FrameType.KEEP_ALIVE, b""
        case NotePreferred(preferred):
            return FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00"
        case PeerGone(peer, reason):
            return FrameType.PEER_GONE, _key(peer, "peer") + bytes([int(reason)])
        case PeerPresent(peer, addr, flags):
            body = _key(peer, "peer")
            if addr is not None:
                body += _addr_bytes(addr) + bytes([int(flags)])
            return FrameType.PEER_PRESENT, body
        case ForwardPacket(src, dst, packet):
            return FrameType.FORWARD_PACKET, _key(src, "src") + _key(dst, "dst") + bytes(packet)
        case WatchConns():
            return FrameType.WATCH_CONNS, b""
        case ClosePeer(peer):
            return FrameType.CLOSE_PEER, _key(peer, "peer")
        case Ping(data):
            if len(data) != 8:
                raise ValueError("ping data must be 8 bytes")
            return FrameType.PING, bytes(data)
        case Pong(data):
            if len(data) != 8:
                raise ValueError("pong data must be 8 bytes")
            return FrameType.PONG, bytes(data)
        case Health(problem):
            return FrameType.HEALTH, problem.encode("utf-8")
        case Restarting(reconnect_in_ms, try_for_ms):
            return FrameType.RESTARTING, _U32X2.pack(reconnect_in_ms, try_for_ms)
        case UnknownFrame(frame_type, payload):
            return frame_type, bytes(payload)
    raise TypeError(f"not a DERP frame: {frame!r}")


def encode_frame(frame: Frame) -> bytes:
    """Serialise one typed frame, header included."""
    frame_type, body = _payload(frame)
    return _HDR.pack(frame_type, len(body)) + body


def _need(frame_type: int, payload: bytes, n: int, exact: bool = False) -> None:
    if len(payload) < n or (exact and len(payload) != n):
        name = FrameType(frame_type).name
        want = f"exactly {n}" if exact else f"at least {n}"
        raise DerpProtocolError(f"{name} frame: payload of {len(payload)} bytes, need {want}")


def decode_frame(frame_type: int, payload: bytes | memoryview) -> Frame:
    """Parse one frame's payload into a typed frame.

    Raises :class:`DerpProtocolError` when the payload is malformed for its type.
    Unknown types come back as :class:`UnknownFrame` so callers can skip them.
    """
    p = bytes(payload)
    if frame_type == FrameType.SEND_PACKET:
        _need(frame_type, p, KEY_LEN)
        if len(p) - KEY_LEN > MAX_PACKET_SIZE:
            raise DerpProtocolError(f"SEND_PACKET: packet of {len(p) - KEY_LEN} bytes exceeds {MAX_PACKET_SIZE}")
        return SendPacket(p[:KEY_LEN], p[KEY_LEN:])
    if frame_type == FrameType.RECV_PACKET:
        _need(frame_type, p, KEY_LEN)
        return RecvPacket(p[:KEY_LEN], p[KEY_LEN:])
    if frame_type == FrameType.SERVER_KEY:
        _need(frame_type, p, len(MAGIC) + KEY_LEN)
        if p[: len(MAGIC)] != MAGIC:
            raise DerpProtocolError("SERVER_KEY frame: bad magic")
        return ServerKey(p[len(MAGIC) : len(MAGIC) + KEY_LEN])
    if frame_type == FrameType.CLIENT_INFO:
        if len(p) > MAX_CLIENT_INFO_LEN:
            raise DerpProtocolError(f"CLIENT_INFO frame of {len(p)} bytes exceeds {MAX_CLIENT_INFO_LEN}")
        _need(frame_type, p, MIN_CLIENT_INFO_LEN)
        return ClientInfoFrame(p[:KEY_LEN], p[KEY_LEN:])
    if frame_type == FrameType.SERVER_INFO:
        _need(frame_type, p, NONCE_LEN + 16)
        return ServerInfoFrame(p)
    if frame_type == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if frame_type == FrameType.NOTE_PREFERRED:
        _need(frame_type, p, 1, exact=True)
        return NotePreferred(p[0] != 0)
    if frame_type == FrameType.PEER_GONE:
        _need(frame_type, p, KEY_LEN)
        reason = p[KEY_LEN] if len(p) > KEY_LEN else PeerGoneReason.DISCONNECTED
        return PeerGone(p[:KEY_LEN], reason)
    if frame_type == FrameType.PEER_PRESENT:
        _need(frame_type, p, KEY_LEN)
        addr = None
        flags = PeerPresentFlags.NONE
        if len(p) >= KEY_LEN + 18:
            ip = ipaddress.IPv6Address(p[KEY_LEN : KEY_LEN + 16])
            port = struct.unpack_from(">H", p, KEY_LEN + 16)[0]
            host = str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)
            addr = (host, port)
            if len(p) >= KEY_LEN + 19:
                flags = p[KEY_LEN + 18]
        return PeerPresent(p[:KEY_LEN], addr, flags)
    if frame_type == FrameType.FORWARD_PACKET:
        _need(frame_type, p, 2 * KEY_LEN)
        if len(p) - 2 * KEY_LEN > MAX_PACKET_SIZE:
            raise DerpProtocolError(f"FORWARD_PACKET: packet of {len(p) - 2 * KEY_LEN} bytes exceeds {MAX_PACKET_SIZE}")
        return ForwardPacket(p[:KEY_LEN], p[KEY_LEN : 2 * KEY_LEN], p[2 * KEY_LEN :])
    if frame_type == FrameType.WATCH_CONNS:
        _need(frame_type, p, 0, exact=True)
        return WatchConns()
    if frame_type == FrameType.CLOSE_PEER:
        _need(frame_type, p, KEY_LEN, exact=True)
        return ClosePeer(p)
    if frame_type == FrameType.PING:
        _need(frame_type, p, 8)
        return Ping(p[:8])
    if frame_type == FrameType.PONG:
        _need(frame_type, p, 8)
        return Pong(p[:8])
    if frame_type == FrameType.HEALTH:
        return Health(p.decode("utf-8", errors="replace"))
    if frame_type == FrameType.RESTARTING:
        _need(frame_type, p, 8)
        a, b = _U32X2.unpack_from(p)
        return Restarting(a, b)
    return UnknownFrame(frame_type, p)


class FrameReader:
    """Reassembles frames from a byte stream.

    ``feed`` bytes as they arrive, then call ``next_frame`` until it returns None (or
    ``drain`` for all of them at once). A declared length over ``max_frame_len`` raises
    :class:`DerpProtocolError` as soon as the header is seen.

    Fed chunks are parsed in place: returned payloads are memoryviews into them. Only a
    frame that straddles two chunks is copied (just that frame), so a large read is never
    copied as a whole.
    """

    __slots__ = ("_buf", "_next", "_next_pos", "_pos", "max_frame_len")

    def __init__(self, max_frame_len: int = MAX_INFO_LEN) -> None:
        self._buf: bytes = b""
        self._pos = 0
        # The chunk after ``_buf`` when ``_buf`` holds one straddling frame put together by ``feed``.
        self._next: bytes | None = None
        self._next_pos = 0
        self.max_frame_len = max_frame_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (``bytes`` are kept without a copy)."""
        if data.__class__ is not bytes:
            data = bytes(data)
        if not data:
            return
        if self._next is not None:
            # Fed again before the last chunk was parsed: merge (only callers that do not drain get here).
            self._buf = self._buf[self._pos :] + self._next[self._next_pos :]
            self._pos = 0
            self._next = None
        rest = len(self._buf) - self._pos
        if not rest:
            self._buf, self._pos = data, 0
            return
        # A partial frame is waiting. Copy just that frame together from its two pieces and parse
        # the rest of ``data`` in place.
        head = self._buf[self._pos :]
        self._pos = 0
        need_hdr = FRAME_HEADER_LEN - rest
        if need_hdr > 0:
            if len(data) < need_hdr:
                self._buf = head + data
                return
            hdr = head + data[:need_hdr]
        else:
            hdr = head
        length = _HDR.unpack_from(hdr)[1]
        take = FRAME_HEADER_LEN + length - rest  # bytes of ``data`` that complete the frame
        if take <= 0 or take >= len(data) or length > self.max_frame_len:
            # Whole frames were left unparsed, the frame is still partial, or it is oversized (the
            # parser reports that): plain concatenation.
            self._buf = head + data
            return
        self._buf = head + data[:take]
        self._next = data
        self._next_pos = take

    def take_rest(self) -> bytes:
        """Remove and return every buffered byte not yet returned as a frame."""
        rest = self._buf[self._pos :]
        if self._next is not None:
            rest += self._next[self._next_pos :]
            self._next = None
        self._buf = b""
        self._pos = 0
        return rest

    @property
    def buffered(self) -> int:
        """How many bytes are waiting (a partial frame)."""
        n = len(self._buf) - self._pos
        if self._next is not None:
            n += len(self._next) - self._next_pos
        return n

    def _advance_chunk(self) -> bool:
        """Move on to the chunk after a consumed straddling frame; False if there is none."""
        if self._next is None or self._pos < len(self._buf):
            return False
        self._buf, self._pos = self._next, self._next_pos
        self._next = None
        return True

    def next_frame(self) -> tuple[int, memoryview] | None:
        """The next whole frame as ``(type, payload)``, or None if more bytes are needed."""
        if self._next is not None:
            self._advance_chunk()
        buf, pos = self._buf, self._pos
        if len(buf) - pos < FRAME_HEADER_LEN:
            return None
        frame_type, length = _HDR.unpack_from(buf, pos)
        if length > self.max_frame_len:
            raise DerpProtocolError(
                f"frame type 0x{frame_type:02x} declares {length} bytes, over the limit of {self.max_frame_len}"
            )
        end = pos + FRAME_HEADER_LEN + length
        if end > len(buf):
            return None
        self._pos = end
        return frame_type, memoryview(buf)[pos + FRAME_HEADER_LEN : end]

    def drain(self) -> list[tuple[int, memoryview]]:
        """Every whole frame buffered now, in order, as ``(type, payload)`` (one call, one tight loop)."""
        out: list[tuple[int, memoryview]] = []
        append = out.append
        unpack = _HDR.unpack_from
        limit = self.max_frame_len
        while True:
            buf, pos = self._buf, self._pos
            size = len(buf)
            view = memoryview(buf)
            while size - pos >= FRAME_HEADER_LEN:
                frame_type, length = unpack(buf, pos)
                if length > limit:
                    self._pos = pos
                    raise DerpProtocolError(
                        f"frame type 0x{frame_type:02x} declares {length} bytes, over the limit of {limit}"
                    )
                end = pos + FRAME_HEADER_LEN + length
                if end > size:
                    break
                append((frame_type, view[pos + FRAME_HEADER_LEN : end]))
                pos = end
            self._pos = pos
            if not self._advance_chunk():
                return out
