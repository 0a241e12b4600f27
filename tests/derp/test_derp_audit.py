"""Audit of the DERP server and client cores against derper / tailscaled's rules.

Each test names the rule it checks. Areas: identity (the ClientInfo box proves the claimed key; a
connection can only ever send as that key; a second ClientInfo changes nothing), privileged frames
(WatchConns / ClosePeer / ForwardPacket need the mesh key, compared in constant time; mesh peers skip
verification; a mesh link to ourselves watches nothing), frame limits (64 KiB packets, ClientInfo
56 B..256 KiB, NotePreferred exactly 1 B, Ping 8..1000 B), unknown and server-to-client frame types
skipped, PeerGone reasons (NotHere also answers a stale mesh forward), NotePreferred bookkeeping,
PeerPresent flags as derper sets them (and every registration announced), ServerInfo contents, a
standing Health problem told to new clients, mis-sized mesh keys refused, a stale mesh route dropped
after NotHere; and on the client: the server key proof (ServerKey magic, pinned key, every ServerInfo
box), a later ServerInfo replacing the token bucket, Ping answered with the same 8 bytes, bounded Pong
queue, malformed frames closing the connection with a clear error, the Restarting reconnect hint.
Duplicate connections are in test_derp_server_core.py; the TLS stream's edge cases in
test_derp_tls_stream.py.
"""

import json

import pytest

from derp_helpers import Pair, pump_all
from tsnet.derp import frames as f
from tsnet.derp import server_core
from tsnet.derp.client_core import (
    MAX_QUEUED_PONGS,
    ClientState,
    DerpClientProtocol,
    HealthChanged,
    KeepAliveReceived,
    PeerGoneEvent,
    PeerPresentEvent,
    ReceivedPacket,
    RestartingEvent,
    ServerInfoReceived,
)
from tsnet.derp.info import ClientInfo, ServerInfo, open_from, seal_to
from tsnet.derp.server_core import ConnState, DerpServerCore
from tsnet.key import NodePrivate

DISCO = f.DISCO_MAGIC + bytes(56)  # 62 bytes: shaped like disco
MESH_KEY = b"M" * 32


def make_core(**kw):
    return DerpServerCore(NodePrivate.generate().raw, **kw)


def raw_client_info(core, claimed_key: bytes, sealing_private: bytes, server_public: bytes | None = None,
                    body: bytes | None = None) -> bytes:
    sealed = seal_to(sealing_private, server_public or core.public_key, body or ClientInfo().to_json())
    return f.encode_frame(f.ClientInfoFrame(claimed_key, sealed))


# --- identity ----------------------------------------------------------------------------------------


def test_client_info_box_must_open_with_the_claimed_key():
    core = make_core()
    victim, attacker = NodePrivate.generate(), NodePrivate.generate()
    # Claims the victim's key but can only seal with its own private key.
    conn = core.accept(0.0, ("127.0.0.1", 1))
    conn.receive_data(raw_client_info(core, victim.public.raw, attacker.raw), 0.0)
    assert conn.closed and "authenticate" in conn.close_reason
    assert not core.is_connected(victim.public.raw) and core.counters.clients == 0
    # Sealed by the right key but to some other server: also refused.
    other_server = NodePrivate.generate()
    conn = core.accept(0.0, ("127.0.0.1", 2))
    conn.receive_data(raw_client_info(core, victim.public.raw, victim.raw, other_server.public.raw), 0.0)
    assert conn.closed and not core.is_connected(victim.public.raw)
    # The genuine holder gets in, and ServerInfo is sealed to it.
    conn = core.accept(0.0, ("127.0.0.1", 3))
    conn.data_to_send(0.0)
    conn.receive_data(raw_client_info(core, victim.public.raw, victim.raw), 0.0)
    assert conn.state is ConnState.ACTIVE and conn.key == victim.public.raw
    out = conn.data_to_send(0.0)
    assert out[0] == f.FrameType.SERVER_INFO
    assert json.loads(open_from(victim.raw, core.public_key, out[5:])) == {"version": 2}


