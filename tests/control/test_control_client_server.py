"""Our client against our server over loopback: register, map poll, deltas, logout, expiry."""

import datetime as dt
import functools
import ipaddress

import pytest
import trio

from tsnet.control.client import ControlClient, LoginError
from tsnet.key import DiscoPrivate

from control_helpers import NetmapWatcher

CGNAT = ipaddress.ip_network("100.64.0.0/10")
ULA = ipaddress.ip_network("fd7a:115c:a1e0::/48")


async def start(control, nursery, client_cfg):
    """Run a client in the background; returns (client, watcher, cancel scope)."""
    watcher = NetmapWatcher()
    cancel = trio.CancelScope()
    client = ControlClient(client_cfg)

    async def runner():
        with cancel:
            async with client:
                await client.run(watcher)

    nursery.start_soon(runner)
    return client, watcher, cancel


def peer_names(nm):
    return sorted(p.name for p in nm.peers)


async def test_two_nodes_see_each_other(control, nursery):
    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("alpha", key))
    b, wb, _ = await start(control, nursery, control.config("Beta Box", key))
    nma = await wa.wait_for(lambda nm: len(nm.peers) == 1)
    nmb = await wb.wait_for(lambda nm: len(nm.peers) == 1)
    assert nma.name == "alpha.tailnet.test." and nmb.name == "beta-box.tailnet.test."
    assert peer_names(nma) == ["beta-box.tailnet.test."]
    v4, v6 = nma.addresses
    assert v4.ip in CGNAT and v6.ip in ULA and v4.network.prefixlen == 32
    peer = nma.peers[0]
    assert peer.key == b.config.node_key.public and peer.disco_key == b.config.disco_key
    assert peer.addresses == nmb.addresses and peer.allowed_ips == tuple(i.network for i in nmb.addresses)
    assert peer.cap == 133 and peer.online is True
    assert nma.domain == "tailnet.test" and nma.dns_config.proxied and nma.dns_config.domains == ("tailnet.test",)
    assert nma.packet_filter[0].src_ips == ("*",)
    assert "disable-captive-portal-detection" in nma.cap_map
    assert set(nma.user_profiles) == {nma.self_node.user}
    # Delta: b moves endpoints and home DERP; a hears of it through PeersChanged.
    await b.send_update(endpoints=("192.0.2.7:41641",), preferred_derp=900)
    nma = await wa.wait_for(lambda nm: nm.peers and nm.peers[0].endpoints)
    assert nma.peers[0].endpoints == ((ipaddress.ip_address("192.0.2.7"), 41641),)
    assert nma.peers[0].home_derp == 900


async def test_bad_keys_refused(control, nursery):
    async with ControlClient(control.config("x", "tskey-auth-nope")) as c:
        with pytest.raises(LoginError, match="invalid key"):
            await c.login()
    single = control.authkey()
    async with ControlClient(control.config("one", single)) as c:
        await c.login()
    async with ControlClient(control.config("two", single)) as c:
        with pytest.raises(LoginError, match="already used"):
            await c.login()
    revoked = control.authkey(reusable=True)
    assert control.server.store.revoke_authkey(revoked)
    async with ControlClient(control.config("three", revoked)) as c:
        with pytest.raises(LoginError, match="revoked"):
            await c.login()
    expired = control.server.store.create_authkey(control.server.now(), expires=control.server.now() - dt.timedelta(seconds=1)).key
    async with ControlClient(control.config("four", expired)) as c:
        with pytest.raises(LoginError, match="expired"):
            await c.login()
    control.server.config.interactive_login = False
    async with ControlClient(control.config("five", None)) as c:
        with pytest.raises(LoginError, match="auth key"):
            await c.login()


