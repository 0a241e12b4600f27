"""Server driver timers under trio's MockClock, over in-memory streams (no sleeps, no sockets)."""

import trio
import trio.testing

from tsnet.derp import frames as f
from tsnet.derp.client_core import DerpClientProtocol, KeepAliveReceived, ServerInfoReceived
from tsnet.derp.server import DerpServer, upgrade_response
from tsnet.key import NodePrivate


async def read_exactly(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, "stream closed early"
        buf += chunk
    return buf


async def test_keepalive_sent_on_idle_connection(autojump_clock):
    server = DerpServer()
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(server.run_connection, server_end, b"", ("127.0.0.1", 1))
        head = upgrade_response(server.public_key.raw)
        assert await read_exactly(client_end, len(head)) == head
        proto = DerpClientProtocol(NodePrivate.generate(), trio.current_time())
        proto.receive_data(await read_exactly(client_end, 45), trio.current_time())
        await client_end.send_all(proto.data_to_send())
        events = proto.receive_data(await read_exactly(client_end, 5 + 24 + 16 + 13), trio.current_time())
        assert isinstance(events[0], ServerInfoReceived)
        start = trio.current_time()
        frame = await read_exactly(client_end, 5)
        waited = trio.current_time() - start
        assert frame == b"\x06\x00\x00\x00\x00"
        assert 50.0 <= waited <= 60.0  # within derper's cadence, never later than 60 s
        assert proto.receive_data(frame, trio.current_time()) == [KeepAliveReceived()]
        n.cancel_scope.cancel()


async def test_handshake_timeout_closes_silent_connection(autojump_clock):
    server = DerpServer()
    client_end, server_end = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await server.run_connection(server_end, b"", None)  # returns when the server gives up
    await server_end.aclose()  # the owner of the stream (serve_stream or the embedder) closes it
    assert 10.0 <= trio.current_time() - start < 11.0
    assert server.counters.current_connections == 0
    data = b""
    while chunk := await client_end.receive_some(4096):
        data += chunk
    assert data.endswith(f.encode_frame(f.ServerKey(server.public_key.raw)))


async def test_write_timeout_drops_stuck_client(autojump_clock):
    """A client that stops reading is cut off after the write timeout; its queued packets count as drops."""
    server = DerpServer(write_timeout=2.0)
    stuck_end, stuck_server_end = trio.testing.lockstep_stream_pair()  # no buffering at all
    async with trio.open_nursery() as n:
        sender_end, sender_server_end = trio.testing.memory_stream_pair()
        key = NodePrivate.generate()
        stuck = DerpClientProtocol(key, 0.0)
        # Pipeline the stuck client's handshake, then never read again.
        n.start_soon(server.run_connection, stuck_server_end, b"", None)
        head = upgrade_response(server.public_key.raw)
        stuck.receive_data((await read_exactly(stuck_end, len(head) + 45))[len(head):], 0.0)
        await stuck_end.send_all(stuck.data_to_send())
        with trio.move_on_after(1):
            while server.counters.clients < 1:
                await trio.sleep(0.01)
        assert server.counters.clients == 1
        n.start_soon(server.run_connection, sender_server_end, b"", None)
        sender = DerpClientProtocol(NodePrivate.generate(), 0.0)
        sender.receive_data((await read_exactly(sender_end, len(head) + 45))[len(head):], 0.0)
        await sender_end.send_all(sender.data_to_send())
        for _ in range(5):
            sender.send_packet(key.public, b"x" * 100, 0.0)
        await sender_end.send_all(sender.data_to_send())
        with trio.fail_after(30):
            while server.counters.clients != 1:
                await trio.sleep(0.1)
        assert server.counters.drops["write_error"] >= 1
        n.cancel_scope.cancel()
