"""An in-process tailnet on loopback for the tsnet.Server tests: control server + DERP + STUN.

Everything binds 127.0.0.1; the Servers it makes bind magicsock to 127.0.0.1 too, so no packet
leaves the loopback interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import tsnet
from tsnet.control.policy import parse_policy
from tsnet.control.server import ControlServer, ServerConfig, default_derp_map
from tsnet.control.store import Store as ControlStore
from tsnet.derp.server import DerpServer


@dataclass
class Tailnet:
    server: ControlServer
    url: str
    nursery: trio.Nursery
    tmp: Path

    def authkey(self, **kw: Any) -> str:
        return self.server.store.create_authkey(self.server.now(), **kw).key

    def node(self, hostname: str, *, ephemeral: bool = True, **kw: Any) -> tsnet.Server:
        """A Server on this tailnet (loopback only), with a fresh auth key unless one is given."""
        kw.setdefault("auth_key", self.authkey(ephemeral=ephemeral, reusable=True))
        if not ephemeral and "state_dir" not in kw and "store" not in kw:
            kw["state_dir"] = self.tmp / f"state-{hostname}"
        return tsnet.Server(hostname=hostname, control_url=self.url, ephemeral=ephemeral,
                            udp_bind="127.0.0.1", **kw)

    def set_policy(self, text: str) -> None:
        """Install a policy (HuJSON) and push new filters to every node (applies live)."""
        parse_policy(text).install(self.server.config)
        self.server.notify()

    def node_names(self) -> list[str]:
        return [n.name for n in self.server.store.nodes()]


async def start_tailnet(nursery: trio.Nursery, tmp: Path, *, policy: str | None = None) -> Tailnet:
    store = ControlStore.open(tmp / "control")
    config = ServerConfig(ephemeral_timeout=3600, interactive_wait=2.0)
    if policy is not None:
        parse_policy(policy).install(config)
    server = ControlServer(store, config)
    derp = DerpServer()
    server.attach_derp(derp)
    stun_port = await nursery.start(derp.serve_stun, "127.0.0.1", 0)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    config.derp_map = default_derp_map("127.0.0.1", port, stun_port=stun_port)
    return Tailnet(server, f"http://127.0.0.1:{port}", nursery, tmp)


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Re-check ``predicate`` at every scheduler tick batch until true (bounded)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)  # polling a condition, bounded by fail_after
