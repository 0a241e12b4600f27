"""Sans-IO SOCKS5 server handshake (RFC 1928) with username/password auth (RFC 1929).

:class:`Socks5Handshake` consumes client bytes and yields at most one terminal event: :class:`Request`
(the driver dials, then calls :meth:`Socks5Handshake.reply`) or :class:`Rejected` (flush
:meth:`~Socks5Handshake.data_to_send` and close). Also the UDP ASSOCIATE datagram header codec.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from .dialer import (
    SOCKS_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS_COMMAND_NOT_SUPPORTED,
    SOCKS_GENERAL_FAILURE,
    SOCKS_SUCCEEDED,
)

SOCKS_VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation version
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

# A SOCKS4 "request rejected" reply, so SOCKS4 clients fail with a clear message instead of hanging.
_SOCKS4_REJECTED = b"\x00\x5b" + b"\x00" * 6


class Socks5Error(ValueError):
    """Malformed SOCKS5 data (e.g. a bad UDP datagram header)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username/password pair for RFC 1929 (SOCKS5) and Basic proxy auth (HTTP)."""

    username: str
    password: str

    def matches(self, username: bytes, password: bytes) -> bool:
        """Constant-time comparison against received credentials."""
        ok_user = hmac.compare_digest(username, self.username.encode())
        ok_pass = hmac.compare_digest(password, self.password.encode())
        return ok_user and ok_pass


@dataclass(frozen=True, slots=True)
class Request:
    """The client's request: ``command`` is CMD_CONNECT or CMD_UDP_ASSOCIATE; host is an IP or a name."""

    command: int
    host: str
    port: int
    address_type: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The handshake failed; send what is queued, then close. ``reply_code`` is the SOCKS5 code if one was sent."""

    reason: str
    reply_code: int | None = None


Event = Request | Rejected


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    AWAITING_REPLY = "awaiting-reply"
    ESTABLISHED = "established"
    CLOSED = "closed"


def encode_address(host: str, port: int) -> bytes:
    """ATYP + address + port, as in requests, replies and UDP headers."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna") if host else b""
        if not 0 < len(name) < 256:
            raise Socks5Error(f"cannot encode host {host!r}") from None
        return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed + struct.pack("!H", port)


def decode_address(data: bytes | memoryview, pos: int) -> tuple[int, str, int, int] | None:
    """Parse ATYP/address/port at ``pos``: (atyp, host, port, end) or None if more bytes are needed.

    Raises :class:`Socks5Error` for an unknown address type or an undecodable name.
    """
    if len(data) <= pos:
        return None
    atyp = data[pos]
    if atyp == ATYP_IPV4:
        end = pos + 1 + 4
        if len(data) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(data[pos + 1 : end])))
    elif atyp == ATYP_IPV6:
        end = pos + 1 + 16
        if len(data) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(data[pos + 1 : end])))
    elif atyp == ATYP_DOMAIN:
        if len(data) < pos + 2:
            return None
        length = data[pos + 1]
        end = pos + 2 + length
        if len(data) < end + 2:
            return None
        if length == 0:
            raise Socks5Error("empty domain name")
        try:
            host = bytes(data[pos + 2 : end]).decode("ascii")
        except UnicodeDecodeError:
            raise Socks5Error("domain name is not ASCII") from None
        if not host.isprintable() or " " in host:
            raise Socks5Error("domain name has control characters")
    else:
        raise Socks5Error(f"unsupported address type {atyp}")
    port = (data[end] << 8) | data[end + 1]
    return atyp, host, port, end + 2


