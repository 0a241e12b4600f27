"""Two MagicSock drivers on loopback with our DERP server (and its STUN responder).

The peers know each other's keys, endpoints and home DERP region (as control
would tell them): the first packets must flow over DERP (no path is trusted
yet), disco pings plus CallMeMaybe over DERP must confirm the direct path, and
WireGuard must move to direct UDP. With direct UDP blocked (test hook) the
path stays on DERP while traffic keeps flowing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from tests.lab import packets
from tsnet.control.server import default_derp_map
from tsnet.derp.server import DerpServer
from tsnet.key import NodePrivate, NodePublic
from tsnet.magicsock.conn import EndpointsChanged, PathChanged, PeerConfig
from tsnet.magicsock.driver import MagicSockDriver

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass
class Node:
    ip: str
    driver: MagicSockDriver
    replies: list[int]
    got_reply: trio.Event
    events: list[object]


async def _start_derp(nursery: trio.Nursery) -> tuple[DerpServer, object]:
    derp = DerpServer()
    port = await nursery.start(derp.serve_tcp, "127.0.0.1", 0)
    stun_port = await nursery.start(derp.serve_stun, "127.0.0.1", 0)
    return derp, default_derp_map("127.0.0.1", port, stun_port=stun_port)


def _echo_handler(node_box: list[Node]):
    """Answer ICMP echo requests; record the sequence numbers of replies."""

    def on_packet(peer: NodePublic, pkt: bytes) -> None:
        node = node_box[0]
        ip = packets.parse_ipv4(pkt)
        echo = packets.parse_icmp_echo(ip.payload)
        if not echo.is_reply:
            node.driver.send_ip_packet(packets.icmp_echo(str(ip.dst), str(ip.src), echo.ident, echo.seq,
                                                         echo.data, reply=True))
        else:
            node.replies.append(echo.seq)
            node.got_reply.set()

    return on_packet


async def _node(nursery: trio.Nursery, ip: str, *, drop_direct: bool = False) -> Node:
    box: list[Node] = []
    events: list[object] = []
    driver = MagicSockDriver(NodePrivate.generate(), bind_v4="127.0.0.1", bind_v6=None,
                             local_addresses=[LOOPBACK], derp_plain_http=True, drop_direct_udp=drop_direct,
                             on_packet=_echo_handler(box), on_event=events.append)
    node = Node(ip, driver, [], trio.Event(), events)
    box.append(node)
    await nursery.start(driver.run)
    return node


def _peer_of(node: Node) -> PeerConfig:
    # As control would: the endpoints the node reported (here its loopback address and port).
    eps = tuple(e.addr for e in node.driver.core.endpoints)
    assert eps
    return PeerConfig(node.driver.node_key, node.driver.disco_key, eps, 900, 133,
                      (ipaddress.ip_network(f"{node.ip}/32"),), name=node.ip)


@pytest.fixture
async def pair_factory() -> AsyncIterator[object]:
    async with trio.open_nursery() as nursery:

        async def make(drop_direct: bool = False) -> tuple[Node, Node]:
            _, derp_map = await _start_derp(nursery)
            a = await _node(nursery, "100.64.0.1", drop_direct=drop_direct)
            b = await _node(nursery, "100.64.0.2", drop_direct=drop_direct)
            for n in (a, b):
                n.driver.set_derp_map(derp_map)
            a.driver.set_peers([_peer_of(b)])
            b.driver.set_peers([_peer_of(a)])
            return a, b

        yield make
        nursery.cancel_scope.cancel()


async def _ping(a: Node, b: Node, seq: int, timeout: float = 5.0) -> None:
    """One echo round trip a -> b -> a (resent every 200 ms while unanswered: UDP may drop)."""
    with trio.fail_after(timeout):
        while seq not in a.replies:
            a.got_reply = trio.Event()
            assert a.driver.send_ip_packet(packets.icmp_echo(a.ip, b.ip, 7, seq, b"hello"))
            with trio.move_on_after(0.2):
                await a.got_reply.wait()


async def _ping_until(a: Node, b: Node, cond, timeout: float, start_seq: int) -> int:
    seq = start_seq
    with trio.fail_after(timeout):
        while not cond():
            await _ping(a, b, seq)
            seq += 1
            await trio.sleep(0.05)  # traffic pacing, not synchronisation: the loop waits on cond()
    return seq


async def test_starts_on_derp_then_goes_direct(pair_factory) -> None:
    a, b = await pair_factory()
    await _ping(a, b, 1)
    # The very first packets went over DERP: nothing direct was known yet.
    assert b.driver.core.counters.get("wg_received_derp", 0) > 0
    assert a.driver.core.counters.get("wg_sent_derp", 0) > 0
    # CallMeMaybe over DERP brought the endpoints; pongs make the path direct on both sides.
    seq = await _ping_until(
        a, b, lambda: a.driver.peer_status(b.driver.node_key).kind == "direct"
        and b.driver.peer_status(a.driver.node_key).kind == "direct", 10.0, 2)
    st = a.driver.peer_status(b.driver.node_key)
    assert st.addr == f"127.0.0.1:{b.driver.local_port()}"
    assert st.latency is not None and st.latency < 1.0
    assert st.last_change is not None
    assert any(isinstance(e, PathChanged) and e.new == st.addr for e in a.events)
    assert any(isinstance(e, EndpointsChanged) for e in a.events)
    assert b.driver.core.counters.get("disco_recv_callmemaybe", 0) + a.driver.core.counters.get(
        "disco_recv_callmemaybe", 0) > 0
    # On a trusted direct path no more WireGuard goes via DERP.
    derp_a = a.driver.core.counters.get("wg_sent_derp", 0)
    derp_b = b.driver.core.counters.get("wg_sent_derp", 0)
    for i in range(5):
        await _ping(a, b, seq + i)
    assert a.driver.core.counters.get("wg_sent_derp", 0) == derp_a
    assert b.driver.core.counters.get("wg_sent_derp", 0) == derp_b
    assert a.driver.core.counters["udp_sent_direct"] > 0


async def test_stays_on_derp_when_direct_udp_is_blocked(pair_factory) -> None:
    a, b = await pair_factory(drop_direct=True)
    seq = 1
    # Run until both sides have done discovery (pings and a CallMeMaybe round), then
    # check they are still on DERP and traffic still flows.
    seq = await _ping_until(
        a, b, lambda: a.driver.core.counters.get("disco_recv_callmemaybe", 0) > 0
        or b.driver.core.counters.get("disco_recv_callmemaybe", 0) > 0, 10.0, seq)
    for i in range(5):
        await _ping(a, b, seq + i)
    for x, y in ((a, b), (b, a)):
        st = x.driver.peer_status(y.driver.node_key)
        assert st.kind == "derp" and st.derp_region == 900 and not st.trusted
        assert x.driver.core.counters.get("udp_dropped_by_hook", 0) > 0
    assert b.driver.core.counters.get("wg_received_derp", 0) >= 6
    assert not any(isinstance(e, PathChanged) for e in a.events + b.events)