async def test_reregister_known_key_without_auth_and_stable_addresses(control, nursery):
    cfg = control.config("gamma", control.authkey())
    async with ControlClient(cfg) as c:
        await c.login()
    node = control.server.store.node_by_key(str(cfg.node_key.public))
    cfg.auth_key = None  # a restart: same keys, no credentials
    async with ControlClient(cfg) as c:
        await c.login()
    again = control.server.store.node_by_key(str(cfg.node_key.public))
    assert (again.id, again.ipv4, again.ipv6) == (node.id, node.ipv4, node.ipv6)
    # A new node key from the same machine with OldNodeKey rotates the same node.
    async with ControlClient(cfg) as c:
        c.rotate_node_key()
        await c.login()
    rotated = control.server.store.node_by_key(str(cfg.node_key.public))
    assert rotated.id == node.id and rotated.ipv4 == node.ipv4
    assert control.server.store.node_by_key(str(c.old_node_key or node.node_key)) is None


async def test_logout_removes_peer_and_deletes_ephemeral(control, nursery):
    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("a", key))
    b, wb, cancel_b = await start(control, nursery, control.config("b", key))
    e, we, cancel_e = await start(control, nursery, control.config("e", key, ephemeral=True))
    await wa.wait_for(lambda nm: len(nm.peers) == 2)
    cancel_b.cancel()
    nm = await wa.wait_for(lambda nm: any(p.name.startswith("b.") and p.online is False for p in nm.peers))
    assert [p.last_seen is not None for p in nm.peers if p.name.startswith("b.")] == [True]
    await e.logout()
    await wa.wait_for(lambda nm: peer_names(nm) == ["b.tailnet.test."])
    assert control.server.store.node_by_name("e") is None
    # A non-ephemeral logout keeps the node (for re-login) but removes it from peers.
    cfg_b = b.config
    async with ControlClient(cfg_b) as c:
        await c.logout()
    await wa.wait_for(lambda nm: nm.peers == ())
    assert control.server.store.node_by_name("b").logged_out


async def test_ephemeral_gc_after_inactivity(control, nursery):
    key = control.authkey(reusable=True, ephemeral=True)
    a, wa, _ = await start(control, nursery, control.config("keeper", control.authkey()))
    e, we, cancel_e = await start(control, nursery, control.config("eph", key))
    await wa.wait_for(lambda nm: len(nm.peers) == 1)
    assert control.server.store.node_by_name("eph").ephemeral
    cancel_e.cancel()
    await wa.wait_for(lambda nm: nm.peers[0].online is False)
    assert control.server.collect_ephemeral() == []  # not yet timed out
    later = control.server.now() + dt.timedelta(hours=2)
    control.server.config.clock = lambda: later
    assert control.server.collect_ephemeral() == ["eph"]
    await wa.wait_for(lambda nm: nm.peers == ())


async def test_admin_delete_and_expire(control, nursery):
    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("a", key))
    b, wb, _ = await start(control, nursery, control.config("b", key))
    await wa.wait_for(lambda nm: len(nm.peers) == 1)
    node_b = control.server.store.node_by_name("b")
    control.server.expire_node(node_b.id)
    # b notices its key expired, rotates it and renews with its (reusable) auth key: same node, new key.
    nm = await wb.wait_for(lambda nm: str(nm.self_node.key) != node_b.node_key)
    renewed = control.server.store.node_by_name("b")
    assert renewed.id == node_b.id and renewed.ipv4 == node_b.ipv4 and renewed.node_key != node_b.node_key
    await wa.wait_for(lambda nm: len(nm.peers) == 1 and str(nm.peers[0].key) == renewed.node_key)
    control.server.delete_node(control.server.store.node_by_name("a").id)
    await wb.wait_for(lambda nm: nm.peers == ())


async def test_keepalives_flow(nursery, tmp_path):
    from tsnet.control.server import ControlServer, ServerConfig
    from tsnet.control.store import Store

    from control_helpers import Harness

    store = Store.open(tmp_path / "s")
    server = ControlServer(store, ServerConfig(keepalive_interval=0.02))
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    h = Harness(server, port, nursery)
    c, w, _ = await start(h, nursery, h.config("k", h.authkey()))
    await w.wait_for(lambda nm: True)
    with trio.fail_after(10):
        while c.counters["keepalives"] < 3:
            await trio.sleep(0.01)


