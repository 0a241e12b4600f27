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

Where the proxies may dial (a deliberate choice, as tailscaled): tailscaled's ``--socks5-server`` and
``--outbound-http-proxy-listen`` dial through its user dialer, which sends tailnet addresses over the
tailnet and everything else out through the OS, so a client can reach the internet too. ``tsnet.Server``
does the same (``route_by_address(..., other=direct_dial)``) and keeps it safe by listening on loopback
only with generated credentials. For a proxy that must not reach beyond the tailnet, pass
``other=deny_dial`` / ``deny_dial_udp``: such destinations get SOCKS5 reply 0x02 (not allowed) or HTTP
403. Never serve a proxy that can dial the OS on a tailnet-facing listener without credentials: peers
would reach this host's network through it.
"""

from .dialer import (
    DestinationNotAllowed,
    Dial,
    DialUDP,
    Resolve,
    UDPConnection,
    deny_dial,
    deny_dial_udp,
    direct_dial,
    direct_dial_udp,
    route_by_address,
    route_udp_by_address,
)
from .server import LoopbackProxy, ProxyServer
from .socks5 import Credentials

__all__ = [
    "Credentials",
    "DestinationNotAllowed",
    "Dial",
    "DialUDP",
    "LoopbackProxy",
    "ProxyServer",
    "Resolve",
    "UDPConnection",
    "deny_dial",
    "deny_dial_udp",
    "direct_dial",
    "direct_dial_udp",
    "route_by_address",
    "route_udp_by_address",
]
