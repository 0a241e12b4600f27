"""Trio drivers for MagicDNS: serve queries on UDP/TCP sockets and forward what is not ours.

The sockets are anything socket-like: a trio socket on 127.0.0.1 in tests, the netstack's UDP endpoint
and TCP streams for 100.100.100.100:53 later. Forwarding is pluggable (:data:`Forwarder`); the default
:class:`UpstreamForwarder` speaks plain DNS over UDP, retrying over TCP when the answer was truncated.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from . import wire
from .core import Answer, Drop, Forward, MagicDNS, Transport

log = logging.getLogger(__name__)

#: Sends a forwarded query upstream and returns the reply to give the client (already fitted to its limit).
Forwarder = Callable[[Forward], Awaitable[bytes]]


class DatagramSocket(Protocol):
    """The part of a trio UDP socket the server uses."""

    async def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]: ...

    async def sendto(self, data: bytes, address: Any, /) -> int: ...


def parse_nameserver(text: str) -> tuple[str, int] | None:
    """``ip``, ``ip:port``, ``[v6]:port`` or bare IPv6 -> (ip, port); None for anything else (DoH URLs)."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        if rest:
            if not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    return str(ip), port


def _reply_matches(query: bytes, reply: bytes) -> bool:
    """Kept for callers outside the package; see :func:`tsnet.dns.wire.reply_matches`."""
    return wire.reply_matches(query, reply)


class UpstreamForwarder:
    """Forward to the first nameserver that answers: UDP first, TCP if the UDP answer was truncated.

    ``timeout`` bounds each nameserver attempt. DoH nameservers are skipped (not supported yet).
    """

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout

    async def __call__(self, forward: Forward) -> bytes:
        for nameserver in forward.nameservers:
            address = parse_nameserver(nameserver)
            if address is None:
                continue
            with trio.move_on_after(self.timeout):
                try:
                    reply = await self._udp(address, forward.query)
                    if reply[2] & (wire.FLAG_TC >> 8):
                        reply = await self._tcp(address, forward.query)
                except OSError as exc:
                    log.debug("nameserver %s failed: %r", nameserver, exc)
                    continue
                return forward.finish(reply)
        return forward.servfail()

    async def _udp(self, address: tuple[str, int], query: bytes) -> bytes:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect(address)
            await sock.send(query)
            while True:
                reply = await sock.recv(65535)
                if _reply_matches(query, reply):  # ignore stray or spoofed datagrams
                    return reply

    async def _tcp(self, address: tuple[str, int], query: bytes) -> bytes:
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(wire.frame(query))
            decoder = wire.TCPFrameDecoder()
            while True:
                data = await stream.receive_some(65535)
                if not data:
                    raise ConnectionResetError("nameserver closed the TCP connection")
                for reply in decoder.feed(data):
                    if _reply_matches(query, reply):
                        return reply


