"""Receive-side disco acceptance rules."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from tsnet.key import DiscoPrivate, DiscoPublic, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.discorecv import DiscoPeer, DiscoReceiver, ReceivedDisco
from tsnet.magicsock.endpoint import DerpPath, UDPPath

ME = d.DiscoBoxes(DiscoPrivate.generate())
PEER = d.DiscoBoxes(DiscoPrivate.generate())
OLD = d.DiscoBoxes(DiscoPrivate.generate())
SERVER = d.DiscoBoxes(DiscoPrivate.generate())
STRANGER = d.DiscoBoxes(DiscoPrivate.generate())
PEER_NODE, PEER2_NODE, OLD_NODE = (NodePrivate.generate().public for _ in range(3))
UDP = UDPPath(AddrPort.parse("203.0.113.1:41641"))
RELAY = UDPPath(AddrPort.parse("192.0.2.1:7000"), vni=9)
DERP = DerpPath(3)
PING = d.Ping(bytes(12), PEER_NODE)
EP = d.UDPRelayEndpoint(SERVER.public_key, (ME.public_key, PEER.public_key), 1, 9, 1, 1, (RELAY.addr,))


def receiver(**kw):
    r = DiscoReceiver(ME, **kw)
    r.set_peers([
        DiscoPeer(PEER_NODE, PEER.public_key, 133),
        DiscoPeer(PEER2_NODE, PEER.public_key, 133),  # same disco key on two nodes
        DiscoPeer(OLD_NODE, OLD.public_key, 120),
        DiscoPeer(NodePrivate.generate().public, DiscoPublic.zero(), 133),  # pre-disco: ignored
    ])
    return r


def seal(boxes, msg):
    return boxes.seal(ME.public_key, msg)


def test_ping_pong_from_peer_on_any_path():
    r = receiver()
    for path in (UDP, RELAY, DERP):
        got = r.receive(seal(PEER, PING), path, derp_src=PEER_NODE if path is DERP else None)
        nodes = (PEER_NODE,) if path is DERP else (PEER_NODE, PEER2_NODE)  # DERP: the node DERP vouches for
        assert got == ReceivedDisco(PEER.public_key, PING, path, nodes)
    pong = d.Pong(bytes(12), UDP.addr)
    assert r.receive(seal(PEER, pong), UDP).message == pong
    assert r.received == {"Ping": 3, "Pong": 1}


def test_unknown_sender_and_bad_box_dropped():
    r = receiver()
    assert r.receive(seal(STRANGER, PING), UDP) is None
    pkt = bytearray(seal(PEER, PING))
    pkt[-1] ^= 1
    assert r.receive(bytes(pkt), UDP) is None
    assert r.receive(b"junk", UDP) is None
    assert r.dropped == {"unknown_sender": 1, "bad_box": 1, "not_disco": 1}


def test_call_me_maybe_only_via_derp_from_matching_node():
    r = receiver()
    cmm = d.CallMeMaybe((UDP.addr,))
    assert r.receive(seal(PEER, cmm), UDP) is None
    assert r.receive(seal(PEER, cmm), DERP) is None  # no DERP source
    assert r.receive(seal(PEER, cmm), DERP, derp_src=OLD_NODE) is None  # node's disco key differs
    assert r.receive(seal(PEER, cmm), DERP, derp_src=NodePrivate.generate().public) is None
    got = r.receive(seal(PEER, cmm), DERP, derp_src=PEER_NODE)
    assert got.nodes == (PEER_NODE,) and got.message == cmm
    assert r.dropped == {
        "derp_only_message_not_via_derp": 2,
        "derp_source_disco_mismatch": 1,
        "derp_source_not_a_peer": 1,
    }


def test_call_me_maybe_via_rules():
    via = d.CallMeMaybeVia(EP)
    assert receiver().receive(seal(PEER, via), DERP, derp_src=PEER_NODE).message == via
    assert receiver(relay_client_enabled=False).receive(seal(PEER, via), DERP, derp_src=PEER_NODE) is None
    r = receiver()
    assert r.receive(seal(OLD, via), DERP, derp_src=OLD_NODE) is None  # cap 120 < 121
    assert r.dropped == {"peer_not_relay_capable": 1}


def test_allocate_request_sender_must_be_a_client():
    r = receiver()
    ok = d.AllocateUDPRelayEndpointRequest((ME.public_key, PEER.public_key), 1)
    bad = d.AllocateUDPRelayEndpointRequest((ME.public_key, STRANGER.public_key), 1)
    assert r.receive(seal(PEER, ok), DERP, derp_src=PEER_NODE).message == ok
    assert r.receive(seal(PEER, bad), DERP, derp_src=PEER_NODE) is None
    resp = d.AllocateUDPRelayEndpointResponse(1, EP)
    assert r.receive(seal(PEER, resp), DERP, derp_src=PEER_NODE).message == resp


def test_geneve_control_only_challenges_from_expected_servers():
    r = receiver()
    ch = d.BindUDPRelayEndpointChallenge(9, 1, PEER.public_key, bytes(32))
    assert r.receive(seal(SERVER, ch), RELAY, geneve_control=True) is None  # no handshake yet
    r.expect_relay_server(SERVER.public_key)
    got = r.receive(seal(SERVER, ch), RELAY, geneve_control=True)
    assert got.relay_handshake and got.message == ch and got.nodes == ()
    # a ping in a control packet, or a challenge from a peer key: dropped
    assert r.receive(seal(SERVER, PING), RELAY, geneve_control=True) is None
    assert r.receive(seal(PEER, ch), RELAY, geneve_control=True) is None
    # a challenge outside Geneve control is not a handshake message
    assert r.receive(seal(PEER, ch), UDP) is None
    r.forget_relay_server(SERVER.public_key)
    assert r.receive(seal(SERVER, ch), RELAY, geneve_control=True) is None


def test_bind_from_peer_is_dropped():
    r = receiver()
    assert r.receive(seal(PEER, d.BindUDPRelayEndpoint(9, 1, ME.public_key)), UDP) is None
    assert r.dropped == {"unexpected_message": 1}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=150), st.booleans())
def test_never_raises(tail, control):
    r = _FUZZ
    for pkt in (tail, d.MAGIC + PEER.public_key.raw + tail, d.MAGIC + SERVER.public_key.raw + tail):
        r.receive(pkt, RELAY, geneve_control=control)
        r.receive(pkt, DERP, derp_src=PEER_NODE)


_FUZZ = receiver()
_FUZZ.expect_relay_server(SERVER.public_key)
