"""Thin trio UDP driver for :class:`tsnet.relay.server.RelayServer`.

Waits for readability, then drains a batch with :class:`tsnet.udpio.UDPReceiver`
as whole runs (``UDP_GRO``: one syscall may bring a whole burst of one flow,
handed over unsplit by ``receive_runs``). Each run goes through the sans-IO
server at once (:meth:`RelayServer.forward_run`: one endpoint lookup and a few
C-level header comparisons per run, no per-datagram Python work when the run
is uniform data), and each forwarded run leaves again in one ``UDP_SEGMENT``
send (:meth:`tsnet.udpio.UDPSender.send_run`; a flow's consecutive runs of one
batch share a send, :meth:`~tsnet.udpio.UDPSender.send_runs`). Single datagrams
(no GRO) take the per-datagram path and are grouped per destination so a burst
still leaves in one segmented send. Forwards are the very buffers (or slices of
them) the kernel handed over, immutable ``bytes``: valid until sent, never
copied. The server's timer (garbage collection) runs in a task of its own off
``trio.current_time()``, so tests can use trio's MockClock.

:func:`open_udp_sockets` opens an SO_REUSEPORT group on one port, one socket per
CPU the process may really use (:func:`usable_cpu_count`): the kernel spreads
flows across the sockets' receive queues by their 4-tuple, so one busy pair of
clients cannot fill the queue every other pair depends on.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.server import RelayServer
from tsnet.udpio import Run, UDPReceiver, UDPSender, run_segments

__all__ = [
    "RECV_BUFFER_SIZE",
    "RelayIOCounters",
    "open_udp_socket",
    "open_udp_sockets",
    "serve_relay",
    "usable_cpu_count",
]

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


@dataclass
class RelayIOCounters:
    """Socket I/O counters of :func:`serve_relay`, summed over all its sockets (updated once per batch).

    Protocol counters (forwarded/dropped) live on the :class:`RelayServer`.
    """

    #: datagrams handed over by the kernel
    datagrams_received: int = 0
    #: receive syscalls, including the final one that finds the socket empty
    receive_syscalls: int = 0
    #: receive buffers that held several datagrams (UDP_GRO)
    receive_coalesced: int = 0
    #: failed receives (ICMP errors surfacing on the socket, truncation)
    receive_errors: int = 0
    #: forwarded datagrams the kernel accepted
    datagrams_sent: int = 0
    #: send syscalls (``sendmsg`` with UDP_SEGMENT, or ``sendto``)
    send_syscalls: int = 0
    #: batches of a full receive limit (the reader yielded to other tasks before draining more)
    full_batches: int = 0


async def serve_relay(
    server: RelayServer,
    *socks: socket.socket,
    batch: int = 64,
    counters: RelayIOCounters | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` on its sockets (one or more per address family) until cancelled.

    Each socket gets its own reader, which drains up to ``batch`` datagrams (plus
    the rest of a coalesced buffer) before forwarding them. A forwarded datagram
    leaves from the socket it arrived on when the families match, else from a
    socket of the destination's family (tailscaled forwards udp4 <-> udp6 too).
    A send that fails, or finds the kernel buffer full, drops the datagram and
    counts it in ``server.dropped["send_error"]``, as UDP would. ``counters``
    (optional) receives the socket I/O counts. The caller owns (and closes) the sockets.
    """
    if not socks:
        raise ValueError("serve_relay needs at least one socket")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    counters = RelayIOCounters() if counters is None else counters
    # One sender per socket, shared by the readers: sends are synchronous, so they never interleave.
    senders = {s: UDPSender(s) for s in socks}
    by_version: dict[int, UDPSender] = {}
    for s in socks:
        by_version.setdefault(_version(s), senders[s])
    # Receivers (which turn UDP_GRO on) exist before we report started: the kernel decides
    # coalescing when a datagram is queued, so data sent right after start must already see GRO.
    receivers = {s: _receiver(s) for s in socks}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_timer_loop, server)
        for sock in socks:
            nursery.start_soon(_read_loop, server, receivers[sock], senders[sock], by_version, batch, counters)
        task_status.started()


