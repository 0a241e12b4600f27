"""Audit of the client's map session against tailscaled's controlclient/ipnlocal rules.

Each test names the rule it checks. Times are explicit (``now`` arguments); no clock is read.
"""

import datetime as dt
import ipaddress

from tsnet.control import tailcfg as tc
from tsnet.control.netmap import MapSession
from tsnet.key import DiscoPrivate, NodePrivate

NOW = dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)
K = [NodePrivate.generate().public for _ in range(6)]
D = [DiscoPrivate.generate().public for _ in range(6)]
ZERO_TIME = dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc)  # Go's zero time: "never expires"


def node(i, **kw):
    base = dict(id=i, stable_id=f"n{i}", name=f"n{i}.tn.test.", user=1, key=K[i], disco_key=D[i],
                addresses=(f"100.64.0.{i}/32",), endpoints=(f"192.0.2.{i}:41641",), home_derp=900, cap=133)
    base.update(kw)
    return tc.Node(**base)


def rules(tag):
    return (tc.FilterRule(src_ips=(tag,)),)


# -- packet filters --------------------------------------------------------------------------------


def test_named_filter_reset_applies_first_wherever_it_sits():
    # Rule (mapSession): PacketFilters {"*": null} clears all named filters, then the message's
    # other entries apply, whatever the key order of the JSON object.
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), packet_filters={"old": rules("old")}), NOW)
    nm = s.apply(tc.MapResponse(packet_filters={"new": rules("new"), "*": None}), NOW)
    assert [r.src_ips for r in nm.packet_filter] == [("new",)]
    # Decoded from the wire too (JSON order "new" before "*").
    msg = tc.decode(tc.MapResponse, b'{"PacketFilters":{"b":[{"SrcIPs":["b"]}],"*":null}}')
    s.apply(tc.MapResponse(packet_filters={"a": rules("a")}), NOW)
    nm = s.apply(msg, NOW)
    assert [r.src_ips for r in nm.packet_filter] == [("b",)]


def test_star_with_rules_is_not_a_filter_name():
    # Rule: only "*": null means reset; a "*" key with rules is ignored (never a named filter).
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), packet_filters={"x": rules("x")}), NOW)
    nm = s.apply(tc.MapResponse(packet_filters={"*": rules("star")}), NOW)
    assert [r.src_ips for r in nm.packet_filter] == [("x",)]


def test_packet_filter_base_coexists_with_named_and_null_deletes():
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), packet_filter=rules("base")), NOW)
    nm = s.apply(tc.MapResponse(packet_filters={"a": rules("a")}), NOW)
    assert [r.src_ips for r in nm.packet_filter] == [("a",), ("base",)]
    nm = s.apply(tc.MapResponse(packet_filters={"a": None}), NOW)
    assert [r.src_ips for r in nm.packet_filter] == [("base",)]


# -- patches, DERP map, capabilities, control time -------------------------------------------------


def test_patch_zero_derp_region_and_cap_mean_unchanged():
    # Rule: PeerChange.DERPRegion / Cap of 0 leave the peer's value (Go skips zero values).
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), peers=(node(1),)), NOW)
    msg = tc.decode(tc.MapResponse, b'{"PeersChangedPatch":[{"NodeID":1,"DERPRegion":0,"Cap":0,"Online":true}]}')
    nm = s.apply(msg, NOW)
    assert nm.peers[0].home_derp == 900 and nm.peers[0].cap == 133 and nm.peers[0].online is True


def test_patch_every_field():
    # Rule: PeersChangedPatch may change DERP, Cap, CapMap, Endpoints, Key, DiscoKey, Online,
    # LastSeen, KeyExpiry; unknown NodeIDs are ignored.
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), peers=(node(1),)), NOW)
    seen = NOW - HOUR
    nm = s.apply(tc.MapResponse(peers_changed_patch=(
        tc.PeerChange(node_id=1, derp_region=901, cap=140, cap_map={"x": None}, endpoints=("192.0.2.9:1",),
                      key=K[5], disco_key=D[5], online=False, last_seen=seen, key_expiry=NOW + HOUR),
        tc.PeerChange(node_id=42, derp_region=1))), NOW)
    (p,) = nm.peers
    assert (p.home_derp, p.cap, dict(p.cap_map), p.key, p.disco_key, p.online, p.last_seen, p.key_expiry) == (
        901, 140, {"x": None}, K[5], D[5], False, seen, NOW + HOUR)
    assert p.endpoints == ((ipaddress.ip_address("192.0.2.9"), 1),)


