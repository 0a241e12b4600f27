"""The sans-IO host: IP in, IP out, with ICMP, UDP and TCP demultiplexing.

:class:`Stack` owns the tables (TCP connections by 4-tuple, listeners, UDP
endpoints), answers ICMP echo, sends RST / ICMP port-unreachable for closed
ports, reassembles fragments and keeps one timer for everything. It never
reads the clock (every entry point takes ``now``), never touches a socket and
never raises on packet input: bad packets are dropped and counted in
:attr:`Stack.counters`.

Output is whole IP packets in one shared outbox (also given to every
:class:`~tsnet.netstack.tcp.TCPConnection`); the driver takes it with
:meth:`Stack.packets_to_send`. Objects whose application-visible state changed
(connections, :class:`Listener`, :class:`UDPEndpoint`) are collected in one
shared list; the driver takes it with :meth:`Stack.take_changed` and wakes the
tasks waiting on them.

Application calls on connections go through the stack (``tcp_send``,
``tcp_receive``, ``tcp_close`` ...) so it can re-arm the connection's timer
and forget connections that reached CLOSED.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import ipaddress
import logging
import os
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Union

from . import checksum
from . import ip as ipmod
from . import tcp_wire
from .ip import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, MalformedPacket
from .tcp import TCPConnection, TCPOptions, TCPState
from .tcp_wire import ACK, FIN, RST, SYN, BadSegment

__all__ = [
    "EPHEMERAL_PORTS",
    "Listener",
    "Stack",
    "StackCounters",
    "UDPEndpoint",
    "max_udp_payload",
]

log = logging.getLogger(__name__)

IPAddressLike = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str]

#: IANA dynamic port range (RFC 6335), used for ephemeral ports.
EPHEMERAL_PORTS = range(49152, 65536)

_UDP_HDR = struct.Struct("!HHHH")
_ICMP_HDR = struct.Struct("!BBHHH")  # type, code, checksum, identifier/unused, sequence/unused
_TCP_PORTS = struct.Struct("!HH")

ICMP4_ECHO_REPLY = 0
ICMP4_UNREACHABLE = 3
ICMP4_ECHO_REQUEST = 8
ICMP4_TIME_EXCEEDED = 11
ICMP4_PARAM_PROBLEM = 12
ICMP4_CODE_PROTO_UNREACHABLE = 2
ICMP4_CODE_PORT_UNREACHABLE = 3
ICMP4_CODE_FRAG_NEEDED = 4
ICMP6_UNREACHABLE = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAM_PROBLEM = 4
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP6_CODE_PORT_UNREACHABLE = 4
ICMP6_CODE_UNRECOGNIZED_NEXT_HEADER = 1
# TSMP (IP protocol 99) message types (wireguard-netstack.md B.1).
TSMP_REJECT = 0x21
TSMP_PING = 0x70
TSMP_PONG = 0x6F

# How much of the offending packet an ICMP error quotes: RFC 1812 §4.3.2.3 (576 total)
# for v4, RFC 4443 §2.4 (the minimum MTU, 1280 total) for v6.
_ICMP4_ERROR_MAX = 576
_ICMP6_ERROR_MAX = 1280


def max_udp_payload(version: int, mtu: int = 1280) -> int:
    """Largest UDP payload we send unfragmented: 1252 (v4) / 1232 (v6) at MTU 1280."""
    return mtu - (28 if version == 4 else 48)


class InboundFilter(Protocol):
    """What :meth:`Stack.receive_packets` needs of a packet filter (:class:`tsnet.netstack.filter.FilterState`)."""

    accepted: int

    @property
    def fast_tcp4_hosts(self) -> frozenset[bytes]: ...

    def admit(self, packet: bytes | bytearray | memoryview) -> bool: ...


@dataclass(slots=True)
class StackCounters:
    """Drops and events of the whole stack (per-connection counters live in ``TCPConnection.stats``)."""

    packets_received: int = 0
    packets_sent_direct: int = 0  # packets the stack itself built (RST, ICMP, UDP)
    malformed: int = 0  # bad IP/TCP/UDP/ICMP framing
    bad_checksum: int = 0
    not_for_us: int = 0  # destination is not one of our addresses
    unknown_protocol: int = 0
    internal_errors: int = 0  # a bug surfaced while handling a packet; logged, packet dropped
    fragments: int = 0
    reassembled: int = 0
    icmp_echo_replies: int = 0
    icmp_errors_received: int = 0
    icmp_errors_sent: int = 0
    icmp_rate_limited: int = 0
    icmp_ignored: int = 0
    oversize_reply_dropped: int = 0  # an echo reply would need fragmentation (we never fragment)
    tcp_segments: int = 0
    tcp_rst_sent: int = 0  # RSTs for segments to closed ports / listeners
    tcp_syn_dropped: int = 0  # SYN-RECEIVED or accept queue bound reached
    tcp_accept_overflow: int = 0  # handshake completed while the accept queue was full: reset
    tcp_connections_opened: int = 0
    tcp_connections_closed: int = 0
    udp_datagrams: int = 0
    udp_delivered: int = 0
    udp_queue_full: int = 0
    udp_no_port: int = 0
    udp_wrong_peer: int = 0  # datagram from another address to a connected endpoint
    mss_lowered: int = 0  # frag-needed / packet-too-big lowered a connection's MSS
    tsmp_pongs: int = 0
    tsmp_rejects: int = 0
    loopback_packets: int = 0  # packets to our own addresses, received without leaving
    bad_source: int = 0  # source address no host may use (multicast, broadcast, unspecified, loopback)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _TokenBucket:
    """Rate limiter for the ICMP messages we generate (gVisor: 1000/s, burst 50)."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        elapsed = now - self.last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Listener:
    """A listening TCP port (sans-IO). The driver waits on ``app_changed`` for new connections.

    ``accept_queue`` holds established connections not yet accepted; ``half_open``
    the SYN-RECEIVED ones. Both are bounded by ``backlog``.
    """

    __slots__ = ("local_ip", "port", "backlog", "accept_queue", "half_open", "closed", "app_changed", "_changed")

    def __init__(self, local_ip: bytes | None, port: int, backlog: int, changed: list) -> None:
        self.local_ip = local_ip  # None: every address of ours
        self.port = port
        self.backlog = backlog
        self.accept_queue: deque[TCPConnection] = deque()
        self.half_open: set[TCPConnection] = set()
        self.closed = False
        self.app_changed = False
        self._changed = changed

    def _notify(self) -> None:
        if not self.app_changed:
            self.app_changed = True
            self._changed.append(self)

    def __repr__(self) -> str:
        return f"<Listener port={self.port} queued={len(self.accept_queue)} half_open={len(self.half_open)}>"


class UDPEndpoint:
    """A bound UDP port (sans-IO): a bounded queue of ``(payload, (src_ip_bytes, src_port))``.

    In connected mode (``remote`` set) only datagrams from that address are queued.
    ``error`` is set (and the endpoint marked changed) when an ICMP port-unreachable
    answers a connected endpoint, like a kernel UDP socket; reading it clears it.
    """

    __slots__ = ("local_ip", "port", "remote", "queue", "queue_limit", "dropped", "closed", "error",
                 "app_changed", "_changed")

    def __init__(self, local_ip: bytes | None, port: int, queue_limit: int, changed: list) -> None:
        self.local_ip = local_ip  # None: every address of ours
        self.port = port
        self.remote: tuple[bytes, int] | None = None
        self.queue: deque[tuple[bytes, tuple[bytes, int]]] = deque()
        self.queue_limit = queue_limit
        self.dropped = 0
        self.closed = False
        self.error: OSError | None = None
        self.app_changed = False
        self._changed = changed

    def _notify(self) -> None:
        if not self.app_changed:
            self.app_changed = True
            self._changed.append(self)

    def __repr__(self) -> str:
        return f"<UDPEndpoint port={self.port} queued={len(self.queue)}>"


