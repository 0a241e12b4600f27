"""tsnet.udpio run API: UDPReceiver.receive_runs (unsplit GRO buffers) and UDPSender.send_run (one run out)."""

from __future__ import annotations

import errno
import select
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_udpio import FlakySocket, burst, drain, drain_plain, make
from tsnet import udpio
from tsnet.udpio import MAX_GSO_BYTES, MAX_SEGMENTS, UDPReceiver, UDPSender, run_segments


def drain_runs(receiver: UDPReceiver, expected: int) -> list[tuple[bytes, int, Any]]:
    """receive_runs until ``expected`` datagrams came (bounded wait)."""
    out: list[tuple[Any, int, Any]] = []
    while sum(run_segments(len(b), s) for b, s, _ in out) < expected:
        if not select.select([receiver.sock], [], [], 5.0)[0]:
            break
        receiver.receive_runs(out, 1024)
    return out


def split(runs: list[tuple[Any, int, Any]]) -> list[bytes]:
    out = []
    for buf, seg, _ in runs:
        raw = bytes(buf)
        out += [raw] if len(raw) <= seg else [raw[i:i + seg] for i in range(0, len(raw), seg)]
    return out


def test_run_segments() -> None:
    assert [run_segments(n, 10) for n in (0, 1, 10, 11, 20, 21)] == [1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_receive_runs_hands_over_the_gro_buffer_whole(socks, family) -> None:
    tx, rx = make(socks, family), make(socks, family)
    items = burst(30, 1000, 77, rx.getsockname()[:2])
    calls = []
    receiver = UDPReceiver(rx, map_address=lambda a: calls.append(a) or a[:2])
    assert receiver.gro
    assert UDPSender(tx).send(items) == (len(items), [])
    runs = drain_runs(receiver, len(items))
    assert split(runs) == [d for d, _ in items]
    assert all(isinstance(b, bytes) for b, _, _ in runs)  # unsplit, immutable
    assert any(seg == 1000 and len(b) > seg for b, seg, _ in runs)
    assert len(calls) == len(runs) and {a for _, _, a in runs} == {tx.getsockname()[:2]}
    # Same counters as receive() would keep.
    assert receiver.datagrams == len(items) and receiver.coalesced >= 1
    assert receiver.syscalls == len(runs) + 1  # plus the final EAGAIN... at most one per drain round
    assert receiver.receive_runs([], 8) is True


@pytest.mark.parametrize("gro", [True, False])
def test_receive_runs_single_datagrams(socks, gro) -> None:
    tx, rx = make(socks), make(socks)
    dest = rx.getsockname()
    receiver = UDPReceiver(rx, gro=gro)
    for data in (b"one", b"", b"three!"):
        tx.sendto(data, dest)  # separate sends are not coalesced
    runs = drain_runs(receiver, 3)
    assert [(bytes(b), s) for b, s, _ in runs] == [(b"one", 3), (b"", 1), (b"three!", 6)]
    assert receiver.datagrams == 3 and receiver.coalesced == 0


def test_receive_runs_limit_counts_datagrams(socks) -> None:
    tx, rx = make(socks), make(socks)
    receiver = UDPReceiver(rx)
    sender = UDPSender(tx)
    for _ in range(3):
        sender.send(burst(9, 500, 500, rx.getsockname()))  # three runs of 10
    select.select([rx], [], [], 5.0)
    out: list[Any] = []
    assert receiver.receive_runs(out, 15) is False  # 10, then 10 more: a run is never cut
    assert [run_segments(len(b), s) for b, s, _ in out] == [10, 10]
    assert receiver.receive_runs(out, 100) is True
    assert receiver.datagrams == 30


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("count,size,last", [
    (1, 1000, 1000), (2, 1000, 1), (40, 1288, 100), (MAX_SEGMENTS + 5, 300, 300), (60, 1400, 50), (200, 16, 3)])
def test_send_run_arrives_as_separate_datagrams_in_order(socks, family, count, size, last) -> None:
    tx, rx = make(socks, family), make(socks, family)
    items = burst(count - 1, size, last, rx.getsockname()[:2])
    buffer = b"".join(d for d, _ in items)
    sender = UDPSender(tx)
    assert sender.send_run(buffer, size, rx.getsockname()[:2]) == (count, [])
    assert drain_plain(rx, count) == [d for d, _ in items]
    per_send = min(MAX_SEGMENTS, MAX_GSO_BYTES // size)
    assert sender.datagrams_sent == count and sender.gso_fallbacks == 0
    assert sender.syscalls == -(-count // per_send)  # one sendmsg per chunk (a lone last one is a sendto)


def test_send_run_single_datagram_and_bad_size(socks) -> None:
    tx, rx = make(socks), make(socks)
    sender = UDPSender(tx)
    dest = rx.getsockname()
    assert sender.send_run(b"hello", 5, dest) == (1, [])
    assert sender.send_run(memoryview(b"big segment size"), 65535, dest) == (1, [])
    assert sender.send_run(b"", 1, dest) == (1, [])
    assert drain_plain(rx, 3) == [b"hello", b"big segment size", b""]
    assert sender.syscalls == 3 and sender.gso_sends == 0
    with pytest.raises(ValueError):
        sender.send_run(b"abc", 0, dest)


def test_send_run_without_gso_sends_one_by_one(socks) -> None:
    tx, rx = make(socks), make(socks)
    items = burst(9, 700, 10, rx.getsockname())
    sender = UDPSender(tx, gso=False)
    assert sender.send_run(bytearray(b"".join(d for d, _ in items)), 700, rx.getsockname()) == (10, [])
    assert sender.syscalls == 10 and sender.datagrams_sent == 10
    assert [d for d, _ in drain(UDPReceiver(rx), 10)] == [d for d, _ in items]


def test_send_run_eio_disables_gso_and_resends(socks) -> None:
    tx, rx = make(socks), make(socks)
    items = burst(MAX_SEGMENTS + 9, 500, 500, rx.getsockname())  # two chunks
    flaky = FlakySocket(tx, sendmsg_errors={1: OSError(errno.EIO, "no csum offload")})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    n = len(items)
    assert sender.send_run(b"".join(d for d, _ in items), 500, rx.getsockname()) == (n, [])
    assert not sender.gso and sender.gso_fallbacks == 1
    assert flaky.sendmsg_calls == 1 and flaky.sendto_calls == n  # the second chunk went plain too
    assert sender.datagrams_sent == n
    assert drain_plain(rx, n) == [d for d, _ in items]


def test_send_run_buffer_full_reports_where_it_stopped(socks) -> None:
    tx, rx = make(socks), make(socks)
    items = burst(MAX_SEGMENTS * 2 + 9, 400, 400, rx.getsockname())
    flaky = FlakySocket(tx, sendmsg_errors={2: BlockingIOError(errno.EAGAIN, "full")})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    assert sender.send_run(b"".join(d for d, _ in items), 400, rx.getsockname()) == (MAX_SEGMENTS, [])
    assert sender.gso and sender.datagrams_sent == MAX_SEGMENTS
    assert drain_plain(rx, MAX_SEGMENTS) == [d for d, _ in items[:MAX_SEGMENTS]]
    # Plain path: the index of the segment that found the buffer full.
    flaky = FlakySocket(tx, sendto_errors={4: BlockingIOError(errno.EAGAIN, "full")})
    plain = UDPSender(flaky, gso=False)  # type: ignore[arg-type]
    assert plain.send_run(b"abcdefghij", 2, rx.getsockname()) == (3, [])
    assert plain.syscalls == 4 and plain.datagrams_sent == 3


def test_send_run_hard_errors_are_reported_per_segment(socks) -> None:
    tx = make(socks)
    for gso in (True, False):
        sender = UDPSender(tx, gso=gso)
        stop, errors = sender.send_run(b"x" * 50, 10, "not an address")
        assert stop == 5 and [i for i, _ in errors] == [0, 1, 2, 3, 4]
        assert sender.datagrams_sent == 0
    # EINVAL on one chunk: resent one by one, the segment the kernel refuses (too big for IPv4) is reported.
    rx = make(socks)
    flaky = FlakySocket(tx, sendmsg_errors={1: OSError(errno.EINVAL, "bad")},
                        sendto_errors={2: OSError(errno.EMSGSIZE, "too big")})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    stop, errors = sender.send_run(b"a" * 10 + b"b" * 10 + b"c" * 10, 10, rx.getsockname())
    assert stop == 3 and [i for i, _ in errors] == [1]
    assert sender.gso and sender.datagrams_sent == 2
    assert drain_plain(rx, 2) == [b"a" * 10, b"c" * 10]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 2000), st.integers(1, 150), st.booleans(), st.booleans())
def test_run_round_trip(socks, seg, count, gro, gso) -> None:
    """Property: send_run then receive_runs gives back exactly the datagrams of the run, in order."""
    tx, rx = make(socks), make(socks)
    receiver = UDPReceiver(rx, gro=gro)
    last = 1 + (seg * count) % seg if count > 1 else seg
    items = burst(count - 1, seg, min(seg, last), rx.getsockname()) if seg >= 4 else [
        (bytes([k]) * seg, rx.getsockname()) for k in range(count)]
    buffer = b"".join(d for d, _ in items)
    sender = UDPSender(tx, gso=gso)
    assert sender.send_run(buffer, seg, rx.getsockname()) == (len(items), [])
    assert split(drain_runs(receiver, len(items))) == [d for d, _ in items]
    for s in (tx, rx):
        s.close()
    socks.clear()


def test_receive_is_unchanged_by_the_run_refactoring(socks, monkeypatch) -> None:
    tx, rx = make(socks), make(socks)
    items = burst(20, 600, 600, rx.getsockname())
    receiver = UDPReceiver(rx)
    UDPSender(tx).send(items)
    got = drain(receiver, len(items))
    assert [d for d, _ in got] == [d for d, _ in items]
    monkeypatch.setattr(udpio, "ENABLE_GRO", False)
    assert not UDPReceiver(rx).gro


@pytest.mark.parametrize("sizes,seg", [
    ([3000, 1000], 1000),  # two runs of one flow
    ([1288 * 30, 1288 * 30, 1288, 500], 1288),  # more than one sendmsg can take, then a single, then a short one
    ([400] * 70, 400),  # single datagrams of the segment size: more than MAX_SEGMENTS
    ([64, 10], 8),
])
def test_send_runs_sends_the_concatenation(socks, sizes, seg) -> None:
    tx, rx = make(socks), make(socks)
    raw = bytes(k % 251 for k in range(sum(sizes)))
    buffers, off = [], 0
    for k, size in enumerate(sizes):
        part = raw[off:off + size]
        buffers.append([bytes, bytearray, memoryview][k % 3](part))
        off += size
    expected = [raw[k:k + seg] for k in range(0, len(raw), seg)]
    sender = UDPSender(tx)
    assert sender.send_runs(buffers, seg, rx.getsockname()) == (len(expected), [])
    assert drain_plain(rx, len(expected)) == expected
    per_send = min(MAX_SEGMENTS, MAX_GSO_BYTES // seg)
    assert sender.datagrams_sent == len(expected)
    assert sender.syscalls == -(-len(expected) // per_send)
    # Without GSO: the same datagrams, one by one.
    plain = UDPSender(tx, gso=False)
    assert plain.send_runs(buffers, seg, rx.getsockname()) == (len(expected), [])
    assert drain_plain(rx, len(expected)) == expected and plain.syscalls == len(expected)


def test_send_runs_contract(socks) -> None:
    tx, rx = make(socks), make(socks)
    sender = UDPSender(tx)
    with pytest.raises(ValueError):
        sender.send_runs([b"x" * 15, b"y" * 10], 10, rx.getsockname())  # not whole segments before the last
    with pytest.raises(ValueError):
        sender.send_runs([b"", b"y" * 10], 10, rx.getsockname())
    assert sender.send_runs([b"a" * 10, b""], 10, rx.getsockname()) == (1, [])  # an empty last buffer adds nothing
    assert sender.send_runs([], 10, rx.getsockname()) == (0, [])
    assert drain_plain(rx, 1) == [b"a" * 10]
    # Buffer full on the second chunk: stop counts segments across buffers.
    flaky = FlakySocket(tx, sendmsg_errors={2: BlockingIOError(errno.EAGAIN, "full")})
    s2 = UDPSender(flaky)  # type: ignore[arg-type]
    bufs = [b"r" * (100 * 40), b"s" * (100 * 40)]
    assert s2.send_runs(bufs, 100, rx.getsockname()) == (MAX_SEGMENTS, [])
    assert drain_plain(rx, MAX_SEGMENTS) == [b"r" * 100] * 40 + [b"s" * 100] * (MAX_SEGMENTS - 40)
    # EIO: GSO off, the chunk resent one by one, indices across buffers.
    flaky = FlakySocket(tx, sendmsg_errors={1: OSError(errno.EIO, "no csum")},
                        sendto_errors={3: OSError(errno.EMSGSIZE, "x")})
    s3 = UDPSender(flaky)  # type: ignore[arg-type]
    assert s3.send_runs([b"a" * 20, b"b" * 20], 10, rx.getsockname()) == (4, [(2, flaky.sendto_errors[3])])
    assert not s3.gso
    assert drain_plain(rx, 3) == [b"a" * 10, b"a" * 10, b"b" * 10]
