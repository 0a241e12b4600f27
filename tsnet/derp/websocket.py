"""DERP over WebSocket (subprotocol ``derp``), server side: a sans-IO RFC 6455 codec and a trio Stream.

Browsers (js/wasm tailscale) and ``TS_DEBUG_DERP_WS_CLIENT`` builds carry the DERP
byte stream in binary messages; message boundaries need not align with frames,
so the DERP connection just sees a byte stream.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import trio

from .frames import DerpProtocolError

__all__ = ["WebSocketCodec", "WebSocketStream", "accept_key", "encode_ws_frame", "handshake_response", "wants_websocket"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_MESSAGE = 1 << 20  # a DERP frame is at most ~64 KiB; anything far bigger is abuse
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(client_key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(client_key.strip() + _GUID).digest())


def wants_websocket(headers: dict[bytes, bytes]) -> bool:
    """An ``Upgrade: websocket`` request offering the ``derp`` subprotocol (lower-cased header names)."""
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        return False
    protocols = [p.strip().lower() for p in headers.get(b"sec-websocket-protocol", b"").split(b",")]
    return b"derp" in protocols


def handshake_response(headers: dict[bytes, bytes]) -> bytes:
    """The 101 reply accepting subprotocol ``derp``."""
    key = headers.get(b"sec-websocket-key", b"")
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
    )


def encode_ws_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; ``mask`` (4 bytes) for client-to-server frames."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, n | (0x80 if mask else 0))
    elif n < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126 | (0x80 if mask else 0), n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127 | (0x80 if mask else 0), n)
    if mask:
        return head + mask + _xor(payload, mask)
    return head + payload


def _xor(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big") if n else 0
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big") if n else b""


class WebSocketCodec:
    """Server-side frame parser: ``receive_data`` returns (application bytes, bytes to send back, closed)."""

    def __init__(self) -> None:
        self._buf = b""
        self.closed = False

    def receive_data(self, data: bytes) -> tuple[bytes, bytes, bool]:
        self._buf += data
        app: list[bytes] = []
        reply: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise DerpProtocolError("WebSocket frame with reserved bits set")
            if not b1 & 0x80:
                raise DerpProtocolError("unmasked WebSocket frame from a client")
            n = b1 & 0x7F
            hdr = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = struct.unpack_from(">H", buf, pos + 2)[0]
                hdr = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = struct.unpack_from(">Q", buf, pos + 2)[0]
                hdr = 10
            if n > _MAX_MESSAGE:
                raise DerpProtocolError(f"WebSocket frame of {n} bytes is too large")
            end = pos + hdr + 4 + n
            if end > len(buf):
                break
            mask = buf[pos + hdr : pos + hdr + 4]
            payload = _xor(buf[pos + hdr + 4 : end], mask)
            pos = end
            if opcode in (OP_BINARY, OP_CONT, OP_TEXT):
                app.append(payload)
            elif opcode == OP_PING:
                reply.append(encode_ws_frame(OP_PONG, payload[:125]))
            elif opcode == OP_CLOSE:
                reply.append(encode_ws_frame(OP_CLOSE, payload[:2]))
                self.closed = True
                break
            elif opcode != OP_PONG:
                raise DerpProtocolError(f"unknown WebSocket opcode {opcode}")
        self._buf = buf[pos:]
        return b"".join(app), b"".join(reply), self.closed


class WebSocketStream(trio.abc.Stream):
    """Presents the DERP byte stream inside WebSocket binary messages as a plain trio Stream."""

    def __init__(self, transport: trio.abc.Stream, initial: bytes = b"") -> None:
        self.transport = transport
        self._codec = WebSocketCodec()
        self._pending = initial
        self._app = b""  # decoded bytes beyond what the last receive_some could return
        self._send_lock = trio.StrictFIFOLock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self.transport.send_all(encode_ws_frame(OP_BINARY, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = max_bytes or 65536
        while not self._app:
            if self._codec.closed:
                return b""
            data, self._pending = self._pending, b""
            if not data:
                data = await self.transport.receive_some(65536)
                if not data:
                    return b""
            try:
                app, reply, _closed = self._codec.receive_data(data)
            except DerpProtocolError as exc:
                raise trio.BrokenResourceError(f"WebSocket protocol error: {exc}") from exc
            if reply:
                async with self._send_lock:
                    await self.transport.send_all(reply)
            self._app = app
        out, self._app = self._app[:limit], self._app[limit:]
        return out

    async def aclose(self) -> None:
        await self.transport.aclose()
