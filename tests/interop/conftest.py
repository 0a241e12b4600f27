"""Fixtures for interop tests against real peers in lab namespaces.

``wireguard_go_setup``: two namespaces joined by a veth pair. In ``wg`` runs
Debian's wireguard-go on a TUN (MTU 1280, overlay ``.1/24``); in ``py`` lives
the Python peer (optionally behind a NAT router), whose UDP socket is created inside that namespace with the
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
    wg_private: NodePrivate
    our_private: NodePrivate
    wg_endpoint: tuple[str, int]  # wireguard-go's UDP address, as recvfrom reports it
    our_ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # link address of the py namespace
    wg_overlay: ipaddress.IPv4Address  # tunnel address of wireguard-go's TUN
    our_overlay: ipaddress.IPv4Address  # our tunnel address
    our_port: int
    router: Namespace | None = None  # the NAT router, when there is one
    public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None  # our address as wireguard-go sees it (the NAT's WAN side)

    def our_peer_config(self, **kw: object) -> PeerConfig:
        """How wireguard-go is configured to know us (overrides via keyword arguments)."""
        endpoint = _hostport(self.our_ip, self.our_port) if self.router is None else None
        args: dict[str, object] = {"allowed_ips": [f"{self.our_overlay}/32"], "endpoint": endpoint}
        args.update(kw)
        return PeerConfig(self.our_private.public.raw, **args)  # type: ignore[arg-type]

    def restart_wireguard_go(self) -> WireGuardGo:
        """Stop wireguard-go and start a fresh process (new TUN) with the same key, port and peer config."""
        self.wg.process.stop()
        self.wg = start_wireguard_go(
            self.wg_ns,
            private_key=self.wg_private.raw,
            address=f"{self.wg_overlay}/24",
            listen_port=WG_PORT,
            peers=[self.our_peer_config()],
        )
        return self.wg

    def our_socket(self, port: int = 0) -> socket.socket:
        """A UDP socket in the py namespace bound to our link address."""
        sock = self.py_ns.socket(socket.AF_INET6 if self.our_ip.version == 6 else socket.AF_INET)
        sock.bind((str(self.our_ip), port))
        return sock

    def our_endpoint_text(self, port: int) -> str:
        """Our endpoint as wireguard-go prints it."""
        return _hostport(self.our_ip, port)


def _hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def make_wireguard_go_setup(lab: Lab, *, nat: str | None = None, ipv6: bool = False) -> WireGuardGoSetup:
    """Build the topology; with ``nat`` ("easy"/"hard") the py namespace sits behind a NAT router.

    Behind a NAT wireguard-go is not told our endpoint: it learns the NAT's
    mapping from our first authenticated datagram (WireGuard roaming).
    """
    wg_ns, py_ns = lab.namespace("wg"), lab.namespace("py")
    router = None
    wg_addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    our_addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    if nat is None:
        link = lab.link(wg_ns, py_ns, ipv6=ipv6)
        wg_addr, our_addr = (link.a_addr6, link.b_addr6) if ipv6 else (link.a_addr, link.b_addr)  # type: ignore[assignment]
        public_addr = our_addr
    else:
        router, lan, wan = lab.router("nat", py_ns, wg_ns, nat=nat)
        wg_addr, our_addr, public_addr = wan.b_addr, lan.b_addr, wan.a_addr
    overlay = lab.subnet()
    wg_private, our_private = NodePrivate.generate(), NodePrivate.generate()
    # Reserve our port now so wireguard-go can be told our endpoint (for tests where it initiates).
    probe = py_ns.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
    probe.bind((str(our_addr), 0))
    our_port = probe.getsockname()[1]
    probe.close()
    endpoint = _hostport(our_addr, our_port) if nat is None else None
    wg = start_wireguard_go(
        wg_ns,
        private_key=wg_private.raw,
        address=f"{overlay[1]}/24",
        listen_port=WG_PORT,
        peers=[PeerConfig(our_private.public.raw, allowed_ips=[f"{overlay[2]}/32"], endpoint=endpoint)],
    )
    return WireGuardGoSetup(
        lab=lab,
        wg_ns=wg_ns,
        py_ns=py_ns,
        wg=wg,
        wg_public=wg_private.public,
        wg_private=wg_private,
        our_private=our_private,
        wg_endpoint=(str(wg_addr), WG_PORT),
        our_ip=our_addr,
        wg_overlay=overlay[1],
        our_overlay=overlay[2],
        our_port=our_port,
        router=router,
        public_ip=public_addr,
    )


@pytest.fixture
def wireguard_go_setup(lab: Lab) -> Iterator[WireGuardGoSetup]:
    setup = make_wireguard_go_setup(lab)
    try:
        yield setup
    finally:
        dump_wireguard_go_log(setup)


@pytest.fixture
def wireguard_go_over_ipv6(lab: Lab) -> Iterator[WireGuardGoSetup]:
    """Like ``wireguard_go_setup`` but the outer (UDP) transport is IPv6."""
    setup = make_wireguard_go_setup(lab, ipv6=True)
    try:
        yield setup
    finally:
        dump_wireguard_go_log(setup)


@pytest.fixture(params=["easy", "hard"])
def wireguard_go_behind_nat(lab: Lab, request: pytest.FixtureRequest) -> Iterator[WireGuardGoSetup]:
    """Like ``wireguard_go_setup`` but our namespace is behind an easy or a hard (--random-fully) NAT."""
    setup = make_wireguard_go_setup(lab, nat=request.param)
    try:
        yield setup
    finally:
        dump_wireguard_go_log(setup)


def dump_wireguard_go_log(setup: WireGuardGoSetup) -> None:
    """Print wireguard-go's debug log (pytest shows it when a test fails)."""
    wg = setup.wg
    if wg.process.poll() is not None:
        print(f"wireguard-go exited early with {wg.process.poll()}")
    print("--- wireguard-go log ---\n" + wg.log()[-4000:])
