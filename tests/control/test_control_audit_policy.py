"""Audit of policy compilation against Tailscale's semantics (acls, grants, autogroups, visibility)."""

import datetime as dt

import pytest

from tsnet.control.policy import CAP_RELAY, PolicyError, parse_policy
from tsnet.control.store import NodeRecord

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LOGINS = {1: "alice@x", 2: "bob@x"}


def node(i, tags=(), user=1):
    return NodeRecord(id=i, stable_id=f"n{i}", machine_key="", node_key=f"k{i}", disco_key=None, name=f"n{i}",
                      user_id=user, ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i}", ephemeral=False,
                      tags=tuple(tags), created=NOW, key_expiry=None, logged_out=False, last_seen=None, hostinfo=None,
                      endpoints=(), home_derp=0, cap=133, authkey_id=None)


def allowed(policy, nodes, src, dst, port):
    for rule in policy.filter_for(dst, nodes, LOGINS):
        if not any(s == "*" or s in (src.ipv4, src.ipv6) for s in rule.src_ips or ()):
            continue
        ports = rule.dst_ports or ()
        if any(d.ports.first <= port <= d.ports.last and d.ip in ("*", dst.ipv4, dst.ipv6) for d in ports):
            return True
    return False


def test_autogroup_self_limits_sources_only_for_its_own_destination():
    # Rule: in {"src": [autogroup:member], "dst": [autogroup:self:*, autogroup:member:22]} every
    # member reaches every member's port 22; only the autogroup:self part is limited to the same user.
    p = parse_policy('{"acls": [{"action": "accept", "src": ["autogroup:member"],'
                     ' "dst": ["autogroup:self:*", "autogroup:member:22"]}]}')
    a1, a2, b1 = node(1), node(2), node(3, user=2)
    nodes = [a1, a2, b1]
    assert allowed(p, nodes, a2, a1, 80) and allowed(p, nodes, a2, a1, 22)
    assert allowed(p, nodes, b1, a1, 22)  # via autogroup:member:22 (was refused: the self limit leaked)
    assert not allowed(p, nodes, b1, a1, 80)  # autogroup:self does not admit another user
    assert p.can_see(a1, b1, nodes, LOGINS)


def test_autogroup_self_excludes_tagged_devices():
    # Rule: autogroup:self covers only untagged devices of the same user, as source and destination.
    p = parse_policy('{"tagOwners": {"tag:t": []}, "acls": [{"action": "accept", "src": ["autogroup:member", "tag:t"],'
                     ' "dst": ["autogroup:self:*"]}]}')
    a1, a_tagged = node(1), node(2, ["tag:t"])
    nodes = [a1, a_tagged]
    assert not allowed(p, nodes, a_tagged, a1, 22)
    assert p.filter_for(a_tagged, nodes, LOGINS) == ()
    assert not p.can_see(a1, a_tagged, nodes, LOGINS)


def test_user_selector_never_matches_tagged_devices():
    # Rule: a tagged device belongs to its tags, not to the user who tagged it.
    p = parse_policy('{"tagOwners": {"tag:t": []}, "acls": [{"action": "accept", "src": ["alice@x"], "dst": ["*:*"]}]}')
    a1, a_tagged, b1 = node(1), node(2, ["tag:t"]), node(3, user=2)
    nodes = [a1, a_tagged, b1]
    assert allowed(p, nodes, a1, b1, 1) and not allowed(p, nodes, a_tagged, b1, 1)


def test_visibility_is_either_direction_only():
    # Rule (Tailscale): a node is sent the peers it may reach or that may reach it, no others.
    p = parse_policy('{"tagOwners": {"tag:srv": []}, "acls": [{"action": "accept", "src": ["alice@x"],'
                     ' "dst": ["tag:srv:443"]}]}')
    a1, srv, b1 = node(1), node(2, ["tag:srv"]), node(3, user=2)
    nodes = [a1, srv, b1]
    assert p.can_see(a1, srv, nodes, LOGINS) and p.can_see(srv, a1, nodes, LOGINS)
    assert not p.can_see(b1, srv, nodes, LOGINS) and not p.can_see(a1, b1, nodes, LOGINS)


def test_app_grant_is_a_capgrant_in_the_destination_filter():
    # Rule: "app" grants become FilterRule.CapGrant in the destination's filter, Dsts = its own
    # addresses, SrcIPs = the sources; no DstPorts (no packets are allowed by it).
    p = parse_policy('{"tagOwners": {"tag:r": []}, "grants": [{"src": ["alice@x"], "dst": ["tag:r"],'
                     ' "app": {"%s": [], "example.com/cap/x": [{"k": 1}]}}]}' % CAP_RELAY)
    a1, r = node(1), node(2, ["tag:r"])
    (rule,) = [x for x in p.filter_for(r, [a1, r], LOGINS)]
    assert rule.src_ips == ("100.64.0.1", "fd7a:115c:a1e0::1") and not rule.dst_ports
    (grant,) = rule.cap_grant
    assert grant.dsts == ("100.64.0.2/32", "fd7a:115c:a1e0::2/128")
    assert grant.cap_map == {CAP_RELAY: [], "example.com/cap/x": [{"k": 1}]}
    assert not allowed(p, [a1, r], a1, r, 443)


@pytest.mark.parametrize("rule", [
    '{"action": "accept", "src": ["*"], "dst": ["*:*"], "srcPosture": ["posture:latest"]}',
    '{"action": "accept", "src": ["*"], "dst": ["*:*"], "users": ["*"]}',
])
def test_acl_fields_we_do_not_implement_are_refused(rule):
    # A posture (or other) condition narrows access in Tailscale; ignoring it would allow more.
    with pytest.raises(PolicyError, match="not supported"):
        parse_policy('{"postures": {"posture:latest": []}, "acls": [%s]}' % rule)


def test_grant_fields_we_do_not_implement_are_refused():
    with pytest.raises(PolicyError, match=r"line 3: grant field 'via' is not supported"):
        parse_policy('{"tagOwners": {"tag:exit": []}, "grants": [\n'
                     ' {"src": ["*"], "dst": ["*"], "ip": ["*"],\n'
                     '  "via": ["tag:exit"]}]}')
