"""Trio driver for the DERP server: HTTP front end, per-connection reader/writer, STUN, mesh.

Embedding: a host HTTP server (the coordination server) that has already parsed
a request with h11 hands the connection over with
``await derp.handle_upgrade(stream, request, trailing_data, remote)``; any other
request on a connection it does not want can go to ``derp.serve_stream``.
Standalone: ``await derp.serve_tcp(host, port, ssl_context=...)``.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import h11
import trio

from ..key import NodePrivate, NodePublic
from . import stun
from .client_core import PeerGoneEvent, PeerPresentEvent, ServerInfoReceived
from .frames import DerpProtocolError
from .server_core import ConnState, DerpServerCore, ServerConn
from .tls import BatchTLSStream
from .websocket import WebSocketStream, handshake_response, wants_websocket

__all__ = ["DerpServer"]

log = logging.getLogger("tsnet.derp.server")

#: Per-read size: 64 KiB, because ``recv(n)`` allocates n bytes up front and from 128 KiB glibc uses
#: mmap for that (~20 µs per read even when one packet is waiting).
RECV_SIZE = 64 * 1024
_CHALLENGE_RE = re.compile(rb"^[A-Za-z0-9._:-]{0,64}$")

VerifyCallback = Callable[[NodePublic, str], "bool | Awaitable[bool]"]


def upgrade_response(server_public: bytes) -> bytes:
    """The 101 block derper writes, byte for byte."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: 2\r\n"
        b"Derp-Public-Key: " + server_public.hex().encode() + b"\r\n\r\n"
    )