def test_derp_map_null_regions_dropped_and_omitted_fields_kept():
    # Rules: a null region entry (Headscale has sent them) is dropped; a DERPMap without Regions
    # keeps the previous Regions and omitDefaultRegions; without HomeParams keeps HomeParams; a
    # HomeParams without RegionScore keeps the previous RegionScore.
    s = MapSession()
    msg = tc.decode(tc.MapResponse, b'{"Node":{"ID":1,"Key":"%s"},"DERPMap":{"Regions":{"900":{"RegionID":900},'
                    b'"901":null},"omitDefaultRegions":true,"HomeParams":{"RegionScore":{"900":0.5}}}}'
                    % str(K[0]).encode())
    nm = s.apply(msg, NOW)
    assert set(nm.derp_map.regions) == {900}
    nm = s.apply(tc.MapResponse(derp_map=tc.DERPMap()), NOW)
    assert set(nm.derp_map.regions) == {900} and nm.derp_map.omit_default_regions is True
    assert nm.derp_map.home_params.region_score == {900: 0.5}
    nm = s.apply(tc.MapResponse(derp_map=tc.DERPMap(home_params=tc.DERPHomeParams())), NOW)
    assert nm.derp_map.home_params.region_score == {900: 0.5}
    nm = s.apply(tc.MapResponse(derp_map=tc.DERPMap(regions={7: tc.DERPRegion(region_id=7)})), NOW)
    assert set(nm.derp_map.regions) == {7} and nm.derp_map.omit_default_regions is None


def test_old_style_capabilities_count_as_cap_map_keys():
    # Rule: Node.Capabilities from older servers are folded into CapMap.
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0, capabilities=("disable-relay-client",), cap_map={"a": ["1"]})), NOW)
    assert dict(nm.cap_map) == {"a": ["1"], "disable-relay-client": None}


def test_keepalive_and_zero_control_time():
    # Rules: a KeepAlive message changes nothing (even if it carries other fields); a zero
    # ControlTime is ignored; ControlTime is taken from keep-alives too.
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), peers=(node(1),)), NOW)
    assert s.apply(tc.MapResponse(keep_alive=True, peers_removed=(1,), control_time=NOW + HOUR), NOW) is None
    assert s.control_time == NOW + HOUR and s.clock_delta == HOUR
    s.apply(tc.MapResponse(keep_alive=True, control_time=ZERO_TIME), NOW)
    assert s.control_time == NOW + HOUR
    s.apply(tc.MapResponse(keep_alive=True, control_time=NOW + dt.timedelta(seconds=30)), NOW)
    assert s.clock_delta == dt.timedelta(0)  # under a minute: our clock is trusted
    assert [p.id for p in s.snapshot().peers] == [1]


def test_ssh_policy_and_unknown_fields_are_ignored_safely():
    s = MapSession()
    msg = tc.decode(tc.MapResponse, b'{"Node":{"ID":1,"Key":"%s"},"SSHPolicy":{"rules":[{"weird":1}]},'
                    b'"SomeFutureField":{"x":[1,2]},"Health":["h"],"DisplayMessages":{"*":null}}' % str(K[0]).encode())
    nm = s.apply(msg, NOW)
    assert nm.peers == () and nm.name == ""


# -- peers the data plane must not use -------------------------------------------------------------


def test_peer_expired_flag_from_control_skips_it():
    # Rule (nmcfg.WGCfg): peers with Expired set are not configured into WireGuard.
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0), peers=(node(1), node(2, expired=True))), NOW)
    assert [p.id for p in nm.peers] == [1]
    (skipped,) = nm.skipped_peers
    assert skipped.id == 2 and skipped.expired and skipped.endpoints == () and skipped.home_derp == 0


