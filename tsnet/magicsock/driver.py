"""Thin trio driver for :class:`tsnet.magicsock.conn.MagicSock`.

* One non-blocking UDP socket per address family (IPv6 optional), bound to the
  configured port (0 = random; IPv6 tries the IPv4 port first). A reader task
  per socket waits for readability and drains up to ``batch`` datagrams into
  one :meth:`~MagicSock.receive_udp_batch` call; no task switch per packet.
* DERP: a :class:`tsnet.derp.client.DerpRegions` (one connection per region in
  use, home region marked preferred). Every packet of one DERP socket read goes to
  :meth:`~MagicSock.receive_derp_batch` in one synchronous call from the region's reader
  task, followed by one pump, so replies (TCP ACKs) leave as one coalesced write.
* The core's timer is a cancel-scope deadline moved after every core call.
* Sends are synchronous (:class:`tsnet.udpio.UDPSender` on the non-blocking
  socket: consecutive datagrams to one destination leave in one ``UDP_SEGMENT``
  send; a full kernel buffer drops the datagram, as UDP may).
  Readers drain with :class:`tsnet.udpio.UDPReceiver` (``UDP_GRO``).

``on_packet(peer, ip_packet)`` receives decrypted packets; ``on_event(event)``
receives :class:`~tsnet.magicsock.conn.EndpointsChanged`,
:class:`~tsnet.magicsock.conn.HomeDerpChanged` and
:class:`~tsnet.magicsock.conn.PathChanged` (e.g. to send a lite map update to
control).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import math
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from tsnet.derp.client import DerpNode, DerpRegions
from tsnet.derp.client_core import ReceivedPacket
from tsnet.key import DiscoPrivate, NodePrivate, NodePublic
from tsnet.magicsock.addrport import AddrPort, IPAddress
from tsnet.magicsock.conn import (
    DiscoPingResult,
    EndpointsChanged,
    HomeDerpChanged,
    MagicSock,
    MagicSockEvent,
    PathStatus,
)
from tsnet.relay.driver import open_udp_sockets as open_relay_sockets
from tsnet.relay.driver import serve_relay
from tsnet.relay.server import RelayServer
from tsnet.udpio import UDPReceiver, UDPSender

__all__ = ["MagicSockDriver", "derp_nodes_from_map", "interface_addresses"]

log = logging.getLogger("tsnet.magicsock")

DEFAULT_BATCH = 64
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
_SIOCGIFADDR = 0x8915
_UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)


def interface_addresses() -> list[IPAddress]:
    """Addresses of every interface that is up (IPv4 via ioctl, IPv6 from /proc/net/if_inet6)."""
    out: list[IPAddress] = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            out.append(ipaddress.IPv4Address(res[20:24]))
    finally:
        s.close()
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6:
                out.append(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
    except OSError:
        pass
    return out


def derp_nodes_from_map(derp_map: Any, *, plain_http: bool = False) -> dict[int, list[DerpNode]]:
    """Region ID → nodes for :class:`DerpRegions`, from a ``tailcfg.DERPMap``."""
    out: dict[int, list[DerpNode]] = {}
    for rid, region in (getattr(derp_map, "regions", None) or {}).items():
        nodes = []
        for n in region.nodes or ():
            nodes.append(DerpNode(
                name=n.name or "",
                region_id=int(n.region_id or rid),
                host_name=n.host_name or "",
                ipv4=n.ipv4 or "",
                ipv6=n.ipv6 or "",
                derp_port=n.derp_port or 0,
                stun_port=n.stun_port or 0,
                stun_only=bool(n.stun_only),
                insecure_for_tests=bool(n.insecure_for_tests),
                cert_name=n.cert_name or "",
                stun_test_ip=n.stun_test_ip or "",
                can_port80=bool(n.can_port80),
                plain_http=plain_http,
            ))
        out[int(rid)] = nodes
    return out


def _open_udp(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
            except OSError:
                pass
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class MagicSockDriver:
    """Runs a :class:`MagicSock` on real sockets and DERP connections. Construct inside trio."""

    def __init__(
        self,
        node_private: NodePrivate,
        disco_private: DiscoPrivate | None = None,
        *,
        port: int = 0,
        bind_v4: str = "0.0.0.0",
        bind_v6: str | None = "::",
        local_addresses: Iterable[IPAddress] | None = None,
        derp_plain_http: bool = False,
        drop_direct_udp: bool = False,
        on_packet: Callable[[NodePublic, bytes], None] | None = None,
        on_packets: Callable[[list[tuple[NodePublic, bytes]]], None] | None = None,
        on_event: Callable[[MagicSockEvent], None] | None = None,
        batch: int = DEFAULT_BATCH,
        relay_server_port: int | None = None,
    ) -> None:
        self.core = MagicSock(node_private, disco_private or DiscoPrivate.generate(), now=trio.current_time(),
                              drop_direct_udp=drop_direct_udp)
        self.node_private = node_private
        self.port = port
        self.bind_v4 = bind_v4
        self.bind_v6 = bind_v6
        self._local_addresses = list(local_addresses) if local_addresses is not None else None
        self.derp_plain_http = derp_plain_http
        self.on_packet = on_packet
        #: batch alternative to ``on_packet``: every decrypted packet of one wake-up in one call
        self.on_packets = on_packets
        self.on_event = on_event
        self.batch = batch
        #: run a peer relay server on this UDP port (0 = random; None = no relay server)
        self.relay_server_port = relay_server_port
        self.relay_server: RelayServer | None = None
        self.relay_socket: socket.socket | None = None  # the first of relay_sockets
        #: SO_REUSEPORT group on the relay port, one socket per usable CPU
        self.relay_sockets: list[socket.socket] = []
        self.sockets: dict[int, socket.socket] = {}
        self.regions = DerpRegions(node_private, {}, on_packets=self._receive_derp_batch)
        self._timer_scope: trio.CancelScope | None = None
        self._running = trio.Event()
        self._addr_cache: dict[tuple[Any, ...], AddrPort] = {}
        #: request id -> [answered, result] for disco_ping() callers
        self._ping_waiters: dict[int, list[Any]] = {}
        self.counters = {"udp_received": 0, "udp_sent": 0, "udp_send_dropped": 0, "udp_send_errors": 0,
                         "derp_received": 0, "derp_sent": 0, "derp_send_dropped": 0, "receive_batches": 0,
                         "derp_receive_batches": 0,
                         "udp_send_syscalls": 0, "udp_receive_syscalls": 0, "udp_receive_errors": 0}
        self._senders: dict[int, UDPSender] = {}
        self._sockaddr_cache: dict[AddrPort, tuple[str, int]] = {}

    # --- public API -------------------------------------------------------------

    @property
    def disco_key(self):  # type: ignore[no-untyped-def]
        return self.core.disco_key

    @property
    def node_key(self) -> NodePublic:
        return self.core.node_key

    def local_port(self, family: int = 4) -> int:
        return self.core.ports[family]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind sockets, connect DERP as needed, and serve until cancelled."""
        self._bind()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.regions.run)
                if self.relay_server_port is not None:
                    self._start_relay_server()
                    await nursery.start(serve_relay, self.relay_server, *self.relay_sockets)
                for sock in self.sockets.values():
                    nursery.start_soon(self._reader, sock)
                nursery.start_soon(self._derp_reader)
                nursery.start_soon(self._timer_loop)
                self._running.set()
                if self.core.home_derp in self.regions.derp_map:
                    self.regions.set_home(self.core.home_derp)
                self._pump()
                task_status.started()
        finally:
            for sock in self.sockets.values():
                sock.close()
            for relay_sock in self.relay_sockets:
                relay_sock.close()

    def _start_relay_server(self) -> None:
        self.relay_sockets = open_relay_sockets(self.bind_v4, self.relay_server_port or 0)
        self.relay_socket = self.relay_sockets[0]
        self.relay_server = RelayServer(DiscoPrivate.generate(), now=trio.current_time())
        self.core.relay_server = self.relay_server
        self._update_relay_addr_ports()
        log.info("relayserver: listening on udp4:%d (%d SO_REUSEPORT sockets)", self.relay_socket.getsockname()[1],
                 len(self.relay_sockets))

    def _update_relay_addr_ports(self) -> None:
        """Advertise our endpoints' IPs with the relay port (interface addresses, STUN-mapped IPv4)."""
        if self.relay_server is None or self.relay_socket is None:
            return
        port = self.relay_socket.getsockname()[1]
        ips = list(dict.fromkeys(e.addr.ip for e in self.core.endpoints if e.addr.ip.version == 4))
        self.relay_server.set_addr_ports(dynamic=[AddrPort(ip, port) for ip in ips])

    async def wait_running(self) -> None:
        await self._running.wait()

    def set_netmap(self, netmap: Any) -> None:
        """Apply a control NetworkMap (DERP map, peers, endpoints, disco keys)."""
        if netmap.derp_map is not None:
            self.set_derp_map(netmap.derp_map)
        self.core.set_netmap(netmap, trio.current_time())
        self._pump()

    def set_derp_map(self, derp_map: Any) -> None:
        nodes = derp_nodes_from_map(derp_map, plain_http=self.derp_plain_http)
        if nodes != self.regions.derp_map:
            for rid in [r for r in self.regions.clients if r not in nodes]:
                self.regions.close_region(rid)
            self.regions.derp_map = nodes
        if derp_map != self.core.derp_map:
            self.core.set_derp_map(derp_map, trio.current_time())
        self._pump()

    def set_peers(self, peers: Iterable[Any]) -> None:
        self.core.set_peers(peers, trio.current_time())
        self._pump()

    def send_packet(self, peer: NodePublic, packet: bytes | bytearray | memoryview) -> None:
        self.core.send_packet(peer, packet, trio.current_time())
        self._pump()

    def send_ip_packet(self, packet: bytes | bytearray | memoryview) -> bool:
        ok = self.core.send_ip_packet(packet, trio.current_time())
        self._pump()
        return ok

    def send_ip_packets(self, packets: Iterable[bytes | bytearray | memoryview]) -> int:
        """Route a batch of IP packets: consecutive packets to one peer are encrypted as one run
        (``MagicSock.send_packets``), and the driver pumps once. Returns how many had a route."""
        now = trio.current_time()
        core = self.core
        sent = 0
        run_key: NodePublic | None = None
        run: list[bytes | bytearray | memoryview] = []
        last_dst = b""
        key = None
        for packet in packets:
            if packet.__class__ is bytes and packet[:1] == b"\x45":
                dst = packet[16:20]  # (the common case: a slice of bytes is bytes, no conversion)
            else:
                ver = packet[0] >> 4 if packet else 0
                dst = bytes(packet[16:20]) if ver == 4 else bytes(packet[24:40]) if ver == 6 else b""
            if dst != last_dst:
                last_dst = dst
                try:
                    key = core.peer_for_ip(ipaddress.ip_address(dst)) if dst else None
                except ValueError:
                    key = None
            if key is None:
                core.counters["send_no_route"] = core.counters.get("send_no_route", 0) + 1
                continue
            if key is not run_key and key != run_key:
                if run:
                    core.send_packets(run_key, run, now)  # type: ignore[arg-type]
                run_key, run = key, []
            run.append(packet)
            sent += 1
        if run:
            core.send_packets(run_key, run, now)  # type: ignore[arg-type]
        self._pump()
        return sent

    def status(self) -> list[PathStatus]:
        return self.core.status(trio.current_time())

    async def disco_ping(self, peer: NodePublic, *, timeout: float = 5.0, size: int = 0) -> DiscoPingResult:
        """Disco-ping ``peer`` (like ``tailscale ping``) and return the first pong: latency and path.

        Raises KeyError for an unknown peer, ValueError when it has no disco key or
        no path yet, and ``TimeoutError`` when no pong arrives within ``timeout`` s
        (one ping per path is sent; call again to retry).
        """
        request = self.core.ping(peer, trio.current_time(), size)
        waiter: list[Any] = [trio.Event(), None]
        self._ping_waiters[request] = waiter
        try:
            self._pump()
            with trio.move_on_after(timeout):
                await waiter[0].wait()
            if waiter[1] is None:
                raise TimeoutError(f"no pong from {peer.short()} within {timeout:g}s")
            return waiter[1]
        finally:
            del self._ping_waiters[request]
            self.core.cancel_ping(request)

    def peer_status(self, peer: NodePublic) -> PathStatus:
        return self.core.peer_status(peer, trio.current_time())

    # --- internals ----------------------------------------------------------------

    def _bind(self) -> None:
        v4 = _open_udp(socket.AF_INET, self.bind_v4, self.port)
        self.sockets[4] = v4
        port4 = v4.getsockname()[1]
        if self.bind_v6 is not None:
            for try_port in dict.fromkeys((self.port or port4, 0)):
                try:
                    self.sockets[6] = _open_udp(socket.AF_INET6, self.bind_v6, try_port)
                    break
                except OSError:
                    continue
            else:
                log.info("magicsock: no IPv6 socket")
        ports = {fam: s.getsockname()[1] for fam, s in self.sockets.items()}
        if self._local_addresses is not None:
            local = self._local_addresses
        elif self.bind_v4 not in ("0.0.0.0", ""):
            local = [ipaddress.ip_address(self.bind_v4)]
        else:
            local = interface_addresses()
        local = [ip for ip in local if ip.version in ports]
        self.core.set_sockets(ports, local, trio.current_time(), configured_port=self.port)
        log.info("magicsock: listening on %s", " ".join(f"udp{f}:{p}" for f, p in sorted(ports.items())))

    def _addr(self, sockaddr: tuple[Any, ...]) -> AddrPort:
        ap = self._addr_cache.get(sockaddr)
        if ap is None:
            ap = AddrPort.from_sockaddr(sockaddr)
            if len(self._addr_cache) > 4096:
                self._addr_cache.clear()
            self._addr_cache[sockaddr] = ap
        return ap

    async def _reader(self, sock: socket.socket) -> None:
        # Sources are mapped to AddrPort once per receive syscall (a GRO buffer shares one source).
        receiver = UDPReceiver(sock, map_address=self._addr)
        counters = self.counters
        while True:
            await trio.lowlevel.wait_readable(sock)
            batch: list[tuple[Any, AddrPort]] = []
            syscalls, errors = receiver.syscalls, receiver.errors
            receiver.receive(batch, self.batch)
            counters["udp_receive_syscalls"] += receiver.syscalls - syscalls
            # ICMP errors surface as failed receives on Linux (ECONNREFUSED etc.): counted, not fatal.
            counters["udp_receive_errors"] += receiver.errors - errors
            if not batch:
                continue
            self.counters["udp_received"] += len(batch)
            self.counters["receive_batches"] += 1
            self.core.receive_udp_batch(batch, trio.current_time())
            self._pump()
            await trio.lowlevel.checkpoint()

    def _receive_derp_batch(self, region_id: int, packets: list[ReceivedPacket]) -> None:
        """Every packet of one DERP read (called from the region's reader task), then one pump."""
        self.counters["derp_received"] += len(packets)
        self.counters["derp_receive_batches"] += 1
        self.core.receive_derp_batch([(region_id, ev.src, ev.packet) for ev in packets], trio.current_time())
        self._pump()

    async def _derp_reader(self) -> None:
        # Packets arrive through _receive_derp_batch; this drains the other region events (and any
        # packet event a client emitted without a handler) so the channel never fills.
        async for rev in self.regions.events:
            ev = rev.event
            if ev.__class__ is ReceivedPacket:
                self._receive_derp_batch(rev.region_id, [ev])

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                t = self.core.get_timer()
                scope.deadline = t if t is not None else math.inf
                await trio.sleep_forever()
            self._timer_scope = None
            self.core.handle_timer(trio.current_time())
            self._pump()

    def _send_udp(self, datagrams: list[tuple[bytes | bytearray, AddrPort]]) -> None:
        """Send the core's datagrams, one batched send per address family."""
        counters = self.counters
        cache = self._sockaddr_cache
        by_family: dict[int, tuple[list[tuple[bytes | bytearray, tuple[str, int]]], list[AddrPort]]] = {}
        last_dest: Any = None
        items_append = dests_append = None
        sockaddr: Any = None
        for payload, dest in datagrams:
            # A burst to one peer repeats one AddrPort object: look it up once per run (hashing an
            # AddrPort hashes its ipaddress object in Python, too slow to do per datagram).
            if dest is not last_dest:
                last_dest = dest
                sockaddr = cache.get(dest)
                if sockaddr is None:
                    if len(cache) > 4096:
                        cache.clear()
                    sockaddr = cache[dest] = (str(dest.ip), dest.port)
                fam = 6 if dest.ip.version == 6 else 4
                group = by_family.get(fam)
                if group is None:
                    group = by_family[fam] = ([], [])
                items_append, dests_append = group[0].append, group[1].append
            items_append((payload, sockaddr))  # type: ignore[misc]
            dests_append(dest)  # type: ignore[misc]
        for fam, (items, dests) in by_family.items():
            sock = self.sockets.get(fam)
            if sock is None:
                counters["udp_send_dropped"] += len(items)
                continue
            sender = self._senders.get(fam)
            if sender is None or sender.sock is not sock:
                sender = self._senders[fam] = UDPSender(sock)
            syscalls = sender.syscalls
            start = 0
            while True:
                stop, errors = sender.send(items, start)
                counters["udp_sent"] += stop - start - len(errors)
                for i, exc in errors:
                    counters["udp_send_errors"] += 1
                    if getattr(exc, "errno", None) in _UNREACHABLE:
                        self.core.note_udp_unreachable(dests[i], trio.current_time())
                if stop >= len(items):
                    break
                # Kernel buffer full: this datagram is dropped (as UDP may); the next ones still get a try.
                counters["udp_send_dropped"] += 1
                start = stop + 1
            counters["udp_send_syscalls"] += sender.syscalls - syscalls

    def _pump(self) -> None:
        """Carry out everything the core queued, then re-arm the timer."""
        core = self.core
        udp = core.take_udp()
        if udp:
            self._send_udp(udp)
        if self._running.is_set():
            derp = core.take_derp()
            if derp:
                # One call for the whole batch: each region's frames are queued together and its
                # writer sends them as one coalesced write. Regions not in the map count as dropped.
                queued = self.regions.send_many(derp)
                self.counters["derp_sent"] += queued
                self.counters["derp_send_dropped"] += len(derp) - queued
        for ev in core.take_events():
            if isinstance(ev, HomeDerpChanged) and self._running.is_set() and ev.region in self.regions.derp_map:
                self.regions.set_home(ev.region)
            if isinstance(ev, EndpointsChanged):
                self._update_relay_addr_ports()
            if ev.__class__ is DiscoPingResult:
                waiter = self._ping_waiters.get(ev.request)  # type: ignore[union-attr]
                if waiter is not None:
                    waiter[1] = ev
                    waiter[0].set()
            if self.on_event is not None:
                try:
                    self.on_event(ev)
                except Exception:
                    log.exception("magicsock: event handler failed")
        packets = core.take_packets()
        if packets and self.on_packets is not None:
            try:
                self.on_packets(packets)
            except Exception:
                log.exception("magicsock: packet handler failed")
        elif packets and self.on_packet is not None:
            for peer, pkt in packets:
                try:
                    self.on_packet(peer, pkt)
                except Exception:
                    log.exception("magicsock: packet handler failed")
        if self._timer_scope is not None:
            t = core.get_timer()
            self._timer_scope.deadline = t if t is not None else math.inf
