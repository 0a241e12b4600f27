"""Create sockets inside another network namespace from this process.

Linux keeps the network namespace per thread and a socket belongs to the
namespace of the thread that created it, for its whole life. So a helper
thread enters the namespace with ``setns(2)``, creates the socket and exits;
the socket can then be used from any thread (or wrapped for trio) and all its
traffic stays in that namespace. The calling thread's namespace never changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["CLONE_NEWNET", "run_in_namespace", "socket_in_namespace"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int

_T = TypeVar("_T")


def _enter(netns: str | os.PathLike[str]) -> None:
    path = Path(netns) if os.sep in str(netns) else NETNS_DIR / str(netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_namespace(netns: str | os.PathLike[str], fn: Callable[[], _T]) -> _T:
    """Run ``fn()`` in a fresh thread that has entered network namespace ``netns`` (a name or path); return its result.

    Anything created by ``fn`` that is bound to a namespace at creation
    (sockets) stays in ``netns`` after the thread is gone.
    """
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            _enter(netns)
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def socket_in_namespace(
    netns: str | os.PathLike[str], family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A new stdlib socket that lives in network namespace ``netns`` (name under /var/run/netns, or a path)."""
    return run_in_namespace(netns, lambda: socket.socket(family, type, proto))