class _Wake:
    """A resettable wake-up flag for one writer task."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()

    def set(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event = trio.Event()


class DerpServer:
    """A DERP relay server (trio). See module docs for embedding vs standalone use.

    ``verify_client`` is called as ``verify_client(node_public, client_ip)`` and may
    be sync or async; ``verify_client_url`` POSTs ``{"NodePublic", "Source"}`` and
    expects ``{"Allow": true}`` (``verify_fail_open`` admits clients if the URL
    cannot be reached).
    """

    def __init__(
        self,
        private_key: NodePrivate | None = None,
        *,
        mesh_key: bytes | None = None,
        verify_client: VerifyCallback | None = None,
        verify_client_url: str | None = None,
        verify_fail_open: bool = True,
        rate_limit_bytes_per_sec: float = 0.0,
        rate_limit_burst: int = 0,
        rate_limit_mode: str = "drop",
        queue_depth: int = 512,
        write_timeout: float = 2.0,
        mesh_write_timeout: float = 30.0,
        keepalive_interval: float = 60.0,
    ) -> None:
        self.private_key = private_key or NodePrivate.generate()
        self.public_key: NodePublic = self.private_key.public
        self.core = DerpServerCore(
            self.private_key.raw,
            mesh_key=mesh_key,
            queue_depth=queue_depth,
            keepalive_interval=keepalive_interval,
            verify_clients=verify_client is not None or verify_client_url is not None,
            rate_limit_bytes_per_sec=rate_limit_bytes_per_sec,
            rate_limit_burst=rate_limit_burst,
            rate_limit_mode=rate_limit_mode,
            log=log.debug,
        )
        self.mesh_key = mesh_key
        self.verify_client = verify_client
        self.verify_client_url = verify_client_url
        self.verify_fail_open = verify_fail_open
        self.write_timeout = write_timeout
        self.mesh_write_timeout = mesh_write_timeout
        self._wakes: dict[object, _Wake] = {}
        self._shutting_down = False
        self._conn_scopes: set[trio.CancelScope] = set()
        self._stun_counters = {"requests": 0, "ignored": 0}
        self.listen_port: int | None = None
        self.stun_port: int | None = None

    @property
    def counters(self):
        """The core's :class:`ServerCounters`."""
        return self.core.counters

    def stats(self) -> dict[str, object]:
        """Counters as a dict (including STUN)."""
        out = self.core.counters.as_dict()
        out["stun"] = dict(self._stun_counters)
        return out

    # -- wake-ups ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Wake the writers of every connection the last input produced output for."""
        wakes = self._wakes
        for box in self.core.take_dirty():
            w = wakes.get(box)
            if w is not None:
                w.set()
        # Each connection's own reader handles verification and closing; just drain the lists.
        self.core.take_closed()
        self.core.take_verify_requests()

    # -- HTTP front end --------------------------------------------------------------------

    async def serve_stream(self, stream: trio.abc.Stream, remote: tuple[str, int] | None = None) -> None:
        """Serve one accepted connection: HTTP requests until it upgrades to DERP or closes."""
        http = h11.Connection(h11.SERVER)
        try:
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    with trio.move_on_after(30) as cs:
                        data = await stream.receive_some(65536)
                    if cs.cancelled_caught:
                        return
                    http.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    path = event.target.split(b"?", 1)[0]
                    if path == b"/derp":
                        headers = {k.lower(): v for k, v in event.headers}
                        upgrade = headers.get(b"upgrade", b"").lower()
                        if upgrade in (b"derp", b"websocket"):
                            await self.handle_upgrade(stream, event, http.trailing_data[0], remote)
                            return
                    await self._simple_response(http, stream, event, remote)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    if http.our_state is h11.DONE and http.their_state is h11.DONE:
                        http.start_next_cycle()
                        continue
                    if http.our_state is h11.MUST_CLOSE:
                        return
                    continue
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
        except (h11.RemoteProtocolError, h11.LocalProtocolError):
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _simple_response(self, http: h11.Connection, stream: trio.abc.Stream, req: h11.Request,
                               remote: tuple[str, int] | None) -> None:
        status, headers, body = self.http_response(req, remote)
        headers = headers + [(b"content-length", str(len(body)).encode())]
        out = http.send(h11.Response(status_code=status, headers=headers))
        if req.method != b"HEAD" and body:
            out += http.send(h11.Data(data=body))
        out += http.send(h11.EndOfMessage())
        await stream.send_all(out)

    def http_response(self, req: h11.Request, remote: tuple[str, int] | None = None
                      ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body for the non-upgrade endpoints (usable by an embedding server).

        ``/debug/vars`` (counters as JSON) is only served to loopback clients.
        """
        path = req.target.split(b"?", 1)[0]
        method = req.method
        if path in (b"/derp/probe", b"/derp/latency-check"):
            if method not in (b"GET", b"HEAD"):
                return 405, [], b"bogus probe method\n"
            return 200, [(b"access-control-allow-origin", b"*")], b""
        if path == b"/derp":
            return 426, [(b"content-type", b"text/plain")], b"DERP requires connection upgrade"
        if path == b"/generate_204":
            headers = [(b"cache-control", b"no-cache, no-store, must-revalidate, no-transform, max-age=0")]
            for name, value in req.headers:
                if name.lower() == b"x-tailscale-challenge" and value and _CHALLENGE_RE.match(value):
                    headers.append((b"x-tailscale-response", b"response " + value))
            return 204, headers, b""
        if path == b"/robots.txt":
            return 200, [(b"content-type", b"text/plain")], b"User-agent: *\nDisallow: /\n"
        if path == b"/debug/vars":
            if remote is None or not ipaddress.ip_address(remote[0].split("%")[0]).is_loopback:
                return 403, [(b"content-type", b"text/plain")], b"forbidden\n"
            return 200, [(b"content-type", b"application/json")], json.dumps(self.stats()).encode()
        if path == b"/":
            return 200, [(b"content-type", b"text/plain")], b"tsnet DERP server\n"
        return 404, [(b"content-type", b"text/plain")], b"not found\n"

    # -- DERP connections ------------------------------------------------------------------

    async def handle_upgrade(
        self,
        stream: trio.abc.Stream,
        request: h11.Request,
        trailing_data: bytes = b"",
        remote: tuple[str, int] | None = None,
    ) -> None:
        """Take over ``stream`` after ``request`` (an upgrade to /derp) was parsed.

        ``trailing_data`` are bytes already read past the request head (a pipelined
        ClientInfo). Returns when the DERP connection ends; does not close ``stream``.
        """
        headers = {k.lower(): v for k, v in request.headers}
        fast_start = headers.get(b"derp-fast-start") == b"1"
        not_ideal = b"ideal-node" in headers
        if remote is None:
            remote = _remote_of(stream)
        if wants_websocket(headers):
            # Browser-style clients: DERP bytes inside WebSocket binary messages.
            await stream.send_all(handshake_response(headers))
            ws = WebSocketStream(stream, bytes(trailing_data))
            await self.run_connection(ws, b"", remote, write_101=False, not_ideal=not_ideal)
            return
        await self.run_connection(stream, trailing_data, remote, write_101=not fast_start, not_ideal=not_ideal)

    async def run_connection(
        self,
        stream: trio.abc.Stream,
        initial: bytes = b"",
        remote: tuple[str, int] | None = None,
        *,
        write_101: bool = True,
        not_ideal: bool = False,
    ) -> None:
        """Run the DERP protocol on an upgraded stream until either side closes."""
        if self._shutting_down:
            return
        now = trio.current_time()
        conn = self.core.accept(now, remote, not_ideal=not_ideal)
        wake = _Wake()
        self._wakes[conn] = wake
        head = upgrade_response(self.core.public_key) if write_101 else b""
        try:
            with trio.CancelScope() as scope:
                self._conn_scopes.add(scope)
                with trio.move_on_after(10) as cs:
                    await stream.send_all(head + conn.data_to_send(now))
                if cs.cancelled_caught:
                    conn.connection_lost("timeout writing ServerKey")
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn, wake, stream, nursery.cancel_scope)
                    await self._reader(conn, stream, initial)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as group:
            conn.connection_lost(f"I/O error: {group.exceptions[0]!r}")
        finally:
            self._conn_scopes.discard(scope)
            conn.connection_lost()
            self._dispatch()
            del self._wakes[conn]

    async def _reader(self, conn: ServerConn, stream: trio.abc.Stream, initial: bytes) -> None:
        core = self.core
        if initial:
            conn.receive_data(bytes(initial), trio.current_time())
            self._dispatch()
        while not conn.closed:
            if conn.state is ConnState.VERIFYING:
                allowed = await self._verify(conn)
                core.verify_result(conn, allowed, trio.current_time())
                self._dispatch()
                continue
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
                conn.connection_lost(f"read error: {exc!r}")
                return
            if not data:
                conn.connection_lost("EOF inside a truncated frame" if conn.has_partial_frame else "EOF")
                return
            now = trio.current_time()
            conn.receive_data(data if type(data) is bytes else bytes(data), now)
            self._dispatch()
            resume = conn.read_resume_at(now)
            if resume > now:
                self.core.counters.rate_limit_pauses += 1
                await trio.sleep_until(resume)  # paced rate limit: TCP backpressure slows the sender
            if conn.closed and conn.close_reason.startswith("protocol error"):
                log.info("derp: %s: %s", conn.remote, conn.close_reason)

    async def _writer(self, conn: ServerConn, wake: _Wake, stream: trio.abc.Stream,
                      scope: trio.CancelScope) -> None:
        timeout = self.mesh_write_timeout if conn.can_mesh else self.write_timeout
        try:
            while True:
                if not conn.has_output:
                    if conn.closed:
                        break
                    with trio.move_on_at(conn.get_timer()):
                        await wake.wait()
                    conn.handle_timer(trio.current_time())
                    self._dispatch()
                    continue
                data = conn.data_to_send(trio.current_time())
                if conn.can_mesh:
                    timeout = self.mesh_write_timeout
                with trio.move_on_after(timeout) as cs:
                    await stream.send_all(data)
                if cs.cancelled_caught:
                    conn.write_failed("write timeout")
                    self._dispatch()
                    break
                if conn.closed and not conn.has_output:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            conn.write_failed(f"write error: {exc!r}")
            self._dispatch()
        scope.cancel()

    async def _verify(self, conn: ServerConn) -> bool:
        key = NodePublic(conn.key)  # type: ignore[arg-type]
        ip = conn.remote[0] if conn.remote else ""
        if self.verify_client is not None:
            try:
                result = self.verify_client(key, ip)
                if inspect.isawaitable(result):
                    result = await result
                return bool(result)
            except Exception:  # a broken policy callback denies; it must not kill the connection task
                log.exception("derp: verify_client callback failed for %s", key.short())
                return False
        try:
            assert self.verify_client_url is not None
            with trio.fail_after(5):
                status, body = await _http_post_json(self.verify_client_url, {"NodePublic": str(key), "Source": ip})
            if status != 200:
                return False
            reply = json.loads(body)
            return isinstance(reply, dict) and reply.get("Allow") is True
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                h11.ProtocolError, ValueError, ssl.SSLError) as exc:
            log.warning("derp: verify-clients lookup failed for %s: %r", key.short(), exc)
            return self.verify_fail_open

    # -- standalone listener ---------------------------------------------------------------

    async def serve_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 3340,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (TLS when ``ssl_context`` is given) until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        self.listen_port = listeners[0].socket.getsockname()[1]

        async def handle(stream: trio.abc.Stream) -> None:
            remote = _remote_of(stream)
            if ssl_context is not None:
                # Every waiting TLS record per read (trio.SSLStream hands over one 16 KiB record at a time);
                # the handshake runs on the first read, under serve_stream's timeouts.
                stream = BatchTLSStream.from_socket_stream(stream, ssl_context, server_side=True)
            try:
                await self.serve_stream(stream, remote)
            except* Exception as group:  # one bad connection must never take the listener down
                log.error("derp: connection from %s failed: %r", remote, group.exceptions[0])

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(self.listen_port)

    async def serve_stun(self, host: str = "127.0.0.1", port: int = 3478, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A STUN responder answering only derper-valid binding requests."""
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                  trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind((host, port))
            self.stun_port = sock.getsockname()[1]
            task_status.started(self.stun_port)
            while True:
                data, addr = await sock.recvfrom(2048)
                reply = stun.handle_request(data, addr)
                if reply is None:
                    self._stun_counters["ignored"] += 1
                    continue
                self._stun_counters["requests"] += 1
                try:
                    await sock.sendto(reply, addr)
                except OSError:
                    pass

    # -- mesh ------------------------------------------------------------------------------

    async def run_mesh_peer(self, url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a watch connection to the mesh peer at ``url`` (``http(s)://host:port``), forever."""
        from .client import Backoff, open_derp_url
        from .client_core import DerpClientProtocol

        if not self.mesh_key:
            raise ValueError("mesh needs a mesh key")
        link = self.core.add_mesh_link(url, trio.current_time())
        wake = _Wake()
        self._wakes[link] = wake
        backoff = Backoff()
        started = False
        while True:
            try:
                stream, leftover = await open_derp_url(url, insecure=True)
            except (OSError, trio.TooSlowError, DerpProtocolError, ssl.SSLError, h11.ProtocolError) as exc:
                log.info("derp mesh: dial %s failed: %r", url, exc)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(backoff.next_delay())
                continue
            proto = DerpClientProtocol(self.private_key, trio.current_time(), mesh_key=self.mesh_key)
            try:
                async with stream, trio.open_nursery() as nursery:
                    ready = trio.Event()

                    async def writer() -> None:
                        while True:
                            data = proto.data_to_send()
                            if ready.is_set():
                                data += link.data_to_send(trio.current_time())
                            if data:
                                with trio.fail_after(self.mesh_write_timeout):
                                    await stream.send_all(data)
                                continue
                            await wake.wait()

                    nursery.start_soon(writer)
                    data = leftover
                    while True:
                        if data:
                            for ev in proto.receive_data(data, trio.current_time()):
                                if isinstance(ev, ServerInfoReceived):
                                    if ev.server_key == self.public_key:
                                        log.info("derp mesh: %s is ourselves; not meshing", url)
                                        if not started:
                                            task_status.started()
                                        return
                                    proto.watch_conns(trio.current_time())
                                    ready.set()
                                    backoff.reset()
                                elif isinstance(ev, PeerPresentEvent):
                                    link.peer_present(ev.peer.raw)
                                elif isinstance(ev, PeerGoneEvent):
                                    link.peer_gone(ev.peer.raw)
                            wake.set()
                            self._dispatch()  # PeerGone may have queued frames for local clients
                            if ready.is_set() and not started:
                                started = True
                                task_status.started()
                        data = await stream.receive_some(RECV_SIZE)
                        if not data:
                            break
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                     DerpProtocolError, ssl.SSLError) as group:
                log.info("derp mesh: link to %s broke: %r", url, group.exceptions[0])
            link.reset()
            self._dispatch()  # the reset may have queued PeerGone frames for local clients
            if not started:
                started = True
                task_status.started()
            await trio.sleep(backoff.next_delay())

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 2.0, reconnect_in_ms: int = 0, try_for_ms: int = 10_000) -> None:
        """Send Restarting to every client, give writers ``timeout`` to flush, then close them all."""
        self._shutting_down = True
        self.core.announce_restart(reconnect_in_ms, try_for_ms)
        self._dispatch()
        if not self._conn_scopes:
            return
        with trio.move_on_after(timeout):
            # Writers flush the Restarting frame; then we close every connection.
            while any(c.has_output for c in self.core.connections()):
                await trio.sleep(0.01)
        for scope in list(self._conn_scopes):
            scope.cancel()


def _remote_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    inner = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    if sock is None:
        return None
    try:
        addr = sock.getpeername()
    except OSError:
        return None
    return (addr[0], addr[1]) if isinstance(addr, tuple) else None


async def _http_post_json(url: str, obj: object) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 POST (http or https) returning (status, body)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if https else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if https:
        stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
    body = json.dumps(obj).encode()
    http = h11.Connection(h11.CLIENT)
    target = (parts.path or "/") + (("?" + parts.query) if parts.query else "")
    async with stream:
        await stream.send_all(
            http.send(h11.Request(method="POST", target=target, headers=[
                ("Host", parts.netloc), ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))), ("Connection", "close")]))
            + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        )
        status = 0
        chunks = []
        while True:
            ev = http.next_event()
            if ev is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                chunks.append(bytes(ev.data))
                if sum(map(len, chunks)) > 65536:
                    raise ValueError("verify reply too large")
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, b"".join(chunks)
