"""Client <-> server over loopback TCP with the trio drivers."""

import json
from functools import partial
import os
import signal
import socket
import struct
import subprocess
import sys

import h11
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsnet.derp import frames as f
from tsnet.derp.client import DerpClient, DerpNode, DerpRegions, RegionEvent, RegionIdlePolicy
from tsnet.derp.client_core import (
    DerpClientProtocol,
    PeerGoneEvent,
    ReceivedPacket,
    RestartingEvent,
    ServerInfoReceived,
)
from tsnet.derp.server import DerpServer
from tsnet.derp.tls import generate_self_signed, server_ssl_context
from tsnet.key import NodePrivate

def plain_node(port, region=1, name="1a"):
    return DerpNode(name, region, "127.0.0.1", ipv4="127.0.0.1", ipv6="none", derp_port=port, plain_http=True)


async def start_server(nursery, server=None, **kw):
    server = server or DerpServer(**kw)
    port = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    return server, port


async def start_client(nursery, node, key=None, **kw):
    client = DerpClient(key or NodePrivate.generate(), node, **kw)
    nursery.start_soon(client.run)
    with trio.fail_after(10):
        await client.wait_connected()
    return client


async def next_of(client, cls, timeout=10):
    with trio.fail_after(timeout):
        async for ev in client.events:
            if isinstance(ev, cls):
                return ev
    raise AssertionError("event channel closed")


async def test_two_clients_exchange_packets_and_peer_gone():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        a = await start_client(n, plain_node(port))
        b = await start_client(n, plain_node(port))
        a.send(b.private_key.public, b"ping from a")
        assert await next_of(b, ReceivedPacket) == ReceivedPacket(a.private_key.public, b"ping from a")
        b.send(a.private_key.public, b"pong from b")
        assert (await next_of(a, ReceivedPacket)).packet == b"pong from b"
        rtt = await a.ping()
        assert rtt >= 0 and server.counters.got_ping == 1
        a.close()
        gone = await next_of(b, PeerGoneEvent)
        assert gone == PeerGoneEvent(a.private_key.public, f.PeerGoneReason.DISCONNECTED)
        n.cancel_scope.cancel()


async def test_duplicate_key_newest_connection_gets_packets():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        key = NodePrivate.generate()
        old = await start_client(n, plain_node(port), key)
        new = await start_client(n, plain_node(port), key)
        sender = await start_client(n, plain_node(port))
        sender.send(key.public, b"for the newest")
        assert (await next_of(new, ReceivedPacket)).packet == b"for the newest"
        assert server.counters.dup_client_conns == 1
        # The old connection speaks up and becomes active again (last writer wins).
        await old.ping()
        sender.send(key.public, b"for the old one")
        assert (await next_of(old, ReceivedPacket)).packet == b"for the old one"
        n.cancel_scope.cancel()


async def test_mesh_forwarding_between_two_servers():
    mesh_key = os.urandom(32)
    async with trio.open_nursery() as n:
        s1, p1 = await start_server(n, mesh_key=mesh_key)
        s2, p2 = await start_server(n, mesh_key=mesh_key)
        a = await start_client(n, plain_node(p1))
        b = await start_client(n, plain_node(p2))
        await n.start(s1.run_mesh_peer, f"http://127.0.0.1:{p2}")
        await n.start(s2.run_mesh_peer, f"http://127.0.0.1:{p1}")
        with trio.fail_after(10):
            while not (b.private_key.public.raw in s1.core._forwarders and a.private_key.public.raw in s2.core._forwarders):
                await trio.sleep(0.01)
        a.send(b.private_key.public, b"a->b across the mesh")
        assert await next_of(b, ReceivedPacket) == ReceivedPacket(a.private_key.public, b"a->b across the mesh")
        b.send(a.private_key.public, b"b->a")
        assert (await next_of(a, ReceivedPacket)).packet == b"b->a"
        assert s1.counters.packets_forwarded_out == 1 and s2.counters.packets_forwarded_in == 1
        # b leaves s2; s1 learns it through the mesh and tells a, who received from b.
        b.close()
        assert await next_of(a, PeerGoneEvent) == PeerGoneEvent(b.private_key.public, 0)
        n.cancel_scope.cancel()


