"""Relay server core (sans-IO) and the client handshake helper, over an in-memory network."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.client import HandshakeState, RelayBindHandshake, RelayHandshakeFailed, RelayPathReady, allocate_request
from tsnet.relay.geneve import PROTOCOL_DISCO, PROTOCOL_WIREGUARD, encode_header
from tsnet.relay.server import (
    MAC_ROTATION_INTERVAL,
    RelayAllocationError,
    RelayNotReady,
    RelayServer,
    answer_allocate_request,
)
from tsnet.relay import server as server_mod

SERVER_ADDR = AddrPort.parse("192.0.2.1:7000")
SERVER_ADDR6 = AddrPort.parse("[2001:db8::1]:7000")
A_ADDR = AddrPort.parse("198.51.100.1:41641")
B_ADDR = AddrPort.parse("203.0.113.9:5555")
WG = b"\x04\x00\x00\x00" + bytes(range(60))


class Net:
    """Delivers datagrams between the server and client handshakes until quiet."""

    def __init__(self, server, clients):
        self.server = server
        self.clients = clients  # AddrPort -> RelayBindHandshake
        self.log = []

    def run(self, queue, now):
        while queue:
            data, src, dst = queue.pop(0)
            self.log.append((src, dst, bytes(data)))
            if dst in (SERVER_ADDR, SERVER_ADDR6):
                out = self.server.receive_datagram(data, src, now)
                if out is not None:
                    queue.append((bytes(out[0]), dst, out[1]))
            elif dst in self.clients:
                for dg in self.clients[dst].receive_datagram(data, src, now):
                    queue.append((dg.data, dst, dg.to))


def make(now=0.0, addrs=(SERVER_ADDR,)):
    srv = RelayServer(DiscoPrivate.generate(), now=now)
    srv.set_addr_ports(static=addrs)
    a, b = d.DiscoBoxes(DiscoPrivate.generate()), d.DiscoBoxes(DiscoPrivate.generate())
    return srv, a, b


def bound_pair(now=0.0):
    srv, a, b = make(now)
    ep = srv.allocate(a.public_key, b.public_key, now)
    ha = RelayBindHandshake(a, ep, generation=1, node_key=NodePrivate.generate().public)
    hb = RelayBindHandshake(b, ep, generation=5, node_key=NodePrivate.generate().public)
    net = Net(srv, {A_ADDR: ha, B_ADDR: hb})
    net.run([(dg.data, A_ADDR, dg.to) for dg in ha.start(now)], now)
    net.run([(dg.data, B_ADDR, dg.to) for dg in hb.start(now)], now + 0.01)
    return srv, ep, ha, hb, net


def test_allocate_not_ready_and_server_key():
    srv = RelayServer(DiscoPrivate.generate(), now=0)
    a, b = DiscoPrivate.generate().public, DiscoPrivate.generate().public
    with pytest.raises(RelayNotReady) as ei:
        srv.allocate(a, b, 0)
    assert ei.value.retry_after == 3.0
    srv.set_addr_ports(dynamic=[SERVER_ADDR])
    with pytest.raises(RelayAllocationError):
        srv.allocate(a, srv.disco_public, 0)


def test_allocate_fields_and_idempotence():
    srv, a, b = make()
    ep = srv.allocate(b.public_key, a.public_key, 0)
    assert ep.server_disco == srv.disco_public
    assert [k.raw for k in ep.client_disco] == sorted([a.public_key.raw, b.public_key.raw])
    assert (ep.vni, ep.lamport_id) == (1, 1)
    assert ep.bind_lifetime_ns == 30_000_000_000 and ep.steady_state_lifetime_ns == 300_000_000_000
    assert ep.addr_ports == (SERVER_ADDR,)
    # same unordered pair -> same allocation, with the current address list
    srv.set_addr_ports(static=[SERVER_ADDR], dynamic=[SERVER_ADDR6])
    again = srv.allocate(a.public_key, b.public_key, 5)
    assert (again.vni, again.lamport_id) == (1, 1)
    assert again.addr_ports == (SERVER_ADDR, SERVER_ADDR6)
    other = srv.allocate(a.public_key, DiscoPrivate.generate().public, 5)
    assert (other.vni, other.lamport_id) == (2, 2)
    assert srv.endpoint_gauge() == {"connecting": 2, "open": 0}


def test_vni_wraps_and_skips_in_use():
    srv, a, b = make()
    srv.allocate(a.public_key, b.public_key, 0)  # VNI 1
    srv._next_vni = server_mod.MAX_VNI
    e1 = srv.allocate(a.public_key, DiscoPrivate.generate().public, 0)
    e2 = srv.allocate(a.public_key, DiscoPrivate.generate().public, 0)
    assert e1.vni == server_mod.MAX_VNI
    assert e2.vni == 2  # 1 is in use


def test_full_handshake_binds_both_sides_and_forwards_verbatim():
    srv, ep, ha, hb, net = bound_pair()
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 1}
    assert ha.state is HandshakeState.DONE and hb.state is HandshakeState.DONE
    assert isinstance(ha.result, RelayPathReady) and ha.result.relay_addr == SERVER_ADDR
    assert ha.result.vni == ep.vni and ha.result.server_disco == srv.disco_public
    [s] = srv.sessions()
    assert set(s.bound) == {A_ADDR, B_ADDR}
    # The challenge is Geneve control, disco, same VNI, boxed by the server key.
    challenges = [p for (src, dst, p) in net.log if src == SERVER_ADDR and p[1] & 0x80]
    assert challenges and all(p[:8] == encode_header(PROTOCOL_DISCO, ep.vni, control=True) for p in challenges)
    sender, msg = ha.boxes.open_message(challenges[0][8:])
    assert sender == srv.disco_public and isinstance(msg, d.BindUDPRelayEndpointChallenge)
    # WireGuard through the relay: forwarded unchanged, counted.
    pkt = ha.wrap_wireguard(WG)
    assert pkt[:8] == encode_header(PROTOCOL_WIREGUARD, ep.vni)
    out = srv.receive_datagram(pkt, A_ADDR, 1.0)
    assert out is not None and bytes(out[0]) == pkt and out[1] == B_ADDR
    out = srv.receive_datagram(hb.wrap_wireguard(WG), B_ADDR, 1.0)
    assert out[1] == A_ADDR
    assert srv.forwarded_packets[("udp4", "udp4")] >= 2
    assert srv.forwarded_bytes[("udp4", "udp4")] >= 2 * len(pkt)
    text = srv.metrics_text()
    assert 'tailscaled_peer_relay_endpoints{state="open"} 1' in text
    assert 'tailscaled_peer_relay_endpoints{state="connecting"} 0' in text
    assert 'tailscaled_peer_relay_forwarded_packets_total{transport_in="udp4",transport_out="udp4"}' in text


def test_data_dropped_until_both_bound_and_from_strangers():
    srv, a, b = make()
    ep = srv.allocate(a.public_key, b.public_key, 0)
    ha = RelayBindHandshake(a, ep, generation=1)
    net = Net(srv, {A_ADDR: ha})
    net.run([(dg.data, A_ADDR, dg.to) for dg in ha.start(0)], 0)
    assert ha.state is HandshakeState.ANSWER_SENT  # bound, but the ping went nowhere
    assert srv.endpoint_gauge() == {"connecting": 1, "open": 0}
    assert srv.receive_datagram(ha.wrap_wireguard(WG), A_ADDR, 0) is None
    assert srv.dropped["not_bound"] >= 1
    srv2, ep2, ha2, hb2, _ = bound_pair()
    stranger = AddrPort.parse("192.0.2.99:1")
    assert srv2.receive_datagram(ha2.wrap_wireguard(WG), stranger, 0.1) is None
    assert srv2.dropped["unknown_source"] == 1
    assert srv2.receive_datagram(encode_header(PROTOCOL_WIREGUARD, ep2.vni + 1) + WG, A_ADDR, 0.1) is None
    assert srv2.dropped["unknown_vni"] == 1


def _control(boxes, srv, ep, msg, vni=None):
    return encode_header(PROTOCOL_DISCO, ep.vni if vni is None else vni, control=True) + boxes.seal(srv.disco_public, msg)


def _challenge_for(boxes, srv, ep, gen, src, now=0.0):
    other = [k for k in ep.client_disco if k != boxes.public_key][0]
    out = srv.receive_datagram(_control(boxes, srv, ep, d.BindUDPRelayEndpoint(ep.vni, gen, other)), src, now)
    assert out is not None and out[1] == src
    _, ch = boxes.open_message(out[0][8:])
    assert isinstance(ch, d.BindUDPRelayEndpointChallenge) and ch.generation == gen and ch.remote_key == other
    return other, ch


def test_bind_checks():
    srv, a, b = make()
    ep = srv.allocate(a.public_key, b.public_key, 0)
    # zero generation, wrong remote key, wrong inner VNI, stranger's disco key: no reply
    assert srv.receive_datagram(_control(a, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 0, b.public_key)), A_ADDR, 0) is None
    assert srv.receive_datagram(_control(a, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, a.public_key)), A_ADDR, 0) is None
    assert srv.receive_datagram(_control(a, srv, ep, d.BindUDPRelayEndpoint(ep.vni + 1, 1, b.public_key)), A_ADDR, 0) is None
    c = d.DiscoBoxes(DiscoPrivate.generate())
    assert srv.receive_datagram(_control(c, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, b.public_key)), A_ADDR, 0) is None
    # control but not disco protocol; garbage box
    assert srv.receive_datagram(encode_header(PROTOCOL_WIREGUARD, ep.vni, control=True) + WG, A_ADDR, 0) is None
    bad = bytearray(_control(a, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, b.public_key)))
    bad[-1] ^= 1
    assert srv.receive_datagram(bytes(bad), A_ADDR, 0) is None
    assert srv.endpoint_gauge() == {"connecting": 1, "open": 0}


def test_answer_checks_source_generation_and_mac():
    srv, a, b = make()
    ep = srv.allocate(a.public_key, b.public_key, 0)
    other, ch = _challenge_for(a, srv, ep, 7, A_ADDR)
    answer = d.BindUDPRelayEndpointAnswer(ep.vni, 7, other, ch.challenge)
    # from another source address: MAC does not match
    assert srv.receive_datagram(_control(a, srv, ep, answer), B_ADDR, 0) is None
    # wrong generation
    wrong_gen = d.BindUDPRelayEndpointAnswer(ep.vni, 8, other, ch.challenge)
    assert srv.receive_datagram(_control(a, srv, ep, wrong_gen), A_ADDR, 0) is None
    # tampered challenge
    forged = d.BindUDPRelayEndpointAnswer(ep.vni, 7, other, bytes(32))
    assert srv.receive_datagram(_control(a, srv, ep, forged), A_ADDR, 0) is None
    assert srv.sessions()[0].bound == (None, None)
    assert srv.receive_datagram(_control(a, srv, ep, answer), A_ADDR, 0) is None
    side = [k.raw for k in ep.client_disco].index(a.public_key.raw)
    assert srv.sessions()[0].bound[side] == A_ADDR
    # replaying the answer after completion does nothing (generation reset to 0)
    assert srv.receive_datagram(_control(a, srv, ep, answer), B_ADDR, 0) is None
    assert srv.sessions()[0].bound[side] == A_ADDR


def test_rebind_moves_side_to_new_source():
    srv, ep, ha, hb, net = bound_pair()
    new_addr = AddrPort.parse("198.51.100.1:9999")
    other, ch = _challenge_for(ha.boxes, srv, ep, 42, new_addr, now=1)
    srv.receive_datagram(_control(ha.boxes, srv, ep, d.BindUDPRelayEndpointAnswer(ep.vni, 42, other, ch.challenge)), new_addr, 1)
    assert srv.receive_datagram(hb.wrap_wireguard(WG), B_ADDR, 2)[1] == new_addr
    assert srv.receive_datagram(ha.wrap_wireguard(WG), A_ADDR, 2) is None


def test_mac_secret_rotation_accepts_current_and_previous():
    srv, a, b = make()
    ep = srv.allocate(a.public_key, b.public_key, 0)
    other, ch = _challenge_for(a, srv, ep, 3, A_ADDR, now=0)
    answer = d.BindUDPRelayEndpointAnswer(ep.vni, 3, other, ch.challenge)
    t = MAC_ROTATION_INTERVAL + 1  # one rotation: previous secret still accepted
    srv.receive_datagram(_control(b, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, a.public_key)), B_ADDR, t)
    srv.receive_datagram(_control(a, srv, ep, answer), A_ADDR, t)
    side = [k.raw for k in ep.client_disco].index(a.public_key.raw)
    assert srv.sessions()[0].bound[side] == A_ADDR

    srv, a, b = make()
    ep = srv.allocate(a.public_key, b.public_key, 0)
    other, ch = _challenge_for(a, srv, ep, 3, A_ADDR, now=0)
    srv.receive_datagram(_control(b, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, a.public_key)), B_ADDR, 121)
    srv.receive_datagram(_control(b, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, a.public_key)), B_ADDR, 242)
    answer = d.BindUDPRelayEndpointAnswer(ep.vni, 3, other, ch.challenge)
    assert srv.receive_datagram(_control(a, srv, ep, answer), A_ADDR, 242) is None
    assert srv.dropped["control_bad_mac"] == 1


def test_gc_unbound_endpoint_after_bind_lifetime():
    srv, a, b = make(now=0)
    ep = srv.allocate(a.public_key, b.public_key, 0)
    assert srv.get_timer() == 30.0
    srv.handle_timer(30.0)  # not strictly older than 30 s
    assert srv.endpoint_gauge()["connecting"] == 1
    assert srv.get_timer() == 60.0
    srv.handle_timer(60.0)
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 0}
    assert srv.receive_datagram(_control(a, srv, ep, d.BindUDPRelayEndpoint(ep.vni, 1, b.public_key)), A_ADDR, 61) is None
    # the pair can allocate again, getting a fresh VNI and Lamport id
    again = srv.allocate(a.public_key, b.public_key, 61)
    assert again.vni == 2 and again.lamport_id == 2


def test_gc_bound_endpoint_when_either_side_silent():
    srv, ep, ha, hb, net = bound_pair(now=0)
    # only A keeps sending; B is silent
    for t in range(30, 301, 30):
        srv.receive_datagram(ha.wrap_wireguard(WG), A_ADDR, t)
        srv.handle_timer(t)
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 1}
    srv.handle_timer(330)
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 0}
    assert srv.receive_datagram(ha.wrap_wireguard(WG), A_ADDR, 331) is None


def test_gc_keeps_active_endpoint():
    srv, ep, ha, hb, net = bound_pair(now=0)
    for t in range(30, 1000, 30):
        srv.receive_datagram(ha.wrap_wireguard(WG), A_ADDR, t)
        srv.receive_datagram(hb.wrap_wireguard(WG), B_ADDR, t)
        srv.handle_timer(t)
    assert srv.endpoint_gauge()["open"] == 1


def test_stun_binding_is_not_relayed():
    srv, ep, ha, hb, net = bound_pair()
    stun = b"\x01\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    assert srv.receive_datagram(stun, A_ADDR, 1) is None
    assert srv.stun_packets == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_server_never_raises_on_junk(data):
    srv, ep, ha, hb, net = _JUNK_SETUP
    srv.receive_datagram(data, A_ADDR, 1)
    srv.receive_datagram(encode_header(PROTOCOL_DISCO, ep.vni, control=True) + data, A_ADDR, 1)
    srv.receive_datagram(encode_header(PROTOCOL_DISCO, ep.vni, control=True) + d.MAGIC + ha.boxes.public_key.raw + data, A_ADDR, 1)


_JUNK_SETUP = bound_pair()


# --- allocation over DERP -------------------------------------------------------


def _relay_node():
    srv, a, b = make()
    node_boxes = d.DiscoBoxes(DiscoPrivate.generate())
    a_node = NodePrivate.generate().public
    netmap = {a_node: a.public_key}
    return srv, a, b, node_boxes, a_node, netmap


def test_answer_allocate_request_granted():
    srv, a, b, node_boxes, a_node, netmap = _relay_node()
    req = a.seal(node_boxes.public_key, allocate_request(a.public_key, b.public_key, 77))
    reply = answer_allocate_request(srv, node_boxes, a_node, req, 0, disco_key_of=netmap.get, is_granted=lambda n: n == a_node)
    assert reply is not None
    sender, msg = a.open_message(reply)
    assert sender == node_boxes.public_key  # boxed with the relay *node's* disco key
    assert isinstance(msg, d.AllocateUDPRelayEndpointResponse) and msg.generation == 77
    assert msg.endpoint.server_disco == srv.disco_public != node_boxes.public_key
    assert set(msg.endpoint.client_disco) == {a.public_key, b.public_key}


def test_answer_allocate_request_refusals():
    srv, a, b, node_boxes, a_node, netmap = _relay_node()
    req = a.seal(node_boxes.public_key, allocate_request(a.public_key, b.public_key, 1))
    kw = dict(disco_key_of=netmap.get)
    # not granted tailscale.com/cap/relay
    assert answer_allocate_request(srv, node_boxes, a_node, req, 0, is_granted=lambda n: False, **kw) is None
    # DERP source node unknown / its netmap disco key differs from the box sender
    stranger = NodePrivate.generate().public
    assert answer_allocate_request(srv, node_boxes, stranger, req, 0, is_granted=lambda n: True, **kw) is None
    c = d.DiscoBoxes(DiscoPrivate.generate())
    req_c = c.seal(node_boxes.public_key, allocate_request(c.public_key, b.public_key, 1))
    assert answer_allocate_request(srv, node_boxes, a_node, req_c, 0, is_granted=lambda n: True, **kw) is None
    # sender not one of the two client keys
    req_x = a.seal(node_boxes.public_key, allocate_request(c.public_key, b.public_key, 1))
    assert answer_allocate_request(srv, node_boxes, a_node, req_x, 0, is_granted=lambda n: True, **kw) is None
    # not ready: no reply at all
    srv.set_addr_ports()
    assert answer_allocate_request(srv, node_boxes, a_node, req, 0, is_granted=lambda n: True, **kw) is None
    # junk
    assert answer_allocate_request(srv, node_boxes, a_node, b"junk", 0, is_granted=lambda n: True, **kw) is None
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 0}


# --- client helper details --------------------------------------------------------------


def test_client_first_challenge_wins_and_timeout():
    srv, a, b = make(addrs=(SERVER_ADDR, SERVER_ADDR6))
    ep = srv.allocate(a.public_key, b.public_key, 0)
    ha = RelayBindHandshake(a, ep, generation=9)
    binds = ha.start(0)
    assert [dg.to for dg in binds] == [SERVER_ADDR, SERVER_ADDR6]
    assert ha.start(0) == []
    ch6 = srv.receive_datagram(binds[1].data, A_ADDR, 0)
    ch4 = srv.receive_datagram(binds[0].data, A_ADDR, 0)
    out = ha.receive_datagram(ch6[0], SERVER_ADDR6, 0.1)
    assert ha.relay_addr == SERVER_ADDR6 and len(out) == 2  # answer + ping
    assert all(dg.to == SERVER_ADDR6 for dg in out)
    assert ha.receive_datagram(ch4[0], SERVER_ADDR, 0.2) == []
    assert ha.get_timer() == 30.0
    ha.handle_timer(30.0)
    assert ha.state is HandshakeState.FAILED and isinstance(ha.result, RelayHandshakeFailed)


def test_client_rejects_zero_generation_and_foreign_endpoint():
    srv, a, b = make()
    ep = srv.allocate(a.public_key, b.public_key, 0)
    with pytest.raises(ValueError):
        RelayBindHandshake(a, ep, generation=0)
    with pytest.raises(ValueError):
        RelayBindHandshake(d.DiscoBoxes(DiscoPrivate.generate()), ep, generation=1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_client_handshake_never_raises_on_junk(data, control):
    srv, a, b = _CLIENT_FUZZ
    h = RelayBindHandshake(a, _CLIENT_FUZZ_EP, generation=1)
    h.start(0)
    hdr = encode_header(PROTOCOL_DISCO, _CLIENT_FUZZ_EP.vni, control=control)
    for pkt in (data, hdr + data, hdr + d.MAGIC + srv.disco_public.raw + data, hdr + d.MAGIC + b.public_key.raw + data):
        assert isinstance(h.receive_datagram(pkt, SERVER_ADDR, 0.5), list)


_CLIENT_FUZZ = make()
_CLIENT_FUZZ_EP = _CLIENT_FUZZ[0].allocate(_CLIENT_FUZZ[1].public_key, _CLIENT_FUZZ[2].public_key, 0)
