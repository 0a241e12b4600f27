"""tsnet.udpio: batched UDP send (UDP_SEGMENT) and receive (UDP_GRO) on loopback sockets."""

from __future__ import annotations

import errno
import select
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.magicsock.test_magicsock_conn_loopback import pair_factory  # noqa: F401  (fixture)
from tsnet import udpio
from tsnet.udpio import GSO_EINVAL_LIMIT, MAX_SEGMENTS, UDPReceiver, UDPSender

HOSTS = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def udp(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    s.bind((HOSTS[family], 0))
    s.setblocking(False)
    return s


def make(socks: list[socket.socket], family: int = socket.AF_INET) -> socket.socket:
    s = udp(family)
    socks.append(s)
    return s


def drain(receiver: UDPReceiver, expected: int) -> list[tuple[bytes, Any]]:
    """Receive until ``expected`` datagrams came (loopback delivers synchronously; bounded wait anyway)."""
    out: list[tuple[Any, Any]] = []
    while len(out) < expected:
        if not select.select([receiver.sock], [], [], 5.0)[0]:
            break
        receiver.receive(out, 1024)
    return [(bytes(d), a) for d, a in out]


def drain_plain(sock: socket.socket, expected: int) -> list[bytes]:
    out = []
    while len(out) < expected and select.select([sock], [], [], 5.0)[0]:
        out.append(sock.recv(65535))
    return out


def burst(n: int, size: int, last: int, dest: Any) -> list[tuple[bytes, Any]]:
    """``n`` datagrams of ``size`` bytes (distinct contents) and a short last one of ``last`` bytes."""
    items = [(bytes([i % 251]) * 4 + i.to_bytes(4, "big") * ((size - 4) // 4) + b"z" * ((size - 4) % 4), dest)
             for i in range(n)]
    items.append((b"L" * last, dest))
    return items


def test_kernel_supports_offload(socks):
    # The rest of this file exercises the GSO/GRO paths only if this machine's kernel has them.
    s = make(socks)
    assert udpio.gso_supported(s)
    assert udpio.gro_supported(s)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("gro", [True, False])
def test_equal_burst_with_short_last_arrives_in_order(socks, family, gro):
    tx, rx = make(socks, family), make(socks, family)
    dest = rx.getsockname()[:2]
    items = burst(40, 1312, 100, dest)
    receiver = UDPReceiver(rx, gro=gro)  # before the data arrives: the kernel decides GRO at delivery
    sender = UDPSender(tx)
    assert sender.gso
    assert sender.send(items) == (len(items), [])
    assert sender.syscalls == 1 and sender.gso_sends == 1 and sender.datagrams_sent == len(items)
    got = drain(receiver, len(items))
    assert [d for d, _ in got] == [d for d, _ in items]
    assert {a[:2] for _, a in got} == {tx.getsockname()[:2]}
    assert receiver.datagrams == len(items)
    if gro:
        assert receiver.gro and receiver.coalesced >= 1
        assert receiver.syscalls < len(items)


def test_plain_receiver_sees_separate_datagrams(socks):
    tx, rx = make(socks), make(socks)
    items = burst(10, 1000, 7, rx.getsockname())
    UDPSender(tx).send(items)
    assert drain_plain(rx, len(items)) == [d for d, _ in items]


def test_mixed_destinations_and_sizes(socks):
    tx, r1, r2 = make(socks), make(socks), make(socks)
    d1, d2 = r1.getsockname(), r2.getsockname()
    items: list[tuple[bytes, Any]] = []
    items += burst(5, 1200, 50, d1)
    items += burst(3, 1200, 1199, d2)
    items += [(b"a" * 300, d1), (b"b" * 400, d1), (b"c" * 400, d1)]  # growing size splits the group
    items += [(b"", d2), (b"e" * 64, d2), (b"f" * 64, d2), (b"", d2)]  # empty datagrams go alone
    items += [(bytes([i]) * 32, d1 if i % 2 else d2) for i in range(10)]  # alternating destinations
    items += burst(MAX_SEGMENTS + 10, 900, 900, d1)  # longer than one GSO send
    receivers = {d1: UDPReceiver(r1), d2: UDPReceiver(r2)}
    sender = UDPSender(tx)
    assert sender.send(items) == (len(items), [])
    assert sender.datagrams_sent == len(items)
    assert sender.syscalls < len(items)
    for dest, receiver in receivers.items():
        expected = [d for d, a in items if a == dest]
        got = drain(receiver, len(expected))
        assert [d for d, _ in got] == expected


def test_total_size_limit_splits_groups(socks):
    tx, rx = make(socks), make(socks)
    # 60 x 1400 bytes is more than one IP datagram can carry: the sender must split it.
    items = burst(60, 1400, 1400, rx.getsockname())
    sender = UDPSender(tx)
    assert sender.send(items) == (len(items), [])
    assert sender.gso_fallbacks == 0 and sender.gso_sends == 2
    assert [d for d, _ in drain(UDPReceiver(rx), len(items))] == [d for d, _ in items]


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("gro", [True, False])
def test_fallback_paths_give_identical_results(socks, gso, gro):
    tx, r1, r2 = make(socks), make(socks), make(socks)
    items = burst(20, 1280, 33, r1.getsockname()) + burst(4, 200, 1, r2.getsockname())
    receivers = [UDPReceiver(rx, gro=gro) for rx in (r1, r2)]
    sender = UDPSender(tx, gso=gso)
    assert sender.gso is gso
    assert sender.send(items) == (len(items), [])
    if not gso:
        assert sender.syscalls == len(items)
    for receiver in receivers:
        rx = receiver.sock
        expected = [d for d, a in items if a == rx.getsockname()]
        assert receiver.gro is gro
        got = drain(receiver, len(expected))
        assert [d for d, _ in got] == expected
        assert {a for _, a in got} == {tx.getsockname()}


@pytest.mark.parametrize("how", ["detection", "switch"])
def test_forced_fallback_by_flag(socks, monkeypatch, how):
    # Kernels without UDP_SEGMENT / UDP_GRO (detection says no), or offload switched off: one by one.
    if how == "detection":
        monkeypatch.setattr(udpio, "gso_supported", lambda sock: False)
        monkeypatch.setattr(udpio, "gro_supported", lambda sock: False)
    else:
        monkeypatch.setattr(udpio, "ENABLE_GSO", False)
        monkeypatch.setattr(udpio, "ENABLE_GRO", False)
    tx, rx = make(socks), make(socks)
    items = burst(30, 1000, 10, rx.getsockname())
    sender, receiver = UDPSender(tx), UDPReceiver(rx)
    assert not sender.gso and not receiver.gro
    assert sender.send(items) == (len(items), [])
    assert sender.syscalls == len(items)
    got = drain(receiver, len(items))
    assert [d for d, _ in got] == [d for d, _ in items]
    assert receiver.coalesced == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 1, 32, 600, 1312, 1312, 1312, 1400, 9000])),
                max_size=150),
       st.booleans())
