"""Tests of the namespace lab itself (need root)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess

import pytest

from tests.lab import Lab, LabError, PeerConfig, socket_in_namespace, start_wireguard_go, uapi_get
from tests.lab.netns import CLAIM_DIR, sweep_stale_namespaces

pytestmark = pytest.mark.interop

RECV_TIMEOUT = 5.0


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def udp_pair(lab_ns_a, addr_a, lab_ns_b):
    """A UDP server socket bound in ``a`` at ``addr_a`` and a client socket in ``b``."""
    server = lab_ns_a.socket()
    server.bind((str(addr_a), 0))
    server.settimeout(RECV_TIMEOUT)
    client = lab_ns_b.socket()
    client.settimeout(RECV_TIMEOUT)
    return server, client


def test_link_carries_udp_between_namespaces(lab: Lab) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.link(a, b)
    assert link.a_addr in link.subnet and link.b_addr in link.subnet
    assert link.a_if in a.link_names() and link.b_if in b.link_names()
    server, client = udp_pair(a, link.a_addr, b)
    client.sendto(b"hello", server.getsockname())
    data, src = server.recvfrom(100)
    assert data == b"hello" and src[0] == str(link.b_addr)
    server.sendto(b"back", src)
    assert client.recvfrom(100) == (b"back", server.getsockname())


def test_socket_lives_in_its_namespace(lab: Lab) -> None:
    a = lab.namespace("a")
    b = lab.namespace("b")
    link = lab.link(a, b)
    in_ns = socket_in_namespace(a.name)
    try:
        in_ns.bind((str(link.a_addr), 0))  # only possible inside a
    finally:
        in_ns.close()
    # The calling thread stayed in the root namespace, where the lab address does not exist.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as root_sock:
        with pytest.raises(OSError) as info:
            root_sock.bind((str(link.a_addr), 0))
        assert info.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(FileNotFoundError):
        socket_in_namespace("tsl-no-such-namespace")


def test_namespaces_have_no_route_off_the_machine(lab: Lab) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.link(a, b)
    sock = a.socket()
    with pytest.raises(OSError) as info:
        sock.connect(("192.0.2.1", 9))  # TEST-NET: never reachable from a lab namespace
    assert info.value.errno == errno.ENETUNREACH
    with pytest.raises(LabError):
        a.add_route("default", via="192.0.2.1")
    a.add_route("default", via=link.b_addr)  # lab addresses are fine


def _observed_ports(lab: Lab, nat: str) -> tuple[int, list[tuple[str, int]]]:
    client_ns, server_ns = lab.namespace("client"), lab.namespace("server")
    router, lan, wan = lab.router("nat", client_ns, server_ns, nat=nat)
    servers = []
    for _ in range(3):
        s = server_ns.socket()
        s.bind((str(wan.b_addr), 0))
        s.settimeout(RECV_TIMEOUT)
        servers.append(s)
    client = client_ns.socket()
    client.bind((str(lan.b_addr), 0))
    client.settimeout(RECV_TIMEOUT)
    seen = []
    for s in servers:
        client.sendto(b"probe", s.getsockname())
        data, src = s.recvfrom(100)
        assert data == b"probe"
        seen.append(src)
        s.sendto(b"reply", src)  # through the NAT back to the client
        assert client.recvfrom(100) == (b"reply", s.getsockname())
    # An unsolicited packet to the router's WAN address from a new source port does not reach the client.
    assert all(ip == str(wan.a_addr) for ip, _ in seen)
    return client.getsockname()[1], seen


def test_easy_nat_keeps_one_mapping(lab: Lab) -> None:
    port, seen = _observed_ports(lab, "easy")
    assert {p for _, p in seen} == {port}  # endpoint-independent mapping, port preserved


def test_hard_nat_maps_each_destination_separately(lab: Lab) -> None:
    port, seen = _observed_ports(lab, "hard")
    assert len({p for _, p in seen}) > 1  # endpoint-dependent: random port per flow


def test_random_loss_drops_a_fraction(lab: Lab) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.link(a, b)
    lossy, client = udp_pair(b, link.b_addr, a)
    marker = b.socket()
    marker.bind((str(link.b_addr), 0))
    marker.settimeout(RECV_TIMEOUT)
    b.iptables("-A", "INPUT", "-p", "udp", "--dport", str(lossy.getsockname()[1]), "-m", "statistic", "--mode", "random",
               "--probability", "0.5", "-j", "DROP")
    n = 400
    for i in range(n):
        client.sendto(i.to_bytes(4, "big"), lossy.getsockname())
    client.sendto(b"done", marker.getsockname())
    assert marker.recv(10) == b"done"
    lossy.setblocking(False)
    got = 0
    while True:
        try:
            lossy.recv(10)
        except BlockingIOError:
            break
        got += 1
    assert 100 < got < 300, got  # binomial(400, 0.5): outside this range has probability ~1e-23

    # random_loss(1.0) on INPUT drops everything, including the marker port.
    b.random_loss(1.0, chain="INPUT")
    client.sendto(b"x", marker.getsockname())
    marker.settimeout(0.3)
    with pytest.raises(TimeoutError):
        marker.recv(10)


def test_wireguard_go_comes_up_and_speaks_uapi(lab: Lab) -> None:
    from tsnet.key import NodePrivate

    ns = lab.namespace("wg")
    ns.add_dummy()
    priv, peer = NodePrivate.generate(), NodePrivate.generate().public
    overlay = lab.subnet()
    wg = start_wireguard_go(
        ns,
        private_key=priv.raw,
        address=f"{overlay[1]}/24",
        listen_port=0,
        peers=[PeerConfig(peer.raw, allowed_ips=[f"{overlay[2]}/32"], endpoint="10.240.0.9:4242")],
    )
    status = uapi_get(wg.uapi_path)
    assert status.listen_port > 0
    p = status.peer(peer.raw)
    assert p.allowed_ips == [f"{overlay[2]}/32"] and p.endpoint == "10.240.0.9:4242" and p.last_handshake == 0
    link = ns.ip("-o", "addr", "show", "dev", wg.ifname)
    assert f"{overlay[1]}/24" in link
    assert "mtu 1280" in ns.ip("link", "show", wg.ifname)
    wg.configure(remove_peers=[peer.raw])
    assert wg.status().peers == []


def test_everything_is_removed_even_on_failure() -> None:
    from tsnet.key import NodePrivate

    if os.geteuid() != 0:
        pytest.fail("needs root")
    with pytest.raises(RuntimeError, match="deliberate"):
        with Lab() as lab:
            a, b = lab.namespace("a"), lab.namespace("b")
            link = lab.link(a, b)
            wg = start_wireguard_go(a, private_key=NodePrivate.generate().raw, address=f"{lab.subnet()[1]}/24", listen_port=0)
            sock = b.socket()
            names = {a.name, b.name}
            claimed = [CLAIM_DIR / f for f in os.listdir(CLAIM_DIR)
                       if (CLAIM_DIR / f).read_text().strip() == str(os.getpid())]
            assert names <= netns_names() and claimed
            raise RuntimeError("deliberate")
    assert not names & netns_names()
    assert wg.process.poll() is not None
    assert not wg.uapi_path.exists()
    assert sock.fileno() == -1
    assert all(not p.exists() or p.read_text().strip() != str(os.getpid()) for p in claimed)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert link.a_if not in links and link.b_if not in links and wg.ifname not in links


def test_sweep_removes_namespaces_of_dead_runs() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root")
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"tsl{dead.pid}-1-stale"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        alive_name = f"tsl{os.getpid()}-999999-alive"
        removed = sweep_stale_namespaces([name, alive_name, "unrelated"])
        assert removed == [name]
        assert name not in netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_subnets_are_unique_and_released() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root")
    with Lab() as one, Lab() as two:
        nets = [one.subnet() for _ in range(3)] + [two.subnet() for _ in range(3)]
        assert len(set(nets)) == 6
        assert all(isinstance(n, ipaddress.IPv4Network) and n.prefixlen == 24 for n in nets)


def test_sweep_kills_processes_of_dead_runs() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root")
    from tests.lab.netns import OWNER_ENV, sweep_stale_processes

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = subprocess.Popen(["sleep", "60"], env={**os.environ, OWNER_ENV: str(dead.pid)})
    mine = subprocess.Popen(["sleep", "60"], env={**os.environ, OWNER_ENV: str(os.getpid())})
    try:
        killed = sweep_stale_processes()
        assert orphan.pid in killed and mine.pid not in killed
        assert orphan.wait(5) == -9 and mine.poll() is None
    finally:
        for p in (orphan, mine):
            p.kill()
            p.wait()


def test_isolation_check(lab: Lab) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    with pytest.raises(LabError, match="no non-loopback address"):
        a.assert_isolated()
    link = lab.link(a, b)
    a.add_route("default", via=link.b_addr)
    a.assert_isolated()
    # A gateway outside the lab (added behind the helper's back) is caught.
    b.ip("route", "add", "198.51.100.0/24", "via", str(link.a_addr))
    b.assert_isolated()
    b.ip("addr", "add", "203.0.113.2/24", "dev", link.b_if)
    b.ip("route", "add", "192.0.2.128/25", "via", "203.0.113.1")
    with pytest.raises(LabError, match="route leaves the lab"):
        b.assert_isolated()


def test_tailscaled_command_always_disables_logging(tmp_path) -> None:
    from pathlib import Path

    from tests.lab.tailscaled import TailscaleBinaries, tailscaled_command

    bins = TailscaleBinaries(Path("/x/tailscaled"), Path("/x/tailscale"), "1.96.4")
    cmd = tailscaled_command(bins, state_dir=tmp_path / "s", socket_path=tmp_path / "sock", port=41641)
    assert cmd[0] == "/x/tailscaled" and "--no-logs-no-support" in cmd
    assert f"--statedir={tmp_path / 's'}" in cmd and "--port=41641" in cmd and "--tun=userspace-networking" in cmd
    with pytest.raises(ValueError):
        tailscaled_command(bins, state_dir=tmp_path, socket_path=tmp_path / "x", extra_args=("--socket=/tmp/other",))


def test_sysctl_is_per_namespace(lab: Lab) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    a.enable_forwarding()
    assert a.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).strip() == "1" == a.read_sysctl("net.ipv4.ip_forward")
    assert b.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).strip() == "0" == b.read_sysctl("net.ipv4.ip_forward")


def test_ipv6_link(lab: Lab) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.link(a, b, ipv6=True)
    assert link.a_addr6 in link.subnet6 and link.subnet6 == lab.subnet6_of(link.subnet)
    server = a.socket(socket.AF_INET6)
    server.bind((str(link.a_addr6), 0))
    server.settimeout(RECV_TIMEOUT)
    client = b.socket(socket.AF_INET6)
    client.sendto(b"six", server.getsockname()[:2])
    data, src = server.recvfrom(10)
    assert data == b"six" and src[0] == str(link.b_addr6)
    a.add_route("fd7e:5700:ffff::/64", via=link.b_addr6)
    a.assert_isolated()
    with pytest.raises(LabError):
        a.add_route("::/0", via="2001:db8::1")


def test_subnet_pool_takes_over_only_dead_claims(tmp_path) -> None:
    from tests.lab.netns import SubnetPool

    dead = subprocess.Popen(["true"])
    dead.wait()
    pool = SubnetPool(claim_dir=tmp_path, pool=ipaddress.IPv4Network("10.240.0.0/23"))
    (tmp_path / "subnet-0").write_text("1")  # pid 1 is alive: never taken
    (tmp_path / "subnet-1").write_text(str(dead.pid))
    assert pool.claim() == ipaddress.IPv4Network("10.240.1.0/24")
    assert (tmp_path / "subnet-1").read_text() == str(os.getpid())
    with pytest.raises(LabError, match="exhausted"):
        pool.claim()
    pool.release_all()
    assert not (tmp_path / "subnet-1").exists() and (tmp_path / "subnet-0").exists()
