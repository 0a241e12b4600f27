"""For the examples: an embedded tailnet on 127.0.0.1 (control server + DERP + STUN) when no
``TS_CONTROL_URL`` is set, so every example runs on one machine without an account.

Not needed with a real control server: set ``TS_CONTROL_URL`` and ``TS_AUTHKEY`` instead.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from tsnet.control.server import ControlServer, ServerConfig, default_derp_map
from tsnet.control.store import Store
from tsnet.derp.server import DerpServer


@dataclass
class LocalTailnet:
    url: str
    server: ControlServer

    def authkey(self, *, ephemeral: bool = True, reusable: bool = True, tags: tuple[str, ...] = ()) -> str:
        return self.server.store.create_authkey(self.server.now(), ephemeral=ephemeral, reusable=reusable,
                                                tags=tags).key

    #: Settings for nodes on this tailnet: magicsock on loopback only.
    node_settings = {"udp_bind": "127.0.0.1"}


@contextlib.asynccontextmanager
async def local_tailnet(state_dir: str | Path | None = None) -> AsyncIterator[LocalTailnet]:
    """Run an embedded tailnet on 127.0.0.1 for the duration of the ``async with``."""
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tsnet-example-"))
        store = Store.open(Path(state_dir) / "control")
        stack.callback(store.close)
        config = ServerConfig()
        server = ControlServer(store, config)
        derp = DerpServer()
        server.attach_derp(derp)
        async with trio.open_nursery() as nursery:
            stun_port = await nursery.start(derp.serve_stun, "127.0.0.1", 0)
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            config.derp_map = default_derp_map("127.0.0.1", port, stun_port=stun_port)
            yield LocalTailnet(f"http://127.0.0.1:{port}", server)
            nursery.cancel_scope.cancel()
