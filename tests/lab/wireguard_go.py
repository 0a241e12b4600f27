"""Run Debian's wireguard-go on a TUN device inside a lab namespace and configure it over UAPI."""

from __future__ import annotations

import ipaddress
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .netns import LabError, LabProcess, Namespace, wait_until
from .uapi import DeviceStatus, PeerConfig, PeerStatus, socket_path, uapi_get, uapi_set

__all__ = ["WireGuardGo", "start_wireguard_go", "wireguard_go_binary"]


def wireguard_go_binary() -> str:
    """Path of the wireguard-go binary; raises :class:`LabError` if it is not installed."""
    path = shutil.which("wireguard-go")
    if path is None:
        raise LabError("wireguard-go is not installed (Debian package wireguard-go)")
    return path


@dataclass(eq=False)
class WireGuardGo:
    """A running wireguard-go device ``ifname`` in ``ns``."""

    ns: Namespace
    ifname: str
    process: LabProcess
    uapi_path: Path
    private_key: bytes
    listen_port: int

    def configure(
        self,
        *,
        peers: Iterable[PeerConfig] = (),
        replace_peers: bool = False,
        remove_peers: Iterable[bytes] = (),
        listen_port: int | None = None,
    ) -> None:
        """Add/replace/remove peers (and optionally change the listen port) over UAPI."""
        uapi_set(self.uapi_path, listen_port=listen_port, replace_peers=replace_peers, peers=peers, remove_peers=remove_peers)
        if listen_port is not None:
            self.listen_port = listen_port

    def status(self) -> DeviceStatus:
        return uapi_get(self.uapi_path)

    def peer(self, public_key: bytes) -> PeerStatus:
        return self.status().peer(public_key)

    def wait_handshake_after(self, public_key: bytes, after: float, timeout: float = 10.0) -> PeerStatus:
        """Wait until the peer's last-handshake time is later than ``after`` (wall clock)."""
        return wait_until(
            lambda: (p := self.peer(public_key)).last_handshake > after and p,
            timeout,
            f"a handshake with {public_key.hex()[:8]} on {self.ifname}",
            interval=0.02,
        )

    def log(self) -> str:
        return self.process.log()


def start_wireguard_go(
    ns: Namespace,
    *,
    private_key: bytes,
    address: ipaddress.IPv4Interface | str,
    listen_port: int = 51820,
    mtu: int = 1280,
    peers: Iterable[PeerConfig] = (),
    ifname: str | None = None,
    timeout: float = 10.0,
) -> WireGuardGo:
    """Start ``wireguard-go -f`` in ``ns``, configure it, give the TUN an address and MTU, bring it up.

    The UAPI socket path is global (not per namespace), so the interface name
    comes from the lab's unique naming. The process and the socket file are
    cleaned up by the lab's teardown.
    """
    binary = wireguard_go_binary()
    ifname = ifname or ns.lab.ifname("wg")
    path = socket_path(ifname)
    ns.lab.add_cleanup(lambda: path.unlink(missing_ok=True))
    proc = ns.popen([binary, "-f", ifname], env={"LOG_LEVEL": "debug", "WG_PROCESS_FOREGROUND": "1"})

    def ready() -> bool:
        if proc.poll() is not None:
            raise LabError(f"wireguard-go exited with {proc.poll()}: {proc.log()}")
        if not path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
        except OSError:
            return False
        return True

    wait_until(ready, timeout, f"wireguard-go UAPI socket {path}")
    uapi_set(path, private_key=private_key, listen_port=listen_port, replace_peers=True, peers=peers)
    ns.ip("addr", "add", str(ipaddress.IPv4Interface(address)), "dev", ifname)
    ns.ip("link", "set", ifname, "mtu", str(mtu), "up")
    return WireGuardGo(ns, ifname, proc, path, private_key, listen_port)