def test_relayed_packets_carry_the_senders_authenticated_key_and_nothing_else_can_set_it():
    core = make_core(mesh_key=MESH_KEY)
    a, b = Pair(core), Pair(core)
    spoofed = NodePrivate.generate().public
    pump_all([a, b])
    a.proto.send_packet(b.pub, b"hello", 0.0)
    pump_all([a, b])
    assert b.take(ReceivedPacket) == [ReceivedPacket(a.pub, b"hello")]
    # A RecvPacket written by a client (with a source of its choosing) is not relayed: skipped.
    a.conn.receive_data(f.encode_frame(f.RecvPacket(spoofed.raw, b"forged")), 0.0)
    pump_all([a, b])
    assert not b.take(ReceivedPacket) and not a.conn.closed
    # ForwardPacket names its source, so only a mesh-key connection may send it.
    a.conn.receive_data(f.encode_frame(f.ForwardPacket(spoofed.raw, b.pub.raw, b"forged")), 0.0)
    pump_all([b])
    assert a.conn.closed and "mesh key" in a.conn.close_reason and not b.take(ReceivedPacket)


def test_second_client_info_is_skipped_and_does_not_change_the_key():
    core = make_core()
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    other = NodePrivate.generate()
    a.conn.receive_data(raw_client_info(core, other.public.raw, other.raw), 0.0)  # valid box, other key
    assert not a.conn.closed and a.conn.key == a.pub.raw and not core.is_connected(other.public.raw)
    a.proto.send_packet(b.pub, b"still me", 0.0)
    pump_all([a, b])
    assert b.take(ReceivedPacket) == [ReceivedPacket(a.pub, b"still me")]


# --- privileged frames -----------------------------------------------------------------------------


def test_privileged_frames_need_the_mesh_key():
    core = make_core(mesh_key=MESH_KEY)
    target = Pair(core)
    pump_all([target])
    for frame in (f.WatchConns(), f.ClosePeer(target.pub.raw), f.ForwardPacket(bytes(32), target.pub.raw, b"x")):
        wrong = Pair(core, mesh_key=b"N" * 32)  # a mesh key, but the wrong one
        pump_all([wrong])
        assert not wrong.conn.can_mesh
        wrong.conn.receive_data(f.encode_frame(frame), 0.0)
        assert wrong.conn.closed and "mesh key" in wrong.conn.close_reason
    assert not target.conn.closed and not core._watchers
    # Without a server mesh key nobody is privileged, whatever the client sends.
    bare = make_core()
    p = Pair(bare, mesh_key=MESH_KEY)
    pump_all([p])
    assert not p.conn.can_mesh


def test_mesh_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = server_core.hmac.compare_digest

    def spy(x, y):
        calls.append((bytes(x), bytes(y)))
        return real(x, y)

    monkeypatch.setattr(server_core.hmac, "compare_digest", spy)
    core = make_core(mesh_key=MESH_KEY)
    p = Pair(core, mesh_key=MESH_KEY)
    pump_all([p])
    assert p.conn.can_mesh and calls == [(MESH_KEY, MESH_KEY)]


def test_mesh_peers_skip_client_verification_others_wait_for_it():
    core = make_core(mesh_key=MESH_KEY, verify_clients=True)
    mesh, plain = Pair(core, mesh_key=MESH_KEY), Pair(core)
    pump_all([mesh, plain])
    assert mesh.conn.state is ConnState.ACTIVE and mesh.take(ServerInfoReceived)
    assert plain.conn.state is ConnState.VERIFYING and not plain.take(ServerInfoReceived)
    assert core.take_verify_requests() == [plain.conn]


def test_watch_conns_from_our_own_key_watches_nothing():
    core = make_core(mesh_key=MESH_KEY)
    early = Pair(core)
    me = Pair(core, NodePrivate(core.private_key), mesh_key=MESH_KEY)
    pump_all([early, me])
    me.proto.watch_conns(0.0)
    pump_all([me])
    assert not me.conn.closed and not me.conn.watcher and not me.take(PeerPresentEvent)
    Pair(core).pump()
    me.pump()
    assert not me.take(PeerPresentEvent)


def test_close_peer_closes_every_connection_of_the_key():
    core = make_core(mesh_key=MESH_KEY)
    key = NodePrivate.generate()
    d1, d2, admin = Pair(core, key), Pair(core, key), Pair(core, mesh_key=MESH_KEY)
    pump_all([d1, d2, admin])
    admin.proto.close_peer(key.public.raw, 0.0)
    pump_all([admin])
    assert d1.conn.closed and d2.conn.closed and not core.is_connected(key.public.raw)


