"""The trio driver of :class:`~tsnet.netstack.stack.Stack`: TCP streams, listeners and UDP sockets.

:class:`NetStack` owns one :class:`Stack`. Packets come in through
:meth:`NetStack.deliver` (synchronous, one batch at a time, no task switch per
packet); everything the stack produces leaves through the ``send_packets``
callable, once per batch or application call. Tasks blocked on a socket park
on that socket's :class:`trio.lowlevel.ParkingLot`; only the sockets the stack
reports as changed are woken.

The timer is a :class:`trio.CancelScope` deadline inside :meth:`NetStack.run`
that every stack interaction moves to ``stack.get_timer()``, so idle
connections cost nothing. Time is ``trio.current_time()``, so
:class:`trio.testing.MockClock` works.

All methods must be called from the trio thread that runs :meth:`NetStack.run`.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import math
import operator
import socket
from collections.abc import Callable, Generator
from typing import Any, Union

import trio

from .stack import InboundFilter, Listener, Stack, UDPEndpoint
from .tcp import TCPConnection, TCPState

__all__ = ["NetStack", "TCPListener", "TCPStream", "UDPSocket"]

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
SendPackets = Callable[[list[Union[bytes, bytearray]]], None]

#: States in which the peer has acknowledged our FIN (or the connection is gone).
_FIN_ACKED = frozenset({TCPState.FIN_WAIT_2, TCPState.TIME_WAIT, TCPState.CLOSED})

#: ``receive_some()`` without ``max_bytes`` returns at most this much.
DEFAULT_RECEIVE_SIZE = 65536


def _ip_str(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def _parse_ip(host: str | IPAddress | bytes) -> bytes:
    """Raw bytes of an IP literal (``[v6]`` accepted); ValueError for names."""
    if isinstance(host, bytes):
        return host
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return host.packed
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (names are resolved above the netstack)") from None


class _Done:
    """An awaitable that does nothing: lets a synchronous method also be awaited."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover


class NetStack:
    """Runs a :class:`Stack` under trio.

    Args:
        stack: the sans-IO core (create it with ``now=trio.current_time()``).
        send_packets: called with a list of whole IP packets whenever the stack
            produced output (synchronously; it must not block, e.g. WireGuard's
            ``send_packets`` for the peer). Exceptions are logged and the packets dropped.
    """

    def __init__(self, stack: Stack, send_packets: SendPackets) -> None:
        self.stack = stack
        self._send_packets = send_packets
        self._lots: dict[object, trio.lowlevel.ParkingLot] = {}
        self._timer_scope: trio.CancelScope | None = None
        self._timer_deadline = math.inf
        self.send_errors = 0
        #: longest :meth:`TCPStream.aclose` waits for the peer to acknowledge our data and FIN
        self.close_linger = 5.0

    # -- packets in / out ----------------------------------------------------------------------------------------------

    def deliver(self, packets: list[bytes | bytearray | memoryview], inbound_filter: InboundFilter | None = None) -> None:
        """Feed a batch of IP packets (from WireGuard / magicsock). Synchronous; never raises on bad packets.

        ``inbound_filter`` judges each packet first (see :meth:`Stack.receive_packets`).
        """
        if not packets:
            return
        self.stack.receive_packets(packets, trio.current_time(), inbound_filter)
        self._flush()

    def _flush(self) -> None:
        """Send the stack's output, wake tasks of changed sockets, move the timer."""
        stack = self.stack
        out = stack.packets_to_send()
        if out:
            try:
                self._send_packets(out)
            except Exception:
                self.send_errors += 1
                log.exception("netstack: send_packets failed; %d packets dropped", len(out))
        if stack.changed:
            lots = self._lots
            for obj in stack.take_changed():
                lot = lots.get(obj)
                if lot is not None:
                    lot.unpark_all()
        scope = self._timer_scope
        if scope is not None:
            t = stack.get_timer()
            if t is None:
                t = math.inf
            if t != self._timer_deadline:
                self._timer_deadline = t
                scope.deadline = t

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the stack's timers until cancelled."""
        stack = self.stack
        task_status.started()
        try:
            while True:
                with trio.CancelScope() as scope:
                    t = stack.get_timer()
                    self._timer_deadline = math.inf if t is None else t
                    scope.deadline = self._timer_deadline
                    self._timer_scope = scope
                    await trio.sleep_forever()
                self._timer_scope = None
                now = trio.current_time()
                t = stack.get_timer()
                if t is not None and t <= now:
                    stack.handle_timer(now)
                    self._flush()
                    t2 = stack.get_timer()
                    if t2 is not None and t2 <= now:
                        await trio.sleep(0.001)  # a timer that does not advance must not spin the CPU
                        continue
                await trio.lowlevel.checkpoint()
        finally:
            self._timer_scope = None

    def abort_all(self) -> None:
        """Reset every TCP connection (the peers get RSTs), close every listener and UDP
        endpoint, and wake every waiting task (they see their socket broken or closed).
        For shutting the node down."""
        stack = self.stack
        now = trio.current_time()
        try:
            for conn in list(stack.connections.values()):
                stack.tcp_abort(conn, now)
            for listener in list(stack.listeners.values()):
                stack.close_listener(listener, now)
            for ep in list(stack.udp_endpoints.values()):
                stack.udp_close(ep)
            self._flush()
        finally:
            # Even if a reset failed, no task may stay parked on a node that is going away.
            for lot in list(self._lots.values()):
                lot.unpark_all()

    # -- waiting ---------------------------------------------------------------------------------------------------

    def _register(self, obj: object) -> trio.lowlevel.ParkingLot:
        lot = self._lots.get(obj)
        if lot is None:
            lot = self._lots[obj] = trio.lowlevel.ParkingLot()
        return lot

    def _unregister(self, obj: object) -> None:
        lot = self._lots.pop(obj, None)
        if lot is not None:
            lot.unpark_all()

    # -- opening sockets -------------------------------------------------------------------------------------------

    async def open_tcp_stream(self, host: str | IPAddress, port: int, *, timeout: float | None = None,
                              local_port: int = 0) -> TCPStream:
        """Connect to ``host`` (an IP literal) and ``port``.

        Raises ConnectionRefusedError when the peer answers RST (or port unreachable),
        TimeoutError after ``timeout`` seconds or when the SYN retries run out,
        OSError(EADDRNOTAVAIL) if we have no address of that family, ValueError for a name.
        """
        rip = _parse_ip(host)
        await trio.lowlevel.checkpoint_if_cancelled()
        conn = self.stack.tcp_connect(rip, port, trio.current_time(), local_port=local_port)
        stream = TCPStream(self, conn)
        self._flush()
        ok = False
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                while not conn.is_established:
                    if conn.error is not None:
                        raise conn.error
                    if conn.state == TCPState.CLOSED:
                        raise ConnectionRefusedError(errno.ECONNREFUSED, f"connection to {host}:{port} refused")
                    await stream._lot.park()
            if scope.cancelled_caught:
                raise TimeoutError(errno.ETIMEDOUT, f"connection to {host}:{port} timed out")
            ok = True
        finally:
            if not ok:
                stream._closed = True
                self.stack.tcp_abort(conn, trio.current_time())
                self._unregister(conn)
                self._flush()
        return stream

    async def open_tcp_listener(self, port: int, *, host: str | IPAddress | None = None,
                                backlog: int = 128) -> TCPListener:
        """Listen on ``port`` (0: ephemeral) on ``host`` or all our addresses. OSError(EADDRINUSE) if taken."""
        lip = None if host is None or host in ("", "0.0.0.0", "::") else _parse_ip(host)
        await trio.lowlevel.checkpoint()
        listener = self.stack.tcp_listen(port, local_ip=lip, backlog=backlog)
        return TCPListener(self, listener)

    async def open_udp_socket(self, host: str | IPAddress | None = None, port: int = 0) -> UDPSocket:
        """Bind a UDP socket on ``host`` (default: all our addresses) and ``port`` (0: ephemeral)."""
        lip = None if host is None or host in ("", "0.0.0.0", "::") else _parse_ip(host)
        await trio.lowlevel.checkpoint()
        ep = self.stack.udp_bind(lip, port)
        return UDPSocket(self, ep)


