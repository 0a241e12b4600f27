"""The relay driver's batched I/O: bursts through a real loopback relay, in order, in few syscalls."""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from tests.lab.relay import bound_relay_pair
from tsnet import udpio
from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.driver import RelayIOCounters, _send_pending, open_udp_socket, serve_relay
from tsnet.udpio import UDPSender

BURST = 200
PAYLOAD = 1200  # same-size datagrams: what GSO/GRO coalesce


async def _collect(sock: socket.socket, count: int, into: list[bytes], done: trio.Event) -> None:
    """Plain per-datagram receives (no GRO on the clients) until ``count`` WireGuard datagrams arrived."""
    while len(into) < count:
        await trio.lowlevel.wait_readable(sock)
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                break
            if data[2:4] == b"\x7a\x12":  # Geneve protocol WireGuard
                into.append(data)
    done.set()


@pytest.mark.parametrize("offload", [True, False], ids=["gso-gro", "plain-fallback"])
async def test_burst_both_ways_arrives_in_order(offload: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udpio, "ENABLE_GSO", offload)
    monkeypatch.setattr(udpio, "ENABLE_GRO", offload)
    relay_sock = open_udp_socket("127.0.0.1", 0)
    ca, cb = open_udp_socket("127.0.0.1", 0), open_udp_socket("127.0.0.1", 0)
    relay = AddrPort.from_sockaddr(relay_sock.getsockname())
    a_addr, b_addr = AddrPort.from_sockaddr(ca.getsockname()), AddrPort.from_sockaddr(cb.getsockname())
    srv, _ep, ha, hb = bound_relay_pair(relay, a_addr, b_addr, trio.current_time())
    a_to_b = [ha.wrap_wireguard(b"\x04\x00\x00\x00" + i.to_bytes(4, "big") + bytes(PAYLOAD)) for i in range(BURST)]
    b_to_a = [hb.wrap_wireguard(b"\x04\x00\x00\x00" + i.to_bytes(4, "big") + bytes(PAYLOAD)) for i in range(BURST)]
    counters = RelayIOCounters()
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    done_a, done_b = trio.Event(), trio.Event()
    with relay_sock, ca, cb:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, srv, relay_sock, counters=counters))
            nursery.start_soon(_collect, cb, BURST, got_b, done_b)
            nursery.start_soon(_collect, ca, BURST, got_a, done_a)
            # Clients burst like our WireGuard drivers do (UDP_SEGMENT sends when offload is on).
            for sock, burst in ((ca, a_to_b), (cb, b_to_a)):
                sender = UDPSender(sock)
                stop, errors = sender.send([(pkt, relay.to_sockaddr()) for pkt in burst])
                assert (stop, errors) == (BURST, [])
                assert sender.gso is offload
            with trio.fail_after(5):
                await done_a.wait()
                await done_b.wait()
            nursery.cancel_scope.cancel()
    assert got_b == a_to_b and got_a == b_to_a
    assert srv.forwarded_packets[("udp4", "udp4")] == 2 * BURST
    assert "send_error" not in srv.dropped
    assert counters.datagrams_received == counters.datagrams_sent == 2 * BURST
    if offload:
        # ~50 datagrams per coalesced buffer and per segmented send, instead of one syscall each.
        assert counters.receive_coalesced >= 2
        assert counters.receive_syscalls <= 2 * BURST // 10
        assert counters.send_syscalls <= 2 * BURST // 10
    else:
        assert counters.receive_coalesced == 0
        assert counters.send_syscalls == 2 * BURST
        assert counters.receive_syscalls > 2 * BURST  # one per datagram, plus the final EAGAINs


