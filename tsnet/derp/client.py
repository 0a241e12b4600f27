"""Trio DERP client: dial as a DERPMap node says, run one connection, reconnect with backoff.

:class:`DerpClient` keeps one region's connection alive and surfaces what the
server sends as events on a memory channel (``ReceivedPacket`` for magicsock).
:class:`DerpRegions` holds one client per region in use, tells servers which one
is home (NotePreferred) and closes non-home regions idle for 60 s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import random
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import h11
import trio

from ..key import NodePrivate, NodePublic
from .client_core import (
    DerpClientProtocol,
    DerpEvent,
    PingTimeout,
    PongReceived,
    ReceivedPacket,
    RestartingEvent,
    ServerInfoReceived,
)
from .frames import DerpProtocolError
from .tls import BatchTLSStream

__all__ = [
    "Backoff",
    "DerpClient",
    "DerpNode",
    "DerpRegions",
    "RegionEvent",
    "RegionIdlePolicy",
    "open_derp_node",
    "open_derp_url",
]

log = logging.getLogger("tsnet.derp.client")

CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
#: Bytes asked of the stream per read. Kept at 64 KiB: a plain socket ``recv(n)`` allocates n bytes
#: first, and from 128 KiB up glibc serves that with mmap (plus page faults), which costs ~20 µs per
#: read even when only one packet is waiting. 64 KiB is still ~50 packets per batch.
RECV_SIZE = 64 * 1024
#: Longest reconnect delay a server's Restarting frame may ask for (it is only advice; a bogus
#: value must not keep us away from the region).
MAX_RESTART_HINT = 30.0
NON_HOME_IDLE = 60.0
IDLE_SWEEP = 15.0
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, trio.TooSlowError,
              DerpProtocolError, h11.ProtocolError)


@dataclass(frozen=True, slots=True)
class DerpNode:
    """The DERPMap node fields a client needs (Go JSON names accepted by :meth:`from_json`)."""

    name: str
    region_id: int
    host_name: str
    ipv4: str = ""
    ipv6: str = ""
    derp_port: int = 0
    stun_port: int = 0
    stun_only: bool = False
    insecure_for_tests: bool = False
    cert_name: str = ""
    stun_test_ip: str = ""
    can_port80: bool = False
    plain_http: bool = False  # like TS_DEBUG_USE_DERP_HTTP: no TLS, default port 3340

    @classmethod
    def from_json(cls, obj: Mapping[str, object], *, plain_http: bool = False) -> DerpNode:
        """Build from a DERPMap node object (``Name``, ``RegionID``, ``HostName``, ...)."""
        return cls(
            name=str(obj.get("Name", "")),
            region_id=int(obj.get("RegionID", 0)),  # type: ignore[arg-type]
            host_name=str(obj.get("HostName", "")),
            ipv4=str(obj.get("IPv4", "")),
            ipv6=str(obj.get("IPv6", "")),
            derp_port=int(obj.get("DERPPort", 0)),  # type: ignore[arg-type]
            stun_port=int(obj.get("STUNPort", 0)),  # type: ignore[arg-type]
            stun_only=bool(obj.get("STUNOnly", False)),
            insecure_for_tests=bool(obj.get("InsecureForTests", False)),
            cert_name=str(obj.get("CertName", "")),
            stun_test_ip=str(obj.get("STUNTestIP", "")),
            can_port80=bool(obj.get("CanPort80", False)),
            plain_http=plain_http,
        )

    @property
    def port(self) -> int:
        """TCP port: DERPPort, else 443 (TLS) or 3340 (plain)."""
        if self.derp_port:
            return self.derp_port
        return 3340 if self.plain_http else 443

    def dial_hosts(self) -> list[str]:
        """Addresses to try: literal IPv4/IPv6 fields, else the host name (DNS)."""
        hosts = []
        for fam in (self.ipv4, self.ipv6):
            if fam:
                try:
                    ipaddress.ip_address(fam)
                    hosts.append(fam)
                except ValueError:
                    pass  # "none" or anything else that is not an IP disables that family
        if (not self.ipv4 or not self.ipv6) and self.host_name and self.host_name not in hosts:
            hosts.append(self.host_name)  # an empty family field means "resolve HostName"
        return hosts


class Backoff:
    """tailscaled's reconnect backoff: n² × 10 ms capped at 5 s, jittered ×[0.5, 1.5)."""

    def __init__(self, cap: float = 5.0, rng: random.Random | None = None) -> None:
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        self.failures += 1
        base = min(self.cap, self.failures * self.failures * 0.010)
        return base * (0.5 + self._rng.random())

    def reset(self) -> None:
        self.failures = 0