def _packed(addr: IPAddressLike | bytes) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError(f"raw address must be 4 or 16 bytes, got {len(addr)}")
        return addr
    if isinstance(addr, str):
        text = addr.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if "/" in text:
            return ipaddress.ip_interface(text).ip.packed
        return ipaddress.ip_address(text).packed
    return addr.packed


def _bad_source(src: bytes) -> bool:
    """A source address no single host may send from (RFC 1122 §3.2.1.3, RFC 4291 §2.5.2 / §2.7):
    IPv4 0/8, 127/8, 224/4 multicast, 240/4 and the limited broadcast; IPv6 ::, ::1 and ff00::/8."""
    if len(src) == 4:
        first = src[0]
        return first == 0 or first == 127 or first >= 224
    return src[0] == 0xFF or (not any(src[:15]) and src[15] <= 1)


#: Transport headers a first fragment must hold in full (the ports and, for TCP, the flags).
_MIN_TRANSPORT_HEADER = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 8, PROTO_ICMPV6: 8}


def _first_fragment_ok(ip: ipmod.ParsedIP, proto: int, payload: memoryview) -> bool:
    """Offset 0: the rest of the header chain and the transport header fit in this fragment.
    An IPv4 TCP fragment at offset 8 (RFC 1858 §3.2: it could rewrite the flags) is never ok."""
    if ip.frag_offset:
        return False
    if ip.version == 6:
        try:
            proto, payload = ipmod.skip_v6_extensions(proto, payload)
        except MalformedPacket:
            return False
    return len(payload) >= _MIN_TRANSPORT_HEADER.get(proto, 0)


def _dst_of(packet: bytes | bytearray) -> bytes:
    """Destination address of one of our own (well-formed) outgoing packets."""
    return bytes(packet[16:20]) if packet[0] >> 4 == 4 else bytes(packet[24:40])


def _ip_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int = 0) -> bytes:
    if len(src) == 4:
        return ipmod.ipv4_header(src, dst, proto, payload_len, ident=ident, df=True)
    return ipmod.ipv6_header(src, dst, proto, payload_len)


#: version/IHL, total length, fragment field, protocol, source, destination of an IPv4 header
_V4_FAST = struct.Struct("!BxHxxHxBxx4s4s")
#: A 32-byte TCP header (after a 20-byte IPv4 header) with the usual timestamp option layout:
#: ports, seq, ack, flags, window, the option word, TSval, TSecr (data offset and checksum skipped).
_TCP_TS_AT_20 = struct.Struct("!HHIIxBH4xIII")
_TS_LAYOUT = tcp_wire.TS_LAYOUT


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        return checksum.pseudo_header_v4(src, dst, proto) + length
    return checksum.pseudo_header_v6(src, dst, proto) + length


