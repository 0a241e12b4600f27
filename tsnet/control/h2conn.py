"""HTTP/2 with prior knowledge over any trio stream (here: the Noise stream), both sides.

Built on the ``h2`` state machine. One reader task owns the connection; streams
run concurrently (the map long-poll must not starve register or lite updates),
flow control is honoured in both directions, and received DATA is acknowledged
as it is consumed.

* Server: :func:`serve_h2` calls ``handler(request, response)`` in its own task
  for every request once its body is complete.
* Client: :class:`H2Client` (``async with open_h2_client(stream) as c``) issues
  requests; :class:`H2Response` exposes status, headers and the body as a stream.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

__all__ = ["H2Request", "H2ResponseWriter", "H2Response", "H2Client", "H2Error", "serve_h2", "open_h2_client"]

_READ = 65536
_WINDOW = 4 << 20  # generous windows: control messages are small, but initial netmaps may be big
_MAX_BODY = 16 << 20


class H2Error(Exception):
    """The HTTP/2 connection or a stream failed."""


class _Stream:
    """Per-stream bookkeeping shared by client and server."""

    __slots__ = ("id", "headers", "data_send", "data_recv", "window", "ended", "reset", "headers_event", "cancel_scope")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] | None = None
        self.data_send, self.data_recv = trio.open_memory_channel[bytes | None](math.inf)
        self.window = trio.Event()
        self.ended = False
        self.reset = False
        self.headers_event = trio.Event()
        self.cancel_scope: trio.CancelScope | None = None


class _H2Base:
    def __init__(self, stream: trio.abc.Stream, *, client_side: bool) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8", validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self._send_lock = trio.StrictFIFOLock()
        self.streams: dict[int, _Stream] = {}
        self.closed = trio.Event()
        self._conn_window = trio.Event()

    def _start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20,
            }
        )
        self.conn.increment_flow_control_window(_WINDOW)

    async def flush(self) -> None:
        """Write whatever h2 has queued. The queue is drained under the lock to keep frame order."""
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._mark_closed()
                    raise H2Error(f"connection lost: {exc}") from None

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._conn_window.set()
        for st in self.streams.values():
            st.reset = True
            st.window.set()
            st.headers_event.set()
            st.data_send.send_nowait(None)
            if st.cancel_scope is not None:
                st.cancel_scope.cancel()

    def _wake_all_windows(self) -> None:
        self._conn_window.set()
        self._conn_window = trio.Event()
        for st in self.streams.values():
            st.window.set()
            st.window = trio.Event()

    async def send_data(self, st: _Stream, data: bytes | memoryview, *, end: bool) -> None:
        """Send body bytes on a stream, waiting for flow-control credit as needed."""
        view = memoryview(data)
        while True:
            if st.reset or self.closed.is_set():
                raise H2Error(f"stream {st.id} was reset")
            if not view:
                if end:
                    try:
                        self.conn.end_stream(st.id)
                    except h2.exceptions.ProtocolError as exc:
                        raise H2Error(f"stream {st.id}: {exc}") from None
                    await self.flush()
                return
            try:
                window = min(self.conn.local_flow_control_window(st.id), self.conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                raise H2Error(f"stream {st.id} closed") from None
            if window <= 0:
                await st.window.wait()
                continue
            chunk = view[:window]
            view = view[len(chunk) :]
            try:
                self.conn.send_data(st.id, bytes(chunk), end_stream=end and not view)
            except h2.exceptions.ProtocolError as exc:  # e.g. the peer reset the stream meanwhile
                raise H2Error(f"stream {st.id}: {exc}") from None
            await self.flush()
            if end and not view:
                return

    def _ack(self, stream_id: int, length: int) -> None:
        if length:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                self.conn.increment_flow_control_window(length)

    async def _handle_common(self, event: h2.events.Event) -> bool:
        """Events both sides treat alike; returns True if handled."""
        if isinstance(event, h2.events.DataReceived):
            st = self.streams.get(event.stream_id)
            self._ack(event.stream_id, event.flow_controlled_length)
            if st is not None:
                st.data_send.send_nowait(event.data)
            return True
        if isinstance(event, h2.events.StreamEnded):
            st = self.streams.get(event.stream_id)
            if st is not None:
                st.ended = True
                st.data_send.send_nowait(None)
            return True
        if isinstance(event, h2.events.StreamReset):
            st = self.streams.pop(event.stream_id, None)
            if st is not None:
                st.reset = True
                st.window.set()
                st.headers_event.set()
                st.data_send.send_nowait(None)
                if st.cancel_scope is not None:
                    st.cancel_scope.cancel()
            return True
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake_all_windows()
            return True
        if isinstance(event, h2.events.ConnectionTerminated):
            self._mark_closed()
            return True
        return False

    async def _read_loop(self, on_event: Callable[[h2.events.Event], Awaitable[None]]) -> None:
        try:
            while not self.closed.is_set():
                try:
                    data = await self.stream.receive_some(_READ)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError):
                    break
                except Exception:
                    break  # e.g. a Noise authentication failure: the connection is dead
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    try:
                        await self.flush()  # GOAWAY queued by h2
                    except H2Error:
                        pass
                    break
                for event in events:
                    if not await self._handle_common(event):
                        await on_event(event)
                try:
                    await self.flush()
                except H2Error:
                    break
        finally:
            self._mark_closed()


@dataclass(slots=True)
class H2Request:
    """A request as the server handler sees it (body already complete)."""

    method: str
    path: str
    authority: str
    headers: list[tuple[str, str]]
    body: bytes
    stream_id: int

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H2ResponseWriter:
    """Lets a server handler send a response, optionally streamed."""

    def __init__(self, server: _H2Base, st: _Stream) -> None:
        self._server = server
        self._st = st
        self.started = False
        self.finished = False

    @property
    def reset(self) -> bool:
        """True once the client reset the stream or the connection closed."""
        return self._st.reset

    async def start(self, status: int, headers: list[tuple[str, str]] | None = None, *, end: bool = False) -> None:
        if self.started:
            raise H2Error("response already started")
        self.started = True
        all_headers = [(":status", str(status))] + list(headers or [])
        if self._st.reset:
            raise H2Error("stream was reset")
        try:
            self._server.conn.send_headers(self._st.id, all_headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise H2Error(f"stream {self._st.id}: {exc}") from None
        if end:
            self.finished = True
        await self._server.flush()

    async def write(self, data: bytes) -> None:
        if not self.started:
            await self.start(200)
        await self._server.send_data(self._st, data, end=False)

    async def end(self, data: bytes = b"") -> None:
        if self.finished:
            return
        if not self.started:
            await self.start(200)
        self.finished = True
        await self._server.send_data(self._st, data, end=True)

    async def respond(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
        headers = [("content-length", str(len(body)))]
        if content_type:
            headers.append(("content-type", content_type))
        await self.start(status, headers, end=not body)
        if body:
            await self.end(body)


Handler = Callable[[H2Request, H2ResponseWriter], Awaitable[None]]


class _H2Server(_H2Base):
    def __init__(self, stream: trio.abc.Stream, handler: Handler, nursery: trio.Nursery) -> None:
        super().__init__(stream, client_side=False)
        self.handler = handler
        self.nursery = nursery
        self.bodies: dict[int, bytearray] = {}

    async def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            st = _Stream(event.stream_id)
            st.headers = [(str(k), str(v)) for k, v in event.headers]
            self.streams[event.stream_id] = st
            self.nursery.start_soon(self._run_handler, st)

    async def _run_handler(self, st: _Stream) -> None:
        body = bytearray()
        while True:
            chunk = await st.data_recv.receive()
            if chunk is None:
                break
            body += chunk
            if len(body) > _MAX_BODY:
                self._reset(st, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
        if st.reset:
            self.streams.pop(st.id, None)
            return
        pseudo = {k: v for k, v in st.headers or [] if k.startswith(":")}
        request = H2Request(
            method=pseudo.get(":method", ""),
            path=pseudo.get(":path", ""),
            authority=pseudo.get(":authority", ""),
            headers=[(k, v) for k, v in st.headers or [] if not k.startswith(":")],
            body=bytes(body),
            stream_id=st.id,
        )
        writer = H2ResponseWriter(self, st)
        try:
            with trio.CancelScope() as scope:
                st.cancel_scope = scope
                try:
                    await self.handler(request, writer)
                    if not writer.finished and not st.reset:
                        await writer.end()
                except H2Error:
                    pass
                except Exception:
                    if not writer.started and not st.reset and not self.closed.is_set():
                        await writer.respond(500, b"internal error\n", "text/plain")
                    else:
                        self._reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
                    raise
        finally:
            self.streams.pop(st.id, None)

    def _reset(self, st: _Stream, code: h2.errors.ErrorCodes) -> None:
        try:
            self.conn.reset_stream(st.id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass


async def serve_h2(stream: trio.abc.Stream, handler: Handler, *, on_error: Callable[[BaseException], None] | None = None) -> None:
    """Serve HTTP/2 on ``stream`` until the peer goes away; each request runs ``handler`` in its own task.

    A handler that raises gets its stream answered 500 (or reset); the exception is
    passed to ``on_error`` and the connection stays up.
    """

    async with trio.open_nursery() as nursery:
        server = _H2Server(stream, handler, nursery)

        async def guarded(st: _Stream) -> None:
            try:
                await _H2Server._run_handler(server, st)
            except Exception as exc:
                if on_error is not None:
                    on_error(exc)
            try:
                await server.flush()
            except H2Error:
                pass

        server._run_handler = guarded  # type: ignore[method-assign]
        server._start()
        try:
            await server.flush()
            await server._read_loop(server.on_event)
        finally:
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(stream)


class H2Response:
    """A response on the client side; the body arrives through :meth:`iter_chunks` or :meth:`read`."""

    def __init__(self, client: H2Client, st: _Stream, status: int, headers: list[tuple[str, str]]) -> None:
        self._client = client
        self._st = st
        self.status = status
        self.headers = headers

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._st.data_recv.receive()
            if chunk is None:
                if self._st.reset and not self._st.ended:
                    raise H2Error(f"stream {self._st.id} reset before the body ended")
                return
            yield chunk

    async def read(self, limit: int = _MAX_BODY) -> bytes:
        out = bytearray()
        async for chunk in self.iter_chunks():
            out += chunk
            if len(out) > limit:
                await self.aclose()
                raise H2Error(f"response body exceeds {limit} bytes")
        return bytes(out)

    async def aclose(self) -> None:
        """Abandon the response (RST_STREAM CANCEL if still open)."""
        await self._client._cancel(self._st)


class H2Client(_H2Base):
    """HTTP/2 client side; create with :func:`open_h2_client`."""

    def __init__(self, stream: trio.abc.Stream, authority: str) -> None:
        super().__init__(stream, client_side=True)
        self.authority = authority

    async def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            st = self.streams.get(event.stream_id)
            if st is not None:
                st.headers = [(str(k), str(v)) for k, v in event.headers]
                st.headers_event.set()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        authority: str | None = None,
    ) -> H2Response:
        """Send a request and wait for the response headers (not the body)."""
        if self.closed.is_set():
            raise H2Error("connection closed")
        sid = self.conn.get_next_available_stream_id()
        st = _Stream(sid)
        self.streams[sid] = st
        hdrs = [
            (":method", method),
            (":scheme", "https"),
            (":authority", authority or self.authority),
            (":path", path),
        ] + list(headers or [])
        if body:
            hdrs.append(("content-length", str(len(body))))
        try:
            self.conn.send_headers(sid, hdrs, end_stream=not body)
        except h2.exceptions.ProtocolError as exc:
            self.streams.pop(sid, None)
            raise H2Error(f"cannot open stream: {exc}") from None
        await self.flush()
        if body:
            await self.send_data(st, body, end=True)
        await st.headers_event.wait()
        if st.headers is None:
            self.streams.pop(sid, None)
            raise H2Error("stream reset or connection lost before response headers")
        status = 0
        for k, v in st.headers:
            if k == ":status":
                status = int(v)
        return H2Response(self, st, status, [(k, v) for k, v in st.headers if not k.startswith(":")])

    async def _cancel(self, st: _Stream) -> None:
        self.streams.pop(st.id, None)
        if st.ended or st.reset or self.closed.is_set():
            return
        st.reset = True
        try:
            self.conn.reset_stream(st.id, h2.errors.ErrorCodes.CANCEL)
            await self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, H2Error):
            pass

    async def aclose(self) -> None:
        if not self.closed.is_set():
            try:
                self.conn.close_connection()
                await self.flush()
            except (H2Error, h2.exceptions.ProtocolError):
                pass
        self._mark_closed()
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def open_h2_client(stream: trio.abc.Stream, authority: str) -> AsyncIterator[H2Client]:
    """Start an HTTP/2 client on ``stream``; the reader runs until the block exits."""
    client = H2Client(stream, authority)
    client._start()
    await client.flush()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._read_loop, client.on_event)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            await client.aclose()
