"""Helpers for driving the sans-IO server core with sans-IO clients (no sockets)."""

from tsnet.derp.client_core import DerpClientProtocol
from tsnet.derp.server_core import DerpServerCore
from tsnet.key import NodePrivate


class Pair:
    """A sans-IO client wired to a server-side connection of ``core``."""

    def __init__(self, core: DerpServerCore, key: NodePrivate | None = None, now: float = 0.0, **kw):
        self.core = core
        self.key = key or NodePrivate.generate()
        self.conn = core.accept(now, ("127.0.0.1", 40000 + core.counters.accepts))
        self.proto = DerpClientProtocol(self.key, now, **kw)
        self.events = []

    @property
    def pub(self):
        return self.key.public

    def pump(self, now: float = 0.0, rounds: int = 4):
        """Move bytes both ways until quiet; collects client events."""
        for _ in range(rounds):
            down = self.conn.data_to_send(now)
            if down:
                self.events += self.proto.receive_data(down, now)
            up = self.proto.data_to_send()
            if up:
                self.conn.receive_data(up, now)
        return self.events

    def take(self, cls):
        got = [e for e in self.events if isinstance(e, cls)]
        self.events = [e for e in self.events if not isinstance(e, cls)]
        return got


def pump_all(pairs, now: float = 0.0):
    for _ in range(3):
        for p in pairs:
            p.pump(now)