def test_any_sequence_arrives_as_sent(socks, plan, gro):
    """Property: whatever the mix of sizes and destinations, each receiver sees exactly its datagrams, in order."""
    tx = make(socks)
    receivers = [UDPReceiver(make(socks), gro=gro) for _ in range(3)]
    dests = [r.sock.getsockname() for r in receivers]
    items = [(bytes([k % 256]) * size, dests[d]) for k, (d, size) in enumerate(plan)]
    sender = UDPSender(tx)
    assert sender.send(items) == (len(items), [])
    assert sender.datagrams_sent == len(items)
    for receiver, dest in zip(receivers, dests):
        expected = [d for d, a in items if a == dest]
        assert [d for d, _ in drain(receiver, len(expected))] == expected
        receiver.sock.close()
    tx.close()
    socks.clear()


class FlakySocket:
    """Wraps a real socket; ``sendmsg``/``sendto`` raise scripted errors (by call number) instead of sending."""

    def __init__(self, sock: socket.socket, *, sendmsg_errors: dict[int, OSError] | None = None,
                 sendto_errors: dict[int, OSError] | None = None) -> None:
        self._sock = sock
        self.family, self.type = sock.family, sock.type
        self.sendmsg_errors = sendmsg_errors or {}
        self.sendto_errors = sendto_errors or {}
        self.sendmsg_calls = self.sendto_calls = 0

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def sendmsg(self, *args: Any) -> int:
        self.sendmsg_calls += 1
        exc = self.sendmsg_errors.get(self.sendmsg_calls)
        if exc is not None:
            raise exc
        return self._sock.sendmsg(*args)

    def sendto(self, *args: Any) -> int:
        self.sendto_calls += 1
        exc = self.sendto_errors.get(self.sendto_calls)
        if exc is not None:
            raise exc
        return self._sock.sendto(*args)