# --- frame limits and unknown types ------------------------------------------------------------------


def test_packet_size_limit_is_64_kib_for_send_and_forward():
    core = make_core(mesh_key=MESH_KEY)
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    biggest = bytes(f.MAX_PACKET_SIZE)
    a.proto.send_packet(b.pub, biggest, 0.0)
    pump_all([a, b])
    assert [len(e.packet) for e in b.take(ReceivedPacket)] == [f.MAX_PACKET_SIZE]
    a.conn.receive_data(f.encode_header(f.FrameType.SEND_PACKET, 32 + f.MAX_PACKET_SIZE + 1) + b.pub.raw, 0.0)
    assert a.conn.closed and "declares" in a.conn.close_reason  # refused at the header, before the body
    mesh = Pair(core, mesh_key=MESH_KEY)
    pump_all([mesh])
    mesh.conn.receive_data(f.encode_frame(f.ForwardPacket(bytes(32), b.pub.raw, biggest)), 0.0)
    assert not mesh.conn.closed
    mesh.conn.receive_data(f.encode_header(f.FrameType.FORWARD_PACKET, 64 + f.MAX_PACKET_SIZE + 1), 0.0)
    assert mesh.conn.closed


@pytest.mark.parametrize(
    "body_len, reason",
    [(f.KEY_LEN + f.NONCE_LEN - 1, "short"), (f.MAX_CLIENT_INFO_LEN + 1, "exceeds")],
)
def test_client_info_length_limits(body_len, reason):
    core = make_core()
    conn = core.accept(0.0)
    # Only the first 100 bytes are sent: an oversized ClientInfo is refused at its header.
    conn.receive_data(f.encode_header(f.FrameType.CLIENT_INFO, body_len) + bytes(min(body_len, 100)), 0.0)
    assert conn.closed and reason in conn.close_reason
    assert core.counters.protocol_errors == 1


@pytest.mark.parametrize(
    "frame, reason",
    [
        (f.encode_header(f.FrameType.NOTE_PREFERRED, 2) + b"\x01\x01", "NotePreferred"),
        (f.encode_header(f.FrameType.NOTE_PREFERRED, 0), "NotePreferred"),
        (f.encode_header(f.FrameType.PING, 7) + bytes(7), "Ping"),
        (f.encode_header(f.FrameType.PING, 1001) + bytes(1001), "Ping"),
        (f.encode_header(f.FrameType.WATCH_CONNS, 1) + b"\x00", "WatchConns"),
        (f.encode_header(f.FrameType.CLOSE_PEER, 31) + bytes(31), "ClosePeer"),
        (f.encode_header(f.FrameType.SEND_PACKET, 31) + bytes(31), "destination"),
    ],
)
def test_malformed_control_frames_close_only_that_connection(frame, reason):
    core = make_core(mesh_key=MESH_KEY)
    bad, other = Pair(core, mesh_key=MESH_KEY), Pair(core)
    pump_all([bad, other])
    bad.conn.receive_data(frame, 0.0)
    assert bad.conn.closed and reason in bad.conn.close_reason and not other.conn.closed


def test_unknown_and_server_to_client_frame_types_are_skipped():
    core = make_core()
    a, b = Pair(core), Pair(core)
    pump_all([a, b])
    skipped = [0x00, 0x01, 0x03, 0x05, 0x06, 0x08, 0x09, 0x0B, 0x0F, 0x13, 0x14, 0x15, 0x16, 0x7F, 0xFF]
    wire = b"".join(f.encode_header(t, 40) + bytes(40) for t in skipped)
    a.conn.receive_data(wire + f.encode_frame(f.SendPacket(b.pub.raw, b"after")), 0.0)
    pump_all([a, b])
    assert not a.conn.closed and b.take(ReceivedPacket) == [ReceivedPacket(a.pub, b"after")]
    assert core.counters.protocol_errors == 0