async def _timer_loop(server: RelayServer) -> None:
    """The server's timer (garbage collection) in a task of its own: readers then wait without a cancel scope."""
    while True:
        await trio.sleep_until(server.get_timer())
        server.handle_timer(trio.current_time())


def _version(sock: socket.socket) -> int:
    return 6 if sock.family == socket.AF_INET6 else 4


def _receiver(sock: socket.socket) -> UDPReceiver:
    """A receiver for ``sock`` that hands over sources as (cached) :class:`AddrPort`."""
    src_cache: dict[Any, AddrPort] = {}

    def source(sockaddr: Any) -> AddrPort:
        # Called once per receive syscall (a GRO buffer shares one source), not per datagram.
        src = src_cache.get(sockaddr)
        if src is None:
            src = AddrPort.from_sockaddr(sockaddr)
            if len(src_cache) >= _ADDR_CACHE_MAX:
                src_cache.clear()
            src_cache[sockaddr] = src
        return src

    return UDPReceiver(sock, map_address=source)


async def _read_loop(
    server: RelayServer,
    receiver: UDPReceiver,
    own_sender: UDPSender,
    by_version: dict[int, UDPSender],
    batch: int,
    counters: RelayIOCounters,
) -> None:
    sock = receiver.sock
    # Same-family replies leave from this socket (same port; keeps the group's queues independent).
    by_version = {**by_version, _version(sock): own_sender}
    dst_cache: dict[AddrPort, tuple[str, int]] = {}
    received: list[Run] = []
    # Forwards of one batch by destination sockaddr (insertion-ordered), as runs ``(buffer, segment_size)``:
    # one flow's forwards stay in order, and single datagrams to one destination can still be segmented together.
    pending: dict[tuple[str, int], list[tuple[Any, int]]] = {}
    pending_sender: dict[tuple[str, int], UDPSender | None] = {}
    last_dst: AddrPort | None = None
    last_sockaddr: tuple[str, int] = ("", 0)
    wait_readable = trio.lowlevel.wait_readable
    current_time = trio.current_time
    while True:
        await wait_readable(sock)
        now = current_time()
        syscalls, errors = receiver.syscalls, receiver.errors
        coalesced, datagrams = receiver.coalesced, receiver.datagrams
        drained = receiver.receive_runs(received, batch)
        counters.receive_syscalls += receiver.syscalls - syscalls
        counters.receive_errors += receiver.errors - errors
        counters.receive_coalesced += receiver.coalesced - coalesced
        counters.datagrams_received += receiver.datagrams - datagrams
        receive_datagram = server.receive_datagram
        forward_run = server.forward_run
        for buf, seg, src in received:
            if len(buf) <= seg:
                # One datagram (no GRO): the per-datagram path.
                res = receive_datagram(buf, src, now)
                if res is None:
                    continue
                forwards: Any = ((res[0], len(res[0]), res[1]),)
            else:
                forwards = forward_run(buf, seg, src, now)
            for fwd, fseg, dst in forwards:
                # Queued per destination, once per run (inline: this also runs per datagram without GRO).
                if dst is last_dst:
                    sockaddr = last_sockaddr  # (the server hands out the same object per bound side)
                else:
                    sockaddr = dst_cache.get(dst)
                    if sockaddr is None:
                        sockaddr = dst.to_sockaddr()
                        if len(dst_cache) >= _ADDR_CACHE_MAX:
                            dst_cache.clear()
                        dst_cache[dst] = sockaddr
                    last_dst, last_sockaddr = dst, sockaddr
                group = pending.get(sockaddr)
                if group is None:
                    group = pending[sockaddr] = []
                    pending_sender[sockaddr] = by_version.get(dst.ip.version)
                group.append((fwd, fseg))
        received.clear()  # bounded memory: nothing survives the batch
        if pending:
            _send_pending(pending, pending_sender, server.dropped, counters)
        if not drained:
            # A full batch: let other tasks run before draining more.
            counters.full_batches += 1
            await trio.lowlevel.checkpoint()