def test_buffer_full_on_gso_send_reports_unsent_group(socks):
    tx, rx = make(socks), make(socks)
    items = burst(9, 1000, 1000, rx.getsockname()) + burst(9, 1200, 1200, rx.getsockname())
    flaky = FlakySocket(tx, sendmsg_errors={2: BlockingIOError(errno.EAGAIN, "full")})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    stop, errors = sender.send(items)
    assert (stop, errors) == (10, [])  # first group (10 x 1000) went out, the second did not
    assert sender.datagrams_sent == 10 and sender.gso  # buffer full says nothing about GSO
    # The caller retries the rest later, from where it stopped.
    assert sender.send(items, stop) == (len(items), [])
    assert [d for d, _ in drain(UDPReceiver(rx), len(items))] == [d for d, _ in items]


def test_buffer_full_on_plain_send(socks):
    tx, rx = make(socks), make(socks)
    items = [(b"%d" % i, rx.getsockname()) for i in range(5)]
    flaky = FlakySocket(tx, sendto_errors={3: BlockingIOError(errno.EAGAIN, "full")})
    sender = UDPSender(flaky, gso=False)  # type: ignore[arg-type]
    assert sender.send(items) == (2, [])
    assert sender.datagrams_sent == 2 and sender.syscalls == 3
    assert drain_plain(rx, 2) == [b"0", b"1"]


def test_eio_disables_gso_and_resends_one_by_one(socks):
    tx, rx = make(socks), make(socks)
    items = burst(10, 800, 20, rx.getsockname()) + burst(10, 800, 20, rx.getsockname())
    flaky = FlakySocket(tx, sendmsg_errors={1: OSError(errno.EIO, "no csum offload")})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    assert sender.send(items) == (len(items), [])
    assert not sender.gso and sender.gso_fallbacks == 1
    assert flaky.sendmsg_calls == 1 and flaky.sendto_calls == len(items)
    assert [d for d, _ in drain(UDPReceiver(rx), len(items))] == [d for d, _ in items]


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.ENOPROTOOPT])
def test_unsupported_at_send_time_is_remembered(socks, err):
    tx, rx = make(socks), make(socks)
    items = burst(5, 800, 20, rx.getsockname())
    flaky = FlakySocket(tx, sendmsg_errors={1: OSError(err, "nope")})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    assert sender.send(items) == (len(items), [])
    assert sender.send(items) == (len(items), [])
    assert not sender.gso and flaky.sendmsg_calls == 1 and flaky.sendto_calls == 2 * len(items)
    assert len(drain(UDPReceiver(rx), 2 * len(items))) == 2 * len(items)


