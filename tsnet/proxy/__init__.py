"""SOCKS5 and HTTP proxies on localhost that dial over the tailnet.

:class:`~tsnet.proxy.server.ProxyServer` serves both on one port; the dial, UDP dial and resolve functions
are pluggable so the node can route through its netstack and MagicDNS, for example::

    magic = MagicDNS(DNSConfig.from_control(netmap_dns, names))
    resolver = NameResolver(magic, MagicDNSUpstream(magic, UpstreamForwarder()))
    proxy = ProxyServer(
        route_by_address(peer_routes_contain, netstack.dial_tcp),
        dial_udp=route_udp_by_address(peer_routes_contain, netstack.dial_udp),
        resolve=resolver,
        credentials=ProxyServer.generate_credentials(),
    )
    loopback = await nursery.start(proxy.serve)  # LoopbackProxy: address, credentials, URLs
"""

from .dialer import (
    Dial,
    DialUDP,
    Resolve,
    UDPConnection,
    direct_dial,
    direct_dial_udp,
    route_by_address,
    route_udp_by_address,
)
from .server import LoopbackProxy, ProxyServer
from .socks5 import Credentials

__all__ = [
    "Credentials",
    "Dial",
    "DialUDP",
    "LoopbackProxy",
    "ProxyServer",
    "Resolve",
    "UDPConnection",
    "direct_dial",
    "direct_dial_udp",
    "route_by_address",
    "route_udp_by_address",
]
