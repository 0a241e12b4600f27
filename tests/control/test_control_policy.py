"""Policy: HuJSON parsing, errors with line numbers, compilation to filters, relay grants, visibility."""

import datetime as dt
import ipaddress

import pytest

from control_helpers import Harness, NetmapWatcher
from tsnet.control.client import ControlClient
from tsnet.control.policy import CAP_RELAY, CAP_RELAY_TARGET, PolicyError, parse_hujson, parse_policy
from tsnet.control.server import ControlServer, ServerConfig
from tsnet.control.store import NodeRecord, Store
from tsnet.magicsock.relaymanager import cap_granted

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def node(i, tags=(), user=1):
    return NodeRecord(id=i, stable_id=f"n{i}", machine_key="", node_key=f"k{i}", disco_key=None, name=f"n{i}",
                      user_id=user, ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i}", ephemeral=False,
                      tags=tuple(tags), created=NOW, key_expiry=None, logged_out=False, last_seen=None, hostinfo=None,
                      endpoints=(), home_derp=0, cap=133, authkey_id=None)


LOGINS = {1: "alice@tailnet.test", 2: "bob@tailnet.test"}


def test_hujson_comments_and_trailing_commas():
    doc = parse_hujson('{\n // c\n "a": [1, 2,], /* x\n y */ "b": "// not a comment",\n}\n')
    assert doc == {"a": [1, 2], "b": "// not a comment"}


@pytest.mark.parametrize("text, line, reason", [
    ('{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:*"]}\n  ],\n  "bogus": 1\n}', 5, "unknown section"),
    ('{\n "acls": [\n  {"action": "drop", "src": ["*"], "dst": ["*:*"]}\n ]\n}', 3, "action"),
    ('{\n "acls": [\n  {"action": "accept", "src": ["group:nope"], "dst": ["*:*"]}\n ]\n}', 3, "group:nope"),
    ('{\n "acls": [\n  {"action": "accept", "src": ["*"],\n   "dst": ["tag:web:80"]}\n ]\n}', 4, "tagOwners"),
    ('{\n "acls": [\n  {"action": "accept", "src": ["*"], "dst": ["*:99999"]}\n ]\n}', 3, "out of bounds"),
    ('{\n "acls": [\n  {"action": "accept" "src": ["*"]}\n ]\n}', 3, "Expecting"),
    ('{\n "hosts": {"h": "10.0.0.1/8"}\n}', 2, "host"),
])
def test_bad_policy_names_line_and_reason(text, line, reason):
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert str(info.value).startswith(f"line {line}:") and reason in str(info.value)


POLICY = """{
  "groups": {"group:admins": ["alice@tailnet.test"]},
  "hosts": {"db": "100.64.0.3/32"},
  "tagOwners": {"tag:web": ["group:admins"], "tag:relay": ["group:admins"]},
  "acls": [
    {"action": "accept", "src": ["group:admins"], "dst": ["tag:web:80,443", "db:5432"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
  "grants": [
    {"src": ["autogroup:member"], "dst": ["tag:relay"], "app": {"tailscale.com/cap/relay": []}},
  ],
}"""


