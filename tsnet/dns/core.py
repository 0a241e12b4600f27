"""The sans-IO MagicDNS resolver core.

:meth:`MagicDNS.handle_query` takes one DNS message and decides: answer it locally (tailnet names,
their reverse PTRs, extra records), refuse it (FORMERR, NOTIMP, NXDOMAIN under our zones, SERVFAIL if
nowhere to send it) or forward it unchanged to the nameservers of the longest matching split-DNS route
or to the default resolvers. It never raises on bad input and never does I/O; drivers in
:mod:`tsnet.dns.server` move the bytes.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal

from . import wire
from .config import (
    QUAD100_NAME,
    QUAD100_V4,
    QUAD100_V6,
    TAILSCALE_4TO6_RANGE,
    DNSConfig,
    IPAddress,
)

Transport = Literal["udp", "tcp"]

_TYPE_A = 1
_TYPE_NS = 2
_TYPE_SOA = 6
_TYPE_PTR = 12
_TYPE_HINFO = 13
_TYPE_AAAA = 28
_TYPE_AXFR = 252
_TYPE_ANY = 255
_CLASS_IN = 1
_CLASS_ANY = 255
# Types that only make sense for a real zone; a stub answering for node names declines them.
_NOT_IMPLEMENTED_TYPES = frozenset({_TYPE_NS, _TYPE_SOA, _TYPE_AXFR, _TYPE_HINFO})

_V4_REVERSE_SUFFIX = "in-addr.arpa"
_V6_REVERSE_SUFFIX = "ip6.arpa"
# Reverse zones covering 100.64.0.0/10 and fd7a:115c:a1e0::/48; authoritative whenever MagicDNS is on.
_TAILSCALE_REVERSE_ZONES = tuple(f"{octet}.100.{_V4_REVERSE_SUFFIX}" for octet in range(64, 128)) + (
    "0.e.1.a.c.5.1.1.a.7.d.f." + _V6_REVERSE_SUFFIX,
)


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``response`` back to the client as is."""

    response: bytes
    rcode: int


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``query`` to one of ``nameservers`` and relay the reply through :meth:`finish`."""

    nameservers: tuple[str, ...]
    query: bytes
    #: The most bytes the client can take (512 without EDNS on UDP); :meth:`finish` enforces it.
    max_response: int

    def finish(self, response: bytes) -> bytes:
        """Fit an upstream reply to the client's size limit (setting TC if it had to be cut)."""
        return wire.truncate_to(response, self.max_response)

    def servfail(self) -> bytes:
        """The reply to send when every nameserver failed (question and OPT echoed, as for any answer)."""
        try:
            query = wire.parse_query(self.query)
        except ValueError:  # a Forward built by hand from something unparsable: header only
            reply = wire.error_response(self.query, wire.RCODE_SERVFAIL)
            assert reply is not None
            return reply
        return wire.build_response(query, wire.RCODE_SERVFAIL, [], 0, self.max_response, authoritative=False)


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing: the message cannot be answered (no ID to echo, or it is itself a response)."""

    reason: str


QueryResult = Answer | Forward | Drop


@dataclass(frozen=True, slots=True)
class LocalLookup:
    """The local verdict on a name: ``found`` (with addresses), ``nxdomain`` (ours, unknown) or ``not_ours``."""

    status: Literal["found", "nxdomain", "not_ours"]
    addresses: tuple[IPAddress, ...] = ()


def _reverse_name_to_ip(name: str) -> IPAddress | None:
    """Parse a full ``d.c.b.a.in-addr.arpa`` or 32-nibble ``ip6.arpa`` name; None if it is not one."""
    if name.endswith("." + _V4_REVERSE_SUFFIX):
        parts = name[: -len(_V4_REVERSE_SUFFIX) - 1].split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
            return None
        return ipaddress.IPv4Address(".".join(reversed(parts)))
    if name.endswith("." + _V6_REVERSE_SUFFIX):
        nibbles = name[: -len(_V6_REVERSE_SUFFIX) - 1].split(".")
        if len(nibbles) != 32 or not all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            return None
        return ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
    return None


def _is_quad100(nameserver: str) -> bool:
    """Whether a nameserver string (``ip``, ``ip:port``, ``[v6]:port``) names MagicDNS itself."""
    text = nameserver.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text) in (QUAD100_V4, QUAD100_V6)
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)
def _upstreams(nameservers: tuple[str, ...]) -> tuple[str, ...]:
    """``nameservers`` without MagicDNS's own addresses: forwarding to ourselves would loop until timeout."""
    return tuple(ns for ns in nameservers if not _is_quad100(ns))


