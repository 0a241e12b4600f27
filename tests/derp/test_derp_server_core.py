"""The sans-IO server core: routing, duplicates, PeerGone, queues, rate limits, verification, mesh, fuzzing."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derp_helpers import Pair, pump_all
from tsnet.derp import frames as f
from tsnet.derp.client_core import PeerGoneEvent, PeerPresentEvent, ReceivedPacket, ServerInfoReceived
from tsnet.derp.server_core import ConnState, DerpServerCore
from tsnet.key import NodePrivate

DISCO = f.DISCO_MAGIC + bytes(56)  # 62 bytes: shaped like disco


def make_core(**kw):
    return DerpServerCore(NodePrivate.generate().raw, **kw)


def test_handshake_sends_serverkey_then_serverinfo():
    core = make_core()
    p = Pair(core)
    first = p.conn.data_to_send(0.0)
    assert first == f.encode_frame(f.ServerKey(core.public_key))
    p.proto.receive_data(first, 0.0)
    p.conn.receive_data(p.proto.data_to_send(), 0.0)
    assert p.conn.state is ConnState.ACTIVE and core.counters.clients == 1
    evs = p.proto.receive_data(p.conn.data_to_send(0.0), 0.0)
    assert isinstance(evs[0], ServerInfoReceived) and evs[0].info.version == 2


def test_two_clients_exchange_and_peer_gone():
    core = make_core()
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    a.proto.send_packet(b.pub, b"to-b", 0.0)
    b.proto.send_packet(a.pub, b"to-a", 0.0)
    pump_all([a, b])
    assert b.take(ReceivedPacket) == [ReceivedPacket(a.pub, b"to-b")]
    assert a.take(ReceivedPacket) == [ReceivedPacket(b.pub, b"to-a")]
    a.conn.connection_lost()
    pump_all([b])
    assert b.take(PeerGoneEvent) == [PeerGoneEvent(a.pub, f.PeerGoneReason.DISCONNECTED)]
    assert core.counters.clients == 1 and core.counters.packets_relayed == 2


def test_unknown_destination_disco_gets_not_here_rate_limited():
    core = make_core()
    a = Pair(core)
    pump_all([a])
    nobody = NodePrivate.generate().public
    for _ in range(5):
        a.proto.send_packet(nobody, DISCO, 0.0)
    a.proto.send_packet(nobody, b"\x04wireguard", 0.0)
    pump_all([a])
    gone = a.take(PeerGoneEvent)
    assert gone == [PeerGoneEvent(nobody, f.PeerGoneReason.NOT_HERE)] * 3  # burst of 3, then 1/s
    assert core.counters.drops["unknown_dest"] == 6
    a.proto.send_packet(nobody, DISCO, 1.0)
    pump_all([a], now=1.0)
    assert len(a.take(PeerGoneEvent)) == 1


def test_duplicate_key_last_writer_is_active():
    core = make_core()
    key = NodePrivate.generate()
    first, second, peer = Pair(core, key), Pair(core, key), Pair(core)
    pump_all([first, second, peer])
    assert core.counters.dup_client_conns == 1 and core.counters.clients == 2
    peer.proto.send_packet(key.public, b"1", 0.0)
    pump_all([first, second, peer])
    assert second.take(ReceivedPacket) and not first.take(ReceivedPacket)  # newest is active
    first.proto.send_ping(0.0)  # any frame makes a duplicate active
    pump_all([first, second, peer])
    peer.proto.send_packet(key.public, b"2", 0.0)
    pump_all([first, second, peer])
    assert [e.packet for e in first.take(ReceivedPacket)] == [b"2"] and not second.take(ReceivedPacket)
    # Closing one of the duplicates is not a PeerGone; the survivor takes over.
    first.conn.connection_lost()
    pump_all([second, peer])
    assert not peer.take(PeerGoneEvent)
    peer.proto.send_packet(key.public, b"3", 0.0)
    pump_all([second, peer])
    assert [e.packet for e in second.take(ReceivedPacket)] == [b"3"]


def test_duplicates_survivor_follows_derpers_send_history():
    # derper's history starts with the connection that was active when the second one arrived and
    # then records each later registration and each duplicate that speaks (adjacent repeats collapsed).
    core = make_core()
    key = NodePrivate.generate()
    c1, c2, c3, c4, peer = Pair(core, key), Pair(core, key), Pair(core, key), Pair(core, key), Pair(core)
    pump_all([c1, c2, c3, c4, peer])  # history [c1, c3, c4]; c2 registered but is not in it
    c2.proto.note_preferred(True, 0.0)  # c2 speaks: active, history [c1, c3, c4, c2]
    dups = [c1, c2, c3, c4]

    def receiver(payload):
        peer.proto.send_packet(key.public, payload, 0.0)
        pump_all(dups + [peer])
        got = [p for p in dups if p.take(ReceivedPacket)]
        assert len(got) == 1
        return got[0]

    assert receiver(b"a") is c2
    c2.conn.connection_lost()
    assert receiver(b"b") is c4
    c4.conn.connection_lost()
    assert receiver(b"c") is c3
    c3.conn.connection_lost()  # one left: a plain connection again
    assert receiver(b"d") is c1 and not c1.conn.is_dup
    assert not core.counters.drops["dup_client"] and not peer.take(PeerGoneEvent)


def test_slow_consumer_queue_drops_oldest_and_counts():
    core = make_core(queue_depth=4)
    a, b, c, d = Pair(core), Pair(core), Pair(core), Pair(core)
    pump_all([a, b, c, d])
    for i in range(10):
        a.proto.send_packet(b.pub, bytes([i]) * 100, 0.0)  # b never drains
        a.conn.receive_data(a.proto.data_to_send(), 0.0)
        c.proto.send_packet(d.pub, bytes([i]), 0.0)
        c.conn.receive_data(c.proto.data_to_send(), 0.0)
        d.pump()
    assert [e.packet for e in d.take(ReceivedPacket)] == [bytes([i]) for i in range(10)]
    assert core.counters.drops["queue_head"] == 6
    b.pump()
    assert [e.packet[0] for e in b.take(ReceivedPacket)] == [6, 7, 8, 9]


def test_disco_has_its_own_queue():
    core = make_core(queue_depth=2)
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    for _ in range(5):
        a.proto.send_packet(b.pub, b"\x04wg", 0.0)
    a.proto.send_packet(b.pub, DISCO, 0.0)
    a.conn.receive_data(a.proto.data_to_send(), 0.0)
    b.pump()
    got = [e.packet for e in b.take(ReceivedPacket)]
    assert got[0] == DISCO and got.count(b"\x04wg") == 2


def test_rate_limit_drops_flood_only():
    burst = 5 + 32 + 65536
    core = make_core(rate_limit_bytes_per_sec=10_000, rate_limit_burst=burst)
    flooder, victim, x, y = Pair(core), Pair(core), Pair(core), Pair(core)
    pump_all([flooder, victim, x, y])
    for _ in range(200):
        flooder.proto.send_packet(victim.pub, bytes(1280), 0.0)
    flooder.conn.receive_data(flooder.proto.data_to_send(), 0.0)
    for i in range(20):
        x.proto.send_packet(y.pub, bytes(100), 0.0)
    x.conn.receive_data(x.proto.data_to_send(), 0.0)
    y.pump()
    victim.pump()
    assert len(y.take(ReceivedPacket)) == 20
    allowed = burst // (5 + 32 + 1280)
    assert len(victim.take(ReceivedPacket)) == allowed
    assert core.counters.drops["rate_limited"] == 200 - allowed
    # One second later the bucket has refilled by 10 kB: seven more 1317-byte frames fit.
    for _ in range(10):
        flooder.proto.send_packet(victim.pub, bytes(1280), 1.0)
    flooder.conn.receive_data(flooder.proto.data_to_send(), 1.0)
    victim.pump(1.0)
    assert len(victim.take(ReceivedPacket)) == (10_000 + burst - allowed * 1317) // 1317


def test_verify_clients_parks_until_answer():
    core = make_core(verify_clients=True)
    good, bad = Pair(core), Pair(core)
    for p in (good, bad):
        p.proto.receive_data(p.conn.data_to_send(0.0), 0.0)
        p.conn.receive_data(p.proto.data_to_send() + f.encode_frame(f.NotePreferred(True)), 0.0)
    assert {c.key for c in core.take_verify_requests()} == {good.pub.raw, bad.pub.raw}
    assert good.conn.state is ConnState.VERIFYING and not good.conn.has_output
    core.verify_result(good.conn, True, 0.0)
    core.verify_result(bad.conn, False, 0.0)
    good.pump()
    assert good.take(ServerInfoReceived) and good.conn.preferred  # buffered NotePreferred was processed
    assert bad.conn.closed and core.counters.rejected_clients == 1 and not bad.conn.has_output


def test_keepalive_timer_and_handshake_timeout():
    core = make_core()
    idle = Pair(core)
    stalled = core.accept(0.0)
    stalled.data_to_send(0.0)
    idle.pump(0.0)
    assert stalled.get_timer() == 10.0
    stalled.handle_timer(10.0)
    assert stalled.closed and stalled.close_reason == "handshake timeout"
    t = idle.conn.get_timer()
    assert 54.0 <= t <= 60.0  # never later than 60 s after the last write
    idle.conn.handle_timer(t - 1)
    assert not idle.conn.has_output
    idle.conn.handle_timer(t)
    assert idle.conn.data_to_send(t) == b"\x06\x00\x00\x00\x00"
    assert idle.conn.get_timer() > t


def test_protocol_errors_close_only_that_connection():
    core = make_core()
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    a.conn.receive_data(b"\x04" + struct.pack(">I", 10_000_000), 0.0)  # oversized declared length
    assert a.conn.closed and "protocol error" in a.conn.close_reason
    assert core.counters.protocol_errors == 1 and not b.conn.closed
    c = Pair(core)
    c.conn.receive_data(b"\x04\x00\x00\x00\x01x", 0.0)  # not ClientInfo first
    assert c.conn.closed
    assert core.counters.clients == 1


def test_mesh_privileges_required():
    core = make_core(mesh_key=b"k" * 32)
    plain = Pair(core)
    pump_all([plain])
    plain.conn.receive_data(f.encode_frame(f.WatchConns()), 0.0)
    assert plain.conn.closed
    other = Pair(core)
    pump_all([other])
    other.conn.receive_data(f.encode_frame(f.ForwardPacket(bytes(32), other.pub.raw, b"x")), 0.0)
    assert other.conn.closed


def test_watchers_get_presence_and_close_peer():
    mesh_key = b"m" * 32
    core = make_core(mesh_key=mesh_key)
    early = Pair(core)
    pump_all([early])
    watcher = Pair(core, mesh_key=mesh_key)
    pump_all([watcher])
    watcher.proto.watch_conns(0.0)
    pump_all([watcher])
    present = watcher.take(PeerPresentEvent)
    assert [e.peer for e in present] == [early.pub]
    assert present[0].addr[0] == "127.0.0.1" and present[0].flags == f.PeerPresentFlags.REGULAR
    late = Pair(core)
    pump_all([late, watcher])
    assert [e.peer for e in watcher.take(PeerPresentEvent)] == [late.pub]
    watcher.proto.close_peer(late.pub.raw, 0.0)
    pump_all([watcher])
    assert late.conn.closed and late.conn.close_reason == "closed by ClosePeer"
    assert watcher.take(PeerGoneEvent) == [PeerGoneEvent(late.pub, 0)]


def test_mesh_forwarding_between_two_cores():
    mesh_key = b"z" * 32
    s1, s2 = make_core(mesh_key=mesh_key), make_core(mesh_key=mesh_key)
    a, b = Pair(s1), Pair(s2)
    pump_all([a, b])
    # s1 watches s2 through a mesh client connection (core side: a MeshLink).
    link = s1.add_mesh_link("s2", 0.0)
    watch = Pair(s2, NodePrivate(s1.private_key), mesh_key=mesh_key)
    pump_all([watch])
    watch.proto.watch_conns(0.0)
    pump_all([watch])
    for ev in watch.take(PeerPresentEvent):
        link.peer_present(ev.peer.raw)
    a.proto.send_packet(b.pub, b"across", 0.0)
    pump_all([a])
    assert s1.counters.packets_forwarded_out == 1
    watch.conn.receive_data(link.data_to_send(0.0), 0.0)  # the link writes ForwardPacket to s2
    pump_all([b])
    assert b.take(ReceivedPacket) == [ReceivedPacket(a.pub, b"across")]
    assert s2.counters.packets_forwarded_in == 1
    b.proto.send_packet(a.pub, b"back?", 0.0)  # s2 has no route to a: dropped, never re-forwarded
    pump_all([b])
    assert s2.counters.drops["unknown_dest"] == 1
    # b leaves s2: the watcher hears PeerGone and s1 forgets the forwarder.
    b.conn.connection_lost()
    pump_all([watch])
    for ev in watch.take(PeerGoneEvent):
        link.peer_gone(ev.peer.raw)
    a.proto.send_packet(b.pub, b"lost", 0.0)
    pump_all([a])
    assert s1.counters.packets_forwarded_out == 1 and s1.counters.drops["unknown_dest"] == 1


def test_restarting_and_health_announcements():
    core = make_core()
    a = Pair(core)
    pump_all([a])
    core.set_health("overloaded")
    core.announce_restart(500, 9000)
    a.pump()
    names = [type(e).__name__ for e in a.events]
    assert "HealthChanged" in names and "RestartingEvent" in names


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 0x20), st.binary(max_size=80)), max_size=12), st.binary(max_size=64))
def test_random_frames_never_crash_the_server(random_frames, raw_noise):
    core = make_core(mesh_key=b"q" * 32)
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    wire = b"".join(bytes([t]) + struct.pack(">I", len(p)) + p for t, p in random_frames) + raw_noise
    a.conn.receive_data(wire, 0.0)
    fresh = core.accept(0.0)
    fresh.receive_data(wire, 0.0)  # before the handshake too
    # Whatever happened to those connections, the server still relays for others.
    c = Pair(core)
    pump_all([b, c])
    c.proto.send_packet(b.pub, b"still alive", 0.0)
    pump_all([b, c])
    assert ReceivedPacket(c.pub, b"still alive") in b.events


def test_paced_rate_limit_relays_everything_and_asks_driver_to_wait():
    burst = 5 + 32 + 65536
    core = make_core(rate_limit_bytes_per_sec=10_000, rate_limit_burst=burst, rate_limit_mode="pace")
    flooder, victim = Pair(core), Pair(core)
    pump_all([flooder, victim])
    assert flooder.conn.read_resume_at(0.0) == 0.0
    for _ in range(100):
        flooder.proto.send_packet(victim.pub, bytes(1280), 0.0)
    flooder.conn.receive_data(flooder.proto.data_to_send(), 0.0)
    victim.pump()
    assert len(victim.take(ReceivedPacket)) == 100 and not core.counters.drops
    debt = 100 * 1317 - burst
    assert flooder.conn.read_resume_at(0.0) == debt / 10_000
    assert flooder.conn.read_resume_at(debt / 10_000) == debt / 10_000  # paid off exactly then
    assert victim.conn.read_resume_at(0.0) == 0.0