def test_peer_key_expiry_passing_skips_it_without_a_message():
    # Rule (ipnlocal expiryManager.flagExpiredPeers): a peer whose KeyExpiry has passed is
    # expired even if control has not said so; a timer wakes the client at the next expiry.
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0), peers=(node(1, key_expiry=NOW + HOUR), node(2, key_expiry=ZERO_TIME),
                                                      node(3, key_expiry=NOW - HOUR))), NOW)
    assert [p.id for p in nm.peers] == [1, 2] and [p.id for p in nm.skipped_peers] == [3]
    assert s.next_expiry(NOW) == NOW + HOUR
    assert s.refresh(NOW + HOUR / 2) is None  # nothing changed yet
    nm = s.refresh(NOW + HOUR)
    assert [p.id for p in nm.peers] == [2] and [p.id for p in nm.skipped_peers] == [1, 3]
    assert s.next_expiry(NOW + HOUR) is None
    # Control extends the key: usable again.
    nm = s.apply(tc.MapResponse(peers_changed_patch=(tc.PeerChange(node_id=1, key_expiry=NOW + 3 * HOUR),)), NOW + HOUR)
    assert [p.id for p in nm.peers] == [1, 2] and s.next_expiry(NOW + HOUR) == NOW + 3 * HOUR


def test_peer_expiry_judged_by_control_clock():
    # Rule: expiry uses ControlTime's offset when our clock is off by more than a minute.
    s = MapSession()
    ahead = NOW + 2 * HOUR
    nm = s.apply(tc.MapResponse(node=node(0), peers=(node(1, key_expiry=NOW + HOUR),), control_time=ahead), NOW)
    assert nm.peers == () and [p.id for p in nm.skipped_peers] == [1]
    s = MapSession()
    behind = NOW - 2 * HOUR
    nm = s.apply(tc.MapResponse(node=node(0), peers=(node(1, key_expiry=NOW - HOUR),), control_time=behind), NOW)
    assert [p.id for p in nm.peers] == [1]
    assert s.next_expiry(NOW) == NOW + HOUR  # local time of the expiry: control's time minus the offset


def test_broken_clock_judges_no_peer_expired_by_time():
    # Rule: a (control-adjusted) time before early 2023 is a broken clock; only Expired counts.
    s = MapSession()
    old = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    nm = s.apply(tc.MapResponse(node=node(0), peers=(node(1, key_expiry=old - HOUR), node(2, expired=True))), old)
    assert [p.id for p in nm.peers] == [1] and s.next_expiry(old) is None


def test_peer_without_disco_and_derp_is_skipped_unless_wireguard_only():
    # Rule (nmcfg.WGCfg): a peer with neither a disco key nor a DERP home cannot be reached.
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0), peers=(
        node(1, disco_key=None, home_derp=None), node(2, disco_key=None), node(3, home_derp=None),
        node(4, disco_key=None, home_derp=None, is_wireguard_only=True))), NOW)
    assert [p.id for p in nm.peers] == [2, 3, 4] and [p.id for p in nm.skipped_peers] == [1]
    # A patch giving it a DERP home makes it usable.
    nm = s.apply(tc.MapResponse(peers_changed_patch=(tc.PeerChange(node_id=1, derp_region=900),)), NOW)
    assert [p.id for p in nm.peers] == [1, 2, 3, 4] and nm.skipped_peers == ()


