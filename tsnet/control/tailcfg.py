"""Control-plane message types, mirroring Go's ``tailcfg`` package field for field.

Python attribute names are snake_case; each field's JSON name (``metadata["json"]``)
is exactly the Go name or tag, so ``to_json``/``from_json`` produce and accept what
tailscaled sends. ``None`` means "absent" and is never written; use an empty tuple
when an explicit ``[]`` is meant (``PacketFilter: []`` = deny all).

Addresses, prefixes and ``ip:port`` strings are kept as text here; callers that
need parsed forms (the network map) parse them once.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

from ..key import DiscoPublic, MachinePublic, NodePublic
from .jsoncodec import DecodeError, extra_field, from_json, jfield, to_json

__all__ = [
    "CURRENT_CAPABILITY_VERSION",
    "CapGrant",
    "DERPHomeParams",
    "DERPMap",
    "DERPNode",
    "DERPRegion",
    "DNSConfig",
    "DNSRecord",
    "DNSResolver",
    "DecodeError",
    "EarlyNoise",
    "FilterRule",
    "Hostinfo",
    "Login",
    "MapRequest",
    "MapResponse",
    "NetInfo",
    "NetPortRange",
    "Node",
    "OverTLSPublicKeyResponse",
    "PeerChange",
    "PingRequest",
    "PortRange",
    "RegisterRequest",
    "RegisterResponse",
    "RegisterResponseAuth",
    "Service",
    "User",
    "UserProfile",
    "decode",
    "encode",
    "dumps",
    "LOGOUT_EXPIRY",
]

#: The capability version we speak (tailscaled 1.96.4).
CURRENT_CAPABILITY_VERSION = 133

#: The ``Expiry`` a client sends in a register request to log out.
LOGOUT_EXPIRY = _dt.datetime(1970, 1, 1, 0, 2, 3, tzinfo=_dt.timezone.utc)

_dc = dataclass(frozen=True, slots=True)


@_dc
class OverTLSPublicKeyResponse:
    """Answer of ``GET /key?v=N``."""

    legacy_public_key: MachinePublic | None = jfield("legacyPublicKey")
    public_key: MachinePublic | None = jfield("publicKey")


@_dc
class EarlyNoise:
    """Optional JSON the server sends inside Noise before HTTP/2."""

    node_key_challenge: str | None = jfield("nodeKeyChallenge")


@_dc
class Service:
    proto: str | None = jfield("Proto")
    port: int | None = jfield("Port")
    description: str | None = jfield("Description")


@_dc
class NetInfo:
    mapping_varies_by_dest_ip: bool | None = jfield("MappingVariesByDestIP")
    working_ipv6: bool | None = jfield("WorkingIPv6")
    os_has_ipv6: bool | None = jfield("OSHasIPv6")
    working_udp: bool | None = jfield("WorkingUDP")
    working_icmpv4: bool | None = jfield("WorkingICMPv4")
    have_port_map: bool | None = jfield("HavePortMap")
    preferred_derp: int | None = jfield("PreferredDERP")
    link_type: str | None = jfield("LinkType")
    derp_latency: dict[str, float] | None = jfield("DERPLatency")
    firewall_mode: str | None = jfield("FirewallMode")
    extra: dict[str, Any] | None = extra_field()


@_dc
class Hostinfo:
    """What a node says about itself. Unknown members are kept in ``extra`` and written back."""

    ipn_version: str | None = jfield("IPNVersion")
    frontend_log_id: str | None = jfield("FrontendLogID")
    backend_log_id: str | None = jfield("BackendLogID")
    os: str | None = jfield("OS")
    os_version: str | None = jfield("OSVersion")
    distro: str | None = jfield("Distro")
    app: str | None = jfield("App")
    hostname: str | None = jfield("Hostname")
    shields_up: bool | None = jfield("ShieldsUp")
    no_logs_no_support: bool | None = jfield("NoLogsNoSupport")
    machine: str | None = jfield("Machine")
    go_arch: str | None = jfield("GoArch")
    go_version: str | None = jfield("GoVersion")
    routable_ips: tuple[str, ...] | None = jfield("RoutableIPs")
    request_tags: tuple[str, ...] | None = jfield("RequestTags")
    services: tuple[Service, ...] | None = jfield("Services")
    net_info: NetInfo | None = jfield("NetInfo")
    ssh_host_keys: tuple[str, ...] | None = jfield("sshHostKeys")
    userspace: bool | None = jfield("Userspace")
    userspace_router: bool | None = jfield("UserspaceRouter")
    peer_relay: bool | None = jfield("PeerRelay")
    extra: dict[str, Any] | None = extra_field()


@_dc
class RegisterResponseAuth:
    auth_key: str | None = jfield("AuthKey")
    oauth2_token: Any = jfield("Oauth2Token")


@_dc
class RegisterRequest:
    version: int | None = jfield("Version")
    node_key: NodePublic | None = jfield("NodeKey")
    old_node_key: NodePublic | None = jfield("OldNodeKey")
    nl_key: str | None = jfield("NLKey")
    auth: RegisterResponseAuth | None = jfield("Auth")
    expiry: _dt.datetime | None = jfield("Expiry")
    followup: str | None = jfield("Followup")
    hostinfo: Hostinfo | None = jfield("Hostinfo")
    ephemeral: bool | None = jfield("Ephemeral")
    node_key_signature: str | None = jfield("NodeKeySignature")
    signature_type: Any = jfield("SignatureType")
    timestamp: _dt.datetime | None = jfield("Timestamp")
    device_cert: str | None = jfield("DeviceCert")
    signature: str | None = jfield("Signature")
    tailnet: str | None = jfield("Tailnet")


@_dc
class User:
    id: int | None = jfield("ID")
    display_name: str | None = jfield("DisplayName")
    profile_pic_url: str | None = jfield("ProfilePicURL")
    created: _dt.datetime | None = jfield("Created")


@_dc
class Login:
    id: int | None = jfield("ID")
    provider: str | None = jfield("Provider")
    login_name: str | None = jfield("LoginName")
    display_name: str | None = jfield("DisplayName")
    profile_pic_url: str | None = jfield("ProfilePicURL")


@_dc
class UserProfile:
    id: int | None = jfield("ID")
    login_name: str | None = jfield("LoginName")
    display_name: str | None = jfield("DisplayName")
    profile_pic_url: str | None = jfield("ProfilePicURL")


@_dc
class RegisterResponse:
    user: User | None = jfield("User")
    login: Login | None = jfield("Login")
    node_key_expired: bool | None = jfield("NodeKeyExpired")
    machine_authorized: bool | None = jfield("MachineAuthorized")
    auth_url: str | None = jfield("AuthURL")
    node_key_signature: str | None = jfield("NodeKeySignature")
    error: str | None = jfield("Error")


@_dc
class MapRequest:
    version: int | None = jfield("Version")
    compress: str | None = jfield("Compress")
    keep_alive: bool | None = jfield("KeepAlive")
    node_key: NodePublic | None = jfield("NodeKey")
    disco_key: DiscoPublic | None = jfield("DiscoKey")
    stream: bool | None = jfield("Stream")
    hostinfo: Hostinfo | None = jfield("Hostinfo")
    map_session_handle: str | None = jfield("MapSessionHandle")
    map_session_seq: int | None = jfield("MapSessionSeq")
    endpoints: tuple[str, ...] | None = jfield("Endpoints")
    endpoint_types: tuple[int, ...] | None = jfield("EndpointTypes")
    tka_head: str | None = jfield("TKAHead")
    read_only: bool | None = jfield("ReadOnly")
    omit_peers: bool | None = jfield("OmitPeers")
    debug_flags: tuple[str, ...] | None = jfield("DebugFlags")


@_dc
class Node:
    """A node in the tailnet: the self node or a peer."""

    id: int | None = jfield("ID")
    stable_id: str | None = jfield("StableID")
    name: str | None = jfield("Name")
    user: int | None = jfield("User")
    sharer: int | None = jfield("Sharer")
    key: NodePublic | None = jfield("Key")
    key_expiry: _dt.datetime | None = jfield("KeyExpiry")
    key_signature: str | None = jfield("KeySignature")
    machine: MachinePublic | None = jfield("Machine")
    disco_key: DiscoPublic | None = jfield("DiscoKey")
    addresses: tuple[str, ...] | None = jfield("Addresses")
    allowed_ips: tuple[str, ...] | None = jfield("AllowedIPs")
    endpoints: tuple[str, ...] | None = jfield("Endpoints")
    legacy_derp_string: str | None = jfield("DERP")
    home_derp: int | None = jfield("HomeDERP")
    hostinfo: Hostinfo | None = jfield("Hostinfo")
    created: _dt.datetime | None = jfield("Created")
    cap: int | None = jfield("Cap")
    tags: tuple[str, ...] | None = jfield("Tags")
    primary_routes: tuple[str, ...] | None = jfield("PrimaryRoutes")
    last_seen: _dt.datetime | None = jfield("LastSeen")
    online: bool | None = jfield("Online")
    machine_authorized: bool | None = jfield("MachineAuthorized")
    capabilities: tuple[str, ...] | None = jfield("Capabilities")
    cap_map: dict[str, Any] | None = jfield("CapMap")
    unsigned_peer_api_only: bool | None = jfield("UnsignedPeerAPIOnly")
    computed_name: str | None = jfield("ComputedName")
    computed_name_with_host: str | None = jfield("ComputedNameWithHost")
    data_plane_audit_log_id: str | None = jfield("DataPlaneAuditLogID")
    expired: bool | None = jfield("Expired")
    self_node_v4_masq_addr_for_this_peer: str | None = jfield("SelfNodeV4MasqAddrForThisPeer")
    self_node_v6_masq_addr_for_this_peer: str | None = jfield("SelfNodeV6MasqAddrForThisPeer")
    is_wireguard_only: bool | None = jfield("IsWireGuardOnly")
    is_jailed: bool | None = jfield("IsJailed")
    exit_node_dns_resolvers: tuple[DNSResolver, ...] | None = jfield("ExitNodeDNSResolvers")


@_dc
class PeerChange:
    """A patch to one known peer (``MapResponse.PeersChangedPatch``)."""

    node_id: int | None = jfield("NodeID")
    derp_region: int | None = jfield("DERPRegion")
    cap: int | None = jfield("Cap")
    cap_map: dict[str, Any] | None = jfield("CapMap")
    endpoints: tuple[str, ...] | None = jfield("Endpoints")
    key: NodePublic | None = jfield("Key")
    key_signature: str | None = jfield("KeySignature")
    disco_key: DiscoPublic | None = jfield("DiscoKey")
    online: bool | None = jfield("Online")
    last_seen: _dt.datetime | None = jfield("LastSeen")
    key_expiry: _dt.datetime | None = jfield("KeyExpiry")


@_dc
class DERPNode:
    name: str | None = jfield("Name")
    region_id: int | None = jfield("RegionID")
    host_name: str | None = jfield("HostName")
    cert_name: str | None = jfield("CertName")
    ipv4: str | None = jfield("IPv4")
    ipv6: str | None = jfield("IPv6")
    stun_port: int | None = jfield("STUNPort")
    stun_only: bool | None = jfield("STUNOnly")
    derp_port: int | None = jfield("DERPPort")
    insecure_for_tests: bool | None = jfield("InsecureForTests")
    stun_test_ip: str | None = jfield("STUNTestIP")
    can_port80: bool | None = jfield("CanPort80")


@_dc
class DERPRegion:
    region_id: int | None = jfield("RegionID")
    region_code: str | None = jfield("RegionCode")
    region_name: str | None = jfield("RegionName")
    latitude: float | None = jfield("Latitude")
    longitude: float | None = jfield("Longitude")
    avoid: bool | None = jfield("Avoid")
    no_measure_no_home: bool | None = jfield("NoMeasureNoHome")
    nodes: tuple[DERPNode, ...] | None = jfield("Nodes")


@_dc
class DERPHomeParams:
    region_score: dict[int, float] | None = jfield("RegionScore")


@_dc
class DERPMap:
    home_params: DERPHomeParams | None = jfield("HomeParams")
    regions: dict[int, DERPRegion] | None = jfield("Regions")
    omit_default_regions: bool | None = jfield("omitDefaultRegions")


@_dc
class DNSResolver:
    addr: str | None = jfield("Addr")
    bootstrap_resolution: tuple[str, ...] | None = jfield("BootstrapResolution")
    use_with_exit_node: bool | None = jfield("UseWithExitNode")


@_dc
class DNSRecord:
    name: str | None = jfield("Name")
    type: str | None = jfield("Type")
    value: str | None = jfield("Value")


@_dc
class DNSConfig:
    resolvers: tuple[DNSResolver, ...] | None = jfield("Resolvers")
    routes: dict[str, tuple[DNSResolver, ...] | None] | None = jfield("Routes")
    fallback_resolvers: tuple[DNSResolver, ...] | None = jfield("FallbackResolvers")
    domains: tuple[str, ...] | None = jfield("Domains")
    proxied: bool | None = jfield("Proxied")
    nameservers: tuple[str, ...] | None = jfield("Nameservers")
    cert_domains: tuple[str, ...] | None = jfield("CertDomains")
    extra_records: tuple[DNSRecord, ...] | None = jfield("ExtraRecords")
    exit_node_filtered_set: tuple[str, ...] | None = jfield("ExitNodeFilteredSet")


@_dc
class PortRange:
    first: int | None = jfield("First")
    last: int | None = jfield("Last")


@_dc
class NetPortRange:
    ip: str | None = jfield("IP")
    bits: int | None = jfield("Bits")
    ports: PortRange | None = jfield("Ports")


@_dc
class CapGrant:
    dsts: tuple[str, ...] | None = jfield("Dsts")
    caps: tuple[str, ...] | None = jfield("Caps")
    cap_map: dict[str, Any] | None = jfield("CapMap")


@_dc
class FilterRule:
    src_ips: tuple[str, ...] | None = jfield("SrcIPs")
    src_bits: tuple[int, ...] | None = jfield("SrcBits")
    dst_ports: tuple[NetPortRange, ...] | None = jfield("DstPorts")
    ip_proto: tuple[int, ...] | None = jfield("IPProto")
    cap_grant: tuple[CapGrant, ...] | None = jfield("CapGrant")


@_dc
class PingRequest:
    url: str | None = jfield("URL")
    url_is_noise: bool | None = jfield("URLIsNoise")
    log: bool | None = jfield("Log")
    types: str | None = jfield("Types")
    ip: str | None = jfield("IP")
    payload: str | None = jfield("Payload")


@_dc
class MapResponse:
    """One message of the map long-poll. ``None`` fields mean "unchanged"."""

    map_session_handle: str | None = jfield("MapSessionHandle")
    seq: int | None = jfield("Seq")
    keep_alive: bool | None = jfield("KeepAlive")
    ping_request: PingRequest | None = jfield("PingRequest")
    pop_browser_url: str | None = jfield("PopBrowserURL")
    node: Node | None = jfield("Node")
    derp_map: DERPMap | None = jfield("DERPMap")
    peers: tuple[Node, ...] | None = jfield("Peers")
    peers_changed: tuple[Node, ...] | None = jfield("PeersChanged")
    peers_removed: tuple[int, ...] | None = jfield("PeersRemoved")
    peers_changed_patch: tuple[PeerChange, ...] | None = jfield("PeersChangedPatch")
    peer_seen_change: dict[int, bool] | None = jfield("PeerSeenChange")
    online_change: dict[int, bool] | None = jfield("OnlineChange")
    dns_config: DNSConfig | None = jfield("DNSConfig")
    domain: str | None = jfield("Domain")
    collect_services: bool | None = jfield("CollectServices")
    packet_filter: tuple[FilterRule, ...] | None = jfield("PacketFilter")
    packet_filters: dict[str, tuple[FilterRule, ...] | None] | None = jfield("PacketFilters")
    user_profiles: tuple[UserProfile, ...] | None = jfield("UserProfiles")
    health: tuple[str, ...] | None = jfield("Health")
    display_messages: dict[str, Any] | None = jfield("DisplayMessages")
    ssh_policy: Any = jfield("SSHPolicy")
    control_time: _dt.datetime | None = jfield("ControlTime")
    tka_info: Any = jfield("TKAInfo")
    domain_data_plane_audit_log_id: str | None = jfield("DomainDataPlaneAuditLogID")
    debug: Any = jfield("Debug")
    control_dial_plan: Any = jfield("ControlDialPlan")
    client_version: Any = jfield("ClientVersion")
    default_auto_update: bool | None = jfield("DefaultAutoUpdate")


def encode(obj: Any) -> dict[str, Any]:
    """Encode a tailcfg dataclass into a JSON-ready dict."""
    return to_json(obj)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes of a tailcfg dataclass, as Go writes it."""
    return json.dumps(to_json(obj), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


T = Any


def decode(cls: type[T], data: bytes | str | dict[str, Any]) -> T:
    """Decode JSON (bytes, text or an already-parsed dict) into ``cls``.

    Raises :class:`DecodeError` (a ``ValueError``) on malformed input.
    """
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        try:
            data = json.loads(bytes(data) if not isinstance(data, str) else data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"{cls.__name__}: invalid JSON: {exc}") from None
    return from_json(cls, data)
