"""Tailnet policy: HuJSON ``acls``/``grants`` compiled into per-node packet filters.

Supported: ``groups``, ``hosts``, ``tagOwners``, ``acls`` (``action: accept``,
``src``, ``dst`` as ``selector:ports``, ``proto``), ``grants`` (``src``, ``dst``,
``ip``, ``app``), and the selectors ``*``, user logins, ``group:``, ``tag:``,
host aliases, IPs/CIDRs, ``autogroup:member``, ``autogroup:tagged`` and (as a
destination) ``autogroup:self``.

A grant of ``tailscale.com/cap/relay`` from sources C to destinations R puts
the ``cap/relay`` CapGrant into R's filter and the companion
``cap/relay-target`` CapGrant into each C's filter, which is what a 1.96 node
needs to use R as a peer relay.

Parsing is strict: any problem raises :class:`PolicyError` naming the line.
No policy at all means allow-all (the server's default).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import tailcfg
from .store import NodeRecord

__all__ = ["Policy", "PolicyError", "load_policy_file", "parse_hujson", "parse_policy"]

CAP_RELAY = "tailscale.com/cap/relay"
CAP_RELAY_TARGET = "tailscale.com/cap/relay-target"

_PROTOS = {"tcp": (6,), "udp": (17,), "icmp": (1, 58), "ipv6-icmp": (58,), "sctp": (132,), "igmp": (2,), "gre": (47,),
           "esp": (50,), "ah": (51,)}
_ALL_PORTS = tailcfg.PortRange(first=0, last=65535)
_TAG_RE = re.compile(r"tag:[A-Za-z][A-Za-z0-9-]*")


class PolicyError(ValueError):
    """The policy is invalid; the message starts with ``line N:`` when the line is known."""


def parse_hujson(text: str) -> Any:
    """Parse HuJSON (JSON with comments and trailing commas); errors name the line."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise PolicyError(f"line {text.count(chr(10), 0, i) + 1}: unterminated /* comment")
            chunk = text[i : j + 2]
            out.append(re.sub(r"[^\n]", " ", chunk))
            i = j + 2
        else:
            out.append(c)
            i += 1
    cleaned = "".join(out)
    # Drop trailing commas before a closing bracket (strings were copied verbatim, so a
    # regex outside strings is needed: walk again tracking string state).
    result = []
    in_str = False
    k = 0
    while k < len(cleaned):
        c = cleaned[k]
        if in_str:
            result.append(c)
            if c == "\\":
                result.append(cleaned[k + 1 : k + 2])
                k += 2
                continue
            if c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            result.append(c)
        elif c == ",":
            m = re.match(r",\s*[\]}]", cleaned[k:])
            result.append(" " if m else c)
        else:
            result.append(c)
        k += 1
    try:
        return json.loads("".join(result))
    except json.JSONDecodeError as exc:
        raise PolicyError(f"line {exc.lineno}: {exc.msg}") from None


Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class _Rule:
    src: tuple[str, ...]
    dst: tuple[tuple[str, tuple[tailcfg.PortRange, ...]], ...]  # (selector, ports)
    protos: tuple[int, ...] | None
    caps: dict[str, list[Any]] | None  # grants with "app"


@dataclass(slots=True)
class Policy:
    """A parsed policy; :meth:`filter_for` and :meth:`can_see` plug into the server."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hosts: dict[str, Prefix] = field(default_factory=dict)
    tag_owners: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: list[_Rule] = field(default_factory=list)
    node_attrs: list[tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    text: str = ""
    _cache_key: tuple | None = None
    _cache: dict[int, tuple[tailcfg.FilterRule, ...]] = field(default_factory=dict)

    # -- wiring --------------------------------------------------------------------------------

    def install(self, config: Any) -> None:
        """Make a :class:`~tsnet.control.server.ServerConfig` use this policy."""
        config.filter_for = self.filter_for
        config.can_see = self.can_see
        config.tag_allowed = self.tag_allowed
        config.attrs_for = self.attrs_for

    def attrs_for(self, node: NodeRecord, nodes: list[NodeRecord], logins: dict[int, str] | None = None) -> dict[str, Any]:
        """Node attributes from ``nodeAttrs`` whose ``target`` matches ``node``."""
        out: dict[str, Any] = {}
        for targets, attrs in self.node_attrs:
            if any(self._matches(t, node, logins or {}) for t in targets):
                for attr in attrs:
                    out[attr] = None
        return out

    def tag_allowed(self, tag: str, login: str) -> bool:
        """May a node of user ``login`` claim ``tag`` itself (Hostinfo.RequestTags)?"""
        owners = self.tag_owners.get(tag)
        if owners is None:
            return False
        for owner in owners:
            if owner in ("autogroup:member", "autogroup:admin", "autogroup:owner") or owner == login:
                return True
            if owner.startswith("group:") and login in self.groups.get(owner, ()):
                return True
            if owner.startswith("tag:"):
                continue  # a tag may own a tag only for already tagged nodes; not applicable here
        return False

    # -- selectors -----------------------------------------------------------------------------

    @staticmethod
    def _login_of(node: NodeRecord, logins: dict[int, str]) -> str:
        return logins.get(node.user_id, "")

    def _matches(self, selector: str, node: NodeRecord, logins: dict[int, str]) -> bool:
        if selector == "*":
            return True
        if selector.startswith("group:"):
            return any(self._matches(m, node, logins) for m in self.groups.get(selector, ()))
        if selector.startswith("tag:"):
            return selector in node.tags
        if selector == "autogroup:member":
            return not node.tags
        if selector == "autogroup:tagged":
            return bool(node.tags)
        if selector in ("autogroup:admin", "autogroup:owner"):
            return not node.tags
        if "@" in selector:
            return not node.tags and self._login_of(node, logins) == selector
        prefix = self.hosts.get(selector)
        if prefix is None:
            try:
                prefix = ipaddress.ip_network(selector, strict=False)
            except ValueError:
                return False
        return any(ipaddress.ip_address(a) in prefix for a in (node.ipv4, node.ipv6))

    def _literal(self, selector: str) -> Prefix | None:
        if selector in self.hosts:
            return self.hosts[selector]
        try:
            return ipaddress.ip_network(selector, strict=False)
        except ValueError:
            return None

    def _src_ips(self, selectors: Iterable[str], nodes: list[NodeRecord], logins: dict[int, str],
                 only_user: int | None = None) -> list[str]:
        out: list[str] = []
        for sel in selectors:
            if sel == "*" and only_user is None:
                return ["*"]
            literal = self._literal(sel)
            if literal is not None:
                out.append(str(literal))
                continue
            for n in nodes:
                if only_user is not None and (n.tags or n.user_id != only_user):
                    continue
                if self._matches(sel, n, logins):
                    out += [n.ipv4, n.ipv6]
        return sorted(set(out), key=out.index)

    # -- compilation ---------------------------------------------------------------------------

    def _compile_all(self, nodes: list[NodeRecord], logins: dict[int, str]) -> dict[int, tuple[tailcfg.FilterRule, ...]]:
        result: dict[int, list[tailcfg.FilterRule]] = {n.id: [] for n in nodes}
        for rule in self.rules:
            # autogroup:self limits the sources to the destination's own user only for that
            # destination: the rule's other destinations keep every source.
            self_dst = tuple(d for d in rule.dst if d[0] == "autogroup:self")
            if self_dst and len(self_dst) < len(rule.dst):
                others = tuple(d for d in rule.dst if d not in self_dst)
                parts = [replace(rule, dst=self_dst), replace(rule, dst=others)]
            else:
                parts = [rule]
            for part in parts:
                self._compile_rule(part, nodes, logins, result)
        return {k: tuple(v) for k, v in result.items()}

    def _compile_rule(self, rule: _Rule, nodes: list[NodeRecord], logins: dict[int, str],
                      result: dict[int, list[tailcfg.FilterRule]]) -> None:
        for dst_node in nodes:
            host_prefixes = [f"{dst_node.ipv4}/32", f"{dst_node.ipv6}/128"]
            dst_ports: list[tailcfg.NetPortRange] = []
            self_only = False
            for sel, ports in rule.dst:
                if sel == "autogroup:self":
                    if dst_node.tags:
                        continue
                    self_only = True
                    targets = [dst_node.ipv4, dst_node.ipv6]
                elif sel == "*":
                    targets = ["*"]
                else:
                    literal = self._literal(sel)
                    if literal is not None:
                        mine = any(ipaddress.ip_address(a) in literal for a in (dst_node.ipv4, dst_node.ipv6))
                        targets = [str(literal)] if mine else []
                    elif self._matches(sel, dst_node, logins):
                        targets = [dst_node.ipv4, dst_node.ipv6]
                    else:
                        targets = []
                for t in targets:
                    for pr in ports:
                        dst_ports.append(tailcfg.NetPortRange(ip=t, ports=pr))
            if not dst_ports:
                continue
            src = self._src_ips(rule.src, nodes, logins, only_user=dst_node.user_id if self_only else None)
            if not src:
                continue
            if rule.caps is None:
                result[dst_node.id].append(
                    tailcfg.FilterRule(src_ips=tuple(src), dst_ports=tuple(dst_ports), ip_proto=rule.protos)
                )
                continue
            cap_map = {k: list(v) for k, v in rule.caps.items()}
            result[dst_node.id].append(
                tailcfg.FilterRule(src_ips=tuple(src), cap_grant=(tailcfg.CapGrant(dsts=tuple(host_prefixes), cap_map=cap_map),))
            )
            if CAP_RELAY in rule.caps:
                # Companion grant in each source's filter: "dst_node may be my relay".
                for src_node in nodes:
                    if src_node.id == dst_node.id:
                        continue
                    if not any(self._matches(s, src_node, logins) for s in rule.src if self._literal(s) is None):
                        continue
                    result[src_node.id].append(
                        tailcfg.FilterRule(
                            src_ips=(dst_node.ipv4, dst_node.ipv6),
                            cap_grant=(
                                tailcfg.CapGrant(
                                    dsts=(f"{src_node.ipv4}/32", f"{src_node.ipv6}/128"),
                                    cap_map={CAP_RELAY_TARGET: []},
                                ),
                            ),
                        )
                    )

    def _filters(self, nodes: list[NodeRecord], logins: dict[int, str]) -> dict[int, tuple[tailcfg.FilterRule, ...]]:
        key = tuple((n.id, n.ipv4, n.ipv6, n.tags, n.user_id) for n in nodes) + tuple(sorted(logins.items()))
        if key != self._cache_key:
            self._cache = self._compile_all(nodes, logins)
            self._cache_key = key
        return self._cache

    def filter_for(self, node: NodeRecord, nodes: list[NodeRecord], logins: dict[int, str] | None = None) -> tuple[tailcfg.FilterRule, ...]:
        """The packet filter for ``node`` (rules whose destination is this node)."""
        return self._filters(nodes, logins or {}).get(node.id, ())

    def can_see(self, me: NodeRecord, other: NodeRecord, nodes: list[NodeRecord], logins: dict[int, str] | None = None) -> bool:
        """Peers are visible when either may reach the other (or holds a capability towards it)."""
        filters = self._filters(nodes, logins or {})
        return _allows_from(filters.get(me.id, ()), other) or _allows_from(filters.get(other.id, ()), me)


def _allows_from(rules: Iterable[tailcfg.FilterRule], node: NodeRecord) -> bool:
    addrs = [ipaddress.ip_address(node.ipv4), ipaddress.ip_address(node.ipv6)]
    for rule in rules:
        for src in rule.src_ips or ():
            if src == "*":
                return True
            try:
                net = ipaddress.ip_network(src, strict=False)
            except ValueError:
                continue
            if any(a in net for a in addrs):
                return True
    return False


def _line_of(text: str, token: str, start: int = 0) -> int | None:
    pos = text.find(json.dumps(token), start)
    if pos < 0:
        pos = text.find(token, start)
    return None if pos < 0 else text.count("\n", 0, pos) + 1


def _fail(text: str, token: str, reason: str, *, after: tuple[str, ...] = ()) -> PolicyError:
    """An error naming the line of ``token`` (searched after each of ``after`` in turn, when given)."""
    start = 0
    for anchor in after:
        pos = text.find(anchor, start)
        if pos >= 0:
            start = pos
    line = _line_of(text, token, start)
    return PolicyError(f"line {line}: {reason}" if line else reason)


# Rule fields we implement. Any other (srcPosture, via, ...) narrows access in Tailscale;
# ignoring it would grant more than the policy says, so it is refused instead.
_ACL_FIELDS = frozenset({"action", "src", "dst", "proto"})
_GRANT_FIELDS = frozenset({"src", "dst", "ip", "app"})


def _refuse_unknown_fields(text: str, lowered: dict[str, Any], original: dict[str, Any], known: frozenset[str],
                           what: str) -> None:
    for name in original:
        if name.lower() not in known:
            raise _fail(text, name, f"{what} field {name!r} is not supported by this control server")


def _parse_ports(text: str, spec: str, where: str) -> tuple[tailcfg.PortRange, ...]:
    if spec == "*":
        return (_ALL_PORTS,)
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise _fail(text, where, f"bad port {part!r} in {where!r}")
        first = int(m.group(1))
        last = int(m.group(2) or first)
        if not 0 <= first <= last <= 65535:
            raise _fail(text, where, f"port range {part!r} out of bounds in {where!r}")
        out.append(tailcfg.PortRange(first=first, last=last))
    return tuple(out)


def _parse_proto(text: str, proto: Any) -> tuple[int, ...] | None:
    if proto in (None, "", "*"):
        return None
    if isinstance(proto, int) or (isinstance(proto, str) and proto.isdigit()):
        value = int(proto)
        if not 0 <= value <= 255:
            raise _fail(text, str(proto), f"protocol number {value} out of range")
        return (value,)
    if isinstance(proto, str) and proto.lower() in _PROTOS:
        return _PROTOS[proto.lower()]
    raise _fail(text, str(proto), f"unknown protocol {proto!r}")


def parse_policy(text: str) -> Policy:
    """Parse and validate policy text; raises :class:`PolicyError` with the line and reason."""
    doc = parse_hujson(text)
    if not isinstance(doc, dict):
        raise PolicyError("line 1: policy must be a JSON object")
    known = {"acls", "grants", "groups", "hosts", "tagowners", "tests", "ssh", "nodeattrs", "autoapprovers",
             "derpmap", "disableipv4", "randomizeclientport", "sshtests", "postures", "ipsets"}
    for k in doc:
        if k.lower() not in known:
            raise _fail(text, k, f"unknown section {k!r}")
    lower = {k.lower(): v for k, v in doc.items()}
    policy = Policy(text=text)

    groups = lower.get("groups") or {}
    if not isinstance(groups, dict):
        raise _fail(text, "groups", "groups must be an object")
    for name, members in groups.items():
        if not name.startswith("group:"):
            raise _fail(text, name, f"group name {name!r} must start with 'group:'")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise _fail(text, name, f"group {name!r} must be a list of logins")
        policy.groups[name] = tuple(members)

    hosts = lower.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise _fail(text, "hosts", "hosts must be an object")
    for name, value in hosts.items():
        try:
            policy.hosts[name] = ipaddress.ip_network(str(value), strict=True)
        except ValueError as exc:
            raise _fail(text, name, f"host {name!r}: {exc}") from None

    owners = lower.get("tagowners") or {}
    if not isinstance(owners, dict):
        raise _fail(text, "tagOwners", "tagOwners must be an object")
    for tag, who in owners.items():
        if not _TAG_RE.fullmatch(tag):
            raise _fail(text, tag, f"bad tag name {tag!r} (want tag:name)")
        if not isinstance(who, list):
            raise _fail(text, tag, f"owners of {tag!r} must be a list")
        policy.tag_owners[tag] = tuple(who)

    def check_selector(sel: Any, *, dst: bool) -> None:
        if not isinstance(sel, str) or not sel:
            raise _fail(text, str(sel), f"selector must be a non-empty string, got {sel!r}")
        if sel == "*" or "@" in sel:
            return
        if sel.startswith("group:"):
            if sel not in policy.groups:
                raise _fail(text, sel, f"group {sel!r} is not defined in groups")
            return
        if sel.startswith("tag:"):
            if sel not in policy.tag_owners:
                raise _fail(text, sel, f"tag {sel!r} is not defined in tagOwners")
            return
        if sel.startswith("autogroup:"):
            allowed = {"autogroup:member", "autogroup:tagged", "autogroup:admin", "autogroup:owner"}
            if dst:
                allowed.add("autogroup:self")
            if sel not in allowed:
                raise _fail(text, sel, f"unsupported {'destination' if dst else 'source'} {sel!r}")
            return
        if sel in policy.hosts:
            return
        try:
            ipaddress.ip_network(sel, strict=False)
        except ValueError:
            raise _fail(text, sel, f"unknown selector {sel!r}") from None

    acls = lower.get("acls") or []
    if not isinstance(acls, list):
        raise _fail(text, "acls", "acls must be a list")
    for rule in acls:
        if not isinstance(rule, dict):
            raise _fail(text, "acls", "each acl must be an object")
        r = {k.lower(): v for k, v in rule.items()}
        _refuse_unknown_fields(text, r, rule, _ACL_FIELDS, "acl")
        action = r.get("action")
        if action != "accept":
            raise _fail(text, str(action), f"acl action must be \"accept\", got {action!r}")
        src, dst = r.get("src"), r.get("dst")
        if not isinstance(src, list) or not src:
            raise _fail(text, "src", "acl needs a non-empty src list")
        if not isinstance(dst, list) or not dst:
            raise _fail(text, "dst", "acl needs a non-empty dst list")
        for s in src:
            check_selector(s, dst=False)
        parsed_dst = []
        for d in dst:
            if not isinstance(d, str) or ":" not in d:
                raise _fail(text, str(d), f"acl dst {d!r} must be selector:ports")
            sel, _, ports = d.rpartition(":")
            if sel.startswith("[") and sel.endswith("]"):
                sel = sel[1:-1]  # [fd7a:115c:a1e0::1]:22
            check_selector(sel, dst=True)
            parsed_dst.append((sel, _parse_ports(text, ports, d)))
        policy.rules.append(_Rule(tuple(src), tuple(parsed_dst), _parse_proto(text, r.get("proto")), None))

    grants = lower.get("grants") or []
    if not isinstance(grants, list):
        raise _fail(text, "grants", "grants must be a list")
    for grant in grants:
        if not isinstance(grant, dict):
            raise _fail(text, "grants", "each grant must be an object")
        g = {k.lower(): v for k, v in grant.items()}
        _refuse_unknown_fields(text, g, grant, _GRANT_FIELDS, "grant")
        src, dst = g.get("src"), g.get("dst")
        if not isinstance(src, list) or not src or not isinstance(dst, list) or not dst:
            raise _fail(text, "src", "grant needs non-empty src and dst lists")
        for s in src:
            check_selector(s, dst=False)
        for d in dst:
            check_selector(d, dst=True)
        ips, app = g.get("ip"), g.get("app")
        if ips is None and app is None:
            raise _fail(text, "dst", "grant needs \"ip\" or \"app\"")
        if ips is not None:
            if not isinstance(ips, list):
                raise _fail(text, "ip", "grant ip must be a list")
            for spec in ips:
                if not isinstance(spec, str):
                    raise _fail(text, str(spec), "grant ip entries are strings like \"*\", \"tcp:22\" or \"80-90\"")
                proto_text, sep, ports = spec.rpartition(":")
                protos = _parse_proto(text, proto_text) if sep else None
                pr = _parse_ports(text, ports if sep else spec, spec)
                policy.rules.append(_Rule(tuple(src), tuple((d, pr) for d in dst), protos, None))
        if app is not None:
            if not isinstance(app, dict) or not all(isinstance(v, list) for v in app.values()):
                raise _fail(text, "app", "grant app must map capability names to lists")
            policy.rules.append(_Rule(tuple(src), tuple((d, (_ALL_PORTS,)) for d in dst), None, dict(app)))
    attrs = lower.get("nodeattrs") or []
    if not isinstance(attrs, list):
        raise _fail(text, "nodeAttrs", "nodeAttrs must be a list")
    for entry in attrs:
        e = {k.lower(): v for k, v in entry.items()} if isinstance(entry, dict) else {}
        targets, names = e.get("target"), e.get("attr")
        if not isinstance(targets, list) or not isinstance(names, list) or not all(isinstance(a, str) for a in names):
            raise _fail(text, "nodeAttrs", "each nodeAttrs entry needs \"target\" and \"attr\" lists")
        for t in targets:
            check_selector(t, dst=False)
        policy.node_attrs.append((tuple(targets), tuple(names)))
    _run_policy_tests(policy, lower.get("tests") or [], text)
    return policy


def _run_policy_tests(policy: Policy, tests: Any, text: str) -> None:
    """Evaluate the policy's ``tests`` section: each ``accept`` must be allowed and each ``deny`` refused.

    Identities become synthetic nodes: a login is a node of that user, ``tag:x`` a node
    tagged x, an IP or host alias a node with that address.
    """
    if not isinstance(tests, list):
        raise _fail(text, "tests", "tests must be a list")
    import datetime as _dt

    epoch = _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)
    logins: dict[int, str] = {}
    nodes: dict[str, NodeRecord] = {}

    def node_for(identity: str) -> NodeRecord:
        if identity in nodes:
            return nodes[identity]
        n = len(nodes) + 1
        ipv4, ipv6 = f"100.127.{n // 250}.{n % 250 + 1}", f"fd7a:115c:a1e0:ffff::{n:x}"
        tags: tuple[str, ...] = ()
        user = 1000 + n
        literal = policy._literal(identity)
        if identity.startswith("tag:"):
            tags = (identity,)
        elif literal is not None:
            addr = literal.network_address
            if addr.version == 4:
                ipv4 = str(addr)
            else:
                ipv6 = str(addr)
        elif "@" in identity:
            logins[user] = identity
        else:
            raise _fail(text, identity, f"test identity {identity!r} must be a login, tag or address")
        record = NodeRecord(
            id=n, stable_id=f"test{n}", machine_key="", node_key=f"test{n}", disco_key=None, name=f"test{n}",
            user_id=user, ipv4=ipv4, ipv6=ipv6, ephemeral=False, tags=tags, created=epoch, key_expiry=None,
            logged_out=False, last_seen=None, hostinfo=None, endpoints=(), home_derp=0, cap=0, authkey_id=None,
        )
        nodes[identity] = record
        return record

    cases = []
    for test in tests:
        if not isinstance(test, dict) or not isinstance(test.get("src"), str):
            raise _fail(text, "tests", "each test needs a \"src\" string")
        src = test["src"]
        protos = _parse_proto(text, test.get("proto"))
        for verdict in ("accept", "deny"):
            for dst in test.get(verdict) or []:
                if not isinstance(dst, str) or ":" not in dst:
                    raise _fail(text, str(dst), f"test destination {dst!r} must be host:port")
                host, _, port = dst.rpartition(":")
                if not port.isdigit():
                    raise _fail(text, dst, f"test destination {dst!r} needs one port")
                cases.append((src, host.strip("[]"), int(port), protos, verdict == "accept", dst))
    for src, host, _, _, _, _ in cases:
        node_for(src)
        node_for(host)
    everyone = list(nodes.values())
    for src, host, port, protos, want, dst in cases:
        s_node, d_node = nodes[src], nodes[host]
        rules = policy.filter_for(d_node, everyone, logins)
        allowed = any(
            _allows_from((rule,), s_node)
            and (rule.ip_proto is None or protos is None or set(protos) & set(rule.ip_proto))
            and any(pr.ports is not None and pr.ports.first <= port <= pr.ports.last for pr in rule.dst_ports or ())
            for rule in rules
        )
        if allowed != want:
            verb = "accepted" if allowed else "denied"
            raise _fail(text, dst, f"test failed: {src} -> {dst} is {verb}, expected {'accept' if want else 'deny'}",
                        after=('"tests"', json.dumps(src)))


def load_policy_file(path: str | Path) -> Policy:
    return parse_policy(Path(path).read_text(encoding="utf-8"))