def test_exit_and_subnet_routes_are_not_allowed_ips():
    # Rule (nmcfg.WGCfg, tsnet on Linux: no exit node, RouteAll off): a /0 AllowedIP is routed
    # only to the chosen exit node and subnet routes only with --accept-routes; tsnet has neither,
    # so only the peer's own single addresses (or single Tailscale IPs) route to it.
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0), peers=(
        node(1, addresses=("100.64.0.1/32", "fd7a:115c:a1e0::1/128", "192.0.2.50/32"),
             allowed_ips=("100.64.0.1/32", "0.0.0.0/0", "::/0", "10.1.0.0/16", "fd7a:115c:a1e0::1/128",
                          "100.64.0.77/32", "192.0.2.50/32", "192.0.2.51/32", "100.115.92.1/32")),)), NOW)
    net = ipaddress.ip_network
    assert nm.peers[0].allowed_ips == (net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128"), net("100.64.0.77/32"),
                                       net("192.0.2.50/32"))
    assert nm.peers[0].unused_routes == (net("0.0.0.0/0"), net("::/0"), net("10.1.0.0/16"), net("192.0.2.51/32"),
                                         net("100.115.92.1/32"))


# -- our own key ---------------------------------------------------------------------------------


def test_self_key_expiry_stops_all_peers():
    # Rule (ipnlocal): when our node key expires the engine gets an empty config (NeedsLogin).
    s = MapSession()
    nm = s.apply(tc.MapResponse(node=node(0, key_expiry=NOW + HOUR), peers=(node(1), node(2))), NOW)
    assert [p.id for p in nm.peers] == [1, 2] and not nm.self_expired
    assert s.next_expiry(NOW) == NOW + HOUR
    nm = s.refresh(NOW + HOUR)
    assert nm.self_expired and nm.peers == () and [p.id for p in nm.skipped_peers] == [1, 2]
    assert s.refresh(NOW + 2 * HOUR) is None and s.next_expiry(NOW + 2 * HOUR) is None
    # Control's Expired flag on our node, or a renewed key, is honoured as well.
    s = MapSession()
    assert s.apply(tc.MapResponse(node=node(0, expired=True), peers=(node(1),)), NOW).self_expired
    nm = s.apply(tc.MapResponse(node=node(0, key_expiry=NOW + HOUR)), NOW)
    assert not nm.self_expired and [p.id for p in nm.peers] == [1]


# -- the client's expiry timer (driver), on trio's mock clock ----------------------------------------


async def test_client_expiry_timer_drops_peers_then_ends_the_poll_on_own_expiry(autojump_clock):
    # Rule (ipnlocal): a timer fires at the next key expiry without any message from control;
    # a new netmap re-arms it; our own expiry ends the poll so that the client logs in again.
    import trio

    from tsnet.control.client import ClientConfig, ControlClient, _Signal
    from tsnet.key import MachinePrivate

    def wall():
        return NOW + dt.timedelta(seconds=trio.current_time())

    cfg = ClientConfig(control_url="http://127.0.0.1:9", machine_key=MachinePrivate.generate(),
                       node_key=NodePrivate.generate(), disco_key=D[0], hostname="t", wall_clock=wall)
    client = ControlClient(cfg)
    session = MapSession()
    me = node(0, key=cfg.node_key.public, key_expiry=NOW + 2 * HOUR)
    client.netmap = session.apply(tc.MapResponse(node=me, peers=(
        node(1, key_expiry=NOW + HOUR), node(2), node(3))), wall())
    seen = []
    changed = _Signal()

    def on_netmap(nm):
        seen.append((trio.current_time(), [p.id for p in nm.peers], nm.self_expired))

    async def control_sends_a_sooner_expiry():
        await trio.sleep(10)
        client.netmap = session.apply(tc.MapResponse(peers_changed_patch=(
            tc.PeerChange(node_id=3, key_expiry=NOW + HOUR / 2),)), wall())
        changed.fire()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control_sends_a_sooner_expiry)
        with trio.CancelScope() as poll_scope:
            await client._expiry_timer(session, on_netmap, changed, poll_scope, trio.CancelScope())
            await trio.sleep_forever()
        assert poll_scope.cancelled_caught  # the timer ended the poll
    assert seen == [(1800.0, [1, 2], False), (3600.0, [2], False), (7200.0, [], True)]
    assert client.self_expired() and client.counters["expiry_refreshes"] == 3