def test_einval_retries_group_and_gives_up_after_a_run(socks):
    tx, rx = make(socks), make(socks)
    items = burst(5, 800, 20, rx.getsockname())
    einval = {k: OSError(errno.EINVAL, "bad segment") for k in range(1, GSO_EINVAL_LIMIT + 1)}
    einval[1] = OSError(errno.EINVAL, "one oversized segment")
    flaky = FlakySocket(tx, sendmsg_errors={1: einval[1]})
    sender = UDPSender(flaky)  # type: ignore[arg-type]
    assert sender.send(items) == (len(items), [])
    assert sender.gso  # a single EINVAL is not proof GSO is unusable
    assert sender.send(items) == (len(items), [])
    assert sender.gso_sends == 1  # the second batch went out segmented again
    flaky.sendmsg_calls = 0
    flaky.sendmsg_errors = einval
    for _ in range(GSO_EINVAL_LIMIT):
        assert sender.send(items) == (len(items), [])
    assert not sender.gso
    total = (2 + GSO_EINVAL_LIMIT) * len(items)
    assert len(drain(UDPReceiver(rx), total)) == total


def test_hard_errors_are_reported_and_the_rest_is_sent(socks):
    tx, rx = make(socks), make(socks)
    dest = rx.getsockname()
    items: list[tuple[bytes, Any]] = [(b"a" * 100, dest), (b"b" * 100, ("::1", 9)), (b"c" * 100, dest),
                                      (b"d" * 100, "not an address"), (b"e" * 100, dest), (b"f" * 100, dest)]
    for gso in (True, False):
        sender = UDPSender(tx, gso=gso)
        stop, errors = sender.send(items)
        assert stop == len(items)
        assert [i for i, _ in errors] == [1, 3]
        assert sender.datagrams_sent == 4
        assert [d for d, _ in drain(UDPReceiver(rx), 4)] == [b"a" * 100, b"c" * 100, b"e" * 100, b"f" * 100]


def test_receiver_limit_and_drained(socks):
    tx, rx = make(socks), make(socks)
    items = [(b"%03d" % i, rx.getsockname()) for i in range(10)]  # separate sends: loopback does not coalesce them
    plain = UDPSender(tx, gso=False)
    plain.send(items)
    select.select([rx], [], [], 5.0)
    receiver = UDPReceiver(rx)
    out: list[tuple[Any, Any]] = []
    assert receiver.receive(out, 4) is False
    assert len(out) == 4
    while not receiver.receive(out, 4):
        pass
    assert [bytes(d) for d, _ in out] == [d for d, _ in items]
    assert receiver.receive(out, 4) is True  # empty socket


def test_gro_buffer_is_not_split_across_calls_and_maps_address_once(socks):
    tx, rx = make(socks), make(socks)
    items = burst(20, 600, 600, rx.getsockname())
    calls = []
    receiver = UDPReceiver(rx, map_address=lambda a: calls.append(a) or ("peer", a[1]))
    UDPSender(tx).send(items)
    select.select([rx], [], [], 5.0)
    out: list[tuple[Any, Any]] = []
    receiver.receive(out, 3)
    # One coalesced buffer: all of it comes out even though the limit was 3, with one address mapping.
    assert len(out) == len(items) and len(calls) == 1
    assert all(a == ("peer", tx.getsockname()[1]) for _, a in out)
    assert all(isinstance(d, memoryview) and d.readonly for d, _ in out)
    assert [bytes(d) for d, _ in out] == [d for d, _ in items]


def test_receive_errors_are_counted_not_raised(socks):
    tx = make(socks)
    rx = make(socks)
    closed_port = rx.getsockname()
    rx.close()
    socks.remove(rx)
    # Connected UDP socket to a closed port: the ICMP error surfaces on the next receive.
    tx.connect(closed_port)
    for gro in (True, False):
        tx.send(b"x")
        receiver = UDPReceiver(tx, gro=gro)
        out: list[tuple[Any, Any]] = []
        assert select.select([tx], [], [], 5.0)[0]
        assert receiver.receive(out, 8) is True
        assert out == [] and receiver.errors == 1