async def test_server_key_change_is_followed(control, nursery):
    from tsnet.key import MachinePrivate

    a, wa, _ = await start(control, nursery, control.config("a", control.authkey(reusable=True)))
    await wa.wait_for(lambda nm: True)
    old_key = a.server_key
    control.server.noise_key = MachinePrivate.generate()  # as if the server lost its state key
    await a._drop_conn()
    # The next lite update fails the handshake, refetches /key, and the retry succeeds.
    from tsnet.control.client import ControlError

    with trio.fail_after(10):
        for attempt in range(2):  # the poll loop may have refetched the key first; then one try suffices
            try:
                await a.send_update(disco_key=DiscoPrivate.generate().public)
                break
            except ControlError:
                if attempt:
                    raise
    assert a.server_key == control.server.noise_key.public != old_key
    assert a.counters["key_changes"] == 1
    node = control.server.store.node_by_key(str(a.config.node_key.public))
    assert node.disco_key == str(a.config.disco_key)


async def test_auth_url_shown_and_followup_sent(control, nursery):
    """A server asking for interactive login: the client shows AuthURL once and re-sends it as Followup."""
    from tsnet.control import tailcfg

    seen_followups = []
    real_register = control.server.register

    def interactive(machine, req):
        seen_followups.append(req.followup)
        if not req.followup:
            return tailcfg.RegisterResponse(auth_url="https://login.example/a/123")
        return real_register(machine, tailcfg.RegisterRequest(
            version=req.version, node_key=req.node_key, hostinfo=req.hostinfo,
            auth=tailcfg.RegisterResponseAuth(auth_key=control.authkey())))

    control.server.register = interactive
    shown = []
    cfg = control.config("inter", None, on_auth_url=shown.append)
    async with ControlClient(cfg) as c:
        resp = await c.login()
    assert shown == ["https://login.example/a/123"]
    assert seen_followups == ["", "https://login.example/a/123"]
    assert resp.machine_authorized and c.logged_in


async def test_dns_config_magicdns_split_and_extra_records(control, nursery):
    from tsnet.control import tailcfg

    cfg = control.server.config
    cfg.nameservers = ("192.0.2.53",)
    cfg.split_dns = {"corp.example": ("10.0.0.53",)}
    cfg.extra_records = (tailcfg.DNSRecord(name="db.tailnet.test", type="A", value="100.64.9.9"),)
    a, wa, _ = await start(control, nursery, control.config("a", control.authkey()))
    nm = await wa.wait_for(lambda nm: True)
    dns = nm.dns_config
    assert dns.proxied and dns.domains == ("tailnet.test",)
    assert [r.addr for r in dns.resolvers] == ["192.0.2.53"]
    assert [r.addr for r in dns.routes["corp.example."]] == ["10.0.0.53"]
    assert "tailnet.test." in dns.routes
    assert dns.extra_records[0].value == "100.64.9.9"


async def test_garbage_requests_get_errors_and_server_survives(control, nursery):
    from tsnet.control.h2conn import open_h2_client
    from tsnet.control import conn as ts2021
    from tsnet.key import MachinePrivate

    res = await ts2021.dial("127.0.0.1", control.port, machine_key=MachinePrivate.generate(),
                            server_key=control.server.noise_key.public)
    async with open_h2_client(res.stream, "x") as h2c:
        for path, body, status in (
            ("/machine/register", b"{not json", 400),
            ("/machine/register", b'{"NodeKey": ""}', 400),
            ("/machine/map", b'{"NodeKey": "nodekey:' + b"00" * 32 + b'"}', 400),
            ("/machine/map", b"[]", 400),
            ("/machine/unknown", b"{}", 404),
        ):
            r = await h2c.request("POST", path, body=body)
            await r.read()
            assert r.status == status, (path, body)
        r = await h2c.request("GET", "/machine/register")
        await r.read()
        assert r.status == 400
        r = await h2c.request("POST", "/machine/register", body=b'{"Version": 133}')
        assert b"lacks a NodeKey" in await r.read()
    # Still serving real clients afterwards.
    a, wa, _ = await start(control, nursery, control.config("after", control.authkey()))
    await wa.wait_for(lambda nm: nm.name.startswith("after."))