class TCPStream(trio.abc.HalfCloseableStream):
    """One TCP connection as a trio stream.

    Errors: ``trio.BrokenResourceError`` (with the connection's OSError, e.g.
    ConnectionResetError, as ``__cause__``) once the connection failed;
    ``trio.ClosedResourceError`` after :meth:`aclose` (or sending after
    :meth:`send_eof`); ``trio.BusyResourceError`` for concurrent sends or receives.
    """

    def __init__(self, net: NetStack, conn: TCPConnection) -> None:
        self._net = net
        self._stack = net.stack
        #: the sans-IO connection (state, ``stats``)
        self.connection = conn
        self._lot = net._register(conn)
        self._closed = False
        self._eof_sent = False
        self._sending = False
        self._receiving = False

    @property
    def local_address(self) -> tuple[str, int]:
        """``(ip, port)`` on our side."""
        return _ip_str(self.connection.local_ip), self.connection.local_port

    @property
    def remote_address(self) -> tuple[str, int]:
        """``(ip, port)`` of the peer."""
        return _ip_str(self.connection.remote_ip), self.connection.remote_port

    def set_nagle(self, enabled: bool) -> None:
        """Turn Nagle's algorithm on or off (off by default)."""
        conn = self.connection
        self._stack.tcp_set_options(conn, dataclasses.replace(conn.options, nagle=enabled), trio.current_time())
        self._net._flush()

    def set_keepalive(self, idle: float | None, interval: float = 75.0, count: int = 9) -> None:
        """Keepalive probes after ``idle`` seconds without traffic (None: off)."""
        conn = self.connection
        opts = dataclasses.replace(conn.options, keepalive_idle=idle, keepalive_interval=interval,
                                   keepalive_count=count)
        self._stack.tcp_set_options(conn, opts, trio.current_time())
        self._net._flush()

    def _broken(self) -> trio.BrokenResourceError:
        err = self.connection.error
        exc = trio.BrokenResourceError(f"TCP connection failed: {err!r}" if err else "TCP connection closed")
        exc.__cause__ = err
        return exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("stream closed for sending")
            conn = self.connection
            view = memoryview(data)
            if view.itemsize != 1:
                view = view.cast("B")
            total = len(view)
            pos = 0
            net = self._net
            stack = self._stack
            while True:
                if conn.error is not None:
                    raise self._broken()
                if pos >= total:
                    break
                if conn.send_space > 0:
                    try:
                        n = stack.tcp_send(conn, view[pos:], trio.current_time())
                    except OSError as exc:
                        net._flush()
                        raise self._broken() from exc
                    net._flush()
                    pos += n
                    if n:
                        continue
                if conn.state == TCPState.CLOSED:
                    raise self._broken()
                await self._lot.park()
                if self._closed:
                    raise trio.ClosedResourceError("stream closed while sending")
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            conn = self.connection
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if conn.send_space > 0 or conn.error is not None or conn.state == TCPState.CLOSED:
                    return
                await self._lot.park()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            if self._eof_sent:
                return
            self._eof_sent = True
            conn = self.connection
            if conn.state != TCPState.CLOSED:
                self._stack.tcp_shutdown(conn, trio.current_time())
                self._net._flush()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)  # TypeError for floats, as trio requires
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            conn = self.connection
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if conn.readable:
                    data = self._stack.tcp_receive(conn, max_bytes, trio.current_time())
                    self._net._flush()
                    if data:
                        break
                if conn.at_eof:
                    data = b""
                    break
                if conn.error is not None:
                    raise self._broken()
                if conn.state == TCPState.CLOSED:
                    data = b""
                    break
                await self._lot.park()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Close both directions: FIN after the queued data (RST instead if unread data remains).

        The stream is closed at once (other tasks using it get ClosedResourceError, and
        cancelling aclose does not undo that). Then it lingers, at most
        ``NetStack.close_linger`` seconds, until the peer has acknowledged everything
        including our FIN, so data is not lost if the whole stack stops right after.
        The connection itself finishes in the stack either way.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        conn = self.connection
        net = self._net
        if conn.state != TCPState.CLOSED:
            try:
                self._stack.tcp_close(conn, trio.current_time())
            except OSError:
                pass
        net._flush()
        self._lot.unpark_all()  # tasks blocked in send/receive see the stream closed
        try:
            with trio.move_on_after(net.close_linger):
                while conn.state not in _FIN_ACKED and conn.error is None:
                    await self._lot.park()
            await trio.lowlevel.checkpoint()
        finally:
            net._unregister(conn)

    def __repr__(self) -> str:
        c = self.connection
        local, remote = _ip_str(c.local_ip), _ip_str(c.remote_ip)
        return f"<TCPStream {local}:{c.local_port} -> {remote}:{c.remote_port} {c.state.name}>"