def client_ssl_context(node: DerpNode) -> tuple[ssl.SSLContext, str | None]:
    """The TLS context and server_hostname for ``node`` (InsecureForTests / CertName rules)."""
    if node.cert_name.startswith("sha256-raw:"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin is checked after the handshake
    elif node.insecure_for_tests:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context()
    server_hostname: str | None = node.host_name
    if node.cert_name and not node.cert_name.startswith("sha256-raw:"):
        server_hostname = node.cert_name
    try:
        ipaddress.ip_address(node.host_name)
        if not ctx.check_hostname:
            server_hostname = None  # Go sends no SNI for IP literals
    except ValueError:
        pass
    return ctx, server_hostname


def _check_pin(stream: trio.SSLStream | BatchTLSStream, cert_name: str) -> None:
    want = cert_name.removeprefix("sha256-raw:").lower()
    der = stream.getpeercert(binary_form=True)
    if der is None or hashlib.sha256(der).hexdigest() != want:
        raise ssl.SSLError(f"server certificate does not match pinned {cert_name}")


async def _upgrade(stream: trio.abc.Stream, host_header: str) -> bytes:
    """Send the /derp upgrade request; return bytes received after the 101 head."""
    http = h11.Connection(h11.CLIENT)
    req = h11.Request(method="GET", target="/derp", headers=[
        ("Host", host_header), ("User-Agent", "tsnet-py"), ("Connection", "Upgrade"), ("Upgrade", "DERP")])
    await stream.send_all(http.send(req))
    while True:
        ev = http.next_event()
        if ev is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                raise DerpProtocolError("server closed the connection during the HTTP upgrade")
            http.receive_data(data)
            continue
        if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
            return bytes(http.trailing_data[0])
        if isinstance(ev, h11.Response):
            raise DerpProtocolError(f"DERP upgrade refused: HTTP {ev.status_code}")
        if isinstance(ev, h11.ConnectionClosed):
            raise DerpProtocolError("server closed the connection during the HTTP upgrade")


async def open_derp_node(node: DerpNode) -> tuple[trio.abc.Stream, bytes]:
    """Dial ``node`` (TCP [+TLS]) and upgrade to DERP; returns the stream and leftover bytes."""
    last_exc: Exception | None = None
    for host in node.dial_hosts():
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, node.port)
                if not node.plain_http:
                    ctx, sni = client_ssl_context(node)
                    # Our TLS stream hands back every decrypted record per read (trio.SSLStream: one).
                    tls = BatchTLSStream.from_socket_stream(stream, ctx, sni)
                    stream = tls
                    await tls.do_handshake()
                    if node.cert_name.startswith("sha256-raw:"):
                        _check_pin(tls, node.cert_name)
                leftover = await _upgrade(stream, node.host_name)
            return stream, leftover
        except _IO_ERRORS as exc:
            last_exc = exc
            if stream is not None:
                await trio.aclose_forcefully(stream)
    raise OSError(f"could not reach DERP node {node.name}: {last_exc!r}")