# -- incremental snapshots stay equal to a fresh build, with expiry in play ---------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ids = st.integers(1, 5)
_minutes = st.integers(-30, 120)
_ops = st.one_of(
    st.tuples(st.just("expiry"), _ids, _minutes),        # PeersChangedPatch KeyExpiry
    st.tuples(st.just("flag"), _ids, st.booleans()),     # PeersChanged with Expired
    st.tuples(st.just("reach"), _ids, st.booleans()),    # PeersChanged with/without disco and DERP
    st.tuples(st.just("remove"), _ids),
    st.tuples(st.just("time"), st.integers(0, 60)),      # the clock moves on; the timer refreshes
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_ids, _minutes), max_size=5), st.lists(_ops, max_size=15))
def test_incremental_expiry_matches_a_fresh_build(initial, ops):
    s = MapSession()
    now = NOW
    first = {i: node(i, key_expiry=NOW + dt.timedelta(minutes=m)) for i, m in initial}
    nm = s.apply(tc.MapResponse(node=node(0), peers=tuple(first.values()) or None), now)
    for op in ops:
        if op[0] == "time":
            now += dt.timedelta(minutes=op[1])
            refreshed = s.refresh(now)  # None: nothing changed, the last snapshot still holds
            if refreshed is not None:
                nm = refreshed
        elif op[0] == "remove":
            nm = s.apply(tc.MapResponse(peers_removed=(op[1],)), now)
        elif op[1] not in s.peers and op[0] == "expiry":
            continue
        elif op[0] == "expiry":
            nm = s.apply(tc.MapResponse(peers_changed_patch=(
                tc.PeerChange(node_id=op[1], key_expiry=NOW + dt.timedelta(minutes=op[2])),)), now)
        elif op[0] == "flag":
            nm = s.apply(tc.MapResponse(peers_changed=(node(op[1], expired=op[2] or None),)), now)
        else:
            kw = {} if op[2] else {"disco_key": None, "home_derp": None}
            nm = s.apply(tc.MapResponse(peers_changed=(node(op[1], **kw),)), now)
        fresh = MapSession()
        ref = fresh.apply(tc.MapResponse(node=node(0), peers=tuple(s.peers.values()) or None), now)
        assert (nm.peers, nm.skipped_peers) == (ref.peers, ref.skipped_peers)
        nxt = s.next_expiry(now)
        assert nxt is None or nxt >= now
        # The timer is never late: no usable peer has a key expiring before the next wake-up.
        for p in nm.peers:
            if p.key_expiry is not None and p.key_expiry.year > 1:
                assert nxt is not None and nxt <= p.key_expiry


def test_client_expiry_judgement_is_about_the_current_key():
    # After our key expired and was rotated, the old netmap no longer says "expired": a failed
    # first poll with the new key must not rotate (and register) yet another key.
    from tsnet.control.client import ClientConfig, ControlClient
    from tsnet.key import MachinePrivate

    priv = NodePrivate.generate()
    cfg = ClientConfig(control_url="http://127.0.0.1:9", machine_key=MachinePrivate.generate(), node_key=priv,
                       disco_key=D[0], hostname="t", wall_clock=lambda: NOW)
    client = ControlClient(cfg)
    client.netmap = MapSession().apply(tc.MapResponse(node=node(0, key=priv.public, expired=True)), NOW)
    assert client.self_expired()
    client.rotate_node_key()
    assert not client.self_expired() and client.old_node_key == priv.public


_times = st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59),
                      timezones=st.just(dt.timezone.utc))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_times, _times, _times), min_size=1, max_size=6))
def test_any_control_time_and_key_expiry_never_crash_the_session(steps):
    # Bad input from control (absurd clocks or expiries) is absorbed: no exception escapes.
    s = MapSession()
    s.apply(tc.MapResponse(node=node(0), peers=(node(1),)), NOW)
    for control_time, expiry, now in steps:
        s.apply(tc.MapResponse(control_time=control_time, node=node(0, key_expiry=expiry),
                               peers_changed_patch=(tc.PeerChange(node_id=1, key_expiry=expiry),)), now)
        at = s.next_expiry(now)
        s.refresh(at or now)
        s.apply(tc.MapResponse(keep_alive=True, control_time=control_time), now)