async def raw_handshake(port, key=None):
    """A minimal raw-socket DERP client: returns (stream, proto) after ServerInfo."""
    key = key or NodePrivate.generate()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(4096)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    proto = DerpClientProtocol(key, trio.current_time())
    events = proto.receive_data(rest, trio.current_time())
    while True:
        out = proto.data_to_send()
        if out:
            await stream.send_all(out)
        if any(isinstance(e, ServerInfoReceived) for e in events):
            return stream, proto
        events = proto.receive_data(await stream.receive_some(65536), trio.current_time())


async def test_upgrade_response_is_byte_exact():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
        want = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n"
            b"Derp-Public-Key: " + server.public_key.raw.hex().encode() + b"\r\n\r\n"
            + f.encode_frame(f.ServerKey(server.public_key.raw))
        )
        got = b""
        with trio.fail_after(5):
            while len(got) < len(want):
                got += await stream.receive_some(4096)
        assert got == want
        await stream.aclose()
        n.cancel_scope.cancel()


async def test_fast_start_skips_101_and_pipelined_client_info_works():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        key = NodePrivate.generate()
        proto = DerpClientProtocol(key, 0.0, server_key=server.public_key)
        # Prime the protocol with the known server key, then pipeline ClientInfo with the request.
        proto.receive_data(f.encode_frame(f.ServerKey(server.public_key.raw)), 0.0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: derp\r\nDerp-Fast-Start: 1\r\n\r\n"
            + proto.data_to_send()
        )
        got = b""
        with trio.fail_after(5):
            while len(got) < 45 + 5 + 24 + 16 + 13:
                got += await stream.receive_some(4096)
        assert got.startswith(f.encode_frame(f.ServerKey(server.public_key.raw)))  # no HTTP/1.1 101
        events = proto.receive_data(got[45:], 0.0)
        assert any(isinstance(e, ServerInfoReceived) for e in events)
        await stream.aclose()
        n.cancel_scope.cancel()


async def test_slow_consumer_does_not_stall_other_pair():
    async with trio.open_nursery() as n:
        server, port = await start_server(n, queue_depth=64, write_timeout=30.0)
        stuck_stream, stuck = await raw_handshake(port)  # never reads again
        flooder = await start_client(n, plain_node(port))
        x = await start_client(n, plain_node(port))
        y = await start_client(n, plain_node(port))
        big = bytes(60_000)
        count = 400
        received = 0
        with trio.fail_after(30):
            for i in range(count):
                # ~24 MB towards a reader that never reads: far beyond the socket buffers.
                flooder.send(stuck.public_key, big)
                x.send(y.private_key.public, i.to_bytes(4, "big") + bytes(1276))
                if i % 16 == 15:
                    while received < i + 1:
                        ev = await y.events.receive()
                        if isinstance(ev, ReceivedPacket):
                            assert int.from_bytes(ev.packet[:4], "big") == received
                            received += 1
            while received < count:
                ev = await y.events.receive()
                if isinstance(ev, ReceivedPacket):
                    received += 1
        assert received == count
        assert server.counters.drops["queue_head"] > 0  # the stuck client's queue overflowed
        await stuck_stream.aclose()
        n.cancel_scope.cancel()


async def test_flooder_hits_rate_limit_without_hurting_others():
    async with trio.open_nursery() as n:
        server, port = await start_server(n, rate_limit_bytes_per_sec=100_000, rate_limit_burst=70_000)
        flooder = await start_client(n, plain_node(port))
        flooder.max_pending_frames = 10_000  # let the whole burst reach the server
        victim = await start_client(n, plain_node(port))
        x = await start_client(n, plain_node(port))
        y = await start_client(n, plain_node(port))
        for _ in range(2000):
            flooder.send(victim.private_key.public, bytes(1280))  # 2.6 MB in one burst
        for i in range(50):
            x.send(y.private_key.public, bytes([i]) * 200)
        got = []
        with trio.fail_after(10):
            while len(got) < 50:
                ev = await y.events.receive()
                if isinstance(ev, ReceivedPacket):
                    got.append(ev.packet[0])
        assert got == list(range(50))
        await x.ping()
        await flooder.ping()  # the flooder's connection is still served after its frames were parsed
        assert server.counters.drops["rate_limited"] > 1500
        n.cancel_scope.cancel()


