"""Thin trio UDP driver for :class:`tsnet.relay.server.RelayServer`.

Waits for readability, then drains the socket in a batch with non-blocking
``recvfrom_into`` into one reused buffer; forwarded datagrams are sent straight
from that buffer before the next read. The server's timer (garbage collection)
runs off ``trio.current_time()`` so tests can use trio's MockClock.

:func:`open_udp_sockets` opens an SO_REUSEPORT group on one port, one socket per
CPU the process may really use (:func:`usable_cpu_count`): the kernel spreads
flows across the sockets' receive queues by their 4-tuple, so one busy pair of
clients cannot fill the queue every other pair depends on.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from pathlib import Path

import trio

from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.server import RelayServer

__all__ = ["open_udp_socket", "open_udp_sockets", "serve_relay", "usable_cpu_count", "RECV_BUFFER_SIZE"]

log = logging.getLogger(__name__)

RECV_BUFFER_SIZE = 65535
SOCKET_BUFFER_BYTES = 7 * 1024 * 1024
_ADDR_CACHE_MAX = 4096


def _cgroup_cpu_limit(root: Path) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, else v1 CFS files), or None if unlimited/unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpu_count(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask, capped by the cgroup CPU quota.

    Containers (and serverless sandboxes) often see the host's cores but may only use a
    fraction of them; ``os.cpu_count()`` would overcount.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def open_udp_socket(host: str = "0.0.0.0", port: int = 0, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` with large buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def open_udp_sockets(host: str = "0.0.0.0", port: int = 0, count: int | None = None) -> list[socket.socket]:
    """``count`` (default :func:`usable_cpu_count`) SO_REUSEPORT sockets sharing one port."""
    count = usable_cpu_count() if count is None else count
    if count < 1:
        raise ValueError("need at least one socket")
    first = open_udp_socket(host, port, reuse_port=count > 1)
    socks = [first]
    try:
        bound_port = first.getsockname()[1]
        for _ in range(count - 1):
            socks.append(open_udp_socket(host, bound_port, reuse_port=True))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


async def serve_relay(
    server: RelayServer,
    *socks: socket.socket,
    batch: int = 64,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` on its sockets (one or more per address family) until cancelled.

    Each socket gets its own reader; a forwarded datagram leaves from the socket it
    arrived on when the families match, else from a socket of the destination's
    family (tailscaled forwards udp4 <-> udp6 too). The caller owns (and closes) the sockets.
    """
    if not socks:
        raise ValueError("serve_relay needs at least one socket")
    by_version: dict[int, socket.socket] = {}
    for s in socks:
        by_version.setdefault(6 if s.family == socket.AF_INET6 else 4, s)
    async with trio.open_nursery() as nursery:
        for sock in socks:
            nursery.start_soon(_read_loop, server, sock, by_version, batch)
        task_status.started()


async def _read_loop(server: RelayServer, sock: socket.socket, by_version: dict[int, socket.socket], batch: int) -> None:
    # Same-family replies leave from this socket (same port; keeps the group's queues independent).
    by_version = {**by_version, 6 if sock.family == socket.AF_INET6 else 4: sock}
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
