"""The inbound packet filter (sans-IO): the netmap's ACL rules applied to decrypted IP packets.

Every IP packet a peer sends us passes :meth:`FilterState.check_inbound` after WireGuard
opened it and before the netstack sees it.  The decisions follow tailscaled 1.96.4's
``wgengine/filter`` (our notes: ``wireguard-netstack.md`` §B.4):

1. An empty packet (keepalive artefact) is accepted; shorter than 20 bytes, an unknown or
   malformed header, a multicast or link-local destination (except 169.254.169.254) is
   dropped.  A non-first IPv4 fragment is accepted unless its offset is below 80 bytes
   (it could overlap the transport header, RFC 1858).
2. The destination must be one of our local nets (node addresses, advertised routes).
3. ICMP echo replies and errors are accepted; other ICMP (echo requests) only if some rule
   lets this source reach this destination IP on any port.
4. TCP: anything but a pure SYN is accepted statelessly (return traffic of our own
   connections needs no state); a SYN needs a rule.
5. UDP/SCTP: accepted if the reversed 5-tuple is in the outbound flow cache (512-entry
   LRU, no time expiry) that :meth:`FilterState.note_outbound` fills; else by rule.
6. TSMP (IP protocol 99) is accepted.  Other protocols only if a rule lists the protocol
   with all ports (0-65535).
7. A dropped IPv4 TCP SYN is answered with a TSMP "rejected connection" packet
   (:meth:`FilterState.reject_for`); nothing else is signalled.

Use from a driver (one :class:`FilterState` per node, for its lifetime)::

    state = FilterState()                                   # deny-all until the first netmap
    state.set_filter(PacketFilter.from_netmap(netmap))      # on every netmap (flows survive)
    sendable = state.note_outbound_batch(packets_from_stack)   # before WireGuard encrypts
    accepted, rejects = state.filter_inbound(decrypted_packets)  # before the stack
    # hand `accepted` to the stack; send `rejects` (TSMP) back through WireGuard

Rules (``tailcfg.FilterRule``) compile once into integer ``(low, high)`` address ranges,
so matching never builds ``ipaddress`` objects.  :class:`PacketFilter` is immutable; the
mutable parts (flow cache, counters, the current filter) live in :class:`FilterState`, so
a netmap update swaps the filter and keeps the flows.

Like tailscaled, sources that belong to jailed peers (``Node.IsJailed``) are filtered as
if shields were up (no rule counts for them), a TCP SYN to our PeerAPI port (if one is
given) passes regardless of rules, IPv6 extension headers are not walked (hop-by-hop is dropped as unknown, a Fragment
header is protocol 44 and needs a rule), and ``CapGrant`` plays no part in packet decisions.

Nothing here raises on packet bytes: anything malformed is dropped with a reason.
Deliberate differences from tailscaled (all stricter): transport headers must fit in the
IP total length (not merely the buffer), an IHL below 5 is malformed, a ``cap:`` source
only allows ICMP echo to the destinations its rule names, and a TSMP reject is only built for
SYNs to one of our local nets that no rule admits (not for multicast, link-local or
foreign destinations, where we would be speaking for an address that is not ours).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from .ip import ipv4_header, ipv6_header

if TYPE_CHECKING:
    from ..control.netmap import NetworkMap
    from ..control.tailcfg import FilterRule

__all__ = [
    "DEFAULT_FLOW_CAPACITY",
    "DEFAULT_PROTOCOLS",
    "DROP_REASONS",
    "FilterResult",
    "FilterRuleError",
    "FilterState",
    "PacketFilter",
    "Reason",
    "RejectReason",
    "TSMPReject",
    "Verdict",
    "build_tsmp_reject",
    "parse_tsmp_reject",
]

log = logging.getLogger(__name__)

_PROTO_ICMP = 1
_PROTO_IGMP = 2
_PROTO_TCP = 6
_PROTO_UDP = 17
_PROTO_ICMPV6 = 58
_PROTO_TSMP = 99
_PROTO_SCTP = 132

#: Protocols a rule with an empty ``IPProto`` covers.
DEFAULT_PROTOCOLS: frozenset[int] = frozenset({_PROTO_TCP, _PROTO_UDP, _PROTO_ICMP, _PROTO_ICMPV6})

#: Outbound flows remembered so replies get in (tailscaled's LRU size).
DEFAULT_FLOW_CAPACITY = 512

# Non-first IPv4 fragments starting below this many 8-byte blocks could overwrite the
# transport header of the first (max IPv4 header 60 + TCP header 20 bytes).
_MIN_FRAG_BLOCKS = (60 + 20) // 8
_MIN_TSMP = 7  # a reject body: type, proto, reason, two ports
_TSMP_REJECTED = 0x21  # '!'

_V4_ALL = (0, (1 << 32) - 1)
_V6_ALL = (0, (1 << 128) - 1)
_ICMP4_ERRORS = frozenset({3, 11, 12})  # unreachable, time exceeded, parameter problem
_ICMP6_ERRORS = frozenset({1, 2, 3, 4})  # unreachable, packet too big, time exceeded, parameter problem
_from_bytes = int.from_bytes
# IPv4: version/IHL, total length, flags+fragment offset, protocol, source, destination.
_V4_FIELDS = struct.Struct("!BxHxxHxB2x4s4s").unpack_from
# IPv6: payload length, next header, source, destination.
_V6_FIELDS = struct.Struct("!4xHBx16s16s").unpack_from
# Flow keys: source address, destination address, source port, destination port.
_ADDRS_PORTS4 = struct.Struct("!4s4sHH").unpack_from
_PACK_ADDRS_PORTS4 = struct.Struct("!4s4sHH").pack
_ADDRS_PORTS6 = struct.Struct("!16s16sHH").unpack_from
_PACK_ADDRS_PORTS6 = struct.Struct("!16s16sHH").pack
_ADDRS4 = struct.Struct("!4s4s").unpack_from
_PORTS = struct.Struct("!HH").unpack_from
# Fast path: IPv4 total length, flags+offset, protocol, destination and the TCP flags byte
# of a header without options (34 bytes); IPv6 payload length, next header, destination,
# TCP flags without extension headers (54 bytes).
_V4_FAST = struct.Struct("!2xHxxHxB6x4s13xB").unpack_from
_V6_FAST = struct.Struct("!4xHB17x16s13xB").unpack_from
_METADATA4 = bytes((169, 254, 169, 254))  # link-local, yet allowed (cloud metadata)

IPLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
PrefixLike = Union[
    str,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
]


class FilterRuleError(ValueError):
    """A filter rule (or one of its entries) that cannot be used; raised only with ``strict=True``."""


class Verdict(enum.Enum):
    """What to do with a packet."""

    ACCEPT = "accept"
    DROP = "drop"


class Reason(enum.Enum):
    """Why a packet was accepted or dropped (for counters and logs)."""

    # Accepted.
    KEEPALIVE = "keepalive"  # empty packet
    FRAGMENT = "fragment"  # non-first IPv4 fragment
    ICMP_RESPONSE = "icmp-response"  # echo reply or ICMP error
    ICMP_RULE = "icmp-rule"  # echo request (or other ICMP) allowed by a rule
    TCP_NON_SYN = "tcp-non-syn"  # part of an established (or our own) connection
    TCP_RULE = "tcp-rule"  # SYN allowed by a rule
    PEERAPI = "peerapi"  # SYN to our PeerAPI port (PeerAPI authorizes itself)
    FLOW = "flow"  # UDP/SCTP reply to a flow we started
    UDP_RULE = "udp-rule"  # UDP/SCTP allowed by a rule
    TSMP = "tsmp"
    OTHER_RULE = "other-rule"  # another protocol listed by a rule with all ports
    ALLOW_ALL = "allow-all"  # the allow-everything filter
    OUTBOUND = "outbound"  # our own packet passed the outbound sanity checks
    # Dropped.
    NO_FILTER = "no-filter"  # no netmap yet (deny-all filter)
    TOO_SHORT = "too-short"  # 1..19 bytes
    MALFORMED = "malformed"  # bad version, lengths or truncated transport header
    UNKNOWN_PROTOCOL = "unknown-protocol"  # protocol 0 (IPv6 hop-by-hop) or 255
    BAD_FRAGMENT = "bad-fragment"  # fragment overlapping a transport header, fragmented TSMP
    MULTICAST = "multicast"
    LINK_LOCAL = "link-local"
    NOT_LOCAL = "not-local"  # destination outside our local nets
    NO_RULE = "no-rule"  # TCP SYN, UDP, SCTP or ICMP request that no rule allows
    JAILED = "jailed"  # a new flow (or unsolicited packet) from a jailed peer
    OTHER_PROTOCOL = "other-protocol"  # another protocol no rule lists with all ports


@dataclass(frozen=True, slots=True)
class FilterResult:
    """A verdict and its reason.  One shared instance per reason, so checks allocate nothing."""

    verdict: Verdict
    reason: Reason
    accepted: bool


_ACCEPTING = frozenset({
    Reason.KEEPALIVE, Reason.FRAGMENT, Reason.ICMP_RESPONSE, Reason.ICMP_RULE, Reason.TCP_NON_SYN,
    Reason.TCP_RULE, Reason.PEERAPI, Reason.FLOW, Reason.UDP_RULE, Reason.TSMP, Reason.OTHER_RULE,
    Reason.ALLOW_ALL, Reason.OUTBOUND,
})
#: The reasons a packet can be dropped for (keys of :attr:`FilterState.drops`).
DROP_REASONS: tuple[Reason, ...] = tuple(r for r in Reason if r not in _ACCEPTING)

RESULTS: dict[Reason, FilterResult] = {
    r: FilterResult(Verdict.ACCEPT if r in _ACCEPTING else Verdict.DROP, r, r in _ACCEPTING) for r in Reason
}

_A_KEEPALIVE = RESULTS[Reason.KEEPALIVE]
_A_FRAGMENT = RESULTS[Reason.FRAGMENT]
_A_ICMP_RESPONSE = RESULTS[Reason.ICMP_RESPONSE]
_A_ICMP_RULE = RESULTS[Reason.ICMP_RULE]
_A_TCP_NON_SYN = RESULTS[Reason.TCP_NON_SYN]
_A_TCP_RULE = RESULTS[Reason.TCP_RULE]
_A_PEERAPI = RESULTS[Reason.PEERAPI]
_A_FLOW = RESULTS[Reason.FLOW]
_A_UDP_RULE = RESULTS[Reason.UDP_RULE]
_A_TSMP = RESULTS[Reason.TSMP]
_A_OTHER_RULE = RESULTS[Reason.OTHER_RULE]
_A_ALLOW_ALL = RESULTS[Reason.ALLOW_ALL]
_A_OUTBOUND = RESULTS[Reason.OUTBOUND]
_D_NO_FILTER = RESULTS[Reason.NO_FILTER]
_D_TOO_SHORT = RESULTS[Reason.TOO_SHORT]
_D_MALFORMED = RESULTS[Reason.MALFORMED]
_D_UNKNOWN = RESULTS[Reason.UNKNOWN_PROTOCOL]
_D_BAD_FRAGMENT = RESULTS[Reason.BAD_FRAGMENT]
_D_MULTICAST = RESULTS[Reason.MULTICAST]
_D_LINK_LOCAL = RESULTS[Reason.LINK_LOCAL]
_D_NOT_LOCAL = RESULTS[Reason.NOT_LOCAL]
_D_NO_RULE = RESULTS[Reason.NO_RULE]
_D_JAILED = RESULTS[Reason.JAILED]
_D_OTHER_PROTOCOL = RESULTS[Reason.OTHER_PROTOCOL]


class RejectReason(enum.IntEnum):
    """The reason byte of a TSMP "rejected connection" message."""

    ACL = 0x41  # 'A'
    SHIELDS_UP = 0x53  # 'S'
    IP_FORWARDING = 0x46  # 'F'
    HOST_FIREWALL = 0x57  # 'W'


# Minimum transport header bytes (the whole header must be in a first fragment, so a tiny
# first fragment cannot hide the ports).  Protocols not listed need none.
_MIN_TRANSPORT = {_PROTO_TCP: 20, _PROTO_UDP: 8, _PROTO_ICMP: 4, _PROTO_ICMPV6: 4, _PROTO_SCTP: 12,
                  _PROTO_TSMP: _MIN_TSMP, _PROTO_IGMP: 8}


# -- compiled rules -------------------------------------------------------------------------

# One rule for one address family: (protocols, single-address sources, source ranges,
# source capabilities, destinations as (low, high, first port, last port)).  Control
# servers list sources mostly as single node addresses, so those are a set lookup.
_Rule = tuple[frozenset[int], frozenset[int], tuple[tuple[int, int], ...], frozenset[str],
              tuple[tuple[int, int, int, int], ...]]


def _range_of(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    low = int(net.network_address)
    return low, low + net.num_addresses - 1


def _parse_ip_set(text: str) -> tuple[list[tuple[int, int, int]], str | None]:
    """One ``SrcIPs``/``DstPorts.IP`` entry as ``[(version, low, high)]`` or a ``cap:`` name.

    Accepts ``*``, a CIDR without host bits, ``a-b`` (inclusive, same family), a single IP,
    or ``cap:<capability>``.  Raises ValueError with the reason otherwise.
    """
    if not isinstance(text, str):
        raise ValueError(f"address set {text!r} is not a string")
    if text == "*":
        return [(4, *_V4_ALL), (6, *_V6_ALL)], None
    if text.startswith("cap:"):
        cap = text[4:]
        if not cap:
            raise ValueError("empty capability in 'cap:'")
        return [], cap
    if "%" in text:
        raise ValueError(f"{text!r}: zoned addresses are not allowed")
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return [(net.version, *_range_of(net))], None
    if text.count("-") == 1:
        a_text, b_text = text.split("-")
        try:
            a, b = ipaddress.ip_address(a_text), ipaddress.ip_address(b_text)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        if a.version != b.version or int(a) > int(b):
            raise ValueError(f"invalid IP range {text!r}")
        return [(a.version, int(a), int(b))], None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None
    return [(addr.version, int(addr), int(addr))], None


def _addr_key(value: IPLike | bytes) -> tuple[int, int]:
    """``(version, integer)`` of an address given as text, ``ipaddress`` object or packed bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 4:
            return 4, _from_bytes(value, "big")
        if len(value) == 16:
            return 6, _from_bytes(value, "big")
        raise ValueError(f"packed address of {len(value)} bytes")
    addr = value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(value)
    return addr.version, int(addr)


