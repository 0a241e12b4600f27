"""BatchTLSStream: the DERP client's batching TLS stream, against trio's TLS server side."""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio

from tsnet.derp.tls import BatchTLSStream, generate_self_signed, server_ssl_context

CERT = generate_self_signed("127.0.0.1")


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def serve_one(handler, task_status=trio.TASK_STATUS_IGNORED):
    """A TLS listener on loopback that runs ``handler(ssl_stream)`` for one connection."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    task_status.started(listener.socket.getsockname()[1])
    stream = await listener.accept()
    await listener.aclose()
    tls = trio.SSLStream(stream, server_ssl_context(self_signed=CERT), server_side=True)
    try:
        await handler(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def connect(port: int, ctx: ssl.SSLContext | None = None, sni: str | None = None) -> BatchTLSStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = BatchTLSStream.from_socket_stream(tcp, ctx or insecure_context(), sni)
    await tls.do_handshake()
    return tls


async def receive_exactly(stream, n: int) -> tuple[bytes, list[int]]:
    got = bytearray()
    sizes = []
    while len(got) < n:
        chunk = await stream.receive_some(1 << 20)
        assert chunk, "unexpected EOF"
        sizes.append(len(chunk))
        got += chunk
    return bytes(got), sizes


async def test_one_receive_returns_every_waiting_record_not_just_one():
    payload = os.urandom(48 * 1024)  # three 16 KiB records
    sent = trio.Event()

    async def handler(tls):
        await tls.send_all(payload)
        sent.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        client = await connect(port)
        with trio.fail_after(10):
            await sent.wait()
            data, sizes = await receive_exactly(client, len(payload))
        assert data == payload
        assert max(sizes) > 16384  # trio.SSLStream would hand these over one record at a time
        assert client.getpeercert(binary_form=True) == CERT.cert_der
        # The socket taken over from trio keeps TCP_NODELAY: small frames (ACKs, pongs) are not held back.
        assert client._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await client.aclose()
        n.cancel_scope.cancel()


async def test_concurrent_send_and_receive_keep_both_directions_intact():
    up = os.urandom(3 * 1024 * 1024 + 17)

    async def echo(tls):
        while data := await tls.receive_some(1 << 18):
            await tls.send_all(data)

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, echo)
        client = await connect(port)
        back: list[bytes] = []

        async def reader():
            data, _ = await receive_exactly(client, len(up))
            back.append(data)

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                view = memoryview(up)
                for i in range(0, len(up), 100_000):  # many writes while the reader runs
                    await client.send_all(view[i:i + 100_000])
        assert back == [up]
        await client.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        n.cancel_scope.cancel()


@pytest.mark.parametrize("graceful", [True, False])
async def test_server_close_reads_as_eof_after_the_data(graceful):
    async def handler(tls):
        await tls.send_all(b"last words")
        if graceful:
            await tls.aclose()  # close_notify
        else:
            await trio.aclose_forcefully(tls.transport_stream)  # TCP FIN without close_notify

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        client = await connect(port)
        got = b""
        with trio.fail_after(10):
            while chunk := await client.receive_some():
                got += chunk
        assert got == b"last words"
        assert await client.receive_some() == b""
        await client.aclose()


async def test_certificate_verification_failure_raises_ssl_error():
    async def handler(tls):
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = BatchTLSStream.from_socket_stream(tcp, ssl.create_default_context(), "derp.example")
        with trio.fail_after(10), pytest.raises(ssl.SSLError):
            await client.do_handshake()
        await client.aclose()


async def test_handshake_against_a_server_that_hangs_up_raises():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def hang_up():
        stream = await listener.accept()
        await stream.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(hang_up)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = BatchTLSStream.from_socket_stream(tcp, insecure_context(), None)
        with trio.fail_after(10), pytest.raises((ssl.SSLError, OSError)):
            await client.do_handshake()
        await client.aclose()
    await listener.aclose()


async def test_server_side_handshakes_on_first_read_and_talks_to_trio_ssl_clients():
    payload = os.urandom(200_000)
    result: list[bytes] = []

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        task_status.started(listener.socket.getsockname()[1])
        tcp = await listener.accept()
        await listener.aclose()
        server = BatchTLSStream.from_socket_stream(tcp, server_ssl_context(self_signed=CERT), server_side=True)
        data, _ = await receive_exactly(server, len(payload))  # no explicit do_handshake
        result.append(data)
        await server.send_all(data[::-1])
        await server.aclose()

    async with trio.open_nursery() as n:
        port = await n.start(serve)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = trio.SSLStream(tcp, insecure_context(), server_hostname="127.0.0.1")
        with trio.fail_after(20):
            await client.send_all(payload)
            back, _ = await receive_exactly(client, len(payload))
        assert result == [payload] and back == payload[::-1]
        await trio.aclose_forcefully(client)
