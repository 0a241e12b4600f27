"""MagicDNS: the resolver at 100.100.100.100.

:class:`~tsnet.dns.core.MagicDNS` is the sans-IO core, :class:`~tsnet.dns.server.DNSServer` serves it over
trio UDP/TCP sockets, :class:`~tsnet.dns.resolve.NameResolver` resolves names for dials and proxies.
"""

from .config import DNSConfig, DNSConfigError, ExtraRecord
from .core import Answer, Drop, Forward, LocalLookup, MagicDNS
from .resolve import MagicDNSUpstream, NameNotFound, NameResolver, system_lookup
from .server import DNSServer, UpstreamForwarder

__all__ = [
    "Answer",
    "DNSConfig",
    "DNSConfigError",
    "DNSServer",
    "Drop",
    "ExtraRecord",
    "Forward",
    "LocalLookup",
    "MagicDNS",
    "MagicDNSUpstream",
    "NameNotFound",
    "NameResolver",
    "UpstreamForwarder",
    "system_lookup",
]
