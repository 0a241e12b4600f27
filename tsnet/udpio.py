"""Batched UDP socket I/O with Linux segmentation offload: ``UDP_SEGMENT`` to send, ``UDP_GRO`` to receive.

Both WireGuard drivers (:mod:`tsnet.wg.driver`, :mod:`tsnet.magicsock.driver`)
send and receive bursts of same-size datagrams (bulk transport data is
MTU-sized). One syscall per datagram is then the dominant cost of the data
path; these helpers cut the count:

* :class:`UDPSender` groups consecutive datagrams to one destination into a
  single ``sendmsg`` with a ``UDP_SEGMENT`` control message: the kernel cuts
  the payload into datagrams of ``seg_size`` bytes (Linux "UDP GSO"). Kernel
  rules: every segment has exactly ``seg_size`` bytes except a shorter last
  one, at most :data:`MAX_SEGMENTS` segments, and the total must fit one IP
  datagram. Where the kernel can't (no GSO support, no checksum offload on the
  device) the sender falls back to one ``sendto`` per datagram and remembers.
* :class:`UDPReceiver` turns on ``UDP_GRO`` so the kernel may hand over several
  same-size datagrams from one source in one ``recvmsg``; the segment size
  arrives in a ``UDP_GRO`` control message and the buffer is split into
  zero-copy :class:`memoryview` slices. Without GRO it uses ``recvfrom``.
  :meth:`UDPReceiver.receive_runs` hands over the unsplit buffers instead
  (``(buffer, segment_size, address)``), and :meth:`UDPSender.send_run` sends
  such a run back out in one ``UDP_SEGMENT`` send: a forwarder (the peer relay)
  then does no per-datagram Python work at all.

Both are plain synchronous helpers on a non-blocking socket; the trio
drivers decide when to call them (after ``wait_readable``, after a core call).
Counters count datagrams and syscalls separately.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "ENABLE_GRO",
    "ENABLE_GSO",
    "MAX_GSO_BYTES",
    "MAX_SEGMENTS",
    "SOL_UDP",
    "UDP_GRO",
    "UDP_SEGMENT",
    "Run",
    "UDPReceiver",
    "UDPSender",
    "gro_supported",
    "gso_supported",
    "run_segments",
]

log = logging.getLogger(__name__)

SOL_UDP: int = int(getattr(socket, "SOL_UDP", 17))
UDP_SEGMENT: int = int(getattr(socket, "UDP_SEGMENT", 103))
UDP_GRO: int = int(getattr(socket, "UDP_GRO", 104))

#: Segments per GSO send. Linux allows 64 (UDP_MAX_SEGMENTS; 128 on recent kernels): stay with the older limit.
MAX_SEGMENTS = 64
#: Payload bytes per GSO send: one IPv4 datagram (65535 - 20 IP - 8 UDP). IPv6 could take a little more.
MAX_GSO_BYTES = 65507
#: Process-wide switches, read when a sender/receiver is made (tests and benchmarks turn offload off with them).
ENABLE_GSO = True
ENABLE_GRO = True
#: Consecutive EINVAL failures of GSO sends after which a socket stops trying GSO (see UDPSender).
GSO_EINVAL_LIMIT = 4

RECV_BUFFER_SIZE = 65535
_CMSG_SPACE_GRO = socket.CMSG_SPACE(4)  # the kernel reports the GRO segment size as an int
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: "&" on the socket.MsgFlag enum costs microseconds
_NO_GSO_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.ENOTSUP, errno.EIO})

Buffer = bytes | bytearray | memoryview
SendError = tuple[int, OSError | TypeError | ValueError]
#: ``(buffer, segment_size, address)``: datagrams of ``segment_size`` bytes back to back, the last one may be
#: shorter (see :meth:`UDPReceiver.receive_runs`).
Run = tuple[Buffer, int, Any]


def run_segments(length: int, segment_size: int) -> int:
    """How many datagrams a run of ``length`` bytes cut every ``segment_size`` bytes holds (an empty run holds one)."""
    if length <= segment_size:
        return 1
    return -(-length // segment_size)


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows ``UDP_SEGMENT`` on this socket (Linux 4.18+ for UDP sockets)."""
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def gro_supported(sock: socket.socket) -> bool:
    """Turn ``UDP_GRO`` on for ``sock``; True if the kernel accepted it (Linux 5.0+)."""
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class UDPSender:
    """Sends batches of ``(payload, address)`` on one non-blocking UDP socket with as few syscalls as possible.

    Args:
        sock: a non-blocking UDP socket (IPv4 or IPv6).
        gso: try ``UDP_SEGMENT`` (default; also needs :data:`ENABLE_GSO`). False: one ``sendto`` per datagram.

    GSO is detected once per socket (``getsockopt``) and switched off for good
    when a segmented send fails with ``EOPNOTSUPP``/``ENOPROTOOPT``/``EIO``
    (kernel or device can't segment; EIO is a device without checksum offload),
    or with ``EINVAL`` :data:`GSO_EINVAL_LIMIT` times in a row (a single EINVAL
    may just be one oversized segment, e.g. larger than the route MTU). A failed
    segmented send is always retried datagram by datagram, so callers see the
    same outcome as with ``sendto``.

    Attributes (counters, read freely):
        datagrams_sent: datagrams the kernel accepted.
        syscalls: ``sendmsg``/``sendto`` calls made (including failed ones).
        gso_sends: segmented sends that succeeded.
        gso_fallbacks: segmented sends that failed and were resent one by one.
    """

    __slots__ = ("sock", "gso", "_einval_run", "datagrams_sent", "syscalls", "gso_sends", "gso_fallbacks")

    def __init__(self, sock: socket.socket, *, gso: bool = True) -> None:
        self.sock = sock
        #: whether segmented sends are (still) tried on this socket
        self.gso = gso and ENABLE_GSO and gso_supported(sock)
        self._einval_run = 0
        self.datagrams_sent = 0
        self.syscalls = 0
        self.gso_sends = 0
        self.gso_fallbacks = 0

    def send(self, datagrams: Sequence[tuple[Buffer, Any]], start: int = 0) -> tuple[int, list[SendError]]:
        """Send ``datagrams[start:]`` in order.

        Returns ``(stop, errors)``. ``stop`` is the index of the first datagram
        not attempted because the kernel send buffer is full (``BlockingIOError``);
        ``len(datagrams)`` when everything was attempted. ``datagrams[stop:]`` are
        left to the caller (queue or drop them). ``errors`` lists ``(index, exception)``
        for datagrams dropped on a hard error (unreachable, bad address, wrong
        family, too big); the rest of ``datagrams[start:stop]`` was sent.
        Never raises for per-datagram problems.
        """
        n = len(datagrams)
        if not self.gso:
            return self._send_each(datagrams, start, n)
        errors: list[SendError] = []
        sendmsg = self.sock.sendmsg
        i = start
        while i < n:
            data, addr = datagrams[i]
            seg = len(data)
            # Grow a group: same destination, every member exactly ``seg`` bytes, except a shorter last one.
            j = i + 1
            total = seg
            if seg:
                limit = min(n, i + MAX_SEGMENTS)
                while j < limit:
                    d2, a2 = datagrams[j]
                    size = len(d2)
                    if size > seg or not size or total + size > MAX_GSO_BYTES or (a2 is not addr and a2 != addr):
                        break  # (an empty datagram cannot be a segment: it would vanish)
                    total += size
                    j += 1
                    if size < seg:
                        break  # a short segment must be the last one
            if j - i == 1:
                stop, errs = self._send_each(datagrams, i, i + 1)
                if stop == i:
                    return i, errors
                errors += errs
                i += 1
                continue
            self.syscalls += 1
            try:
                sendmsg([datagrams[k][0] for k in range(i, j)],
                        [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))], 0, addr)
            except BlockingIOError:
                return i, errors
            except OSError as exc:
                self._gso_failed(exc)
                stop, errs = self._send_each(datagrams, i, j)
                errors += errs
                if stop < j:
                    return stop, errors
                i = j
                if not self.gso:
                    stop, errs = self._send_each(datagrams, i, n)
                    return stop, errors + errs
                continue
            except (TypeError, ValueError):
                # Malformed address: let the per-datagram path report each one.
                stop, errs = self._send_each(datagrams, i, j)
                errors += errs
                if stop < j:
                    return stop, errors
                i = j
                continue
            self._einval_run = 0
            self.gso_sends += 1
            self.datagrams_sent += j - i
            i = j
        return n, errors

    def _gso_failed(self, exc: OSError) -> None:
        self.gso_fallbacks += 1
        if exc.errno in _NO_GSO_ERRNOS:
            self.gso = False
        elif exc.errno == errno.EINVAL:
            self._einval_run += 1
            if self._einval_run >= GSO_EINVAL_LIMIT:
                self.gso = False
        if not self.gso:
            log.info("udpio: UDP_SEGMENT unusable on %s (%s); sending datagrams one by one", self.sock, exc)

    def send_run(self, buffer: Buffer, segment_size: int, addr: Any) -> tuple[int, list[SendError]]:
        """Send the datagrams of one run (``segment_size`` bytes each, the last may be shorter) to ``addr``.

        The run is sent as it is, without splitting it into Python objects: one
        ``sendmsg`` with ``UDP_SEGMENT`` and a single iovec per chunk of at most
        :data:`MAX_SEGMENTS` segments and :data:`MAX_GSO_BYTES` bytes. A run of one
        datagram (``segment_size >= len(buffer)``) is a plain ``sendto``.
        Same contract, counters and fallbacks as :meth:`send`, with indices
        counting the run's segments: returns ``(stop, errors)``, ``stop`` being
        the first segment not attempted because the kernel buffer is full
        (:func:`run_segments` when all were attempted), ``errors`` the segments
        dropped on a hard error. Raises ValueError if ``segment_size < 1``.
        """
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        n = len(buffer)
        if n <= segment_size:
            return self._send_each(((buffer, addr),), 0, 1)
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        total = -(-n // segment_size)
        # Segments per sendmsg: kernel segment-count limit and one IP datagram of payload.
        per = max(1, min(MAX_SEGMENTS, MAX_GSO_BYTES // segment_size))
        if total <= per:
            return self._send_chunks([(total, [view])], segment_size, addr)
        step = per * segment_size
        return self._send_chunks([(min(per, total - k // segment_size), [view[k:k + step]])
                                  for k in range(0, n, step)], segment_size, addr)

    def send_runs(self, buffers: Sequence[Buffer], segment_size: int, addr: Any) -> tuple[int, list[SendError]]:
        """:meth:`send_run` for the concatenation of ``buffers``, without joining them (they become iovecs).

        Every buffer but the last must hold a whole number of segments (ValueError
        otherwise): e.g. several runs of one flow, or a run followed by single
        datagrams of the same size. Indices count segments across all buffers.
        """
        if len(buffers) == 1:
            return self.send_run(buffers[0], segment_size, addr)
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        per = max(1, min(MAX_SEGMENTS, MAX_GSO_BYTES // segment_size))
        chunks: list[tuple[int, list[memoryview]]] = []
        iov: list[memoryview] = []
        count = 0  # segments in iov
        last = len(buffers) - 1
        for k, buf in enumerate(buffers):
            n = len(buf)
            if k < last and (n == 0 or n % segment_size):
                raise ValueError("every buffer but the last must hold a whole number of segments")
            view = buf if isinstance(buf, memoryview) else memoryview(buf)
            off = 0
            while off < n:  # (an empty last buffer adds nothing to the concatenation)
                take = min(-(-(n - off) // segment_size), per - count)
                end = min(n, off + take * segment_size)
                iov.append(view[off:end])
                count += take
                off = end
                if count == per:
                    chunks.append((count, iov))
                    iov, count = [], 0
        if count:
            chunks.append((count, iov))
        return self._send_chunks(chunks, segment_size, addr)

    def _send_chunks(self, chunks: list[tuple[int, list[memoryview]]], seg: int, addr: Any
                     ) -> tuple[int, list[SendError]]:
        """One ``sendmsg`` with ``UDP_SEGMENT`` per ``(segments, iovecs)`` chunk; same contract as :meth:`send_run`."""
        cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))]
        sendmsg = self.sock.sendmsg
        errors: list[SendError] = []
        i = 0  # index of the chunk's first segment in the run
        for count, iov in chunks:
            j = i + count
            if count == 1 or not self.gso:
                # A lone segment, or no (more) GSO on this socket: plain sends for this chunk.
                stop, errs = self._send_segments(iov, seg, addr, i)
                errors += errs
                if stop < j:
                    return stop, errors
                i = j
                continue
            self.syscalls += 1
            try:
                sendmsg(iov, cmsg, 0, addr)
            except BlockingIOError:
                return i, errors
            except OSError as exc:
                self._gso_failed(exc)
                stop, errs = self._send_segments(iov, seg, addr, i)
            except (TypeError, ValueError):
                stop, errs = self._send_segments(iov, seg, addr, i)  # let each report the bad address
            else:
                self._einval_run = 0
                self.gso_sends += 1
                self.datagrams_sent += count
                i = j
                continue
            errors += errs
            if stop < j:
                return stop, errors
            i = j
        return i, errors

    def _send_segments(self, iov: list[memoryview], seg: int, addr: Any, first: int) -> tuple[int, list[SendError]]:
        """The segments of one chunk, one ``sendto`` each (fallbacks, a lone segment); indices from ``first``."""
        items = [(v[k:k + seg], addr) for v in iov for k in range(0, max(len(v), 1), seg)]
        stop, errors = self._send_each(items, 0, len(items))
        return first + stop, [(first + k, exc) for k, exc in errors]

    def _send_each(self, datagrams: Sequence[tuple[Buffer, Any]], i: int, end: int) -> tuple[int, list[SendError]]:
        """Plain ``sendto`` for ``datagrams[i:end]`` (same contract as :meth:`send`, limited to ``end``)."""
        sendto = self.sock.sendto
        errors: list[SendError] = []
        sent = 0
        start = i
        try:
            while i < end:
                data, addr = datagrams[i]
                try:
                    sendto(data, addr)
                    sent += 1
                except (OSError, TypeError, ValueError) as exc:
                    if isinstance(exc, BlockingIOError):
                        break
                    errors.append((i, exc))
                i += 1
        finally:
            self.syscalls += i - start + (1 if i < end else 0)
            self.datagrams_sent += sent
        return i, errors


class UDPReceiver:
    """Drains a non-blocking UDP socket into ``(datagram, address)`` pairs, splitting ``UDP_GRO`` buffers.

    Args:
        sock: a non-blocking UDP socket.
        gro: try to turn ``UDP_GRO`` on (default; also needs :data:`ENABLE_GRO`). False: plain ``recvfrom``.
        map_address: applied to the source address of each syscall's result (so once
            per coalesced buffer, not per datagram), e.g. to shorten IPv6 addresses
            or turn them into a richer type.

    Datagrams are ``bytes`` or read-only :class:`memoryview` slices of an
    immutable ``bytes`` buffer, so they stay valid after the call and may be
    kept. :meth:`receive_runs` hands over the coalesced buffers unsplit instead,
    for forwarders. Attributes (counters): ``datagrams``, ``syscalls``, ``coalesced``
    (buffers that held more than one datagram), ``errors`` (failed receives,
    e.g. ICMP errors reported on the socket; truncated buffers).
    """

    __slots__ = ("sock", "gro", "map_address", "datagrams", "syscalls", "coalesced", "errors")

    def __init__(self, sock: socket.socket, *, gro: bool = True,
                 map_address: Callable[[Any], Any] | None = None) -> None:
        self.sock = sock
        #: whether UDP_GRO is on for this socket
        self.gro = gro and ENABLE_GRO and gro_supported(sock)
        self.map_address = map_address
        self.datagrams = 0
        self.syscalls = 0
        self.coalesced = 0
        self.errors = 0

    def receive(self, out: list[tuple[Buffer, Any]], limit: int) -> bool:
        """Append received datagrams to ``out`` until the socket is empty or ``limit`` datagrams were added.

        A coalesced buffer is never split across calls, so ``out`` may get up to
        ``MAX_SEGMENTS - 1`` datagrams beyond ``limit`` (the rest of the last buffer).
        Returns True when the socket was drained (``BlockingIOError``, or the
        socket was closed under us), False when the limit stopped the loop.
        """
        if not self.gro:
            return self._receive_plain(out, limit)
        return self._receive_gro(out, limit, True)

    def receive_runs(self, out: list[Run], limit: int) -> bool:
        """Like :meth:`receive`, but append each receive syscall's buffer whole: ``(buffer, segment_size, address)``.

        ``buffer`` (immutable ``bytes``) holds datagrams of ``segment_size`` bytes
        back to back, the last one possibly shorter; a single datagram comes with
        ``segment_size >= len(buffer)`` (``max(len(buffer), 1)``), so
        :func:`run_segments` counts a run's datagrams in every case. Nothing is
        split: a forwarder can inspect the run and send it on with
        :meth:`UDPSender.send_run`. ``limit`` counts datagrams, as in :meth:`receive`;
        same return value and counters.
        """
        if self.gro:
            return self._receive_gro(out, limit, False)
        singles: list[tuple[Buffer, Any]] = []
        drained = self._receive_plain(singles, limit)
        out += [(data, len(data) or 1, addr) for data, addr in singles]
        return drained

    def _receive_plain(self, out: list[tuple[Buffer, Any]], limit: int) -> bool:
        recvfrom = self.sock.recvfrom
        map_address = self.map_address
        append = out.append
        count = 0
        try:
            while count < limit:
                self.syscalls += 1
                try:
                    data, addr = recvfrom(RECV_BUFFER_SIZE)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        return True
                    self.errors += 1  # ICMP errors surface here on Linux (ECONNREFUSED etc.): not fatal
                    continue
                append((data, addr if map_address is None else map_address(addr)))
                count += 1
            return False
        finally:
            self.datagrams += count

    def _receive_gro(self, out: list[Any], limit: int, split: bool) -> bool:
        """Shared by :meth:`receive` (``split``: one ``(slice, address)`` per datagram) and :meth:`receive_runs`."""
        recvmsg = self.sock.recvmsg
        map_address = self.map_address
        append = out.append
        count = 0
        try:
            while count < limit:
                self.syscalls += 1
                try:
                    data, ancdata, flags, addr = recvmsg(RECV_BUFFER_SIZE, _CMSG_SPACE_GRO)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        return True
                    self.errors += 1
                    continue
                if flags & _MSG_TRUNC:
                    self.errors += 1  # cannot happen for a UDP payload (< 64 KiB); drop rather than guess
                    continue
                if map_address is not None:
                    addr = map_address(addr)
                n = len(data)
                seg = 0
                for level, kind, value in ancdata:
                    if level == SOL_UDP and kind == UDP_GRO:
                        seg = int.from_bytes(value[:4], sys.byteorder)
                if seg <= 0 or seg >= n:
                    append((data, addr) if split else (data, n or 1, addr))
                    count += 1
                    continue
                self.coalesced += 1
                if split:
                    view = memoryview(data)
                    for off in range(0, n, seg):
                        append((view[off:off + seg], addr))
                        count += 1
                else:
                    append((data, seg, addr))
                    count += -(-n // seg)
            return False
        finally:
            self.datagrams += count
