"""The tsnet network-namespace lab: isolated namespaces, veth links, NATs, real peers.

Import as ``tests.lab`` (tests/conftest.py puts the repository root on sys.path).
Needs root. The pytest fixtures ``lab`` and ``tailscale_binaries`` live in
tests/conftest.py; everything a lab creates is removed at teardown, pass or fail.

A tour::

    def test_something(lab):                        # or: with Lab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.link(a, b, ipv6=True)            # veth, a=.1 b=.2 in a fresh /24 (+ ULA /64)
        router, lan, wan = lab.router("nat", lab.namespace("c"), b, nat="hard")  # c behind a NAT
        b.random_loss(0.1, chain="INPUT")           # iptables statistic DROP
        sock = a.socket()                           # a Python UDP socket living inside namespace a
        proc = a.popen(["some-daemon", "-f"])       # killed at teardown; proc.log() for output
        wg = start_wireguard_go(a, private_key=..., address="10.x.y.1/24", peers=[PeerConfig(...)])
        wg.status().peer(pub).last_handshake       # UAPI, no wireguard-tools needed
        a.assert_isolated()                         # no route leaves the lab (checked by start_tailscaled)

Modules: ``netns`` (Lab, Namespace, Link, processes, iptables, sweeping of dead
runs), ``nssocket`` (setns sockets), ``uapi`` (WireGuard UAPI client),
``wireguard_go``, ``tailscaled`` (1.96.4 binaries and command line), ``packets``
(IPv4/ICMP/UDP builders and parsers for tests).
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