def build_reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A SOCKS5 reply: VER REP RSV BND.ADDR BND.PORT."""
    return bytes((SOCKS_VERSION, code, 0)) + encode_address(host, port)


class Socks5Handshake:
    """One client's SOCKS5 negotiation, from greeting to the reply (sans-IO).

    ``credentials`` None means "no authentication" (method 0x00); otherwise only RFC 1929 is offered.
    """

    def __init__(self, credentials: Credentials | None = None) -> None:
        self.credentials = credentials
        self._state = _State.GREETING
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self.request: Request | None = None

    @property
    def state(self) -> str:
        """The current state name (for logs and tests)."""
        return self._state.value

    def data_to_send(self) -> bytes:
        """Bytes queued for the client (and forget them)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request (already payload for the established connection)."""
        return bytes(self._buffer) if self._state in (_State.AWAITING_REPLY, _State.ESTABLISHED) else b""

    def receive_data(self, data: bytes) -> Event | None:
        """Feed client bytes. Returns the terminal event once there is one, else None (need more data)."""
        if self._state in (_State.CLOSED, _State.AWAITING_REPLY, _State.ESTABLISHED):
            self._buffer += data  # payload sent ahead of our reply, kept for the driver
            return None
        self._buffer += data
        while True:
            before = self._state
            event = self._step()
            if event is not None or self._state is before:
                return event

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> None:
        """Answer the :class:`Request`: SOCKS_SUCCEEDED establishes the connection, anything else closes it."""
        if self._state is not _State.AWAITING_REPLY:
            raise RuntimeError(f"reply() in state {self._state.value}")
        self._outgoing += build_reply(code, bind_host, bind_port)
        self._state = _State.ESTABLISHED if code == SOCKS_SUCCEEDED else _State.CLOSED

    def _reject(self, reason: str, reply: bytes = b"", code: int | None = None) -> Rejected:
        self._outgoing += reply
        self._state = _State.CLOSED
        self._buffer.clear()
        return Rejected(reason, code)

    def _step(self) -> Event | None:
        buf = self._buffer
        if self._state is _State.GREETING:
            if not buf:
                return None
            if buf[0] != SOCKS_VERSION:
                if buf[0] == 4:
                    return self._reject("SOCKS4 is not supported", _SOCKS4_REJECTED)
                return self._reject(f"bad SOCKS version {buf[0]}", bytes((SOCKS_VERSION, METHOD_NONE_ACCEPTABLE)))
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                return None
            methods = set(buf[2 : 2 + buf[1]])
            del buf[: 2 + buf[1]]
            wanted = METHOD_NO_AUTH if self.credentials is None else METHOD_USERNAME_PASSWORD
            if wanted not in methods:
                return self._reject(
                    "no acceptable authentication method", bytes((SOCKS_VERSION, METHOD_NONE_ACCEPTABLE))
                )
            self._outgoing += bytes((SOCKS_VERSION, wanted))
            self._state = _State.AUTH if self.credentials is not None else _State.REQUEST
            return None
        if self._state is _State.AUTH:
            if not buf:
                return None
            if buf[0] != AUTH_VERSION:
                return self._reject(f"bad auth version {buf[0]}", bytes((AUTH_VERSION, 1)))
            if len(buf) < 2:
                return None
            ulen = buf[1]
            if len(buf) < 3 + ulen:
                return None
            plen = buf[2 + ulen]
            if len(buf) < 3 + ulen + plen:
                return None
            username, password = bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : 3 + ulen + plen])
            del buf[: 3 + ulen + plen]
            assert self.credentials is not None
            if not self.credentials.matches(username, password):
                return self._reject("authentication failed", bytes((AUTH_VERSION, 1)))
            self._outgoing += bytes((AUTH_VERSION, 0))
            self._state = _State.REQUEST
            return None
        # _State.REQUEST
        if len(buf) < 4:
            return None
        if buf[0] != SOCKS_VERSION:
            return self._reject(f"bad request version {buf[0]}", build_reply(SOCKS_GENERAL_FAILURE), 1)
        command = buf[1]
        if buf[3] not in (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6):
            code = SOCKS_ADDRESS_TYPE_NOT_SUPPORTED
            return self._reject(f"unsupported address type {buf[3]}", build_reply(code), code)
        try:
            parsed = decode_address(buf, 3)
        except Socks5Error as exc:
            return self._reject(str(exc), build_reply(SOCKS_GENERAL_FAILURE), SOCKS_GENERAL_FAILURE)
        if parsed is None:
            return None
        atyp, host, port, end = parsed
        del buf[:end]
        if command not in (CMD_CONNECT, CMD_UDP_ASSOCIATE):
            code = SOCKS_COMMAND_NOT_SUPPORTED
            return self._reject(f"unsupported command {command}", build_reply(code), code)
        self._state = _State.AWAITING_REPLY
        self.request = Request(command, host, port, atyp)
        return self.request


@dataclass(frozen=True, slots=True)
class UDPDatagram:
    """A UDP ASSOCIATE datagram: destination (or source, on the way back) and payload."""

    host: str
    port: int
    payload: bytes


def parse_udp_datagram(data: bytes) -> UDPDatagram:
    """Parse RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA. Fragments are refused (we never reassemble)."""
    if len(data) < 4:
        raise Socks5Error("datagram too short")
    if data[2] != 0:
        raise Socks5Error("fragmented datagrams are not supported")
    parsed = decode_address(data, 3)
    if parsed is None:
        raise Socks5Error("datagram header truncated")
    _atyp, host, port, end = parsed
    return UDPDatagram(host, port, data[end:])


def build_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """The header plus ``payload`` for a datagram relayed back to the client."""
    return b"\x00\x00\x00" + encode_address(host, port) + payload
