"""Server.loopback(): SOCKS5 + HTTP proxy on 127.0.0.1 reaching a peer's server by MagicDNS name, with real
clients (curl, requests, httpx), and Server.http_client() / serve_forward()."""

from __future__ import annotations

import httpx
import pytest
import requests
import trio

from tests.server_helpers import start_tailnet


async def _http_server(listener, nursery, body: bytes = b"hello from bravo") -> None:
    """A tiny HTTP/1.1 server on a tailnet listener: answers every request with ``body`` and the path."""

    async def handle(stream):
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1]
            payload = body + b" " + path
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                  b"Connection: close\r\n\r\n%s" % (len(payload), payload))

    async def serve():
        try:
            await trio.serve_listeners(handle, [listener])
        except* trio.ClosedResourceError:
            pass

    nursery.start_soon(serve)


@pytest.fixture
async def pair(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    a, b = tailnet.node("alpha"), tailnet.node("bravo")
    await a.up(timeout=10)
    await b.up(timeout=10)

    await a.wait_for_peer("bravo", timeout=10)
    await b.wait_for_peer("alpha", timeout=10)
    await _http_server(await b.listen("tcp", ":80"), nursery)
    yield a, b
    with trio.fail_after(10):
        await a.close()
        await b.close()


async def _curl(*args: str) -> str:
    result = await trio.run_process(["curl", "-sS", "--max-time", "10", *args], capture_stdout=True,
                                    capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_curl_through_socks5_and_http_proxy(pair):
    a, b = pair
    proxy = await a.loopback()
    assert proxy.host == "127.0.0.1" and proxy.credentials is not None
    assert await a.loopback() is proxy  # started once
    creds = f"{proxy.credentials.username}:{proxy.credentials.password}"
    out = await _curl("--socks5-hostname", proxy.address, "--proxy-user", creds, "http://bravo/s5")
    assert out == "hello from bravo /s5"
    out = await _curl("-x", f"http://{proxy.address}", "--proxy-user", creds, "http://bravo.tailnet.test/h")
    assert out == "hello from bravo /h"  # absolute-form rewritten to origin-form
    # Without credentials the proxy refuses.
    result = await trio.run_process(["curl", "-sS", "--max-time", "5", "-x", f"http://{proxy.address}",
                                     "-o", "/dev/null", "-w", "%{http_code}", "http://bravo/"],
                                    capture_stdout=True, capture_stderr=True, check=False)
    assert result.stdout == b"407"


async def test_requests_through_both_proxies(pair):
    a, b = pair
    proxy = await a.loopback()

    def fetch(url_proxy: str, url: str) -> str:
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(url, proxies={"http": url_proxy}, timeout=10)
            r.raise_for_status()
            return r.text

    assert (await trio.to_thread.run_sync(fetch, proxy.socks5_url, "http://bravo/r1")).endswith("/r1")
    assert (await trio.to_thread.run_sync(fetch, proxy.http_url, "http://bravo/r2")).endswith("/r2")


async def test_httpx_through_both_proxies_and_http_client(pair):
    a, b = pair
    proxy = await a.loopback()
    socks_url = proxy.socks5_url.replace("socks5h://", "socks5://")  # httpx resolves remotely anyway
    for url in (proxy.http_url, socks_url):
        async with httpx.AsyncClient(proxy=url, trust_env=False) as client:
            r = await client.get("http://bravo/x", timeout=10)
            assert r.status_code == 200 and r.text.endswith("/x")
    async with a.http_client() as client:
        r = await client.get("http://bravo.tailnet.test/direct", timeout=10)
        assert r.text == "hello from bravo /direct"
        with pytest.raises(httpx.ConnectError):
            await client.get("http://nosuchnode/", timeout=5)


async def test_http_proxy_502_for_closed_port(pair):
    a, b = pair
    proxy = await a.loopback()
    result = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", "-x", proxy.http_url, "-D", "-", "-o", "/dev/null", "http://bravo:81/"],
        capture_stdout=True, capture_stderr=True, check=False)
    headers = result.stdout.decode().lower()
    assert headers.startswith("http/1.1 502"), headers


async def test_serve_forward_to_local_server(pair, nursery):
    a, b = pair
    # A plain OS-socket server on 127.0.0.1 that the tailnet reaches through serve_forward on alpha.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream):
        async with stream:
            await stream.send_all(b"local:" + await stream.receive_some(100))

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    await nursery.start(a.serve_forward, 8080, f"127.0.0.1:{port}")
    stream = await b.dial("tcp", "alpha:8080", timeout=10)
    await stream.send_all(b"ping")
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"local:ping"
    await stream.aclose()


async def _exactly(stream, n):
    out = b""
    with trio.fail_after(5):
        while len(out) < n:
            chunk = await stream.receive_some(n - len(out))
            assert chunk
            out += chunk
    return out


async def test_socks5_udp_associate_dns_query_to_magicdns(pair):
    """UDP ASSOCIATE through the node's proxy: a DNS query to 100.100.100.100 over the tailnet netstack."""
    import socket

    from dnslib import DNSRecord

    from tsnet.proxy.socks5 import build_udp_datagram, encode_address, parse_udp_datagram

    a, b = pair
    proxy = await a.loopback()
    user, pw = proxy.credentials.username.encode(), proxy.credentials.password.encode()
    control = await trio.open_tcp_stream(proxy.host, proxy.port)
    async with control:
        await control.send_all(b"\x05\x01\x02")
        assert await _exactly(control, 2) == b"\x05\x02"
        await control.send_all(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
        assert await _exactly(control, 2) == b"\x01\x00"
        await control.send_all(b"\x05\x03\x00" + encode_address("0.0.0.0", 0))
        head = await _exactly(control, 4)
        assert head[:2] == b"\x05\x00" and head[3] == 1
        addr = await _exactly(control, 6)
        relay = (socket.inet_ntoa(addr[:4]), int.from_bytes(addr[4:], "big"))
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            await udp.bind(("127.0.0.1", 0))
            query = DNSRecord.question("bravo.tailnet.test", "A")
            await udp.sendto(build_udp_datagram("100.100.100.100", 53, query.pack()), relay)
            with trio.fail_after(5):
                data, _ = await udp.recvfrom(65535)
            reply = DNSRecord.parse(parse_udp_datagram(data).payload)
            assert reply.header.id == query.header.id
            assert [str(rr.rdata) for rr in reply.rr] == [str(b.tailscale_ips()[0])]


async def test_http_client_https_over_the_tailnet(pair, nursery, tmp_path):
    """http_client() does TLS over a tailnet stream (trio SSLStream under httpcore)."""
    import ssl

    from tests.control.control_helpers import self_signed_cert

    a, b = pair
    b_ip = str(b.tailscale_ips()[0])
    cert, key = self_signed_cert(tmp_path, b_ip)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    listener = await b.listen("tcp", ":443")

    async def handle(stream):
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await tls.receive_some(4096)
            await tls.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecure")
        finally:
            await trio.aclose_forcefully(tls)

    async def serve():
        try:
            await trio.serve_listeners(handle, [listener])
        except* trio.ClosedResourceError:
            pass

    nursery.start_soon(serve)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with a.http_client(verify=client_ctx) as client:
        r = await client.get(f"https://{b_ip}/", timeout=10)
        assert r.status_code == 200 and r.text == "secure"
    async with a.http_client() as client:  # system roots do not trust the test certificate
        with pytest.raises(httpx.ConnectError, match="TLS|certificate|verify"):
            await client.get(f"https://{b_ip}/", timeout=10)


async def test_non_tailnet_names_use_the_host_resolver(pair, nursery, monkeypatch):
    """Without DNS resolvers from control, multi-label names go to the host's resolver (faked here, so
    nothing leaves the machine); the proxy then reaches that non-tailnet address from the host.
    Single-label names are tailnet short names only and never go upstream."""
    import tsnet.dns

    asked = []

    async def fake_system_lookup(name):
        asked.append(name)
        import ipaddress

        return [ipaddress.ip_address("127.0.0.1")] if name == "svc.example.internal" else []

    monkeypatch.setattr(tsnet.dns, "system_lookup", fake_system_lookup)
    a, b = pair
    assert [str(ip) for ip in await a.resolve("svc.example.internal")] == ["127.0.0.1"]
    with pytest.raises(tsnet.HostNotFoundError):
        await a.resolve("nosuch.example.internal")
    with pytest.raises(tsnet.HostNotFoundError, match="no tailnet node"):
        await a.resolve("intranet")
    assert asked == ["svc.example.internal", "nosuch.example.internal"]
    # The loopback proxy dials that address from the host (it is not on the tailnet).
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def local(stream):
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nhost")

    nursery.start_soon(trio.serve_listeners, local, listeners)
    proxy = await a.loopback()
    async with httpx.AsyncClient(proxy=proxy.http_url, trust_env=False) as client:
        r = await client.get(f"http://svc.example.internal:{port}/", timeout=10)
        assert r.text == "host"