def test_server_answers_ping_with_the_first_8_bytes_and_ignores_a_flood():
    core = make_core()
    a = Pair(core)
    pump_all([a])
    a.conn.receive_data(f.encode_header(f.FrameType.PING, 20) + b"12345678" + bytes(12), 0.0)
    assert a.conn.data_to_send(0.0) == f.encode_frame(f.Pong(b"12345678"))
    a.conn.receive_data(f.encode_frame(f.Ping(b"abcdefgh")) * 500, 0.0)
    out = a.conn.data_to_send(0.0)
    assert 0 < len(out) // 13 <= 64 and core.counters.got_ping == 501  # answered up to a bound


# --- PeerGone / NotePreferred / PeerPresent / ServerInfo ----------------------------------------------


def test_forwarded_disco_to_an_absent_key_answers_not_here_to_the_forwarding_server():
    core = make_core(mesh_key=MESH_KEY)
    mesh = Pair(core, mesh_key=MESH_KEY)
    pump_all([mesh])
    src, gone = NodePrivate.generate().public, NodePrivate.generate().public
    for _ in range(5):
        mesh.conn.receive_data(f.encode_frame(f.ForwardPacket(src.raw, gone.raw, DISCO)), 0.0)
    mesh.conn.receive_data(f.encode_frame(f.ForwardPacket(src.raw, gone.raw, b"\x04wireguard")), 0.0)
    mesh.pump()
    # Rate-limited like a local sender's (burst 3, then 1/s); WireGuard gets no answer.
    assert mesh.take(PeerGoneEvent) == [PeerGoneEvent(gone, f.PeerGoneReason.NOT_HERE)] * 3
    assert core.counters.drops["unknown_dest_on_fwd"] == 6


def test_forward_to_a_key_with_duplicates_none_active_counts_dup_client():
    core = make_core(mesh_key=MESH_KEY)
    key = NodePrivate.generate()
    d1, d2, d3, mesh = Pair(core, key), Pair(core, key), Pair(core, key), Pair(core, mesh_key=MESH_KEY)
    pump_all([d1, d2, d3, mesh])
    core._route[key.public.raw] = None  # the "disable fighters" state derper can be switched to
    mesh.conn.receive_data(f.encode_frame(f.ForwardPacket(bytes(32), key.public.raw, DISCO)), 0.0)
    mesh.pump()
    assert core.counters.drops["dup_client"] == 1 and not mesh.take(PeerGoneEvent)


def test_peer_gone_disconnected_only_when_the_last_connection_of_a_key_goes():
    core = make_core()
    key = NodePrivate.generate()
    d1, d2, peer = Pair(core, key), Pair(core, key), Pair(core)
    pump_all([d1, d2, peer])
    d2.proto.send_packet(peer.pub, b"hi", 0.0)
    pump_all([d1, d2, peer])
    d2.conn.connection_lost()
    pump_all([peer])
    assert not peer.take(PeerGoneEvent)
    d1.conn.connection_lost()
    pump_all([peer])
    assert peer.take(PeerGoneEvent) == [PeerGoneEvent(key.public, f.PeerGoneReason.DISCONNECTED)]


def test_note_preferred_counts_home_connections():
    core = make_core()
    home = Pair(core, preferred=True)
    pump_all([home])
    assert home.conn.preferred and core.counters.home_connections == 1
    home.proto.note_preferred(False, 0.0)
    home.pump()
    assert core.counters.home_connections == 0
    home.proto.note_preferred(True, 0.0)
    home.pump()
    home.conn.connection_lost()
    assert core.counters.home_connections == 0


def test_peer_present_flags_as_derper_sets_them():
    core = make_core(mesh_key=MESH_KEY)
    watcher = Pair(core, mesh_key=MESH_KEY)
    pump_all([watcher])
    watcher.proto.watch_conns(0.0)
    pump_all([watcher])
    regular = Pair(core)
    prober = Pair(core, is_prober=True)
    mesh = Pair(core, mesh_key=MESH_KEY)
    not_ideal = Pair(core)
    not_ideal.conn = core.accept(0.0, ("10.1.2.3", 9), not_ideal=True)
    pump_all([regular, prober, mesh, not_ideal, watcher])
    flags = {e.peer: e.flags for e in watcher.take(PeerPresentEvent)}
    PF = f.PeerPresentFlags
    assert flags == {
        regular.pub: PF.REGULAR,
        prober.pub: PF.PROBER,
        mesh.pub: PF.MESH_PEER,
        not_ideal.pub: PF.NOT_IDEAL,
    }