def _local_entry(value: PrefixLike) -> tuple[int, int, int, bool]:
    """``(version, low, high, is_host)`` of a local address or prefix; ValueError if unusable."""
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        value = value.ip  # our own address: the host, not the subnet it was written with
    if isinstance(value, str):
        value = ipaddress.ip_network(value, strict=True) if "/" in value else ipaddress.ip_address(value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value.version, int(value), int(value), True
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        low, high = _range_of(value)
        return value.version, low, high, value.num_addresses == 1
    raise ValueError(f"not an address or prefix: {value!r}")


def _in_ranges(ranges: tuple[tuple[int, int], ...], value: int) -> bool:
    for low, high in ranges:
        if low <= value <= high:
            return True
    return False


def _match_port(rules: tuple[_Rule, ...], proto: int, src: int, dst: int, port: int,
                src_caps: frozenset[str] | None) -> bool:
    """Some rule lists ``proto``, admits the source, and has ``dst`` with ``port`` in range."""
    for protos, src_hosts, src_ranges, caps, dsts in rules:
        if proto not in protos:
            continue
        if src not in src_hosts:
            for low, high in src_ranges:
                if low <= src <= high:
                    break
            else:
                if not caps or not src_caps or caps.isdisjoint(src_caps):
                    continue
        for low, high, first, last in dsts:
            if low <= dst <= high and first <= port <= last:
                return True
    return False


def _match_ip_only(rules: tuple[_Rule, ...], src: int, dst: int, src_caps: frozenset[str] | None) -> bool:
    """Some rule (any protocol, any port) admits the source to ``dst``: ICMP requests."""
    for _protos, src_hosts, src_ranges, caps, dsts in rules:
        if src not in src_hosts:
            for low, high in src_ranges:
                if low <= src <= high:
                    break
            else:
                if not caps or not src_caps or caps.isdisjoint(src_caps):
                    continue
        for low, high, _first, _last in dsts:
            if low <= dst <= high:
                return True
    return False


def _match_all_ports(rules: tuple[_Rule, ...], proto: int, src: int, dst: int) -> bool:
    """Some rule lists ``proto`` for this source and ``dst`` with every port: portless protocols.

    Like tailscaled, ``cap:`` sources do not count here.
    """
    for protos, src_hosts, src_ranges, _caps, dsts in rules:
        if proto not in protos:
            continue
        if src not in src_hosts:
            for low, high in src_ranges:
                if low <= src <= high:
                    break
            else:
                continue
        for d_low, d_high, first, last in dsts:
            if first == 0 and last == 0xFFFF and d_low <= dst <= d_high:
                return True
    return False


# -- TSMP rejects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TSMPReject:
    """A parsed TSMP "rejected connection" message (type ``'!'``).

    ``src``/``dst`` are the IP header's addresses (the rejecting target, then the flow's
    source); ``src_port``/``dst_port`` are the rejected flow's ports.
    """

    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: int
    reason: int
    src_port: int
    dst_port: int
    maybe_broken: bool = False


def build_tsmp_reject(ip_src: IPLike | bytes, ip_dst: IPLike | bytes, proto: int, src_port: int, dst_port: int,
                      reason: int = RejectReason.ACL, *, maybe_broken: bool = False) -> bytes:
    """A whole TSMP reject packet: IP header (src = the target that refuses, dst = the flow's
    source; IPv4 with ID 0, no flags, TTL 64) then ``'!'``, proto, reason, the flow's source
    port and destination port (big-endian), and a flags byte only if ``maybe_broken``.
    """
    v_src, src = _addr_key(ip_src)
    v_dst, dst = _addr_key(ip_dst)
    if v_src != v_dst:
        raise ValueError("ip_src and ip_dst must be the same family")
    body = bytes((_TSMP_REJECTED, proto & 0xFF, reason & 0xFF, src_port >> 8 & 0xFF, src_port & 0xFF,
                  dst_port >> 8 & 0xFF, dst_port & 0xFF))
    if maybe_broken:
        body += b"\x01"
    if v_src == 4:
        return ipv4_header(src.to_bytes(4, "big"), dst.to_bytes(4, "big"), _PROTO_TSMP, len(body), df=False) + body
    return ipv6_header(src.to_bytes(16, "big"), dst.to_bytes(16, "big"), _PROTO_TSMP, len(body)) + body


def parse_tsmp_reject(packet: bytes | bytearray | memoryview) -> TSMPReject | None:
    """The reject carried by ``packet``, or None if it is anything else.  Never raises."""
    try:
        p = bytes(packet)
        n = len(p)
        if n < 20:
            return None
        version = p[0] >> 4
        if version == 4:
            ihl = (p[0] & 0x0F) * 4
            total = p[2] << 8 | p[3]
            if ihl < 20 or p[9] != _PROTO_TSMP or total > n or total < ihl + _MIN_TSMP:
                return None
            src, dst = ipaddress.IPv4Address(p[12:16]), ipaddress.IPv4Address(p[16:20])
            body = p[ihl:total]
        elif version == 6:
            total = 40 + (p[4] << 8 | p[5]) if n >= 40 else 0
            if n < 40 or p[6] != _PROTO_TSMP or total > n or total < 40 + _MIN_TSMP:
                return None
            src, dst = ipaddress.IPv6Address(p[8:24]), ipaddress.IPv6Address(p[24:40])
            body = p[40:total]
        else:
            return None
        if body[0] != _TSMP_REJECTED:
            return None
        return TSMPReject(src, dst, body[1], body[2], body[3] << 8 | body[4], body[5] << 8 | body[6],
                          len(body) > 7 and bool(body[7] & 1))
    except (IndexError, ValueError):
        return None


# -- the filter -----------------------------------------------------------------------------


class _Mode(enum.Enum):
    RULES = "rules"
    DENY_ALL = "deny-all"
    ALLOW_ALL = "allow-all"


class PacketFilter:
    """An immutable compiled packet filter.  Build it with :meth:`from_rules`,
    :meth:`from_netmap`, :meth:`deny_all`, :meth:`allow_all` or :meth:`shields_up`.

    :meth:`check_inbound` is pure apart from the flow table it is given; use
    :class:`FilterState` to keep flows and counters across filter replacements.
    """

    __slots__ = ("_mode", "_rules4", "_rules6", "_local4_hosts", "_local6_hosts", "_local4_nets", "_local6_nets",
                 "_fast4_hosts", "_fast6_hosts", "_caps4", "_caps6", "_jailed4", "_jailed6", "_peerapi_port",
                 "_reject_reason", "warnings", "rule_count")

    def __init__(self) -> None:  # use the classmethods
        self._mode = _Mode.RULES
        self._rules4: tuple[_Rule, ...] = ()
        self._rules6: tuple[_Rule, ...] = ()
        # Our own addresses as packed bytes (one set lookup on the hot path), other local
        # prefixes as integer ranges.
        self._local4_hosts: frozenset[bytes] = frozenset()
        self._local6_hosts: frozenset[bytes] = frozenset()
        self._local4_nets: tuple[tuple[int, int], ...] = ()
        self._local6_nets: tuple[tuple[int, int], ...] = ()
        # Our addresses that may skip the multicast/link-local checks (all sane ones).
        self._fast4_hosts: frozenset[bytes] = frozenset()
        self._fast6_hosts: frozenset[bytes] = frozenset()
        self._caps4: dict[int, frozenset[str]] = {}
        self._caps6: dict[int, frozenset[str]] = {}
        # Sources (addresses routed to jailed peers) that may not start anything: shields up.
        self._jailed4: tuple[tuple[int, int], ...] = ()
        self._jailed6: tuple[tuple[int, int], ...] = ()
        self._peerapi_port: int | None = None
        self._reject_reason: int | None = None
        #: Messages about rule entries that were ignored while compiling.
        self.warnings: tuple[str, ...] = ()
        #: Number of rules that compiled into at least one family.
        self.rule_count = 0

    def __repr__(self) -> str:
        if self._mode is not _Mode.RULES:
            return f"PacketFilter({self._mode.value})"
        return (f"PacketFilter(rules={self.rule_count}, local={len(self._local4_hosts) + len(self._local6_hosts)}"
                f"+{len(self._local4_nets) + len(self._local6_nets)} nets)")

    # -- construction --------------------------------------------------------------------

    @classmethod
    def deny_all(cls) -> PacketFilter:
        """Drops everything, sends no rejects: the filter before the first netmap."""
        return _DenyAll()

    @classmethod
    def allow_all(cls) -> PacketFilter:
        """Accepts every packet unexamined (static mode, tests)."""
        return _AllowAll()

    @classmethod
    def shields_up(cls, local_addresses: Iterable[PrefixLike]) -> PacketFilter:
        """No rules: only replies to our traffic and TSMP get in; SYNs get ``'S'`` rejects."""
        f = cls.from_rules((), local_addresses)
        f._reject_reason = RejectReason.SHIELDS_UP
        return f

    @classmethod
    def from_rules(cls, rules: Sequence[FilterRule], local_addresses: Iterable[PrefixLike], *,
                   peer_caps: Mapping[IPLike, Iterable[str]] | None = None, peerapi_port: int | None = None,
                   jailed: Iterable[PrefixLike] = (), strict: bool = False) -> PacketFilter:
        """Compile netmap filter rules.

        ``local_addresses``: our node addresses (addresses or ``ipaddress`` interfaces, taken
        as single hosts) and any prefixes we accept traffic for (CIDR text or networks; host
        bits must be zero).  ``peer_caps``: each peer address's node capabilities (its
        ``CapMap`` keys), for ``cap:<name>`` sources.  ``peerapi_port``: TCP SYNs to this
        port on one of our own addresses pass regardless of rules.  ``jailed``: addresses and
        prefixes of jailed peers (``Node.IsJailed``): for sources in them no rule counts, as
        if shields were up (replies to our flows still pass; denied SYNs get ``'S'`` rejects).

        Unusable rule entries (bad addresses, ``cap:`` in a destination) are skipped with a
        logged warning, also kept in :attr:`warnings`.  ``SrcBits`` or ``DstPorts[].Bits``
        (from servers older than the protocol we speak) discard *all* rules, as tailscaled
        does, leaving only replies and TSMP.  With ``strict=True`` the first problem raises
        :class:`FilterRuleError` instead.  Bad local or peer addresses always raise
        ValueError (they come from us, not from the control server).
        """
        f = cls()
        f._reject_reason = RejectReason.ACL
        f._peerapi_port = peerapi_port
        warnings: list[str] = []

        def bad(msg: str) -> None:
            if strict:
                raise FilterRuleError(msg)
            warnings.append(msg)
            log.warning("packet filter: ignoring %s", msg)

        rules4: list[_Rule] = []
        rules6: list[_Rule] = []
        rules = tuple(rules)
        legacy = [i for i, r in enumerate(rules) if r.src_bits or any(d.bits is not None for d in r.dst_ports or ())]
        if legacy:
            bad(f"every rule: rule {legacy[0]} has SrcBits/Bits from an old control server")
            rules = ()
        for index, rule in enumerate(rules):
            where = f"rule {index}"
            if rule.ip_proto:
                protos = frozenset(p for p in rule.ip_proto if isinstance(p, int) and 0 <= p <= 0xFF)
            else:
                protos = DEFAULT_PROTOCOLS
            srcs: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
            caps: list[str] = []
            for text in rule.src_ips or ():
                try:
                    ranges, cap = _parse_ip_set(text)
                except ValueError as exc:
                    bad(f"{where}: source {exc}")
                    continue
                for version, low, high in ranges:
                    srcs[version].append((low, high))
                if cap is not None:
                    caps.append(cap)
            dsts: dict[int, list[tuple[int, int, int, int]]] = {4: [], 6: []}
            for npr in rule.dst_ports or ():
                try:
                    ranges, cap = _parse_ip_set(npr.ip)  # type: ignore[arg-type]
                except ValueError as exc:
                    bad(f"{where}: destination {exc}")
                    continue
                if cap is not None:
                    bad(f"{where}: capability {cap!r} in DstPorts")
                    continue
                first = npr.ports.first if npr.ports is not None and npr.ports.first is not None else 0
                last = npr.ports.last if npr.ports is not None and npr.ports.last is not None else 0
                for version, low, high in ranges:
                    dsts[version].append((low, high, first, last))
            compiled = False
            for version, out in ((4, rules4), (6, rules6)):
                # A family without destinations can never match; sources of the other
                # family are irrelevant (a packet's addresses share one family).
                if dsts[version] and (srcs[version] or caps):
                    hosts_in = frozenset(low for low, high in srcs[version] if low == high)
                    ranges_in = tuple((low, high) for low, high in srcs[version] if low != high)
                    out.append((protos, hosts_in, ranges_in, frozenset(caps), tuple(dsts[version])))
                    compiled = True
            f.rule_count += compiled
        f._rules4, f._rules6 = tuple(rules4), tuple(rules6)

        hosts: dict[int, set[bytes]] = {4: set(), 6: set()}
        nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for entry in local_addresses:
            version, low, high, is_host = _local_entry(entry)
            if is_host:
                hosts[version].add(low.to_bytes(4 if version == 4 else 16, "big"))
            else:
                nets[version].append((low, high))
        f._local4_hosts, f._local6_hosts = frozenset(hosts[4]), frozenset(hosts[6])
        f._fast4_hosts = frozenset(h for h in hosts[4] if h[0] & 0xF0 != 0xE0 and h[:2] != b"\xa9\xfe")
        f._fast6_hosts = frozenset(h for h in hosts[6] if h[0] != 0xFF and not (h[0] == 0xFE and h[1] & 0xC0 == 0x80))
        f._local4_nets, f._local6_nets = tuple(nets[4]), tuple(nets[6])

        jails: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for entry in jailed:
            version, low, high, _is_host = _local_entry(entry)
            jails[version].append((low, high))
        f._jailed4, f._jailed6 = tuple(jails[4]), tuple(jails[6])

        caps_by: dict[int, dict[int, frozenset[str]]] = {4: {}, 6: {}}
        for addr, names in (peer_caps or {}).items():
            version, value = _addr_key(addr)
            caps_by[version][value] = frozenset(names)
        f._caps4, f._caps6 = caps_by[4], caps_by[6]
        f.warnings = tuple(warnings)
        return f

    @classmethod
    def from_netmap(cls, netmap: NetworkMap, *, extra_local: Iterable[PrefixLike] = (),
                    peerapi_port: int | None = None, strict: bool = False) -> PacketFilter:
        """The filter for a netmap: its rules, our node addresses (plus ``extra_local``,
        e.g. routes we advertise) as local nets, each node's ``CapMap`` keys as the
        capabilities of its single-IP addresses (``cap:`` sources), and the allowed IPs of
        jailed peers as jailed sources.
        """
        own: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        for text in netmap.self_node.addresses or ():
            try:
                own.append(ipaddress.ip_interface(text))
            except ValueError:
                log.warning("packet filter: ignoring unparsable self address %r", text)
        local: list[PrefixLike] = list(own)
        local.extend(extra_local)
        peer_caps: dict[Any, frozenset[str]] = {}

        def add_caps(addresses: Iterable[Any], cap_map: Mapping[str, Any] | None) -> None:
            names = frozenset(cap_map or ())
            for iface in addresses:
                if iface.network.num_addresses == 1:  # like tailscaled: single-IP addresses only
                    peer_caps[iface.ip] = names

        add_caps(own, netmap.self_node.cap_map)
        jailed: list[PrefixLike] = []
        for peer in netmap.peers:
            add_caps(peer.addresses, peer.cap_map)
            if peer.node.is_jailed:
                jailed.extend(peer.allowed_ips)
        return cls.from_rules(netmap.packet_filter, local, peer_caps=peer_caps, peerapi_port=peerapi_port,
                              jailed=jailed, strict=strict)

    # -- queries -------------------------------------------------------------------------

    @property
    def is_deny_all(self) -> bool:
        return self._mode is _Mode.DENY_ALL

    @property
    def is_allow_all(self) -> bool:
        return self._mode is _Mode.ALLOW_ALL

    @property
    def reject_reason(self) -> int | None:
        """The TSMP reject reason for denied IPv4 SYNs (``'A'``, ``'S'``), None if none are sent."""
        return self._reject_reason

    def check_inbound(self, packet: bytes | bytearray | memoryview,
                      flows: OrderedDict[bytes, None] | None = None) -> FilterResult:
        """Decide about one packet from a peer.  ``flows`` is the outbound flow table
        (a hit is refreshed); None means no flows.  Never raises.  Fastest with ``bytes``.
        """
        p = packet if type(packet) is bytes else bytes(packet)
        try:
            n = len(p)
            # Fast path for the bulk of traffic: an unfragmented IPv4/IPv6 packet without
            # options or extension headers, to one of our own (unicast) addresses, that is
            # a TCP segment of an existing connection or a reply to one of our UDP flows.
            # Anything else falls through to the full checks below.
            if n >= 34:
                b0 = p[0]
                if b0 == 0x45:
                    total, frag, proto, dst, tcp_flags = _V4_FAST(p)
                    if not frag & 0x3FFF and total <= n and dst in self._fast4_hosts:
                        if proto == _PROTO_TCP:
                            if total >= 40 and tcp_flags & 0x12 != 0x02:
                                return _A_TCP_NON_SYN
                        elif proto == _PROTO_UDP and total >= 28 and flows:
                            key = p[12:24]
                            if key in flows:
                                flows.move_to_end(key)
                                return _A_FLOW
                elif b0 >> 4 == 6 and n >= 54:
                    plen, proto, dst, tcp_flags = _V6_FAST(p)
                    if plen + 40 <= n and dst in self._fast6_hosts:
                        if proto == _PROTO_TCP:
                            if plen >= 20 and tcp_flags & 0x12 != 0x02:
                                return _A_TCP_NON_SYN
                        elif proto == _PROTO_UDP and plen >= 8 and flows:
                            key = p[8:44]
                            if key in flows:
                                flows.move_to_end(key)
                                return _A_FLOW
            if n < 20:
                return _D_TOO_SHORT if n else _A_KEEPALIVE
            version = p[0] >> 4
            if version == 4:
                # One C call for the header fields we need (cheaper than indexing each).
                b0, total, frag, proto, src4, dst = _V4_FIELDS(p)
                ihl = (b0 & 0x0F) << 2
                if total > n or ihl < 20 or ihl > total:
                    return _D_MALFORMED
                d0 = dst[0]
                if frag & 0x1FFF:
                    # Later fragments carry no transport header; the stack reassembles them
                    # and the first fragment was filtered on its own.
                    if frag & 0x1FFF < _MIN_FRAG_BLOCKS:
                        return _D_BAD_FRAGMENT
                    if d0 & 0xF0 == 0xE0:
                        return _D_MULTICAST
                    if d0 == 169 and dst[1] == 254 and dst != _METADATA4:
                        return _D_LINK_LOCAL
                    return _A_FRAGMENT
                avail = total - ihl
                if proto == _PROTO_TCP:
                    if avail < 20:
                        return _D_MALFORMED
                elif proto == _PROTO_UDP:
                    if avail < 8:
                        return _D_MALFORMED
                elif proto == 0 or proto == 0xFF:
                    return _D_UNKNOWN
                elif proto == _PROTO_TSMP and frag & 0x2000:
                    return _D_BAD_FRAGMENT  # TSMP is never fragmented
                elif avail < _MIN_TRANSPORT.get(proto, 0):
                    return _D_MALFORMED
                if d0 & 0xF0 == 0xE0:
                    return _D_MULTICAST
                if d0 == 169 and dst[1] == 254 and dst != _METADATA4:
                    return _D_LINK_LOCAL
                if dst not in self._local4_hosts and not self._in_local(self._local4_nets, dst):
                    return _D_NOT_LOCAL
                if proto == _PROTO_TCP:
                    if p[ihl + 13] & 0x12 != 0x02:  # not SYN-without-ACK
                        return _A_TCP_NON_SYN
                    src = _from_bytes(src4, "big")
                    port = p[ihl + 2] << 8 | p[ihl + 3]
                    jailed = self._jailed4 and _in_ranges(self._jailed4, src)
                    if not jailed and _match_port(self._rules4, proto, src, _from_bytes(dst, "big"), port,
                                                  self._caps4.get(src)):
                        return _A_TCP_RULE
                    if port == self._peerapi_port and dst in self._local4_hosts:
                        return _A_PEERAPI
                    return _D_JAILED if jailed else _D_NO_RULE
                if proto == _PROTO_UDP or proto == _PROTO_SCTP:
                    if flows:
                        # Addresses then ports: contiguous without IP options.
                        key = p[12:24] if ihl == 20 else p[12:20] + p[ihl:ihl + 4]
                        if proto == _PROTO_SCTP:
                            key += b"S"
                        if key in flows:
                            flows.move_to_end(key)
                            return _A_FLOW
                    src = _from_bytes(src4, "big")
                    if self._jailed4 and _in_ranges(self._jailed4, src):
                        return _D_JAILED
                    if _match_port(self._rules4, proto, src, _from_bytes(dst, "big"), p[ihl + 2] << 8 | p[ihl + 3],
                                   self._caps4.get(src)):
                        return _A_UDP_RULE
                    return _D_NO_RULE
                if proto == _PROTO_ICMP:
                    icmp_type = p[ihl]
                    if avail >= 8 and ((icmp_type == 0 and p[ihl + 1] == 0) or icmp_type in _ICMP4_ERRORS):
                        return _A_ICMP_RESPONSE
                    src = _from_bytes(src4, "big")
                    if self._jailed4 and _in_ranges(self._jailed4, src):
                        return _D_JAILED
                    if _match_ip_only(self._rules4, src, _from_bytes(dst, "big"), self._caps4.get(src)):
                        return _A_ICMP_RULE
                    return _D_NO_RULE
                if proto == _PROTO_TSMP:
                    return _A_TSMP
                src = _from_bytes(src4, "big")
                if self._jailed4 and _in_ranges(self._jailed4, src):
                    return _D_JAILED
                if _match_all_ports(self._rules4, proto, src, _from_bytes(dst, "big")):
                    return _A_OTHER_RULE
                return _D_OTHER_PROTOCOL
            if version == 6:
                if n < 40:
                    return _D_MALFORMED
                plen, proto, src6, dst = _V6_FIELDS(p)
                if plen + 40 > n:
                    return _D_MALFORMED
                # Like tailscaled we walk no extension headers: hop-by-hop (0) is unknown and a
                # Fragment header (44) is just another protocol, allowed only by a rule.
                if proto == 0 or proto == 0xFF:
                    return _D_UNKNOWN
                if plen < _MIN_TRANSPORT.get(proto, 0):
                    return _D_MALFORMED
                d0 = dst[0]
                if d0 == 0xFF:
                    return _D_MULTICAST
                if d0 == 0xFE and dst[1] & 0xC0 == 0x80:
                    return _D_LINK_LOCAL
                if dst not in self._local6_hosts and not self._in_local(self._local6_nets, dst):
                    return _D_NOT_LOCAL
                if proto == _PROTO_TCP:
                    if p[53] & 0x12 != 0x02:
                        return _A_TCP_NON_SYN
                    src = _from_bytes(src6, "big")
                    port = p[42] << 8 | p[43]
                    jailed = self._jailed6 and _in_ranges(self._jailed6, src)
                    if not jailed and _match_port(self._rules6, proto, src, _from_bytes(dst, "big"), port,
                                                  self._caps6.get(src)):
                        return _A_TCP_RULE
                    if port == self._peerapi_port and dst in self._local6_hosts:
                        return _A_PEERAPI
                    return _D_JAILED if jailed else _D_NO_RULE
                if proto == _PROTO_UDP or proto == _PROTO_SCTP:
                    if flows:
                        key = p[8:44]
                        if proto == _PROTO_SCTP:
                            key += b"S"
                        if key in flows:
                            flows.move_to_end(key)
                            return _A_FLOW
                    src = _from_bytes(src6, "big")
                    if self._jailed6 and _in_ranges(self._jailed6, src):
                        return _D_JAILED
                    if _match_port(self._rules6, proto, src, _from_bytes(dst, "big"), p[42] << 8 | p[43],
                                   self._caps6.get(src)):
                        return _A_UDP_RULE
                    return _D_NO_RULE
                if proto == _PROTO_ICMPV6:
                    icmp_type = p[40]
                    if plen >= 8 and ((icmp_type == 129 and p[41] == 0) or icmp_type in _ICMP6_ERRORS):
                        return _A_ICMP_RESPONSE
                    src = _from_bytes(src6, "big")
                    if self._jailed6 and _in_ranges(self._jailed6, src):
                        return _D_JAILED
                    if _match_ip_only(self._rules6, src, _from_bytes(dst, "big"), self._caps6.get(src)):
                        return _A_ICMP_RULE
                    return _D_NO_RULE
                if proto == _PROTO_TSMP:
                    return _A_TSMP
                src = _from_bytes(src6, "big")
                if self._jailed6 and _in_ranges(self._jailed6, src):
                    return _D_JAILED
                if _match_all_ports(self._rules6, proto, src, _from_bytes(dst, "big")):
                    return _A_OTHER_RULE
                return _D_OTHER_PROTOCOL
            return _D_MALFORMED
        except Exception:  # a bug must not let bad bytes crash the node; drop instead
            log.exception("packet filter: unexpected error; packet dropped")
            return _D_MALFORMED

    @staticmethod
    def _in_local(nets: tuple[tuple[int, int], ...], dst: bytes) -> bool:
        if not nets:
            return False
        value = _from_bytes(dst, "big")
        for low, high in nets:
            if low <= value <= high:
                return True
        return False


class _DenyAll(PacketFilter):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()
        self._mode = _Mode.DENY_ALL

    def check_inbound(self, packet: bytes | bytearray | memoryview,
                      flows: OrderedDict[bytes, None] | None = None) -> FilterResult:
        return _D_NO_FILTER


class _AllowAll(PacketFilter):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()
        self._mode = _Mode.ALLOW_ALL

    def check_inbound(self, packet: bytes | bytearray | memoryview,
                      flows: OrderedDict[bytes, None] | None = None) -> FilterResult:
        return _A_ALLOW_ALL


def _outbound(packet: bytes, flows: OrderedDict[bytes, None], capacity: int) -> FilterResult:
    """Sanity checks for a packet we send; records UDP/SCTP flows (reversed, as replies look)."""
    p = packet
    n = len(p)
    # Fast path: what our own stack sends, unfragmented TCP/UDP to a unicast address.
    if n >= 34 and p[0] == 0x45:
        total, frag, proto, dst, _flags = _V4_FAST(p)
        d0 = dst[0]
        if not frag & 0x3FFF and total <= n and d0 & 0xF0 != 0xE0 and d0 != 169:
            if proto == _PROTO_TCP and total >= 40:
                return _A_OUTBOUND
            if proto == _PROTO_UDP and total >= 28:
                src, dst, sport, dport = _ADDRS_PORTS4(p, 12)
                key = _PACK_ADDRS_PORTS4(dst, src, dport, sport)
                if key in flows:
                    flows.move_to_end(key)
                else:
                    flows[key] = None
                    if len(flows) > capacity:
                        flows.popitem(last=False)
                return _A_OUTBOUND
    if n < 20:
        return _D_TOO_SHORT if n else _A_KEEPALIVE
    b0 = p[0]
    version = b0 >> 4
    if version == 4:
        total = p[2] << 8 | p[3]
        ihl = (b0 & 0x0F) << 2
        if total > n or ihl < 20 or ihl > total:
            return _D_MALFORMED
        frag = (p[6] & 0x1F) << 8 | p[7]
        if frag and frag < _MIN_FRAG_BLOCKS:
            return _D_BAD_FRAGMENT
        d0 = p[16]
        if d0 & 0xF0 == 0xE0:
            return _D_MULTICAST
        if d0 == 169 and p[17] == 254 and (p[18] != 169 or p[19] != 254):
            return _D_LINK_LOCAL
        if frag:
            return _A_FRAGMENT
        proto = p[9]
        if proto == 0 or proto == 0xFF:
            return _D_UNKNOWN
        if total - ihl < _MIN_TRANSPORT.get(proto, 0):
            return _D_MALFORMED
        if proto == _PROTO_UDP or proto == _PROTO_SCTP:
            if ihl == 20:
                src, dst, sport, dport = _ADDRS_PORTS4(p, 12)
            else:
                src, dst = _ADDRS4(p, 12)
                sport, dport = _PORTS(p, ihl)
            key = _PACK_ADDRS_PORTS4(dst, src, dport, sport)  # as the reply will carry them
            if proto == _PROTO_SCTP:
                key += b"S"
            _remember(flows, key, capacity)
        return _A_OUTBOUND
    if version == 6:
        if n < 40:
            return _D_MALFORMED
        total = 40 + (p[4] << 8 | p[5])
        if total > n:
            return _D_MALFORMED
        proto = p[6]
        if proto == 0 or proto == 0xFF:
            return _D_UNKNOWN
        if total - 40 < _MIN_TRANSPORT.get(proto, 0):
            return _D_MALFORMED
        d0 = p[24]
        if d0 == 0xFF:
            return _D_MULTICAST
        if d0 == 0xFE and p[25] & 0xC0 == 0x80:
            return _D_LINK_LOCAL
        if proto == _PROTO_UDP or proto == _PROTO_SCTP:
            src, dst, sport, dport = _ADDRS_PORTS6(p, 8)
            key = _PACK_ADDRS_PORTS6(dst, src, dport, sport)
            if proto == _PROTO_SCTP:
                key += b"S"
            _remember(flows, key, capacity)
        return _A_OUTBOUND
    return _D_MALFORMED


def _remember(flows: OrderedDict[bytes, None], key: bytes, capacity: int) -> None:
    if key in flows:
        flows.move_to_end(key)
        return
    flows[key] = None
    if len(flows) > capacity:
        flows.popitem(last=False)  # least recently used


class FilterState:
    """The stateful side of filtering: the current :class:`PacketFilter`, the outbound UDP/SCTP
    flow table (an LRU of ``capacity`` entries) and counters.  Sans-IO and synchronous.

    Replacing the filter (:meth:`set_filter`) keeps the flows and counters, so policy
    changes apply to the next packet without breaking replies to flows already open.
    """

    __slots__ = ("_filter", "_deny", "_flows", "capacity", "drops", "dropped", "accepted", "rejects", "outbound_drops",
                 "_pending_rejects")

    def __init__(self, packet_filter: PacketFilter | None = None, *, capacity: int = DEFAULT_FLOW_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("flow capacity must be positive")
        self._filter = packet_filter if packet_filter is not None else PacketFilter.deny_all()
        self._deny = self._filter.is_deny_all
        self._flows: OrderedDict[bytes, None] = OrderedDict()
        self.capacity = capacity
        #: Inbound packets dropped, by reason (every drop reason is a key).
        self.drops: dict[Reason, int] = dict.fromkeys(DROP_REASONS, 0)
        #: Inbound packets dropped, all reasons together.
        self.dropped = 0
        #: Inbound packets accepted.
        self.accepted = 0
        #: TSMP rejects built (by :meth:`reject_for` and :meth:`filter_inbound`).
        self.rejects = 0
        #: Outbound packets that failed the sanity checks, by reason.
        self.outbound_drops: dict[Reason, int] = dict.fromkeys(DROP_REASONS, 0)
        self._pending_rejects: list[bytes] = []

    @property
    def filter(self) -> PacketFilter:
        """The filter in force."""
        return self._filter

    def set_filter(self, packet_filter: PacketFilter) -> None:
        """Swap in a new filter (e.g. after a netmap update); flows and counters stay."""
        self._filter = packet_filter
        self._deny = packet_filter.is_deny_all

    @property
    def fast_tcp4_hosts(self) -> frozenset[bytes]:
        """Our IPv4 addresses (packed) to which every non-SYN TCP segment is accepted, the filter's
        first rule. A caller that has parsed an unfragmented IPv4 TCP packet without options may
        accept such a segment itself (and add it to :attr:`accepted`) instead of calling :meth:`admit`."""
        return self._filter._fast4_hosts

    @property
    def flow_count(self) -> int:
        """Outbound flows remembered."""
        return len(self._flows)

    def stats(self) -> dict[str, int]:
        """Counters as flat names for metrics: ``accepted``, ``rejects``, ``flows``,
        ``dropped`` (total), ``dropped_<reason>`` and ``outbound_dropped_<reason>`` (nonzero only).
        """
        out = {"accepted": self.accepted, "rejects": self.rejects, "flows": len(self._flows),
               "dropped": sum(self.drops.values())}
        for reason, count in self.drops.items():
            if count:
                out[f"dropped_{reason.value.replace('-', '_')}"] = count
        for reason, count in self.outbound_drops.items():
            if count:
                out[f"outbound_dropped_{reason.value.replace('-', '_')}"] = count
        return out

    def clear_flows(self) -> None:
        """Forget every outbound flow."""
        self._flows.clear()

    def check_inbound(self, packet: bytes | bytearray | memoryview) -> FilterResult:
        """Decide about one packet from a peer and count the outcome.  Never raises."""
        result = self._filter.check_inbound(packet, self._flows)
        if result.accepted:
            self.accepted += 1
        else:
            self.drops[result.reason] += 1
            self.dropped += 1
        return result

    def admit(self, packet: bytes | bytearray | memoryview) -> bool:
        """Judge one packet from a peer as :meth:`filter_inbound` does: True to let it in.

        The TSMP reject a denied packet causes waits for :meth:`take_rejects`. Never raises.
        """
        result = self._filter.check_inbound(packet, self._flows)
        if result.accepted:
            self.accepted += 1
            return True
        self.drops[result.reason] += 1
        self.dropped += 1
        if result is _D_NO_RULE or result is _D_JAILED:
            reject = self._reject(packet if type(packet) is bytes else bytes(packet), result is _D_JAILED)
            if reject is not None:
                self._pending_rejects.append(reject)
        return False

    def take_rejects(self) -> list[bytes]:
        """The TSMP rejects that :meth:`admit` produced since the last call, to send to their peers."""
        out, self._pending_rejects = self._pending_rejects, []
        return out

    def note_outbound(self, packet: bytes | bytearray | memoryview) -> FilterResult:
        """Record a packet we are about to send (UDP/SCTP flows, so replies get in).

        Returns DROP for packets that should not leave (malformed, multicast, link-local,
        or no filter yet); the caller should not send those.  Never raises.
        """
        if self._deny:
            self.outbound_drops[Reason.NO_FILTER] += 1
            return _D_NO_FILTER
        try:
            result = _outbound(packet if type(packet) is bytes else bytes(packet), self._flows, self.capacity)
        except Exception:
            log.exception("packet filter: unexpected error on an outbound packet")
            result = _D_MALFORMED
        if not result.accepted:
            self.outbound_drops[result.reason] += 1
        return result

    def note_outbound_batch(self, packets: Iterable[bytes | bytearray | memoryview]
                            ) -> list[bytes | bytearray | memoryview]:
        """:meth:`note_outbound` for a batch; returns the packets that may be sent, in order."""
        out = []
        deny = self._deny
        flows, capacity, drops = self._flows, self.capacity, self.outbound_drops
        for packet in packets:
            if deny:
                drops[Reason.NO_FILTER] += 1
                continue
            if packet.__class__ is bytes and len(packet) >= 40 and packet[0] == 0x45 and packet[9] == _PROTO_TCP \
                    and packet[6] & 0x3F | packet[7] == 0:
                # TCP from our own stack (IPv4, no options, not a fragment): only _outbound's unicast check
                # applies; it is inlined here because this runs once per packet sent.
                d0 = packet[16]
                if d0 & 0xF0 != 0xE0 and d0 != 169 and 40 <= (packet[2] << 8 | packet[3]) <= len(packet):
                    out.append(packet)
                    continue
            try:
                result = _outbound(packet if type(packet) is bytes else bytes(packet), flows, capacity)
            except Exception:
                log.exception("packet filter: unexpected error on an outbound packet")
                result = _D_MALFORMED
            if result.accepted:
                out.append(packet)
            else:
                drops[result.reason] += 1
        return out

    def reject_for(self, packet: bytes | bytearray | memoryview) -> bytes | None:
        """The TSMP reject to send back for ``packet``, or None.

        Only an IPv4 TCP SYN that the current filter drops for want of a rule (or because
        its source is jailed) gets one (tailscaled 1.96.4 sends no others).  The packet is
        evaluated again, so this can be called after :meth:`check_inbound` returned DROP.
        """
        result = self._filter.check_inbound(packet, None)
        if result is not _D_NO_RULE and result is not _D_JAILED:
            return None
        return self._reject(packet if type(packet) is bytes else bytes(packet), result is _D_JAILED)

    def _reject(self, p: bytes, jailed: bool) -> bytes | None:
        reason = self._filter.reject_reason
        if reason is None or p[0] >> 4 != 4 or p[9] != _PROTO_TCP:
            return None
        if jailed:
            reason = RejectReason.SHIELDS_UP  # tailscaled filters jailed peers with a shields-up filter
        ihl = (p[0] & 0x0F) << 2
        self.rejects += 1
        # The target refuses: IP src = the flow's destination, IP dst = the flow's source.
        return build_tsmp_reject(p[16:20], p[12:16], _PROTO_TCP, p[ihl] << 8 | p[ihl + 1], p[ihl + 2] << 8 | p[ihl + 3],
                                 reason)

    def filter_inbound(self, packets: Iterable[bytes | bytearray | memoryview]
                       ) -> tuple[list[bytes | bytearray | memoryview], list[bytes]]:
        """Filter a batch from peers: ``(accepted packets in order, TSMP rejects to send)``.

        The rejects go back out through WireGuard to the sender like any packet of ours.
        """
        accepted: list[bytes | bytearray | memoryview] = []
        admit = self.admit
        fast4 = self._filter._fast4_hosts
        fast = 0
        for packet in packets:
            if packet.__class__ is bytes and len(packet) >= 40 and packet[0] == 0x45 and fast4:
                # check_inbound's first case, inlined (this runs per packet received): a TCP segment
                # other than a bare SYN, unfragmented IPv4 without options, to one of our addresses.
                total, frag, proto, dst, tcp_flags = _V4_FAST(packet)
                if proto == _PROTO_TCP and not frag & 0x3FFF and 40 <= total <= len(packet) \
                        and tcp_flags & 0x12 != 0x02 and dst in fast4:
                    accepted.append(packet)
                    fast += 1
                    continue
            if admit(packet):
                accepted.append(packet)
        self.accepted += fast
        return accepted, self.take_rejects()
