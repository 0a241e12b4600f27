"""The DERP server as a sans-IO state machine.

:class:`DerpServerCore` owns every client connection, the routing table (public
key -> connection), the mesh forwarders and the counters. A driver feeds it the
bytes it reads (``ServerConn.receive_data(data, now)``), asks which connections
have something to write (``take_dirty()``) and writes ``ServerConn.data_to_send(now)``.
No sockets, no clocks, no awaits: the same object serves a standalone listener,
a server embedded in the control server, and the unit tests.

Hot path: a SendPacket and the RecvPacket it becomes have the same length, so a
relayed frame is ``0x05 || same 4 length bytes || src key || packet`` built from
slices of the receive buffer. Frames are parsed many per wake-up and queued per
destination; the driver flushes each destination's queue with one write.
"""

from __future__ import annotations

import enum
import hmac
import random
import struct
from collections import Counter, deque
from collections.abc import Callable
from itertools import chain
from dataclasses import dataclass, field

from .frames import (
    DISCO_MAGIC,
    KEY_LEN,
    MAX_CLIENT_FRAME,
    MAX_CLIENT_INFO_LEN,
    MAX_PACKET_SIZE,
    MIN_CLIENT_INFO_LEN,
    DerpProtocolError,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    Restarting,
    ServerKey,
    encode_frame,
)
from .frames import _addr_bytes
from .info import ClientInfo, ServerInfo, open_from, seal_to

__all__ = ["ConnState", "DerpServerCore", "DropReason", "MeshLink", "ServerConn", "ServerCounters"]

_HDR = struct.Struct(">BI")
_KEEPALIVE_FRAME = b"\x06\x00\x00\x00\x00"
_HANDSHAKE_TIMEOUT = 10.0
_MAX_PENDING_WHILE_VERIFYING = 1 << 20
_DISCO_MIN_LEN = 62


class DropReason(str, enum.Enum):
    """Why the server dropped a packet (the keys of ``ServerCounters.drops``)."""

    UNKNOWN_DEST = "unknown_dest"
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    DUP_CLIENT = "dup_client"
    QUEUE_HEAD = "queue_head"
    RATE_LIMITED = "rate_limited"
    WRITE_ERROR = "write_error"
    GONE_DISCONNECTED = "gone_disconnected"


class ConnState(enum.Enum):
    """Lifecycle of one server-side connection."""

    AWAIT_CLIENT_INFO = "await_client_info"
    VERIFYING = "verifying"
    ACTIVE = "active"
    CLOSED = "closed"


