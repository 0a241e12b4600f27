"""A tiny HTTP/1.1 front end (h11 + trio) for the control server's listener.

The listener serves ordinary requests (``/key``, ``/generate_204``) and hands
whole connections to protocol upgrades (``/ts2021``, ``/derp``). An app is an
async callable ``app(request) -> Reply | Takeover``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["HTTPRequest", "Reply", "Takeover", "serve_http1"]

_READ = 65536
_MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    remote: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.target.split("?", 1)[1])) if "?" in self.target else {}

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Takeover:
    """The app takes the raw connection; ``run(stream, leftover)`` owns and closes it."""

    run: Callable[[trio.abc.Stream, bytes], Awaitable[None]]


App = Callable[[HTTPRequest], Awaitable[Reply | Takeover]]


async def serve_http1(stream: trio.abc.Stream, app: App, *, remote: str = "", idle_timeout: float = 60.0) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until it closes or is taken over."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            request: h11.Request | None = None
            body = bytearray()
            with trio.move_on_after(idle_timeout) as idle:
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError as exc:
                        await _send_error(stream, conn, exc.error_status_hint, str(exc))
                        return
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(_READ)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > _MAX_BODY:
                            await _send_error(stream, conn, 413, "body too large")
                            return
                    elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
            if idle.cancelled_caught or request is None:
                return
            req = HTTPRequest(
                method=request.method.decode("ascii", "replace"),
                target=request.target.decode("latin-1"),
                headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers],
                body=bytes(body),
                remote=remote,
            )
            result = await app(req)
            if isinstance(result, Takeover):
                # Bytes the client sent past the request (already read by us) belong to the new protocol.
                leftover, _closed = conn.trailing_data
                await result.run(stream, bytes(leftover))
                return
            headers = [("content-type", result.content_type), ("content-length", str(len(result.body)))]
            headers += result.headers
            if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                headers.append(("connection", "close"))
            await stream.send_all(conn.send(h11.Response(status_code=result.status, headers=headers)))
            if result.body and req.method != "HEAD":
                await stream.send_all(conn.send(h11.Data(data=result.body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def _send_error(stream: trio.abc.Stream, conn: h11.Connection, status: int, text: str) -> None:
    body = (text + "\n").encode()
    try:
        await stream.send_all(
            conn.send(h11.Response(status_code=status, headers=[("content-length", str(len(body))), ("connection", "close")]))
        )
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
