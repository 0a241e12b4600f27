"""DERP over WebSocket (subprotocol derp)."""

import base64
import os

import pytest
import trio

from test_derp_live import next_of, plain_node, start_client, start_server
from tsnet.derp import frames as f
from tsnet.derp.client_core import DerpClientProtocol, ReceivedPacket, ServerInfoReceived
from tsnet.derp.websocket import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, WebSocketCodec, accept_key, encode_ws_frame
from tsnet.key import NodePrivate

MASK = b"\x01\x02\x03\x04"


def test_accept_key_rfc6455_example():
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_codec_unmasks_answers_ping_and_close():
    codec = WebSocketCodec()
    wire = encode_ws_frame(OP_BINARY, b"derp bytes", MASK) + encode_ws_frame(OP_PING, b"hi", MASK)
    app, reply, closed = codec.receive_data(wire[:5])
    assert (app, reply, closed) == (b"", b"", False)
    app, reply, closed = codec.receive_data(wire[5:])
    assert app == b"derp bytes" and reply == encode_ws_frame(OP_PONG, b"hi") and not closed
    big = os.urandom(70_000)
    assert codec.receive_data(encode_ws_frame(OP_BINARY, big, MASK))[0] == big
    app, reply, closed = codec.receive_data(encode_ws_frame(OP_CLOSE, b"\x03\xe8", MASK))
    assert closed and reply == encode_ws_frame(OP_CLOSE, b"\x03\xe8")


def test_codec_rejects_unmasked_client_frames():
    with pytest.raises(f.DerpProtocolError):
        WebSocketCodec().receive_data(encode_ws_frame(OP_BINARY, b"x"))


async def test_websocket_client_talks_to_plain_client():
    async with trio.open_nursery() as n:
        server, port = await start_server(n)
        plain = await start_client(n, plain_node(port))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        await stream.send_all(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
        )
        buf = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(4096)
        head, rest = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Accept: " + accept_key(key) in head
        assert b"Sec-WebSocket-Protocol: derp" in head
        ws_key = NodePrivate.generate()
        proto = DerpClientProtocol(ws_key, 0.0)
        pending = rest

        async def pump_until(cls):
            nonlocal pending
            while True:
                # Server frames are unmasked binary messages; strip the 2/4-byte headers.
                while len(pending) >= 2:
                    n_ = pending[1] & 0x7F
                    hdr = 2 if n_ < 126 else 4
                    size = n_ if n_ < 126 else int.from_bytes(pending[2:4], "big")
                    if len(pending) < hdr + size:
                        break
                    events = proto.receive_data(pending[hdr : hdr + size], 0.0)
                    pending = pending[hdr + size :]
                    out = proto.data_to_send()
                    if out:
                        await stream.send_all(encode_ws_frame(OP_BINARY, out, MASK))
                    for ev in events:
                        if isinstance(ev, cls):
                            return ev
                pending += await stream.receive_some(65536)

        with trio.fail_after(5):
            await pump_until(ServerInfoReceived)
            proto.send_packet(plain.private_key.public, b"from websocket", 0.0)
            await stream.send_all(encode_ws_frame(OP_BINARY, proto.data_to_send(), MASK))
            assert (await next_of(plain, ReceivedPacket)).packet == b"from websocket"
            plain.send(ws_key.public, b"to websocket")
            assert (await pump_until(ReceivedPacket)).packet == b"to websocket"
        await stream.aclose()
        n.cancel_scope.cancel()
