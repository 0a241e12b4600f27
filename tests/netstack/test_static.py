"""Static-peer mode: two netstacks over our WireGuard on loopback UDP sockets."""

from __future__ import annotations

import hashlib
import os
import socket

import trio

from tsnet.key import NodePrivate
from tsnet.netstack.static import open_static_peer
from tsnet.wg.driver import open_udp_socket


async def test_two_static_peers_exchange_tcp_and_udp() -> None:
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    a_sock = open_udp_socket("127.0.0.1", 0)
    b_sock = open_udp_socket("127.0.0.1", 0)
    b_endpoint = b_sock.getsockname()
    payload = os.urandom(512 * 1024)
    async with (
        open_static_peer(b_key, a_key.public, addresses=["10.9.0.2", "fd00:9::2"], sock=b_sock) as b,
        open_static_peer(a_key, b_key.public, addresses=["10.9.0.1", "fd00:9::1"], sock=a_sock,
                         peer_endpoint=b_endpoint, persistent_keepalive=25) as a,
    ):
        listener = await b.open_tcp_listener(8000)

        async def serve() -> None:
            stream = await listener.accept()
            h = hashlib.sha256()
            while data := await stream.receive_some():
                h.update(data)
            await stream.send_all(h.digest())
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with trio.fail_after(30):
                # A initiates (it knows B's endpoint); the SYN waits for the WireGuard handshake.
                stream = await a.open_tcp_stream("10.9.0.2", 8000, timeout=10)
                await stream.send_all(payload)
                await stream.send_eof()
                digest = b""
                while data := await stream.receive_some():
                    digest += data
                await stream.aclose()
        assert digest == hashlib.sha256(payload).digest()

        # UDP over IPv6 the other way (B learnt A's endpoint from the handshake).
        ua = await a.open_udp_socket(port=53)
        ub = await b.open_udp_socket()
        with trio.fail_after(10):
            await ub.sendto(b"over wireguard", ("fd00:9::1", 53))
            data, addr = await ua.recvfrom()
        assert data == b"over wireguard" and addr == ("fd00:9::2", ub.getsockname()[1])
    # Everything is closed on exit, including the sockets handed over.
    assert a_sock.fileno() == -1 and b_sock.fileno() == -1
    assert isinstance(a_sock, socket.socket)


async def test_data_survives_the_sender_stopping_right_after_aclose() -> None:
    """aclose lingers until our data and FIN are acknowledged, so leaving the context loses nothing."""
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    a_sock = open_udp_socket("127.0.0.1", 0)
    b_sock = open_udp_socket("127.0.0.1", 0)
    payload = os.urandom(600 * 1024)
    received = bytearray()
    async with open_static_peer(b_key, a_key.public, addresses=["10.9.0.2"], sock=b_sock) as b:
        b.close_linger = 0.0  # A is gone by the time B closes: nobody will acknowledge B's FIN
        listener = await b.open_tcp_listener(9)
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                stream = await listener.accept()
                while data := await stream.receive_some():
                    received.extend(data)
                await stream.aclose()

            nursery.start_soon(reader)
            with trio.fail_after(30):
                async with open_static_peer(a_key, b_key.public, addresses=["10.9.0.1"], sock=a_sock,
                                            peer_endpoint=b_sock.getsockname()) as a:
                    stream = await a.open_tcp_stream("10.9.0.2", 9, timeout=10)
                    await stream.send_all(payload)
                    await stream.aclose()
                # A's stack, WireGuard and socket are gone now.
    assert bytes(received) == payload


async def test_leaving_the_context_resets_open_connections() -> None:
    a_key, b_key = NodePrivate.generate(), NodePrivate.generate()
    a_sock = open_udp_socket("127.0.0.1", 0)
    b_sock = open_udp_socket("127.0.0.1", 0)
    async with open_static_peer(b_key, a_key.public, addresses=["10.9.0.2"], sock=b_sock) as b:
        listener = await b.open_tcp_listener(9)
        with trio.fail_after(10):
            async with open_static_peer(a_key, b_key.public, addresses=["10.9.0.1"], sock=a_sock,
                                        peer_endpoint=b_sock.getsockname()) as a:
                client = await a.open_tcp_stream("10.9.0.2", 9, timeout=5)
                server = await listener.accept()
                await client.send_all(b"hi")
                assert await server.receive_some() == b"hi"
            # A left without closing: B's side is reset, not left hanging.
            try:
                await server.receive_some()
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, ConnectionResetError)
            else:
                raise AssertionError("expected a reset")
        await server.aclose()
