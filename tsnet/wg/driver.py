"""A thin trio driver that runs the sans-IO :class:`tsnet.wg.device.WireGuard` over one UDP socket.

This is plain WireGuard on a socket: static peers with fixed endpoints (the
"static-peer mode" the userspace TCP/IP stack also uses), as opposed to
Tailscale's magicsock, which multiplexes disco/DERP/relay paths itself.

I/O pattern (no task switch per packet):

* one receive task waits for readability, then drains the socket with
  :class:`tsnet.udpio.UDPReceiver` (``recvmsg`` with ``UDP_GRO``: one syscall may
  return many coalesced datagrams) until ``BlockingIOError`` (at most ``batch``
  datagrams, plus the rest of a coalesced buffer), feeds the batch to the device (``receive_datagrams``), then
  flushes ``datagrams_to_send`` once and dispatches packets and events (both
  ``packet_events`` modes of the device are supported);
* the device's timer is a :class:`trio.CancelScope` deadline that every
  device interaction moves to ``get_timer()``, so timers need no polling and
  no extra wakeups;
* :meth:`WireGuardUDP.send_packet` is synchronous: it encrypts and sends
  immediately on the non-blocking socket, through :class:`tsnet.udpio.UDPSender`
  (consecutive datagrams to one endpoint leave in one ``UDP_SEGMENT`` send). Only if the kernel's send buffer is
  full are datagrams queued (bounded) for a writer task.

Time is ``trio.current_time()`` everywhere, so tests can use ``trio.testing.MockClock``;
construct the device with ``now=trio.current_time()``.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from tsnet.key import NodePublic
from tsnet.udpio import UDPReceiver, UDPSender
from tsnet.wg.device import WireGuard
from tsnet.wg.events import Event, PacketReceived

__all__ = ["DriverCounters", "WireGuardUDP", "open_udp_socket"]

log = logging.getLogger(__name__)

RECV_BUFFER_SIZE = 65535
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

PacketHandler = Callable[[NodePublic, bytes], None]
PacketBatchHandler = Callable[[list[tuple[NodePublic, bytes]]], None]
EventHandler = Callable[[Event], None]


def _grow_buffers(sock: socket.socket) -> None:
    """Raise the socket's kernel buffers to SOCKET_BUFFER_BYTES (best effort; never shrinks them).

    The receive buffer matters most: a TCP sender behind the peer bursts a whole window
    of datagrams at once, and with the default (~200 KiB) the kernel drops several percent
    of them while we are busy decrypting (measured: 6-7% of a kernel->Python transfer,
    which costs more than half the throughput).
    """
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            # getsockopt reports twice what was set (the kernel's bookkeeping overhead).
            if sock.getsockopt(socket.SOL_SOCKET, opt) < 2 * SOCKET_BUFFER_BYTES:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:
            pass  # best effort (capped by net.core.rmem_max / wmem_max anyway)


def open_udp_socket(host: str = "0.0.0.0", port: int = 0) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (IPv6 if ``host`` contains ':'), with large buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _grow_buffers(sock)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class DriverCounters:
    """I/O counters of the driver (the device keeps its own protocol counters)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    receive_batches: int = 0
    receive_errors: int = 0
    send_errors: int = 0  # sendto failed (unreachable, bad address, ...): datagram dropped
    send_queued: int = 0  # kernel buffer full: datagram queued for the writer task
    send_queue_overflow: int = 0  # queue full too: datagram dropped
    packets_delivered: int = 0
    packets_dropped_channel_full: int = 0  # nobody consumed the packet channel fast enough
    handler_errors: int = 0  # a callback raised; logged and ignored
    send_syscalls: int = 0  # sendmsg/sendto calls (one UDP_SEGMENT send carries many datagrams)
    receive_syscalls: int = 0  # recvmsg/recvfrom calls (one UDP_GRO receive may carry many datagrams)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _short_v6_address(addr: tuple[Any, ...]) -> tuple[Any, ...]:
    """(host, port, flowinfo, scope_id) -> (host, port) unless scoped."""
    return addr if addr[3] else addr[:2]


