"""BatchTLSStream: the DERP client's batching TLS stream, against trio's TLS server side."""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio
import trio.testing

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


# --- edge cases from the DERP audit ------------------------------------------------------------------


async def test_handshake_started_from_two_tasks_at_once_runs_once():
    # The DERP driver starts its reader and writer together; both may reach the handshake first.
    async def echo(tls):
        while data := await tls.receive_some(1 << 16):
            await tls.send_all(data)

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, echo)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = BatchTLSStream.from_socket_stream(tcp, insecure_context(), None)
        got: list[bytes] = []

        async def reader():
            got.append(await client.receive_some())

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)  # no explicit do_handshake: both calls start it
                inner.start_soon(client.send_all, b"ping")
                inner.start_soon(client.do_handshake)
        assert got == [b"ping"]
        await client.aclose()
        n.cancel_scope.cancel()


async def test_failed_handshake_fails_every_task_waiting_for_it():
    async def handler(tls):
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = BatchTLSStream.from_socket_stream(tcp, ssl.create_default_context(), "derp.example")
        errors: list[BaseException] = []

        async def attempt(op):
            try:
                await op()
            except ssl.SSLError as exc:
                errors.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(attempt, client.receive_some)
                inner.start_soon(attempt, lambda: client.send_all(b"x"))
        assert len(errors) == 2
        await client.aclose()


async def test_tls_output_left_by_a_receive_is_sent_while_the_receive_waits():
    # A TLS record the stream produced outside send_all (a receive answering a TLS 1.3 KeyUpdate)
    # that the socket could not take at once must not wait for the next send_all: a DERP client may
    # not send for minutes. Python's ssl cannot make a peer send KeyUpdate, so the test builds the
    # same state directly: a record left in the stream's send buffer with the socket full, no
    # send_all running, and one task waiting in receive_some.
    bulk = os.urandom(16 * 1024 * 1024)  # far more than loopback socket buffers hold
    go = trio.Event()

    async def handler(tls):
        await tls.do_handshake()
        await go.wait()
        data, _ = await receive_exactly(tls, len(bulk))
        assert data == bulk
        await tls.send_all(b"all received")
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        client = await connect(port)
        client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        client._tls.write(bulk)
        client._push_socket()
        assert client._send_buf and not client._sending  # the socket did not take it all
        go.set()
        with trio.fail_after(20):
            assert await client.receive_some() == b"all received"
        assert not client._send_buf
        # The stream still works both ways after that.
        with trio.fail_after(10):
            await client.send_all(b"after")
        await client.aclose()
        n.cancel_scope.cancel()


async def test_send_all_takes_over_from_a_receive_that_is_flushing():
    bulk = os.urandom(16 * 1024 * 1024)
    more = os.urandom(1024 * 1024)
    go = trio.Event()

    async def handler(tls):
        await tls.do_handshake()
        await go.wait()
        data, _ = await receive_exactly(tls, len(bulk) + len(more))
        assert data == bulk + more
        await tls.send_all(b"ok")
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        client = await connect(port)
        client._tls.write(bulk)
        client._push_socket()
        assert client._send_buf
        got: list[bytes] = []

        async def reader():
            got.append(await client.receive_some())

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()  # the reader now waits, flushing
                go.set()
                await client.send_all(more)  # must not collide with the reader's wait for writability
                await client.wait_send_all_might_not_block()
        assert got == [b"ok"]
        await client.aclose()
        n.cancel_scope.cancel()


async def test_closing_while_a_receive_waits_and_flushes_raises_closed_resource_error():
    async def handler(tls):
        await tls.do_handshake()
        await trio.sleep_forever()  # never reads: our output stays buffered

    async with trio.open_nursery() as n:
        port = await n.start(serve_one, handler)
        client = await connect(port)
        client._tls.write(os.urandom(16 * 1024 * 1024))
        client._push_socket()
        assert client._send_buf
        raised: list[BaseException] = []

        async def reader():
            try:
                await client.receive_some()
            except trio.ClosedResourceError as exc:  # plain, not wrapped in an exception group
                raised.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert client._receive_flush_scope is not None  # the receive is pushing output
                await client.aclose()
        assert len(raised) == 1
        n.cancel_scope.cancel()
