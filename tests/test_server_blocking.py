"""tsnet.blocking: the node in a background thread, real sockets for dial/accept, http.server on a tailnet
listener, requests through http_client(), asyncio over a dialled socket."""

from __future__ import annotations

import asyncio
import http.server
import threading

import trio

import tsnet
from tests.server_helpers import start_tailnet
from tsnet import blocking


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        who = self.server.tailnet.whois(self.client_address[0])
        body = f"hello {self.path} from {who.node.name if who else '?'}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _scenario(url: str, key: str) -> None:
    common = dict(control_url=url, auth_key=key, ephemeral=True, udp_bind="127.0.0.1")
    with blocking.Server(hostname="web", **common) as srv, blocking.Server(hostname="cli", **common) as cli:
        assert srv.status().backend_state == "Running" and srv.tailscale_ips()

        cli.wait_for_peer("web", timeout=10)
        srv.wait_for_peer("cli", timeout=10)

        # http.server, unchanged, serving on a tailnet listener.
        ln = srv.listen("tcp", ":80")
        assert ln.getsockname() == ("0.0.0.0", 80)
        ephemeral = srv.listen("tcp", ":0")
        assert ephemeral.getsockname()[1] > 0
        ephemeral.close()
        httpd = http.server.HTTPServer(("127.0.0.1", 0), _Hello, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = ln
        httpd.tailnet = srv
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            # requests through the node's HTTP client (loopback proxy), by MagicDNS name.
            session = cli.http_client()
            r = session.get("http://web/page", timeout=10)
            assert r.status_code == 200 and r.text == "hello /page from cli"

            # dial() gives a real socket.
            sock = cli.dial("tcp", "web.tailnet.test:80", timeout=10)
            sock.settimeout(10)
            sock.sendall(b"GET /raw HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            sock.close()
            assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"hello /raw from cli")

            # asyncio over a dialled socket.
            async def via_asyncio() -> bytes:
                reader, writer = await asyncio.open_connection(sock=cli.dial("tcp", "web:80", timeout=10))
                writer.write(b"GET /aio HTTP/1.0\r\n\r\n")
                body = await reader.read()
                writer.close()
                return body

            assert asyncio.run(via_asyncio()).endswith(b"hello /aio from cli")

            # UDP as a PacketConn.
            pc = srv.listen_packet("udp", ":7")
            cc = cli.dial("udp", "web:7")
            cc.send(b"dgram")
            payload, addr = pc.recvfrom(100)
            assert payload == b"dgram" and addr[0] == str(cli.tailscale_ips()[0])
            pc.sendto(b"back", addr)
            assert cc.recv() == b"back"
            try:
                cc.recv(timeout=0.05)
            except TimeoutError:
                pass
            else:
                raise AssertionError("nothing was sent")
            pc.close()
            cc.close()

            try:
                cli.dial("tcp", "nosuch:80")
            except tsnet.HostNotFoundError:
                pass
            else:
                raise AssertionError("unknown host dialled")
        finally:
            httpd.shutdown()
            ln.close()
            thread.join(5)
    assert srv.status().backend_state == "Stopped"


async def test_blocking_facade(nursery, tmp_path):
    tailnet = await start_tailnet(nursery, tmp_path)
    key = tailnet.authkey(ephemeral=True, reusable=True)
    with trio.fail_after(60):
        await trio.to_thread.run_sync(_scenario, tailnet.url, key)
    assert not [n for n in tailnet.node_names() if n in ("web", "cli")]  # ephemeral: gone after close


async def test_ephemeral_node_logs_out_when_a_script_just_ends(nursery, tmp_path):
    """A script that starts a blocking ephemeral node and exits without close(): atexit logs it out."""
    import os
    import sys
    from pathlib import Path

    tailnet = await start_tailnet(nursery, tmp_path)
    script = (
        "from tsnet import blocking\n"
        "srv = blocking.Server(hostname='script', ephemeral=True, udp_bind='127.0.0.1')\n"
        "srv.up(timeout=20)\n"
        "print('up', flush=True)\n"
    )
    env = dict(os.environ, TS_CONTROL_URL=tailnet.url, TS_AUTHKEY=tailnet.authkey(ephemeral=True),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with trio.fail_after(60):
        result = await trio.run_process([sys.executable, "-c", script], env=env, capture_stdout=True,
                                        capture_stderr=True)
    assert result.stdout == b"up\n", result.stderr
    assert "script" not in tailnet.node_names()  # gone at once, not after the ephemeral timeout