def test_every_registration_is_announced_to_watchers_duplicates_too():
    core = make_core(mesh_key=MESH_KEY)
    watcher = Pair(core, mesh_key=MESH_KEY)
    pump_all([watcher])
    watcher.proto.watch_conns(0.0)
    key = NodePrivate.generate()
    d1, d2 = Pair(core, key), Pair(core, key)
    pump_all([watcher, d1, d2, watcher])
    assert [e.peer for e in watcher.take(PeerPresentEvent)] == [key.public, key.public]


def test_server_info_contents_and_token_bucket_fields():
    core = make_core()
    p = Pair(core)
    pump_all([p])
    assert p.take(ServerInfoReceived)[0].info == ServerInfo(version=2)
    limited = make_core(server_info=ServerInfo(token_bucket_bytes_per_second=5000, token_bucket_bytes_burst=70000))
    assert json.loads(limited.server_info_json) == {
        "version": 2, "TokenBucketBytesPerSecond": 5000, "TokenBucketBytesBurst": 70000,
    }
    q = Pair(limited)
    pump_all([q])
    info = q.take(ServerInfoReceived)[0].info
    assert (info.token_bucket_bytes_per_second, info.token_bucket_bytes_burst) == (5000, 70000)


# --- client ------------------------------------------------------------------------------------------

SERVER = NodePrivate.generate()


def fresh_client(**kw):
    return DerpClientProtocol(NodePrivate.generate(), 0.0, **kw)


def connected_client():
    proto = fresh_client()
    proto.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), 0.0)
    proto.data_to_send()
    sealed = seal_to(SERVER.raw, proto.public_key.raw, ServerInfo().to_json())
    assert proto.receive_data(f.encode_frame(f.ServerInfoFrame(sealed)), 0.0)
    return proto


def test_client_checks_server_key_frame_magic_length_and_pin():
    bad_magic = f.encode_header(f.FrameType.SERVER_KEY, 40) + b"DERP\x00\x00\x00\x00" + SERVER.public.raw
    short = f.encode_header(f.FrameType.SERVER_KEY, 39) + f.MAGIC + SERVER.public.raw[:31]
    for wire, msg in ((bad_magic, "magic"), (short, "SERVER_KEY")):
        proto = fresh_client()
        with pytest.raises(f.DerpProtocolError, match=msg):
            proto.receive_data(wire, 0.0)
        assert proto.state is ClientState.CLOSED and proto.data_to_send() == b""  # no ClientInfo sent
    pinned = fresh_client(server_key=NodePrivate.generate().public)
    with pytest.raises(f.DerpProtocolError, match="expected key"):
        pinned.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), 0.0)
    longer = fresh_client()  # extra bytes after the key are allowed (future use)
    longer.receive_data(f.encode_header(f.FrameType.SERVER_KEY, 48) + f.MAGIC + SERVER.public.raw + bytes(8), 0.0)
    assert longer.state is ClientState.AWAIT_SERVER_INFO and longer.server_key == SERVER.public


def test_client_rejects_server_info_not_sealed_by_the_announced_server_key():
    proto = fresh_client()
    proto.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), 0.0)
    impostor = NodePrivate.generate()
    sealed = seal_to(impostor.raw, proto.public_key.raw, ServerInfo().to_json())
    with pytest.raises(f.DerpProtocolError, match="authenticate"):
        proto.receive_data(f.encode_frame(f.ServerInfoFrame(sealed)), 0.0)
    assert proto.state is ClientState.CLOSED and proto.receive_data(f.encode_frame(f.KeepAlive()), 0.0) == []


def test_client_ignores_relayed_packets_before_server_info():
    proto = fresh_client()
    proto.receive_data(f.encode_frame(f.ServerKey(SERVER.public.raw)), 0.0)
    src = NodePrivate.generate().public
    assert proto.receive_data(f.encode_frame(f.RecvPacket(src.raw, b"early")), 0.0) == []