class Stack:
    """A userspace IPv4/IPv6 host as a sans-IO core.

    Args:
        addresses: our addresses (IP literals, ``ipaddress`` objects, or ``"ip/len"``).
        now: the driver's current time.
        tcp_options: defaults for every new TCP connection.
        rng: ``rng(n) -> n random bytes`` (ISN secret, ephemeral ports); os.urandom by default.
        mtu: the tunnel MTU; bounds UDP payloads and echo replies (we never fragment).
        max_half_open: global bound on SYN-RECEIVED connections (a SYN flood cannot grow memory);
            one source address may use at most two thirds of it.
        udp_queue_limit: datagrams queued per UDP endpoint before new ones are dropped.
        icmp_rate, icmp_burst: token bucket for ICMP we generate (echo replies and errors).
        reassembly_timeout, reassembly_timeout_v6, reassembly_memory: bounds of the fragment
            reassemblers (gVisor's: 30 s for IPv4, 60 s for IPv6, 4 MiB each).
        coalesce_acks: ACK in-order data once per :meth:`receive_packets` batch (plus every
            ``tcp.ACK_STRETCH_SEGMENTS`` full segments within a big batch) rather
            than every second segment: far fewer ACKs to build, encrypt and send, and for
            the peer to process, while a bulk sender is feeding us. Linux senders grow
            their window by bytes acknowledged, so stretch ACKs do not slow them down.
        verify_checksums: check TCP and UDP checksums of received packets (default). Turn it
            off only when every packet reaching :meth:`receive_packets` was authenticated on
            the way in, as WireGuard's Poly1305 tag does: Linux's WireGuard marks decrypted
            packets ``CHECKSUM_UNNECESSARY`` for the same reason. Summing every payload costs
            microseconds per packet here. IPv4 header and ICMP checksums are always checked.
    """

    def __init__(
        self,
        addresses: Iterable[IPAddressLike],
        *,
        now: float,
        tcp_options: TCPOptions = TCPOptions(),
        rng: Callable[[int], bytes] | None = None,
        mtu: int = 1280,
        max_half_open: int = 1024,
        udp_queue_limit: int = 512,
        icmp_rate: float = 1000.0,
        icmp_burst: int = 50,
        reassembly_timeout: float = 30.0,
        reassembly_timeout_v6: float = 60.0,
        reassembly_memory: int = 4 << 20,
        coalesce_acks: bool = True,
        verify_checksums: bool = True,
    ) -> None:
        self.tcp_options = tcp_options
        self.coalesce_acks = coalesce_acks
        self.verify_checksums = verify_checksums
        #: hand consecutive in-order segments of one connection over as a run (same outcome as one by one;
        #: tests switch it off to compare)
        self.batch_segments = True
        #: PeerAPI port put in TSMP pongs (0: none)
        self.peerapi_port = 0
        self.mtu = mtu
        self.max_half_open = max_half_open
        self.udp_queue_limit = udp_queue_limit
        self.counters = StackCounters()
        self._rng = rng if rng is not None else os.urandom
        self._isn_key = self._rng(32)
        self._port_rng = random.Random(int.from_bytes(self._rng(8), "big"))
        self._addresses: set[bytes] = set()
        self._v4: list[bytes] = []
        self._v6: list[bytes] = []
        self.set_addresses(addresses)
        #: whole IP packets waiting to be sent; shared with every TCPConnection
        self.outbox: list[bytes | bytearray] = []
        #: objects whose app-visible state changed; shared with every TCPConnection
        self.changed: list = []
        self.connections: dict[tuple[bytes, int, bytes, int], TCPConnection] = {}
        self.listeners: dict[tuple[bytes | None, int], Listener] = {}
        self.udp_endpoints: dict[tuple[bytes | None, int], UDPEndpoint] = {}
        self._listener_of: dict[TCPConnection, Listener] = {}  # SYN-RECEIVED conns -> their listener
        self._half_open = 0
        self._half_open_by_src: dict[bytes, int] = {}
        #: one source may hold at most this many SYN-RECEIVED slots, so a flooding peer leaves room for others
        self.max_half_open_per_source = max(1, max_half_open * 2 // 3)
        self._reassembler = ipmod.Reassembler(
            timeout=reassembly_timeout, high_water=reassembly_memory, low_water=reassembly_memory * 3 // 4
        )
        self._reassembler6 = ipmod.Reassembler(
            timeout=reassembly_timeout_v6, high_water=reassembly_memory, low_water=reassembly_memory * 3 // 4
        )
        self._icmp_bucket = _TokenBucket(icmp_rate, icmp_burst, now)
        self._ip_ident = self._port_rng.randrange(1 << 16)
        # Timer heap of (deadline, tie-breaker, connection) with lazy invalidation:
        # _deadline_of holds the one valid deadline per connection; other entries are stale.
        self._heap: list[tuple[float, int, TCPConnection]] = []
        self._deadline_of: dict[TCPConnection, float] = {}
        self._heap_seq = 0

    # -- addresses ---------------------------------------------------------------------------------------------------

    def set_addresses(self, addresses: Iterable[IPAddressLike]) -> None:
        """Replace our addresses. Existing connections keep working; new packets to old addresses are dropped."""
        packed = [_packed(a) for a in addresses]
        self._addresses = set(packed)
        self._v4 = [a for a in packed if len(a) == 4]
        self._v6 = [a for a in packed if len(a) == 16]

    @property
    def addresses(self) -> list[bytes]:
        """Our addresses, raw (IPv4 first)."""
        return self._v4 + self._v6

    def source_for(self, remote_ip: bytes) -> bytes:
        """Our address of the same family as ``remote_ip``; OSError(EADDRNOTAVAIL) if we have none."""
        mine = self._v4 if len(remote_ip) == 4 else self._v6
        if not mine:
            raise OSError(errno.EADDRNOTAVAIL, f"no local IPv{4 if len(remote_ip) == 4 else 6} address")
        return mine[0]

    # -- output, changes, timers -------------------------------------------------------------------------------------

    def packets_to_send(self) -> list[bytes | bytearray]:
        """Take every IP packet produced so far.

        Packets addressed to one of our own addresses never leave: they are
        received here (loopback), at the time of the latest stack interaction,
        until no more local packets are produced.
        """
        outbox = self.outbox
        out = outbox[:]
        outbox.clear()
        addrs = self._addresses
        # (_dst_of inlined for the common IPv4 bytes packet: this runs once per packet sent)
        local = [p for p in out if (p[16:20] if p.__class__ is bytes and p[0] == 0x45 else _dst_of(p)) in addrs]
        if not local:
            return out
        remote = [p for p in out if _dst_of(p) not in addrs]
        while local:
            self.counters.loopback_packets += len(local)
            self.receive_packets(local, self._last_now)
            produced = outbox[:]
            outbox.clear()
            local = []
            for p in produced:
                (local if _dst_of(p) in addrs else remote).append(p)
        return remote

    def take_changed(self) -> list:
        """Take the connections, listeners and UDP endpoints whose app-visible state changed.

        Their ``app_changed`` flags are reset, so the next change reports them again.
        """
        out = self.changed[:]
        self.changed.clear()
        for obj in out:
            obj.app_changed = False
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline of any connection or the fragment reassembler, or None."""
        heap = self._heap
        deadline_of = self._deadline_of
        while heap:
            t, _, conn = heap[0]
            if deadline_of.get(conn) == t:
                break
            heapq.heappop(heap)  # stale entry
        t = heap[0][0] if heap else None
        for r in (self._reassembler.next_deadline(), self._reassembler6.next_deadline()):
            if r is not None and (t is None or r < t):
                t = r
        return t

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        heap = self._heap
        deadline_of = self._deadline_of
        due: list[TCPConnection] = []
        while heap and heap[0][0] <= now:
            t, _, conn = heapq.heappop(heap)
            if deadline_of.get(conn) == t:
                del deadline_of[conn]
                due.append(conn)
        for conn in due:
            try:
                conn.handle_timer(now)
            except Exception:
                self.counters.internal_errors += 1
                log.exception("netstack: connection timer failed; aborting %r", conn)
                self._safe_abort(conn, now)
            self._touch(conn)
        self._reassembler.expire(now)
        self._reassembler6.expire(now)

    def _touch(self, conn: TCPConnection) -> None:
        """After anything happened to ``conn``: re-arm its timer, move it out of its listener's
        half-open set once established, forget it once CLOSED."""
        if conn.state == TCPState.CLOSED:
            self._forget(conn)
            return
        listener = self._listener_of.get(conn)
        if listener is not None and conn.is_established:
            self._promote(conn, listener)
            if conn.state == TCPState.CLOSED:  # the accept queue was full: reset
                self._forget(conn)
                return
        t = conn.get_timer()
        old = self._deadline_of.get(conn)
        if t == old:
            return
        if t is None:
            del self._deadline_of[conn]
            return
        self._deadline_of[conn] = t
        self._heap_seq += 1
        heapq.heappush(self._heap, (t, self._heap_seq, conn))
        if len(self._heap) > 64 + 4 * len(self._deadline_of):
            self._compact_heap()

    def _compact_heap(self) -> None:
        # Every ACK may move a connection's deadline; stale entries pile up without this.
        self._heap = [e for e in self._heap if self._deadline_of.get(e[2]) == e[0]]
        heapq.heapify(self._heap)

    def _forget(self, conn: TCPConnection) -> None:
        key = (conn.local_ip, conn.local_port, conn.remote_ip, conn.remote_port)
        if self.connections.get(key) is conn:
            del self.connections[key]
            self.counters.tcp_connections_closed += 1
        self._deadline_of.pop(conn, None)
        listener = self._listener_of.pop(conn, None)
        if listener is not None:
            listener.half_open.discard(conn)
            self._half_open_done(conn)

    def _half_open_done(self, conn: TCPConnection) -> None:
        self._half_open -= 1
        src = conn.remote_ip
        n = self._half_open_by_src.get(src, 0) - 1
        if n > 0:
            self._half_open_by_src[src] = n
        else:
            self._half_open_by_src.pop(src, None)

    def _promote(self, conn: TCPConnection, listener: Listener) -> None:
        del self._listener_of[conn]
        listener.half_open.discard(conn)
        self._half_open_done(conn)
        if listener.closed or len(listener.accept_queue) >= listener.backlog:
            self.counters.tcp_accept_overflow += 1
            self._safe_abort(conn, None)
            return
        listener.accept_queue.append(conn)
        listener._notify()

    def _safe_abort(self, conn: TCPConnection, now: float | None) -> None:
        try:
            conn.abort(now if now is not None else self._last_now)
        except Exception:
            self.counters.internal_errors += 1
            log.exception("netstack: abort failed for %r", conn)
        key = (conn.local_ip, conn.local_port, conn.remote_ip, conn.remote_port)
        if self.connections.get(key) is conn:
            del self.connections[key]
            self.counters.tcp_connections_closed += 1
        self._deadline_of.pop(conn, None)

    def _safe_abort_quietly(self, conn: TCPConnection) -> None:
        """Drop ``conn`` from every table without sending anything (its 4-tuple is being reused)."""
        key = (conn.local_ip, conn.local_port, conn.remote_ip, conn.remote_port)
        if self.connections.get(key) is conn:
            del self.connections[key]
            self.counters.tcp_connections_closed += 1
        self._deadline_of.pop(conn, None)

    _last_now = 0.0

    # -- packets in --------------------------------------------------------------------------------------------------

    def receive_packet(self, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Process one IP packet. Never raises."""
        self.receive_packets((packet,), now)

    def receive_packets(self, packets: Iterable[bytes | bytearray | memoryview], now: float,
                        inbound_filter: InboundFilter | None = None) -> None:
        """Process a batch of IP packets; each touched connection's timer is re-armed once. Never raises.

        ``inbound_filter`` (packets from peers) judges each packet before the stack sees it: a
        packet it refuses is dropped without counting as received. Segments that its first rule
        accepts anyway (non-SYN TCP to ``fast_tcp4_hosts``) are recognised here from the header
        the fast path parses, without a call per packet.
        """
        self._last_now = now
        admit = None
        fast4: frozenset[bytes] = frozenset()
        if inbound_filter is not None:
            admit = inbound_filter.admit
            fast4 = inbound_filter.fast_tcp4_hosts
        admitted_fast = refused = 0
        touched: dict[TCPConnection, None] = {}
        counters = self.counters
        addresses = self._addresses
        unpack_v4 = _V4_FAST.unpack_from
        from_bytes = int.from_bytes
        verify = self.verify_checksums
        residue = checksum.residue
        unpack_tcp_ts = _TCP_TS_AT_20.unpack_from
        connections = self.connections
        batch_segments = self.batch_segments
        # Consecutive fast-path segments of one connection are collected into a run and handed over
        # together (TCPConnection.receive_fast_run); anything else first flushes the run, so every
        # connection still sees its segments in arrival order.
        run_conn: TCPConnection | None = None
        run: list[tuple[Any, ...]] = []
        for packet in packets:
            counters.packets_received += 1
            try:
                n = len(packet)
                if n >= 40 and packet[0] == 0x45 and type(packet) is bytes:
                    _vihl, total, frag, proto, src, dst = unpack_v4(packet)
                    if proto == PROTO_TCP and total == n and not frag & 0x3FFF and dst in addresses:
                        if admit is not None:
                            if packet[33] & 0x12 != 0x02 and dst in fast4:  # flags: not a bare SYN
                                admitted_fast += 1
                            elif not admit(packet):
                                refused += 1
                                continue
                        # Fast path for the bulk of traffic: unfragmented IPv4 TCP, no IP options,
                        # no padding. Both checksums come from two big-integer residues: the
                        # header's, and the whole packet's, which is the header's plus the TCP
                        # segment's (a 20-byte header keeps the 16-bit word alignment).
                        if from_bytes(packet[:20], "big") % 0xFFFF:
                            raise MalformedPacket("IPv4 header checksum")
                        counters.tcp_segments += 1
                        if verify:
                            tcp_len = n - 20
                            r = residue(packet)
                            if tcp_len & 1:
                                r <<= 8  # pad the odd segment with a zero byte (the header's part is 0)
                            if (r + from_bytes(src, "big") + from_bytes(dst, "big") + PROTO_TCP + tcp_len) % 0xFFFF:
                                counters.bad_checksum += 1
                                continue
                        if n >= 52 and packet[32] == 0x80:
                            # The common segment of an established connection: parsed here in one
                            # unpack, no Segment object, straight into the connection's fast path.
                            h = unpack_tcp_ts(packet, 20)  # sport, dport, seq, ack, flags, window, layout, tsval, tsecr
                            if h[6] == _TS_LAYOUT:
                                conn = connections.get((dst, h[1], src, h[0]))
                                if conn is not None:
                                    if batch_segments:
                                        if conn is not run_conn:
                                            if run:
                                                self._flush_run(run_conn, run, now, touched)  # type: ignore[arg-type]
                                            run_conn, run = conn, []
                                        run.append((h, packet))
                                        continue
                                    if conn.receive_fast(h[2], h[3], h[4], h[5], h[7], h[8],
                                                         memoryview(packet)[52:], now):
                                        touched[conn] = None
                                        continue
                        if run:
                            self._flush_run(run_conn, run, now, touched)  # type: ignore[arg-type]
                            run_conn, run = None, []
                        self._tcp_segment(src, dst, memoryview(packet)[20:], now, touched)
                        continue
                if admit is not None and not admit(packet):
                    refused += 1
                    continue
                if run:
                    self._flush_run(run_conn, run, now, touched)  # type: ignore[arg-type]
                    run_conn, run = None, []
                self._receive_one(packet, now, touched)
            except (MalformedPacket, BadSegment, struct.error, IndexError, ValueError):
                counters.malformed += 1
            except Exception:
                counters.internal_errors += 1
                log.exception("netstack: error while handling a packet (dropped)")
        if run:
            self._flush_run(run_conn, run, now, touched)  # type: ignore[arg-type]
        if inbound_filter is not None:
            inbound_filter.accepted += admitted_fast
            counters.packets_received -= refused
        for conn in touched:
            try:
                if conn.coalesce_acks:
                    conn.flush_acks(now)  # the one ACK for this batch's in-order data
                self._touch(conn)
            except Exception:
                counters.internal_errors += 1
                log.exception("netstack: error while re-arming a connection")

    def _flush_run(self, conn: TCPConnection, run: list[tuple[Any, ...]], now: float,
                   touched: dict[TCPConnection, None]) -> None:
        """Hand a run of pre-parsed segments of ``conn`` over: whole stretches where the connection
        takes them together, the others one by one (fast path, else the general rules)."""
        touched[conn] = None
        i, n = 0, len(run)
        while i < n:
            try:
                k = conn.receive_fast_run(run, i, now)
                if k:
                    i += k
                    continue
                h, packet = run[i]
                i += 1
                if not conn.receive_fast(h[2], h[3], h[4], h[5], h[7], h[8], memoryview(packet)[52:], now):
                    self._tcp_segment(conn.remote_ip, conn.local_ip, memoryview(packet)[20:], now, touched)
            except (MalformedPacket, BadSegment, struct.error, IndexError, ValueError):
                self.counters.malformed += 1
            except Exception:
                self.counters.internal_errors += 1
                log.exception("netstack: error while handling a packet (dropped)")

    def _receive_one(self, packet: bytes | bytearray | memoryview, now: float,
                     touched: dict[TCPConnection, None]) -> None:
        ip = ipmod.parse(packet)
        if ip.dst not in self._addresses:
            self.counters.not_for_us += 1
            return
        if _bad_source(ip.src) and ip.src not in self._addresses:
            self.counters.bad_source += 1  # RFC 1122 §3.2.1.3: silently discarded
            return
        proto = ip.proto
        payload = ip.payload
        whole = True  # the packet in hand is the whole datagram (ICMP errors may quote it)
        if ip.is_fragment and ip.version == 6 and ip.frag_offset == 0 and not ip.more_fragments:
            # An atomic fragment (RFC 6946 §4): a whole datagram, never mixed with pending fragments.
            proto, payload = ipmod.skip_v6_extensions(proto, payload)
        elif ip.is_fragment:
            self.counters.fragments += 1
            if ip.frag_offset == 0 or (ip.frag_offset == 8 and proto == PROTO_TCP and ip.version == 4):
                if not _first_fragment_ok(ip, proto, payload):
                    # RFC 7112 (IPv6) / RFC 1858 (IPv4): the first fragment must carry the whole header
                    # chain and transport header, so no filter judges a header split across fragments.
                    raise MalformedPacket("first fragment without the transport header")
            key = (ip.version, ip.src, ip.dst, proto, ip.frag_id)
            reassembler = self._reassembler if ip.version == 4 else self._reassembler6
            data = reassembler.add(key, ip.frag_offset, payload, ip.more_fragments, now)
            if data is None:
                return
            self.counters.reassembled += 1
            payload = memoryview(data)
            whole = False
            if ip.version == 6:
                proto, payload = ipmod.skip_v6_extensions(proto, payload)
        if proto == PROTO_TCP:
            self._receive_tcp(ip.src, ip.dst, payload, now, touched)
        elif proto == PROTO_UDP:
            self._receive_udp(ip.src, ip.dst, payload, packet if whole else None, now)
        elif proto == PROTO_ICMP and ip.version == 4:
            self._receive_icmp4(ip.src, ip.dst, payload, now, touched)
        elif proto == PROTO_ICMPV6 and ip.version == 6:
            self._receive_icmp6(ip.src, ip.dst, payload, now, touched)
        elif proto == ipmod.PROTO_TSMP and whole:
            self._receive_tsmp(ip, payload, now, touched)
        else:
            self.counters.unknown_protocol += 1
            if whole and not ip.is_fragment and proto != ipmod.PROTO_NONE and proto != PROTO_ICMP \
                    and proto != PROTO_ICMPV6:
                # (never an ICMP error about an ICMP message, nor about "no next header": RFC 8200 §4.7)
                self._send_protocol_unreachable(ip, packet, now)

    # -- TCP ---------------------------------------------------------------------------------------------------------

    def _receive_tcp(self, src: bytes, dst: bytes, seg_bytes: memoryview, now: float,
                     touched: dict[TCPConnection, None]) -> None:
        counters = self.counters
        counters.tcp_segments += 1
        if self.verify_checksums and not checksum.verify(seg_bytes, _pseudo(src, dst, PROTO_TCP, len(seg_bytes))):
            counters.bad_checksum += 1
            return
        self._tcp_segment(src, dst, seg_bytes, now, touched)

    def _tcp_segment(self, src: bytes, dst: bytes, seg_bytes: memoryview, now: float,
                     touched: dict[TCPConnection, None]) -> None:
        """A TCP segment whose checksum was verified: parse it, hand it to its connection or listener."""
        counters = self.counters
        seg = tcp_wire.parse(seg_bytes)
        conn = self.connections.get((dst, seg.dport, src, seg.sport))
        if conn is not None:
            # (SYN tested first: it is cheap and almost always clear.)
            if not (seg.flags & SYN and conn.state == TCPState.TIME_WAIT and conn.time_wait_reopen_ok(seg)):
                conn.receive_segment(seg, now)
                touched[conn] = None
                return
            # A new incarnation of the 4-tuple (RFC 9293 §3.10.7.4): forget the old one, then LISTEN rules.
            self._safe_abort_quietly(conn)
        flags = seg.flags
        if flags & RST:
            return  # never answer a RST
        if _bad_source(src) and src not in self._addresses:
            # (the general path checks this too; the IPv4 fast path reaches here without it)
            counters.bad_source += 1  # no SYN-ACK or RST to a multicast/broadcast source (RFC 1122 §4.2.3.10)
            return
        listener = self.listeners.get((dst, seg.dport)) or self.listeners.get((None, seg.dport))
        if listener is not None and not listener.closed:
            if flags & ACK:
                self._send_rst(dst, src, seg)  # no connection for this ACK (e.g. it already died)
                return
            if not flags & SYN:
                return  # LISTEN: anything else is dropped
            if flags & FIN:
                return  # SYN+FIN is no connection attempt (a scanner's probe); Linux drops it too
            if (len(listener.half_open) >= listener.backlog
                    or len(listener.accept_queue) >= listener.backlog
                    or self._half_open >= self.max_half_open
                    or self._half_open_by_src.get(src, 0) >= self.max_half_open_per_source):
                counters.tcp_syn_dropped += 1  # the peer retransmits; a flood cannot grow our tables
                return
            iss, ts_offset = self._isn(dst, seg.dport, src, seg.sport, now)
            conn = TCPConnection.passive(
                dst, seg.dport, src, seg.sport, seg, iss=iss, now=now, outbox=self.outbox,
                changed=self.changed, options=self.tcp_options, ts_offset=ts_offset,
            )
            conn.coalesce_acks = self.coalesce_acks
            self.connections[(dst, seg.dport, src, seg.sport)] = conn
            counters.tcp_connections_opened += 1
            listener.half_open.add(conn)
            self._listener_of[conn] = listener
            self._half_open += 1
            self._half_open_by_src[src] = self._half_open_by_src.get(src, 0) + 1
            touched[conn] = None
            return
        self._send_rst(dst, src, seg)

    def _send_rst(self, src: bytes, dst: bytes, seg: tcp_wire.Segment) -> None:
        """RST for a segment that has no connection (RFC 9293 §3.10.7.1)."""
        if seg.flags & ACK:
            seq, ack, flags = seg.ack, 0, RST
        else:
            seg_len = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
            seq, ack, flags = 0, (seg.seq + seg_len) & 0xFFFFFFFF, RST | ACK
        tcp = bytearray(tcp_wire.HEADER.pack(seg.dport, seg.sport, seq, ack, 5 << 4, flags, 0, 0, 0))
        ck = checksum.checksum(tcp, _pseudo(src, dst, PROTO_TCP, 20))
        tcp[16] = ck >> 8
        tcp[17] = ck & 0xFF
        self.outbox.append(_ip_header(src, dst, PROTO_TCP, 20) + tcp)
        self.counters.tcp_rst_sent += 1
        self.counters.packets_sent_direct += 1

    def _isn(self, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int,
             now: float) -> tuple[int, int]:
        """RFC 6528 ISN (4 µs clock + keyed hash of the 4-tuple) and a per-connection timestamp offset."""
        h = hashlib.blake2s(
            local_ip + remote_ip + _TCP_PORTS.pack(local_port, remote_port), key=self._isn_key, digest_size=8
        ).digest()
        iss = (int(now * 250_000) + int.from_bytes(h[:4], "big")) & 0xFFFFFFFF
        return iss, int.from_bytes(h[4:], "big")

    def _ephemeral_port(self, taken: Callable[[int], bool]) -> int:
        span = len(EPHEMERAL_PORTS)
        start = self._port_rng.randrange(span)
        for i in range(span):
            port = EPHEMERAL_PORTS[(start + i) % span]
            if not taken(port):
                return port
        raise OSError(errno.EADDRINUSE, "no free ephemeral port")

    def tcp_connect(self, remote_ip: IPAddressLike | bytes, remote_port: int, now: float, *,
                    local_ip: IPAddressLike | bytes | None = None, local_port: int = 0,
                    options: TCPOptions | None = None) -> TCPConnection:
        """Active open; the SYN is in the outbox. Raises OSError (EADDRNOTAVAIL, EADDRINUSE) or ValueError."""
        rip = _packed(remote_ip)
        if not 0 < remote_port < 65536:
            raise ValueError(f"bad port {remote_port}")
        if _bad_source(rip) and rip not in self._addresses:
            # TCP needs one peer: not a multicast, broadcast or unspecified address (Linux: ENETUNREACH).
            raise OSError(errno.ENETUNREACH, "cannot connect TCP to a multicast, broadcast or unspecified address")
        lip = self.source_for(rip) if local_ip is None else _packed(local_ip)
        if lip not in self._addresses or len(lip) != len(rip):
            raise OSError(errno.EADDRNOTAVAIL, "local address is not ours or of the wrong family")
        if local_port == 0:
            local_port = self._ephemeral_port(
                lambda p: (lip, p, rip, remote_port) in self.connections
                or (lip, p) in self.listeners or (None, p) in self.listeners
            )
        elif (lip, local_port, rip, remote_port) in self.connections:
            raise OSError(errno.EADDRINUSE, "4-tuple in use")
        self._last_now = now
        iss, ts_offset = self._isn(lip, local_port, rip, remote_port, now)
        conn = TCPConnection.active(
            lip, local_port, rip, remote_port, iss=iss, now=now, outbox=self.outbox, changed=self.changed,
            options=options or self.tcp_options, ts_offset=ts_offset,
        )
        conn.coalesce_acks = self.coalesce_acks
        self.connections[(lip, local_port, rip, remote_port)] = conn
        self.counters.tcp_connections_opened += 1
        self._touch(conn)
        return conn

    def tcp_listen(self, port: int, *, local_ip: IPAddressLike | bytes | None = None,
                   backlog: int = 128) -> Listener:
        """Listen on ``port`` (0: an ephemeral one). Raises OSError(EADDRINUSE / EADDRNOTAVAIL)."""
        lip = None if local_ip is None else _packed(local_ip)
        if lip is not None and lip not in self._addresses:
            raise OSError(errno.EADDRNOTAVAIL, "address is not ours")
        if port == 0:
            port = self._ephemeral_port(lambda p: (lip, p) in self.listeners or (None, p) in self.listeners)
        elif not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        if (lip, port) in self.listeners or (None, port) in self.listeners or (
            lip is None and any(k[1] == port for k in self.listeners)
        ):
            raise OSError(errno.EADDRINUSE, f"TCP port {port} already listening")
        listener = Listener(lip, port, max(1, backlog), self.changed)
        self.listeners[(lip, port)] = listener
        return listener

    def tcp_accept(self, listener: Listener) -> TCPConnection | None:
        """The next established connection of ``listener``, or None."""
        if listener.accept_queue:
            return listener.accept_queue.popleft()
        return None

    def close_listener(self, listener: Listener, now: float) -> None:
        """Stop listening: queued and half-open connections are reset."""
        if listener.closed:
            return
        listener.closed = True
        self._last_now = now
        if self.listeners.get((listener.local_ip, listener.port)) is listener:
            del self.listeners[(listener.local_ip, listener.port)]
        for conn in list(listener.accept_queue) + list(listener.half_open):
            self._listener_of.pop(conn, None)
            if conn in listener.half_open:
                self._half_open_done(conn)
            self._safe_abort(conn, now)
        listener.accept_queue.clear()
        listener.half_open.clear()
        listener._notify()

    def tcp_send(self, conn: TCPConnection, data: bytes | bytearray | memoryview, now: float) -> int:
        """``conn.send`` plus timer bookkeeping; raises what ``send`` raises."""
        self._last_now = now
        try:
            return conn.send(data, now)
        finally:
            self._touch(conn)

    def tcp_receive(self, conn: TCPConnection, max_bytes: int, now: float) -> bytes:
        """``conn.receive`` plus timer bookkeeping (a window update may be queued)."""
        self._last_now = now
        try:
            return conn.receive(max_bytes, now)
        finally:
            self._touch(conn)

    def tcp_shutdown(self, conn: TCPConnection, now: float) -> None:
        """Half-close (FIN after queued data)."""
        self._last_now = now
        try:
            conn.shutdown(now)
        finally:
            self._touch(conn)

    def tcp_close(self, conn: TCPConnection, now: float) -> None:
        """Full close; the connection lingers in the table until CLOSED."""
        self._last_now = now
        try:
            conn.close(now)
        finally:
            self._touch(conn)

    def tcp_set_options(self, conn: TCPConnection, options: TCPOptions, now: float) -> None:
        """Change a live connection's options (Nagle, keepalive); keepalive is (re)armed from ``now``."""
        old = conn.options
        conn.options = options
        if (options.keepalive_idle, options.keepalive_interval) != (old.keepalive_idle, old.keepalive_interval) \
                and hasattr(conn, "_ka_deadline") and conn.is_established and conn.state != TCPState.CLOSED:
            # The connection arms keepalive when it becomes established; re-arm it for a change afterwards.
            conn._ka_deadline = None if options.keepalive_idle is None else now + options.keepalive_idle
        self._touch(conn)

    def tcp_abort(self, conn: TCPConnection, now: float) -> None:
        """Reset the connection and forget it."""
        self._last_now = now
        self._safe_abort(conn, now)
        self._forget(conn)

    # -- UDP ---------------------------------------------------------------------------------------------------------

    def _receive_udp(self, src: bytes, dst: bytes, data: memoryview, whole_packet, now: float) -> None:
        counters = self.counters
        counters.udp_datagrams += 1
        if len(data) < 8:
            raise MalformedPacket("short UDP header")
        sport, dport, length, ck = _UDP_HDR.unpack_from(data)
        if length < 8 or length > len(data):
            raise MalformedPacket("bad UDP length")
        data = data[:length]
        if ck == 0:
            if len(src) == 16:
                counters.bad_checksum += 1  # RFC 8200 §8.1: a zero UDP checksum is invalid over IPv6
                return
        elif self.verify_checksums and not checksum.verify(data, _pseudo(src, dst, PROTO_UDP, length)):
            counters.bad_checksum += 1
            return
        ep = self.udp_endpoints.get((dst, dport)) or self.udp_endpoints.get((None, dport))
        if ep is None or ep.closed:
            counters.udp_no_port += 1
            if whole_packet is not None:
                self._send_port_unreachable(src, dst, whole_packet, now)
            return
        if ep.remote is not None and ep.remote != (src, sport):
            counters.udp_wrong_peer += 1
            return
        if len(ep.queue) >= ep.queue_limit:
            ep.dropped += 1
            counters.udp_queue_full += 1
            return
        ep.queue.append((bytes(data[8:]), (src, sport)))
        counters.udp_delivered += 1
        ep._notify()

    def udp_bind(self, local_ip: IPAddressLike | bytes | None = None, port: int = 0) -> UDPEndpoint:
        """Bind a UDP endpoint (port 0: ephemeral). Raises OSError(EADDRINUSE / EADDRNOTAVAIL)."""
        lip = None if local_ip is None else _packed(local_ip)
        if lip is not None and lip not in self._addresses:
            raise OSError(errno.EADDRNOTAVAIL, "address is not ours")
        eps = self.udp_endpoints
        if port == 0:
            port = self._ephemeral_port(lambda p: (lip, p) in eps or (None, p) in eps)
        elif not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        if (lip, port) in eps or (None, port) in eps or (lip is None and any(k[1] == port for k in eps)):
            raise OSError(errno.EADDRINUSE, f"UDP port {port} in use")
        ep = UDPEndpoint(lip, port, self.udp_queue_limit, self.changed)
        eps[(lip, port)] = ep
        return ep

    def udp_connect(self, ep: UDPEndpoint, remote_ip: IPAddressLike | bytes, remote_port: int) -> None:
        """Connected mode: default destination, and only datagrams from there are received."""
        rip = _packed(remote_ip)
        if not 0 < remote_port < 65536:
            raise ValueError(f"bad port {remote_port}")
        if ep.local_ip is not None and len(ep.local_ip) != len(rip):
            raise OSError(errno.EAFNOSUPPORT, "address family does not match the bound address")
        ep.remote = (rip, remote_port)
        # Drop what arrived from others before connecting, as a kernel socket does.
        ep.queue = deque(item for item in ep.queue if item[1] == ep.remote)

    def udp_sendto(self, ep: UDPEndpoint, data: bytes | bytearray | memoryview,
                   remote_ip: IPAddressLike | bytes, remote_port: int, now: float) -> None:
        """Queue one datagram. Raises OSError(EMSGSIZE) above 1252 (v4) / 1232 (v6) bytes: we never fragment."""
        if ep.closed:
            raise OSError(errno.EBADF, "UDP endpoint closed")
        rip = _packed(remote_ip)
        if not 0 < remote_port < 65536:
            raise ValueError(f"bad port {remote_port}")
        src = self.source_for(rip) if ep.local_ip is None else ep.local_ip
        if len(src) != len(rip):
            raise OSError(errno.EAFNOSUPPORT, "address family does not match the bound address")
        n = len(data)
        limit = max_udp_payload(4 if len(rip) == 4 else 6, self.mtu)
        if n > limit:
            raise OSError(errno.EMSGSIZE, f"UDP payload of {n} bytes exceeds {limit} (no fragmentation)")
        length = 8 + n
        udp = bytearray(_UDP_HDR.pack(ep.port, remote_port, length, 0))
        udp += data
        ck = checksum.checksum(udp, _pseudo(src, rip, PROTO_UDP, length))  # never 0 (0 would mean "none")
        udp[6] = ck >> 8
        udp[7] = ck & 0xFF
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        self.outbox.append(_ip_header(src, rip, PROTO_UDP, length, self._ip_ident) + udp)
        self.counters.packets_sent_direct += 1

    def udp_close(self, ep: UDPEndpoint) -> None:
        """Unbind; queued datagrams are discarded."""
        if ep.closed:
            return
        ep.closed = True
        if self.udp_endpoints.get((ep.local_ip, ep.port)) is ep:
            del self.udp_endpoints[(ep.local_ip, ep.port)]
        ep.queue.clear()
        ep._notify()

    # -- TSMP ----------------------------------------------------------------------------------------------------------

    def _receive_tsmp(self, ip: ipmod.ParsedIP, msg: memoryview, now: float,
                      touched: dict[TCPConnection, None]) -> None:
        """Tailscale Message Protocol: answer pings; a reject of our SYN fails that connect."""
        if len(msg) < 1:
            raise MalformedPacket("empty TSMP message")
        kind = msg[0]
        if kind == TSMP_PING and len(msg) >= 9:
            if not self._icmp_bucket.take(now):
                self.counters.icmp_rate_limited += 1
                return
            pong = bytes((TSMP_PONG,)) + bytes(msg[1:9]) + struct.pack("!H", self.peerapi_port)
            if ip.version == 4:
                # As tailscaled does: the reply's IP ID is the request's with every bit flipped.
                hdr = ipmod.ipv4_header(ip.dst, ip.src, ipmod.PROTO_TSMP, len(pong), ident=~ip.frag_id & 0xFFFF,
                                        df=False)
            else:
                hdr = ipmod.ipv6_header(ip.dst, ip.src, ipmod.PROTO_TSMP, len(pong))
            self.outbox.append(hdr + pong)
            self.counters.tsmp_pongs += 1
            self.counters.packets_sent_direct += 1
        elif kind == TSMP_REJECT and len(msg) >= 7:
            self.counters.tsmp_rejects += 1
            proto, _reason = msg[1], msg[2]
            our_port, their_port = _TCP_PORTS.unpack_from(msg, 3)
            maybe_broken = len(msg) >= 8 and msg[7] & 1
            if proto != PROTO_TCP or maybe_broken:
                return  # "maybe broken" is informational: the flow may still work
            conn = self.connections.get((ip.dst, our_port, ip.src, their_port))
            if conn is not None and conn.state == TCPState.SYN_SENT:
                self._safe_abort(conn, now)  # the driver reports it as refused (by the peer's ACLs)
                touched[conn] = None
        else:
            self.counters.icmp_ignored += 1

    # -- ICMP --------------------------------------------------------------------------------------------------------

    def _send_port_unreachable(self, src: bytes, dst: bytes, packet, now: float) -> None:
        """ICMP(v6) port unreachable back to ``src`` quoting the offending packet."""
        if len(src) == 4:
            self._send_icmp_error(src, dst, packet, ICMP4_UNREACHABLE, ICMP4_CODE_PORT_UNREACHABLE, 0, now)
        else:
            self._send_icmp_error(src, dst, packet, ICMP6_UNREACHABLE, ICMP6_CODE_PORT_UNREACHABLE, 0, now)

    def _send_protocol_unreachable(self, ip: ipmod.ParsedIP, packet, now: float) -> None:
        """No such transport protocol here: ICMP protocol unreachable (RFC 1122 §3.2.2.1) or ICMPv6
        parameter problem "unrecognized next header" pointing at the field that named it (RFC 8200 §4,
        RFC 4443 §3.4), as gVisor does."""
        if ip.version == 4:
            self._send_icmp_error(ip.src, ip.dst, packet, ICMP4_UNREACHABLE, ICMP4_CODE_PROTO_UNREACHABLE, 0, now)
        else:
            self._send_icmp_error(ip.src, ip.dst, packet, ICMP6_PARAM_PROBLEM, ICMP6_CODE_UNRECOGNIZED_NEXT_HEADER,
                                  ip.next_header_at, now)

    def _send_icmp_error(self, src: bytes, dst: bytes, packet, kind: int, code: int, rest: int,
                         now: float) -> None:
        """An ICMP(v6) error of ``kind``/``code`` (``rest``: the 32-bit field after the checksum)
        back to ``src``, quoting the offending packet; rate limited."""
        if not any(src) or (src[0] >= 224 if len(src) == 4 else src[0] == 0xFF):
            return  # never to multicast/broadcast/unspecified sources (RFC 1812 §4.3.2.7, RFC 4443 §2.4)
        if not self._icmp_bucket.take(now):
            self.counters.icmp_rate_limited += 1
            return
        quote = bytes(packet)
        header = _ICMP_HDR.pack(kind, code, 0, rest >> 16, rest & 0xFFFF)
        if len(src) == 4:
            msg = bytearray(header) + quote[: _ICMP4_ERROR_MAX - 28]
            ck = checksum.checksum(msg)
        else:
            msg = bytearray(header) + quote[: _ICMP6_ERROR_MAX - 48]
            ck = checksum.checksum(msg, _pseudo(dst, src, PROTO_ICMPV6, len(msg)))
        msg[2] = ck >> 8
        msg[3] = ck & 0xFF
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        self.outbox.append(_ip_header(dst, src, PROTO_ICMP if len(src) == 4 else PROTO_ICMPV6, len(msg),
                                      self._ip_ident) + msg)
        self.counters.icmp_errors_sent += 1
        self.counters.packets_sent_direct += 1

    def _echo_reply(self, src: bytes, dst: bytes, msg: memoryview, reply_type: int, now: float) -> None:
        if (20 if len(src) == 4 else 40) + len(msg) > self.mtu:
            self.counters.oversize_reply_dropped += 1
            return
        if not self._icmp_bucket.take(now):
            self.counters.icmp_rate_limited += 1
            return
        reply = bytearray(msg)
        reply[0] = reply_type
        reply[2] = reply[3] = 0
        if len(src) == 4:
            ck = checksum.checksum(reply)
            proto = PROTO_ICMP
        else:
            ck = checksum.checksum(reply, _pseudo(dst, src, PROTO_ICMPV6, len(reply)))
            proto = PROTO_ICMPV6
        reply[2] = ck >> 8
        reply[3] = ck & 0xFF
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        self.outbox.append(_ip_header(dst, src, proto, len(reply), self._ip_ident) + reply)
        self.counters.icmp_echo_replies += 1
        self.counters.packets_sent_direct += 1

    def _receive_icmp4(self, src: bytes, dst: bytes, msg: memoryview, now: float,
                       touched: dict[TCPConnection, None]) -> None:
        if len(msg) < 8:
            raise MalformedPacket("short ICMP message")
        if not checksum.verify(msg):
            self.counters.bad_checksum += 1
            return
        kind, code = msg[0], msg[1]
        if kind == ICMP4_ECHO_REQUEST:
            self._echo_reply(src, dst, msg, ICMP4_ECHO_REPLY, now)
        elif kind in (ICMP4_UNREACHABLE, ICMP4_TIME_EXCEEDED, ICMP4_PARAM_PROBLEM):
            self.counters.icmp_errors_received += 1
            if kind == ICMP4_UNREACHABLE and code in (ICMP4_CODE_PROTO_UNREACHABLE, ICMP4_CODE_PORT_UNREACHABLE):
                self._refused(msg[8:], now, touched)
            elif kind == ICMP4_UNREACHABLE and code == ICMP4_CODE_FRAG_NEEDED:
                self._path_mtu(msg[8:], (msg[6] << 8) | msg[7], touched)
        else:
            self.counters.icmp_ignored += 1

    def _receive_icmp6(self, src: bytes, dst: bytes, msg: memoryview, now: float,
                       touched: dict[TCPConnection, None]) -> None:
        if len(msg) < 8:
            raise MalformedPacket("short ICMPv6 message")
        if not checksum.verify(msg, _pseudo(src, dst, PROTO_ICMPV6, len(msg))):
            self.counters.bad_checksum += 1
            return
        kind, code = msg[0], msg[1]
        if kind == ICMP6_ECHO_REQUEST:
            self._echo_reply(src, dst, msg, ICMP6_ECHO_REPLY, now)
        elif kind in (ICMP6_UNREACHABLE, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, ICMP6_PARAM_PROBLEM):
            self.counters.icmp_errors_received += 1
            if kind == ICMP6_UNREACHABLE and code == ICMP6_CODE_PORT_UNREACHABLE:
                self._refused(msg[8:], now, touched)
            elif kind == ICMP6_PACKET_TOO_BIG:
                self._path_mtu(msg[8:], int.from_bytes(msg[4:8], "big"), touched)
        else:
            self.counters.icmp_ignored += 1

    def _path_mtu(self, quoted: memoryview, mtu: int, touched: dict[TCPConnection, None]) -> None:
        """Frag-needed / packet-too-big for one of our TCP segments: lower that connection's MSS.

        Only for a quoted sequence number we sent and the peer has not acknowledged
        (RFC 5927 §4.1), and never below the IPv4 (576) / IPv6 (1280) minimum MTU.
        """
        inner = _parse_quoted(quoted)
        if inner is None or inner[0] != PROTO_TCP:
            return
        _proto, our_ip, their_ip, sport, dport = inner
        conn = self.connections.get((our_ip, sport, their_ip, dport))
        if conn is None or not hasattr(conn, "send_mss"):
            return
        v4 = len(our_ip) == 4
        hdr = 20 if v4 else 40
        if len(quoted) < hdr + 8:
            return
        seq = int.from_bytes(quoted[hdr + 4:hdr + 8], "big")  # we send no IP options / extension headers
        una, nxt = conn.snd_una & 0xFFFFFFFF, conn.snd_nxt & 0xFFFFFFFF
        if (seq - una) & 0xFFFFFFFF >= (nxt - una) & 0xFFFFFFFF:
            return  # not in flight: forged or stale
        mtu = max(mtu, 576 if v4 else 1280)
        mss = mtu - hdr - 20 - (12 if getattr(conn, "ts_ok", False) else 0)
        if mss < conn.send_mss:
            conn.send_mss = mss
            self.counters.mss_lowered += 1
            touched[conn] = None

    def _refused(self, quoted: memoryview, now: float, touched: dict[TCPConnection, None]) -> None:
        """A port/protocol unreachable quoting one of our packets: fail a connecting TCP
        connection or report ECONNREFUSED on a connected UDP endpoint."""
        inner = _parse_quoted(quoted)
        if inner is None:
            return
        proto, our_ip, their_ip, sport, dport = inner
        if our_ip not in self._addresses:
            return
        if proto == PROTO_TCP:
            conn = self.connections.get((our_ip, sport, their_ip, dport))
            if conn is not None and conn.state == TCPState.SYN_SENT and _quotes_our_syn(quoted, conn):
                self._safe_abort(conn, now)  # the driver reports CLOSED-without-error while connecting as refused
                touched[conn] = None
        elif proto == PROTO_UDP:
            ep = self.udp_endpoints.get((our_ip, sport)) or self.udp_endpoints.get((None, sport))
            if ep is not None and ep.remote == (their_ip, dport):
                ep.error = ConnectionRefusedError(errno.ECONNREFUSED, "port unreachable")
                ep._notify()


def _quotes_our_syn(quoted: memoryview, conn: TCPConnection) -> bool:
    """The quoted TCP header carries our SYN's sequence number (RFC 5927 §4.1): a blind forger
    who knows the 4-tuple but not our ISS cannot fail the connect."""
    hdr = (quoted[0] & 0x0F) * 4 if quoted[0] >> 4 == 4 else 40  # we send no extension headers
    if len(quoted) < hdr + 8:
        return False  # RFC 792 / RFC 4443 quote at least 8 bytes of the transport header
    return int.from_bytes(quoted[hdr + 4:hdr + 8], "big") == conn.iss & 0xFFFFFFFF


def _parse_quoted(quoted: memoryview) -> tuple[int, bytes, bytes, int, int] | None:
    """(proto, src, dst, sport, dport) of the packet an ICMP error quotes, or None if too short."""
    if len(quoted) < 1:
        return None
    version = quoted[0] >> 4
    if version == 4:
        if len(quoted) < 20:
            return None
        ihl = (quoted[0] & 0x0F) * 4
        if ihl < 20 or len(quoted) < ihl + 4:
            return None
        return quoted[9], bytes(quoted[12:16]), bytes(quoted[16:20]), *_TCP_PORTS.unpack_from(quoted, ihl)
    if version == 6:
        if len(quoted) < 44:
            return None
        return quoted[6], bytes(quoted[8:24]), bytes(quoted[24:40]), *_TCP_PORTS.unpack_from(quoted, 40)
    return None
