"""tsnet: give a Python program its own node on a Tailscale-compatible network.

``tsnet.Server`` is the node (trio); ``tsnet.blocking.Server`` the same for threaded programs.
"""

__version__ = "0.1.0.dev0"

from .errors import (  # noqa: E402
    AuthKeyError,
    ConfigError,
    ControlUnreachableError,
    HostNotFoundError,
    NeedsLoginError,
    NotRunningError,
    StateDirInUseError,
    TsnetError,
    UpTimeoutError,
)
from .server import NodeStatus, PingResult, Server, Status, UserProfile, WhoIs  # noqa: E402
from .store import EnvStore, FileStore, MemoryStore, Store, store_from_spec  # noqa: E402

__all__ = [
    "AuthKeyError",
    "ConfigError",
    "ControlUnreachableError",
    "EnvStore",
    "FileStore",
    "HostNotFoundError",
    "MemoryStore",
    "NeedsLoginError",
    "NodeStatus",
    "NotRunningError",
    "PingResult",
    "Server",
    "StateDirInUseError",
    "Status",
    "Store",
    "TsnetError",
    "UpTimeoutError",
    "UserProfile",
    "WhoIs",
    "__version__",
    "store_from_spec",
]