def test_compile_acls_and_relay_grants():
    p = parse_policy(POLICY)
    alice, bob, db, web, relay = node(1), node(2, user=2), node(3, user=2), node(4, ["tag:web"]), node(5, ["tag:relay"])
    nodes = [alice, bob, db, web, relay]
    web_rules = p.filter_for(web, nodes, LOGINS)
    assert [(r.src_ips, [(d.ip, d.ports.first, d.ports.last) for d in r.dst_ports]) for r in web_rules] == [
        (("100.64.0.1", "fd7a:115c:a1e0::1"), [("100.64.0.4", 80, 80), ("100.64.0.4", 443, 443),
                                               ("fd7a:115c:a1e0::4", 80, 80), ("fd7a:115c:a1e0::4", 443, 443)])]
    db_rules = p.filter_for(db, nodes, LOGINS)
    srcs = [r.src_ips for r in db_rules if r.dst_ports]
    assert ("100.64.0.1", "fd7a:115c:a1e0::1") in srcs  # admins -> db
    assert any(r.ip_proto == (6,) and r.src_ips == ("100.64.0.4", "fd7a:115c:a1e0::4") for r in db_rules)
    # autogroup:self: bob's other devices (db is bob's) may reach db, alice's may not.
    self_rule = [r for r in db_rules if r.dst_ports and r.dst_ports[0].ports.last == 65535]
    assert self_rule and self_rule[0].src_ips == ("100.64.0.2", "fd7a:115c:a1e0::2", "100.64.0.3", "fd7a:115c:a1e0::3")
    # relay grant: cap/relay in the relay's filter, cap/relay-target in each member's filter.
    relay_caps = [r for r in p.filter_for(relay, nodes, LOGINS) if r.cap_grant]
    assert relay_caps[0].cap_grant[0].cap_map == {CAP_RELAY: []}
    assert "100.64.0.1" in relay_caps[0].src_ips and "100.64.0.4" not in relay_caps[0].src_ips
    alice_caps = [r for r in p.filter_for(alice, nodes, LOGINS) if r.cap_grant]
    assert alice_caps[0].src_ips == ("100.64.0.5", "fd7a:115c:a1e0::5")
    assert alice_caps[0].cap_grant[0].cap_map == {CAP_RELAY_TARGET: []}
    assert alice_caps[0].cap_grant[0].dsts == ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")
    # Visibility: web and relay cannot reach each other in any direction.
    assert p.can_see(alice, web, nodes, LOGINS) and p.can_see(web, alice, nodes, LOGINS)
    assert not p.can_see(web, relay, nodes, LOGINS)
    assert not p.can_see(alice, bob, nodes, LOGINS)  # different users, no rule between them
    assert p.can_see(alice, relay, nodes, LOGINS)  # the relay capability makes them peers


def test_raw_relay_target_app_grant_passes_through_without_a_relay_cap():
    """Any app capability, even ``cap/relay-target`` written by hand, is compiled as written.

    It lands in the destinations' filters only (sources: the grant's src nodes); unlike a ``cap/relay``
    grant it puts no companion ``cap/relay`` into the source's filter. The NAT lab uses this to give
    nodes a relay the relay itself does not serve, so the relay's own check is what refuses them.
    """
    p = parse_policy("""{
      "tagOwners": {"tag:relay": ["autogroup:member"], "tag:client": ["autogroup:member"]},
      "grants": [
        {"src": ["tag:client"], "dst": ["tag:relay"], "app": {"tailscale.com/cap/relay": []}},
        {"src": ["tag:relay"], "dst": ["autogroup:member"], "app": {"tailscale.com/cap/relay-target": [{"x": 1}]}},
      ],
    }""")
    alice, client, relay = node(1), node(2, ["tag:client"]), node(3, ["tag:relay"])
    nodes = [alice, client, relay]

    def ips(n):
        return [ipaddress.ip_address(n.ipv4), ipaddress.ip_address(n.ipv6)]

    alice_rules = p.filter_for(alice, nodes, LOGINS)
    assert [(r.src_ips, r.cap_grant[0].dsts, r.cap_grant[0].cap_map) for r in alice_rules] == [
        (("100.64.0.3", "fd7a:115c:a1e0::3"), ("100.64.0.1/32", "fd7a:115c:a1e0::1/128"),
         {CAP_RELAY_TARGET: [{"x": 1}]})]
    relay_rules = p.filter_for(relay, nodes, LOGINS)
    # Alice believes the relay serves her; the relay grants cap/relay to tag:client only.
    assert cap_granted(alice_rules, CAP_RELAY_TARGET, ips(relay), ips(alice))
    assert cap_granted(relay_rules, CAP_RELAY, ips(client), ips(relay))
    assert not cap_granted(relay_rules, CAP_RELAY, ips(alice), ips(relay))
    # The client's own companion relay-target comes from the cap/relay grant, as before.
    assert cap_granted(p.filter_for(client, nodes, LOGINS), CAP_RELAY_TARGET, ips(relay), ips(client))


async def test_policy_applies_through_server(nursery, tmp_path):
    store = Store.open(tmp_path / "s")
    config = ServerConfig()
    parse_policy("""{
      "tagOwners": {"tag:srv": []},
      "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:srv:22"]}],
      "nodeAttrs": [{"target": ["tag:srv"], "attr": ["magicdns-aaaa"]}],
    }""").install(config)
    server = ControlServer(store, config)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    h = Harness(server, port, nursery)
    watchers = {}
    for name, key in (("srv", h.authkey(tags=("tag:srv",))), ("laptop", h.authkey()), ("phone", h.authkey())):
        w = watchers[name] = NetmapWatcher()
        client = ControlClient(h.config(name, key))

        async def run(client=client, w=w):
            async with client:
                await client.run(w)

        nursery.start_soon(run)
    srv = await watchers["srv"].wait_for(lambda nm: len(nm.peers) == 2)
    rule = srv.packet_filter[0]
    assert rule.dst_ports[0].ports.first == 22 and len(rule.src_ips) == 4
    assert "magicdns-aaaa" in srv.cap_map and "disable-captive-portal-detection" in srv.cap_map
    laptop = await watchers["laptop"].wait_for(lambda nm: len(nm.peers) == 1)
    assert laptop.peers[0].name.startswith("srv.") and laptop.packet_filter == ()
    assert laptop.peers[0].tags == ("tag:srv",)


