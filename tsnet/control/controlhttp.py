"""controlhttp: the HTTP/1.1 upgrade to ``tailscale-control-protocol`` and the early payload.

Sans-IO helpers for both sides:

* client: :func:`build_upgrade_request`, :func:`parse_upgrade_response_head`;
* server: :func:`check_upgrade_request`, :func:`upgrade_response_head`;
* the optional early payload the server sends inside Noise before HTTP/2:
  :func:`encode_early_payload` and :class:`EarlyPayloadSniffer`.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

from . import tailcfg
from .noise import INITIATION_LEN

__all__ = [
    "UPGRADE_PROTOCOL",
    "HANDSHAKE_HEADER",
    "EARLY_PAYLOAD_MAGIC",
    "MAX_EARLY_PAYLOAD",
    "UpgradeError",
    "UpgradeRejected",
    "build_upgrade_request",
    "parse_upgrade_response_head",
    "check_upgrade_request",
    "upgrade_response_head",
    "encode_early_payload",
    "EarlyPayloadSniffer",
]

UPGRADE_PROTOCOL = "tailscale-control-protocol"
HANDSHAKE_HEADER = "X-Tailscale-Handshake"
EARLY_PAYLOAD_MAGIC = b"\xff\xff\xffTS"
MAX_EARLY_PAYLOAD = 10 << 20
_MAX_HEAD = 64 * 1024


class UpgradeError(Exception):
    """The upgrade failed on the client side (bad status, bad headers, bad early payload)."""


@dataclass(frozen=True, slots=True)
class UpgradeRejected:
    """Server-side verdict that an upgrade request is invalid: answer ``status`` with ``reason``."""

    status: int
    reason: str


def build_upgrade_request(host: str, initiation: bytes, path: str = "/ts2021") -> bytes:
    """The complete HTTP/1.1 request a client writes to start ts2021 (no body)."""
    encoded = base64.b64encode(initiation).decode("ascii")
    return (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: tsnet-py\r\n"
        f"Upgrade: {UPGRADE_PROTOCOL}\r\n"
        f"Connection: upgrade\r\n"
        f"{HANDSHAKE_HEADER}: {encoded}\r\n"
        f"Content-Length: 0\r\n"
        f"\r\n"
    ).encode("ascii")


def split_head(buffer: bytes | bytearray) -> tuple[bytes, bytes] | None:
    """Split ``buffer`` after the blank line ending an HTTP head, or None if incomplete."""
    end = bytes(buffer).find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > _MAX_HEAD:
            raise UpgradeError("HTTP response head too large")
        return None
    return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])


def parse_upgrade_response_head(head: bytes) -> None:
    """Check a server's response head: must be ``101`` with our Upgrade and ``Connection: upgrade``."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise UpgradeError("undecodable response head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise UpgradeError(f"not an HTTP/1 response: {lines[0][:80]!r}")
    if parts[1] != "101":
        raise UpgradeError(f"unexpected HTTP response: {lines[0][:120]}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise UpgradeError(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade") != UPGRADE_PROTOCOL:
        raise UpgradeError(f"server switched to unexpected protocol {headers.get('upgrade')!r}")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "upgrade" not in tokens:
        raise UpgradeError("101 response lacks Connection: upgrade")


def check_upgrade_request(method: str, headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> bytes | UpgradeRejected:
    """Validate a ``/ts2021`` request; return the 101-byte initiation or a rejection."""
    found: dict[str, str] = {}
    for name, value in headers:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        found[n.lower()] = v
    upgrade = found.get("upgrade", "").strip().lower()
    if not upgrade:
        return UpgradeRejected(400, "missing Upgrade header")
    if upgrade == "websocket":
        return UpgradeRejected(400, "WebSocket control transport is not supported")
    if upgrade != UPGRADE_PROTOCOL:
        return UpgradeRejected(400, f"unknown Upgrade protocol {upgrade!r}")
    if method.upper() not in ("POST", "GET"):
        return UpgradeRejected(405, "method not allowed")
    encoded = found.get(HANDSHAKE_HEADER.lower())
    if not encoded:
        return UpgradeRejected(400, f"missing {HANDSHAKE_HEADER} header")
    try:
        initiation = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return UpgradeRejected(400, f"bad base64 in {HANDSHAKE_HEADER}")
    if len(initiation) != INITIATION_LEN:
        return UpgradeRejected(400, f"handshake is {len(initiation)} bytes, want {INITIATION_LEN}")
    return initiation


def upgrade_response_head() -> bytes:
    """The 101 head a server writes before the Noise response."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        f"Upgrade: {UPGRADE_PROTOCOL}\r\n"
        "Connection: upgrade\r\n"
        "\r\n"
    ).encode("ascii")


def encode_early_payload(early: tailcfg.EarlyNoise) -> bytes:
    """Plaintext of the early payload: magic, big-endian length, JSON."""
    body = tailcfg.dumps(early)
    return EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(body)) + body


class EarlyPayloadSniffer:
    """Client side: decide whether the first plaintext bytes are an early payload.

    Feed decrypted bytes to :meth:`feed` until :attr:`done`; then :attr:`early`
    holds the parsed payload (or None) and :attr:`rest` the bytes that belong to HTTP/2.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False
        self.early: tailcfg.EarlyNoise | None = None
        self.rest = b""

    def feed(self, data: bytes) -> None:
        if self.done:
            raise UpgradeError("sniffer already finished")
        self._buf += data
        if len(self._buf) < 9:
            return
        if bytes(self._buf[:5]) != EARLY_PAYLOAD_MAGIC:
            self.done, self.rest = True, bytes(self._buf)
            return
        (length,) = struct.unpack_from(">I", self._buf, 5)
        if length > MAX_EARLY_PAYLOAD:
            raise UpgradeError(f"early payload of {length} bytes is too large")
        if len(self._buf) < 9 + length:
            return
        body = bytes(self._buf[9 : 9 + length])
        try:
            json.loads(body)
            self.early = tailcfg.decode(tailcfg.EarlyNoise, body)
        except ValueError as exc:
            raise UpgradeError(f"bad early payload: {exc}") from None
        self.done, self.rest = True, bytes(self._buf[9 + length :])
