"""Settings and small helpers shared by the SOCKS5 and HTTP proxies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from .dialer import Dial, DialUDP, Resolve
from .socks5 import Credentials


@dataclass(slots=True)
class ProxySettings:
    """What both proxies share: how to dial, resolve and authenticate, and their time limits."""

    dial: Dial
    dial_udp: DialUDP | None = None
    resolve: Resolve | None = None
    credentials: Credentials | None = None
    handshake_timeout: float = 30.0
    connect_timeout: float = 30.0
    udp_idle_timeout: float = 120.0
    max_udp_targets: int = 64
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1


def socket_names(stream: trio.abc.Stream) -> tuple[Any, Any] | None:
    """(local, peer) socket addresses if ``stream`` is backed by an OS socket, else None."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return sock.getsockname(), sock.getpeername()
    except OSError:
        return None


async def send_or_false(stream: trio.abc.Stream, data: bytes) -> bool:
    """Send ``data``; False (instead of an exception) if the peer is gone."""
    if not data:
        return True
    try:
        await stream.send_all(data)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