@dataclass(slots=True)
class ServerCounters:
    """Server-wide counters; ``drops`` is keyed by :class:`DropReason` value."""

    accepts: int = 0
    current_connections: int = 0
    clients: int = 0  # distinct keys with at least one local connection
    home_connections: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    packets_relayed: int = 0
    bytes_relayed: int = 0
    packets_forwarded_out: int = 0
    packets_forwarded_in: int = 0
    peer_gone_disconnected_frames: int = 0
    peer_gone_not_here_frames: int = 0
    got_ping: int = 0
    sent_pong: int = 0
    protocol_errors: int = 0
    rejected_clients: int = 0
    dup_client_conns: int = 0
    rate_limit_pauses: int = 0  # paced mode: times a driver stopped reading a client
    drops: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly snapshot."""
        out: dict[str, object] = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "drops"}
        out["drops"] = dict(self.drops)
        return out


_QUEUE_HEAD = DropReason.QUEUE_HEAD.value


class _Outbox:
    """What one connection (or mesh link) has waiting to be written.

    Control frames are never dropped; packets sit in two bounded queues (disco and
    everything else) so a WireGuard flood cannot starve disco. A full queue drops
    its oldest packet, as derper does.
    """

    __slots__ = ("_core", "_ctrl", "_disco", "_other", "_depth", "_dirty", "last_write", "closed", "close_reason")

    def __init__(self, core: DerpServerCore, depth: int, now: float) -> None:
        self._core = core
        self._ctrl: list[bytes] = []
        # Packets are (header, payload) pairs; the payload is a view into the receive buffer,
        # so the only copy of a relayed packet is the join in data_to_send.
        self._disco: deque[tuple[bytes, bytes | memoryview]] = deque()
        self._other: deque[tuple[bytes, bytes | memoryview]] = deque()
        self._depth = depth
        self._dirty = False
        self.last_write = now
        self.closed = False
        self.close_reason = ""

    def _mark(self) -> None:
        if not self._dirty:
            self._dirty = True
            self._core._dirty.append(self)

    def _push_ctrl(self, frame: bytes) -> None:
        self._ctrl.append(frame)
        self._mark()

    def _push_packet(self, frame: tuple[bytes, bytes | memoryview], disco: bool) -> None:
        q = self._disco if disco else self._other
        if len(q) >= self._depth:
            q.popleft()
            self._core.counters.drops[DropReason.QUEUE_HEAD.value] += 1
        q.append(frame)
        if not self._dirty:
            self._dirty = True
            self._core._dirty.append(self)

    @property
    def has_output(self) -> bool:
        """True when ``data_to_send`` would return bytes."""
        return bool(self._ctrl or self._disco or self._other)

    @property
    def queued_packets(self) -> int:
        return len(self._disco) + len(self._other)

    def data_to_send(self, now: float) -> bytes:
        """Everything queued, coalesced into one buffer (control frames first)."""
        parts = self._ctrl
        if self._disco:
            parts.extend(chain.from_iterable(self._disco))
            self._disco.clear()
        if self._other:
            parts.extend(chain.from_iterable(self._other))
            self._other.clear()
        self._ctrl = []
        self._dirty = False
        if not parts:
            return b""
        self.last_write = now
        return b"".join(parts)


class ServerConn(_Outbox):
    """One accepted client connection, after the HTTP upgrade."""

    __slots__ = (
        "conn_id",
        "remote",
        "state",
        "key",
        "info",
        "can_mesh",
        "preferred",
        "watcher",
        "not_ideal",
        "is_dup",
        "_rx",
        "_deadline",
        "_sent_to",
        "_tokens",
        "_tokens_at",
        "_not_here_tokens",
        "_not_here_at",
        "_keepalive_interval",
    )

    def __init__(self, core: DerpServerCore, conn_id: int, remote: tuple[str, int] | None, now: float,
                 not_ideal: bool) -> None:
        super().__init__(core, core.queue_depth, now)
        self.conn_id = conn_id
        self.remote = remote
        self.state = ConnState.AWAIT_CLIENT_INFO
        self.key: bytes | None = None
        self.info: ClientInfo | None = None
        self.can_mesh = False
        self.preferred = False
        self.watcher = False
        self.not_ideal = not_ideal
        self.is_dup = False
        self._rx = b""
        self._deadline = now + _HANDSHAKE_TIMEOUT
        self._sent_to: set[bytes] = set()
        self._tokens = float(core.rate_limit_burst)
        self._tokens_at = now
        self._not_here_tokens = 3.0
        self._not_here_at = now
        # Jittered so thousands of idle clients don't all wake in the same tick.
        self._keepalive_interval = core.keepalive_interval * (1.0 - 0.1 * core._rng.random())

    def __repr__(self) -> str:
        key = self.key.hex()[:8] if self.key else "-"
        return f"<ServerConn #{self.conn_id} key={key} {self.state.value}>"

    # -- driver API ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the connection. Protocol errors close this connection only."""
        if self.closed:
            return
        try:
            self._core._receive(self, data, now)
        except DerpProtocolError as exc:
            self._core.counters.protocol_errors += 1
            self._core._close(self, f"protocol error: {exc}")

    @property
    def has_partial_frame(self) -> bool:
        """Bytes of an incomplete frame are buffered (EOF now means a truncated frame)."""
        return bool(self._rx)

    def read_resume_at(self, now: float) -> float:
        """(Paced rate limit) when the driver may read again; ``now`` if it need not wait."""
        core = self._core
        if not core.rate_limit_pace or self.can_mesh or self._tokens >= 0:
            return now
        core._refill(self, now)
        if self._tokens >= 0:
            return now
        return now + (-self._tokens) / core.rate_limit_bytes_per_sec

    def get_timer(self) -> float:
        """When ``handle_timer`` next has work (handshake deadline or keepalive)."""
        if self.state is not ConnState.ACTIVE:
            return self._deadline
        return self.last_write + self._keepalive_interval

    def handle_timer(self, now: float) -> None:
        """Close a stalled handshake; queue a KeepAlive on a connection idle for the interval."""
        if self.closed:
            return
        if self.state is not ConnState.ACTIVE:
            if now >= self._deadline and self.state is ConnState.AWAIT_CLIENT_INFO:
                self._core._close(self, "handshake timeout")
            return
        if now >= self.last_write + self._keepalive_interval and not self.has_output:
            self._push_ctrl(_KEEPALIVE_FRAME)
            self.last_write = now

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The driver saw EOF or an I/O error."""
        if not self.closed:
            self._core._close(self, reason)

    def write_failed(self, reason: str = "write error") -> None:
        """A write timed out or failed: the queued packets are lost."""
        if not self.closed:
            self._core.counters.drops[DropReason.WRITE_ERROR.value] += self.queued_packets
            self._core._close(self, reason)


class MeshLink(_Outbox):
    """Our outbound watch connection to a mesh peer: it learns peer-local keys and carries ForwardPackets."""

    __slots__ = ("name", "keys")

    def __init__(self, core: DerpServerCore, name: str, now: float) -> None:
        super().__init__(core, core.queue_depth * 8, now)
        self.name = name
        self.keys: set[bytes] = set()

    def __repr__(self) -> str:
        return f"<MeshLink {self.name} keys={len(self.keys)}>"

    def peer_present(self, key: bytes) -> None:
        """The peer server reports ``key`` connected to it (the latest report picks the forwarder)."""
        self._core._forwarders[bytes(key)] = self
        self.keys.add(bytes(key))

    def peer_gone(self, key: bytes) -> None:
        """The peer server reports ``key`` gone (or not there: PeerGone of any reason)."""
        key = bytes(key)
        self.keys.discard(key)
        self._core._forwarder_gone(key, self)

    def reset(self) -> None:
        """The link dropped: every key learned over it is gone as far as this link goes (as derper,
        which treats a broken watch connection as a PeerGone for each of its keys); it is relearned
        on reconnect."""
        keys, self.keys = self.keys, set()
        for key in keys:
            self._core._forwarder_gone(key, self)
        self._ctrl.clear()
        self._disco.clear()
        self._other.clear()


class DerpServerCore:
    """All server state: connections, routes, mesh forwarders, counters.

    ``verify_clients``: when true, a connection whose ClientInfo opened correctly
    is parked in :attr:`ConnState.VERIFYING` and listed by ``take_verify_requests``;
    the driver asks its policy and answers with ``verify_result``. Mesh-key
    clients skip verification.

    ``rate_limit_bytes_per_sec``: per-connection token bucket on SendPacket frames
    (frame bytes). With ``rate_limit_mode="drop"`` packets over the budget are
    dropped and counted as ``rate_limited``; with ``"pace"`` (derper's newer
    behaviour, lossless) every packet is relayed, the bucket goes into debt and
    ``ServerConn.read_resume_at`` tells the driver how long to stop reading, so TCP
    backpressure slows the sender. Mesh connections are exempt.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        mesh_key: bytes | None = None,
        queue_depth: int = 512,
        keepalive_interval: float = 60.0,
        verify_clients: bool = False,
        rate_limit_bytes_per_sec: float = 0.0,
        rate_limit_burst: int = 0,
        rate_limit_mode: str = "drop",
        server_info: ServerInfo | None = None,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        from nacl.public import PrivateKey

        self.private_key = bytes(private_key)
        self.public_key = bytes(PrivateKey(self.private_key).public_key)
        self.mesh_key = bytes(mesh_key) if mesh_key else None
        self.queue_depth = queue_depth
        self.keepalive_interval = min(keepalive_interval, 60.0)
        self.verify_clients = verify_clients
        self.rate_limit_bytes_per_sec = float(rate_limit_bytes_per_sec)
        if rate_limit_mode not in ("drop", "pace"):
            raise ValueError(f"rate_limit_mode must be 'drop' or 'pace', not {rate_limit_mode!r}")
        self.rate_limit_pace = rate_limit_mode == "pace"
        self.rate_limit_burst = max(int(rate_limit_burst), 5 + KEY_LEN + MAX_PACKET_SIZE) if rate_limit_bytes_per_sec else 0
        self.server_info_json = (server_info or ServerInfo()).to_json()
        self.counters = ServerCounters()
        self._rng = rng or random.Random()
        self._log = log or (lambda msg: None)
        self._next_id = 0
        self._conns: set[ServerConn] = set()
        self._by_key: dict[bytes, list[ServerConn]] = {}
        # key -> the connection packets go to; None while duplicates exist and none is active.
        self._route: dict[bytes, ServerConn | None] = {}
        # Keys connected more than once -> their connections in the order they last became active,
        # adjacent repeats collapsed (derper's send history). When the active one leaves, the most
        # recent survivor in it takes over, so a duplicate set is never left without a receiver.
        self._dup_history: dict[bytes, list[ServerConn]] = {}
        self._forwarders: dict[bytes, MeshLink] = {}
        self._sent_to: dict[bytes, set[bytes]] = {}  # src key -> dst keys it sent to (for PeerGone)
        self._fwd_sent_to: dict[bytes, set[bytes]] = {}  # same, for sources a mesh peer forwarded in
        # dst key -> src keys in those two maps that name it: when dst leaves it is taken out of
        # them, so they only ever hold keys connected now (no growth over a long-lived sender's life).
        self._heard_from: dict[bytes, set[bytes]] = {}
        self._watchers: set[ServerConn] = set()
        self._dirty: list[_Outbox] = []
        self._verify: list[ServerConn] = []
        self._closed: list[ServerConn] = []
        self._mesh_links: list[MeshLink] = []
        self.health = ""

    # -- driver API ------------------------------------------------------------------------

    def accept(self, now: float, remote: tuple[str, int] | None = None, *, not_ideal: bool = False) -> ServerConn:
        """A new upgraded connection: queues the ServerKey frame (the driver writes any 101 first)."""
        self._next_id += 1
        conn = ServerConn(self, self._next_id, remote, now, not_ideal)
        self._conns.add(conn)
        self.counters.accepts += 1
        self.counters.current_connections += 1
        conn._push_ctrl(encode_frame(ServerKey(self.public_key)))
        return conn

    def take_dirty(self) -> list[_Outbox]:
        """Connections and mesh links that gained output (or closed) since the last call."""
        dirty, self._dirty = self._dirty, []
        return dirty

    def take_verify_requests(self) -> list[ServerConn]:
        """Connections waiting for a ``verify_result``."""
        req, self._verify = self._verify, []
        return req

    def take_closed(self) -> list[ServerConn]:
        """Connections the core closed (protocol error, ClosePeer, handshake timeout...)."""
        closed, self._closed = self._closed, []
        return closed

    def verify_result(self, conn: ServerConn, allowed: bool, now: float) -> None:
        """The driver's answer for a parked connection."""
        if conn.closed or conn.state is not ConnState.VERIFYING:
            return
        if not allowed:
            self.counters.rejected_clients += 1
            self._close(conn, "client not authorized")
            return
        self._register(conn)
        pending, conn._rx = conn._rx, b""
        if pending:
            conn.receive_data(pending, now)

    def connections(self) -> list[ServerConn]:
        """Every open connection."""
        return list(self._conns)

    def is_connected(self, key: bytes) -> bool:
        """Whether ``key`` has a local connection."""
        return bytes(key) in self._by_key

    def add_mesh_link(self, name: str, now: float) -> MeshLink:
        """Create the core side of an outbound mesh watch connection."""
        link = MeshLink(self, name, now)
        self._mesh_links.append(link)
        return link

    def set_health(self, problem: str) -> None:
        """Tell every client about a server problem (empty clears)."""
        self.health = problem
        body = problem.encode()
        frame = _HDR.pack(FrameType.HEALTH, len(body)) + body
        for conn in self._conns:
            if conn.state is ConnState.ACTIVE:
                conn._push_ctrl(frame)

    def announce_restart(self, reconnect_in_ms: int = 0, try_for_ms: int = 10_000) -> None:
        """Queue a Restarting frame to every client (clean shutdown)."""
        frame = encode_frame(Restarting(reconnect_in_ms, try_for_ms))
        for conn in self._conns:
            if conn.state is ConnState.ACTIVE:
                conn._push_ctrl(frame)

    # -- internals -------------------------------------------------------------------------

    def _close(self, conn: ServerConn, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.close_reason = reason
        was_active = conn.state is ConnState.ACTIVE
        conn.state = ConnState.CLOSED
        self._conns.discard(conn)
        self.counters.current_connections -= 1
        if conn.preferred:
            self.counters.home_connections -= 1
        self._watchers.discard(conn)
        if was_active:
            self._unregister(conn)
        self._closed.append(conn)
        conn._mark()  # wake its writer so the driver notices
        self._log(f"derp: closed {conn!r}: {reason}")

    def _register(self, conn: ServerConn) -> None:
        key = conn.key
        assert key is not None
        conn.state = ConnState.ACTIVE
        conns = self._by_key.get(key)
        if conns is None:
            self._by_key[key] = [conn]
            self.counters.clients += 1
            self._announce_present(conn)
        else:
            history = self._dup_history.get(key)
            if history is None:
                # derper starts the history with the previously active connection only.
                prev = self._route.get(key)
                self._dup_history[key] = [prev] if prev is not None else []
            else:
                history.append(conn)
            conns.append(conn)
            self.counters.dup_client_conns += 1
            for c in conns:
                c.is_dup = True
            self._announce_present(conn)  # derper announces every registration, duplicates too
        self._route[key] = conn  # newest connection is the active one
        conn._sent_to = self._sent_to.setdefault(key, set())
        conn._push_ctrl(self._server_info_frame(key))
        if self.health:
            # A client hears about a standing problem when it connects, not only when it changes.
            body = self.health.encode()
            conn._push_ctrl(_HDR.pack(FrameType.HEALTH, len(body)) + body)

    def _server_info_frame(self, client_key: bytes) -> bytes:
        sealed = seal_to(self.private_key, client_key, self.server_info_json)
        return _HDR.pack(FrameType.SERVER_INFO, len(sealed)) + sealed

    def _presence_frame(self, conn: ServerConn) -> bytes:
        # As derper: the special bits alone; REGULAR only when none of them applies.
        flags = PeerPresentFlags.NONE
        if conn.info is not None and conn.info.is_prober:
            flags |= PeerPresentFlags.PROBER
        if conn.can_mesh:
            flags |= PeerPresentFlags.MESH_PEER
        if conn.not_ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        if not flags:
            flags = PeerPresentFlags.REGULAR
        body = bytes(conn.key)  # type: ignore[arg-type]
        if conn.remote is not None:
            try:
                body += _addr_bytes(conn.remote) + bytes([int(flags)])
            except ValueError:
                pass
        return _HDR.pack(FrameType.PEER_PRESENT, len(body)) + body

    def _announce_present(self, conn: ServerConn) -> None:
        if not self._watchers:
            return
        frame = self._presence_frame(conn)
        for w in self._watchers:
            if w is not conn:
                w._push_ctrl(frame)

    def _unregister(self, conn: ServerConn) -> None:
        key = conn.key
        assert key is not None
        conns = self._by_key[key]
        conns.remove(conn)
        if conns:
            history = self._dup_history.get(key, [])
            if len(conns) == 1:
                conns[0].is_dup = False
                self._route[key] = conns[0]
                self._dup_history.pop(key, None)
                return
            kept: list[ServerConn] = []
            for c in history:
                if c is not conn and (not kept or kept[-1] is not c):
                    kept.append(c)
            history[:] = kept
            if self._route.get(key) is conn:
                # The most recent survivor to register or speak takes over (None if none has).
                self._route[key] = kept[-1] if kept else None
            return
        del self._by_key[key]
        del self._route[key]
        self.counters.clients -= 1
        gone = _HDR.pack(FrameType.PEER_GONE, KEY_LEN + 1) + key + b"\x00"
        for w in self._watchers:
            w._push_ctrl(gone)
        # As a receiver: no longer needs to hear when its senders go.
        for src in self._heard_from.pop(key, ()):
            sent = self._sent_to.get(src)
            if sent is not None:
                sent.discard(key)
            fwd = self._fwd_sent_to.get(src)
            if fwd is not None:
                fwd.discard(key)
                if not fwd:
                    del self._fwd_sent_to[src]
        receivers = self._sent_to.pop(key, set())
        if key in self._forwarders:
            self._forget_sender(key, receivers)
            return  # still reachable through the mesh
        self._notify_gone(key, receivers)

    def _note_heard(self, dst: bytes, src: bytes) -> None:
        heard = self._heard_from.get(dst)
        if heard is None:
            self._heard_from[dst] = {src}
        else:
            heard.add(src)

    def _forget_sender(self, key: bytes, receivers) -> None:
        for dst in receivers:
            heard = self._heard_from.get(dst)
            if heard is not None:
                heard.discard(key)
                if not heard:
                    del self._heard_from[dst]

    def _forwarder_gone(self, key: bytes, link: MeshLink) -> None:
        if self._forwarders.get(key) is not link:
            return
        # Another mesh peer may still have the key (a node connected to two servers of the region).
        for other in self._mesh_links:
            if other is not link and key in other.keys:
                self._forwarders[key] = other
                return
        del self._forwarders[key]
        if key not in self._route:  # not local either: gone from the region
            self._notify_gone(key, self._fwd_sent_to.pop(key, ()))

    def _notify_gone(self, key: bytes, receivers) -> None:
        self._forget_sender(key, receivers)
        gone = _HDR.pack(FrameType.PEER_GONE, KEY_LEN + 1) + key + b"\x00"
        for dst in receivers:
            target = self._route.get(dst)
            if target is not None and not target.watcher:
                target._push_ctrl(gone)
                self.counters.peer_gone_disconnected_frames += 1

    def _handshake(self, conn: ServerConn, ftype: int, payload: bytes) -> None:
        if ftype != FrameType.CLIENT_INFO:
            raise DerpProtocolError(f"expected ClientInfo, got frame type 0x{ftype:02x}")
        if len(payload) < MIN_CLIENT_INFO_LEN:
            raise DerpProtocolError(f"ClientInfo of {len(payload)} bytes is too short")
        key = bytes(payload[:KEY_LEN])
        plain = open_from(self.private_key, key, bytes(payload[KEY_LEN:]))
        info = ClientInfo.from_json(plain)
        conn.key = key
        conn.info = info
        # Constant-time comparison: the mesh key is a shared secret and must not leak byte by byte.
        conn.can_mesh = bool(self.mesh_key and info.mesh_key and hmac.compare_digest(info.mesh_key, self.mesh_key))
        if self.verify_clients and not conn.can_mesh:
            conn.state = ConnState.VERIFYING
            self._verify.append(conn)
            return
        self._register(conn)

    def _refill(self, conn: ServerConn, now: float) -> None:
        elapsed = now - conn._tokens_at
        if elapsed > 0:
            conn._tokens = min(float(self.rate_limit_burst), conn._tokens + elapsed * self.rate_limit_bytes_per_sec)
            conn._tokens_at = now

    def _not_here(self, conn: ServerConn, dst: bytes, now: float) -> None:
        # derper rate-limits these per sender: 1/s with a burst of 3.
        conn._not_here_tokens = min(3.0, conn._not_here_tokens + (now - conn._not_here_at))
        conn._not_here_at = now
        if conn._not_here_tokens >= 1.0:
            conn._not_here_tokens -= 1.0
            conn._push_ctrl(_HDR.pack(FrameType.PEER_GONE, KEY_LEN + 1) + dst + bytes([PeerGoneReason.NOT_HERE]))
            self.counters.peer_gone_not_here_frames += 1

    def _receive(self, conn: ServerConn, data: bytes, now: float) -> None:
        if conn.state is ConnState.VERIFYING:
            conn._rx += data
            if len(conn._rx) > _MAX_PENDING_WHILE_VERIFYING:
                raise DerpProtocolError("too much data sent before the client was verified")
            return
        buf = conn._rx + data if conn._rx else data
        conn._rx = b""
        n = len(buf)
        pos = 0
        unpack = _HDR.unpack_from
        pack = _HDR.pack
        dirty = self._dirty
        if conn.state is ConnState.AWAIT_CLIENT_INFO:
            if n < 5:
                conn._rx = buf
                return
            ftype, length = unpack(buf, 0)
            if ftype == FrameType.CLIENT_INFO and length > MAX_CLIENT_INFO_LEN:
                raise DerpProtocolError(f"ClientInfo of {length} bytes exceeds {MAX_CLIENT_INFO_LEN}")
            if 5 + length > n:
                if ftype != FrameType.CLIENT_INFO:
                    raise DerpProtocolError(f"expected ClientInfo, got frame type 0x{ftype:02x}")
                conn._rx = buf
                return
            self._handshake(conn, ftype, buf[5 : 5 + length])
            pos = 5 + length
            if conn.state is ConnState.VERIFYING:
                conn._rx = buf[pos:]
                return
        if conn.is_dup and pos < n:  # a frame after the handshake (the ClientInfo itself does not count)
            self._note_dup_activity(conn)
        mv = memoryview(buf)
        route = self._route
        src = conn.key
        sent_to = conn._sent_to
        counters = self.counters
        limited = self.rate_limit_bytes_per_sec > 0 and not conn.can_mesh
        pace = self.rate_limit_pace
        if limited:
            self._refill(conn, now)
        frames = 0
        nbytes = 0
        relayed = 0
        relayed_bytes = 0
        # Locals instead of globals/attributes: this loop runs once per frame.
        max_frame = MAX_CLIENT_FRAME
        max_send = KEY_LEN + MAX_PACKET_SIZE  # a SendPacket's limit; only ForwardPacket may be longer
        conn_cls = ServerConn
        missing = _MISSING
        disco_magic = DISCO_MAGIC
        disco_min = KEY_LEN + _DISCO_MIN_LEN
        hdr_len = -1
        hdr = b""
        while n - pos >= 5:
            ftype, length = unpack(buf, pos)
            if length > max_send and (length > max_frame or ftype != FrameType.FORWARD_PACKET):
                limit = MAX_CLIENT_FRAME if ftype == FrameType.FORWARD_PACKET else max_send
                raise DerpProtocolError(f"frame type 0x{ftype:02x} declares {length} bytes (limit {limit})")
            end = pos + 5 + length
            if end > n:
                break
            frames += 1
            nbytes += length
            if ftype == 4:  # SendPacket: the hot path
                if length < 32:
                    raise DerpProtocolError(f"SendPacket of {length} bytes has no destination key")
                dst = buf[pos + 5 : pos + 37]
                if limited:
                    cost = 5 + length
                    if conn._tokens < cost and not pace:
                        counters.drops[DropReason.RATE_LIMITED.value] += 1
                        pos = end
                        continue
                    conn._tokens -= cost
                target = route.get(dst, missing)
                if target.__class__ is conn_cls:
                    # Inlined _push_packet. RecvPacket has the SendPacket's length, so one header
                    # (type, length, our key) serves every packet of that size in this batch.
                    if length != hdr_len:
                        hdr_len = length
                        hdr = pack(5, length) + src
                    if length >= disco_min and buf.startswith(disco_magic, pos + 37):
                        q = target._disco
                    else:
                        q = target._other
                    if len(q) >= target._depth:
                        q.popleft()
                        counters.drops[_QUEUE_HEAD] += 1
                    q.append((hdr, mv[pos + 37 : end]))
                    if not target._dirty:
                        target._dirty = True
                        dirty.append(target)
                    if dst not in sent_to:  # first packet src -> dst: remember it for PeerGone
                        sent_to.add(dst)
                        self._note_heard(dst, src)
                    relayed += 1
                    relayed_bytes += length
                else:
                    self._route_slow(conn, dst, target, mv[pos + 37 : end], now)
            elif ftype == FrameType.FORWARD_PACKET:
                self._forwarded(conn, mv[pos + 5 : end], now)
            else:
                self._control_frame(conn, ftype, mv[pos + 5 : end], now)
                if conn.closed:
                    return
            pos = end
        if pos < n:
            conn._rx = buf[pos:]
        counters.packets_received += frames
        counters.bytes_received += nbytes
        counters.packets_relayed += relayed
        counters.bytes_relayed += relayed_bytes - KEY_LEN * relayed

    def _note_dup_activity(self, conn: ServerConn) -> None:
        # derper's default policy, "last writer is active": whichever duplicate sent last gets the traffic.
        key = conn.key
        self._route[key] = conn  # type: ignore[index]
        history = self._dup_history.get(key)  # type: ignore[arg-type]
        if history is not None and (not history or history[-1] is not conn):
            history.append(conn)

    def _route_slow(self, conn: ServerConn, dst: bytes, target, packet: memoryview, now: float) -> None:
        counters = self.counters
        if target is None:
            counters.drops[DropReason.DUP_CLIENT.value] += 1
            return
        link = self._forwarders.get(dst)
        if link is not None:
            head = _HDR.pack(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + conn.key + dst  # type: ignore[operator]
            link._push_packet((head, packet), False)
            counters.packets_forwarded_out += 1
            return  # dst's own server tells dst when we report the sender gone
        counters.drops[DropReason.UNKNOWN_DEST.value] += 1
        if len(packet) >= _DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC:
            self._not_here(conn, dst, now)

    def _forwarded(self, conn: ServerConn, payload: memoryview, now: float) -> None:
        if not conn.can_mesh:
            raise DerpProtocolError("ForwardPacket from a connection without the mesh key")
        if len(payload) < 2 * KEY_LEN:
            raise DerpProtocolError("ForwardPacket too short")
        src = bytes(payload[:KEY_LEN])
        dst = bytes(payload[KEY_LEN : 2 * KEY_LEN])
        packet = payload[2 * KEY_LEN :]
        self.counters.packets_forwarded_in += 1
        target = self._route.get(dst)
        disco = len(packet) >= _DISCO_MIN_LEN and packet[:6] == DISCO_MAGIC
        if target is None:
            if dst in self._by_key:  # connected more than once, none active
                self.counters.drops[DropReason.DUP_CLIENT.value] += 1
                return
            self.counters.drops[DropReason.UNKNOWN_DEST_ON_FWD.value] += 1
            if disco:
                # Tells the forwarding server its route is stale (it drops its forwarder for dst).
                self._not_here(conn, dst, now)
            return
        target._push_packet((_HDR.pack(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src, packet), disco)
        fwd = self._fwd_sent_to.get(src)
        if fwd is None:
            fwd = self._fwd_sent_to[src] = set()
        if dst not in fwd:
            fwd.add(dst)
            self._note_heard(dst, src)
        self.counters.packets_relayed += 1
        self.counters.bytes_relayed += len(packet)

    def _control_frame(self, conn: ServerConn, ftype: int, payload: memoryview, now: float) -> None:
        if ftype == FrameType.NOTE_PREFERRED:
            if len(payload) != 1:
                raise DerpProtocolError(f"NotePreferred of {len(payload)} bytes (want 1)")
            preferred = payload[0] != 0
            if preferred != conn.preferred:
                self.counters.home_connections += 1 if preferred else -1
                conn.preferred = preferred
        elif ftype == FrameType.PING:
            if not 8 <= len(payload) <= 1000:
                raise DerpProtocolError(f"Ping of {len(payload)} bytes")
            self.counters.got_ping += 1
            if len(conn._ctrl) < 64:  # excess pings are ignored, as derper's 1-slot channel does
                conn._push_ctrl(b"\x13\x00\x00\x00\x08" + bytes(payload[:8]))
                self.counters.sent_pong += 1
        elif ftype == FrameType.WATCH_CONNS:
            if len(payload) != 0:
                raise DerpProtocolError("WatchConns with a payload")
            if not conn.can_mesh:
                raise DerpProtocolError("WatchConns without the mesh key")
            if conn.key == self.public_key:
                return  # a mesh link that reached ourselves: nothing to watch (as derper)
            conn.watcher = True
            self._watchers.add(conn)
            for key in self._by_key:
                active = self._route.get(key)  # a duplicate set's active connection (derper's choice too)
                if key != conn.key and active is not None:
                    conn._push_ctrl(self._presence_frame(active))
        elif ftype == FrameType.CLOSE_PEER:
            if len(payload) != KEY_LEN:
                raise DerpProtocolError("ClosePeer must carry exactly one key")
            if not conn.can_mesh:
                raise DerpProtocolError("ClosePeer without the mesh key")
            for victim in list(self._by_key.get(bytes(payload), ())):
                self._close(victim, "closed by ClosePeer")
        elif ftype == FrameType.PONG or ftype == FrameType.KEEP_ALIVE:
            pass
        # Everything else is skipped by length, as derper does: server-to-client types, unknown
        # types, and a second ClientInfo (a connection's key is fixed by its first one).


class _Missing:
    __slots__ = ()


_MISSING = _Missing()
