"""Cryptokey routing on receive, end to end: a node drops packets whose inner source address
belongs to another node, whatever key sealed them (else a peer could borrow another node's
address and its rights in the packet filter)."""

from __future__ import annotations

import trio

from tests.netstack.netutil import udp
from tests.server_helpers import start_tailnet, wait_for


async def test_a_peer_cannot_send_with_another_nodes_address(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    srv, good, evil = tailnet.node("srv"), tailnet.node("good"), tailnet.node("evil")
    for node in (srv, good, evil):
        await node.up(timeout=10)
    await evil.wait_for_peer("srv", timeout=10)
    await srv.wait_for_peer("evil", timeout=10)
    srv_ip, good_ip, evil_ip = (str(n.tailscale_ips()[0]) for n in (srv, good, evil))
    listener = await srv.listen("udp", ":9001")

    # evil builds the datagrams itself and hands them to its magicsock, bypassing its own stack:
    # first one that claims good's address, then one with its own.
    assert evil._driver is not None
    evil._driver.send_ip_packets([udp(good_ip, srv_ip, 4000, 9001, b"spoofed")])
    evil._driver.send_ip_packets([udp(evil_ip, srv_ip, 4000, 9001, b"genuine")])

    with trio.fail_after(10):
        data, (addr, port) = await listener.recvfrom(100)
    assert (data, addr, port) == (b"genuine", evil_ip, 4000)
    await wait_for(lambda: srv.metrics().get("tsnet_magicsock_core_wg_source_not_allowed") == 1,
                   what="the spoofed datagram counted as dropped")
    # good itself may of course use its address.
    sock = await good.dial("udp", f"{srv_ip}:9001")
    await sock.send(b"from good")
    with trio.fail_after(10):
        assert await listener.recvfrom(100) == (b"from good", (good_ip, sock.getsockname()[1]))
    assert srv.metrics()["tsnet_magicsock_core_wg_source_not_allowed"] == 1
