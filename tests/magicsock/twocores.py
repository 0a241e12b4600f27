"""Two MagicSock cores on a fake clock, for the sans-IO magicsock tests.

Subclasses decide how datagrams travel (``pump``): which UDP paths exist, what DERP and
STUN do, what gets lost. This base holds what every such network shares.
"""

from __future__ import annotations

import random

from tests.lab import packets
from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.conn import MagicSock


class TwoCores:
    """Cores ``a`` and ``b`` (seeded rngs) with fixed UDP addresses and tailnet IPv4 addresses."""

    def __init__(self) -> None:
        self.now = 0.0
        self.a = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0, rng=random.Random(1))
        self.b = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0, rng=random.Random(2))
        self.addr = {id(self.a): AddrPort.parse("198.51.100.1:41641"), id(self.b): AddrPort.parse("203.0.113.1:41641")}
        self.ip = {id(self.a): "100.64.0.1", id(self.b): "100.64.0.2"}
        #: decrypted packets each core delivered, by id(core)
        self.received: dict[int, list[bytes]] = {id(self.a): [], id(self.b): []}

    def other(self, m: MagicSock) -> MagicSock:
        return self.b if m is self.a else self.a

    def pump(self) -> None:
        """Deliver what the cores queued until nothing moves."""
        raise NotImplementedError

    def advance(self, until: float) -> None:
        """Fire every core timer due up to ``until`` (pumping after each), then set the clock to it."""
        while True:
            timers = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None and t <= until]
            if not timers:
                self.now = until
                return
            self.now = max(self.now, min(timers))
            for m in (self.a, self.b):
                t = m.get_timer()
                if t is not None and t <= self.now:
                    m.handle_timer(self.now)
            self.pump()

    def echo(self, src: MagicSock, seq: int) -> None:
        """Send an ICMP echo request from ``src`` to the other core's tailnet address, then pump."""
        dst = self.other(src)
        assert src.send_ip_packet(packets.icmp_echo(self.ip[id(src)], self.ip[id(dst)], 1, seq), self.now)
        self.pump()