# -- the drivers use it ------------------------------------------------------------------------------------------------


async def test_wireguard_driver_sends_and_receives_a_burst_in_few_syscalls() -> None:
    import trio

    from tests.lab.packets import udp
    from tsnet.key import NodePrivate
    from tsnet.wg import WireGuard
    from tsnet.wg.driver import WireGuardUDP

    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    a = WireGuard(a_key, now=trio.current_time(), packet_events=False)
    b = WireGuard(b_key, now=trio.current_time(), packet_events=False)
    pkts = [udp("100.64.0.1", "100.64.0.2", 1000, 2000, bytes([i]) * 1200) for i in range(40)]
    pkts.append(udp("100.64.0.1", "100.64.0.2", 1000, 2000, b"last"))
    got: list[bytes] = []
    first, arrived = trio.Event(), trio.Event()

    def on_packets(batch: list[Any]) -> None:
        got.extend(p for _, p in batch)
        first.set()
        if len(got) >= 1 + len(pkts):
            arrived.set()

    drv_a = WireGuardUDP(a, bind=("127.0.0.1", 0))
    drv_b = WireGuardUDP(b, bind=("127.0.0.1", 0), on_packets=on_packets)
    a.add_peer(b_key.public, endpoint=drv_b.local_address)
    b.add_peer(a_key.public)
    async with trio.open_nursery() as nursery:
        await nursery.start(drv_a.run)
        await nursery.start(drv_b.run)
        drv_a.send_packet(b_key.public, pkts[0])  # staged until the handshake completes
        with trio.fail_after(5):
            await first.wait()  # handshake done, session confirmed
        sent, syscalls = drv_a.counters.datagrams_sent, drv_a.counters.send_syscalls
        received, rsyscalls = drv_b.counters.datagrams_received, drv_b.counters.receive_syscalls
        drv_a.send_packets(b_key.public, pkts)
        with trio.fail_after(5):
            await arrived.wait()
        nursery.cancel_scope.cancel()
    assert got == [pkts[0], *pkts]
    assert drv_a.counters.datagrams_sent - sent == len(pkts)
    assert drv_a.counters.send_syscalls - syscalls == 1  # one UDP_SEGMENT send
    assert drv_b.counters.datagrams_received - received == len(pkts)
    assert drv_b.counters.receive_syscalls - rsyscalls < len(pkts) // 4  # UDP_GRO coalesced the burst
    assert drv_a.counters.send_errors == drv_b.counters.receive_errors == 0


async def test_magicsock_driver_sends_and_receives_a_burst_in_few_syscalls(pair_factory) -> None:
    import trio

    from tests.lab import packets
    from tests.magicsock.test_magicsock_conn_loopback import _ping_until

    a, b = await pair_factory()
    seq = await _ping_until(
        a, b, lambda: a.driver.peer_status(b.driver.node_key).kind == "direct"
        and b.driver.peer_status(a.driver.node_key).kind == "direct", 10.0, 1)
    ca, cb = dict(a.driver.counters), dict(b.driver.counters)
    seqs = list(range(seq + 100, seq + 140))
    burst = [packets.icmp_echo(a.ip, b.ip, 7, s, b"p" * 1100) for s in seqs]
    assert a.driver.send_ip_packets(burst) == len(burst)
    with trio.fail_after(5):
        while not set(seqs) <= set(a.replies):  # b answers each echo; a records the replies
            a.got_reply = trio.Event()
            await a.got_reply.wait()
    assert a.driver.counters["udp_sent"] - ca["udp_sent"] >= len(burst)
    # The burst left in one UDP_SEGMENT send (other traffic, e.g. disco, may add a few syscalls).
    assert a.driver.counters["udp_send_syscalls"] - ca["udp_send_syscalls"] < len(burst) // 4
    assert b.driver.counters["udp_received"] - cb["udp_received"] >= len(burst)
    # ...and arrived at b coalesced (UDP_GRO), in far fewer receive syscalls than datagrams.
    assert b.driver.counters["udp_receive_syscalls"] - cb["udp_receive_syscalls"] < len(burst) // 2
    assert a.driver.counters["udp_send_errors"] == b.driver.counters["udp_send_errors"] == 0


