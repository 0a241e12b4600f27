"""Two tsnet.Servers and the embedded control server on loopback: TCP/UDP both ways, MagicDNS, whois,
status paths, ping, unknown hosts, closed ports, and close() while transfers run."""

from __future__ import annotations

import pytest
import trio
from dnslib import DNSRecord

import tsnet
from tests.server_helpers import start_tailnet, wait_for


@pytest.fixture
async def pair(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    a = tailnet.node("alpha")
    b = tailnet.node("bravo")
    await a.up(timeout=10)
    await b.up(timeout=10)
    # Each side must know the other before dialling by name.
    await a.wait_for_peer("bravo", timeout=10)  # event-driven: wakes on each netmap
    await b.wait_for_peer("alpha", timeout=10)
    yield tailnet, a, b
    with trio.fail_after(10):
        await a.close()
        await b.close()


async def _echo_server(listener, nursery):
    async def handle(stream):
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    nursery.start_soon(trio.serve_listeners, handle, [listener])


async def _roundtrip(stream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(payload):
            chunk = await stream.receive_some(65536)
            assert chunk
            got += chunk
    return got


async def test_tcp_both_ways_by_short_name_fqdn_and_ip(pair, nursery):
    tailnet, a, b = pair
    await _echo_server(await b.listen("tcp", ":8080"), nursery)
    await _echo_server(await a.listen("tcp", ":9090"), nursery)
    b_ip = str(b.tailscale_ips()[0])
    for target in ("bravo:8080", "bravo.tailnet.test:8080", "bravo.tailnet.test.:8080", f"{b_ip}:8080"):
        stream = await a.dial("tcp", target, timeout=10)
        assert await _roundtrip(stream, b"hello " + target.encode()) == b"hello " + target.encode()
        await stream.aclose()
    stream = await a.dial("tcp6", "bravo:8080", timeout=10)  # over the fd7a:115c:a1e0:: addresses
    assert stream.remote_address[0] == str(b.tailscale_ips()[1])
    assert await _roundtrip(stream, b"v6") == b"v6"
    await stream.aclose()
    stream = await b.dial("tcp", "alpha:9090", timeout=10)
    big = bytes(range(256)) * 2000  # 512 KB
    assert await _roundtrip(stream, big) == big
    await stream.aclose()


async def test_udp_both_ways(pair):
    tailnet, a, b = pair
    server = await b.listen("udp", ":5353")
    client = await a.dial("udp", "bravo:5353")
    with trio.fail_after(10):
        while True:  # UDP may be lost while the path settles: resend until answered
            await client.send(b"ping")
            with trio.move_on_after(0.5):
                data, addr = await server.recvfrom(2048)
                break
    assert data == b"ping" and addr[0] == str(a.tailscale_ips()[0])
    await server.sendto(b"pong", addr)
    with trio.fail_after(5):
        assert await client.recv() == b"pong"
    pkt = await a.listen_packet("udp", ":6000")
    await b.dial("udp", "alpha:6000")
    await pkt.aclose()


async def test_whois_and_status_paths(pair, nursery):
    tailnet, a, b = pair
    listener = await b.listen("tcp", ":80")
    accepted = trio.Event()
    box = []

    async def serve():
        stream = await listener.accept()
        box.append(stream)
        accepted.set()

    nursery.start_soon(serve)
    stream = await a.dial("tcp", "bravo:80", timeout=10)
    with trio.fail_after(10):
        await accepted.wait()
    remote_ip, remote_port = box[0].remote_address
    who = b.whois(f"{remote_ip}:{remote_port}")
    assert who is not None and who.node.name == "alpha"
    assert who.node.addresses[0] == a.tailscale_ips()[0]
    assert who.user.login_name  # the owner (tagged or user) is named
    assert b.whois("100.99.99.99") is None
    assert b.whois(str(b.tailscale_ips()[0])).node.name == "bravo"
    peer = a.status().peer("bravo")
    assert peer.path.startswith(("direct 127.0.0.1:", "derp region 900"))
    assert peer.tx_bytes > 0 and peer.rx_bytes > 0 and peer.last_handshake is not None
    assert peer.online is True and peer.dns_name == "bravo.tailnet.test"
    # Disco moves the pair to the direct loopback path.
    await wait_for(lambda: a.status().peer("bravo").path.startswith("direct 127.0.0.1:"), timeout=15)
    d = a.status().as_dict()
    assert d["peers"][0]["path"].startswith("direct")
    await stream.aclose()


async def test_ping_and_metrics(pair, nursery):
    tailnet, a, b = pair
    result = await a.ping("bravo", timeout=10)
    assert result.ip == b.tailscale_ips()[0] and 0 < result.latency < 5
    assert result.path.startswith(("direct 127.0.0.1:", "derp region 900"))
    # ping() is a disco ping (no WireGuard session needed): give the metrics some WireGuard traffic.
    await _echo_server(await b.listen("tcp", ":7070"), nursery)
    stream = await a.dial("tcp", "bravo:7070", timeout=10)
    assert await _roundtrip(stream, b"metrics") == b"metrics"
    await stream.aclose()
    report = await a.netcheck()
    assert report["udp"] is True and report["home_derp"] == 900 and report["global_v4"].startswith("127.0.0.1:")
    m = a.metrics()
    assert m["tsnet_running"] == 1.0 and m["tsnet_packets_in"] > 0 and m["tsnet_control_logged_in"] == 1.0
    assert m["tsnet_wireguard_tx_bytes"] > 0 and m["tsnet_peers_path_direct"] + m["tsnet_peers_path_derp"] == 1
    assert m["tsnet_startup_running_seconds"] >= m["tsnet_startup_login_seconds"] > 0
    # The peer-relay client side is reported too (no relay is granted here, so none is asked).
    assert m["tsnet_relay_client_servers"] == 0.0 and m.get("tsnet_relay_client_allocate_sent", 0.0) == 0.0


async def test_magicdns_over_the_netstack_udp_and_tcp(pair):
    tailnet, a, b = pair
    b_ip = str(b.tailscale_ips()[0])
    for name in ("bravo", "bravo.tailnet.test."):
        sock = await a.dial("udp", "100.100.100.100:53")
        await sock.send(DNSRecord.question(name, "A").pack())
        with trio.fail_after(5):
            reply = DNSRecord.parse(await sock.recv())
        assert [str(r.rdata) for r in reply.rr] == [b_ip]
        await sock.aclose()
    stream = await a.dial("tcp", "[fd7a:115c:a1e0::53]:53", timeout=5)
    query = DNSRecord.question("alpha.tailnet.test", "AAAA").pack()
    await stream.send_all(len(query).to_bytes(2, "big") + query)
    data = b""
    with trio.fail_after(5):
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            data += await stream.receive_some(4096)
    reply = DNSRecord.parse(data[2:])
    assert str(reply.rr[0].rdata) == str(a.tailscale_ips()[1])
    await stream.aclose()


async def test_unknown_host_and_closed_port(pair):
    tailnet, a, b = pair
    with pytest.raises(tsnet.HostNotFoundError):
        await a.dial("tcp", "nosuchnode:80")
    with pytest.raises(tsnet.HostNotFoundError):
        await a.dial("tcp", "nosuchnode.tailnet.test:80")
    with pytest.raises(ConnectionRefusedError):
        await a.dial("tcp", "bravo:1", timeout=10)
    assert not a._net.stack.connections  # the failed dial left nothing behind
    with pytest.raises(TimeoutError):
        await a.dial("tcp", "bravo:1", timeout=0)
    with pytest.raises(OSError, match="not on the tailnet"):
        await a.dial("tcp", "192.0.2.1:80", timeout=10)  # nothing is sent: no peer owns it
    with pytest.raises(tsnet.ConfigError):
        await a.dial("sctp", "bravo:1")
    with pytest.raises(tsnet.ConfigError):
        await a.dial("tcp", "bravo")


async def test_close_while_transfers_run(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    a, b = tailnet.node("sender"), tailnet.node("sink")
    await a.up(timeout=10)
    await b.up(timeout=10)
    await a.wait_for_peer("sink", timeout=10)
    await b.wait_for_peer("sender", timeout=10)
    listener = await b.listen("tcp", ":7000")
    received = [0]

    async def sink():
        stream = await listener.accept()
        try:
            while data := await stream.receive_some(65536):
                received[0] += len(data)
        except trio.BrokenResourceError:
            pass

    async def sender(stream):
        try:
            while True:
                await stream.send_all(b"x" * 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as transfers:
        transfers.start_soon(sink)
        stream = await a.dial("tcp", "sink:7000", timeout=10)
        transfers.start_soon(sender, stream)
        await wait_for(lambda: received[0] > 200_000)
        with trio.fail_after(6):
            await a.close()
        with trio.fail_after(6):
            await b.close()
        # Every task blocked on the closed nodes' sockets finishes on its own: no cancel needed.
        transfers.cancel_scope.deadline = trio.current_time() + 5
    assert not transfers.cancel_scope.cancelled_caught


async def test_relay_server_gauge_in_metrics(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    relay = tailnet.node("relay", relay_server_port=0)
    await relay.up(timeout=10)
    m = relay.metrics()
    assert m["tsnet_relay_server_running"] == 1.0
    assert m["tsnet_relay_server_forwarded_packets"] == 0.0
    assert any(k.startswith("tsnet_relay_server_endpoints_") for k in m)
    await relay.close()


async def test_split_dns_route_forwarded_over_the_tailnet(pair, nursery):
    """A split-DNS route whose nameserver is a tailnet node: queries go to it through the netstack."""
    from dnslib import QTYPE, RR, A

    tailnet, a, b = pair
    b_ip = str(b.tailscale_ips()[0])
    ns = await b.listen("udp", f"{b_ip}:53")  # bravo's own nameserver for corp.test (not MagicDNS)

    async def nameserver():
        while True:
            try:
                data, addr = await ns.recvfrom(4096)
            except trio.ClosedResourceError:
                return  # the node closed
            query = DNSRecord.parse(data)
            reply = query.reply()
            if str(query.q.qname).rstrip(".") == "db.corp.test" and query.q.qtype == QTYPE.A:
                reply.add_answer(RR("db.corp.test", QTYPE.A, rdata=A("10.1.2.3"), ttl=60))
            await ns.sendto(reply.pack(), addr)

    nursery.start_soon(nameserver)
    tailnet.server.config.split_dns = {"corp.test": (b_ip,)}
    tailnet.server.notify()
    await wait_for(lambda: "corp.test" in a._magic.config.routes)
    assert [str(ip) for ip in await a.resolve("db.corp.test")] == ["10.1.2.3"]
    # The same answer through MagicDNS at 100.100.100.100 inside alpha's netstack.
    sock = await a.dial("udp", "100.100.100.100:53")
    await sock.send(DNSRecord.question("db.corp.test", "A").pack())
    with trio.fail_after(5):
        reply = DNSRecord.parse(await sock.recv())
    assert [str(r.rdata) for r in reply.rr] == ["10.1.2.3"]
    await sock.aclose()
