"""The relay server's trio driver over real UDP on 127.0.0.1 with two handshaking clients."""

from __future__ import annotations

import contextlib
import socket

import pytest
import trio

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.client import HandshakeState, RelayBindHandshake, allocate_request
from tsnet.relay.driver import open_udp_socket, open_udp_sockets, serve_relay
from tsnet.relay.geneve import PROTOCOL_DISCO, encode_header
from tsnet.relay.server import RelayServer, answer_allocate_request


async def _client_loop(h: RelayBindHandshake, sock, done: trio.Event):
    """Feed every datagram to the handshake; keep answering pings after completion."""
    for dg in h.start(trio.current_time()):
        await sock.sendto(dg.data, dg.to.to_sockaddr())
    while True:
        data, sa = await sock.recvfrom(4096)
        for dg in h.receive_datagram(data, AddrPort.from_sockaddr(sa), trio.current_time()):
            await sock.sendto(dg.data, dg.to.to_sockaddr())
        if h.state is HandshakeState.DONE:
            done.set()


def _udp():
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return s


async def _recv_wireguard(sock):
    """Next Geneve-WireGuard datagram; late handshake pings/pongs still in flight are skipped."""
    while True:
        data, src = await sock.recvfrom(4096)
        if data[2:4] == b"\x7a\x12":
            return data, src


async def _wait_for(cond):
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.001)


@pytest.mark.parametrize("group", [1, 4], ids=["one-socket", "reuseport-group-of-4"])
async def test_two_clients_bind_and_exchange_packets_through_relay(group: int):
    relay_socks = open_udp_sockets("127.0.0.1", 0, count=group)
    assert len({s.getsockname() for s in relay_socks}) == 1  # one port for the whole group
    relay_sock = relay_socks[0]
    relay_addr = AddrPort.from_sockaddr(relay_sock.getsockname())
    srv = RelayServer(DiscoPrivate.generate(), now=trio.current_time())
    srv.set_addr_ports(static=[relay_addr])
    node_boxes = d.DiscoBoxes(DiscoPrivate.generate())  # the relay node's own disco key

    a_node, b_node, c_node = (NodePrivate.generate().public for _ in range(3))
    a, b, c = (d.DiscoBoxes(DiscoPrivate.generate()) for _ in range(3))
    netmap = {a_node: a.public_key, b_node: b.public_key, c_node: c.public_key}
    granted = {a_node, b_node}

    def derp_to_relay(src_node, packet):
        return answer_allocate_request(
            srv, node_boxes, src_node, packet, trio.current_time(),
            disco_key_of=netmap.get, is_granted=granted.__contains__,
        )

    # The ungranted client C is refused: no response at all.
    assert derp_to_relay(c_node, c.seal(node_boxes.public_key, allocate_request(c.public_key, a.public_key, 1))) is None

    # A allocates (as if over DERP) and hands the endpoint to B (as CallMeMaybeVia would).
    reply = derp_to_relay(a_node, a.seal(node_boxes.public_key, allocate_request(a.public_key, b.public_key, 1)))
    _, resp = a.open_message(reply)
    ep = resp.endpoint
    assert ep.addr_ports == (relay_addr,)
    cmm_via = d.parse_message(d.CallMeMaybeVia(ep).to_bytes())

    sa, sb, sc = _udp(), _udp(), _udp()
    with sa, sb, sc, contextlib.ExitStack() as relay_group:
        for relay in relay_socks:
            relay_group.callback(relay.close)
        for s in (sa, sb, sc):
            await s.bind(("127.0.0.1", 0))
        a_addr = AddrPort.from_sockaddr(sa.getsockname())
        b_addr = AddrPort.from_sockaddr(sb.getsockname())
        ha = RelayBindHandshake(a, ep, generation=1, node_key=a_node)
        hb = RelayBindHandshake(b, cmm_via.endpoint, generation=1, node_key=b_node)
        done_a, done_b = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relay, srv, *relay_socks)
            nursery.start_soon(_client_loop, ha, sa, done_a)
            nursery.start_soon(_client_loop, hb, sb, done_b)
            with trio.fail_after(5):
                await done_a.wait()
                await done_b.wait()
            assert ha.result.relay_addr == relay_addr and hb.result.relay_addr == relay_addr
            assert srv.endpoint_gauge() == {"connecting": 0, "open": 1}
            assert set(srv.sessions()[0].bound) == {a_addr, b_addr}
            nursery.cancel_scope.cancel()

        # Handshakes done: exchange "WireGuard" datagrams through the relay.
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relay, srv, *relay_socks)
            with trio.fail_after(5):
                for i in range(20):
                    pkt = ha.wrap_wireguard(b"\x04\x00\x00\x00" + i.to_bytes(4, "big") + bytes(100))
                    await sa.sendto(pkt, relay_addr.to_sockaddr())
                    got, src = await _recv_wireguard(sb)
                    assert got == pkt and AddrPort.from_sockaddr(src) == relay_addr
                    back = hb.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(8))
                    await sb.sendto(back, relay_addr.to_sockaddr())
                    got, _ = await _recv_wireguard(sa)
                    assert got == back
            assert srv.forwarded_packets[("udp4", "udp4")] >= 40

            # C knows the VNI but is not one of the endpoint's clients: bind is dropped,
            # and its data is not forwarded.
            before = dict(srv.dropped)
            bind = encode_header(PROTOCOL_DISCO, ep.vni, control=True) + c.seal(
                srv.disco_public, d.BindUDPRelayEndpoint(ep.vni, 1, a.public_key)
            )
            await sc.sendto(bind, relay_addr.to_sockaddr())
            await sc.sendto(ha.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(8)), relay_addr.to_sockaddr())
            await _wait_for(lambda: srv.dropped.get("unknown_source", 0) > before.get("unknown_source", 0))
            assert srv.dropped.get("control_unknown_sender", 0) == before.get("control_unknown_sender", 0) + 1
            nursery.cancel_scope.cancel()