class MagicDNS:
    """MagicDNS for one node: answers tailnet names, routes the rest (sans-IO, no clock needed).

    ``stats`` counts outcomes (``answered``, ``nxdomain``, ``forwarded``, ``formerr``, ``dropped``, ...)
    so bad input is visible without logs.
    """

    def __init__(self, config: DNSConfig | None = None) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        self.set_config(config or DNSConfig())

    @property
    def config(self) -> DNSConfig:
        """The configuration currently in effect."""
        return self._config

    def set_config(self, config: DNSConfig) -> None:
        """Replace the configuration (e.g. on a new netmap); takes effect for the next query."""
        names: dict[str, tuple[IPAddress, ...]] = {}
        ptr: dict[IPAddress, str] = {}
        for fqdn, addrs in config.hosts.items():
            names[fqdn] = names.get(fqdn, ()) + tuple(addrs)
            for ip in addrs:
                ptr.setdefault(ip, fqdn)  # first name wins, node names before extra records
        for record in config.extra_records:
            if record.value not in names.get(record.name, ()):
                names[record.name] = names.get(record.name, ()) + (record.value,)
        if config.base_domain:
            for ip, name in ((QUAD100_V4, QUAD100_NAME), (QUAD100_V6, QUAD100_NAME)):
                ptr.setdefault(ip, name)
            names.setdefault(QUAD100_NAME, (QUAD100_V4, QUAD100_V6))
        # suffix -> nameservers; an empty tuple marks a zone we answer for ourselves.
        zones: dict[str, tuple[str, ...]] = dict(config.routes)
        if config.base_domain:
            zones[config.base_domain] = ()
            for zone in _TAILSCALE_REVERSE_ZONES:
                zones.setdefault(zone, ())
        self._zones = zones
        self._names = names
        self._ptr = ptr
        self._config = config

    # ----------------------------------------------------------------- name table

    def lookup(self, name: str) -> LocalLookup:
        """Look ``name`` up locally: an FQDN (trailing dot optional) or a short single-label node name."""
        key = name.rstrip(".").lower()
        addrs = self._find(key)
        if addrs is not None:
            return LocalLookup("found", addrs)
        if self._is_authoritative(key):
            return LocalLookup("nxdomain")
        return LocalLookup("not_ours")

    def reverse(self, ip: IPAddress) -> str | None:
        """The FQDN (no trailing dot) of the node owning ``ip``, if any."""
        return self._ptr.get(ip)

    def _find(self, key: str) -> tuple[IPAddress, ...] | None:
        addrs = self._names.get(key)
        if addrs is None and "." not in key and self._config.base_domain:
            addrs = self._names.get(f"{key}.{self._config.base_domain}")
        return addrs

    def _route(self, key: str) -> tuple[str, ...] | None:
        """Nameservers for ``key``: () if we are authoritative, None if no route applies."""
        # Walk from the full name up through its parents: the first hit is the longest matching suffix.
        suffix = key
        while True:
            nameservers = self._zones.get(suffix)
            if nameservers is not None:
                return nameservers
            dot = suffix.find(".")
            if dot < 0:
                return None
            suffix = suffix[dot + 1 :]

    def _is_authoritative(self, key: str) -> bool:
        if key == "onion" or key.endswith(".onion"):  # RFC 7686: never leak .onion lookups
            return True
        return self._route(key) == ()

    # ----------------------------------------------------------------- queries

    def handle_query(self, data: bytes | memoryview, transport: Transport = "udp") -> QueryResult:
        """Decide what to do with one DNS query message. Never raises."""
        try:
            return self._handle(bytes(data), transport)
        except Exception as exc:  # a bug must not take the resolver down; answer SERVFAIL and count it
            self.stats["internal_error"] += 1
            reply = wire.error_response(data, wire.RCODE_SERVFAIL)
            return Answer(reply, wire.RCODE_SERVFAIL) if reply else Drop(f"internal error: {exc!r}")

    def _fail(self, data: bytes, rcode: int, stat: str) -> QueryResult:
        """An error for a message we could not parse: header only (no question to echo)."""
        self.stats[stat] += 1
        reply = wire.error_response(data, rcode)
        return Answer(reply, rcode) if reply is not None else Drop("no query ID")

    def _refuse(self, query: wire.Query, limit: int, rcode: int, stat: str) -> Answer:
        """An error for a parsed query: its question and (if it had one) an OPT record are echoed."""
        self.stats[stat] += 1
        return Answer(wire.build_response(query, rcode, [], 0, limit, authoritative=False), rcode)

    def _handle(self, data: bytes, transport: Transport) -> QueryResult:
        if len(data) < wire.HEADER_LEN:
            return self._fail(data, wire.RCODE_FORMERR, "formerr")
        if data[2] & 0x80:  # QR set: a response, answering it could start a loop
            self.stats["dropped"] += 1
            return Drop("message is a response")
        if data[2] & 0x78:  # opcode other than QUERY (NOTIFY, UPDATE, ...)
            return self._fail(data, wire.RCODE_NOTIMP, "notimp")
        try:
            query = wire.parse_query(data)
        except ValueError:
            return self._fail(data, wire.RCODE_FORMERR, "formerr")
        if transport == "tcp":
            limit = wire.MAX_TCP_MESSAGE
        elif query.edns_size is not None:
            limit = max(wire.CLASSIC_UDP_LIMIT, min(query.edns_size, wire.MAX_UDP_RESPONSE))
        else:
            limit = wire.CLASSIC_UDP_LIMIT
        if query.edns_size is not None and query.edns_version != 0:
            # RFC 6891 §6.1.3: we only speak EDNS version 0; say so rather than guess.
            return self._refuse(query, limit, wire.RCODE_BADVERS, "badvers")
        if query.qclass not in (_CLASS_IN, _CLASS_ANY):
            return self._refuse(query, limit, wire.RCODE_NOTIMP, "notimp")
        if any(b"." in label for label in query.labels):
            return self._refuse(query, limit, wire.RCODE_FORMERR, "formerr")
        key = b".".join(query.labels).decode("latin-1").lower()
        qtype = query.qtype

        if qtype == _TYPE_PTR:
            ip = _reverse_name_to_ip(key)
            if ip is not None and ip not in self._ptr and ip in TAILSCALE_4TO6_RANGE:
                # A 4-to-6 address names the IPv4 node 100.a.b.c carried in its last three bytes.
                ip = ipaddress.IPv4Address(b"\x64" + ip.packed[13:])
            if ip is not None and ip in self._ptr:
                return self._answer(query, limit, [(_TYPE_PTR, wire.encode_name(self._ptr[ip]))])
        addrs = self._find(key)
        if addrs is None:
            ip = _reverse_name_to_ip(key)
            if ip is not None and ip in self._ptr:
                addrs = ()  # the reverse name exists, just not with this type
        if addrs is not None:
            if qtype in _NOT_IMPLEMENTED_TYPES:
                return self._refuse(query, limit, wire.RCODE_NOTIMP, "notimp")
            wanted = {_TYPE_A: (4,), _TYPE_AAAA: (6,), _TYPE_ANY: (4, 6)}.get(qtype, ())
            records = [(_TYPE_A if ip.version == 4 else _TYPE_AAAA, ip.packed) for ip in addrs if ip.version in wanted]
            return self._answer(query, limit, records)
        if self._is_authoritative(key):
            return self._answer(query, limit, [], rcode=wire.RCODE_NXDOMAIN)
        nameservers = _upstreams(self._route(key) or self._config.default_resolvers)
        if not nameservers:
            return self._refuse(query, limit, wire.RCODE_SERVFAIL, "servfail_no_upstream")
        self.stats["forwarded"] += 1
        return Forward(tuple(nameservers), data, limit)

    def _answer(
        self, query: wire.Query, limit: int, records: list[tuple[int, bytes]], rcode: int = wire.RCODE_NOERROR
    ) -> Answer:
        response = wire.build_response(query, rcode, records, self._config.ttl, limit)
        self.stats["nxdomain" if rcode == wire.RCODE_NXDOMAIN else "answered"] += 1
        return Answer(response, rcode)