async def test_tls_self_signed_insecure_and_pinned():
    cert = generate_self_signed("127.0.0.1")
    ctx = server_ssl_context(self_signed=cert)
    async with trio.open_nursery() as n:
        server = DerpServer()
        port = await n.start(lambda task_status: server.serve_tcp("127.0.0.1", 0, ssl_context=ctx, task_status=task_status))
        base = dict(name="t", region_id=1, host_name="127.0.0.1", ipv4="127.0.0.1", ipv6="none", derp_port=port)
        insecure = await start_client(n, DerpNode(**base, insecure_for_tests=True))
        pinned = await start_client(n, DerpNode(**base, cert_name=cert.cert_name))
        insecure.send(pinned.private_key.public, b"over tls")
        assert (await next_of(pinned, ReceivedPacket)).packet == b"over tls"
        wrong = DerpClient(NodePrivate.generate(), DerpNode(**base, cert_name="sha256-raw:" + "00" * 32))
        n.start_soon(wrong.run)
        with trio.fail_after(10):
            while not wrong.last_error:
                await trio.sleep(0.01)
        assert "pinned" in wrong.last_error and not wrong.connected
        wrong.close()
        n.cancel_scope.cancel()


async def http_get(port, target, headers=(), method="GET"):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=[("Host", "x"), *headers]))
                          + conn.send(h11.EndOfMessage()))
    resp, body = None, b""
    with trio.fail_after(5):
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
    await stream.aclose()
    return resp.status_code, {k.decode(): v.decode() for k, v in resp.headers}, body


async def test_http_endpoints():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        status, headers, _ = await http_get(port, "/derp/probe")
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert (await http_get(port, "/derp/latency-check", method="HEAD"))[0] == 200
        assert (await http_get(port, "/derp/probe", method="POST"))[0] == 405
        status, headers, _ = await http_get(port, "/generate_204", [("X-Tailscale-Challenge", "ts_127.0.0.1")])
        assert status == 204 and headers["x-tailscale-response"] == "response ts_127.0.0.1"
        assert headers["cache-control"].startswith("no-cache, no-store")
        status, headers, _ = await http_get(port, "/generate_204", [("X-Tailscale-Challenge", "bad challenge!")])
        assert status == 204 and "x-tailscale-response" not in headers
        status, _, body = await http_get(port, "/derp")
        assert status == 426 and body == b"DERP requires connection upgrade"
        status, _, body = await http_get(port, "/debug/vars")
        assert status == 200 and "packets_relayed" in json.loads(body)
        assert server.http_response(h11.Request(method="GET", target="/debug/vars", headers=[("Host", "x")]),
                                    ("192.0.2.1", 5))[0] == 403
        n.cancel_scope.cancel()


async def test_embedding_takes_over_a_parsed_request():
    """A host HTTP server parses the request with h11, then hands the stream to DerpServer."""
    derp = DerpServer()

    async def host_handler(stream):
        http = h11.Connection(h11.SERVER)
        while True:
            ev = http.next_event()
            if ev is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(4096))
                continue
            assert isinstance(ev, h11.Request) and ev.target == b"/derp"
            await derp.handle_upgrade(stream, ev, http.trailing_data[0])
            return

    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, host_handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        a = await start_client(n, plain_node(port))
        b = await start_client(n, plain_node(port))
        a.send(b.private_key.public, b"embedded")
        assert (await next_of(b, ReceivedPacket)).packet == b"embedded"
        n.cancel_scope.cancel()


async def test_clean_shutdown_sends_restarting():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        a = await start_client(n, plain_node(port))
        await server.shutdown()
        ev = await next_of(a, RestartingEvent)
        assert ev.try_for_ms > 0
        n.cancel_scope.cancel()


async def test_verify_clients_callback():
    allowed_key = NodePrivate.generate()
    seen = []

    async def verify(key, ip):
        seen.append((key, ip))
        return key == allowed_key.public

    async with trio.open_nursery() as n:
        server, port = await start_server(n, verify_client=verify)
        await start_client(n, plain_node(port), allowed_key)
        denied = DerpClient(NodePrivate.generate(), plain_node(port))
        n.start_soon(denied.run)
        with trio.fail_after(10):
            while server.counters.rejected_clients < 1:
                await trio.sleep(0.01)
        assert not denied.connected and seen[0] == (allowed_key.public, "127.0.0.1")
        n.cancel_scope.cancel()