def _send_pending(
    pending: dict[tuple[str, int], list[tuple[Any, int]]],
    pending_sender: dict[tuple[str, int], UDPSender | None],
    dropped: dict[str, int],
    counters: RelayIOCounters,
) -> None:
    """Send (and forget) one batch's forwards; every datagram not accepted counts as a ``send_error`` drop.

    Per destination, in order: consecutive single datagrams go out together through
    :meth:`UDPSender.send` (which segments equal-size ones); a multi-datagram run goes
    through :meth:`UDPSender.send_runs` together with whatever directly follows and
    continues it (more runs of the same segment size, single datagrams of that size,
    one shorter last one), so a flow's runs from several receives share one
    ``UDP_SEGMENT`` send. Once the kernel buffer is full, the rest of that
    destination's forwards are dropped, as UDP would.
    """
    failed = 0
    for sockaddr, group in pending.items():
        sender = pending_sender[sockaddr]
        if sender is None:
            failed += sum(run_segments(len(buf), seg) for buf, seg in group)  # no socket of the destination's family
            log.debug("relayserver: no socket for the family of %s", sockaddr)
            continue
        syscalls, sent = sender.syscalls, sender.datagrams_sent
        singles: list[tuple[Any, tuple[str, int]]] = []
        full_at = -1  # index in group of the first forward not attempted, if the kernel buffer filled up
        k, count = 0, len(group)
        if count == 1:
            # The common case of a quiet relay: one datagram or one run for this destination.
            buf, seg = group[0]
            stop, errors = sender.send_run(buf, seg, sockaddr)
            failed += len(errors) + run_segments(len(buf), seg) - stop
            if errors:
                log.debug("relayserver: send to %s failed: %s", sockaddr, errors[0][1])
            k = count
        while k < count:
            buf, seg = group[k]
            n = len(buf)
            if n <= seg:
                singles.append((buf, sockaddr))
                k += 1
                continue
            if singles:
                stop, errors = sender.send(singles)
                failed += len(errors) + len(singles) - stop
                if stop < len(singles):
                    full_at = k
                    break
                singles = []
            # The run, plus what follows that continues it (only after whole segments).
            bufs = [buf]
            segments = -(-n // seg)
            whole = n % seg == 0
            j = k + 1
            while whole and j < count:
                nxt, nseg = group[j]
                m = len(nxt)
                if (nseg != seg) if m > nseg else (m > seg or not m):
                    break  # another segment size, or a single that cannot be one of these segments
                bufs.append(nxt)
                segments += -(-m // seg)
                whole = m % seg == 0
                j += 1
            if len(bufs) == 1:
                stop, errors = sender.send_run(buf, seg, sockaddr)
            else:
                stop, errors = sender.send_runs(bufs, seg, sockaddr)
            failed += len(errors) + segments - stop
            if errors:
                log.debug("relayserver: send to %s failed: %s", sockaddr, errors[0][1])
            k = j
            if stop < segments:
                full_at = j
                break
        else:
            if singles:
                stop, errors = sender.send(singles)
                # Hard errors, plus what a full kernel buffer left unsent: dropped like UDP drops.
                failed += len(errors) + len(singles) - stop
                if errors:
                    log.debug("relayserver: send to %s failed: %s", sockaddr, errors[0][1])
        if full_at >= 0:
            failed += sum(run_segments(len(buf), seg) for buf, seg in group[full_at:])
        counters.send_syscalls += sender.syscalls - syscalls
        counters.datagrams_sent += sender.datagrams_sent - sent
    pending.clear()
    pending_sender.clear()
    if failed:
        dropped["send_error"] = dropped.get("send_error", 0) + failed
