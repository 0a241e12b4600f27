"""The inbound packet filter on a Python node, driven by the control server's policy (applied live)."""

from __future__ import annotations

import pytest
import trio

from tests.server_helpers import start_tailnet, wait_for

POLICY = """{
  "tagOwners": {"tag:srv": []},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:srv:8001"]},
    {"action": "accept", "src": ["tag:srv"], "dst": ["*:*"]},
  ],
}"""

POLICY_B_TOO = POLICY.replace('"tag:srv:8001"', '"tag:srv:8001,8002"')


async def _serve_hello(listener, nursery):
    async def handle(stream):
        async with stream:
            await stream.send_all(b"hello")

    async def serve():
        try:
            await trio.serve_listeners(handle, [listener])
        except* trio.ClosedResourceError:
            pass  # the node closed its listener at the end of the test

    nursery.start_soon(serve)


async def _read_hello(node, target):
    stream = await node.dial("tcp", target, timeout=10)
    with trio.fail_after(5):
        data = await stream.receive_some(100)
    await stream.aclose()
    return data


async def test_allowed_port_denied_port_and_outbound(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path, policy=POLICY)
    srv = tailnet.node("srv", auth_key=tailnet.authkey(tags=("tag:srv",), ephemeral=True, reusable=True))
    client = tailnet.node("client")
    await srv.up(timeout=10)
    await client.up(timeout=10)

    await srv.wait_for_peer("client", timeout=10)
    await client.wait_for_peer("srv", timeout=10)
    await _serve_hello(await srv.listen("tcp", ":8001"), nursery)
    await _serve_hello(await srv.listen("tcp", ":8002"), nursery)

    # Port A is allowed.
    assert await _read_hello(client, "srv:8001") == b"hello"
    # Port B is not: srv drops the SYN and answers with a TSMP reject; the dial does not complete.
    rejects_before = srv._filter.rejects
    with pytest.raises(TimeoutError):
        await client.dial("tcp", "srv:8002", timeout=1.5)
    assert srv._filter.rejects > rejects_before
    assert srv.metrics()["tsnet_filter_dropped"] > 0

    # Our (srv's) outbound connections to that peer still work, TCP and UDP (replies pass by flow).
    await _serve_hello(await client.listen("tcp", ":9000"), nursery)
    assert await _read_hello(srv, "client:9000") == b"hello"
    echo = await client.listen("udp", ":9001")

    async def udp_echo():
        data, addr = await echo.recvfrom(100)
        await echo.sendto(data.upper(), addr)

    nursery.start_soon(udp_echo)
    sock = await srv.dial("udp", "client:9001")
    with trio.fail_after(5):
        await sock.send(b"flow")
        assert await sock.recv() == b"FLOW"

    # A policy change applies live, without restarting the node.
    tailnet.set_policy(POLICY_B_TOO)
    await wait_for(lambda: any(
        r.dst_ports and any(p.ports.first <= 8002 <= p.ports.last for p in r.dst_ports)
        for r in srv._netmap.packet_filter))
    assert await _read_hello(client, "srv:8002") == b"hello"
    await client.close()
    await srv.close()