def test_client_answers_ping_with_the_same_8_bytes_and_surfaces_control_frames():
    proto = connected_client()
    peer = NodePrivate.generate().public
    wire = (
        f.encode_header(f.FrameType.PING, 12) + b"ABCDEFGH" + b"more"
        + f.encode_frame(f.KeepAlive())
        + f.encode_frame(f.PeerGone(peer.raw, f.PeerGoneReason.DISCONNECTED))
        + f.encode_frame(f.PeerGone(peer.raw, f.PeerGoneReason.NOT_HERE))
        + f.encode_frame(f.Health("no home"))
        + f.encode_frame(f.Health(""))
        + f.encode_frame(f.Restarting(1500, 20000))
    )
    events = proto.receive_data(wire, 0.0)
    assert proto.data_to_send() == f.encode_frame(f.Pong(b"ABCDEFGH"))
    assert events == [
        KeepAliveReceived(),
        PeerGoneEvent(peer, 0),
        PeerGoneEvent(peer, 1),
        HealthChanged("no home"),
        HealthChanged(""),
        RestartingEvent(1500, 20000),
    ]


def test_client_pong_queue_is_bounded():
    proto = connected_client()
    proto.receive_data(f.encode_frame(f.Ping(b"12345678")) * 1000, 0.0)
    out = proto.data_to_send()
    assert len(out) == MAX_QUEUED_PONGS * 13 and proto.dropped_pongs == 1000 - MAX_QUEUED_PONGS
    proto.receive_data(f.encode_frame(f.Ping(b"87654321")), 0.0)  # the bound is per write
    assert proto.data_to_send() == f.encode_frame(f.Pong(b"87654321"))


@pytest.mark.parametrize(
    "wire, msg",
    [
        (f.encode_header(f.FrameType.PEER_GONE, 31) + bytes(31), "PEER_GONE"),
        (f.encode_header(f.FrameType.PING, 7) + bytes(7), "PING"),
        (f.encode_header(f.FrameType.RESTARTING, 4) + bytes(4), "RESTARTING"),
        (f.encode_header(f.FrameType.PEER_PRESENT, 3) + bytes(3), "PEER_PRESENT"),
        (f.encode_header(f.FrameType.RECV_PACKET, f.MAX_INFO_LEN + 1), "over the limit"),
    ],
)
def test_client_malformed_frames_close_with_a_clear_error(wire, msg):
    proto = connected_client()
    with pytest.raises(f.DerpProtocolError, match=msg):
        proto.receive_data(wire, 0.0)
    assert proto.state is ClientState.CLOSED and msg in proto.close_reason
    assert proto.receive_data(f.encode_frame(f.KeepAlive()), 0.0) == []


def test_a_client_connecting_during_a_health_problem_hears_about_it():
    core = make_core()
    core.set_health("disk full")
    late = Pair(core)
    pump_all([late])
    assert late.take(HealthChanged) == [HealthChanged("disk full")]
    core.set_health("")
    pump_all([late])
    assert late.take(HealthChanged) == [HealthChanged("")]
    later = Pair(core)
    pump_all([later])
    assert not later.take(HealthChanged)


def test_client_later_server_info_replaces_the_token_bucket_and_must_still_authenticate():
    proto = connected_client()
    dst = NodePrivate.generate().public
    limited = ServerInfo(token_bucket_bytes_per_second=1317, token_bucket_bytes_burst=1317)
    sealed = seal_to(SERVER.raw, proto.public_key.raw, limited.to_json())
    assert proto.receive_data(f.encode_frame(f.ServerInfoFrame(sealed)), 1.0) == []  # not a new connection
    assert [proto.send_packet(dst, bytes(1280), 1.0) for _ in range(2)] == [True, False]
    sealed = seal_to(SERVER.raw, proto.public_key.raw, ServerInfo().to_json())
    proto.receive_data(f.encode_frame(f.ServerInfoFrame(sealed)), 1.0)
    assert all(proto.send_packet(dst, bytes(1280), 1.0) for _ in range(10))  # limit lifted
    forged = seal_to(NodePrivate.generate().raw, proto.public_key.raw, ServerInfo().to_json())
    with pytest.raises(f.DerpProtocolError, match="authenticate"):
        proto.receive_data(f.encode_frame(f.ServerInfoFrame(forged)), 1.0)


