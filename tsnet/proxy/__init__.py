"""SOCKS5 and HTTP proxies on localhost that dial over the tailnet.

:class:`~tsnet.proxy.server.ProxyServer` serves both on one port; the dial, UDP dial and resolve functions
are pluggable so the node can route through its netstack and MagicDNS.
"""

from .dialer import Dial, DialUDP, Resolve, UDPConnection, direct_dial, direct_dial_udp
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
]
