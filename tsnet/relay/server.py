"""Peer relay server core (sans-IO), wire-compatible with tailscaled 1.96.4 ``net/udprelay``.

Life of an endpoint:

1. A client asks the relay *node* over DERP (disco box with the node's own disco
   key) to allocate an endpoint for a sorted pair of client disco keys
   (:func:`answer_allocate_request` / :meth:`RelayServer.allocate`). The answer
   carries the server's own disco key, a VNI, a Lamport id, the lifetimes and
   the server's advertised addr:ports.
2. Each client binds its side over UDP: Geneve(control, disco) ``Bind`` ->
   server ``Challenge`` (a MAC over VNI, generation, remote key and the
   observed source) -> client ``Answer`` echoing it. A valid answer binds that
   side to the answer's source address.
3. Once both sides are bound, every non-control datagram from one bound
   address is forwarded unchanged (Geneve header included) to the other.
4. Garbage collection every bind lifetime: endpoints not bound by both sides
   within the bind lifetime of allocation, or bound but with either side
   silent for longer than the steady-state lifetime, are closed.

All methods take ``now`` (seconds, any monotonic origin); nothing here does I/O.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tsnet.key import DiscoPrivate, DiscoPublic, NodePublic
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock import disco
from tsnet.relay.geneve import GENEVE_HEADER_LEN, MAX_VNI, PROTOCOL_DISCO, CONTROL_FLAG, encode_header

__all__ = [
    "BIND_LIFETIME",
    "STEADY_STATE_LIFETIME",
    "SERVER_RETRY_AFTER",
    "MAC_ROTATION_INTERVAL",
    "RelayError",
    "RelayNotReady",
    "RelayAllocationError",
    "EndpointState",
    "SessionInfo",
    "RelayServer",
    "answer_allocate_request",
]

log = logging.getLogger(__name__)

BIND_LIFETIME = 30.0
STEADY_STATE_LIFETIME = 300.0
#: clients retry a not-ready allocation after this long (``endpoint.ServerRetryAfter``).
SERVER_RETRY_AFTER = 3.0
MAC_ROTATION_INTERVAL = 120.0
MIN_VNI = 1

_U32 = struct.Struct("!I")
_U16LE = struct.Struct("<H")


class RelayError(Exception):
    """Base class for relay server refusals."""


class RelayNotReady(RelayError):
    """No advertised addr:port yet; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float = SERVER_RETRY_AFTER) -> None:
        super().__init__(f"relay server not ready, retry after {retry_after}s")
        self.retry_after = retry_after


class RelayAllocationError(RelayError):
    """The allocation request is invalid (e.g. a client key equals the server key)."""


