"""The client side of one DERP connection as a sans-IO state machine.

Feed it the bytes read after the HTTP upgrade (``receive_data(data, now)``); it
returns typed events and accumulates bytes to write (``data_to_send()``). It
answers server Pings itself, tracks the 120 s read deadline and the ping
timeout (``get_timer`` / ``handle_timer``), and applies the token bucket a
server may advertise in ServerInfo.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from ..key import NodePrivate, NodePublic
from .frames import (
    KEY_LEN,
    MAX_INFO_LEN,
    MAX_PACKET_SIZE,
    ClientInfoFrame,
    DerpProtocolError,
    FrameReader,
    FrameType,
    Health,
    NotePreferred,
    PeerGone,
    PeerPresent,
    Ping,
    Pong,
    Restarting,
    ServerKey,
    decode_frame,
    encode_frame,
)
from .info import ClientInfo, ServerInfo, open_from, seal_to

__all__ = [
    "MAX_QUEUED_PONGS",
    "ClientState",
    "DerpClientProtocol",
    "DerpEvent",
    "HealthChanged",
    "KeepAliveReceived",
    "PeerGoneEvent",
    "PeerPresentEvent",
    "PingTimeout",
    "PongReceived",
    "ReceivedPacket",
    "RestartingEvent",
    "ServerInfoReceived",
]

READ_TIMEOUT = 120.0
_HDR = struct.Struct(">BI")
_RECV_PACKET = int(FrameType.RECV_PACKET)
_SEND_PACKET = int(FrameType.SEND_PACKET)
_SRC_KEY_CACHE = 1024
#: Pongs queued for one write at most: a server flooding Pings while not reading cannot grow our buffer.
MAX_QUEUED_PONGS = 64


class ClientState(enum.Enum):
    AWAIT_SERVER_KEY = "await_server_key"
    AWAIT_SERVER_INFO = "await_server_info"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerInfoReceived:
    """Handshake complete: the server accepted us."""

    server_key: NodePublic
    info: ServerInfo


@dataclass(frozen=True, slots=True)
class ReceivedPacket:
    """A packet relayed to us from ``src`` (disco or WireGuard; the caller classifies)."""

    src: NodePublic
    packet: bytes


@dataclass(frozen=True, slots=True)
class PeerGoneEvent:
    """``peer`` is not reachable through this server (reason: 0 disconnected, 1 not here)."""

    peer: NodePublic
    reason: int


@dataclass(frozen=True, slots=True)
class PeerPresentEvent:
    """(Mesh watchers) ``peer`` connected to the server."""

    peer: NodePublic
    addr: tuple[str, int] | None
    flags: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """Server health text; empty means healthy."""

    problem: str


@dataclass(frozen=True, slots=True)
class RestartingEvent:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class KeepAliveReceived:
    pass


@dataclass(frozen=True, slots=True)
class PingTimeout:
    """A ping we sent was not answered in time; the driver should reconnect."""

    data: bytes


DerpEvent = (
    ServerInfoReceived
    | ReceivedPacket
    | PeerGoneEvent
    | PeerPresentEvent
    | PongReceived
    | HealthChanged
    | RestartingEvent
    | KeepAliveReceived
    | PingTimeout
)


class DerpClientProtocol:
    """One client connection's protocol state.

    ``server_key`` may be given when already known (fast start / pinned); the
    ServerKey frame is then still accepted but must match.
    """

    def __init__(
        self,
        private_key: NodePrivate,
        now: float,
        *,
        preferred: bool = False,
        mesh_key: bytes | None = None,
        is_prober: bool = False,
        server_key: NodePublic | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.private_key = private_key
        self.public_key: NodePublic = private_key.public
        self.state = ClientState.AWAIT_SERVER_KEY
        self.server_key = server_key
        self.server_info: ServerInfo | None = None
        self._info = ClientInfo(mesh_key=mesh_key, is_prober=is_prober)
        self._preferred = preferred
        self._reader = FrameReader(max_frame_len=MAX_INFO_LEN)
        self._out: list[bytes | bytearray] = []
        self._out_bytes = 0
        self._frames = 0
        self._queued_pongs = 0
        self.dropped_pongs = 0
        # Raw source key -> NodePublic: a transfer brings thousands of frames from the same few peers,
        # so building (and hashing) a key object per frame is wasted work. Bounded: cleared when full.
        self._src_keys: dict[bytes, NodePublic] = {}
        self._read_timeout = read_timeout
        self._read_deadline = now + read_timeout
        self._pings: dict[bytes, float] = {}  # data -> deadline
        self._bucket_rate = 0.0
        self._bucket_burst = 0.0
        self._tokens = 0.0
        self._tokens_at = now
        self.dropped_by_token_bucket = 0
        self.last_write = now
        self.close_reason = ""

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[DerpEvent]:
        """Feed received bytes; returns the events they complete, in order. Raises DerpProtocolError.

        Every complete frame in the buffer is handled in this one call, so a driver that reads
        a large chunk gets all of its packets back as one batch.
        """
        if self.state is ClientState.CLOSED:
            return []
        self._read_deadline = now + self._read_timeout
        reader = self._reader
        reader.feed(data)
        events: list[DerpEvent] = []
        append = events.append
        src_keys = self._src_keys
        connected = self.state is ClientState.CONNECTED
        try:
            frames = reader.drain()
            for ftype, payload in frames:
                if ftype == _RECV_PACKET and connected:
                    if len(payload) >= KEY_LEN:  # v2 frames carry the source key; drop shorter ones
                        raw = payload[:KEY_LEN]  # a read-only memoryview hashes and compares like bytes
                        src = src_keys.get(raw)
                        if src is None:
                            if len(src_keys) >= _SRC_KEY_CACHE:
                                src_keys.clear()
                            src = src_keys[bytes(raw)] = NodePublic(bytes(raw))
                        append(ReceivedPacket(src, payload[KEY_LEN:].tobytes()))
                    continue
                self._frame(ftype, payload, now, events)
                connected = self.state is ClientState.CONNECTED
        except DerpProtocolError as exc:
            self.state = ClientState.CLOSED
            self.close_reason = str(exc)
            raise
        return events

    def _frame(self, ftype: int, payload: memoryview, now: float, events: list[DerpEvent]) -> None:
        if self.state is ClientState.AWAIT_SERVER_KEY:
            if ftype != FrameType.SERVER_KEY:
                raise DerpProtocolError(f"expected ServerKey, got frame type 0x{ftype:02x}")
            if len(payload) > 1024:
                raise DerpProtocolError("ServerKey frame too long")
            frame = decode_frame(ftype, payload)
            assert isinstance(frame, ServerKey)
            key = NodePublic(frame.server_key)
            if self.server_key is not None and key != self.server_key:
                raise DerpProtocolError("server key does not match the expected key")
            self.server_key = key
            sealed = seal_to(self.private_key.raw, key.raw, self._info.to_json())
            self._write(encode_frame(ClientInfoFrame(self.public_key.raw, sealed)), now)
            if self._preferred:
                self._write(encode_frame(NotePreferred(True)), now)
            self.state = ClientState.AWAIT_SERVER_INFO
            return
        if ftype == FrameType.SERVER_INFO:
            # It must open with the server key we were given: proof the server holds its private key.
            assert self.server_key is not None
            info = ServerInfo.from_json(open_from(self.private_key.raw, self.server_key.raw, bytes(payload)))
            self.server_info = info
            # A later ServerInfo replaces the token bucket (as Go's client does); only the first
            # one completes the handshake and is reported.
            if info.token_bucket_bytes_per_second > 0:
                self._bucket_rate = float(info.token_bucket_bytes_per_second)
                self._bucket_burst = float(max(info.token_bucket_bytes_burst, 1))
                self._tokens = self._bucket_burst
                self._tokens_at = now
            else:
                self._bucket_rate = 0.0
            if self.state is ClientState.AWAIT_SERVER_INFO:
                self.state = ClientState.CONNECTED
                events.append(ServerInfoReceived(self.server_key, info))
            return
        if self.state is not ClientState.CONNECTED:
            return  # anything before ServerInfo (e.g. a KeepAlive) is ignored
        if ftype == FrameType.KEEP_ALIVE:
            events.append(KeepAliveReceived())
            return
        if ftype in (FrameType.PING, FrameType.PONG, FrameType.PEER_GONE, FrameType.PEER_PRESENT,
                     FrameType.HEALTH, FrameType.RESTARTING):
            frame = decode_frame(ftype, payload)
            match frame:
                case Ping(data):
                    if self._queued_pongs < MAX_QUEUED_PONGS:
                        self._queued_pongs += 1
                        self._write(encode_frame(Pong(data)), now)
                    else:
                        self.dropped_pongs += 1  # pinging faster than we write: ignored, as derper does
                case Pong(data):
                    if self._pings.pop(data, None) is not None:
                        events.append(PongReceived(data))
                case PeerGone(peer, reason):
                    events.append(PeerGoneEvent(NodePublic(peer), int(reason)))
                case PeerPresent(peer, addr, flags):
                    events.append(PeerPresentEvent(NodePublic(peer), addr, int(flags)))
                case Health(problem):
                    events.append(HealthChanged(problem))
                case Restarting(a, b):
                    events.append(RestartingEvent(a, b))
        # Unknown frame types are skipped, as Go clients do.

    # -- output ----------------------------------------------------------------------------

    def _write(self, frame: bytes, now: float) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)
        self.last_write = now

    def send_packet(self, dst: NodePublic | bytes, packet: bytes | bytearray | memoryview, now: float) -> bool:
        """Queue a SendPacket. Returns False if the server's advertised token bucket dropped it.

        ``bytes`` are queued without a copy; a mutable buffer is copied first.
        """
        if packet.__class__ is not bytes:
            packet = bytes(packet)
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {len(packet)} bytes exceeds DERP max {MAX_PACKET_SIZE}")
        raw = dst.raw if isinstance(dst, NodePublic) else bytes(dst)
        if len(raw) != KEY_LEN:
            raise ValueError("destination key must be 32 bytes")
        if self._bucket_rate:
            self._tokens = min(self._bucket_burst, self._tokens + (now - self._tokens_at) * self._bucket_rate)
            self._tokens_at = now
            cost = 5 + KEY_LEN + len(packet)
            if self._tokens < cost:
                self.dropped_by_token_bucket += 1
                return False
            self._tokens -= cost
        # Header+key and packet are queued as two pieces: data_to_send joins them once anyway,
        # so concatenating here would copy every packet twice.
        out = self._out
        out.append(_HDR.pack(_SEND_PACKET, KEY_LEN + len(packet)) + raw)
        out.append(packet)
        self._out_bytes += 5 + KEY_LEN + len(packet)
        self._frames += 1
        self.last_write = now
        return True

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes, now: float) -> None:
        """(Mesh) queue a ForwardPacket."""
        body = bytes(src) + bytes(dst) + bytes(packet)
        self._write(_HDR.pack(FrameType.FORWARD_PACKET, len(body)) + body, now)

    def note_preferred(self, preferred: bool, now: float) -> None:
        """Tell the server whether it is our home region."""
        self._preferred = preferred
        if self.state is not ClientState.AWAIT_SERVER_KEY:
            self._write(encode_frame(NotePreferred(preferred)), now)

    def watch_conns(self, now: float) -> None:
        """(Mesh) subscribe to PeerPresent / PeerGone."""
        self._write(b"\x10\x00\x00\x00\x00", now)

    def close_peer(self, peer: bytes, now: float) -> None:
        """(Mesh) ask the server to close every connection of ``peer``."""
        self._write(b"\x11\x00\x00\x00\x20" + bytes(peer), now)

    def send_ping(self, now: float, timeout: float = 5.0, data: bytes | None = None) -> bytes:
        """Queue a Ping; returns its 8 data bytes. A missing Pong yields PingTimeout from handle_timer."""
        data = data if data is not None else os.urandom(8)
        self._pings[data] = now + timeout
        self._write(encode_frame(Ping(data)), now)
        return data

    @property
    def pending_bytes(self) -> int:
        """Bytes queued but not yet taken by ``data_to_send``."""
        return self._out_bytes

    @property
    def pending_frames(self) -> int:
        """SendPackets queued but not yet taken by ``data_to_send`` (control frames not counted)."""
        return self._frames

    def data_to_send(self) -> bytes:
        """Everything queued, coalesced into one buffer (one write for the driver)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out = []
        self._out_bytes = 0
        self._frames = 0
        self._queued_pongs = 0
        return out

    # -- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float:
        """Next read deadline or ping deadline."""
        t = self._read_deadline
        if self._pings:
            t = min(t, min(self._pings.values()))
        return t

    def handle_timer(self, now: float) -> list[DerpEvent]:
        """Raises DerpProtocolError on a read timeout; returns PingTimeout for overdue pings."""
        if self.state is ClientState.CLOSED:
            return []
        if now >= self._read_deadline:
            self.state = ClientState.CLOSED
            self.close_reason = f"nothing received for {self._read_timeout:.0f} s"
            raise DerpProtocolError(self.close_reason)
        events: list[DerpEvent] = []
        for data, deadline in list(self._pings.items()):
            if now >= deadline:
                del self._pings[data]
                events.append(PingTimeout(data))
        return events