async def test_small_peer_changes_travel_as_patches(control, nursery):
    from tsnet.control.server import _Session

    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("a", key))
    b, wb, _ = await start(control, nursery, control.config("b", key))
    await wa.wait_for(lambda nm: len(nm.peers) == 1)
    server = control.server
    node_a = server.store.node_by_name("a")
    probe = _Session(node_a.id)
    server._session_delta(probe, first=True)
    await b.send_update(endpoints=("192.0.2.8:1",), preferred_derp=901)
    delta = server._session_delta(probe, first=False)
    assert "PeersChanged" not in delta
    (patch,) = delta["PeersChangedPatch"]
    assert patch["Endpoints"] == ["192.0.2.8:1"] and patch["DERPRegion"] == 901
    nm = await wa.wait_for(lambda nm: nm.peers[0].home_derp == 901)
    assert nm.peers[0].endpoints[0][1] == 1
    # A hostname change is not patchable: the full node is sent.
    node_b = server.store.node_by_name("b")
    server.store.update_node(node_b.id, hostinfo={"Hostname": "renamed"})
    server.notify()
    delta = server._session_delta(probe, first=False)
    assert delta["PeersChanged"][0]["Hostinfo"]["Hostname"] == "renamed"


async def test_deleted_node_logs_in_again_with_its_key(control, nursery):
    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("a", key))
    b, wb, _ = await start(control, nursery, control.config("b", key))
    await wa.wait_for(lambda nm: len(nm.peers) == 1)
    old_id = control.server.store.node_by_name("b").id
    control.server.delete_node(old_id)
    nm = await wa.wait_for(lambda nm: len(nm.peers) == 1 and nm.peers[0].id != old_id, timeout=15)
    assert nm.peers[0].name == "b.tailnet.test."


async def test_interactive_login_waits_for_admin_approval(control, nursery):
    shown = []
    approved = trio.Event()

    def on_url(url):
        shown.append(url)
        token = url.rsplit("/", 1)[1]
        assert control.server.store.pending(token).hostname == "walk-in"
        control.server.store.approve_pending(token)  # what 'tsnet control nodes approve' does
        control.server.notify()  # (the running server notices CLI writes through watch_store)
        approved.set()

    cfg = control.config("walk-in", None, on_auth_url=on_url)
    async with ControlClient(cfg) as c:
        with trio.fail_after(10):
            await c.login()
    assert shown and shown[0].startswith(f"http://127.0.0.1:{control.port}/register/")
    node = control.server.store.node_by_key(str(cfg.node_key.public))
    assert node.name == "walk-in" and control.server.store.pending_logins() == []


async def test_expired_node_without_key_reauthenticates_interactively(control, nursery):
    urls = []

    def approve(url):
        urls.append(url)
        control.server.store.approve_pending(url.rsplit("/", 1)[1])
        control.server.notify()

    cfg = control.config("laptop", control.authkey(), on_auth_url=approve)
    b, wb, _ = await start(control, nursery, cfg)
    nm = await wb.wait_for(lambda nm: True)
    cfg.auth_key = None  # single-use key is spent; renewal must go through the admin
    before = control.server.store.node_by_name("laptop")
    control.server.expire_node(before.id)
    nm = await wb.wait_for(lambda nm: str(nm.self_node.key) != before.node_key)
    after = control.server.store.node_by_name("laptop")
    assert len(urls) == 1 and after.id == before.id and after.ipv4 == before.ipv4
    assert not after.expired(control.server.now())


