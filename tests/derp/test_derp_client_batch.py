"""The DERP client's batched data path: whole reads become one packet batch, sends coalesce.

The sans-IO tests feed the core directly; the live tests run a DerpClient against a
scripted server on loopback (so the bytes on the wire are exactly what the test wrote)
and against the real DerpServer, and check the magicsock driver plumbing.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.derp import frames as f
from tsnet.derp.client import DerpClient, DerpNode, DerpRegions
from tsnet.derp.client_core import ClientState, DerpClientProtocol, ReceivedPacket, ServerInfoReceived
from tsnet.derp.info import ServerInfo, seal_to
from tsnet.derp.server import DerpServer
from tsnet.key import NodePrivate, NodePublic

SERVER = NodePrivate.generate()


def connected(now: float = 0.0) -> DerpClientProtocol:
    key = NodePrivate.generate()
    proto = DerpClientProtocol(key, now)
    proto.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), now)
    proto.data_to_send()
    sealed = seal_to(SERVER.raw, key.public.raw, ServerInfo().to_json())
    events = proto.receive_data(f.encode_frame(f.ServerInfoFrame(sealed)), now)
    assert isinstance(events[0], ServerInfoReceived) and proto.state is ClientState.CONNECTED
    return proto


def plain_node(port: int) -> DerpNode:
    return DerpNode("1a", 1, "127.0.0.1", ipv4="127.0.0.1", ipv6="none", derp_port=port, plain_http=True)


# --- sans-IO core --------------------------------------------------------------------------------


def test_one_chunk_of_many_frames_gives_every_packet_in_order_with_shared_source_keys():
    proto = connected()
    a, b = NodePrivate.generate().public, NodePrivate.generate().public
    wire = b"".join(f.encode_frame(f.RecvPacket((a if i % 3 else b).raw, bytes([i]) * 1200)) for i in range(200))
    events = proto.receive_data(wire, 1.0)
    assert [ev.packet for ev in events] == [bytes([i]) * 1200 for i in range(200)]
    assert [ev.src for ev in events] == [a if i % 3 else b for i in range(200)]
    assert all(type(ev.packet) is bytes for ev in events)
    # One key object per source, not one per frame.
    assert len({id(ev.src) for ev in events}) == 2


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=20 * 1300), max_size=12),
       sizes=st.lists(st.integers(min_value=0, max_value=1300), min_size=1, max_size=20))
def test_frames_split_anywhere_across_reads_come_out_whole(cuts, sizes):
    proto = connected()
    src = NodePrivate.generate().public
    packets = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    wire = b"".join(f.encode_frame(f.RecvPacket(src.raw, p)) for p in packets)
    got = []
    last = 0
    for cut in sorted({c for c in cuts if c < len(wire)}) + [len(wire)]:
        got += proto.receive_data(memoryview(wire)[last:cut], 1.0)
        last = cut
    assert got == [ReceivedPacket(src, p) for p in packets]


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=12 * 3010), max_size=15),
       use_drain=st.booleans(), double_feed=st.booleans())
def test_frame_reader_any_chunking_any_api_gives_the_same_frames(sizes, cuts, use_drain, double_feed):
    frames = [(i % 0x16 or 0x05, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
    wire = b"".join(f.encode_header(t, len(p)) + p for t, p in frames)
    reader = f.FrameReader()
    bounds = sorted({c for c in cuts if 0 < c < len(wire)}) + [len(wire)]
    got = []
    last = 0
    for i, cut in enumerate(bounds):
        reader.feed(wire[last:cut])
        last = cut
        if double_feed and i % 2 == 0 and cut != len(wire):
            continue  # feed twice before parsing: the reader merges
        if use_drain:
            got += [(t, bytes(p)) for t, p in reader.drain()]
        else:
            while (item := reader.next_frame()) is not None:
                got.append((item[0], bytes(item[1])))
    got += [(t, bytes(p)) for t, p in reader.drain()]
    assert got == frames
    assert reader.buffered == 0 and reader.take_rest() == b""


def test_frame_reader_parses_a_chunk_in_place_and_copies_only_a_straddling_frame():
    frame = f.encode_header(5, 100) + bytes(100)
    first = frame * 3 + frame[:50]
    second = frame[50:] + frame * 3
    reader = f.FrameReader()
    reader.feed(first)
    got = reader.drain()
    assert len(got) == 3 and all(p.obj is first for _, p in got)  # no copy of the chunk
    assert reader.buffered == 50
    reader.feed(second)
    got = reader.drain()
    assert len(got) == 4
    assert got[0][1].obj is not second and len(got[0][1].obj) == len(frame)  # just the straddling frame
    assert all(p.obj is second for _, p in got[1:])
    with pytest.raises(f.DerpProtocolError):
        reader.feed(f.encode_header(5, f.MAX_INFO_LEN + 1))
        reader.drain()


def test_source_key_cache_is_bounded_and_stays_correct():
    proto = connected()
    keys = [NodePrivate.generate().public for _ in range(1100)]
    wire = b"".join(f.encode_frame(f.RecvPacket(k.raw, b"x")) for k in keys + keys[:5])
    events = proto.receive_data(wire, 1.0)
    assert [ev.src for ev in events] == keys + keys[:5]
    assert len(proto._src_keys) <= 1024


def test_sends_coalesce_into_one_buffer_and_mutable_packets_are_copied():
    proto = connected()
    dst = NodePrivate.generate().public
    buf = bytearray(b"first")
    assert proto.send_packet(dst, buf, 1.0)
    buf[:] = b"XXXXX"  # the caller reuses its buffer: the queued frame must not change
    assert proto.send_packet(dst.raw, b"second", 1.0)
    assert proto.send_packet(dst, memoryview(b"third"), 1.0)
    proto.send_ping(1.0, data=b"12345678")
    assert proto.pending_frames == 3  # SendPackets only
    want = (f.encode_frame(f.SendPacket(dst.raw, b"first")) + f.encode_frame(f.SendPacket(dst.raw, b"second"))
            + f.encode_frame(f.SendPacket(dst.raw, b"third")) + f.encode_frame(f.Ping(b"12345678")))
    assert proto.pending_bytes == len(want)
    assert proto.data_to_send() == want
    assert proto.pending_frames == 0 and proto.pending_bytes == 0 and proto.data_to_send() == b""


# --- live: a scripted server on loopback -----------------------------------------------------------


class Upstream:
    """What the scripted server received after the handshake; ``arrived`` fires at ``want`` bytes."""

    def __init__(self, want: int = 0) -> None:
        self.data = bytearray()
        self.want = want
        self.arrived = trio.Event()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if self.want and len(self.data) >= self.want:
            self.arrived.set()


async def scripted_server(listener: trio.SocketListener, burst: bytes, up: Upstream) -> None:
    """Accept one client, do the DERP handshake, send ``burst`` in one write, collect what it sends
    until the client goes away (or the test cancels)."""
    stream = await listener.accept()
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(65536)
    buf = buf.split(b"\r\n\r\n", 1)[1]
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                          + f.encode_frame(f.ServerKey(SERVER.public.raw)))
    reader = f.FrameReader()
    reader.feed(buf)
    while (item := reader.next_frame()) is None:
        reader.feed(await stream.receive_some(65536))
    ftype, payload = item
    assert ftype == f.FrameType.CLIENT_INFO
    client_key = bytes(payload[:32])
    await stream.send_all(f.encode_frame(f.ServerInfoFrame(seal_to(SERVER.raw, client_key, ServerInfo().to_json())))
                          + burst)
    rest = reader.take_rest()
    async with stream:
        while True:
            if rest:
                up.add(rest)
            rest = await stream.receive_some(65536)
            if not rest:
                return


async def test_a_burst_arrives_in_few_synchronous_batches_and_not_on_the_event_channel():
    src = NodePrivate.generate().public
    packets = [i.to_bytes(2, "big") * 600 for i in range(100)]
    burst = b"".join(f.encode_frame(f.RecvPacket(src.raw, p)) for p in packets)
    batches: list[list[ReceivedPacket]] = []
    got_all = trio.Event()

    def on_packets(batch: list[ReceivedPacket]) -> None:
        batches.append(batch)
        if sum(map(len, batches)) == len(packets):
            got_all.set()

    async with trio.open_nursery() as n:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        n.start_soon(scripted_server, listener, burst, Upstream())
        client = DerpClient(NodePrivate.generate(), plain_node(port), on_packets=on_packets)
        n.start_soon(client.run)
        with trio.fail_after(10):
            await got_all.wait()
        assert [ev.packet for batch in batches for ev in batch] == packets
        assert all(ev.src == src for batch in batches for ev in batch)
        # ~120 KB in one server write: a handful of socket reads, each handed over as one batch.
        assert len(batches) <= client.reads and len(batches) < 10
        ev = client.events.receive_nowait()  # only the handshake event is on the channel
        assert isinstance(ev, ServerInfoReceived)
        try:
            extra = client.events.receive_nowait()
        except trio.WouldBlock:
            extra = None
        assert extra is None
        client.close()
        n.cancel_scope.cancel()


async def test_send_many_leaves_as_one_write_and_a_raising_handler_does_not_kill_the_connection():
    src = NodePrivate.generate().public
    burst = f.encode_frame(f.RecvPacket(src.raw, b"boom"))
    called = trio.Event()

    def on_packets(batch):
        called.set()
        raise RuntimeError("handler bug")

    dst = NodePrivate.generate().public
    want = b"".join(f.encode_frame(f.SendPacket(dst.raw, bytes([i]) * 100)) for i in range(50))
    async with trio.open_nursery() as n:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        up = Upstream(want=len(want))
        n.start_soon(scripted_server, listener, burst, up)
        client = DerpClient(NodePrivate.generate(), plain_node(port), on_packets=on_packets)
        n.start_soon(client.run)
        with trio.fail_after(10):
            await client.wait_connected()
            await called.wait()
        writes = client.writes
        assert client.send_many([(dst, bytes([i]) * 100) for i in range(50)]) == 50
        with trio.fail_after(10):
            await up.arrived.wait()
        assert bytes(up.data) == want
        assert client.writes == writes + 1
        assert client.connected and client.connects == 1
        client.close()
        n.cancel_scope.cancel()


async def test_send_many_over_the_limit_drops_and_counts():
    async with trio.open_nursery() as n:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        n.start_soon(scripted_server, listener, b"", Upstream())
        client = DerpClient(NodePrivate.generate(), plain_node(port))
        client.max_pending_frames = 10
        n.start_soon(client.run)
        with trio.fail_after(10):
            await client.wait_connected()
        dst = NodePrivate.generate().public
        assert client.send_many([(dst, b"p")] * 25) == 10  # no checkpoint in between: the writer has not run
        assert client.dropped_sends == 15
        client.close()
        n.cancel_scope.cancel()


# --- live: the real server, regions and the magicsock driver ------------------------------------------


async def test_regions_on_packets_batches_per_region_and_send_many_groups_by_region():
    async with trio.open_nursery() as n:
        server = DerpServer()
        port = await n.start(server.serve_tcp, "127.0.0.1", 0)
        got: list[tuple[int, list[ReceivedPacket]]] = []
        enough = trio.Event()

        def on_packets(region, batch):
            got.append((region, batch))
            if sum(len(b) for _, b in got) >= 40:
                enough.set()

        peer = DerpClient(NodePrivate.generate(), plain_node(port))
        n.start_soon(peer.run)
        regions = DerpRegions(NodePrivate.generate(), {1: [plain_node(port)]}, on_packets=on_packets)
        await n.start(regions.run)
        regions.set_home(1)
        with trio.fail_after(10):
            await peer.wait_connected()
            await regions.clients[1].wait_connected()
        me = regions.clients[1].private_key.public
        assert peer.send_many([(me, b"%03d" % i) for i in range(40)]) == 40
        with trio.fail_after(10):
            await enough.wait()
        assert {region for region, _ in got} == {1}
        assert [ev.packet for _, batch in got for ev in batch] == [b"%03d" % i for i in range(40)]
        assert len(got) < 40  # batched, not one call per packet
        # Outbound: unknown regions are dropped, the rest reach the peer in order.
        queued = regions.send_many([(1, peer.private_key.public, b"a"), (9, peer.private_key.public, b"lost"),
                                    (1, peer.private_key.public, bytearray(b"b"))])
        assert queued == 2
        seen = []
        with trio.fail_after(10):
            async for ev in peer.events:
                if isinstance(ev, ReceivedPacket):
                    seen.append(ev.packet)
                    if len(seen) == 2:
                        break
        assert seen == [b"a", b"b"]
        n.cancel_scope.cancel()


async def test_magicsock_driver_hands_a_derp_batch_to_the_core_and_pumps_once():
    from tsnet.magicsock.driver import MagicSockDriver

    driver = MagicSockDriver(NodePrivate.generate(), bind_v4="127.0.0.1", bind_v6=None)
    assert driver.regions.on_packets == driver._receive_derp_batch
    seen: list[tuple[int, NodePublic, bytes]] = []
    pumps = []
    driver.core.receive_derp_batch = lambda items, now: seen.extend(items)  # type: ignore[method-assign]
    driver._pump = lambda: pumps.append(len(seen))  # type: ignore[method-assign]
    src = NodePrivate.generate().public
    driver._receive_derp_batch(3, [ReceivedPacket(src, b"one"), ReceivedPacket(src, b"two")])
    assert seen == [(3, src, b"one"), (3, src, b"two")]
    assert pumps == [2]  # once, after the whole batch
    assert driver.counters["derp_received"] == 2 and driver.counters["derp_receive_batches"] == 1


async def test_writer_gives_up_on_a_stalled_write_but_not_while_idle(autojump_clock):
    import trio.testing

    from tsnet.derp.client import WRITE_TIMEOUT

    client = DerpClient(NodePrivate.generate(), plain_node(1))
    proto = connected()
    stalled, _peer = trio.testing.lockstep_stream_pair()  # nobody reads the other end
    start = trio.current_time()
    timed_out = False
    try:
        async with trio.open_nursery() as n:
            n.start_soon(client._writer, stalled, proto)
            await trio.sleep(3 * WRITE_TIMEOUT)  # idle: no deadline is armed while nothing is queued
            assert client.writes == 0
            proto.send_packet(NodePrivate.generate().public, b"stuck", trio.current_time())
            client._wake.set()
            await trio.sleep_forever()
    except* trio.TooSlowError:
        timed_out = True
    assert timed_out
    assert trio.current_time() - start == pytest.approx(4 * WRITE_TIMEOUT)
    assert client.writes == 1
