"""Shared helpers for the control tests: a loopback server harness and a netmap watcher."""

import trio

from tsnet.control.client import ClientConfig
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate


class Harness:
    def __init__(self, server, port, nursery):
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.nursery = nursery

    def config(self, hostname, auth_key=None, **kw):
        return ClientConfig(control_url=self.url, machine_key=MachinePrivate.generate(), node_key=NodePrivate.generate(),
                            disco_key=DiscoPrivate.generate().public, hostname=hostname, auth_key=auth_key, **kw)

    def authkey(self, **kw):
        return self.server.store.create_authkey(self.server.now(), **kw).key


class NetmapWatcher:
    """Collects netmaps and lets tests wait for a condition without sleeping."""

    def __init__(self):
        self.latest = None
        self.count = 0
        self._changed = trio.Event()

    def __call__(self, nm):
        self.latest = nm
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate, timeout=10):
        with trio.fail_after(timeout):
            while self.latest is None or not predicate(self.latest):
                await self._changed.wait()
        return self.latest
