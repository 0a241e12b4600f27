"""trio driver for the ts2021 byte stream: Noise records over a TCP stream.

:class:`NoiseStream` is a ``trio.abc.Stream`` of plaintext on top of a transport
stream and a :class:`~tsnet.control.noise.NoiseTransport`. :func:`dial` is the
client half (HTTP upgrade, Noise initiator, early-payload sniff); :func:`accept`
is the server half once an HTTP server has validated a ``/ts2021`` request.
"""

from __future__ import annotations

import trio

from ..key import MachinePrivate, MachinePublic
from . import controlhttp, tailcfg
from .noise import RESPONSE_LEN, HandshakeError, Initiator, NoiseError, NoiseTransport, respond

__all__ = ["NoiseStream", "dial", "accept", "DialResult"]

_READ = 65536


class NoiseStream(trio.abc.Stream):
    """Plaintext stream over Noise transport records."""

    def __init__(self, transport_stream: trio.abc.Stream, noise: NoiseTransport, *, pushback: bytes = b"") -> None:
        self.transport_stream = transport_stream
        self.noise = noise
        self._pushback = bytearray(pushback)
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False

    @property
    def peer(self) -> MachinePublic:
        """The authenticated static key of the other side."""
        return self.noise.peer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("noise stream closed")
        wire = self.noise.seal(data)
        async with self._send_lock:
            await self.transport_stream.send_all(wire)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pushback:
            n = len(self._pushback) if max_bytes is None else min(max_bytes, len(self._pushback))
            out = bytes(self._pushback[:n])
            del self._pushback[:n]
            return out
        while True:
            data = await self.transport_stream.receive_some(_READ)
            if not data:
                if self.noise.pending:
                    raise NoiseError("connection closed inside a record")
                return b""
            plain = self.noise.receive(data)
            if plain:
                if max_bytes is not None and len(plain) > max_bytes:
                    self._pushback += plain[max_bytes:]
                    plain = plain[:max_bytes]
                return plain

    async def aclose(self) -> None:
        self._closed = True
        await self.transport_stream.aclose()


class DialResult:
    """A connected client: the plaintext stream and the server's early payload, if any."""

    def __init__(self, stream: NoiseStream, early: tailcfg.EarlyNoise | None) -> None:
        self.stream = stream
        self.early = early


async def _receive_exactly(stream: trio.abc.Stream, buf: bytearray, n: int) -> None:
    while len(buf) < n:
        data = await stream.receive_some(_READ)
        if not data:
            raise controlhttp.UpgradeError("connection closed during upgrade")
        buf += data


async def handshake_over(
    stream: trio.abc.Stream,
    *,
    host: str,
    machine_key: MachinePrivate,
    server_key: MachinePublic,
    version: int = tailcfg.CURRENT_CAPABILITY_VERSION,
) -> DialResult:
    """Run the client upgrade and handshake over an already connected stream."""
    init = Initiator(machine_key, server_key, version)
    await stream.send_all(controlhttp.build_upgrade_request(host, init.initiation))
    buf = bytearray()
    while True:
        split = controlhttp.split_head(buf)
        if split is not None:
            break
        data = await stream.receive_some(_READ)
        if not data:
            raise controlhttp.UpgradeError("connection closed before the upgrade response")
        buf += data
    head, rest = split
    controlhttp.parse_upgrade_response_head(head)
    buf = bytearray(rest)
    await _receive_exactly(stream, buf, 3)
    if buf[0] == 3:  # error record: type, length, text
        await _receive_exactly(stream, buf, 3 + int.from_bytes(buf[1:3], "big"))
        init.finish(bytes(buf))  # raises HandshakeError with the server's text
    await _receive_exactly(stream, buf, RESPONSE_LEN)
    transport = init.finish(bytes(buf[:RESPONSE_LEN]))
    noise_stream = NoiseStream(stream, transport)
    leftover = bytes(buf[RESPONSE_LEN:])
    sniffer = controlhttp.EarlyPayloadSniffer()
    if leftover:
        sniffer.feed(transport.receive(leftover))
    while not sniffer.done:
        data = await stream.receive_some(_READ)
        if not data:
            raise controlhttp.UpgradeError("connection closed before HTTP/2 began")
        plain = transport.receive(data)
        if plain:
            sniffer.feed(plain)
    noise_stream._pushback += sniffer.rest
    return DialResult(noise_stream, sniffer.early)


async def dial(
    host: str,
    port: int,
    *,
    machine_key: MachinePrivate,
    server_key: MachinePublic,
    version: int = tailcfg.CURRENT_CAPABILITY_VERSION,
) -> DialResult:
    """Connect over plain TCP to ``host:port`` and establish ts2021."""
    tcp = await trio.open_tcp_stream(host, port)
    try:
        hostport = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            hostport = f"[{host}]:{port}"
        return await handshake_over(tcp, host=hostport, machine_key=machine_key, server_key=server_key, version=version)
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise


async def accept(
    stream: trio.abc.Stream,
    initiation: bytes,
    server_key: MachinePrivate,
    *,
    leftover: bytes = b"",
    early: tailcfg.EarlyNoise | None = None,
) -> NoiseStream:
    """Server side after a valid upgrade request: write 101 + response (+ early payload).

    On a handshake failure an error record is sent (for malformed headers) or the
    connection is simply closed (authentication failure), and HandshakeError raised.
    """
    try:
        done = respond(server_key, initiation)
    except HandshakeError as exc:
        out = controlhttp.upgrade_response_head()
        if "authentication" not in str(exc):
            from .noise import error_record

            out += error_record(str(exc))
        try:
            await stream.send_all(out)
        finally:
            await trio.aclose_forcefully(stream)
        raise
    out = controlhttp.upgrade_response_head() + done.response
    if early is not None:
        out += done.transport.seal(controlhttp.encode_early_payload(early))
    await stream.send_all(out)
    result = NoiseStream(stream, done.transport)
    if leftover:
        result._pushback += done.transport.receive(leftover)
    return result
