"""Name resolution for dials (tsnet ``dial``, the SOCKS5 and HTTP proxies).

:class:`NameResolver` answers tailnet names (short or FQDN) from the same table as MagicDNS, refuses
names under our zones that are unknown, and hands everything else to a pluggable upstream lookup.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable

import trio
from dnslib import QTYPE, DNSRecord

from .config import IPAddress
from .core import Answer, Forward, MagicDNS
from .server import Forwarder

#: An upstream lookup: name -> addresses (may raise OSError; an empty list means "no such name").
Upstream = Callable[[str], Awaitable[list[IPAddress]]]


class NameNotFound(socket.gaierror):
    """The name does not exist (or has no addresses). A ``socket.gaierror`` so existing handlers work."""

    def __init__(self, name: str, why: str = "name not found") -> None:
        super().__init__(socket.EAI_NONAME, f"{name}: {why}")
        self.name = name


def parse_ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one (``[v6]`` brackets and ``%zone`` suffixes accepted)."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _order(addresses: list[IPAddress]) -> list[IPAddress]:
    """IPv4 first (tailnet IPv6 may be disabled on the path), duplicates removed, order otherwise kept."""
    unique = list(dict.fromkeys(addresses))
    return [a for a in unique if a.version == 4] + [a for a in unique if a.version == 6]


async def system_lookup(name: str) -> list[IPAddress]:
    """Resolve via the operating system (getaddrinfo in a thread, as trio does)."""
    infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    result: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = parse_ip_literal(str(sockaddr[0]))
            if ip is not None:
                result.append(ip)
    return result


class MagicDNSUpstream:
    """An upstream lookup that sends A and AAAA queries where MagicDNS routes them (split DNS aware).

    Uses the same :data:`~tsnet.dns.server.Forwarder` as the DNS server, so names follow ``routes`` and
    ``default_resolvers`` exactly as queries to 100.100.100.100 would.
    """

    def __init__(self, magic: MagicDNS, forwarder: Forwarder) -> None:
        self.magic = magic
        self.forwarder = forwarder

    async def __call__(self, name: str) -> list[IPAddress]:
        addresses: list[IPAddress] = []
        for qtype in ("A", "AAAA"):
            query = DNSRecord.question(name, qtype).pack()
            result = self.magic.handle_query(query, "tcp")  # tcp: no 512-byte limit on what we accept
            if isinstance(result, Answer):
                reply = result.response
            elif isinstance(result, Forward):
                reply = await self.forwarder(result)
            else:
                continue
            try:
                parsed = DNSRecord.parse(reply)
            except Exception:
                continue
            for rr in parsed.rr:
                if rr.rtype in (QTYPE.A, QTYPE.AAAA):
                    addresses.append(ipaddress.ip_address(str(rr.rdata)))
        return addresses


class NameResolver:
    """``await resolver(name)`` / ``await resolver.resolve(name)`` -> list of addresses, IPv4 first.

    IP literals are returned as is. Tailnet names come from ``magic``'s table; an unknown name under a zone
    we answer for raises :class:`NameNotFound` without asking anyone else. Other names go to ``upstream``
    (the OS resolver by default; None disables it). Raises :class:`NameNotFound` for empty results.
    """

    def __init__(self, magic: MagicDNS, upstream: Upstream | None = system_lookup) -> None:
        self.magic = magic
        self.upstream = upstream

    async def resolve(self, name: str) -> list[IPAddress]:
        """Resolve ``name`` (see the class docstring)."""
        literal = parse_ip_literal(name)
        if literal is not None:
            return [literal]
        local = self.magic.lookup(name)
        if local.status == "found":
            if not local.addresses:
                raise NameNotFound(name, "tailnet name has no addresses")
            return _order(list(local.addresses))
        if local.status == "nxdomain" or self.upstream is None:
            raise NameNotFound(name)
        addresses = await self.upstream(name.rstrip("."))
        if not addresses:
            raise NameNotFound(name)
        return _order(addresses)

    __call__ = resolve
