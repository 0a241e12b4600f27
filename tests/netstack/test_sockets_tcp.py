"""TCP streams and listeners on two NetStacks joined in memory."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing

from tests.netstack.netutil import A4, A6, B4, B6, netstack_pair
from tsnet.netstack.sockets import TCPListener, TCPStream
from tsnet.netstack.tcp import TCPOptions


async def echo_handler(stream: TCPStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


@pytest.mark.parametrize("a_ip,b_ip", [(A4, B4), (A6, B6)])
async def test_echo(a_ip: str, b_ip: str) -> None:
    async with netstack_pair() as (a, b, _link):
        listener = await b.open_tcp_listener(7)
        assert listener.port == 7 and isinstance(listener, TCPListener)
        async with trio.open_nursery() as nursery:
            async def serve_one() -> None:
                stream = await listener.accept()
                assert stream.remote_address[0] == a_ip
                await echo_handler(stream)

            nursery.start_soon(serve_one)
            with trio.fail_after(10):
                stream = await a.open_tcp_stream(b_ip, 7, timeout=5)
                assert stream.remote_address == (b_ip, 7)
                assert stream.local_address[0] == a_ip
                for msg in (b"hello", b"x" * 5000, b"bye"):
                    await stream.send_all(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += await stream.receive_some()
                    assert got == msg
                await stream.send_eof()
                assert await stream.receive_some() == b""
                await stream.aclose()
        await listener.aclose()


async def test_large_transfer_sha256() -> None:
    payload = os.urandom(3 * 1024 * 1024)
    async with netstack_pair() as (a, b, _link):
        listener = await b.open_tcp_listener(9000)
        digest_seen: list[str] = []

        async def sink() -> None:
            stream = await listener.accept()
            h = hashlib.sha256()
            n = 0
            while data := await stream.receive_some(1 << 20):
                h.update(data)
                n += len(data)
            digest_seen.append(h.hexdigest())
            await stream.send_all(n.to_bytes(8, "big"))
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink)
            with trio.fail_after(60):
                stream = await a.open_tcp_stream(B4, 9000)
                view = memoryview(payload)
                for i in range(0, len(payload), 256 * 1024):
                    await stream.send_all(view[i:i + 256 * 1024])
                await stream.send_eof()
                got = b""
                while data := await stream.receive_some():
                    got += data
                await stream.aclose()
        assert int.from_bytes(got, "big") == len(payload)
        assert digest_seen == [hashlib.sha256(payload).hexdigest()]


async def _connected_pair(a, b, port: int) -> tuple[TCPStream, TCPStream]:
    listener = await b.open_tcp_listener(port)
    async with trio.open_nursery() as nursery:
        accepted: list[TCPStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await a.open_tcp_stream(B4, port)
    await listener.aclose()
    return client, accepted[0]


async def test_check_half_closeable_stream() -> None:
    # No delayed ACK: once all tasks are blocked, nothing is pending that could unclog the path later.
    small = TCPOptions(send_buffer=4096, recv_buffer=4096, recv_buffer_max=4096, delayed_ack=0.0)
    async with netstack_pair() as (a, b, _link), netstack_pair(small) as (ca, cb, _clink):
        ports = iter(range(10000, 20000))

        async def maker() -> tuple[TCPStream, TCPStream]:
            return await _connected_pair(a, b, next(ports))

        async def clogged() -> tuple[TCPStream, TCPStream]:
            s1, s2 = await _connected_pair(ca, cb, next(ports))
            # Fill both directions (nobody reads yet) so the next send_all blocks.
            for s in (s1, s2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(s.send_all, b"c" * (1 << 20))
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()
            return s1, s2

        with trio.fail_after(20):
            await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_serve_listeners() -> None:
    async with netstack_pair() as (a, b, _link):
        listener = await b.open_tcp_listener(80)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            with trio.fail_after(10):
                for i in range(3):
                    s = await a.open_tcp_stream(B6, 80)
                    await s.send_all(b"req %d" % i)
                    assert await s.receive_some() == b"req %d" % i
                    await s.aclose()
            nursery.cancel_scope.cancel()


async def test_connect_refused() -> None:
    async with netstack_pair() as (a, _b, _link):
        with trio.fail_after(5), pytest.raises(ConnectionRefusedError):
            await a.open_tcp_stream(B4, 81, timeout=5)
        assert not a.stack.connections


async def test_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with netstack_pair() as (a, _b, _link):
        # 100.64.0.99 is nobody: B drops the SYNs as not addressed to it.
        with pytest.raises(TimeoutError):
            await a.open_tcp_stream("100.64.0.99", 80, timeout=3)
        assert not a.stack.connections
        # Without a timeout, the SYN retries run out (about 127 s of virtual time).
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            await a.open_tcp_stream("100.64.0.99", 80)
        assert trio.current_time() - start > 60


async def test_connect_rejects_names() -> None:
    async with netstack_pair() as (a, _b, _link):
        with pytest.raises(ValueError):
            await a.open_tcp_stream("example.com", 80)


async def test_reset_becomes_broken_resource() -> None:
    async with netstack_pair() as (a, b, _link):
        client, server = await _connected_pair(a, b, 5000)
        await client.send_all(b"unread")
        await trio.testing.wait_all_tasks_blocked()  # the link has delivered everything
        assert server.connection.readable == 6
        await server.aclose()  # unread data: RST
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as exc:
            while True:
                await client.receive_some()
        assert isinstance(exc.value.__cause__, ConnectionResetError)
        await client.aclose()


async def test_500_concurrent_short_connections() -> None:
    async with netstack_pair() as (a, b, _link):
        listener = await b.open_tcp_listener(443, backlog=1024)
        done = 0

        async def client(i: int) -> None:
            nonlocal done
            s = await a.open_tcp_stream(B4, 443, timeout=30)
            await s.send_all(b"n%d" % i)
            await s.send_eof()
            got = b""
            while data := await s.receive_some():
                got += data
            assert got == b"n%d" % i
            await s.aclose()
            done += 1

        async with trio.open_nursery() as server_nursery:
            server_nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for i in range(500):
                        nursery.start_soon(client, i)
            server_nursery.cancel_scope.cancel()
        assert done == 500


async def test_keepalive_detects_dead_peer(autojump_clock: trio.testing.MockClock) -> None:
    async with netstack_pair() as (a, b, link):
        client, server = await _connected_pair(a, b, 6000)
        client.set_nagle(True)
        assert client.connection.options.nagle
        client.set_keepalive(10.0, interval=1.0, count=3)
        start = trio.current_time()
        link.drop_filter = lambda packet: True  # the peer vanishes silently
        with pytest.raises(trio.BrokenResourceError) as exc:
            await client.receive_some()
        assert isinstance(exc.value.__cause__, TimeoutError)
        assert 12.0 <= trio.current_time() - start <= 20.0
        await client.aclose()
        await server.aclose()


async def test_loopback_to_our_own_address() -> None:
    """Connections and datagrams to our own addresses are answered inside the stack."""
    async with netstack_pair() as (a, _b, link):
        listener = await a.open_tcp_listener(8080)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, echo_handler, [listener])
            with trio.fail_after(10):
                for host in (A4, A6):
                    s = await a.open_tcp_stream(host, 8080)
                    await s.send_all(b"self " * 1000)
                    got = b""
                    while len(got) < 5000:
                        got += await s.receive_some()
                    assert got == b"self " * 1000
                    await s.aclose()
                u1 = await a.open_udp_socket(port=99)
                u2 = await a.open_udp_socket()
                await u2.sendto(b"to myself", (A4, 99))
                assert await u1.recvfrom() == (b"to myself", (A4, u2.getsockname()[1]))
            nursery.cancel_scope.cancel()
        assert link.packets == 0  # nothing left the node
        assert a.stack.counters.loopback_packets > 0


async def test_aclose_linger_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    small = TCPOptions(recv_buffer=8192, recv_buffer_max=8192)
    async with netstack_pair(small) as (a, b, _link):
        client, server = await _connected_pair(a, b, 7000)
        with trio.move_on_after(1):
            await client.send_all(b"z" * 100_000)  # the server never reads: the window closes
        start = trio.current_time()
        await client.aclose()
        assert trio.current_time() - start == pytest.approx(a.close_linger, abs=0.01)
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        await server.aclose()


async def test_transfer_over_a_lossy_link(autojump_clock: trio.testing.MockClock) -> None:
    """5% of packets (handshakes, data, ACKs, FINs) dropped at random: both directions still arrive intact."""
    import random

    rng = random.Random(1234)
    async with netstack_pair() as (a, b, link):
        dropped = 0

        def lossy(packet: bytes) -> bool:
            nonlocal dropped
            drop = rng.random() < 0.05
            dropped += drop
            return drop

        link.drop_filter = lossy
        listener = await b.open_tcp_listener(8443)
        up = os.urandom(300_000)
        down = os.urandom(200_000)
        got_up = bytearray()

        async def server() -> None:
            s = await listener.accept()
            async with trio.open_nursery() as n:
                n.start_soon(s.send_all, down)
                while data := await s.receive_some():
                    got_up.extend(data)
            await s.send_eof()
            await s.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with trio.fail_after(600):
                s = await a.open_tcp_stream(B4, 8443, timeout=60)
                got_down = bytearray()

                async def reader() -> None:
                    while data := await s.receive_some():
                        got_down.extend(data)

                async with trio.open_nursery() as n:
                    n.start_soon(reader)
                    await s.send_all(up)
                    await s.send_eof()
                await s.aclose()
        assert bytes(got_up) == up and bytes(got_down) == down
        assert dropped > 10  # ~450 packets (ACKs are coalesced per batch): about 22 expected
