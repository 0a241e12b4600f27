"""The tsnet network-namespace lab: isolated namespaces, veth links, NATs, real peers.

Import as ``tests.lab`` (tests/conftest.py puts the repository root on sys.path).
Needs root. See :class:`tests.lab.netns.Lab` for the main entry point; the
pytest fixtures ``lab`` and ``tailscale_binaries`` live in tests/conftest.py.
"""

from .netns import Lab, LabError, LabProcess, Link, Namespace, wait_until
from .nssocket import run_in_namespace, socket_in_namespace
from .tailscaled import TAILSCALE_VERSION, TailscaleBinaries, ensure_tailscale_binaries, start_tailscaled, tailscaled_command
from .uapi import PeerConfig, PeerStatus, UAPIError, uapi_get, uapi_set
from .wireguard_go import WireGuardGo, start_wireguard_go

__all__ = [
    "TAILSCALE_VERSION",
    "Lab",
    "LabError",
    "LabProcess",
    "Link",
    "Namespace",
    "PeerConfig",
    "PeerStatus",
    "TailscaleBinaries",
    "UAPIError",
    "WireGuardGo",
    "ensure_tailscale_binaries",
    "run_in_namespace",
    "socket_in_namespace",
    "start_tailscaled",
    "start_wireguard_go",
    "tailscaled_command",
    "uapi_get",
    "uapi_set",
    "wait_until",
]