@pytest.mark.parametrize("hint_ms, expected_gap", [(2500, 2.5), (4_000_000_000, 30.0), (0, None)])
async def test_client_redials_no_sooner_than_the_restarting_hint_capped(autojump_clock, hint_ms, expected_gap):
    import trio

    from tsnet.derp.client import MAX_RESTART_HINT, DerpClient, DerpNode

    node = DerpNode("1a", 1, "127.0.0.1", ipv4="127.0.0.1", ipv6="none", derp_port=1, plain_http=True)
    client = DerpClient(NodePrivate.generate(), node)
    dials: list[float] = []

    async def one_connection():  # stands in for dial + handshake: the server then says it restarts
        dials.append(trio.current_time())
        if len(dials) == 2:
            client.close()
            return
        await client._reader(None, connected_client(), f.encode_frame(f.Restarting(hint_ms, 10_000)))

    client._run_once = one_connection  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        await n.start(client.run)
    gap = dials[1] - dials[0]
    assert MAX_RESTART_HINT == 30.0
    if expected_gap is None:
        assert gap < 0.1  # no hint: the usual short first backoff step
    else:
        assert expected_gap <= gap < expected_gap + 0.1


@pytest.mark.parametrize("mesh_hex", ["ab" * 31, "ab" * 33, "zz" * 32])
def test_client_info_with_a_mis_sized_or_non_hex_mesh_key_is_refused(mesh_hex):
    core = make_core(mesh_key=MESH_KEY)
    key = NodePrivate.generate()
    body = json.dumps({"meshKey": mesh_hex, "version": 2, "CanAckPings": True}).encode()
    conn = core.accept(0.0)
    conn.receive_data(raw_client_info(core, key.public.raw, key.raw, body=body), 0.0)
    assert conn.closed and "meshKey" in conn.close_reason and not core.is_connected(key.public.raw)


def test_stale_mesh_route_is_dropped_after_the_peer_server_answers_not_here():
    s1, s2 = make_core(mesh_key=MESH_KEY), make_core(mesh_key=MESH_KEY)
    a = Pair(s1)
    pump_all([a])
    link = s1.add_mesh_link("s2", 0.0)
    watch = Pair(s2, NodePrivate(s1.private_key), mesh_key=MESH_KEY)  # s1's watch connection to s2
    pump_all([watch])
    ghost = NodePrivate.generate().public
    link.peer_present(ghost.raw)  # s1 believes ghost is on s2; s2 never heard of it (lost PeerGone)
    a.proto.send_packet(ghost, DISCO, 0.0)
    pump_all([a])
    watch.conn.receive_data(link.data_to_send(0.0), 0.0)  # the ForwardPacket reaches s2
    watch.pump()
    answers = watch.take(PeerGoneEvent)
    assert answers == [PeerGoneEvent(ghost, f.PeerGoneReason.NOT_HERE)]
    for ev in answers:  # what the mesh driver does with every PeerGone on its watch connection
        link.peer_gone(ev.peer.raw)
    a.proto.send_packet(ghost, DISCO, 1.0)
    pump_all([a], now=1.0)
    assert a.take(PeerGoneEvent) == [PeerGoneEvent(ghost, f.PeerGoneReason.NOT_HERE)]  # now s1's own answer
    assert s1.counters.packets_forwarded_out == 1 and s1.counters.drops["unknown_dest"] == 1


async def test_client_driver_survives_a_malformed_server_frame_and_reconnects():
    import trio

    from test_derp_client_batch import Upstream, plain_node, scripted_server
    from tsnet.derp.client import DerpClient

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = DerpClient(NodePrivate.generate(), plain_node(port))
    malformed = f.encode_header(f.FrameType.PEER_GONE, 5) + bytes(5)
    second = trio.Event()

    async def server():
        await scripted_server(listener, malformed, Upstream())  # the client hangs up on the bad frame
        second.set()
        await scripted_server(listener, b"", Upstream())

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(server)
            await n.start(client.run)
            async for ev in client.events:  # the driver keeps running and connects again
                if isinstance(ev, ServerInfoReceived) and second.is_set():
                    break
            assert "PEER_GONE" in client.last_error
            client.close()
            n.cancel_scope.cancel()
    await listener.aclose()


