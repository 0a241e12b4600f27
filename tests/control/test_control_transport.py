"""Loopback tests of the ts2021 stack: HTTP upgrade, Noise, early payload, HTTP/2 both sides."""

import json

import pytest
import trio

from tsnet.control import conn as ts2021
from tsnet.control import controlhttp, tailcfg
from tsnet.control.h2conn import open_h2_client, serve_h2
from tsnet.control.httpd import Reply, Takeover, serve_http1
from tsnet.control.noise import HandshakeError
from tsnet.key import MachinePrivate


class EchoServer:
    def __init__(self, early=None):
        self.key = MachinePrivate.generate()
        self.early = early
        self.peers = []
        self.errors = []
        self.release = trio.Event()

    async def app(self, req):
        if req.path == "/key":
            body = tailcfg.dumps(tailcfg.OverTLSPublicKeyResponse(
                legacy_public_key=MachinePrivate.generate().public.zero(), public_key=self.key.public))
            return Reply(200, body, "application/json")
        if req.path == "/ts2021":
            verdict = controlhttp.check_upgrade_request(req.method, req.headers)
            if isinstance(verdict, controlhttp.UpgradeRejected):
                return Reply(verdict.status, verdict.reason.encode())

            async def run(stream, leftover):
                noise = await ts2021.accept(stream, verdict, self.key, leftover=leftover, early=self.early)
                self.peers.append(noise.peer)
                await serve_h2(noise, self.h2_handler, on_error=self.errors.append)

            return Takeover(run)
        return Reply(404, b"not found")

    async def h2_handler(self, req, resp):
        if req.path == "/stream":
            await resp.start(200)
            for i in range(3):
                await resp.write(b"tick%d;" % i)
            await self.release.wait()
            await resp.end(b"done")
        elif req.path == "/big":
            await resp.respond(200, bytes(range(256)) * 40000)  # 10 MB > windows
        else:
            await resp.respond(200, json.dumps({"path": req.path, "method": req.method, "len": len(req.body),
                                                "sum": sum(req.body) % 65536, "auth": req.authority}).encode())


@pytest.fixture
async def server(nursery):
    srv = EchoServer(early=tailcfg.EarlyNoise(node_key_challenge="chalpub:" + "ab" * 32))
    listeners = await nursery.start(trio.serve_tcp, lambda s: serve_http1(s, srv.app), 0, )
    srv.port = listeners[0].socket.getsockname()[1]
    return srv


async def raw_http(port, data):
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(data)
    out = b""
    with trio.fail_after(5):
        while True:
            chunk = await s.receive_some(65536)
            if not chunk:
                break
            out += chunk
    await s.aclose()
    return out