async def test_verify_clients_url():
    allowed_key = NodePrivate.generate()
    requests = []

    async def control(stream):
        http = h11.Connection(h11.SERVER)
        body = b""
        while True:
            ev = http.next_event()
            if ev is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(4096))
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
        req = json.loads(body)
        requests.append(req)
        reply = json.dumps({"Allow": req["NodePublic"] == str(allowed_key.public)}).encode()
        await stream.send_all(http.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(reply)))]))
                              + http.send(h11.Data(data=reply)) + http.send(h11.EndOfMessage()))
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, control, 0, host="127.0.0.1"))
        cport = listeners[0].socket.getsockname()[1]
        server, port = await start_server(n, verify_client_url=f"http://127.0.0.1:{cport}/verify")
        await start_client(n, plain_node(port), allowed_key)
        assert requests[0] == {"NodePublic": str(allowed_key.public), "Source": "127.0.0.1"}
        denied = DerpClient(NodePrivate.generate(), plain_node(port))
        n.start_soon(denied.run)
        with trio.fail_after(10):
            while server.counters.rejected_clients < 1:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()


async def test_client_reconnects_after_connection_loss():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        a = await start_client(n, plain_node(port))
        b = await start_client(n, plain_node(port))
        a.reconnect()
        with trio.fail_after(10):
            while a.connects < 2 or not a.connected:
                await trio.sleep(0.01)
        a.send(b.private_key.public, b"after reconnect")
        assert (await next_of(b, ReceivedPacket)).packet == b"after reconnect"
        n.cancel_scope.cancel()


async def test_regions_home_note_preferred_and_events():
    async with trio.open_nursery() as n:
        s1, p1 = await start_server(n)
        s2, p2 = await start_server(n)
        peer = await start_client(n, plain_node(p2, 2, "2a"))
        regions = DerpRegions(NodePrivate.generate(), {1: [plain_node(p1)], 2: [plain_node(p2, 2, "2a")]})
        await n.start(regions.run)
        regions.set_home(1)
        regions.send(2, peer.private_key.public, b"via region 2")
        assert (await next_of(peer, ReceivedPacket)).packet == b"via region 2"
        with trio.fail_after(10):
            while s1.counters.home_connections != 1:
                await trio.sleep(0.01)
        assert s2.counters.home_connections == 0
        regions.set_home(2)
        with trio.fail_after(10):
            while not (s2.counters.home_connections == 1 and s1.counters.home_connections == 0):
                await trio.sleep(0.01)
        peer.send(regions.clients[2].private_key.public, b"back")
        with trio.fail_after(10):
            async for ev in regions.events:
                if isinstance(ev.event, ReceivedPacket):
                    assert ev == RegionEvent(2, ReceivedPacket(peer.private_key.public, b"back"))
                    break
        n.cancel_scope.cancel()


def test_region_idle_policy():
    policy = RegionIdlePolicy()
    policy.home = 1
    policy.note_write(1, 0.0)
    policy.note_write(2, 0.0)
    assert policy.get_timer(0.0) == 15.0
    assert policy.idle_regions(59.9) == []
    assert policy.idle_regions(60.0) == [2]  # home is never idle-closed
    policy.note_write(2, 50.0)
    assert policy.idle_regions(100.0) == []
    policy.forget(2)
    assert policy.get_timer(100.0) == float("inf")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 0x20), st.binary(max_size=64)), min_size=1, max_size=6), st.booleans())
def test_server_survives_random_frames_over_tcp(random_frames, after_handshake):
    wire = b"".join(bytes([t]) + struct.pack(">I", len(p)) + p for t, p in random_frames)

    async def main():
        async with trio.open_nursery() as n:
            server, port = await start_server(n)
            if after_handshake:
                stream, _ = await raw_handshake(port)
            else:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            await stream.send_all(wire)
            a = await start_client(n, plain_node(port))
            b = await start_client(n, plain_node(port))
            a.send(b.private_key.public, b"survived")
            assert (await next_of(b, ReceivedPacket)).packet == b"survived"
            await stream.aclose()
            n.cancel_scope.cancel()

    trio.run(main)