async def test_request_tags_need_tag_owner(nursery, tmp_path):
    store = Store.open(tmp_path / "s")
    config = ServerConfig()
    parse_policy('{"tagOwners": {"tag:ok": ["autogroup:member"], "tag:locked": ["nobody@x"]}}').install(config)
    server = ControlServer(store, config)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    h = Harness(server, port, nursery)
    async with ControlClient(h.config("good", h.authkey(), tags=("tag:ok",))) as c:
        await c.login()
    assert store.node_by_name("good").tags == ("tag:ok",) and store.node_by_name("good").key_expiry is None
    from tsnet.control.client import LoginError

    async with ControlClient(h.config("bad", h.authkey(), tags=("tag:locked",))) as c:
        with pytest.raises(LoginError, match="not permitted"):
            await c.login()


async def test_policy_file_edits_apply_live_and_bad_edits_are_ignored(nursery, tmp_path):
    path = tmp_path / "policy.hujson"
    path.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    store = Store.open(tmp_path / "s")
    config = ServerConfig(policy_path=str(path))
    server = ControlServer(store, config)
    assert server.reload_policy() is None
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    h = Harness(server, port, nursery)
    w = NetmapWatcher()
    client = ControlClient(h.config("n", h.authkey()))

    async def run():
        async with client:
            await client.run(w)

    nursery.start_soon(run)
    nm = await w.wait_for(lambda nm: True)
    assert nm.packet_filter[0].dst_ports[0].ports.first == 22
    path.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:443"]}], // edited\n}')
    nm = await w.wait_for(lambda nm: nm.packet_filter[0].dst_ports[0].ports.first == 443)
    path.write_text('{"acls": [{"action": "accept", "src": ["group:missing"], "dst": ["*:80"]}]}')
    assert "group:missing" in server.reload_policy()  # refused; the 443 policy stays
    assert server.config.filter_for(store.node_by_name("n"), store.nodes(), {})[0].dst_ports[0].ports.first == 443


def test_policy_check_command(tmp_path, capsys):
    from tsnet.cli import main

    good = tmp_path / "good.hujson"
    good.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]},],}')
    assert main(["control", "policy", "check", str(good)]) == 0
    bad = tmp_path / "bad.hujson"
    bad.write_text('{\n "acls": [\n  {"action": "accept", "src": ["*"], "dst": ["nohost:22"]}\n ]\n}')
    assert main(["control", "policy", "check", str(bad)]) == 1
    assert "line 3:" in capsys.readouterr().err


def test_policy_tests_section_is_evaluated():
    base = """{
  "groups": {"group:ops": ["ops@x"]},
  "tagOwners": {"tag:db": []},
  "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:db:5432"], "proto": "tcp"}],
  "tests": [
    {"src": "ops@x", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]},
    %s
  ],
}"""
    parse_policy(base % '{"src": "dev@x", "deny": ["tag:db:5432"]}')
    with pytest.raises(PolicyError) as info:
        parse_policy(base % '{"src": "dev@x",\n     "accept": ["tag:db:5432"]}')
    assert "test failed: dev@x -> tag:db:5432 is denied" in str(info.value)
    assert str(info.value).startswith("line 8:")  # the failing destination, not the acl line
    with pytest.raises(PolicyError, match="is accepted, expected deny"):
        parse_policy(base % '{"src": "ops@x", "deny": ["tag:db:5432"], "proto": "tcp"}')


def test_node_attrs_target_nodes():
    p = parse_policy('{"tagOwners": {"tag:x": []}, "nodeAttrs": [{"target": ["tag:x"], "attr": ["magicdns-aaaa"]}]}')
    assert p.attrs_for(node(1, ["tag:x"]), [], LOGINS) == {"magicdns-aaaa": None}
    assert p.attrs_for(node(2), [], LOGINS) == {}
    with pytest.raises(PolicyError, match="nodeAttrs"):
        parse_policy('{"nodeAttrs": [{"target": "*"}]}')
