"""Tests of the trio UDP driver (tsnet.wg.driver) against a scripted fake device and against the real core."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing

from tsnet.key import NodePrivate, NodePublic
from tsnet.wg.driver import WireGuardUDP, open_udp_socket
from tsnet.wg.events import HandshakeCompleted, PacketReceived

PEER = NodePrivate.generate().public


class FakeDevice:
    """Just enough of the WireGuard API: echoes datagrams as 'packets', records timer calls."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any, float]] = []
        self.outbox: list[tuple[bytes, Any]] = []
        self.events: list[Any] = []
        self.flushes = 0
        self.timer: float | None = None
        self.timer_calls: list[float] = []
        self.endpoint: Any = None
        self.timer_action = None
        self.batches: list[int] = []

    def receive_datagram(self, data, addr, now):
        assert isinstance(data, bytes)
        self.received.append((data, addr, now))
        self.endpoint = addr
        if data.startswith(b"pkt:"):
            self.events.append(PacketReceived(PEER, data[4:]))
        elif data == b"hs":
            self.events.append(HandshakeCompleted(PEER, False))
        elif data.startswith(b"echo:"):
            self.outbox.append((b"re:" + data[5:], addr))

    def receive_datagrams(self, datagrams, now):
        self.batches.append(len(datagrams))
        for data, addr in datagrams:
            self.receive_datagram(data, addr, now)

    def packets_received(self):
        return []

    def send_packet(self, peer, packet, now):
        self.outbox.append((b"enc:" + bytes(packet), self.endpoint))

    def send_packets(self, peer, packets, now):
        for p in packets:
            self.send_packet(peer, p, now)

    def datagrams_to_send(self, now):
        self.flushes += 1
        out, self.outbox = self.outbox, []
        return out

    def drain_events(self):
        out, self.events = self.events, []
        return out

    def get_timer(self):
        return self.timer

    def handle_timer(self, now):
        self.timer_calls.append(now)
        self.timer = None
        if self.timer_action is not None:
            self.timer_action(now)


def client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


async def recv(sock: socket.socket) -> tuple[bytes, Any]:
    ts = trio.socket.from_stdlib_socket(sock)
    with trio.fail_after(5):
        return await ts.recvfrom(2048)


async def test_drains_a_burst_in_one_batch_and_flushes_once() -> None:
    dev = FakeDevice()
    drv = WireGuardUDP(dev, bind=("127.0.0.1", 0))
    client = client_socket()
    n = 50
    for i in range(n):
        client.sendto(b"echo:%d" % i, drv.local_address)
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        replies = [(await recv(client))[0] for _ in range(n)]
        nursery.cancel_scope.cancel()
    assert replies == [b"re:%d" % i for i in range(n)]
    assert drv.counters.datagrams_received == n and drv.counters.datagrams_sent == n
    assert drv.counters.receive_batches == 1  # the whole burst was queued before the first wakeup
    assert dev.flushes == 1 and dev.batches == [n]
    assert drv.socket.fileno() == -1  # run() closes the socket on exit