def _mesh_world(n_links=2):
    """s1 with ``n_links`` mesh links, a local client ``a``, and a remote key ``b`` a has talked with."""
    s1 = make_core(mesh_key=MESH_KEY)
    a = Pair(s1)
    pump_all([a])
    links = [s1.add_mesh_link(f"s{i + 2}", 0.0) for i in range(n_links)]
    b = NodePrivate.generate().public
    return s1, a, links, b


def _forward_in(s1, link_conn_pair, src, dst, packet):
    link_conn_pair.conn.receive_data(f.encode_frame(f.ForwardPacket(src.raw, dst.raw, packet)), 0.0)


def test_a_key_on_two_mesh_peers_keeps_its_route_when_one_reports_it_gone():
    s1, a, (l2, l3), b = _mesh_world()
    l2.peer_present(b.raw)
    l3.peer_present(b.raw)  # b connected to both s2 and s3 (latest report is the forwarder)
    l3.peer_gone(b.raw)
    a.proto.send_packet(b, b"still reachable", 0.0)
    pump_all([a])
    assert s1.counters.packets_forwarded_out == 1 and l2.queued_packets == 1 and not a.take(PeerGoneEvent)
    l2.peer_gone(b.raw)
    a.proto.send_packet(b, b"now gone", 0.0)
    pump_all([a])
    assert s1.counters.packets_forwarded_out == 1 and s1.counters.drops["unknown_dest"] == 1


def test_a_broken_mesh_link_is_a_peer_gone_for_every_key_learned_over_it():
    s1, a, (l2,), b = _mesh_world(1)
    mesh_in = Pair(s1, mesh_key=MESH_KEY)  # s2's own connection to s1, carrying b's packets in
    pump_all([mesh_in])
    l2.peer_present(b.raw)
    _forward_in(s1, mesh_in, b, a.pub, b"from b")
    pump_all([a])
    assert a.take(ReceivedPacket) == [ReceivedPacket(b, b"from b")]
    l2.reset()  # the watch connection to s2 broke
    pump_all([a])
    assert a.take(PeerGoneEvent) == [PeerGoneEvent(b, f.PeerGoneReason.DISCONNECTED)]
    assert b.raw not in s1._forwarders


def test_peer_gone_bookkeeping_only_holds_keys_connected_now():
    core = make_core(mesh_key=MESH_KEY)
    sender = Pair(core)
    mesh_in = Pair(core, mesh_key=MESH_KEY)
    pump_all([sender, mesh_in])
    remote = NodePrivate.generate().public
    for _ in range(50):  # a long-lived sender talks to many short-lived receivers
        r = Pair(core)
        pump_all([r])
        sender.proto.send_packet(r.pub, b"hi", 0.0)
        _forward_in(core, mesh_in, remote, r.pub, b"hi too")
        pump_all([sender, r])
        assert len(r.take(ReceivedPacket)) == 2
        r.conn.connection_lost()
    assert core._sent_to[sender.pub.raw] == set()
    assert not core._fwd_sent_to and not core._heard_from
    # The bookkeeping still does its job for receivers that stay.
    stay = Pair(core)
    pump_all([stay])
    sender.proto.send_packet(stay.pub, b"x", 0.0)
    pump_all([sender, stay])
    sender.conn.connection_lost()
    pump_all([stay])
    assert stay.take(PeerGoneEvent) == [PeerGoneEvent(sender.pub, 0)]
    assert not core._heard_from


def test_watch_conns_initial_dump_describes_each_keys_active_connection():
    core = make_core(mesh_key=MESH_KEY)
    key = NodePrivate.generate()
    older, newer = Pair(core, key), Pair(core, key)
    older.conn = core.accept(0.0, ("10.0.0.1", 1111), not_ideal=True)
    pump_all([older, newer])
    older.proto.note_preferred(True, 0.0)  # the older connection speaks: it is the active one
    pump_all([older, newer])
    watcher = Pair(core, mesh_key=MESH_KEY)
    pump_all([watcher])
    watcher.proto.watch_conns(0.0)
    pump_all([watcher])
    present = [e for e in watcher.take(PeerPresentEvent) if e.peer == key.public]
    assert [(e.addr, e.flags) for e in present] == [(("10.0.0.1", 1111), f.PeerPresentFlags.NOT_IDEAL)]
