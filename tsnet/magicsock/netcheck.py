"""Netcheck: what the network between us and the DERP map's STUN servers looks like.

:class:`StunProber` is sans-IO: it emits STUN binding requests to every STUN
server of a DERP map (:func:`stun_targets`), takes the responses, and builds a
:class:`NetcheckReport`: whether UDP works over IPv4/IPv6, our public
address(es), whether the NAT mapping varies by destination ("hard" NAT,
tailscaled's ``MappingVariesByDestIP``), per-region latency and the preferred
(lowest-latency) DERP region.

magicsock runs the prober on its own socket (so the mapped address is the
magicsock mapping); :func:`netcheck` is a standalone async function that runs
one on a fresh socket.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tsnet.derp import stun
from tsnet.magicsock.addrport import AddrPort

__all__ = [
    "DEFAULT_STUN_PORT",
    "StunTarget",
    "NetcheckReport",
    "StunProber",
    "stun_targets",
    "netcheck",
]

DEFAULT_STUN_PORT = 3478
#: Unanswered requests are resent at these offsets from the start (UDP loss).
RETRY_AT = (0.25, 0.75)
DEFAULT_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class StunTarget:
    """One STUN server address of a DERP region."""

    region: int
    node: str
    addr: AddrPort


@dataclass(frozen=True, slots=True)
class NetcheckReport:
    """The outcome of one netcheck run.

    ``mapping_varies_by_dest_ip`` is None when fewer than two distinct STUN
    server IPs answered over IPv4 (nothing to compare).
    """

    udp: bool
    ipv4: bool
    ipv6: bool
    global_v4: AddrPort | None
    global_v6: AddrPort | None
    mapping_varies_by_dest_ip: bool | None
    preferred_derp: int
    region_latency: Mapping[int, float]
    #: every distinct mapped address seen (our STUN endpoints), IPv4 first
    mapped: tuple[AddrPort, ...] = ()

    @property
    def hard_nat(self) -> bool:
        return bool(self.mapping_varies_by_dest_ip)

    def as_dict(self) -> dict[str, Any]:
        return {
            "udp": self.udp,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "global_v4": str(self.global_v4) if self.global_v4 else None,
            "global_v6": str(self.global_v6) if self.global_v6 else None,
            "mapping_varies_by_dest_ip": self.mapping_varies_by_dest_ip,
            "preferred_derp": self.preferred_derp,
            "region_latency": {str(k): v for k, v in sorted(self.region_latency.items())},
        }


def _get(obj: Any, attr: str, json_name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(json_name)
    return getattr(obj, attr, None)


def stun_targets(derp_map: Any) -> list[StunTarget]:
    """STUN server addresses of a DERP map (a ``tailcfg.DERPMap`` or its Go-JSON dict).

    A node with ``STUNPort`` -1 has no STUN; 0 means 3478. ``STUNTestIP``
    overrides the IPv4 address; host names are not resolved (literal IPs only).
    """
    regions = _get(derp_map, "regions", "Regions") or {}
    out: list[StunTarget] = []
    for rid, region in sorted(regions.items(), key=lambda kv: int(kv[0])):
        for node in _get(region, "nodes", "Nodes") or ():
            port = _get(node, "stun_port", "STUNPort") or 0
            if port == -1:
                continue
            port = port or DEFAULT_STUN_PORT
            name = _get(node, "name", "Name") or ""
            hosts = [_get(node, "stun_test_ip", "STUNTestIP") or _get(node, "ipv4", "IPv4"), _get(node, "ipv6", "IPv6")]
            for host in hosts:
                if not host:
                    continue
                try:
                    ip = ipaddress.ip_address(host)
                except ValueError:
                    continue  # "none", or a name we do not resolve
                out.append(StunTarget(int(rid), name, AddrPort.of(ip, port)))
    return out


@dataclass(slots=True)
class _Probe:
    target: StunTarget
    txid: bytes
    sent_at: float
    sends: int = 1
    latency: float | None = None
    mapped: AddrPort | None = None


@dataclass(slots=True)
class StunProber:
    """One netcheck round (sans-IO). Feed every STUN datagram to :meth:`receive`."""

    targets: list[StunTarget]
    started: float
    timeout: float = DEFAULT_TIMEOUT
    _probes: dict[bytes, _Probe] = field(default_factory=dict)
    _out: list[tuple[bytes, AddrPort]] = field(default_factory=list)
    _retry: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for t in self.targets:
            txid = os.urandom(12)
            self._probes[txid] = _Probe(t, txid, self.started)
            self._out.append((stun.build_request(txid), t.addr))
        self._retry = [self.started + d for d in RETRY_AT]

    def datagrams_to_send(self) -> list[tuple[bytes, AddrPort]]:
        out, self._out = self._out, []
        return out

    @property
    def done(self) -> bool:
        return all(p.mapped is not None for p in self._probes.values())

    def expired(self, now: float) -> bool:
        return now >= self.started + self.timeout

    def receive(self, data: bytes | memoryview, src: AddrPort, now: float) -> bool:
        """A STUN datagram arrived; True if it answered one of our probes."""
        try:
            resp = stun.parse_response(bytes(data))
        except stun.StunError:
            return False
        probe = self._probes.get(resp.txid)
        if probe is None or probe.mapped is not None:
            return False
        try:
            probe.mapped = AddrPort.of(*resp.addr)
        except ValueError:
            return False
        # Latency from the last send: a retry's answer must not count the earlier loss.
        probe.latency = max(0.0, now - probe.sent_at)
        return True

    def get_timer(self) -> float | None:
        if self.done:
            return None
        pending = [t for t in self._retry]
        pending.append(self.started + self.timeout)
        return min(pending)

    def handle_timer(self, now: float) -> None:
        while self._retry and self._retry[0] <= now:
            self._retry.pop(0)
            for p in self._probes.values():
                if p.mapped is None:
                    p.sends += 1
                    p.sent_at = now
                    self._out.append((stun.build_request(p.txid), p.target.addr))

    def report(self) -> NetcheckReport:
        answered = [p for p in self._probes.values() if p.mapped is not None]
        v4 = [p for p in answered if not p.target.addr.is_v6]
        v6 = [p for p in answered if p.target.addr.is_v6]
        latency: dict[int, float] = {}
        for p in answered:
            assert p.latency is not None
            latency[p.target.region] = min(latency.get(p.target.region, math.inf), p.latency)
        by_dest_ip: dict[Any, AddrPort] = {}
        for p in v4:
            by_dest_ip.setdefault(p.target.addr.ip, p.mapped)  # type: ignore[arg-type]
        varies = None if len(by_dest_ip) < 2 else len(set(by_dest_ip.values())) > 1
        preferred = min(latency, key=lambda r: (latency[r], r)) if latency else 0
        mapped: list[AddrPort] = []
        for p in sorted(answered, key=lambda p: (p.target.addr.is_v6, p.latency)):
            if p.mapped not in mapped:
                mapped.append(p.mapped)  # type: ignore[arg-type]
        best_v4 = min(v4, key=lambda p: p.latency).mapped if v4 else None  # type: ignore[arg-type,return-value]
        best_v6 = min(v6, key=lambda p: p.latency).mapped if v6 else None  # type: ignore[arg-type,return-value]
        return NetcheckReport(
            udp=bool(answered),
            ipv4=bool(v4),
            ipv6=bool(v6),
            global_v4=best_v4,
            global_v6=best_v6,
            mapping_varies_by_dest_ip=varies,
            preferred_derp=preferred,
            region_latency=latency,
            mapped=tuple(mapped),
        )


async def netcheck(derp_map: Any, *, timeout: float = DEFAULT_TIMEOUT, port: int = 0,
                   targets: Iterable[StunTarget] | None = None) -> NetcheckReport:
    """Run one netcheck on fresh UDP sockets (IPv4, and IPv6 when there are IPv6 targets)."""
    import trio

    tlist = list(targets) if targets is not None else stun_targets(derp_map)
    prober = StunProber(tlist, trio.current_time(), timeout)
    socks: dict[int, trio.socket.SocketType] = {}
    for fam, want in ((socket.AF_INET, any(not t.addr.is_v6 for t in tlist)),
                      (socket.AF_INET6, any(t.addr.is_v6 for t in tlist))):
        if not want:
            continue
        s = trio.socket.socket(fam, socket.SOCK_DGRAM)
        try:
            await s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
        except OSError:
            s.close()
            continue
        socks[fam] = s

    async def flush() -> None:
        for data, addr in prober.datagrams_to_send():
            s = socks.get(socket.AF_INET6 if addr.is_v6 else socket.AF_INET)
            if s is not None:
                try:
                    await s.sendto(data, addr.to_sockaddr())
                except OSError:
                    pass  # unreachable family / network: that target simply does not answer

    async def reader(s: trio.socket.SocketType, done: trio.Event) -> None:
        while True:
            data, src = await s.recvfrom(2048)
            if prober.receive(data, AddrPort.from_sockaddr(src), trio.current_time()) and prober.done:
                done.set()

    try:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            for s in socks.values():
                nursery.start_soon(reader, s, done)
            await flush()
            while not done.is_set() and not prober.expired(trio.current_time()):
                with trio.move_on_at(prober.get_timer() or trio.current_time()):
                    await done.wait()
                prober.handle_timer(trio.current_time())
                await flush()
            nursery.cancel_scope.cancel()
    finally:
        for s in socks.values():
            s.close()
    return prober.report()
