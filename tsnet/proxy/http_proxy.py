"""HTTP proxy (h11): CONNECT tunnels and absolute-form requests, with optional Basic proxy auth.

A failed dial answers 502 (504 if it timed out, RFC 9110 §15.6.5; 403 if the dialer's policy refuses the
destination, see :func:`~tsnet.proxy.dialer.deny_dial`) with the reason in a
``Tailscale-Connect-Error`` header (the header tailscaled uses). Origin-form requests (``GET /path``) are
refused with 400, as tailscaled does: this is a proxy, not a web server. A request carrying both
Content-Length and Transfer-Encoding is refused with 400 (RFC 9112 §6.3 allows it, and forwarding both
would let the origin frame the body differently from us: request smuggling). Forwarded messages get a
``Via: <version> tsnet`` entry (RFC 9110 §7.6.3); OPTIONS and TRACE honour Max-Forwards (§7.6.2: at 0
we answer them ourselves, otherwise the value is decremented). The request head (line and headers) must arrive
within ``handshake_timeout`` in total, however slowly it trickles in.
"""

from __future__ import annotations

import base64
import binascii
import http
import logging
import urllib.parse
from collections.abc import Iterable

import h11
import trio

from .common import ProxySettings, send_or_false
from .dialer import DestinationNotAllowed, connect, describe_error
from .splice import splice

log = logging.getLogger(__name__)

ERROR_HEADER = b"tailscale-connect-error"
#: Our pseudonym in Via header fields (RFC 9110 §7.6.3 allows a pseudonym instead of a host name).
VIA_NAME = b"tsnet"
_MAX_HEADER_BYTES = 64 * 1024
# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection that clients still send.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

Headers = list[tuple[bytes, bytes]]


def _reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


class _ClientGone(Exception):
    """The client closed or broke the connection (or sent something h11 rejects)."""


def end_to_end_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers, including any the message lists in its Connection header."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP and n.lower() not in named]


def _has_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(n.lower() == name for n, _ in headers)


def _with_via(headers: Headers, http_version: bytes) -> Headers:
    """``headers`` with our Via entry appended after any the message already had."""
    return [*headers, (b"via", http_version + b" " + VIA_NAME)]


