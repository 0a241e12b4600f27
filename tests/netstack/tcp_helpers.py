"""Test harness: two TCPConnections wired back to back through a simulated link.

Everything runs on an explicit fake clock. Packets each side puts in its outbox are
parsed exactly like the stack would (``ip.parse``, checksum check, ``tcp_wire.parse``)
and delivered after a one-way delay. A ``fault`` hook can drop, duplicate or delay
individual segments, so loss/reorder/duplication tests are deterministic.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tsnet.netstack import checksum, ip, tcp_wire
from tsnet.netstack.tcp import TCPConnection, TCPOptions, TCPState
from tsnet.netstack.tcp_wire import Segment

V4_A = bytes([100, 64, 0, 1])
V4_B = bytes([100, 64, 0, 2])
V6_A = bytes.fromhex("fd7a115ca1e000000000000000000001")
V6_B = bytes.fromhex("fd7a115ca1e000000000000000000002")

#: fault(direction, seg, index) -> list of extra delays: [] drops, [0.0] passes,
#: [0.0, 0.0] duplicates, [0.05] delays (reorders) the segment.
Fault = Callable[[str, Segment, int], list[float]]


def parse_packet(pkt: bytes | bytearray) -> tuple[ip.ParsedIP, Segment]:
    """Parse one packet as the stack would, asserting the TCP checksum is right."""
    p = ip.parse(pkt)
    assert p.proto == ip.PROTO_TCP
    if p.version == 4:
        pseudo = checksum.pseudo_header_v4(p.src, p.dst, ip.PROTO_TCP)
    else:
        pseudo = checksum.pseudo_header_v6(p.src, p.dst, ip.PROTO_TCP)
    assert checksum.verify(p.payload, pseudo + len(p.payload)), "bad TCP checksum"
    return p, tcp_wire.parse(p.payload)


def segment(sport: int, dport: int, seq: int, ack: int, flags: int, window: int = 65535,
            payload: bytes = b"", options: bytes = b"") -> Segment:
    """A Segment as if parsed from the wire (for injecting hand-made segments)."""
    opts = options + b"\x00" * (-len(options) % 4)
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (20 + len(opts)) << 2, flags, window, 0, 0)
    return tcp_wire.parse(memoryview(hdr + opts + payload))


@dataclass
class Delivered:
    """One segment that reached a side: when, which way ("ab" = A to B), and what."""

    time: float
    direction: str
    seg: Segment


@dataclass(order=True)
class _InFlight:
    arrival: float
    order: int
    direction: str = field(compare=False)
    pkt: bytes = field(compare=False)


class Pair:
    """Side A actively opens to side B. B is created from A's SYN (``listen=True``), or
    B answers SYNs with RST (``listen=False``), or B is opened actively too
    (``simultaneous=True``)."""

    def __init__(self, *, a_options: TCPOptions = TCPOptions(), b_options: TCPOptions = TCPOptions(),
                 delay: float = 0.010, v6: bool = False, fault: Fault | None = None,
                 listen: bool = True, simultaneous: bool = False, start: float = 1000.0,
                 a_iss: int = 1000, b_iss: int = 50000, ts_offsets: tuple[int, int] = (7, 99),
                 rate: float | None = None, queue_limit: int | None = None, coalesce: bool = False) -> None:
        self.now = start
        # Deliver every packet due at the same time as one batch, then flush_acks()
        # (as a stack using coalesce_acks does).
        self.coalesce = coalesce
        # Optional A->B bottleneck: ``rate`` bytes/s through a FIFO holding at most
        # ``queue_limit`` bytes (drop-tail), so RTT grows as the queue fills.
        self.rate = rate
        self.queue_limit = queue_limit
        self.queue_drops = 0
        self._link_free = start
        self.delay = delay
        self.fault = fault
        self.listen = listen
        self.a_ip, self.b_ip = (V6_A, V6_B) if v6 else (V4_A, V4_B)
        self.a_port, self.b_port = 40000, 80
        self.a_out: list[bytes | bytearray] = []
        self.b_out: list[bytes | bytearray] = []
        self.a_changed: list[TCPConnection] = []
        self.b_changed: list[TCPConnection] = []
        self.b_options = b_options
        self.b_iss = b_iss
        self.ts_offsets = ts_offsets
        self.trace: list[Delivered] = []
        self.sent_count = {"ab": 0, "ba": 0}
        self.rst_replies = 0
        self._heap: list[_InFlight] = []
        self._order = 0
        self.a = TCPConnection.active(self.a_ip, self.a_port, self.b_ip, self.b_port, iss=a_iss, now=self.now,
                                      outbox=self.a_out, changed=self.a_changed, options=a_options,
                                      ts_offset=ts_offsets[0])
        self.b: TCPConnection | None = None
        if simultaneous:
            self.b = TCPConnection.active(self.b_ip, self.b_port, self.a_ip, self.a_port, iss=b_iss, now=self.now,
                                          outbox=self.b_out, changed=self.b_changed, options=b_options,
                                          ts_offset=ts_offsets[1])

    # --- the link ---

    def _collect(self) -> None:
        for direction, box in (("ab", self.a_out), ("ba", self.b_out)):
            if not box:
                continue
            pkts = list(box)
            box.clear()
            mtu = self.a.options.mtu if direction == "ab" else self.b_options.mtu
            for pkt in pkts:
                pkt = bytes(pkt)
                assert len(pkt) <= mtu, f"{len(pkt)}-byte packet exceeds the MTU {mtu}"
                _, seg = parse_packet(pkt)
                idx = self.sent_count[direction]
                self.sent_count[direction] += 1
                delays = self.fault(direction, seg, idx) if self.fault else [0.0]
                for extra in delays:
                    base = self.now
                    if direction == "ab" and self.rate:
                        start = max(self.now, self._link_free)
                        if self.queue_limit is not None and (start - self.now) * self.rate > self.queue_limit:
                            self.queue_drops += 1
                            continue
                        self._link_free = start + len(pkt) / self.rate
                        base = self._link_free
                    self._order += 1
                    heapq.heappush(self._heap, _InFlight(base + self.delay + extra, self._order, direction, pkt))

    def _deliver(self, item: _InFlight) -> None:
        p, seg = parse_packet(item.pkt)
        self.trace.append(Delivered(self.now, item.direction, seg))
        if item.direction == "ab":
            if self.b is None or self.b.state == TCPState.CLOSED and seg.flags & tcp_wire.SYN:
                if not self.listen or not (seg.flags & tcp_wire.SYN) or seg.flags & (tcp_wire.ACK | tcp_wire.RST):
                    self._reply_rst(seg)
                    return
                self.b = TCPConnection.passive(self.b_ip, self.b_port, self.a_ip, self.a_port, seg,
                                               iss=self.b_iss, now=self.now, outbox=self.b_out,
                                               changed=self.b_changed, options=self.b_options,
                                               ts_offset=self.ts_offsets[1])
                return
            if self.b.state == TCPState.CLOSED:
                self._reply_rst(seg)
                return
            self.b.receive_segment(seg, self.now)
        else:
            if self.a.state == TCPState.CLOSED:
                return
            self.a.receive_segment(seg, self.now)

    def _reply_rst(self, seg: Segment) -> None:
        """What a stack with no connection answers (RFC 9293 §3.10.7.1)."""
        if seg.flags & tcp_wire.RST:
            return
        self.rst_replies += 1
        if seg.flags & tcp_wire.ACK:
            seq, ack, flags = seg.ack, 0, tcp_wire.RST
        else:
            n = len(seg.payload) + (1 if seg.flags & tcp_wire.SYN else 0) + (1 if seg.flags & tcp_wire.FIN else 0)
            seq, ack, flags = 0, seg.seq + n, tcp_wire.RST | tcp_wire.ACK
        tcp_hdr = bytearray(struct.pack("!HHIIBBHHH", self.b_port, self.a_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                        5 << 4, flags, 0, 0, 0))
        pseudo = (checksum.pseudo_header_v4 if len(self.b_ip) == 4 else checksum.pseudo_header_v6)(
            self.b_ip, self.a_ip, ip.PROTO_TCP)
        ck = checksum.checksum(tcp_hdr, pseudo + 20)
        tcp_hdr[16:18] = ck.to_bytes(2, "big")
        hdr = (ip.ipv4_header if len(self.b_ip) == 4 else ip.ipv6_header)(self.b_ip, self.a_ip, ip.PROTO_TCP, 20)
        self.b_out.append(hdr + bytes(tcp_hdr))

    def conns(self) -> list[TCPConnection]:
        return [c for c in (self.a, self.b) if c is not None]

    def next_event(self) -> float | None:
        times = [t for t in (c.get_timer() for c in self.conns() if c.state != TCPState.CLOSED) if t is not None]
        if self._heap:
            times.append(self._heap[0].arrival)
        return min(times) if times else None

    def step(self, limit: float) -> bool:
        """Advance to the next event (not past ``limit``) and process it; False if idle."""
        self._collect()
        t = self.next_event()
        if t is None or t > limit:
            return False
        if t > self.now:
            self.now = t
        while self._heap and self._heap[0].arrival <= self.now:
            self._deliver(heapq.heappop(self._heap))
        if self.coalesce:
            for c in self.conns():
                c.coalesce_acks = True
                c.flush_acks(self.now)
        for c in self.conns():
            d = c.get_timer()
            if d is not None and d <= self.now and c.state != TCPState.CLOSED:
                c.handle_timer(self.now)
                d2 = c.get_timer()
                assert d2 is None or d2 > self.now or c.state == TCPState.CLOSED, "timer still due after firing"
        self._collect()
        return True

    def run(self, until: Callable[[], bool] | None = None, duration: float = 60.0,
            app: Callable[[Pair], None] | None = None) -> bool:
        """Run events until ``until()`` holds (True) or ``duration`` of fake time passes
        or nothing is left to do (False). ``app`` runs after every event."""
        limit = self.now + duration
        while True:
            if app is not None:
                app(self)
                self._collect()
            if until is not None and until():
                return True
            if not self.step(limit):
                return until() if until is not None else True

    def advance(self, dt: float) -> None:
        """Run all events in the next ``dt`` seconds and end exactly ``dt`` later."""
        end = self.now + dt
        self.run(duration=dt)
        self.now = max(self.now, end)

    def established(self) -> bool:
        return self.b is not None and self.a.state == TCPState.ESTABLISHED and self.b.state == TCPState.ESTABLISHED

    def handshake(self) -> None:
        assert self.run(self.established, duration=10), (self.a.state, self.b and self.b.state)

    def segments(self, direction: str) -> list[Segment]:
        return [d.seg for d in self.trace if d.direction == direction]


class Pump:
    """An application: writes ``data`` from ``src`` and reads everything at ``dst``."""

    def __init__(self, src: str, data: bytes, *, shutdown: bool = True, read: bool = True,
                 chunk: int = 1 << 20) -> None:
        self.src = src
        self.data = memoryview(data)
        self.pos = 0
        self.shutdown = shutdown
        self.read = read
        self.chunk = chunk
        self.received = bytearray()
        self.done_writing = False

    def __call__(self, pair: Pair) -> None:
        src = pair.a if self.src == "a" else pair.b
        dst = pair.b if self.src == "a" else pair.a
        if src is None or dst is None:
            return
        if src.is_established and not self.done_writing and src.state != TCPState.CLOSED:
            while self.pos < len(self.data):
                n = src.send(self.data[self.pos:self.pos + self.chunk], pair.now)
                if n == 0:
                    break
                self.pos += n
            if self.pos == len(self.data):
                self.done_writing = True
                if self.shutdown:
                    src.shutdown(pair.now)
        if self.read:
            while dst.readable:
                self.received += dst.receive(1 << 20, pair.now)

    def finished(self, pair: Pair) -> bool:
        dst = pair.b if self.src == "a" else pair.a
        return len(self.received) == len(self.data) and (not self.shutdown or (dst is not None and dst.at_eof))
