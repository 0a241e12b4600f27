"""A stand-in for tsnet.Server with the public surface the CLI, local API and demo use.

"Tailnet" connections are loopback TCP: ``listen`` opens a 127.0.0.1 listener and records it under the
node's names, ``dial`` looks the name (or tailnet IP) up in a shared registry and connects there.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import trio


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat()
    return v


@dataclass(frozen=True)
class FakeNodeStatus:
    name: str
    dns_name: str
    addresses: tuple
    os: str = "linux"
    online: bool | None = True
    path: str = "direct 127.0.0.1:41641"
    latency: float | None = 0.001
    last_handshake: _dt.datetime | None = None
    last_path_change: _dt.datetime | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0

    def as_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class FakeStatus:
    backend_state: str
    self_node: FakeNodeStatus | None
    peers: tuple
    magic_dns_suffix: str
    health: tuple = ()

    def as_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class FakePing:
    peer: str
    ip: Any
    latency: float
    path: str

    def as_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class Tailnet:
    """What the fake nodes share: who is up, and where their listeners really are."""

    suffix: str = "tailnet.test"
    nodes: dict[str, FakeServer] = field(default_factory=dict)
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    forwards: dict[tuple[str, int], str] = field(default_factory=dict)
    next_ip: int = 1


class FakeServer:
    def __init__(self, tailnet: Tailnet, *, hostname: str, **settings: Any) -> None:
        self.tailnet = tailnet
        self.hostname = hostname
        self.settings = settings
        self.state = "NoState"
        self.health: list[str] = []
        self.closed = False
        self.close_calls = 0
        self.ip = ipaddress.ip_address(f"100.64.0.{tailnet.next_ip}")
        tailnet.next_ip += 1
        self.ping_error: BaseException | None = None

    # lifecycle
    async def up(self, *, timeout: float = 60.0) -> FakeStatus:
        await trio.lowlevel.checkpoint()
        self.state = "Running"
        self.tailnet.nodes[self.hostname] = self
        return self.status()

    async def close(self) -> None:
        self.close_calls += 1
        self.closed = True
        self.state = "Stopped"
        self.tailnet.nodes.pop(self.hostname, None)
        await trio.lowlevel.checkpoint()

    def tailscale_ips(self) -> list:
        return [self.ip]

    def _node(self, other: FakeServer) -> FakeNodeStatus:
        return FakeNodeStatus(name=other.hostname, dns_name=f"{other.hostname}.{self.tailnet.suffix}.",
                              addresses=(other.ip,), rx_bytes=100, tx_bytes=200,
                              last_handshake=_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=3))

    def status(self) -> FakeStatus:
        peers = tuple(self._node(n) for n in self.tailnet.nodes.values() if n is not self)
        return FakeStatus(self.state, self._node(self), peers, self.tailnet.suffix, tuple(self.health))

    def whois(self, address: Any) -> Any:
        for n in self.tailnet.nodes.values():
            if n.ip == ipaddress.ip_address(str(address)):
                return {"node": self._node(n).as_dict(), "user": {"login_name": "tagged-devices", "id": 1}}
        return None

    def _lookup(self, host: str) -> FakeServer:
        host = host.rstrip(".")
        for n in self.tailnet.nodes.values():
            if host in (n.hostname, f"{n.hostname}.{self.tailnet.suffix}", str(n.ip)):
                return n
        raise socket.gaierror(socket.EAI_NONAME, f"no such peer {host!r}")  # like HostNotFoundError

    async def ping(self, peer: str, *, timeout: float = 5.0) -> FakePing:
        await trio.lowlevel.checkpoint()
        if self.ping_error is not None:
            raise self.ping_error
        node = self._lookup(peer)
        return FakePing(node.hostname, node.ip, 0.0015, "direct 127.0.0.1:41641")

    async def netcheck(self) -> dict:
        return {"udp": True, "ipv4": "127.0.0.1:41641", "preferred_derp": 900, "region_latency": {"900": 0.0004}}

    def metrics(self) -> dict[str, float]:
        return {"tsnet_packets_in": 10.0, "tsnet_bytes_in": 1000.0, "tsnet_derp_connections": 1.0}

    async def listen(self, network: str, address: str) -> Any:
        port = int(address.rsplit(":", 1)[1])
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.tailnet.ports[(self.hostname, port)] = listener.socket.getsockname()[1]
        return listener

    async def dial(self, network: str, address: str, *, timeout: float | None = None) -> Any:
        host, _, port = address.rpartition(":")
        node = self._lookup(host.strip("[]"))
        key = (node.hostname, int(port))
        if key in self.tailnet.forwards:
            fhost, _, fport = self.tailnet.forwards[key].rpartition(":")
            return await trio.open_tcp_stream(fhost, int(fport))
        if key not in self.tailnet.ports:
            raise ConnectionRefusedError(f"{address}: nothing listening")
        return await trio.open_tcp_stream("127.0.0.1", self.tailnet.ports[key])

    async def serve_forward(self, port: int, target: str) -> None:
        self.tailnet.forwards[(self.hostname, port)] = target


async def serve_http_once_per_conn(listener: Any, body: bytes) -> None:
    """A minimal HTTP server: any request gets ``body``."""

    async def handle(stream: Any) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                              % (len(body), body))
        await stream.aclose()

    await trio.serve_listeners(handle, [listener])