def _reframed(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """End-to-end headers of a message we re-frame: with Transfer-Encoding, Content-Length is void.

    RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an intermediary must drop the
    latter before forwarding (h11 decoded the body by its chunking; we re-chunk it).
    """
    headers = list(headers)
    chunked = _has_header(headers, b"transfer-encoding")
    kept = end_to_end_headers(headers)
    if chunked:
        kept = [(n, v) for n, v in kept if n.lower() != b"content-length"]
    return kept


# Request fields a TRACE echo leaves out: they carry credentials.
_SECRET_FIELDS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
_ALLOWED_METHODS = b"GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH, CONNECT"


def _max_forwards(request: h11.Request) -> int | None:
    """The Max-Forwards of an OPTIONS or TRACE request (the only methods it applies to), else None."""
    if request.method not in (b"OPTIONS", b"TRACE"):
        return None
    for name, value in request.headers:
        if name.lower() == b"max-forwards" and value.strip().isdigit():
            return int(value.strip())
    return None


def parse_authority(target: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); raises ValueError if malformed."""
    parsed = urllib.parse.urlsplit("//" + target)
    host = parsed.hostname
    port = parsed.port  # raises ValueError for a bad port
    if port is None:
        port = default_port
    if not host or port is None or not 0 < port < 65536 or parsed.path or parsed.query or parsed.username:
        raise ValueError(f"bad authority {target!r}")
    return host, port


class _Session:
    """One client connection: a loop of requests, each tunnelled or forwarded."""

    def __init__(self, stream: trio.abc.Stream, initial: bytes, settings: ProxySettings) -> None:
        self.stream = stream
        self.settings = settings
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        self.conn.receive_data(initial)

    async def _next_event(self, deadline: float | None = None) -> h11.Event | type[h11.PAUSED]:
        """The next client event; raises trio.TooSlowError if it is not complete by ``deadline``."""
        with trio.fail_at(deadline) if deadline is not None else trio.CancelScope():
            while True:
                try:
                    event = self.conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._send_error(exc.error_status_hint, f"bad request: {exc}")
                    raise _ClientGone from exc
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _ClientGone from exc
                self.conn.receive_data(data)

    async def _send(self, *events: h11.Event) -> None:
        try:
            data = b"".join(self.conn.send(e) or b"" for e in events)
        except h11.LocalProtocolError as exc:
            raise _ClientGone from exc
        if not await send_or_false(self.stream, data):
            raise _ClientGone

    async def _send_error(
        self,
        status: int,
        reason: str,
        extra: Iterable[tuple[bytes, bytes]] = (),
        *,
        body: bytes | None = None,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """A short response (by default text saying ``reason``) that ends the connection."""
        if body is None:
            body = (reason + "\n").encode("utf-8", "replace")
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *extra,
        ]
        try:
            phrase = _reason_phrase(status)
            data = self.conn.send(h11.Response(status_code=status, headers=headers, reason=phrase)) or b""
            if self.conn.our_state is h11.SEND_BODY:
                data += self.conn.send(h11.Data(data=body)) or b""
                data += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # h11 cannot frame a response here (e.g. the request line itself was garbage): write it raw.
            lines = [b"HTTP/1.1 %d %s" % (status, _reason_phrase(status))] + [n + b": " + v for n, v in headers]
            data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        await send_or_false(self.stream, data)

    def _authorized(self, request: h11.Request) -> bool:
        credentials = self.settings.credentials
        if credentials is None:
            return True
        for name, value in request.headers:
            if name != b"proxy-authorization":
                continue
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"basic":
                continue
            try:
                decoded = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                continue
            username, sep, password = decoded.partition(b":")
            if sep and credentials.matches(username, password):
                return True
        return False

    async def run(self) -> None:
        while True:
            # The whole request head must arrive promptly (a client trickling a byte at a time gets no
            # more time than a silent one); idle keep-alive connections get the same allowance.
            deadline = trio.current_time() + self.settings.handshake_timeout
            event = await self._next_event(deadline)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            if _has_header(event.headers, b"content-length") and _has_header(event.headers, b"transfer-encoding"):
                self.settings.count("http_ambiguous_framing")
                await self._send_error(400, "both Content-Length and Transfer-Encoding: refusing ambiguous framing")
                return
            if not self._authorized(event):
                self.settings.count("http_auth_failed")
                await self._send_error(
                    407, "proxy authentication required", [(b"proxy-authenticate", b'Basic realm="tsnet"')]
                )
                return
            if event.method == b"CONNECT":
                await self._tunnel(event)
                return
            if not await self._forward(event):
                return
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
            else:
                return

    async def _dial(self, host: str, port: int) -> trio.abc.Stream | None:
        try:
            settings = self.settings
            return await connect(host, port, settings.dial, settings.resolve, settings.connect_timeout)
        except (OSError, trio.TooSlowError) as exc:
            reason = describe_error(exc)
            self.settings.count("http_dial_failed")
            log.debug("HTTP proxy dial %s:%d failed: %s", host, port, reason)
            extra = [(ERROR_HEADER, reason.encode())]
            if isinstance(exc, DestinationNotAllowed):
                status = 403  # our policy, not a failure of the upstream: RFC 9110 §15.5.4
            elif isinstance(exc, trio.TooSlowError | TimeoutError):
                status = 504
            else:
                status = 502
            await self._send_error(status, f"dial {host}:{port} failed: {reason}", extra)
            return None

    async def _tunnel(self, request: h11.Request) -> None:
        try:
            host, port = parse_authority(request.target.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            await self._send_error(400, "CONNECT needs a host:port target")
            return
        upstream = await self._dial(host, port)
        if upstream is None:
            return
        self.settings.count("http_connect")
        try:
            # h11 switches protocols once a 2xx answers CONNECT; bytes after the request are tunnel data.
            await self._send(h11.Response(status_code=200, reason=b"Connection established", headers=[]))
        except _ClientGone:
            await trio.aclose_forcefully(upstream)
            raise
        leftover, _closed = self.conn.trailing_data
        if leftover and not await send_or_false(upstream, bytes(leftover)):
            await trio.aclose_forcefully(upstream)
            return
        await splice(self.stream, upstream)

    async def _forward(self, request: h11.Request) -> bool:
        """Forward one absolute-form request; True if the client connection can carry another."""
        try:
            target = request.target.decode("ascii")
        except UnicodeDecodeError:
            await self._send_error(400, "request target is not ASCII")
            return False
        if not target.lower().startswith(("http://", "https://")):
            await self._send_error(400, "bogus RequestURI; must be absolute URL or CONNECT")
            return False
        url = urllib.parse.urlsplit(target)
        if url.scheme.lower() != "http":
            await self._send_error(501, f"cannot forward {url.scheme} URLs; use CONNECT")
            return False
        try:
            host, port = parse_authority(url.netloc.rpartition("@")[2], 80)
        except ValueError:
            await self._send_error(400, "bad host in request URL")
            return False
        hops = _max_forwards(request)
        if hops == 0:
            await self._answer_as_final_recipient(request)
            return False
        upstream = await self._dial(host, port)
        if upstream is None:
            return False
        self.settings.count("http_forward")
        async with upstream:
            return await self._exchange(request, url, upstream)

    async def _answer_as_final_recipient(self, request: h11.Request) -> None:
        """RFC 9110 §7.6.2: OPTIONS or TRACE with Max-Forwards 0 is answered here, not forwarded."""
        self.settings.count("http_max_forwards_zero")
        if request.method == b"OPTIONS":
            await self._send_error(200, "", [(b"allow", _ALLOWED_METHODS)], body=b"")
            return
        # TRACE echoes the request as received, minus fields that may hold secrets (RFC 9110 §9.3.8).
        lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
        lines += [n + b": " + v for n, v in request.headers if n.lower() not in _SECRET_FIELDS]
        await self._send_error(200, "", body=b"\r\n".join(lines) + b"\r\n\r\n", content_type=b"message/http")

    async def _exchange(
        self, request: h11.Request, url: urllib.parse.SplitResult, upstream: trio.abc.Stream
    ) -> bool:
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        expects_continue = self.conn.client_is_waiting_for_100_continue
        headers = [(n, v) for n, v in _reframed(request.headers) if n not in (b"host", b"expect")]
        # RFC 9112 §3.2.2: the Host of an absolute-form request comes from its target.
        headers.insert(0, (b"host", url.netloc.rpartition("@")[2].encode("ascii")))
        headers = _with_via(headers, request.http_version)
        hops = _max_forwards(request)
        if hops is not None:  # one hop used up by us
            headers = [(n, v) for n, v in headers if n.lower() != b"max-forwards"]
            headers.append((b"max-forwards", str(hops - 1).encode()))
        if _has_header(request.headers, b"transfer-encoding"):
            headers.append((b"transfer-encoding", b"chunked"))  # we re-chunk a body of unknown length
        client = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)

        async def to_upstream(*events: h11.Event) -> None:
            data = b"".join(client.send(e) or b"" for e in events)
            await upstream.send_all(data)

        try:
            await to_upstream(h11.Request(method=request.method, target=path.encode("ascii"), headers=headers))
            if expects_continue:  # we took over the Expect negotiation; let the body come
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    await to_upstream(event)
                elif isinstance(event, h11.EndOfMessage):
                    await to_upstream(h11.EndOfMessage())
                    break
                else:
                    return False
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await upstream.receive_some(65536))
                    continue
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    if event.status_code == 101:  # we stripped Upgrade, so a switch cannot be relayed
                        raise h11.RemoteProtocolError("upstream switched protocols")
                    kind = type(event)
                    headers = _with_via(_reframed(event.headers), event.http_version)
                    await self._send(kind(status_code=event.status_code, headers=headers, reason=event.reason))
                elif isinstance(event, h11.Data):
                    await self._send(event)
                elif isinstance(event, h11.EndOfMessage):
                    await self._send(h11.EndOfMessage())
                    return True
                else:  # ConnectionClosed before the response ended
                    raise h11.RemoteProtocolError("upstream closed mid-response")
        except (h11.ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.settings.count("http_upstream_error")
            if self.conn.our_state is h11.SEND_RESPONSE:
                reason = describe_error(exc)
                await self._send_error(502, f"upstream error: {reason}", [(ERROR_HEADER, reason.encode())])
            return False


async def handle_http(stream: trio.abc.Stream, initial: bytes, settings: ProxySettings) -> None:
    """Serve one HTTP proxy client whose first bytes (``initial``) were already read. Closes ``stream``."""
    async with stream:
        try:
            await _Session(stream, initial, settings).run()
        except (_ClientGone, trio.TooSlowError):
            pass
