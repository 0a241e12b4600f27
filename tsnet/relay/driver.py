"""Thin trio UDP driver for :class:`tsnet.relay.server.RelayServer`.

Waits for readability, then drains the socket in a batch with non-blocking
``recvfrom_into`` into one reused buffer; forwarded datagrams are sent straight
from that buffer before the next read. The server's timer (garbage collection)
runs off ``trio.current_time()`` so tests can use trio's MockClock.
"""

from __future__ import annotations

import errno
import logging
import socket

import trio

from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.server import RelayServer

__all__ = ["open_udp_socket", "serve_relay", "RECV_BUFFER_SIZE"]

log = logging.getLogger(__name__)

RECV_BUFFER_SIZE = 65535
SOCKET_BUFFER_BYTES = 7 * 1024 * 1024
_ADDR_CACHE_MAX = 4096


def open_udp_socket(host: str = "0.0.0.0", port: int = 0) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` with large buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
            except OSError:
                pass  # best effort, as tailscaled does
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_relay(
    server: RelayServer,
    *socks: socket.socket,
    batch: int = 64,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` on one socket per address family until cancelled.

    Each socket gets its own reader; a forwarded datagram leaves from the socket
    of the destination's family (tailscaled forwards udp4 <-> udp6 too). The
    caller owns (and closes) the sockets.
    """
    if not socks:
        raise ValueError("serve_relay needs at least one socket")
    by_version = {6 if s.family == socket.AF_INET6 else 4: s for s in socks}
    async with trio.open_nursery() as nursery:
        for sock in socks:
            nursery.start_soon(_read_loop, server, sock, by_version, batch)
        task_status.started()


async def _read_loop(server: RelayServer, sock: socket.socket, by_version: dict[int, socket.socket], batch: int) -> None:
    buf = bytearray(RECV_BUFFER_SIZE)
    view = memoryview(buf)
    addr_cache: dict[tuple, AddrPort] = {}  # type: ignore[type-arg]
    while True:
        with trio.move_on_at(server.get_timer()):
            await trio.lowlevel.wait_readable(sock)
        now = trio.current_time()
        server.handle_timer(now)
        drained = False
        for _ in range(batch):
            try:
                n, sockaddr = sock.recvfrom_into(buf)
            except BlockingIOError:
                drained = True
                break
            except OSError as exc:
                # ICMP errors from earlier sends surface here on Linux; not fatal.
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            src = addr_cache.get(sockaddr)
            if src is None:
                src = AddrPort.from_sockaddr(sockaddr)
                if len(addr_cache) >= _ADDR_CACHE_MAX:
                    addr_cache.clear()
                addr_cache[sockaddr] = src
            out = server.receive_datagram(view[:n], src, now)
            if out is not None:
                data, dst = out
                out_sock = by_version.get(dst.ip.version)
                try:
                    if out_sock is None:
                        raise OSError(errno.EAFNOSUPPORT, "no socket for this address family")
                    out_sock.sendto(data, dst.to_sockaddr())
                except OSError as exc:  # includes BlockingIOError: a full buffer drops, like UDP
                    server.dropped["send_error"] = server.dropped.get("send_error", 0) + 1
                    log.debug("relayserver: send to %s failed: %s", dst, exc)
        if not drained:
            # A full batch: let other tasks run before draining more.
            await trio.lowlevel.checkpoint()