async def test_admin_cli_writes_reach_a_running_server(control, nursery):
    from tsnet.cli import main as tsnet_main

    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("a", key))
    b, wb, _ = await start(control, nursery, control.config("gone", key))
    await wa.wait_for(lambda nm: len(nm.peers) == 1)
    old_id = control.server.store.node_by_name("gone").id
    state_dir = str(control.server.store.path.parent)
    # The CLI writes through its own SQLite connection; the server's store watcher picks it up.
    assert tsnet_main(["control", "nodes", "delete", "--state-dir", state_dir, "gone"]) == 0
    await wa.wait_for(lambda nm: all(p.id != old_id for p in nm.peers))


async def test_c2n_echo_through_ping_request(control, nursery):
    a, wa, _ = await start(control, nursery, control.config("probe-me", control.authkey()))
    await wa.wait_for(lambda nm: True)
    node = control.server.store.node_by_name("probe-me")
    assert node.id in control.server.sessions  # the poll is open once the first netmap arrived
    with trio.fail_after(10):
        reply = await control.server.c2n_request(node.id, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nhello")
    reply = await control.server.c2n_request(node.id, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404")
    assert a.counters["pings_answered"] >= 1  # the second one may still be reading the (empty) reply
    with pytest.raises(LookupError):
        await control.server.c2n_request(9999, b"GET /echo HTTP/1.1\r\n\r\n")


async def test_https_login_url_with_verified_key_fetch(nursery, tmp_path):
    """An https login URL: /key over verified TLS, ts2021 falls back from port 80 to the TLS port."""
    import ssl

    from control_helpers import Harness, self_signed_cert
    from tsnet.control.client import ControlError, fetch_server_key, parse_login_url
    from tsnet.control.server import ControlServer, ServerConfig
    from tsnet.control.store import Store

    cert, key = self_signed_cert(tmp_path, "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    store = Store.open(tmp_path / "st")
    server = ControlServer(store, ServerConfig())
    port = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0, ssl_context=server_ctx))
    h = Harness(server, port, nursery)
    h.url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    # Without trusting the certificate, /key fails (it is verified normally).
    with pytest.raises(ControlError, match="certificate verify failed"):
        await fetch_server_key(parse_login_url(h.url))
    a, wa, _ = await start(h, nursery, h.config("secure", h.authkey(), ssl_context=trust))
    nm = await wa.wait_for(lambda nm: True)
    assert nm.name == "secure.tailnet.test." and a.server_key == server.noise_key.public


async def test_map_stream_of_a_client_that_stops_reading_is_dropped(control, nursery):
    server = control.server
    server.config.write_timeout = 0.2
    key = control.authkey(reusable=True)
    a, wa, _ = await start(control, nursery, control.config("a", key))
    b_cfg = control.config("b", key)
    stalled = set()
    real_serve_map, real_write = server.serve_map, server._write

    async def serve_map(machine, req, resp):
        if req.node_key == b_cfg.node_key.public and req.stream:
            stalled.add(resp)
        await real_serve_map(machine, req, resp)

    async def write(resp, frame):
        if resp in stalled and stall_now.is_set():
            with trio.fail_after(server.config.write_timeout):
                await trio.sleep_forever()  # what a peer that never reads looks like to the writer
        await real_write(resp, frame)

    stall_now = trio.Event()
    server.serve_map, server._write = serve_map, write
    b, wb, _ = await start(control, nursery, b_cfg)
    await wa.wait_for(lambda nm: len(nm.peers) == 1 and nm.peers[0].online)
    b_id = server.store.node_by_name("b").id
    stall_now.set()
    await a.send_update(endpoints=("192.0.2.1:1",))  # b's session must write this change, and cannot
    await wa.wait_for(lambda nm: nm.peers[0].online is False)  # dropped after write_timeout
    assert server.store.node(b_id).last_seen is not None
