"""NameResolver: tailnet names from the MagicDNS table, upstream fallback, errors."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio
from dnslib import DNSRecord
from dnstest_helpers import make_config

from tsnet.dns.core import Forward, MagicDNS
from tsnet.dns.resolve import MagicDNSUpstream, NameNotFound, NameResolver, system_lookup

ip = ipaddress.ip_address


async def test_tailnet_names_short_and_fqdn(magic: MagicDNS) -> None:
    resolver = NameResolver(magic, upstream=None)
    expected = [ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")]
    assert await resolver("alpha") == expected
    assert await resolver.resolve("Alpha.tailnet.test.") == expected
    assert await resolver("gamma") == [ip("fd7a:115c:a1e0::3")]
    assert await resolver("db.tailnet.test") == [ip("100.64.0.9")]


async def test_ip_literals_pass_through(magic: MagicDNS) -> None:
    resolver = NameResolver(magic, upstream=None)
    assert await resolver("127.0.0.1") == [ip("127.0.0.1")]
    assert await resolver("[::1]") == [ip("::1")]


async def test_unknown_name_in_our_zone_never_goes_upstream(magic: MagicDNS) -> None:
    asked: list[str] = []

    async def upstream(name: str) -> list:
        asked.append(name)
        return [ip("192.0.2.1")]

    resolver = NameResolver(magic, upstream)
    with pytest.raises(NameNotFound) as info:
        await resolver("nope.tailnet.test")
    assert isinstance(info.value, socket.gaierror) and asked == []
    assert await resolver("example.com.") == [ip("192.0.2.1")]
    assert asked == ["example.com"]


async def test_empty_upstream_or_none_is_not_found(magic: MagicDNS) -> None:
    async def empty(name: str) -> list:
        return []

    with pytest.raises(NameNotFound):
        await NameResolver(magic, empty)("example.com")
    with pytest.raises(NameNotFound):
        await NameResolver(magic, None)("example.com")


async def test_system_lookup_localhost() -> None:
    assert ip("127.0.0.1") in await system_lookup("localhost")


async def test_magicdns_upstream_follows_routes() -> None:
    magic = MagicDNS(make_config())
    seen: list[tuple[str, ...]] = []

    async def forwarder(forward: Forward) -> bytes:
        seen.append(forward.nameservers)
        query = DNSRecord.parse(forward.query)
        reply = query.reply()
        if query.q.qtype == 1:
            reply.add_answer(*DNSRecord.question("x").replyZone(f"{query.q.qname} 60 A 10.9.8.7").rr)
        return reply.pack()

    resolver = NameResolver(magic, MagicDNSUpstream(magic, forwarder))
    assert await resolver("host.corp.example") == [ip("10.9.8.7")]
    assert seen == [("127.0.0.1:5399",), ("127.0.0.1:5399",)]
    with trio.fail_after(1):
        assert await resolver("beta") == [ip("100.64.0.2")]  # local, no forwarding
    assert len(seen) == 2
