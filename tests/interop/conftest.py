"""Fixtures for interop tests against real peers in lab namespaces.

``wireguard_go_setup``: two namespaces joined by a veth pair. In ``wg`` runs
Debian's wireguard-go on a TUN (MTU 1280, overlay ``.1/24``); in ``py`` lives
the Python peer, whose UDP socket is created inside that namespace with the
setns trick. wireguard-go knows our key, our overlay ``.2/32`` and our endpoint.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.lab import Lab, Namespace, PeerConfig, WireGuardGo, start_wireguard_go
from tsnet.key import NodePrivate, NodePublic

WG_PORT = 51820


@dataclass(eq=False)
class WireGuardGoSetup:
    lab: Lab
    wg_ns: Namespace
    py_ns: Namespace
    wg: WireGuardGo
    wg_public: NodePublic  # wireguard-go's static key
    our_private: NodePrivate
    wg_endpoint: tuple[str, int]  # wireguard-go's UDP address, as recvfrom reports it
    our_ip: ipaddress.IPv4Address  # link address of the py namespace
    wg_overlay: ipaddress.IPv4Address  # tunnel address of wireguard-go's TUN
    our_overlay: ipaddress.IPv4Address  # our tunnel address
    our_port: int

    def our_socket(self, port: int = 0) -> socket.socket:
        """A UDP socket in the py namespace bound to our link address."""
        sock = self.py_ns.socket()
        sock.bind((str(self.our_ip), port))
        return sock


@pytest.fixture
def wireguard_go_setup(lab: Lab) -> Iterator[WireGuardGoSetup]:
    wg_ns, py_ns = lab.namespace("wg"), lab.namespace("py")
    link = lab.link(wg_ns, py_ns)
    overlay = lab.subnet()
    wg_private, our_private = NodePrivate.generate(), NodePrivate.generate()
    # Reserve our port now so wireguard-go can be told our endpoint (for tests where it initiates).
    probe = py_ns.socket()
    probe.bind((str(link.b_addr), 0))
    our_port = probe.getsockname()[1]
    probe.close()
    wg = start_wireguard_go(
        wg_ns,
        private_key=wg_private.raw,
        address=f"{overlay[1]}/24",
        listen_port=WG_PORT,
        peers=[PeerConfig(our_private.public.raw, allowed_ips=[f"{overlay[2]}/32"], endpoint=f"{link.b_addr}:{our_port}")],
    )
    setup = WireGuardGoSetup(
        lab=lab,
        wg_ns=wg_ns,
        py_ns=py_ns,
        wg=wg,
        wg_public=wg_private.public,
        our_private=our_private,
        wg_endpoint=(str(link.a_addr), WG_PORT),
        our_ip=link.b_addr,
        wg_overlay=overlay[1],
        our_overlay=overlay[2],
        our_port=our_port,
    )
    try:
        yield setup
    finally:
        # On failure, wireguard-go's debug log is the most useful thing to see.
        if wg.process.poll() is not None:
            print(f"wireguard-go exited early with {wg.process.poll()}")
        print("--- wireguard-go log ---\n" + wg.log()[-4000:])