def _as_stdlib_socket(sock: Any) -> socket.socket:
    if isinstance(sock, socket.socket):
        return sock
    if isinstance(sock, trio.socket.SocketType):
        # Take the file descriptor over from the trio wrapper; the wrapper is left detached.
        family, type_, proto = sock.family, sock.type, sock.proto
        return socket.socket(family, type_, proto, fileno=sock.detach())
    raise TypeError(f"expected a socket.socket or trio socket, got {type(sock).__name__}")


class WireGuardUDP:
    """Runs a :class:`~tsnet.wg.device.WireGuard` on a UDP socket under trio.

    Args:
        device: the sans-IO core; build it with ``now=trio.current_time()``.
            Peer endpoints are ``(host, port)`` tuples as ``recvfrom`` returns them;
            on IPv6 sockets the source is shortened to ``(host, port)`` unless it
            carries a scope id (link-local), so it matches configured endpoints.
        sock: a bound UDP socket (stdlib or trio; the driver takes it over, makes it
            non-blocking and raises its kernel buffers to 4 MiB if smaller).
            None: bind a new one on ``bind``.
        bind: ``(host, port)`` used when ``sock`` is None.
        on_packet: called as ``on_packet(peer, packet)`` for every decrypted inner IP
            packet, synchronously inside the receive batch (keep it cheap; it must not
            block). If None, packets go to :attr:`packets`, a memory channel of
            ``PacketReceived`` events with ``packet_buffer`` slots; when it is full,
            packets are dropped and counted rather than stalling the socket.
            Devices made with ``packet_events=False`` (faster) work the same way.
        on_event: called for every other event (handshake completed/failed,
            endpoint changed).
        on_packets: called as ``on_packets([(peer, packet), ...])`` once per device
            interaction with every packet it decrypted (takes precedence over
            ``on_packet``); lets a consumer such as the netstack process a whole batch
            and flush its output once.
        batch: maximum datagrams fed per wakeup before yielding to other tasks.
        send_queue_limit: datagrams kept while the kernel send buffer is full.

    Use::

        async with trio.open_nursery() as nursery:
            wg = WireGuardUDP(device, sock, on_packet=handle)
            await nursery.start(wg.run)
            wg.send_packet(peer_key, ip_packet)

    All methods must be called from the trio thread that runs :meth:`run`.
    """

    def __init__(
        self,
        device: WireGuard,
        sock: socket.socket | trio.socket.SocketType | None = None,
        *,
        bind: tuple[str, int] = ("0.0.0.0", 0),
        on_packet: PacketHandler | None = None,
        on_event: EventHandler | None = None,
        packet_buffer: int = 1024,
        batch: int = 128,
        send_queue_limit: int = 1024,
        on_packets: PacketBatchHandler | None = None,
    ) -> None:
        self.device = device
        self._on_packets = on_packets
        self._sock = open_udp_socket(*bind) if sock is None else _as_stdlib_socket(sock)
        self._sock.setblocking(False)
        _grow_buffers(self._sock)
        self._sender, self._receiver = self._socket_io(self._sock)
        self._on_packet = on_packet
        self._on_event = on_event
        self._batch = batch
        self._send_queue: collections.deque[tuple[bytes | bytearray, Any]] = collections.deque()
        self._send_queue_limit = send_queue_limit
        self._writable_wanted = trio.Event()
        self._timer_scope: trio.CancelScope | None = None
        self._timer_deadline = math.inf  # the deadline last given to _timer_scope
        self._closed = False
        self.counters = DriverCounters()
        self.packets: trio.MemoryReceiveChannel[PacketReceived]
        self._packet_send, self.packets = trio.open_memory_channel[PacketReceived](packet_buffer)

    # -- public API ---------------------------------------------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The UDP socket in use (non-blocking)."""
        return self._sock

    @property
    def local_address(self) -> tuple[Any, ...]:
        """``getsockname()`` of the current socket."""
        return self._sock.getsockname()

    def send_packet(self, peer: NodePublic, packet: bytes | bytearray | memoryview) -> None:
        """Encrypt one inner IP packet for ``peer`` and send it now (or stage it until a handshake completes)."""
        now = trio.current_time()
        self.device.send_packet(peer, packet, now)
        self._after_device_call(now)

    def send_packets(self, peer: NodePublic, packets: list[bytes | bytearray | memoryview]) -> None:
        """Like :meth:`send_packet` for several packets to one peer (cheaper per packet)."""
        now = trio.current_time()
        self.device.send_packets(peer, packets, now)
        self._after_device_call(now)

    def send_keepalive(self, peer: NodePublic) -> None:
        """Send an empty transport message to ``peer``."""
        now = trio.current_time()
        self.device.send_keepalive(peer, now)
        self._after_device_call(now)

    def initiate_handshake(self, peer: NodePublic) -> None:
        """Start a handshake with ``peer`` now (subject to the device's rate limit)."""
        now = trio.current_time()
        self.device.initiate_handshake(peer, now)
        self._after_device_call(now)

    def replace_socket(self, sock: socket.socket | trio.socket.SocketType) -> None:
        """Switch to another bound UDP socket (e.g. a new local port); the old one is closed.

        Peers that roam (plain WireGuard) follow our new source address as soon
        as they authenticate a datagram from it.
        """
        new = _as_stdlib_socket(sock)
        new.setblocking(False)
        _grow_buffers(new)
        old, self._sock = self._sock, new
        self._sender, self._receiver = self._socket_io(new)
        trio.lowlevel.notify_closing(old)  # wakes the receive task, which then picks up the new socket
        old.close()

    def update(self) -> None:
        """Flush the device's output and events and re-arm the timer.

        Call after using the device directly (e.g. ``add_peer``, ``set_endpoint``).
        """
        self._after_device_call(trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the device until cancelled; closes the socket and the packet channel on exit."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._writer_loop)
                task_status.started()
        finally:
            self._closed = True
            self._packet_send.close()
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    # -- internals ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _socket_io(sock: socket.socket) -> tuple[UDPSender, UDPReceiver]:
        # IPv6 sources become (host, port) unless scoped (link-local), so they compare equal to configured endpoints.
        short = _short_v6_address if sock.family == socket.AF_INET6 else None
        return UDPSender(sock), UDPReceiver(sock, map_address=short)

    def _after_device_call(self, now: float) -> None:
        """Send what the device produced, dispatch its events, move the timer deadline."""
        self._flush(now)
        self._dispatch_events()
        scope = self._timer_scope
        if scope is not None:
            t = self.device.get_timer()
            if t is None:
                t = math.inf
            # Setting a CancelScope deadline is not free; most calls leave the timer where it was.
            if t != self._timer_deadline:
                self._timer_deadline = t
                scope.deadline = t

    def _flush(self, now: float) -> None:
        out = self.device.datagrams_to_send(now)
        if not out:
            return
        if self._send_queue:
            self._enqueue(out)  # keep order behind what is already waiting
            return
        sender = self._sender
        counters = self.counters
        syscalls = sender.syscalls
        stop, errors = sender.send(out)
        counters.send_syscalls += sender.syscalls - syscalls
        counters.datagrams_sent += stop - len(errors)
        if errors:
            # Unreachable destination, wrong family, malformed address: dropped, the rest went on.
            counters.send_errors += len(errors)
            for i, exc in errors:
                log.debug("wg driver: send to %r failed: %s", out[i][1], exc)
        if stop < len(out):
            self._enqueue(out[stop:])  # kernel buffer full

    def _enqueue(self, items: list[tuple[bytes | bytearray, Any]]) -> None:
        for item in items:
            if len(self._send_queue) >= self._send_queue_limit:
                self.counters.send_queue_overflow += 1
            else:
                self._send_queue.append(item)
                self.counters.send_queued += 1
        self._writable_wanted.set()

    def _deliver(self, peer: NodePublic, packet: bytes, ev: PacketReceived | None = None) -> None:
        on_packet = self._on_packet
        if on_packet is not None:
            self.counters.packets_delivered += 1
            on_packet(peer, packet)
            return
        try:
            self._packet_send.send_nowait(ev if ev is not None else PacketReceived(peer, packet))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.counters.packets_dropped_channel_full += 1
        else:
            self.counters.packets_delivered += 1

    def _dispatch_events(self) -> None:
        # Packets from a device made with packet_events=False come as plain tuples.
        received = self.device.packets_received()
        on_packets = self._on_packets
        if on_packets is not None:
            if received:
                self._deliver_batch(on_packets, received)
            received = []
        for peer, packet in received:
            try:
                self._deliver(peer, packet)
            except Exception:  # a faulty handler must not kill the node
                self.counters.handler_errors += 1
                log.exception("wg driver: packet handler failed")
        events = self.device.drain_events()
        if not events:
            return
        on_event = self._on_event
        if on_packets is not None:
            batch = [(ev.peer, ev.packet) for ev in events if type(ev) is PacketReceived]
            if batch:
                self._deliver_batch(on_packets, batch)
                events = [ev for ev in events if type(ev) is not PacketReceived]
        for ev in events:
            try:
                if type(ev) is PacketReceived:
                    self._deliver(ev.peer, ev.packet, ev)
                elif on_event is not None:
                    on_event(ev)
            except Exception:  # a faulty handler must not kill the node
                self.counters.handler_errors += 1
                log.exception("wg driver: event handler failed for %r", type(ev).__name__)

    def _deliver_batch(self, on_packets: PacketBatchHandler, batch: list[tuple[NodePublic, bytes]]) -> None:
        self.counters.packets_delivered += len(batch)
        try:
            on_packets(batch)
        except Exception:  # a faulty handler must not kill the node
            self.counters.handler_errors += 1
            log.exception("wg driver: packet batch handler failed")

    async def _receive_loop(self) -> None:
        device = self.device
        counters = self.counters
        batch_size = self._batch
        while True:
            sock = self._sock
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                if self._closed:
                    return
                continue  # replaced by replace_socket(); wait on the new one
            now = trio.current_time()
            receiver = self._receiver
            syscalls, errors = receiver.syscalls, receiver.errors
            # Datagrams are bytes or views of immutable bytes: the device may keep them (staging, events).
            batch: list[tuple[Any, Any]] = []
            drained = receiver.receive(batch, batch_size)
            counters.receive_syscalls += receiver.syscalls - syscalls
            counters.receive_errors += receiver.errors - errors
            if batch:
                counters.datagrams_received += len(batch)
                counters.receive_batches += 1
                device.receive_datagrams(batch, now)
                self._after_device_call(now)
            if not drained:
                await trio.lowlevel.checkpoint()  # full batch: be fair to other tasks

    async def _timer_loop(self) -> None:
        device = self.device
        while True:
            with trio.CancelScope() as scope:
                t = device.get_timer()
                scope.deadline = self._timer_deadline = math.inf if t is None else t
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            t = device.get_timer()
            if t is not None and t <= now:
                device.handle_timer(now)
                self._flush(now)
                self._dispatch_events()
                t2 = device.get_timer()
                if t2 is not None and t2 <= now:
                    # Nothing advanced the timer: back off a little rather than spin.
                    await trio.sleep(0.001)
            else:
                await trio.lowlevel.checkpoint()

    async def _writer_loop(self) -> None:
        while True:
            await self._writable_wanted.wait()
            self._writable_wanted = trio.Event()
            while self._send_queue:
                sock = self._sock
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError:
                    if self._closed:
                        return
                    continue
                queue = self._send_queue
                while queue:
                    items = list(queue)
                    sender = self._sender
                    syscalls = sender.syscalls
                    stop, errors = sender.send(items)
                    self.counters.send_syscalls += sender.syscalls - syscalls
                    self.counters.send_errors += len(errors)
                    self.counters.datagrams_sent += stop - len(errors)
                    for _ in range(stop):
                        queue.popleft()
                    if stop < len(items):
                        break  # still full: wait for writability again