async def open_derp_url(url: str, *, insecure: bool = False) -> tuple[trio.abc.Stream, bytes]:
    """Dial a DERP server by URL (``http://host:port`` is plain, ``https://`` TLS), as mesh peers do."""
    parts = urlsplit(url if "://" in url else "https://" + url)
    plain = parts.scheme == "http"
    node = DerpNode(
        name=url, region_id=0, host_name=parts.hostname or "127.0.0.1",
        derp_port=parts.port or (80 if plain else 443), insecure_for_tests=insecure, plain_http=plain,
    )
    return await open_derp_node(node)


class DerpClient:
    """One region's DERP connection, kept alive.

    Run it with ``nursery.start_soon(client.run)``; read events from ``client.events``
    (ReceivedPacket, PeerGoneEvent, HealthChanged, ...). ``send`` never blocks: it
    queues into the live connection or, while reconnecting, into a 32-packet queue
    that drops its oldest entry when full.

    ``on_packets``, if given, takes over ReceivedPacket delivery: it is called from the
    reader task, synchronously, with every packet of one socket read as one list (in
    arrival order), and those packets no longer go to ``events``. That saves a channel
    hop (a task switch) per packet and lets the consumer handle the batch in one go.
    It must not block; an exception it raises is logged and the packets are lost.
    """

    def __init__(
        self,
        private_key: NodePrivate,
        node: DerpNode | list[DerpNode],
        *,
        preferred: bool = False,
        mesh_key: bytes | None = None,
        event_buffer: int = 4096,
        keepalive_ping_interval: float | None = None,
        on_packets: Callable[[list[ReceivedPacket]], None] | None = None,
    ) -> None:
        self.private_key = private_key
        self.on_packets = on_packets
        self.nodes = node if isinstance(node, list) else [node]
        self.preferred = preferred
        self.mesh_key = mesh_key
        self._send_events, self.events = trio.open_memory_channel[DerpEvent](event_buffer)
        self._proto: DerpClientProtocol | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._wake = trio.Event()
        self._connected = trio.Event()
        self._pongs: dict[bytes, trio.Event] = {}
        self._closed = False
        self._cancel = trio.CancelScope()
        self._conn_scope: trio.CancelScope | None = None
        self.backoff = Backoff()
        self.keepalive_ping_interval = keepalive_ping_interval
        self.max_pending_frames = 1024
        self.server_key: NodePublic | None = None
        self.connects = 0
        self.dropped_events = 0
        self.dropped_sends = 0
        self.reads = 0  # socket reads that brought data (received frames per read = batching)
        self.writes = 0  # socket writes (coalesced frames)
        self.last_write = trio.current_time()
        self.last_error: str = ""
        self._restart_hint = 0.0  # seconds the last Restarting frame asked us to wait before redialling

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Until the server has accepted us (ServerInfo received)."""
        await self._connected.wait()

    def send(self, dst: NodePublic | bytes, packet: bytes) -> bool:
        """Queue ``packet`` for ``dst``. Returns False if it was dropped."""
        now = trio.current_time()
        self.last_write = now
        raw = dst.raw if isinstance(dst, NodePublic) else bytes(dst)
        proto = self._proto
        if proto is not None and self._connected.is_set():
            if proto.pending_frames >= self.max_pending_frames:
                # The server (or the network) is not keeping up; never buffer without bound.
                self.dropped_sends += 1
                return False
            ok = proto.send_packet(raw, packet, now)
            self._wake.set()
            if not ok:
                self.dropped_sends += 1
            return ok
        if len(self._pending) >= 32:
            self._pending.pop(0)
            self.dropped_sends += 1
        self._pending.append((raw, bytes(packet)))
        return True

    def send_many(self, items: Iterable[tuple[NodePublic | bytes, bytes | bytearray | memoryview]]) -> int:
        """Queue several ``(dst, packet)`` at once (one clock read, one writer wake-up).

        Returns how many were queued; the rest were dropped, as :meth:`send` would.
        """
        proto = self._proto
        if proto is None or not self._connected.is_set():
            return sum(1 for dst, packet in items if self.send(dst, packet))
        now = trio.current_time()
        self.last_write = now
        limit = self.max_pending_frames
        queued = dropped = 0
        for dst, packet in items:
            if proto.pending_frames >= limit:
                dropped += 1  # the server (or the network) is not keeping up; never buffer without bound
                continue
            if proto.send_packet(dst.raw if isinstance(dst, NodePublic) else dst, packet, now):
                queued += 1
            else:
                dropped += 1
        self.dropped_sends += dropped
        if queued:
            self._wake.set()
        return queued

    def note_preferred(self, preferred: bool) -> None:
        """Tell the server (now and on every reconnect) whether this region is home."""
        self.preferred = preferred
        if self._proto is not None:
            self._proto.note_preferred(preferred, trio.current_time())
            self._wake.set()

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip a Ping through the server; returns seconds. Raises trio.TooSlowError."""
        await self.wait_connected()
        assert self._proto is not None
        start = trio.current_time()
        data = self._proto.send_ping(start, timeout)
        done = trio.Event()
        self._pongs[data] = done
        self._wake.set()
        try:
            with trio.fail_after(timeout):
                await done.wait()
        finally:
            self._pongs.pop(data, None)
        return trio.current_time() - start

    def reconnect(self) -> None:
        """Drop the current connection; ``run`` redials."""
        if self._conn_scope is not None:
            self._conn_scope.cancel()

    def close(self) -> None:
        """Stop ``run``."""
        self._closed = True
        self._cancel.cancel()

    def _emit(self, ev: DerpEvent) -> None:
        try:
            self._send_events.send_nowait(ev)
        except trio.WouldBlock:
            self.dropped_events += 1

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with backoff, until ``close``."""
        task_status.started()
        with self._cancel:
            try:
                while not self._closed:
                    try:
                        await self._run_once()
                    except* _IO_ERRORS as group:
                        self.last_error = "; ".join(repr(e) for e in group.exceptions)
                        log.debug("derp client: %s", self.last_error)
                    self._connected = trio.Event()
                    self._proto = None
                    if self._closed:
                        break
                    delay = self.backoff.next_delay()
                    if self._restart_hint:
                        # The server said when it will be back: redialling sooner only hits a closing server.
                        delay = max(delay, self._restart_hint)
                        self._restart_hint = 0.0
                    await trio.sleep(delay)
            finally:
                self._proto = None
                await self._send_events.aclose()

    async def _run_once(self) -> None:
        stream: trio.abc.Stream | None = None
        last_exc: Exception | None = None
        for node in self.nodes:
            if node.stun_only:
                continue
            try:
                stream, leftover = await open_derp_node(node)
                break
            except _IO_ERRORS as exc:
                last_exc = exc
        if stream is None:
            raise OSError(f"no DERP node reachable: {last_exc!r}")
        now = trio.current_time()
        proto = DerpClientProtocol(self.private_key, now, preferred=self.preferred, mesh_key=self.mesh_key)
        self._proto = proto
        async with stream:
            with trio.CancelScope() as scope:
                self._conn_scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream, proto)
                    if self.keepalive_ping_interval:
                        nursery.start_soon(self._pinger)
                    try:
                        await self._reader(stream, proto, leftover)
                    finally:
                        nursery.cancel_scope.cancel()

    async def _pinger(self) -> None:
        assert self.keepalive_ping_interval
        while True:
            await trio.sleep(self.keepalive_ping_interval)
            await self.ping()

    async def _reader(self, stream: trio.abc.Stream, proto: DerpClientProtocol, data: bytes) -> None:
        on_packets = self.on_packets
        while True:
            if data:
                self.reads += 1
                events = proto.receive_data(data, trio.current_time())
                if on_packets is not None:
                    packets = [ev for ev in events if ev.__class__ is ReceivedPacket]
                    if packets:
                        # One synchronous call per read: the consumer handles (and answers) the whole
                        # batch before this task waits again, with no task switch per packet.
                        try:
                            on_packets(packets)
                        except Exception:
                            log.exception("derp client: packet handler failed")
                        if len(packets) == len(events):
                            events = []
                        else:
                            events = [ev for ev in events if ev.__class__ is not ReceivedPacket]
                for ev in events:
                    if ev.__class__ is ReceivedPacket:
                        self._emit(ev)
                        continue
                    if isinstance(ev, ServerInfoReceived):
                        self.server_key = ev.server_key
                        self.connects += 1
                        self.backoff.reset()
                        for dst, pkt in self._pending:
                            proto.send_packet(dst, pkt, trio.current_time())
                        self._pending.clear()
                        self._connected.set()
                    elif isinstance(ev, PongReceived):
                        waiter = self._pongs.get(ev.data)
                        if waiter is not None:
                            waiter.set()
                    self._emit(ev)
                    if isinstance(ev, RestartingEvent):
                        self._restart_hint = min(ev.reconnect_in_ms / 1000.0, MAX_RESTART_HINT)
                        return
                if proto.pending_bytes:
                    self._wake.set()  # Pongs, replies the packet handler queued, the pending queue
            with trio.move_on_at(proto.get_timer()) as cs:
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    raise OSError("DERP server closed the connection")
            if cs.cancelled_caught:
                data = b""
                for ev in proto.handle_timer(trio.current_time()):  # raises on read timeout
                    if isinstance(ev, PingTimeout):
                        raise DerpProtocolError("DERP ping timed out")

    async def _writer(self, stream: trio.abc.Stream, proto: DerpClientProtocol) -> None:
        # One cancel scope for the task's life; its deadline is armed only while a write is under way.
        with trio.CancelScope() as scope:
            while True:
                data = proto.data_to_send()
                if data:
                    self.writes += 1
                    scope.deadline = trio.current_time() + WRITE_TIMEOUT
                    await stream.send_all(data)
                    continue
                scope.deadline = math.inf
                await self._wake.wait()
                self._wake = trio.Event()
        if scope.cancelled_caught:
            raise trio.TooSlowError(f"DERP write stalled for {WRITE_TIMEOUT:g} s")


@dataclass(frozen=True, slots=True)
class RegionEvent:
    """An event from one region's connection."""

    region_id: int
    event: DerpEvent