class _FakeSender:
    """Stands in for UDPSender: accepts datagrams up to ``stop`` and reports ``errors`` (both for send and send_run)."""

    def __init__(self, stop: int, errors: list, run_stop: int | None = None) -> None:
        self.stop, self.errors, self.run_stop = stop, errors, run_stop
        self.syscalls = self.datagrams_sent = 0
        self.groups: list[list] = []
        self.runs: list[tuple] = []

    def send(self, datagrams):
        self.groups.append(list(datagrams))
        self.syscalls += 1
        stop = min(self.stop, len(datagrams))
        self.datagrams_sent += stop - len(self.errors)
        return stop, self.errors

    def send_run(self, buffer, seg, addr):
        return self.send_runs([buffer], seg, addr)

    def send_runs(self, buffers, seg, addr):
        self.runs.append((b"|".join(bytes(b) for b in buffers), seg, addr))
        self.syscalls += 1
        n = sum(-(-len(b) // seg) for b in buffers)
        stop = n if self.run_stop is None else self.run_stop
        self.datagrams_sent += stop
        return stop, []


def test_unsent_forwards_count_as_send_errors_and_interleaved_flows_are_regrouped() -> None:
    x, y, z = ("192.0.2.1", 1), ("192.0.2.2", 2), ("2001:db8::1", 3)
    full = _FakeSender(stop=2, errors=[(0, OSError("unreachable"))])  # 1 error + 1 left by a full buffer
    # Pending forwards are runs (buffer, segment size); single datagrams have segment size == length.
    pending = {x: [(b"x1", 2), (b"x2", 2), (b"x3", 2)], z: [(b"z1", 2)], y: [(b"y1", 2)]}
    ok = _FakeSender(stop=1, errors=[])
    senders = {x: full, z: None, y: ok}  # no socket for z's family
    dropped = {"send_error": 1}
    counters = RelayIOCounters()
    _send_pending(pending, senders, dropped, counters)  # type: ignore[arg-type]
    assert dropped["send_error"] == 1 + 2 + 1  # before; x: an error and an unsent one; z: no socket
    assert full.groups == [[(b"x1", x), (b"x2", x), (b"x3", x)]]
    assert ok.runs == [(b"y1", 2, y)] and ok.groups == []  # a lone forward goes straight to send_run
    assert pending == {} and senders == {}  # nothing outlives the batch
    assert counters.send_syscalls == 2 and counters.datagrams_sent == 1 + 1


def test_runs_leave_whole_in_order_with_singles_grouped_around_them() -> None:
    x, y = ("192.0.2.1", 1), ("192.0.2.2", 2)
    sx, sy = _FakeSender(stop=99, errors=[]), _FakeSender(stop=99, errors=[], run_stop=1)
    pending = {
        # Runs of one segment size continue each other (and a single of that size, and a shorter last one);
        # a run with a partial last segment, or another size, starts a new send.
        x: [(b"a", 1), (b"b", 1), (b"RUNRUN", 3), (b"ABCDEF", 3), (b"sss", 3), (b"t", 1), (b"u", 1),
            (b"RRRRR", 2), (b"QQQQ", 2), (b"c", 1)],
        # y: the kernel buffer fills during the first send (1 segment sent): the rest of y is dropped.
        y: [(b"yyyyyy", 2), (b"s", 1), (b"zz", 1)],
    }
    dropped: dict[str, int] = {}
    counters = RelayIOCounters()
    _send_pending(pending, {x: sx, y: sy}, dropped, counters)  # type: ignore[arg-type]
    assert sx.groups == [[(b"a", x), (b"b", x)], [(b"u", x)]]
    assert sx.runs == [(b"RUNRUN|ABCDEF|sss|t", 3, x), (b"RRRRR", 2, x), (b"QQQQ|c", 2, x)]
    assert sy.runs == [(b"yyyyyy|s", 2, y)] and sy.groups == []
    assert dropped == {"send_error": 3 + 2}  # 3 of the run's 4 segments (with "s"), and the 2-segment "zz"
    assert counters.datagrams_sent == 2 + 6 + 1 + 3 + 3 + 1 and counters.send_syscalls == 6


async def test_gro_run_with_foreign_datagrams_is_forwarded_around_them() -> None:
    """A client's segmented burst with a stranger VNI and a STUN-sized odd one inside: the rest arrives, in order."""
    relay_sock = open_udp_socket("127.0.0.1", 0)
    ca, cb = open_udp_socket("127.0.0.1", 0), open_udp_socket("127.0.0.1", 0)
    relay = AddrPort.from_sockaddr(relay_sock.getsockname())
    a_addr, b_addr = AddrPort.from_sockaddr(ca.getsockname()), AddrPort.from_sockaddr(cb.getsockname())
    srv, ep, ha, _hb = bound_relay_pair(relay, a_addr, b_addr, trio.current_time())
    burst = [ha.wrap_wireguard(b"\x04\x00\x00\x00" + i.to_bytes(4, "big") + bytes(PAYLOAD)) for i in range(40)]
    size = len(burst[0])
    foreign = bytearray(burst[7])
    foreign[4:7] = (ep.vni + 100).to_bytes(3, "big")  # same size, another VNI: dropped as unknown_vni
    burst[7] = bytes(foreign)
    expected = [p for i, p in enumerate(burst) if i != 7]
    counters = RelayIOCounters()
    got: list[bytes] = []
    done = trio.Event()
    with relay_sock, ca, cb:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, srv, relay_sock, counters=counters))
            nursery.start_soon(_collect, cb, len(expected), got, done)
            sender = UDPSender(ca)
            assert sender.send([(p, relay.to_sockaddr()) for p in burst]) == (len(burst), [])
            assert sender.syscalls == 1 and all(len(p) == size for p in burst)  # one segmented send
            with trio.fail_after(5):
                await done.wait()
            nursery.cancel_scope.cancel()
    assert got == expected
    assert srv.dropped.get("unknown_vni") == 1
    assert counters.receive_coalesced >= 1 and counters.send_syscalls <= 4  # the two stretches, not 39 sends
