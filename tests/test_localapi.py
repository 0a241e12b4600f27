"""The local API on a Unix socket (tsnet.localapi) and its blocking client."""

import datetime as dt
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cli_fakes import FakeServer, Tailnet
from tsnet import localapi
from tsnet.localapi import LocalAPIError, LocalClient


@pytest.fixture
async def tailnet_pair(nursery, tmp_path):
    net = Tailnet()
    a, b = FakeServer(net, hostname="alpha"), FakeServer(net, hostname="beta")
    await a.up()
    await b.up()
    path = await nursery.start(localapi.serve, a, localapi.default_socket_path(tmp_path / "state"))
    return a, b, path


def call(fn, *args, **kw):
    """Run a blocking client call off the trio thread."""
    return trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def test_socket_is_private_and_in_the_state_dir(tailnet_pair, tmp_path):
    _, _, path = tailnet_pair
    assert path == tmp_path / "state" / "tsnet.sock"
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["tsnet.sock"]  # no staging leftovers


async def test_status_ping_netcheck_whois_metrics(tailnet_pair):
    a, b, path = tailnet_pair
    client = LocalClient(path)
    st = await call(client.status)
    assert st["backend_state"] == "Running"
    assert [p["name"] for p in st["peers"]] == ["beta"] and st["peers"][0]["path"].startswith("direct")
    (peer,) = await call(client.peers)
    assert peer["name"] == "beta" and peer["path"] == "direct 127.0.0.1:41641"
    pong = await call(client.ping, "beta")
    assert pong == {"peer": "beta", "ip": str(b.ip), "latency": 0.0015, "path": "direct 127.0.0.1:41641"}
    assert (await call(client.netcheck))["udp"] is True
    who = await call(client.whois, f"{b.ip}:443")
    assert who["node"]["name"] == "beta"
    fams = {f.name for f in text_string_to_metric_families(await call(client.metrics))}
    assert {"tsnet_peers", "process_cpu_seconds"} <= fams


async def test_errors_are_json_with_status(tailnet_pair):
    a, _, path = tailnet_pair
    client = LocalClient(path)
    with pytest.raises(LocalAPIError) as info:
        await call(client.ping, "nobody")
    assert info.value.status == 404 and "nobody" in str(info.value)
    with pytest.raises(LocalAPIError) as info:
        await call(client.whois, "100.64.9.9")
    assert info.value.status == 404
    with pytest.raises(LocalAPIError) as info:
        await call(client.whois, "not-an-ip")
    assert info.value.status == 400
    a.ping_error = TimeoutError("no reply")
    with pytest.raises(LocalAPIError) as info:
        await call(client.ping, "beta", timeout=0.5)
    assert info.value.status == 504
    a.ping_error = RuntimeError("internal")
    with pytest.raises(LocalAPIError) as info:
        await call(client.ping, "beta")
    assert info.value.status == 500 and "RuntimeError" in str(info.value)
    status, body = await call(client.request, "GET", "nonexistent")
    assert status == 404
    status, body = await call(client.request, "DELETE", "status")
    assert status == 405
    # The API keeps answering after all of that.
    assert (await call(client.status))["backend_state"] == "Running"


async def test_healthz_on_the_socket(tailnet_pair):
    a, _, path = tailnet_pair
    client = LocalClient(path)
    assert await call(client.request, "GET", "healthz") == (200, b"ok\n")
    a.health.append("DERP region 900 unreachable")
    status, body = await call(client.request, "GET", "healthz")
    assert status == 503 and b"DERP region 900 unreachable" in body


async def test_garbage_on_the_socket_is_survived(tailnet_pair):
    _, _, path = tailnet_pair
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    await sock.send(b"\x16\x03\x01 not http at all\r\n\r\n")
    with trio.fail_after(5):
        while await sock.recv(4096):
            pass
    sock.close()
    assert (await call(LocalClient(path).status))["backend_state"] == "Running"


async def test_no_node_and_stale_socket(tmp_path, nursery):
    with pytest.raises(LocalAPIError, match="no node is running"):
        LocalClient(tmp_path / "missing.sock").status()
    stale = tmp_path / "tsnet.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a crashed node leaves
    with pytest.raises(LocalAPIError, match="stale"):
        LocalClient(stale).status()
    node = FakeServer(Tailnet(), hostname="a")
    await node.up()
    async with trio.open_nursery() as inner:
        await inner.start(localapi.serve, node, stale)  # replaces the stale file
        assert (await call(LocalClient(stale).status))["backend_state"] == "Running"
        with pytest.raises(OSError, match="already serving"):
            await nursery.start(localapi.serve, node, stale)
        inner.cancel_scope.cancel()
    assert not stale.exists()  # removed when serving stops


def test_to_jsonable_handles_status_types():
    import enum

    class Color(enum.Enum):
        RED = "red"

    @dataclass
    class Thing:
        ip: ipaddress.IPv4Address
        when: dt.datetime
        span: dt.timedelta
        color: Color
        raw: bytes
        inf: float
        nested: tuple

    value = localapi.to_jsonable(Thing(ipaddress.ip_address("100.64.0.1"), dt.datetime(2026, 1, 1),
                                       dt.timedelta(seconds=2), Color.RED, b"\x01", float("inf"), ({1: 2},)))
    assert value == {"ip": "100.64.0.1", "when": "2026-01-01T00:00:00", "span": 2.0, "color": "red",
                     "raw": "01", "inf": None, "nested": [{"1": 2}]}