class DNSServer:
    """Serves one :class:`MagicDNS` core on any number of UDP sockets and TCP streams.

    ``forwarder`` handles queries the core routes upstream; None answers them with SERVFAIL.
    Everything a client can make us hold is bounded: ``max_inflight_forwards`` forwarded queries in
    total (UDP and TCP; the excess gets SERVFAIL at once), ``max_tcp_connections`` connections (the
    excess is closed unread, RFC 7766 §6.2.2) and ``max_tcp_pipelined`` unanswered queries per
    connection (we stop reading until one is answered).
    """

    def __init__(
        self,
        magic: MagicDNS,
        forwarder: Forwarder | None = None,
        *,
        tcp_idle_timeout: float = 30.0,
        max_inflight_forwards: int = 256,
        max_tcp_connections: int = 64,
        max_tcp_pipelined: int = 16,
    ) -> None:
        self.magic = magic
        self.forwarder = forwarder
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_pipelined = max_tcp_pipelined
        self._forward_slots = trio.Semaphore(max_inflight_forwards)
        self._tcp_slots = trio.Semaphore(max_tcp_connections)

    async def reply_to(self, message: bytes, transport: Transport = "udp") -> bytes | None:
        """The reply for one query message (forwarding if needed); None means send nothing."""
        result = self.magic.handle_query(message, transport)
        if isinstance(result, Answer):
            return result.response
        if isinstance(result, Drop):
            return None
        try:
            self._forward_slots.acquire_nowait()
        except trio.WouldBlock:
            self.magic.stats["forward_overload"] += 1
            return result.servfail()
        try:
            return await self._forward(result)
        finally:
            self._forward_slots.release()

    async def _forward(self, forward: Forward) -> bytes:
        if self.forwarder is None:
            return forward.servfail()
        try:
            return await self.forwarder(forward)
        except Exception as exc:  # a broken forwarder must not kill the server
            log.warning("DNS forwarder failed: %r", exc)
            self.magic.stats["forward_error"] += 1
            return forward.servfail()

    async def serve_udp(self, sock: DatagramSocket) -> None:
        """Answer queries arriving on ``sock`` until cancelled.

        Local answers are sent inline (no task switch); forwarded queries run in their own task so a slow
        upstream does not stall the socket, bounded by ``max_inflight_forwards`` (excess get SERVFAIL).
        """
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, address = await sock.recvfrom(65535)
                except (ConnectionRefusedError, ConnectionResetError) as exc:
                    # ICMP errors for an earlier reply surface here; the socket itself is fine.
                    log.debug("DNS UDP recv error: %r", exc)
                    continue
                result = self.magic.handle_query(data, "udp")
                if isinstance(result, Answer):
                    await self._send_udp(sock, result.response, address)
                elif isinstance(result, Forward):
                    try:
                        self._forward_slots.acquire_nowait()
                    except trio.WouldBlock:
                        self.magic.stats["forward_overload"] += 1
                        await self._send_udp(sock, result.servfail(), address)
                        continue
                    nursery.start_soon(self._forward_udp, sock, result, address)

    async def _forward_udp(self, sock: DatagramSocket, forward: Forward, address: Any) -> None:
        try:
            reply = await self._forward(forward)
        finally:
            self._forward_slots.release()
        await self._send_udp(sock, reply, address)

    async def _send_udp(self, sock: DatagramSocket, data: bytes, address: Any) -> None:
        try:
            await sock.sendto(data, address)
        except OSError as exc:
            log.debug("DNS UDP send to %r failed: %r", address, exc)

    async def serve_tcp_stream(self, stream: trio.abc.Stream) -> None:
        """Answer length-prefixed queries on one TCP connection until EOF, idle timeout or garbage.

        Queries are answered concurrently (RFC 7766 §6.2.1.1 allows out-of-order replies), at most
        ``max_tcp_pipelined`` at a time; the stream is closed when done. A connection beyond
        ``max_tcp_connections`` is closed at once.
        """
        try:
            self._tcp_slots.acquire_nowait()
        except trio.WouldBlock:
            self.magic.stats["tcp_connection_refused"] += 1
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._serve_tcp_connection(stream)
        finally:
            self._tcp_slots.release()

    async def _serve_tcp_connection(self, stream: trio.abc.Stream) -> None:
        decoder = wire.TCPFrameDecoder()
        send_lock = trio.Lock()
        # One token per query being answered: reading pauses while all are taken, so a client that
        # pipelines without reading replies cannot make us hold more than this many queries.
        pipeline = trio.Semaphore(self.max_tcp_pipelined)

        async def answer(message: bytes) -> None:
            try:
                reply = await self.reply_to(message, "tcp")
                if reply is None:
                    return
                async with send_lock:
                    try:
                        await stream.send_all(wire.frame(reply))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            finally:
                pipeline.release()

        async with stream:
            async with trio.open_nursery() as nursery:
                # Idle means "no complete query": a client trickling a byte at a time gets no longer
                # than a silent one (RFC 7766 §6.2.3 leaves the policy to the server).
                idle_deadline = trio.current_time() + self.tcp_idle_timeout
                while True:
                    with trio.move_on_at(idle_deadline) as idle:
                        try:
                            data = await stream.receive_some(65535)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                    if idle.cancelled_caught or not data:
                        if idle.cancelled_caught:
                            self.magic.stats["tcp_idle_closed"] += 1
                        break
                    try:
                        messages = decoder.feed(data)
                    except ValueError:
                        self.magic.stats["tcp_bad_framing"] += 1
                        nursery.cancel_scope.cancel()
                        break
                    if messages:
                        idle_deadline = trio.current_time() + self.tcp_idle_timeout
                    for message in messages:
                        await pipeline.acquire()
                        nursery.start_soon(answer, message)

    async def serve_tcp(self, listeners: list[trio.abc.Listener[Any]], *, task_status: Any = None) -> None:
        """Accept TCP connections on ``listeners`` and serve each with :meth:`serve_tcp_stream`."""
        status = task_status or trio.TASK_STATUS_IGNORED
        await trio.serve_listeners(self.serve_tcp_stream, listeners, task_status=status)

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve UDP and TCP on the same ``host:port`` (port 0 picks a free one, shared by both).

        ``task_status.started`` receives the bound ``(host, port)``.
        """
        udp, tcp = await _bind_pair(host, port)
        with udp, tcp:
            bound_port = udp.getsockname()[1]
            listener = trio.SocketListener(tcp)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.serve_udp, udp)
                nursery.start_soon(self.serve_tcp, [listener])
                task_status.started((host, bound_port))


async def _bind_pair(host: str, port: int) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A UDP socket and a listening TCP socket on the same port; with port 0, retry if TCP's is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(20):
        udp = trio.socket.socket(family, socket.SOCK_DGRAM)
        tcp = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
            return udp, tcp
        except OSError as exc:
            udp.close()
            tcp.close()
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == 19:
                raise
    raise AssertionError("unreachable")
