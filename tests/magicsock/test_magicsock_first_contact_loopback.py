"""Two MagicSock drivers that come up together on loopback, and disco pings on demand.

The nodes learn about each other at different moments (as from control): when A
first sends, its netmap has no DERP region for B, and B's netmap has no A at all.
The first echo must still complete with a single WireGuard initiation, far below
REKEY_TIMEOUT (5 s).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio

from tests.lab import packets
from tests.magicsock.test_magicsock_conn_loopback import Node, _node, _peer_of, _ping_until, _start_derp
from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock.conn import PeerConfig

REKEY_TIMEOUT = 5.0


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition on real I/O (checked every few ms, bounded)."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


def _without_derp(cfg: PeerConfig) -> PeerConfig:
    return PeerConfig(cfg.node_key, cfg.disco_key, (), 0, cfg.cap, cfg.allowed_ips, cfg.name)


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node]]:
    async with trio.open_nursery() as nursery:
        _, derp_map = await _start_derp(nursery)
        a = await _node(nursery, "100.64.0.1")
        b = await _node(nursery, "100.64.0.2")
        for n in (a, b):
            n.driver.set_derp_map(derp_map)
        with trio.fail_after(5):
            for n in (a, b):
                await n.driver.regions.clients[900].wait_connected()
        yield a, b
        nursery.cancel_scope.cancel()


async def test_simultaneous_start_first_echo_needs_one_handshake(nodes) -> None:
    a, b = nodes
    a.driver.set_peers([_without_derp(_peer_of(b))])  # control has not heard B's DERP region yet
    b.driver.set_peers([])  # and B's netmap does not list A yet
    t0 = trio.current_time()
    assert a.driver.send_ip_packet(packets.icmp_echo(a.ip, b.ip, 7, 1, b"first"))  # sent once, never again
    assert a.driver.core.counters["wg_initiation_held"] == 1
    a.driver.set_peers([_peer_of(b)])  # A's netmap update: B's home DERP; the held initiation goes
    await _until(lambda: b.driver.core.counters.get("wg_initiation_unknown_kept", 0) >= 1)
    b.driver.set_peers([_peer_of(a)])  # B's netmap update: A's initiation is answered now
    with trio.fail_after(REKEY_TIMEOUT):
        await a.got_reply.wait()
    elapsed = trio.current_time() - t0
    assert a.replies == [1]
    assert elapsed < 2.0, elapsed
    assert a.driver.core.wg.counters.initiations_sent == 1
    assert b.driver.core.counters["wg_initiation_replayed"] == 1


async def test_disco_ping_reports_path_and_latency(nodes) -> None:
    a, b = nodes
    a.driver.set_peers([_peer_of(b)])
    b.driver.set_peers([_peer_of(a)])
    # No traffic yet: pings go over DERP and to B's endpoint; the first pong answers.
    r = await a.driver.disco_ping(b.driver.node_key, timeout=2.0)
    direct = f"127.0.0.1:{b.driver.local_port()}"
    assert r.peer == b.driver.node_key and 0 < r.latency < 2.0
    assert r.path in (f"direct {direct}", "derp region 900")
    assert not a.driver._ping_waiters
    # Once the direct path is trusted, the ping goes there alone.
    await _ping_until(a, b, lambda: a.driver.peer_status(b.driver.node_key).trusted, 10.0, 1)
    r = await a.driver.disco_ping(b.driver.node_key, timeout=2.0)
    assert r.kind == "direct" and r.path == f"direct {direct}" and r.derp_region is None
    assert r.pong_src.port == a.driver.local_port()


async def test_disco_ping_times_out_without_an_answer(nodes) -> None:
    a, _ = nodes
    ghost = NodePrivate.generate().public  # in the netmap, but never connected anywhere
    cfg = PeerConfig(ghost, DiscoPrivate.generate().public, (), 900, 133, (), "ghost")
    a.driver.set_peers([cfg])
    with pytest.raises(TimeoutError, match="no pong"):
        await a.driver.disco_ping(ghost, timeout=0.3)
    assert not a.driver._ping_waiters and not a.driver.core._cli_requests
    with pytest.raises(KeyError):
        await a.driver.disco_ping(NodePrivate.generate().public)