class EndpointState(enum.Enum):
    CONNECTING = "connecting"  # allocated, not yet bound by both sides
    OPEN = "open"  # both sides bound
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One endpoint, for ``debug peer-relay-sessions``-style output."""

    vni: int
    lamport_id: int
    client_disco: tuple[DiscoPublic, DiscoPublic]
    bound: tuple[AddrPort | None, AddrPort | None]
    packets: tuple[int, int]
    bytes: tuple[int, int]
    state: EndpointState


@dataclass(frozen=True, slots=True)
class _Route:
    """Both bound sides of an open endpoint with their counter keys, cached for the run path."""

    b0: AddrPort
    b1: AddrPort
    same: bool  # both sides bound to one address: receive_datagram then always picks side 0
    key0: tuple[str, str]  # forwarded_* key for side 0 -> side 1
    key1: tuple[str, str]

    @staticmethod
    def of(ep: _Endpoint) -> _Route | None:
        """The route of ``ep``, None unless both sides are bound."""
        b0, b1 = ep.bound
        if b0 is None or b1 is None:
            return None
        return _Route(b0, b1, b0 == b1, (_family(b0), _family(b1)), (_family(b1), _family(b0)))

    def side_of(self, src: AddrPort) -> tuple[int, AddrPort, tuple[str, str]] | None:
        """``(side, destination, counter key)`` for a datagram from ``src``; None for a stranger.

        Identity first: the driver hands over cached source objects.
        """
        if src is self.b0:
            return 0, self.b1, self.key0
        if src is self.b1:
            return (0, self.b1, self.key0) if self.same else (1, self.b0, self.key1)
        if src == self.b0:
            return 0, self.b1, self.key0
        if src == self.b1:
            return 1, self.b0, self.key1
        return None


@dataclass(slots=True)
class _Endpoint:
    client_disco: tuple[DiscoPublic, DiscoPublic]
    lamport_id: int
    vni: int
    allocated_at: float
    in_progress_generation: list[int] = field(default_factory=lambda: [0, 0])
    bound: list[AddrPort | None] = field(default_factory=lambda: [None, None])
    last_seen: list[float] = field(default_factory=lambda: [0.0, 0.0])
    packets_rx: list[int] = field(default_factory=lambda: [0, 0])
    bytes_rx: list[int] = field(default_factory=lambda: [0, 0])
    closed: bool = False
    #: the bound sides for forward_run; reset whenever ``bound`` changes
    route: _Route | None = None

    @property
    def state(self) -> EndpointState:
        if self.closed:
            return EndpointState.CLOSED
        if self.bound[0] is not None and self.bound[1] is not None:
            return EndpointState.OPEN
        return EndpointState.CONNECTING


def _family(ap: AddrPort) -> str:
    return "udp6" if ap.ip.version == 6 else "udp4"


def _addrport_binary(ap: AddrPort) -> bytes:
    # Go netip.AddrPort.AppendBinary: 4 or 16 address bytes, then the port little-endian.
    return ap.ip.packed + _U16LE.pack(ap.port)


def _same_headers(buf: bytes | bytearray | memoryview, start: int, seg: int, count: int, hdr: bytes) -> bool:
    """Whether the ``count`` segments of ``seg`` bytes from ``start`` all begin with the 8 bytes ``hdr``.

    Every segment must hold at least 8 bytes. When ``seg`` is a multiple of 8 (always so for WireGuard
    over Geneve: 8 + 16n bytes) the headers are one strided column of 64-bit words: a single
    ``tobytes`` gathers them all. Otherwise one strided byte column per header byte.
    """
    span = (count - 1) * seg + GENEVE_HEADER_LEN
    if seg % 8 == 0:
        view = memoryview(buf)[start:start + span]
        if view.format == "B" and view.c_contiguous:
            return view.cast("Q")[::seg // 8].tobytes() == hdr * count
    if isinstance(buf, (bytes, bytearray)):
        raw, base = buf, start
    else:
        raw, base = bytes(memoryview(buf)[start:start + span]), 0  # (rare: a copy to get byte-strided slices)
    for i in range(GENEVE_HEADER_LEN):
        if raw[base + i:base + span:seg].count(hdr[i]) != count:
            return False
    return True


class RelayServer:
    """The relay data plane and endpoint table for one server disco key.

    ``addr_ports`` must be set (:meth:`set_addr_ports`) before allocations succeed.
    Counters: ``forwarded_packets``/``forwarded_bytes`` keyed by
    ``(transport_in, transport_out)`` with values ``"udp4"``/``"udp6"``;
    ``dropped`` keyed by reason.
    """

    def __init__(
        self,
        disco_private: DiscoPrivate,
        *,
        now: float,
        bind_lifetime: float = BIND_LIFETIME,
        steady_state_lifetime: float = STEADY_STATE_LIFETIME,
    ) -> None:
        self._boxes = disco.DiscoBoxes(disco_private)
        self.disco_public: DiscoPublic = disco_private.public
        self.bind_lifetime = bind_lifetime
        self.steady_state_lifetime = steady_state_lifetime
        self._static_addr_ports: tuple[AddrPort, ...] = ()
        self._dynamic_addr_ports: tuple[AddrPort, ...] = ()
        self._by_vni: dict[int, _Endpoint] = {}
        self._by_pair: dict[tuple[bytes, bytes], _Endpoint] = {}
        self._next_vni = MIN_VNI
        self._lamport_id = 0
        self._mac_secrets: list[bytes] = []
        self._mac_rotated_at: float | None = None
        self._next_gc = now + bind_lifetime
        self.forwarded_packets: dict[tuple[str, str], int] = {}
        self.forwarded_bytes: dict[tuple[str, str], int] = {}
        self.dropped: dict[str, int] = {}
        self.stun_packets = 0

    # --- configuration ------------------------------------------------------

    def set_addr_ports(self, static: Iterable[AddrPort] = (), dynamic: Iterable[AddrPort] = ()) -> None:
        """Addresses advertised in allocations: static ones first, then discovered ones."""
        self._static_addr_ports = tuple(static)
        self._dynamic_addr_ports = tuple(ap for ap in dynamic if ap not in self._static_addr_ports)

    @property
    def addr_ports(self) -> tuple[AddrPort, ...]:
        return self._static_addr_ports + self._dynamic_addr_ports

    # --- allocation -----------------------------------------------------------

    def allocate(self, disco_a: DiscoPublic, disco_b: DiscoPublic, now: float) -> disco.UDPRelayEndpoint:
        """Allocate (or return the existing) endpoint for this unordered pair of client keys."""
        addr_ports = self.addr_ports
        if not addr_ports:
            raise RelayNotReady()
        if disco_a == self.disco_public or disco_b == self.disco_public:
            raise RelayAllocationError("client disco key equals the server disco key")
        pair = tuple(sorted((disco_a.raw, disco_b.raw)))
        ep = self._by_pair.get(pair)  # type: ignore[arg-type]
        if ep is None:
            vni = self._take_vni()
            self._lamport_id += 1
            ep = _Endpoint((DiscoPublic(pair[0]), DiscoPublic(pair[1])), self._lamport_id, vni, now)
            self._by_pair[pair] = ep  # type: ignore[index]
            self._by_vni[vni] = ep
            # Precompute both boxes now, not on the first handshake packet.
            self._boxes.box_for(ep.client_disco[0])
            self._boxes.box_for(ep.client_disco[1])
            log.info("relayserver: allocated endpoint vni=%d lamportID=%d", vni, ep.lamport_id)
        return disco.UDPRelayEndpoint(
            server_disco=self.disco_public,
            client_disco=ep.client_disco,
            lamport_id=ep.lamport_id,
            vni=ep.vni,
            bind_lifetime_ns=round(self.bind_lifetime * disco.NS_PER_SECOND),
            steady_state_lifetime_ns=round(self.steady_state_lifetime * disco.NS_PER_SECOND),
            addr_ports=addr_ports,
        )

    def _take_vni(self) -> int:
        # Sequential with wrap-around, skipping VNIs in use (RFC 6056 "traditional BSD").
        for _ in range(MAX_VNI):
            vni = self._next_vni
            self._next_vni = MIN_VNI if vni == MAX_VNI else vni + 1
            if vni not in self._by_vni:
                return vni
        raise RelayAllocationError("VNI pool exhausted")

    # --- data plane ---------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | memoryview, src: AddrPort, now: float
    ) -> tuple[bytes | memoryview, AddrPort] | None:
        """Handle one datagram; returns ``(datagram, destination)`` to send, or None.

        Forwarded datagrams are returned as the same object that came in (no copy).
        """
        n = len(data)
        if n >= 20 and data[1] == 0x01 and data[0] & 0xC0 == 0 and data[4:8] == b"\x21\x12\xa4\x42":
            # STUN binding: belongs to our own netcheck; a relay never answers it.
            self.stun_packets += 1
            return None
        if n < GENEVE_HEADER_LEN:
            return self._drop("short")
        vni = (data[4] << 16) | (data[5] << 8) | data[6]
        ep = self._by_vni.get(vni)
        if ep is None or ep.closed:
            return self._drop("unknown_vni")
        if data[1] & CONTROL_FLAG:
            if (data[2] << 8) | data[3] != PROTOCOL_DISCO:
                return self._drop("control_not_disco")
            return self._handle_control(ep, memoryview(data)[GENEVE_HEADER_LEN:], src, now)
        route = ep.route
        if route is None:
            route = ep.route = _Route.of(ep)
            if route is None:
                return self._drop("not_bound")
        found = route.side_of(src)
        if found is None:
            return self._drop("unknown_source")
        side, dst, key = found
        ep.last_seen[side] = now
        ep.packets_rx[side] += 1
        ep.bytes_rx[side] += n
        self.forwarded_packets[key] = self.forwarded_packets.get(key, 0) + 1
        self.forwarded_bytes[key] = self.forwarded_bytes.get(key, 0) + n
        return data, dst

    def forward_run(
        self, buffer: bytes | bytearray | memoryview, segment_size: int, src: AddrPort, now: float
    ) -> list[tuple[bytes | bytearray | memoryview, int, AddrPort]]:
        """Handle a run of datagrams from ``src``: ``segment_size`` bytes each, back to back, the last may be shorter.

        This is what one ``UDP_GRO`` receive hands over (:meth:`tsnet.udpio.UDPReceiver.receive_runs`).
        Returns what to send, in order, as runs ``(buffer, segment_size, destination)``
        (a single datagram is a run with ``segment_size == len(buffer)``), ready
        for :meth:`tsnet.udpio.UDPSender.send_run`. The outcome (sends, state,
        counters, drop reasons) is exactly that of :meth:`receive_datagram` on
        each segment in turn, but a stretch of segments that all carry the
        Geneve header of the first one (same VNI, data, not STUN) from a bound
        source is checked with a few C-level byte comparisons, counted once, and
        returned as one slice of ``buffer`` (``buffer`` itself when the whole run
        qualifies), never split. Anything else (control packets, other VNIs,
        short segments, strangers) goes through :meth:`receive_datagram` segment by segment.
        Raises ValueError if ``segment_size < 1``.
        """
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        n = len(buffer)
        out: list[tuple[bytes | bytearray | memoryview, int, AddrPort]] = []
        if n <= segment_size:
            res = self.receive_datagram(buffer, src, now)
            if res is not None:
                out.append((res[0], len(res[0]), res[1]))
            return out
        seg = segment_size
        # The last segment's length; one shorter than a Geneve header is never part of a fast stretch.
        tail = n - (n - 1) // seg * seg
        fast_end = n if tail >= GENEVE_HEADER_LEN else n - tail
        view: memoryview | None = None
        off = 0
        while off < n:
            if off < fast_end:
                stretch = self._forward_stretch(buffer, off, fast_end, seg, src, now)
                if stretch is not None:
                    stop, dst = stretch
                    if off == 0 and stop == n:
                        out.append((buffer, seg, dst))  # the common case: the whole run, untouched
                        return out
                    if view is None:
                        view = memoryview(buffer)
                    out.append((view[off:stop], seg, dst))
                    off = stop
                    continue
            # Not a forwardable data segment: the per-datagram path decides (and counts the drop reason).
            if view is None:
                view = memoryview(buffer)
            res = self.receive_datagram(view[off:off + seg], src, now)
            if res is not None:
                out.append((res[0], len(res[0]), res[1]))
            off += seg
        return out

    def _forward_stretch(
        self, buf: bytes | bytearray | memoryview, start: int, end: int, seg: int, src: AddrPort, now: float
    ) -> tuple[int, AddrPort] | None:
        """Forward the longest stretch of segments from ``start`` (below ``end``, each at least a Geneve header
        long) that :meth:`receive_datagram` would forward from ``src``, with the first one's endpoint.

        Counts them and returns ``(stop, destination)``; None (nothing counted) if the first would not be forwarded.
        """
        first_len = seg if end - start > seg else end - start  # noqa: FURB136 (no call: this runs per run)
        if first_len < GENEVE_HEADER_LEN:
            return None
        hdr = buf[start:start + GENEVE_HEADER_LEN]
        if type(hdr) is not bytes:
            hdr = bytes(hdr)
        if first_len >= 20 and hdr[1] == 0x01 and hdr[0] & 0xC0 == 0 and hdr[4:8] == b"\x21\x12\xa4\x42":
            return None  # looks like STUN: the per-datagram path counts it
        if hdr[1] & CONTROL_FLAG:
            return None
        ep = self._by_vni.get((hdr[4] << 16) | (hdr[5] << 8) | hdr[6])
        if ep is None or ep.closed:
            return None
        route = ep.route
        if route is None:
            route = ep.route = _Route.of(ep)
            if route is None:
                return None
        found = route.side_of(src)
        if found is None:
            return None
        side, dst, key = found
        # Every later segment must start with the very same 8 bytes: then it has the same VNI, is data
        # too, and (all but the last have the first one's length) gets the same STUN verdict. The check
        # runs at C speed over all segments at once; a mismatch (rare) is then located one by one.
        stop = end
        packets = -(-(end - start) // seg)
        if packets > 1 and not _same_headers(buf, start, seg, packets, hdr):
            stop = start + seg
            while stop < end and buf[stop:stop + GENEVE_HEADER_LEN] == hdr:
                stop += seg
            stop = min(stop, end)
            packets = -(-(stop - start) // seg)
        size = stop - start
        ep.last_seen[side] = now
        ep.packets_rx[side] += packets
        ep.bytes_rx[side] += size
        self.forwarded_packets[key] = self.forwarded_packets.get(key, 0) + packets
        self.forwarded_bytes[key] = self.forwarded_bytes.get(key, 0) + size
        return stop, dst

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return None

    def _handle_control(
        self, ep: _Endpoint, packet: memoryview, src: AddrPort, now: float
    ) -> tuple[bytes, AddrPort] | None:
        try:
            sender = disco.sender_key(packet)
        except disco.DiscoError:
            return self._drop("control_not_disco")
        if sender == ep.client_disco[0]:
            side = 0
        elif sender == ep.client_disco[1]:
            side = 1
        else:
            return self._drop("control_unknown_sender")
        try:
            _, msg = self._boxes.open_message(packet)
        except disco.DiscoError:
            return self._drop("control_bad_box")
        other = ep.client_disco[1 - side]
        if not isinstance(msg, (disco.BindUDPRelayEndpoint, disco.BindUDPRelayEndpointAnswer)):
            return self._drop("control_unexpected_message")
        if msg.vni != ep.vni or msg.remote_key != other:
            return self._drop("control_mismatch")
        secrets = self._current_mac_secrets(now)
        if isinstance(msg, disco.BindUDPRelayEndpoint):
            if msg.generation == 0:
                return self._drop("control_zero_generation")
            ep.in_progress_generation[side] = msg.generation
            challenge = disco.BindUDPRelayEndpointChallenge(
                ep.vni, msg.generation, other, self._mac(secrets[0], ep.vni, msg.generation, other, src)
            )
            reply = encode_header(PROTOCOL_DISCO, ep.vni, control=True) + self._boxes.seal(sender, challenge)
            return reply, src
        # Answer
        gen = ep.in_progress_generation[side]
        if gen == 0 or gen != msg.generation:
            return self._drop("control_stale_generation")
        for secret in secrets:
            if hmac.compare_digest(self._mac(secret, msg.vni, msg.generation, msg.remote_key, src), msg.challenge):
                ep.bound[side] = src
                ep.route = None
                ep.last_seen[side] = now
                ep.in_progress_generation[side] = 0
                return None
        return self._drop("control_bad_mac")

    @staticmethod
    def _mac(secret: bytes, vni: int, generation: int, remote: DiscoPublic, src: AddrPort) -> bytes:
        # Same construction as tailscaled (BLAKE2s-256 keyed); only we ever verify it.
        msg = _U32.pack(vni) + _U32.pack(generation) + remote.raw + _addrport_binary(src)
        return hashlib.blake2s(msg, key=secret, digest_size=32).digest()

    def _current_mac_secrets(self, now: float) -> list[bytes]:
        if self._mac_rotated_at is None or now - self._mac_rotated_at >= MAC_ROTATION_INTERVAL:
            self._mac_secrets = [os.urandom(32)] + self._mac_secrets[:1]
            self._mac_rotated_at = now
        return self._mac_secrets

    # --- timers / GC ------------------------------------------------------------------

    def get_timer(self) -> float:
        """When :meth:`handle_timer` wants to run next (garbage collection)."""
        return self._next_gc

    def handle_timer(self, now: float) -> None:
        if now < self._next_gc:
            return
        self.collect_garbage(now)
        self._next_gc = now + self.bind_lifetime

    def collect_garbage(self, now: float) -> list[int]:
        """Close expired endpoints; returns their VNIs."""
        expired = [vni for vni, ep in self._by_vni.items() if self._is_expired(ep, now)]
        for vni in expired:
            ep = self._by_vni.pop(vni)
            ep.closed = True
            self._by_pair.pop((ep.client_disco[0].raw, ep.client_disco[1].raw), None)
            log.debug("relayserver: closed endpoint vni=%d", vni)
        return expired

    def close_all(self) -> list[int]:
        """Close every endpoint at once (the node lost its relay server role); returns their VNIs.

        Datagrams for them are dropped from now on (``unknown_vni``), as if the server had stopped.
        """
        closed = list(self._by_vni)
        for ep in self._by_vni.values():
            ep.closed = True
            ep.route = None
        self._by_vni.clear()
        self._by_pair.clear()
        if closed:
            log.info("relayserver: closed all %d endpoints", len(closed))
        return closed

    def _is_expired(self, ep: _Endpoint, now: float) -> bool:
        if ep.bound[0] is None or ep.bound[1] is None:
            return now - ep.allocated_at > self.bind_lifetime
        return (
            now - ep.last_seen[0] > self.steady_state_lifetime or now - ep.last_seen[1] > self.steady_state_lifetime
        )

    # --- introspection ---------------------------------------------------------------

    def endpoint_gauge(self) -> dict[str, int]:
        """Value of ``tailscaled_peer_relay_endpoints`` by ``state`` label."""
        out = {"connecting": 0, "open": 0}
        for ep in self._by_vni.values():
            out[ep.state.value] += 1
        return out

    def sessions(self) -> list[SessionInfo]:
        return [
            SessionInfo(
                ep.vni,
                ep.lamport_id,
                ep.client_disco,
                (ep.bound[0], ep.bound[1]),
                (ep.packets_rx[0], ep.packets_rx[1]),
                (ep.bytes_rx[0], ep.bytes_rx[1]),
                ep.state,
            )
            for ep in self._by_vni.values()
        ]

    def metrics_text(self) -> str:
        """Prometheus text for the relay user metrics."""
        lines = ["# TYPE tailscaled_peer_relay_endpoints gauge"]
        for state, n in self.endpoint_gauge().items():
            lines.append(f'tailscaled_peer_relay_endpoints{{state="{state}"}} {n}')
        for name, table in (
            ("tailscaled_peer_relay_forwarded_packets_total", self.forwarded_packets),
            ("tailscaled_peer_relay_forwarded_bytes_total", self.forwarded_bytes),
        ):
            lines.append(f"# TYPE {name} counter")
            for fin in ("udp4", "udp6"):
                for fout in ("udp4", "udp6"):
                    lines.append(f'{name}{{transport_in="{fin}",transport_out="{fout}"}} {table.get((fin, fout), 0)}')
        return "\n".join(lines) + "\n"


def answer_allocate_request(
    server: RelayServer,
    node_boxes: disco.DiscoBoxes,
    src_node: NodePublic,
    packet: bytes | memoryview,
    now: float,
    *,
    disco_key_of: Callable[[NodePublic], DiscoPublic | None],
    is_granted: Callable[[NodePublic], bool],
) -> bytes | None:
    """Handle a disco packet that arrived over DERP at the relay node.

    ``node_boxes`` holds the relay *node's* disco key (not the server's).
    ``disco_key_of`` maps a netmap peer's node key to its disco key;
    ``is_granted`` says whether the packet filter grants ``tailscale.com/cap/relay``
    from that peer to this node. Returns the sealed response to send back over
    DERP to ``src_node``, or None (dropped: not an allocate request, unknown
    peer, key mismatch, not granted, not ready, bad request).
    """
    want = disco_key_of(src_node)
    if want is None:
        return None
    try:
        sender, msg = node_boxes.open_message(packet)
    except disco.DiscoError:
        return None
    if sender != want or not isinstance(msg, disco.AllocateUDPRelayEndpointRequest):
        return None
    if sender not in msg.client_disco or not is_granted(src_node):
        return None
    try:
        ep = server.allocate(msg.client_disco[0], msg.client_disco[1], now)
    except RelayError as exc:
        log.debug("relayserver: allocation for %s refused: %s", src_node.short(), exc)
        return None
    return node_boxes.seal(sender, disco.AllocateUDPRelayEndpointResponse(msg.generation, ep))
