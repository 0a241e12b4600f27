"""A small client for the WireGuard cross-platform userspace API (UAPI).

wireguard-go listens on a Unix socket ``/var/run/wireguard/<ifname>.sock``.
A request is ``get=1`` or ``set=1`` followed by ``key=value`` lines and an empty
line; the reply is (for get) ``key=value`` lines, then ``errno=N`` and an empty
line. Keys are lowercase hex. Peer sections start at each ``public_key=`` line.
Talking UAPI directly means the lab does not need wireguard-tools (``wg``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PeerConfig", "PeerStatus", "UAPIError", "DeviceStatus", "uapi_get", "uapi_request", "uapi_set"]

SOCKET_DIR = Path("/var/run/wireguard")
_REPLY_END = re.compile(rb"(?:^|\n)errno=-?\d+\n\n$")


class UAPIError(RuntimeError):
    """The device answered with a non-zero errno (or garbage)."""


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A peer to configure: ``endpoint`` is ``"ip:port"`` or None; ``allowed_ips`` are CIDR strings."""

    public_key: bytes
    allowed_ips: Sequence[str] = ()
    endpoint: str | None = None
    persistent_keepalive: int = 0
    replace_allowed_ips: bool = True

    def uapi_lines(self) -> list[str]:
        lines = [f"public_key={self.public_key.hex()}"]
        if self.endpoint is not None:
            lines.append(f"endpoint={self.endpoint}")
        lines.append(f"persistent_keepalive_interval={self.persistent_keepalive}")
        if self.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={cidr}" for cidr in self.allowed_ips]
        return lines


@dataclass(slots=True)
class PeerStatus:
    """One peer as reported by ``get=1``."""

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake_sec: int = 0
    last_handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0

    @property
    def last_handshake(self) -> float:
        """Wall-clock time of the last handshake (0.0 if none)."""
        return self.last_handshake_sec + self.last_handshake_nsec / 1e9


@dataclass(slots=True)
class DeviceStatus:
    listen_port: int = 0
    public_key_of_private: bytes | None = None
    peers: list[PeerStatus] = field(default_factory=list)

    def peer(self, public_key: bytes) -> PeerStatus:
        for p in self.peers:
            if p.public_key == public_key:
                return p
        raise KeyError(public_key.hex())


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


def uapi_request(path: str | Path, request: str, timeout: float = 5.0) -> list[tuple[str, str]]:
    """Send one request (without the final blank line), return the reply's key/value pairs minus errno.

    Raises :class:`UAPIError` if errno is not 0.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(request.rstrip("\n").encode() + b"\n\n")
        buf = b""
        while not _REPLY_END.search(buf):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    pairs: list[tuple[str, str]] = []
    errno = None
    for line in buf.decode().splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UAPIError(f"malformed UAPI line {line!r}")
        if key == "errno":
            errno = int(value)
        else:
            pairs.append((key, value))
    if errno is None:
        raise UAPIError(f"no errno in UAPI reply {buf!r}")
    if errno != 0:
        raise UAPIError(f"UAPI request failed with errno={errno}: {request.splitlines()[:3]}")
    return pairs


def uapi_set(
    path: str | Path,
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    replace_peers: bool = False,
    peers: Iterable[PeerConfig] = (),
    remove_peers: Iterable[bytes] = (),
) -> None:
    """Apply a ``set=1`` transaction."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for peer in peers:
        lines += peer.uapi_lines()
    for pub in remove_peers:
        lines += [f"public_key={pub.hex()}", "remove=true"]
    uapi_request(path, "\n".join(lines))


def uapi_get(path: str | Path) -> DeviceStatus:
    """Read the device state with ``get=1``."""
    status = DeviceStatus()
    peer: PeerStatus | None = None
    for key, value in uapi_request(path, "get=1"):
        if key == "public_key":
            peer = PeerStatus(bytes.fromhex(value))
            status.peers.append(peer)
        elif peer is None:
            if key == "listen_port":
                status.listen_port = int(value)
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            peer.last_handshake_sec = int(value)
        elif key == "last_handshake_time_nsec":
            peer.last_handshake_nsec = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value)
    return status
