"""Curve25519 keys in the forms Tailscale uses.

Every key is 32 raw bytes. Public keys have a typed text form (``nodekey:``,
``mkey:``, ``discokey:`` followed by 64 hex digits); private keys all print as
``privkey:`` plus hex. WireGuard's own configuration uses standard base64.
Equality is constant-time so that comparing a received key against a stored
one leaks nothing through timing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from typing import ClassVar, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

__all__ = [
    "KEY_LEN",
    "DiscoPrivate",
    "DiscoPublic",
    "MachinePrivate",
    "MachinePublic",
    "NodePrivate",
    "NodePublic",
    "clamp",
]

KEY_LEN = 32

_K = TypeVar("_K", bound="_Key")


def clamp(raw: bytes) -> bytes:
    """Clamp 32 bytes into an X25519 scalar, as WireGuard and Tailscale do at generation."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class _Key:
    """32 bytes with a typed text prefix. Immutable and hashable."""

    PREFIX: ClassVar[str] = ""
    __slots__ = ("_raw", "_hash")
    _raw: bytes
    _hash: int

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if len(raw) != KEY_LEN:
            raise ValueError(f"{type(self).__name__}: expected {KEY_LEN} raw bytes, got {len(raw)}")
        object.__setattr__(self, "_raw", raw)
        # Keys are dict keys on per-packet paths (peers by node key, DERP sources): hash once.
        object.__setattr__(self, "_hash", hash((type(self).__name__, raw)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def raw(self) -> bytes:
        """The 32 raw key bytes."""
        return self._raw

    def __bytes__(self) -> bytes:
        return self._raw

    @classmethod
    def from_raw(cls: type[_K], raw: bytes) -> _K:
        return cls(raw)

    @classmethod
    def parse(cls: type[_K], text: str) -> _K:
        """Parse the prefixed hex text form (hex digits in either case)."""
        if not isinstance(text, str):
            raise ValueError(f"{cls.__name__}: expected text, got {type(text).__name__}")
        if not text.startswith(cls.PREFIX):
            shown = text.split(":", 1)[0] + ":" if ":" in text else repr(text[:12])
            raise ValueError(f"{cls.__name__}: expected prefix {cls.PREFIX!r}, got {shown}")
        digits = text[len(cls.PREFIX):]
        if len(digits) != 2 * KEY_LEN:
            raise ValueError(f"{cls.__name__}: expected {2 * KEY_LEN} hex digits after {cls.PREFIX!r}, got {len(digits)}")
        try:
            return cls(bytes.fromhex(digits))
        except ValueError:
            raise ValueError(f"{cls.__name__}: {cls.PREFIX!r} must be followed by hex digits only") from None

    @classmethod
    def from_base64(cls: type[_K], text: str | bytes) -> _K:
        """Parse WireGuard's standard base64 form (44 characters with padding)."""
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{cls.__name__}: not valid base64") from None
        if len(raw) != KEY_LEN:
            raise ValueError(f"{cls.__name__}: base64 decodes to {len(raw)} bytes, expected {KEY_LEN}")
        return cls(raw)

    def to_base64(self) -> str:
        return base64.b64encode(self._raw).decode("ascii")

    def hex(self) -> str:
        return self._raw.hex()

    def is_zero(self) -> bool:
        return hmac.compare_digest(self._raw, bytes(KEY_LEN))

    @classmethod
    def zero(cls: type[_K]) -> _K:
        return cls(bytes(KEY_LEN))

    def __str__(self) -> str:
        return self.PREFIX + self._raw.hex()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self})"


class _Public(_Key):
    __slots__ = ()

    def short(self) -> str:
        """A short form for logs, like tailscale's ``[AbCdE]``."""
        return "[" + base64.b64encode(self._raw).decode()[:5] + "]"


class _Private(_Key):
    __slots__ = ("_x25519",)
    PREFIX = "privkey:"
    PUBLIC: ClassVar[type[_Public]]

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        object.__setattr__(self, "_x25519", X25519PrivateKey.from_private_bytes(self._raw))

    @classmethod
    def generate(cls: type[_P]) -> _P:
        return cls(clamp(os.urandom(KEY_LEN)))

    @property
    def public(self) -> _Public:
        """The matching public key, typed for this key's role."""
        return self.PUBLIC(self._x25519.public_key().public_bytes_raw())

    def exchange(self, peer: _Public | bytes) -> bytes:
        """X25519 shared secret; raises ValueError when the result is all zeros."""
        raw = peer.raw if isinstance(peer, _Key) else bytes(peer)
        return self._x25519.exchange(X25519PublicKey.from_public_bytes(raw))

    def __repr__(self) -> str:
        # Never print secrets in logs or tracebacks.
        return f"{type(self).__name__}(public={self.public})"


_P = TypeVar("_P", bound=_Private)


class NodePublic(_Public):
    """A node's WireGuard public key (``nodekey:``)."""

    __slots__ = ()
    PREFIX = "nodekey:"


class MachinePublic(_Public):
    """A machine's Noise static public key, used with control (``mkey:``)."""

    __slots__ = ()
    PREFIX = "mkey:"


class DiscoPublic(_Public):
    """A node's disco public key (``discokey:``)."""

    __slots__ = ()
    PREFIX = "discokey:"


class NodePrivate(_Private):
    """A node's WireGuard private key."""

    __slots__ = ()
    PUBLIC = NodePublic

    @property
    def public(self) -> NodePublic:
        return NodePublic(self._x25519.public_key().public_bytes_raw())


class MachinePrivate(_Private):
    """A machine's Noise static private key."""

    __slots__ = ()
    PUBLIC = MachinePublic

    @property
    def public(self) -> MachinePublic:
        return MachinePublic(self._x25519.public_key().public_bytes_raw())


class DiscoPrivate(_Private):
    """A node's disco private key."""

    __slots__ = ()
    PUBLIC = DiscoPublic

    @property
    def public(self) -> DiscoPublic:
        return DiscoPublic(self._x25519.public_key().public_bytes_raw())
