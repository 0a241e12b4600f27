"""Two tsnet nodes in one process: one listens, the other dials it by its MagicDNS name.

    python examples/two_nodes.py                       # on an embedded tailnet on 127.0.0.1
    TS_CONTROL_URL=https://... TS_AUTHKEY=tskey-... python examples/two_nodes.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tsnet  # noqa: E402
from _local_tailnet import local_tailnet  # noqa: E402


async def talk(control_url: str, auth_key: str, **settings: object) -> bytes:
    """Start nodes "ping" and "pong"; ping sends a line to pong's echo server; return the echo."""
    common = dict(control_url=control_url, auth_key=auth_key, ephemeral=True, **settings)
    async with tsnet.Server(hostname="pong", **common) as pong, tsnet.Server(hostname="ping", **common) as ping:
        print("pong is", [str(ip) for ip in pong.tailscale_ips()])
        listener = await pong.listen("tcp", ":7777")

        async def echo_once() -> None:
            stream = await listener.accept()
            async with stream:
                who = pong.whois(stream.remote_address[0])
                line = await stream.receive_some(1024)
                await stream.send_all(b"echo to " + who.node.name.encode() + b": " + line)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_once)
            await ping.wait_for_peer("pong")
            stream = await ping.dial("tcp", "pong:7777", timeout=10)
            await stream.send_all(b"hello over the tailnet")
            reply = await stream.receive_some(1024)
            await stream.aclose()
        print(reply.decode())
        print("path:", ping.status().peer("pong").path)
        return reply


async def main() -> None:
    if os.environ.get("TS_CONTROL_URL"):
        await talk(os.environ["TS_CONTROL_URL"], os.environ.get("TS_AUTHKEY", ""))
        return
    async with local_tailnet() as tailnet:
        await talk(tailnet.url, tailnet.authkey(), **tailnet.node_settings)


if __name__ == "__main__":
    trio.run(main)