async def test_packets_go_to_callback_or_channel() -> None:
    got: list[tuple[NodePublic, bytes]] = []
    events: list[Any] = []
    drv = WireGuardUDP(FakeDevice(), bind=("127.0.0.1", 0), on_packet=lambda p, b: got.append((p, b)), on_event=events.append)
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        client.sendto(b"hs", drv.local_address)
        client.sendto(b"pkt:one", drv.local_address)
        client.sendto(b"echo:sync", drv.local_address)
        await recv(client)  # the echo is sent after the packet in the same batch
        nursery.cancel_scope.cancel()
    assert got == [(PEER, b"one")] and events == [HandshakeCompleted(PEER, False)]

    drv2 = WireGuardUDP(FakeDevice(), bind=("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(drv2.run)
        client.sendto(b"pkt:two", drv2.local_address)
        with trio.fail_after(5):
            ev = await drv2.packets.receive()
        nursery.cancel_scope.cancel()
    assert ev == PacketReceived(PEER, b"two")


async def test_full_channel_drops_and_counts_instead_of_blocking() -> None:
    drv = WireGuardUDP(FakeDevice(), bind=("127.0.0.1", 0), packet_buffer=2)
    client = client_socket()
    for i in range(5):
        client.sendto(b"pkt:%d" % i, drv.local_address)
    client.sendto(b"echo:done", drv.local_address)
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        await recv(client)
        nursery.cancel_scope.cancel()
    assert drv.counters.packets_delivered == 2 and drv.counters.packets_dropped_channel_full == 3
    assert [drv.packets.receive_nowait().packet for _ in range(2)] == [b"0", b"1"]


async def test_handler_errors_are_counted_not_fatal() -> None:
    def boom(peer, packet):
        raise RuntimeError("handler bug")

    drv = WireGuardUDP(FakeDevice(), bind=("127.0.0.1", 0), on_packet=boom)
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        client.sendto(b"pkt:x", drv.local_address)
        client.sendto(b"echo:still alive", drv.local_address)
        assert (await recv(client))[0] == b"re:still alive"
        nursery.cancel_scope.cancel()
    assert drv.counters.handler_errors == 1


async def test_send_packet_goes_out_immediately_and_bad_addresses_are_counted() -> None:
    dev = FakeDevice()
    drv = WireGuardUDP(dev, bind=("127.0.0.1", 0))
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        client.sendto(b"echo:hi", drv.local_address)  # teaches the fake its endpoint
        assert (await recv(client))[0] == b"re:hi"
        drv.send_packet(PEER, b"data")
        assert (await recv(client))[0] == b"enc:data"
        dev.endpoint = ("not an address", "x")
        drv.send_packet(PEER, b"lost")
        assert drv.counters.send_errors == 1
        nursery.cancel_scope.cancel()


async def test_timer_fires_at_the_device_deadline_and_follows_changes(mock_clock: trio.testing.MockClock) -> None:
    dev = FakeDevice()
    drv = WireGuardUDP(dev, bind=("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        t0 = trio.current_time()
        dev.timer = t0 + 10.0
        drv.update()  # device state changed outside the driver
        mock_clock.jump(9.5)
        await trio.testing.wait_all_tasks_blocked()
        assert dev.timer_calls == []
        mock_clock.jump(0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert dev.timer_calls == [t0 + 10.0]
        dev.timer = t0 + 20.0
        drv.update()
        dev.timer = t0 + 12.0  # moved earlier by a later device call
        drv.update()
        mock_clock.jump(2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert dev.timer_calls == [t0 + 10.0, t0 + 12.0]
        # Output produced by the timer goes out on the socket.
        client = client_socket()
        dev.endpoint = client.getsockname()
        dev.timer = t0 + 13.0
        dev.timer_action = lambda now: dev.outbox.append((b"keepalive", dev.endpoint))
        drv.update()
        mock_clock.jump(1.0)
        assert (await recv(client))[0] == b"keepalive"
        nursery.cancel_scope.cancel()


async def test_replace_socket_moves_to_a_new_port() -> None:
    dev = FakeDevice()
    drv = WireGuardUDP(dev, bind=("127.0.0.1", 0))
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        old = drv.socket
        old_port = drv.local_address[1]
        drv.replace_socket(open_udp_socket("127.0.0.1", 0))
        assert old.fileno() == -1 and drv.local_address[1] != old_port
        client.sendto(b"echo:new", drv.local_address)
        data, src = await recv(client)
        assert data == b"re:new" and src == drv.local_address
        nursery.cancel_scope.cancel()


async def test_accepts_a_trio_socket() -> None:
    tsock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await tsock.bind(("127.0.0.1", 0))
    addr = tsock.getsockname()
    drv = WireGuardUDP(FakeDevice(), tsock)
    assert drv.local_address == addr
    client = client_socket()
    async with trio.open_nursery() as nursery:
        await nursery.start(drv.run)
        client.sendto(b"echo:t", addr)
        assert (await recv(client))[0] == b"re:t"
        nursery.cancel_scope.cancel()
    with pytest.raises(TypeError):
        WireGuardUDP(FakeDevice(), object())  # type: ignore[arg-type]


@pytest.mark.parametrize("packet_events", [True, False])
async def test_two_real_devices_over_loopback(packet_events: bool) -> None:
    """The real core on both ends: handshake, packets both ways, all through the drivers' sockets."""
    from tsnet.wg import WireGuard

    from tests.lab.packets import udp

    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    a = WireGuard(a_key, now=trio.current_time(), packet_events=packet_events)
    b = WireGuard(b_key, now=trio.current_time(), packet_events=packet_events)
    a_events: list[Any] = []
    b_got: list[tuple[NodePublic, bytes]] = []
    all_arrived = trio.Event()
    pkts = [udp("100.64.0.1", "100.64.0.2", 1000, 2000, b"x" * n) for n in (0, 1, 100, 1252)]

    def on_b_packet(peer: NodePublic, pkt: bytes) -> None:
        b_got.append((peer, pkt))
        if len(b_got) == len(pkts):
            all_arrived.set()

    drv_a = WireGuardUDP(a, bind=("127.0.0.1", 0), on_event=a_events.append)
    drv_b = WireGuardUDP(b, bind=("127.0.0.1", 0), on_packet=on_b_packet)
    a.add_peer(b_key.public, endpoint=drv_b.local_address)
    b.add_peer(a_key.public)  # b learns a's endpoint from the handshake (roaming)
    a_addr = drv_a.local_address
    async with trio.open_nursery() as nursery:
        await nursery.start(drv_a.run)
        await nursery.start(drv_b.run)
        drv_a.send_packet(b_key.public, pkts[0])  # staged until the handshake completes
        drv_a.send_packets(b_key.public, pkts[1:])
        with trio.fail_after(5):
            await all_arrived.wait()
        assert b_got == [(a_key.public, p) for p in pkts]
        drv_b.send_packet(a_key.public, pkts[2])
        with trio.fail_after(5):
            ev = await drv_a.packets.receive()
        assert ev == PacketReceived(b_key.public, pkts[2])
        nursery.cancel_scope.cancel()
    assert [e for e in a_events if isinstance(e, HandshakeCompleted)] == [HandshakeCompleted(b_key.public, True)]
    assert b.peer_status(a_key.public).endpoint == a_addr