class RegionIdlePolicy:
    """Sans-IO: which non-home regions to close (no write for 60 s), and when to look again."""

    def __init__(self, idle_after: float = NON_HOME_IDLE, sweep_every: float = IDLE_SWEEP) -> None:
        self.idle_after = idle_after
        self.sweep_every = sweep_every
        self.home: int | None = None
        self.last_write: dict[int, float] = {}

    def note_write(self, region_id: int, now: float) -> None:
        self.last_write[region_id] = now

    def forget(self, region_id: int) -> None:
        self.last_write.pop(region_id, None)

    def idle_regions(self, now: float) -> list[int]:
        return [r for r, t in self.last_write.items() if r != self.home and now - t >= self.idle_after]

    def get_timer(self, now: float) -> float:
        """Next sweep time, or +inf if only home is open."""
        if any(r != self.home for r in self.last_write):
            return now + self.sweep_every
        return math.inf


class DerpRegions:
    """DERP connections to every region in use, for magicsock.

    ``derp_map`` maps region ID to its nodes. ``set_home`` makes a region home
    (NotePreferred to every open connection, a connection to the new home).
    ``send`` opens a region's connection on first use. Events from every region
    arrive on ``events`` as :class:`RegionEvent`.

    ``on_packets(region_id, packets)``, if given, receives every region's packets in
    batches, synchronously from the region's reader task (see :class:`DerpClient`);
    they then no longer arrive on ``events``.
    """

    def __init__(self, private_key: NodePrivate, derp_map: Mapping[int, list[DerpNode]],
                 *, event_buffer: int = 4096,
                 on_packets: Callable[[int, list[ReceivedPacket]], None] | None = None) -> None:
        self.private_key = private_key
        self.on_packets = on_packets
        self.derp_map = dict(derp_map)
        self.policy = RegionIdlePolicy()
        self.clients: dict[int, DerpClient] = {}
        self._send_events, self.events = trio.open_memory_channel[RegionEvent](event_buffer)
        self._nursery: trio.Nursery | None = None
        self._sweep_wake = trio.Event()

    @property
    def home(self) -> int | None:
        return self.policy.home

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the per-region tasks and the idle sweep until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                now = trio.current_time()
                for region in self.policy.idle_regions(now):
                    self.close_region(region)
                with trio.move_on_at(self.policy.get_timer(now)):
                    await self._sweep_wake.wait()
                    self._sweep_wake = trio.Event()

    def _client(self, region_id: int) -> DerpClient:
        client = self.clients.get(region_id)
        if client is None:
            nodes = self.derp_map.get(region_id)
            if not nodes:
                raise KeyError(f"DERP region {region_id} is not in the map")
            if self._nursery is None:
                raise RuntimeError("DerpRegions.run is not running")
            client = DerpClient(self.private_key, nodes, preferred=region_id == self.policy.home,
                                on_packets=partial(self.on_packets, region_id) if self.on_packets else None)
            self.clients[region_id] = client
            self.policy.note_write(region_id, trio.current_time())
            self._nursery.start_soon(client.run)
            self._nursery.start_soon(self._forward, region_id, client)
            self._sweep_wake.set()
        return client

    async def _forward(self, region_id: int, client: DerpClient) -> None:
        async for ev in client.events:
            try:
                self._send_events.send_nowait(RegionEvent(region_id, ev))
            except trio.WouldBlock:
                client.dropped_events += 1

    def set_home(self, region_id: int) -> None:
        """Make ``region_id`` home: NotePreferred everywhere, and connect to it."""
        self.policy.home = region_id
        for rid, client in self.clients.items():
            client.note_preferred(rid == region_id)
        self._client(region_id)

    def send(self, region_id: int, dst: NodePublic | bytes, packet: bytes) -> bool:
        """Send via ``region_id``'s server, connecting first if needed."""
        self.policy.note_write(region_id, trio.current_time())
        return self._client(region_id).send(dst, packet)

    def send_many(self, items: Iterable[tuple[int, NodePublic | bytes, bytes | bytearray | memoryview]]) -> int:
        """Send a batch of ``(region_id, dst, packet)``; consecutive items for one region are queued
        together (one wake-up of its writer). Returns how many were queued; an item whose region
        is not in the map is dropped."""
        now = trio.current_time()
        queued = 0
        run_region: int | None = None
        run: list[tuple[NodePublic | bytes, bytes | bytearray | memoryview]] = []
        for region_id, dst, packet in items:
            if region_id != run_region:
                if run:
                    queued += self._send_run(run_region, run, now)  # type: ignore[arg-type]
                run_region, run = region_id, []
            run.append((dst, packet))
        if run:
            queued += self._send_run(run_region, run, now)  # type: ignore[arg-type]
        return queued

    def _send_run(self, region_id: int, run: list[tuple[NodePublic | bytes, bytes | bytearray | memoryview]],
                  now: float) -> int:
        try:
            client = self._client(region_id)
        except KeyError:
            return 0
        self.policy.note_write(region_id, now)
        return client.send_many(run)

    def set_derp_map(self, derp_map: Mapping[int, list[DerpNode]]) -> list[int]:
        """Install a new map; regions that vanished or whose nodes changed are closed (and
        redialled on next use, as tailscaled does). Returns the closed region IDs."""
        new = dict(derp_map)
        closed = [rid for rid in list(self.clients) if new.get(rid) != self.derp_map.get(rid)]
        for rid in closed:
            self.close_region(rid)
        self.derp_map = new
        if self.policy.home is not None and self.policy.home in new and self.policy.home in closed:
            self._client(self.policy.home)  # home stays connected
        return closed

    def close_region(self, region_id: int) -> None:
        """Close a region's connection (idle non-home, or map change)."""
        client = self.clients.pop(region_id, None)
        self.policy.forget(region_id)
        if client is not None:
            client.close()
