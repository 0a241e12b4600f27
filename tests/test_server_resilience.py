"""tsnet.Server across a control server restart: the data plane keeps working, the nodes reconnect."""

from __future__ import annotations

import trio

import tsnet
from tsnet.control.server import ControlServer, ServerConfig, default_derp_map
from tsnet.control.store import Store as ControlStore
from tsnet.derp.server import DerpServer


async def _serve_control(store, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
    config = ServerConfig(ephemeral_timeout=3600)
    server = ControlServer(store, config)
    derp = DerpServer()
    server.attach_derp(derp)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, "127.0.0.1", port)
        config.derp_map = default_derp_map("127.0.0.1", bound)
        task_status.started((server, bound))


async def test_nodes_survive_a_control_server_restart(tmp_path):
    store = ControlStore.open(tmp_path / "control")
    try:
        async with trio.open_nursery() as outer:
            control_scope = trio.CancelScope()

            async def control(task_status=trio.TASK_STATUS_IGNORED):
                with control_scope:
                    await _serve_control(store, 0, task_status=task_status)

            server, port = await outer.start(control)
            url = f"http://127.0.0.1:{port}"
            key = store.create_authkey(server.now(), reusable=True, ephemeral=True).key
            a, b = (tsnet.Server(hostname=n, control_url=url, auth_key=key, ephemeral=True, udp_bind="127.0.0.1")
                    for n in ("a", "b"))
            await a.up(timeout=10)
            await b.up(timeout=10)
            await a.wait_for_peer("b")
            await b.wait_for_peer("a")
            listener = await b.listen("tcp", ":80")

            async def hello():
                try:
                    while True:
                        stream = await listener.accept()
                        await stream.send_all(b"hi")
                        await stream.aclose()
                except trio.ClosedResourceError:
                    pass

            outer.start_soon(hello)

            async def fetch() -> bytes:
                stream = await a.dial("tcp", "b:80", timeout=10)
                with trio.fail_after(10):
                    data = await stream.receive_some(10)
                await stream.aclose()
                return data

            assert await fetch() == b"hi"
            control_scope.cancel()  # control (and its DERP) go away
            with trio.fail_after(10):
                while a.metrics().get("tsnet_control_map_connected", 0) == 1.0:
                    await trio.sleep(0.01)  # waiting for the client to notice (bounded)
            assert any("control" in h for h in a.status().health)
            assert await fetch() == b"hi"  # the data plane does not need control
            restarted_scope = trio.CancelScope()

            async def control_again(task_status=trio.TASK_STATUS_IGNORED):
                with restarted_scope:
                    await _serve_control(store, port, task_status=task_status)

            server, _ = await outer.start(control_again)
            c = tsnet.Server(hostname="c", control_url=url, auth_key=key, ephemeral=True, udp_bind="127.0.0.1")
            await c.up(timeout=10)
            await a.wait_for_peer("c", timeout=30)  # a's map poll came back and delivers news
            assert await fetch() == b"hi"
            for node in (a, b, c):
                await node.close()
            restarted_scope.cancel()
    finally:
        store.close()
