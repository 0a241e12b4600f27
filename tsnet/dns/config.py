"""MagicDNS configuration: the names this node answers for and where other names go.

The config is a plain immutable value. It is built either directly (tests, a static setup) or from the
control plane's ``DNSConfig`` plus the netmap's node names (:meth:`DNSConfig.from_control`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Tailscale's CGNAT range for node IPv4 addresses; we are authoritative for its reverse zone.
TAILSCALE_IPV4_RANGE = ipaddress.ip_network("100.64.0.0/10")
#: Tailscale's ULA range for node IPv6 addresses; we are authoritative for its reverse zone.
TAILSCALE_IPV6_RANGE = ipaddress.ip_network("fd7a:115c:a1e0::/48")
#: The "Quad100" service addresses that MagicDNS listens on.
QUAD100_V4 = ipaddress.IPv4Address("100.100.100.100")
QUAD100_V6 = ipaddress.IPv6Address("fd7a:115c:a1e0::53")
#: Tailscale's 4-to-6 range: an IPv4 node address 100.a.b.c also appears as this prefix + a.b.c.
TAILSCALE_4TO6_RANGE = ipaddress.ip_network("fd7a:115c:a1e0:ab12:4843:cd96:6200::/104")
#: The name a reverse lookup of the Quad100 address answers with (and which resolves back to it).
QUAD100_NAME = "magicdns.localhost-tailscale-daemon"


class DNSConfigError(ValueError):
    """A DNS configuration value is malformed (bad name, bad address, bad record type)."""


def normalize_name(name: str) -> str:
    """Return ``name`` lower-cased without a trailing dot; raise :class:`DNSConfigError` if unusable."""
    if not isinstance(name, str):
        raise DNSConfigError(f"DNS name must be a string, got {type(name).__name__}")
    text = name.strip().rstrip(".").lower()
    if not text:
        raise DNSConfigError(f"empty DNS name {name!r}")
    labels = text.split(".")
    if any(not label or len(label) > 63 for label in labels) or len(text) > 253:
        raise DNSConfigError(f"invalid DNS name {name!r}")
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise DNSConfigError(f"DNS name {name!r} must be ASCII (use IDNA/punycode)") from None
    return text


def _parse_ip(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        raise DNSConfigError(f"IP address must be a string, got {type(value).__name__}")
    text = value.strip()
    if "/" in text:  # netmap Addresses are host prefixes such as 100.64.0.1/32
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            raise DNSConfigError(f"invalid address {value!r}") from None
        if iface.network.num_addresses != 1:
            raise DNSConfigError(f"address {value!r} is not a single host")
        return iface.ip
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise DNSConfigError(f"invalid IP address {value!r}") from None


@dataclass(frozen=True, slots=True)
class ExtraRecord:
    """An extra A/AAAA record pushed by control (``DNSConfig.ExtraRecords``)."""

    name: str
    value: IPAddress

    @classmethod
    def parse(cls, name: str, rtype: str, value: str) -> ExtraRecord:
        """Build from control's ``{Name, Type, Value}``; Type ``""`` means "infer from the value"."""
        ip = _parse_ip(value)
        kind = (rtype or "").upper()
        if kind not in ("", "A", "AAAA"):
            raise DNSConfigError(f"unsupported extra record type {rtype!r}")
        if (kind == "A" and ip.version != 4) or (kind == "AAAA" and ip.version != 6):
            raise DNSConfigError(f"extra record {name!r}: {value!r} does not fit type {rtype!r}")
        return cls(normalize_name(name), ip)


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """Everything the MagicDNS resolver needs.

    ``base_domain``: the MagicDNS suffix (e.g. ``tailnet.test``); names under it that are not in
    ``hosts`` get NXDOMAIN. ``hosts`` maps node names (FQDN, or a short name which is taken as relative
    to ``base_domain``) to their addresses. ``routes`` maps a DNS suffix to the nameservers that serve it
    (split DNS); an empty tuple means "answer locally" (authoritative, NXDOMAIN if unknown).
    ``default_resolvers`` handle everything else. Nameservers are ``ip``, ``ip:port``, ``[v6]:port``;
    other forms (DoH URLs) are kept but skipped by the UDP/TCP forwarder.
    """

    base_domain: str | None = None
    hosts: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    extra_records: tuple[ExtraRecord, ...] = ()
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_resolvers: tuple[str, ...] = ()
    ttl: int = 600
    #: What :meth:`from_control` left out because it could not be used (one line each, for logs).
    skipped: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        base_domain: str | None = None,
        hosts: Mapping[str, Iterable[Any]] | None = None,
        extra_records: Iterable[ExtraRecord | tuple[str, str, str]] = (),
        routes: Mapping[str, Iterable[str]] | None = None,
        default_resolvers: Iterable[str] = (),
        ttl: int = 600,
    ) -> DNSConfig:
        """Validate and normalise loosely typed inputs (strings for addresses, lists for tuples).

        Raises :class:`DNSConfigError` on any malformed name or address.
        """
        base = normalize_name(base_domain) if base_domain else None
        table: dict[str, tuple[IPAddress, ...]] = {}
        for name, addrs in (hosts or {}).items():
            fqdn = normalize_name(name)
            if base is not None and "." not in fqdn:
                fqdn = f"{fqdn}.{base}"
            ips = tuple(_parse_ip(a) for a in addrs)
            table[fqdn] = table.get(fqdn, ()) + ips
        extras = tuple(r if isinstance(r, ExtraRecord) else ExtraRecord.parse(*r) for r in extra_records)
        route_table = {normalize_name(s): tuple(str(ns) for ns in nss) for s, nss in (routes or {}).items()}
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise DNSConfigError(f"bad ttl {ttl}")
        return cls(
            base_domain=base,
            hosts=table,
            extra_records=extras,
            routes=route_table,
            default_resolvers=tuple(str(r) for r in default_resolvers),
            ttl=ttl,
        )

    @classmethod
    def from_control(
        cls,
        dns_config: Mapping[str, Any] | None,
        nodes: Mapping[str, Iterable[str]],
        *,
        ipv6_answers: bool = True,
    ) -> DNSConfig:
        """Build from control's JSON ``DNSConfig`` and the netmap's ``{Node.Name: Node.Addresses}``.

        The MagicDNS suffix is taken as the longest ``Routes`` key with an empty resolver list that
        contains a node name, else the common parent of the node names. ``ipv6_answers`` False drops the
        nodes' IPv6 addresses (tailscaled only answers AAAA for peers with the ``magicdns-aaaa`` node
        attribute when the node has IPv4). Entries we cannot use are left out and listed in ``skipped``,
        as tailscaled skips them: a node with a malformed name or address, a ``Routes`` key that is not
        a DNS name, an ``ExtraRecords`` entry we cannot serve (a type other than A/AAAA such as CNAME or
        TXT, a value that is not an IP). One bad entry must not take every other name down with it.
        """
        dns_config = dns_config or {}
        skipped: list[str] = []
        hosts: dict[str, list[IPAddress]] = {}
        for name, addresses in nodes.items():
            try:
                ips = [_parse_ip(a) for a in addresses]
                hosts[normalize_name(name)] = [ip for ip in ips if ipv6_answers or ip.version == 4]
            except DNSConfigError as exc:
                skipped.append(f"node {name!r}: {exc}")

        def addrs(resolvers: Any) -> list[str]:
            return [str(r.get("Addr", "")) for r in (resolvers or []) if isinstance(r, Mapping) and r.get("Addr")]

        routes: dict[str, list[str]] = {}
        for suffix, resolvers in (dns_config.get("Routes") or {}).items():
            try:
                routes[normalize_name(suffix)] = addrs(resolvers)
            except DNSConfigError as exc:
                skipped.append(f"route {suffix!r}: {exc}")
        base = None
        local_suffixes = sorted((normalize_name(s) for s, r in routes.items() if not r), key=len, reverse=True)
        for suffix in local_suffixes:
            if not suffix.endswith(".arpa") and any(h.endswith("." + suffix) for h in hosts):
                base = suffix
                break
        if base is None and hosts:
            parents = {h.split(".", 1)[1] for h in hosts if "." in h}
            if len(parents) == 1:
                base = parents.pop()
        extras = []
        for r in dns_config.get("ExtraRecords") or []:
            if not isinstance(r, Mapping):
                continue
            try:
                extras.append(ExtraRecord.parse(r.get("Name", ""), r.get("Type", ""), r.get("Value", "")))
            except DNSConfigError as exc:
                skipped.append(f"extra record {r.get('Name')!r}: {exc}")
        resolvers = addrs(dns_config.get("Resolvers")) or addrs(dns_config.get("FallbackResolvers"))
        config = cls.build(
            base_domain=base, hosts=hosts, extra_records=extras, routes=routes, default_resolvers=resolvers
        )
        return dataclasses.replace(config, skipped=tuple(skipped))