async def test_driver_runs_gc_on_mock_clock(autojump_clock):
    relay_sock = open_udp_socket("127.0.0.1", 0)
    srv = RelayServer(DiscoPrivate.generate(), now=trio.current_time())
    srv.set_addr_ports(static=[AddrPort.from_sockaddr(relay_sock.getsockname())])
    a, b = (d.DiscoBoxes(DiscoPrivate.generate()) for _ in range(2))
    srv.allocate(a.public_key, b.public_key, trio.current_time())
    with relay_sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relay, srv, relay_sock)
            await trio.sleep(59)  # virtual time: GC at 30 s (not yet expired) and 60 s
            assert srv.endpoint_gauge()["connecting"] == 1
            await trio.sleep(2)
            assert srv.endpoint_gauge()["connecting"] == 0
            nursery.cancel_scope.cancel()


async def test_forwarding_between_ipv4_and_ipv6_clients():
    s4, s6 = open_udp_socket("127.0.0.1", 0), open_udp_socket("::1", 0)
    relay4 = AddrPort.from_sockaddr(s4.getsockname())
    relay6 = AddrPort.from_sockaddr(s6.getsockname())
    srv = RelayServer(DiscoPrivate.generate(), now=trio.current_time())
    srv.set_addr_ports(static=[relay4, relay6])
    a, b = (d.DiscoBoxes(DiscoPrivate.generate()) for _ in range(2))
    ep = srv.allocate(a.public_key, b.public_key, trio.current_time())
    ca = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cb = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s4, s6, ca, cb:
        await ca.bind(("127.0.0.1", 0))
        await cb.bind(("::1", 0))
        # each client only reaches the relay over its own family
        v4_only = d.UDPRelayEndpoint(ep.server_disco, ep.client_disco, ep.lamport_id, ep.vni,
                                     ep.bind_lifetime_ns, ep.steady_state_lifetime_ns, (relay4,))
        v6_only = d.UDPRelayEndpoint(ep.server_disco, ep.client_disco, ep.lamport_id, ep.vni,
                                     ep.bind_lifetime_ns, ep.steady_state_lifetime_ns, (relay6,))
        ha = RelayBindHandshake(a, v4_only, generation=3)
        hb = RelayBindHandshake(b, v6_only, generation=4)
        done_a, done_b = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relay, srv, s4, s6)
            nursery.start_soon(_client_loop, ha, ca, done_a)
            nursery.start_soon(_client_loop, hb, cb, done_b)
            with trio.fail_after(5):
                await done_a.wait()
                await done_b.wait()
            assert ha.result.relay_addr == relay4 and hb.result.relay_addr == relay6
            assert srv.forwarded_packets.get(("udp4", "udp6"), 0) >= 1
            assert srv.forwarded_packets.get(("udp6", "udp4"), 0) >= 1
            nursery.cancel_scope.cancel()
