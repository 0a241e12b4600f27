"""tsnet.Server on top of the magicsock first-contact fixes: two nodes started together dial at once.

``up()`` no longer waits for control to have our endpoints, and ``wait_for_peer()`` only for
the peer to be in the netmap; the first dial must still finish with one WireGuard initiation,
far below REKEY_TIMEOUT. ``ping()`` is a disco ping whose path names direct or DERP.
"""

from __future__ import annotations

import pytest
import trio

import tsnet
from tests.server_helpers import start_tailnet

REKEY_TIMEOUT = 5.0


async def test_nodes_started_together_dial_at_once_and_ping(nursery, tmp_path) -> None:
    tailnet = await start_tailnet(nursery, tmp_path)
    a, b = tailnet.node("alpha"), tailnet.node("bravo")
    async with trio.open_nursery() as starting:
        starting.start_soon(a.up)
        starting.start_soon(b.up)

    async def echo(stream) -> None:
        async with stream:
            await stream.send_all(await stream.receive_some(100))

    async with trio.open_nursery() as serving:
        listener = await b.listen("tcp", ":8080")
        serving.start_soon(trio.serve_listeners, echo, [listener])
        await a.wait_for_peer("bravo", timeout=10)
        t0 = trio.current_time()
        with trio.fail_after(REKEY_TIMEOUT):
            stream = await a.dial("tcp", "bravo:8080")
            await stream.send_all(b"first")
            assert await stream.receive_some(100) == b"first"
        elapsed = trio.current_time() - t0
        assert elapsed < 2.0, elapsed
        assert a._driver.core.wg.counters.initiations_sent == 1
        await stream.aclose()

        result = await b.ping("alpha", timeout=5)
        assert result.peer == "alpha" and result.ip == a.tailscale_ips()[0] and 0 < result.latency < 5
        assert result.path.startswith(("direct 127.0.0.1:", "derp region 900")), result.path
        by_ip = await a.ping(str(b.tailscale_ips()[0]), timeout=5)
        assert by_ip.peer == "bravo"
        with pytest.raises(tsnet.HostNotFoundError):
            await a.ping("nosuchnode", timeout=1)
        serving.cancel_scope.cancel()
    with trio.fail_after(10):
        await a.close()
        await b.close()
