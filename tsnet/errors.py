"""Public exception classes of :mod:`tsnet`.

Every error the public API raises on purpose is a :class:`TsnetError`, so one ``except
tsnet.TsnetError`` catches them all. A few also subclass a builtin so existing handlers keep
working: :class:`UpTimeoutError` is a ``TimeoutError`` and :class:`HostNotFoundError` a
``socket.gaierror``. Connection failures on the tailnet itself are the builtin
``ConnectionRefusedError`` / ``ConnectionResetError`` / ``TimeoutError`` that the netstack
raises, as for ordinary sockets.
"""

from __future__ import annotations

import socket

__all__ = [
    "AuthKeyError",
    "ConfigError",
    "ControlUnreachableError",
    "HostNotFoundError",
    "NeedsLoginError",
    "NotRunningError",
    "StateDirInUseError",
    "TsnetError",
    "UpTimeoutError",
]


class TsnetError(Exception):
    """Base class of every error tsnet raises on purpose."""


class ConfigError(TsnetError, ValueError):
    """A setting is invalid or settings contradict each other (e.g. memory state without ``ephemeral``)."""


class AuthKeyError(TsnetError):
    """The control server refused the login: the auth key is wrong, expired, revoked or already used."""


class ControlUnreachableError(TsnetError):
    """The control server could not be reached (refused, unresolvable, TLS or protocol failure)."""


class UpTimeoutError(TsnetError, TimeoutError):
    """``up()`` did not reach the Running state within its timeout."""


class NeedsLoginError(TsnetError):
    """The node needs interactive login: open :attr:`login_url` (or pass an auth key).

    The login keeps waiting in the background; call ``up()`` again after approving it.
    """

    def __init__(self, message: str, login_url: str) -> None:
        super().__init__(message)
        self.login_url = login_url


class StateDirInUseError(TsnetError):
    """Another ``Server`` (in this or another process) holds the lock on this state directory."""


class NotRunningError(TsnetError):
    """The operation needs a running node: call ``up()`` first (or the server was closed)."""


class HostNotFoundError(TsnetError, socket.gaierror):
    """A name did not resolve: not a tailnet name (MagicDNS) and not found upstream."""

    def __init__(self, host: str, why: str = "name not found") -> None:
        socket.gaierror.__init__(self, socket.EAI_NONAME, f"{host}: {why}")
        self.host = host
