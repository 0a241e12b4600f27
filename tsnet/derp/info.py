"""ClientInfo / ServerInfo bodies and the NaCl box that carries them.

Sealed form on the wire is ``nonce(24) || tag(16) || ciphertext``, exactly what
PyNaCl's ``Box.encrypt`` produces. JSON is decoded leniently (keys compared
case-insensitively, unknown keys ignored) the way Go's ``encoding/json`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from .frames import NONCE_LEN, PROTOCOL_VERSION, DerpProtocolError

__all__ = ["ClientInfo", "ServerInfo", "open_from", "seal_to"]


def seal_to(private: bytes, peer_public: bytes, message: bytes, nonce: bytes | None = None) -> bytes:
    """NaCl-box ``message`` from ``private`` to ``peer_public``; returns ``nonce || box``."""
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    return bytes(Box(PrivateKey(private), PublicKey(peer_public)).encrypt(message, nonce))


def open_from(private: bytes, peer_public: bytes, sealed: bytes) -> bytes:
    """Open ``nonce || box``; raises :class:`DerpProtocolError` if it does not authenticate."""
    if len(sealed) < NONCE_LEN + 16:
        raise DerpProtocolError(f"sealed message of {len(sealed)} bytes is too short")
    try:
        return bytes(Box(PrivateKey(private), PublicKey(peer_public)).decrypt(bytes(sealed)))
    except CryptoError:
        raise DerpProtocolError("NaCl box did not authenticate (wrong key or corrupted)") from None


def _lenient_json(raw: bytes, what: str) -> dict:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DerpProtocolError(f"{what}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DerpProtocolError(f"{what}: JSON is not an object")
    return {str(k).lower(): v for k, v in obj.items()}


def _int(value: object, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise DerpProtocolError(f"{what} must be an integer")
    return value


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client tells the server in its ClientInfo frame."""

    version: int = PROTOCOL_VERSION
    mesh_key: bytes | None = None
    can_ack_pings: bool = True
    is_prober: bool = False

    def to_json(self) -> bytes:
        """Go field order and omitempty rules, so tailscaled's form is reproduced byte for byte."""
        obj: dict[str, object] = {}
        if self.mesh_key:
            obj["meshKey"] = self.mesh_key.hex()
        if self.version:
            obj["version"] = self.version
        obj["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            obj["IsProber"] = True
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfo:
        obj = _lenient_json(raw, "ClientInfo")
        mesh_key = None
        mk = obj.get("meshkey")
        if mk:
            if not isinstance(mk, str):
                raise DerpProtocolError("ClientInfo meshKey must be a string")
            try:
                mesh_key = bytes.fromhex(mk.removeprefix("mesh:"))
            except ValueError:
                raise DerpProtocolError("ClientInfo meshKey is not hex") from None
            if len(mesh_key) != 32:
                # derper refuses the ClientInfo (and so the connection) over a mis-sized mesh key.
                raise DerpProtocolError("ClientInfo meshKey must be 64 hex digits")
        return cls(
            version=_int(obj.get("version"), "ClientInfo version"),
            mesh_key=mesh_key,
            can_ack_pings=bool(obj.get("canackpings", False)),
            is_prober=bool(obj.get("isprober", False)),
        )


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server tells an accepted client. A non-zero token bucket asks the client to pace itself."""

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        obj: dict[str, object] = {}
        if self.version:
            obj["version"] = self.version
        if self.token_bucket_bytes_per_second:
            obj["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            obj["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        obj = _lenient_json(raw, "ServerInfo")
        return cls(
            version=_int(obj.get("version"), "ServerInfo version"),
            token_bucket_bytes_per_second=_int(obj.get("tokenbucketbytespersecond"), "TokenBucketBytesPerSecond"),
            token_bucket_bytes_burst=_int(obj.get("tokenbucketbytesburst"), "TokenBucketBytesBurst"),
        )