def test_cli_runs_until_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsnet", "derper", "--listen", "127.0.0.1:0", "--plain-http", "--stun-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _start_cli_derper(*extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsnet", "derper", "--listen", "127.0.0.1:0", "--plain-http", "--stun-port", "-1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, line
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


async def test_cli_mesh_between_two_derper_processes():
    mesh_key = os.urandom(32).hex()
    first, p1 = _start_cli_derper("--mesh-key", mesh_key)
    second, p2 = _start_cli_derper("--mesh-key", mesh_key, "--mesh-with", f"http://127.0.0.1:{p1}")
    try:
        async with trio.open_nursery() as n:
            a = await start_client(n, plain_node(p1))
            b = await start_client(n, plain_node(p2))
            # Only the second server watches the first, so b -> a is forwarded (a's key is present on the first).
            got = None
            with trio.fail_after(20):
                while got is None:
                    b.send(a.private_key.public, b"b->a via mesh")
                    with trio.move_on_after(0.2):
                        got = await next_of(a, ReceivedPacket)
            assert got == ReceivedPacket(b.private_key.public, b"b->a via mesh")
            n.cancel_scope.cancel()
    finally:
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            proc.stdout.close()


async def test_verify_callback_that_raises_denies_without_crashing():
    def broken(key, ip):
        raise KeyError("policy bug")

    async with trio.open_nursery() as n:
        server, port = await start_server(n, verify_client=broken)
        denied = DerpClient(NodePrivate.generate(), plain_node(port))
        n.start_soon(denied.run)
        with trio.fail_after(10):
            while server.counters.rejected_clients < 1:
                await trio.sleep(0.01)
        assert not denied.connected
        assert (await http_get(port, "/derp/probe"))[0] == 200  # the listener is still serving
        n.cancel_scope.cancel()


async def test_verify_url_unreachable_fails_open_by_default():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with trio.open_nursery() as n:
        server, port = await start_server(n, verify_client_url=f"http://127.0.0.1:{dead_port}/verify")
        await start_client(n, plain_node(port))
        strict, sport = await start_server(n, verify_client_url=f"http://127.0.0.1:{dead_port}/verify",
                                           verify_fail_open=False)
        denied = DerpClient(NodePrivate.generate(), plain_node(sport))
        n.start_soon(denied.run)
        with trio.fail_after(10):
            while strict.counters.rejected_clients < 1:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()


async def test_paced_rate_limit_is_lossless_and_isolated():
    async with trio.open_nursery() as n:
        server, port = await start_server(n, rate_limit_bytes_per_sec=5_000_000, rate_limit_mode="pace")
        flooder = await start_client(n, plain_node(port))
        flooder.max_pending_frames = 10_000
        victim = await start_client(n, plain_node(port))
        x = await start_client(n, plain_node(port))
        y = await start_client(n, plain_node(port))
        total = 1500  # ~2 MB: well over the 64 KiB burst, so the server must pause reading the flooder
        sent = 0
        got_victim = 0
        got_y = 0
        with trio.fail_after(20):
            while got_victim < total:
                while sent < total and sent - got_victim < 300:  # stay under the per-client queue depth
                    flooder.send(victim.private_key.public, bytes(1280))
                    sent += 1
                x.send(y.private_key.public, b"small")
                while got_y < 1:
                    if isinstance(await y.events.receive(), ReceivedPacket):
                        got_y += 1
                got_y = 0
                ev = await victim.events.receive()
                if isinstance(ev, ReceivedPacket):
                    got_victim += 1
        assert not server.counters.drops and server.counters.rate_limit_pauses > 0
        n.cancel_scope.cancel()


async def test_regions_map_change_redials_changed_region_only():
    async with trio.open_nursery() as n:
        s1, p1 = await start_server(n)
        s2, p2 = await start_server(n)
        s3, p3 = await start_server(n)
        regions = DerpRegions(NodePrivate.generate(), {1: [plain_node(p1)], 2: [plain_node(p2, 2, "2a")]})
        await n.start(regions.run)
        regions.set_home(1)
        regions.send(2, NodePrivate.generate().public, b"x")
        old1, old2 = regions.clients[1], regions.clients[2]
        await old1.wait_connected()
        await old2.wait_connected()
        closed = regions.set_derp_map({1: [plain_node(p1)], 2: [plain_node(p3, 2, "2b")]})
        assert closed == [2] and regions.clients[1] is old1 and 2 not in regions.clients
        regions.send(2, NodePrivate.generate().public, b"y")  # redials region 2 at its new node
        await regions.clients[2].wait_connected()
        with trio.fail_after(10):
            while s3.counters.clients != 1 or s2.counters.clients != 0:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()


async def test_cli_self_signed_prints_a_usable_pinned_derp_map():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsnet", "derper", "--listen", "127.0.0.1:0", "--self-signed", "--stun-port", "0",
         "--print-derp-map"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        derp_map = json.loads(lines[2])
        node = DerpNode.from_json(derp_map["Regions"]["900"]["Nodes"][0])
        assert node.cert_name.startswith("sha256-raw:") and node.cert_name in lines[0]
        async with trio.open_nursery() as n:
            a = await start_client(n, node)
            b = await start_client(n, node)
            a.send(b.private_key.public, b"pinned tls")
            assert (await next_of(b, ReceivedPacket)).packet == b"pinned tls"
            n.cancel_scope.cancel()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