async def test_key_endpoint(server):
    out = await raw_http(server.port, b"GET /key?v=133 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    resp = tailcfg.decode(tailcfg.OverTLSPublicKeyResponse, body)
    assert resp.public_key == server.key.public


async def test_upgrade_rejections(server):
    out = await raw_http(server.port, b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    out = await raw_http(server.port, b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
                                      b"Connection: upgrade\r\nX-Tailscale-Handshake: !!!\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"base64" in out


async def test_dial_h2_concurrent_streams(server):
    machine = MachinePrivate.generate()
    with trio.fail_after(10):
        result = await ts2021.dial("127.0.0.1", server.port, machine_key=machine, server_key=server.key.public)
        assert result.early.node_key_challenge == "chalpub:" + "ab" * 32
        assert server.peers == [] or True
        async with open_h2_client(result.stream, f"127.0.0.1:{server.port}") as client:
            long_poll = await client.request("POST", "/stream", body=b"{}")
            assert long_poll.status == 200
            chunks = long_poll.iter_chunks()
            got = b""
            while got.count(b";") < 3:
                got += await chunks.__anext__()
            # While the long poll is open, other requests complete, several at once.
            results = {}

            async def one(i):
                body = bytes([i]) * (i * 10000)
                r = await client.request("POST", f"/machine/{i}", body=body)
                results[i] = json.loads(await r.read())

            async with trio.open_nursery() as n:
                for i in range(1, 9):
                    n.start_soon(one, i)
            for i in range(1, 9):
                assert results[i]["path"] == f"/machine/{i}" and results[i]["len"] == i * 10000
                assert results[i]["sum"] == (i * i * 10000) % 65536
            big = await client.request("GET", "/big")
            data = await big.read(limit=20 << 20)
            assert data == bytes(range(256)) * 40000
            server.release.set()
            async for c in chunks:
                got += c
            assert got.endswith(b"done")
    assert server.peers == [machine.public]


async def test_no_early_payload(nursery):
    srv = EchoServer(early=None)
    listeners = await nursery.start(trio.serve_tcp, lambda s: serve_http1(s, srv.app), 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        result = await ts2021.dial("127.0.0.1", port, machine_key=MachinePrivate.generate(), server_key=srv.key.public)
        assert result.early is None
        async with open_h2_client(result.stream, "x") as client:
            r = await client.request("POST", "/a", body=b"hi")
            assert json.loads(await r.read())["len"] == 2


async def test_wrong_server_key_fails(server):
    with trio.fail_after(10):
        with pytest.raises((HandshakeError, controlhttp.UpgradeError)):
            await ts2021.dial("127.0.0.1", server.port, machine_key=MachinePrivate.generate(),
                              server_key=MachinePrivate.generate().public)


def test_early_payload_sniffer_splits():
    payload = controlhttp.encode_early_payload(tailcfg.EarlyNoise(node_key_challenge="chalpub:" + "00" * 32))
    s = controlhttp.EarlyPayloadSniffer()
    data = payload + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00rest"
    for b in data[:20]:
        if not s.done:
            s.feed(bytes([b]))
    consumed = 20
    while not s.done:
        s.feed(data[consumed:consumed + 1]); consumed += 1
    assert s.early.node_key_challenge.endswith("00" * 32)
    assert s.rest + data[consumed:] == b"\x00\x00\x12\x04\x00\x00\x00\x00\x00rest"
    s2 = controlhttp.EarlyPayloadSniffer()
    s2.feed(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")
    assert s2.done and s2.early is None and s2.rest.startswith(b"\x00\x00\x12")
    s3 = controlhttp.EarlyPayloadSniffer()
    with pytest.raises(controlhttp.UpgradeError):
        s3.feed(b"\xff\xff\xffTS\x7f\xff\xff\xff")


@pytest.mark.parametrize("url, http_port, https_port, authority", [
    ("https://controlplane.example", 80, 443, "controlplane.example"),
    ("https://h.example:8443", 80, 8443, "h.example:8443"),
    ("http://h.example", 80, 443, "h.example"),
    ("http://h.example:8080", 8080, 443, "h.example:8080"),
    ("http://127.0.0.1:8080", 8080, None, "127.0.0.1:8080"),
    ("http://10.1.2.3", 80, None, "10.1.2.3"),
    ("http://localhost:9000/", 9000, None, "localhost:9000"),
])
def test_login_url_ports(url, http_port, https_port, authority):
    from tsnet.control.client import parse_login_url

    lu = parse_login_url(url)
    assert (lu.http_port, lu.https_port, lu.authority) == (http_port, https_port, authority)


def test_login_url_rejects_other_schemes():
    from tsnet.control.client import parse_login_url

    with pytest.raises(ValueError):
        parse_login_url("ftp://x")


async def test_client_cancels_streaming_response(server):
    with trio.fail_after(10):
        result = await ts2021.dial("127.0.0.1", server.port, machine_key=MachinePrivate.generate(),
                                   server_key=server.key.public)
        async with open_h2_client(result.stream, "x") as client:
            poll = await client.request("POST", "/stream", body=b"{}")
            chunks = poll.iter_chunks()
            assert (await chunks.__anext__()).startswith(b"tick")
            await poll.aclose()  # RST_STREAM(CANCEL) while the handler still holds the stream
            server.release.set()  # the handler now tries to finish a stream that is gone
            r = await client.request("POST", "/after", body=b"x")
            assert json.loads(await r.read())["path"] == "/after"
    assert server.errors == []