async def test_magicsock_driver_send_counters_keep_their_meaning(socks) -> None:
    """udp_sent counts datagrams (not syscalls); a full buffer drops one datagram; unreachable feeds the core."""
    import ipaddress

    from tsnet.key import NodePrivate
    from tsnet.magicsock.addrport import AddrPort
    from tsnet.magicsock.driver import MagicSockDriver

    tx, rx = make(socks), make(socks)
    driver = MagicSockDriver(NodePrivate.generate(), bind_v4="127.0.0.1", bind_v6=None)
    unreachable: list[AddrPort] = []
    driver.core.note_udp_unreachable = lambda dest, now: unreachable.append(dest)  # type: ignore[method-assign]
    here = AddrPort(ipaddress.ip_address("127.0.0.1"), rx.getsockname()[1])
    there = AddrPort(ipaddress.ip_address("127.0.0.2"), 9)
    v6 = AddrPort(ipaddress.ip_address("::1"), 9)
    receiver = UDPReceiver(rx)
    flaky = FlakySocket(tx, sendto_errors={1: OSError(errno.ENETUNREACH, "unreachable")},
                        sendmsg_errors={2: BlockingIOError(errno.EAGAIN, "full")})
    driver.sockets = {4: flaky}  # type: ignore[dict-item]
    batch = [(b"a" * 500, here)] * 20 + [(b"x" * 10, there), (b"v6", v6)] + [(b"b" * 300, here)] * 5
    driver._send_udp(batch)
    c = driver.counters
    # One GSO send, one failed sendto, one GSO send refused (buffer full), then the rest of that group.
    assert c["udp_send_syscalls"] == 4 and c["udp_sent"] == 20 + 4
    assert c["udp_send_errors"] == 1 and unreachable == [there]
    assert c["udp_send_dropped"] == 1 + 1  # no IPv6 socket; the first datagram the full buffer refused
    assert [d for d, _ in drain(receiver, 24)] == [b"a" * 500] * 20 + [b"b" * 300] * 4


async def test_wireguard_driver_queues_what_a_full_buffer_refused(socks) -> None:
    import trio

    from tests.wg.test_driver import PEER, FakeDevice
    from tsnet.wg.driver import WireGuardUDP

    rx = make(socks)
    receiver = UDPReceiver(rx)
    dev = FakeDevice()
    dev.endpoint = rx.getsockname()
    drv = WireGuardUDP(dev, bind=("127.0.0.1", 0))
    # The first segmented send finds the kernel buffer full; later sends succeed.
    flaky = FlakySocket(drv.socket, sendmsg_errors={1: BlockingIOError(errno.EAGAIN, "full")})
    drv._sender.sock = flaky  # type: ignore[assignment]
    packets = [b"%04d" % i + b"p" * 996 for i in range(30)]
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        drv.send_packets(PEER, packets)
        assert drv.counters.send_queued == len(packets) and drv.counters.datagrams_sent == 0
        got: list[tuple[Any, Any]] = []
        with trio.fail_after(5):
            while len(got) < len(packets):
                await trio.lowlevel.wait_readable(rx)
                receiver.receive(got, 128)
        nursery.cancel_scope.cancel()
    assert [bytes(d) for d, _ in got] == [b"enc:" + p for p in packets]
    assert drv.counters.datagrams_sent == len(packets) and drv.counters.send_queue_overflow == 0
    assert flaky.sendmsg_calls == 2 and drv.counters.send_syscalls == 2  # refused, then the writer's one send