class TCPListener(trio.abc.Listener[TCPStream]):
    """A listening TCP port; works with :func:`trio.serve_listeners`."""

    def __init__(self, net: NetStack, listener: Listener) -> None:
        self._net = net
        self._listener = listener
        self._lot = net._register(listener)
        self._accepting = False

    @property
    def port(self) -> int:
        """The port we listen on."""
        return self._listener.port

    @property
    def local_address(self) -> tuple[str, int]:
        """``(ip, port)``; the ip is ``"0.0.0.0"`` when listening on all our addresses."""
        lip = self._listener.local_ip
        return ("0.0.0.0" if lip is None else _ip_str(lip)), self._listener.port

    async def accept(self) -> TCPStream:
        if self._accepting:
            raise trio.BusyResourceError("another task is accepting on this listener")
        self._accepting = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._listener.closed:
                    raise trio.ClosedResourceError("listener closed")
                conn = self._net.stack.tcp_accept(self._listener)
                if conn is not None:
                    stream = TCPStream(self._net, conn)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return stream
                await self._lot.park()
        finally:
            self._accepting = False

    async def aclose(self) -> None:
        """Stop listening; connections not yet accepted are reset."""
        if not self._listener.closed:
            self._net.stack.close_listener(self._listener, trio.current_time())
            self._net._flush()
            self._net._unregister(self._listener)
        await trio.lowlevel.checkpoint()


class UDPSocket:
    """A UDP socket on the netstack, shaped like a trio UDP socket.

    Satisfies the proxy's ``UDPConnection`` protocol (after :meth:`connect`) and
    MagicDNS's ``DatagramSocket`` protocol. Datagrams above 1252 (IPv4) / 1232
    (IPv6) bytes raise OSError(EMSGSIZE): we never fragment. A port unreachable
    for a connected socket raises ConnectionRefusedError from the next receive.
    After :meth:`aclose`, calls raise ``trio.ClosedResourceError``.
    """

    def __init__(self, net: NetStack, ep: UDPEndpoint) -> None:
        self._net = net
        self._ep = ep
        self._lot = net._register(ep)

    def getsockname(self) -> tuple[str, int]:
        """``(ip, port)``; the ip is ``"0.0.0.0"`` when bound to all our addresses."""
        lip = self._ep.local_ip
        return ("0.0.0.0" if lip is None else _ip_str(lip)), self._ep.port

    def getpeername(self) -> tuple[str, int]:
        """The connected address; OSError(ENOTCONN) if not connected."""
        if self._ep.remote is None:
            raise OSError(errno.ENOTCONN, "not connected")
        return _ip_str(self._ep.remote[0]), self._ep.remote[1]

    def _check_open(self) -> None:
        if self._ep.closed:
            raise trio.ClosedResourceError("UDP socket closed")

    def connect(self, address: tuple[str, int]) -> _Done:
        """Fix the peer: :meth:`send`/:meth:`recv` use it, datagrams from others are dropped.

        Synchronous, but may also be awaited like trio's ``socket.connect``.
        """
        self._check_open()
        host, port = address[0], address[1]
        self._net.stack.udp_connect(self._ep, _parse_ip(host), int(port))
        return _Done()

    async def sendto(self, data: bytes | bytearray | memoryview, address: tuple[Any, ...], /) -> int:
        """Send one datagram to ``(host, port)``; returns its length."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        self._net.stack.udp_sendto(self._ep, data, _parse_ip(address[0]), int(address[1]), trio.current_time())
        self._net._flush()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return len(data)

    async def send(self, data: bytes | bytearray | memoryview) -> int:
        """Send one datagram to the connected address."""
        remote = self._ep.remote
        if remote is None:
            raise OSError(errno.EDESTADDRREQ, "UDP socket not connected")
        return await self.sendto(data, (remote[0], remote[1]))

    async def recvfrom(self, bufsize: int = 65535, /) -> tuple[bytes, tuple[str, int]]:
        """Wait for one datagram; returns ``(payload[:bufsize], (src_ip, src_port))``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        ep = self._ep
        while True:
            self._check_open()
            if ep.error is not None:
                err, ep.error = ep.error, None
                raise err
            if ep.queue:
                data, (src, sport) = ep.queue.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data[:bufsize], (_ip_str(src), sport)
            await self._lot.park()

    async def recv(self, bufsize: int = 65535) -> bytes:
        """Wait for one datagram and return its payload (up to ``bufsize`` bytes)."""
        data, _ = await self.recvfrom(bufsize)
        return data

    async def receive(self) -> bytes:
        """Alias of :meth:`recv` (the proxy's ``UDPConnection`` protocol)."""
        data, _ = await self.recvfrom(65535)
        return data

    def close(self) -> None:
        """Unbind now; tasks waiting to receive get ClosedResourceError."""
        if not self._ep.closed:
            self._net.stack.udp_close(self._ep)
            self._net._unregister(self._ep)

    async def aclose(self) -> None:
        """Like :meth:`close`, as a checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> UDPSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<UDPSocket {self.getsockname()}>"
