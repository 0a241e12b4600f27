"""Fixtures for the proxy tests: an origin server, MagicDNS with tailnet names, and proxies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from proxytest_helpers import serve_origin

from tsnet.dns import DNSConfig, MagicDNS, NameResolver
from tsnet.proxy import Credentials, LoopbackProxy, ProxyServer


@pytest.fixture
async def origin_port(nursery: trio.Nursery) -> int:
    return await nursery.start(serve_origin)


@pytest.fixture
def magic() -> MagicDNS:
    # Tailnet names that point at loopback so the plain OS dialer can reach them in tests.
    config = DNSConfig.build(
        base_domain="tailnet.test",
        hosts={"web": ["127.0.0.1"], "dns": ["127.0.0.1"], "v6only": ["::1"]},
    )
    return MagicDNS(config)


@pytest.fixture
def proxy_server(magic: MagicDNS) -> ProxyServer:
    return ProxyServer(resolve=NameResolver(magic, upstream=None), handshake_timeout=5, connect_timeout=5)


@pytest.fixture
async def proxy(nursery: trio.Nursery, proxy_server: ProxyServer) -> AsyncIterator[LoopbackProxy]:
    yield await nursery.start(proxy_server.serve)


@pytest.fixture
def credentials() -> Credentials:
    return Credentials("alice", "s3cret:pw")


@pytest.fixture
async def auth_proxy(nursery: trio.Nursery, magic: MagicDNS, credentials: Credentials) -> LoopbackProxy:
    server = ProxyServer(resolve=NameResolver(magic, upstream=None), credentials=credentials)
    return await nursery.start(server.serve)
