"""The big proof: real tailscaled 1.96.4 nodes join OUR control server and reach each other.

Topology (all lab namespaces, no route out):

    n1 --veth-- ctl --veth-- n2

``ctl`` runs ``tsnet control serve`` (HTTP control + embedded DERP + STUN); each
tailscaled knows only the control URL on its own link. DERP is plain HTTP
(``TS_DEBUG_USE_DERP_HTTP=1``) on the control port. With ``forward=True`` ctl
routes between the links (direct WireGuard paths); without, the nodes can only
meet through our embedded DERP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import Lab, LabProcess, Namespace, TailscaleBinaries, wait_until
from tests.lab.tailscaled import start_tailscaled

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
CONTROL_PORT = 8080
STUN_PORT = 3478
SOCKS_PORT = 1055


def _tsnet(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "tsnet", *args], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    if out.returncode != 0:
        raise AssertionError(f"tsnet {' '.join(args)} failed: {out.stderr}")
    return out.stdout


class Node:
    """One tailscaled in its namespace, with its CLI."""

    def __init__(self, ns: Namespace, bins: TailscaleBinaries, state: Path, control_url: str, name: str,
                 mem_state: bool = False, tls_ca: Path | None = None, socks5_port: int | None = None,
                 extra_env: dict[str, str] | None = None):
        self.ns, self.bins, self.state, self.name, self.control_url = ns, bins, state, name, control_url
        self.mem_state = mem_state  # --state=mem: makes tailscaled register as an ephemeral node
        self.tls_ca = tls_ca  # trust this CA for https control (and DERP over TLS instead of plain HTTP)
        self.socks5_port = socks5_port  # --socks5-server on 127.0.0.1 of the node's namespace
        self.extra_env = dict(extra_env or {})  # e.g. TS_DEBUG_NEVER_DIRECT_UDP
        self.sock = state / "tailscaled.sock"
        self.proc: LabProcess | None = None
        self.start()

    def start(self) -> None:
        env = {
            "TS_NO_LOGS_NO_SUPPORT": "true",
            "TS_DISABLE_PORTMAPPER": "1",
            "TS_ASSUME_NETWORK_UP_FOR_TEST": "1",
            "TS_NETCHECK_GENERATE_204_URL": self.control_url + "/generate_204",
            "HOME": str(self.state),
        }
        if self.tls_ca is not None:
            env["SSL_CERT_FILE"] = str(self.tls_ca)
        else:
            env["TS_DEBUG_USE_DERP_HTTP"] = "1"
        env.update(self.extra_env)
        extra: tuple[str, ...] = ("--state=mem:",) if self.mem_state else ()
        if self.socks5_port is not None:
            extra += (f"--socks5-server=127.0.0.1:{self.socks5_port}",)
        self.proc, _ = start_tailscaled(self.ns, self.bins, env=env, state_dir=self.state / "state",
                                        socket_path=self.sock, port=41641, extra_args=extra)
        wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 20, "tailscaled socket")
        assert self.proc.poll() is None, self.proc.log()[-3000:]

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.stop()
        self.sock.unlink(missing_ok=True)

    def cli(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        cmd = self.ns.exec_args([str(self.bins.tailscale), f"--socket={self.sock}", *args])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            log = self.proc.log()[-4000:] if self.proc else ""
            raise AssertionError(f"tailscale {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}\n"
                                 f"--- tailscaled log ---\n{log}")
        return out.stdout

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json"))

    def peer_names(self) -> list[str]:
        return sorted(p.get("HostName") for p in (self.status().get("Peer") or {}).values())


@dataclass
class Tailnet:
    server: LabProcess
    state: Path
    authkey: str
    nodes: list[Node]
    ctl: Namespace
    url1: str
    server_cmd: list[str]

    def restart_server(self) -> None:
        """Stop the control server and start it again on the same state directory."""
        self.server.stop()
        self.server = self.ctl.popen(self.server_cmd, env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))


def make_tailnet(lab: Lab, bins: TailscaleBinaries, tmp_path: Path, *, forward: bool,
                 server_args: tuple[str, ...] = (), mem_state: tuple[bool, bool] = (False, False),
                 socks5: bool = False, node_env: dict[str, str] | None = None) -> Tailnet:
    ctl, n1, n2 = lab.namespace("ctl"), lab.namespace("n1"), lab.namespace("n2")
    l1, l2 = lab.link(ctl, n1), lab.link(ctl, n2)
    # The DERP map names ctl's address on link 1; node 2 reaches it through ctl (a local address there).
    n2.add_route(str(l1.subnet), via=l2.a_addr)
    if forward:
        ctl.enable_forwarding()
        n1.add_route(str(l2.subnet), via=l1.a_addr)
    state = tmp_path / "control"
    authkey = _tsnet("control", "authkey", "create", "--state-dir", str(state), "--reusable").strip()
    assert authkey.startswith("tskey-auth-") and "\n" not in authkey
    server_cmd = [sys.executable, "-m", "tsnet", "control", "serve", "--listen", f"0.0.0.0:{CONTROL_PORT}",
                  "--advertise-host", str(l1.a_addr), "--state-dir", str(state),
                  "--stun-port", str(STUN_PORT), "-v", *server_args]
    server = ctl.popen(server_cmd, env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
    url1 = f"http://{l1.a_addr}:{CONTROL_PORT}"
    url2 = f"http://{l2.a_addr}:{CONTROL_PORT}"
    wait_until(lambda: "publicKey" in n1.run(["curl", "-s", "-m", "2", url1 + "/key?v=133"], check=False)
               or server.poll() is not None, 30, "control server up")
    assert server.poll() is None, server.log()
    nodes = []
    for (ns, url, name), mem in zip(((n1, url1, "alpha"), (n2, url2, "beta")), mem_state):
        st = tmp_path / name
        st.mkdir()
        nodes.append(Node(ns, bins, st, url, name, mem_state=mem, socks5_port=SOCKS_PORT if socks5 else None,
                          extra_env=node_env))
    return Tailnet(server, state, authkey, nodes, ctl, url1, server_cmd)


def dump(net: Tailnet) -> None:
    for node in net.nodes:
        if node.proc is not None:
            print(f"--- tailscaled {node.name} ---\n{node.proc.log()[-3000:]}")
    print(f"--- control server ---\n{net.server.log()[-5000:]}")


def join_both(net: Tailnet, keys: tuple[str, str] | None = None) -> tuple[Node, Node]:
    for node, key in zip(net.nodes, keys or (net.authkey, net.authkey)):
        node.cli("up", f"--login-server={node.control_url}", f"--authkey={key}", f"--hostname={node.name}",
                 "--timeout=60s", timeout=90)
    a, b = net.nodes
    wait_until(lambda: a.peer_names() == ["beta"] and b.peer_names() == ["alpha"], 30, "both nodes list each other")
    return a, b


def v4_of(node: Node) -> str:
    return next(ip for ip in node.status()["Self"]["TailscaleIPs"] if ip.startswith("100."))


def test_two_tailscaled_join_our_control(lab: Lab, tailscale_binaries: TailscaleBinaries, tmp_path: Path) -> None:
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True)
    try:
        a, b = join_both(net)
        sa, sb = a.status(), b.status()
        assert sa["BackendState"] == "Running" and sb["BackendState"] == "Running"
        a_ips, b_ips = sa["Self"]["TailscaleIPs"], sb["Self"]["TailscaleIPs"]
        assert any(ip.startswith("100.") for ip in a_ips) and any(ip.startswith("fd7a:115c:a1e0:") for ip in a_ips)
        (peer_b,) = sa["Peer"].values()
        assert sorted(peer_b["TailscaleIPs"]) == sorted(b_ips)
        assert peer_b["DNSName"] == "beta.tailnet.test." and peer_b["Online"] is True
        assert sa["MagicDNSSuffix"] == "tailnet.test"
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))
        assert sorted(n["name"] for n in listed) == ["alpha", "beta"]
        assert sorted(next(n for n in listed if n["name"] == "beta")["addresses"]) == sorted(b_ips)

        out = a.cli("ping", "--c", "10", "--timeout", "5s", v4_of(b), timeout=60)
        assert "pong from beta" in out, out

        # Our Python client joins the same tailnet from n1 and sees both tailscaled with what the data plane needs.
        out = a.ns.run([sys.executable, "-m", "tsnet", "control", "netmap", "--login-server", a.control_url,
                        "--authkey", net.authkey, "--hostname", "pynode", "--wait-peers", "2", "--json"],
                       timeout=60)
        summary = json.loads(out)
        assert summary["self"]["name"] == "pynode.tailnet.test." and summary["derp_regions"] == [900]
        peers = {p["name"]: p for p in summary["peers"]}
        assert set(peers) == {"alpha.tailnet.test.", "beta.tailnet.test."}
        for p in peers.values():
            assert p["disco_key"].startswith("discokey:") and p["home_derp"] == 900 and p["cap"] == 133
            assert p["online"] is True and p["endpoints"]
        assert sorted(peers["beta.tailnet.test."]["addresses"]) == sorted(f"{ip}/{32 if '.' in ip else 128}"
                                                                         for ip in b_ips)
        wait_until(lambda: "pynode" in a.peer_names(), 15, "tailscaled lists our Python node")

        # Restart b: it re-registers its known node key without an auth key and keeps its addresses.
        b.stop()
        def b_online() -> bool:
            return next(p for p in a.status()["Peer"].values() if p["HostName"] == "beta")["Online"]

        wait_until(lambda: not b_online(), 15, "a sees b offline")
        b.start()
        wait_until(lambda: b.status()["BackendState"] == "Running", 30, "b running again after restart")
        assert sorted(b.status()["Self"]["TailscaleIPs"]) == sorted(b_ips)
        wait_until(b_online, 15, "a sees b online")
        out = b.cli("ping", "--c", "10", "--timeout", "5s", v4_of(a), timeout=60)
        assert "pong from alpha" in out, out

        # Admin expiry: b's key dies (NeedsLogin, a sees it expired); `up` with a key renews the same node.
        _tsnet("control", "nodes", "expire", "--state-dir", str(net.state), "beta")
        wait_until(lambda: b.status()["BackendState"] == "NeedsLogin", 20, "b needs login after expiry")
        wait_until(lambda: next(p for p in a.status()["Peer"].values() if p["HostName"] == "beta").get("Expired"),
                   20, "a sees b expired")
        b.cli("up", f"--login-server={b.control_url}", f"--authkey={net.authkey}", "--hostname=beta",
              "--timeout=60s", timeout=90)
        assert b.status()["BackendState"] == "Running"
        assert sorted(b.status()["Self"]["TailscaleIPs"]) == sorted(b_ips)
        wait_until(lambda: not next(p for p in a.status()["Peer"].values() if p["HostName"] == "beta").get("Expired"),
                   20, "a sees b renewed")

        # Logout: the server expires b's key and a drops it from its peers.
        b.cli("logout", timeout=30)
        wait_until(lambda: a.peer_names() == ["pynode"], 15, "a no longer lists b")
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))
        assert next(n for n in listed if n["name"] == "beta")["logged_out"] is True
    finally:
        dump(net)


def test_tailscaled_meet_through_embedded_derp(lab: Lab, tailscale_binaries: TailscaleBinaries, tmp_path: Path) -> None:
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=False)
    try:
        a, b = join_both(net)
        out = a.cli("ping", "--c", "3", "--timeout", "5s", v4_of(b), timeout=60, check=False)
        assert "pong from beta" in out and "via DERP(tsnet)" in out, out
    finally:
        dump(net)


POLICY = """{
  // beta is a tagged server; members may reach it, it may not open connections back.
  "tagOwners": {"tag:srv": []},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:srv:*"]},
  ],
}
"""


def test_policy_tags_and_ephemeral_gc_with_tailscaled(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                      tmp_path: Path) -> None:
    policy = tmp_path / "policy.hujson"
    policy.write_text(POLICY)
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True, mem_state=(False, True),
                       server_args=("--policy", str(policy), "--ephemeral-timeout", "2s"))
    try:
        tagged = _tsnet("control", "authkey", "create", "--state-dir", str(net.state), "--ephemeral",
                        "--tags", "tag:srv").strip()
        a, b = join_both(net, (net.authkey, tagged))
        (peer_b,) = a.status()["Peer"].values()
        assert peer_b["Tags"] == ["tag:srv"]
        out = a.cli("ping", "--c", "10", "--timeout", "5s", v4_of(b), timeout=60)
        assert "pong from beta" in out, out
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))
        beta = next(n for n in listed if n["name"] == "beta")
        assert beta["ephemeral"] and beta["tags"] == ["tag:srv"] and beta["key_expiry"] is None
        # beta dies without logging out: the server drops it after the ephemeral timeout.
        b.proc.signal(9)
        wait_until(lambda: a.peer_names() == [], 30, "ephemeral beta garbage-collected")
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))
        assert [n["name"] for n in listed] == ["alpha"]
    finally:
        dump(net)


def test_tailscale_up_interactive_login_approved_by_admin(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                          tmp_path: Path) -> None:
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True)
    a = net.nodes[0]
    cmd = a.ns.exec_args([str(a.bins.tailscale), f"--socket={a.sock}", "up", f"--login-server={a.control_url}",
                          "--hostname=walkin", "--timeout=60s"])
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        seen = []
        assert up.stdout is not None
        for line in up.stdout:  # tailscale prints the AuthURL and waits
            seen.append(line)
            if "/register/" in line:
                url = line.strip()
                break
        assert url and url.startswith(a.control_url + "/register/"), "".join(seen)
        page = a.ns.run(["curl", "-s", "-m", "5", url], check=False)
        assert "tsnet control nodes approve" in page, page
        _tsnet("control", "nodes", "approve", "--state-dir", str(net.state), url)
        assert up.wait(timeout=60) == 0
        st = a.status()
        assert st["BackendState"] == "Running" and st["Self"]["HostName"] == "walkin"
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))
        assert [n["name"] for n in listed] == ["walkin"]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        dump(net)


RELAY_POLICY = """{
  "tagOwners": {"tag:relay": []},
  "grants": [
    {"src": ["*"], "dst": ["*"], "ip": ["*"]},
    // members may relay through tag:relay nodes (cap/relay there, cap/relay-target on the members)
    {"src": ["autogroup:member"], "dst": ["tag:relay"], "app": {"tailscale.com/cap/relay": []}},
  ],
}
"""


def test_peer_relay_grant_lets_tailscaled_relay(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                tmp_path: Path) -> None:
    """alpha and beta cannot reach each other directly; a tailscaled in ctl, granted
    tailscale.com/cap/relay by our policy, relays their WireGuard traffic."""
    policy = tmp_path / "policy.hujson"
    policy.write_text(RELAY_POLICY)
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=False, server_args=("--policy", str(policy)))
    try:
        relay_key = _tsnet("control", "authkey", "create", "--state-dir", str(net.state), "--tags", "tag:relay").strip()
        st = tmp_path / "relay"
        st.mkdir()
        relay = Node(net.ctl, tailscale_binaries, st, net.url1, "relay")
        net.nodes.append(relay)
        relay.cli("up", f"--login-server={net.url1}", f"--authkey={relay_key}", "--hostname=relay", "--timeout=60s",
                  timeout=90)
        relay.cli("set", "--relay-server-port=40000")
        a, b = net.nodes[0], net.nodes[1]
        for node in (a, b):
            node.cli("up", f"--login-server={node.control_url}", f"--authkey={net.authkey}", f"--hostname={node.name}",
                     "--timeout=60s", timeout=90)
        wait_until(lambda: a.peer_names() == ["beta", "relay"] and b.peer_names() == ["alpha", "relay"], 30,
                   "all peers visible")
        target = v4_of(b)
        outputs = []

        def relayed() -> bool:
            out = a.cli("ping", "--c", "1", "--timeout", "3s", target, timeout=30, check=False)
            outputs.append(out)
            return "peer-relay(" in out

        wait_until(relayed, 45, "ping via the peer relay", interval=1.0)
        print("".join(outputs))
        assert "pong from beta" in outputs[-1], outputs[-3:]
    finally:
        dump(net)


def test_c2n_echo_with_tailscaled_and_in_process_server(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                         tmp_path: Path) -> None:
    """Our server runs in this process (listening socket made inside ctl); it sends tailscaled a c2n
    PingRequest and gets tailscaled's /echo answer back over Noise."""
    import socket

    import trio

    from tsnet.control.server import ControlServer, ServerConfig, default_derp_map
    from tsnet.control.store import Store
    from tsnet.derp.server import DerpServer

    ctl, n1 = lab.namespace("ctl"), lab.namespace("n1")
    link = lab.link(ctl, n1)
    sock = ctl.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(link.a_addr), CONTROL_PORT))
    sock.listen(64)
    url = f"http://{link.a_addr}:{CONTROL_PORT}"
    store = Store.open(tmp_path / "control")
    server = ControlServer(store, ServerConfig(derp_map=default_derp_map(str(link.a_addr), CONTROL_PORT)))
    server.attach_derp(DerpServer())
    key = store.create_authkey(server.now()).key
    st = tmp_path / "alpha"
    st.mkdir()
    node: Node | None = None

    async def main() -> bytes:
        nonlocal node
        async with trio.open_nursery() as nursery:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            nursery.start_soon(trio.serve_listeners, server.handle_tcp, [listener])
            node = await trio.to_thread.run_sync(lambda: Node(n1, tailscale_binaries, st, url, "alpha"))
            await trio.to_thread.run_sync(lambda: node.cli("up", f"--login-server={url}", f"--authkey={key}",
                                                           "--hostname=alpha", "--timeout=60s", timeout=90))
            with trio.fail_after(20):
                while not server.sessions:  # tailscaled's long poll (an external process; bounded wait)
                    await trio.sleep(0.05)
                (node_id,) = server.sessions
                reply = await server.c2n_request(
                    node_id, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping", timeout=15)
            nursery.cancel_scope.cancel()
        return reply

    try:
        reply = trio.run(main)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ping"), reply
    finally:
        if node is not None and node.proc is not None:
            print(f"--- tailscaled ---\n{node.proc.log()[-3000:]}")
        store.close()


def test_server_restart_keeps_the_tailnet(lab: Lab, tailscale_binaries: TailscaleBinaries, tmp_path: Path) -> None:
    """State and the Noise key persist: after a control restart tailscaled reconnects by itself."""
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True)
    try:
        a, b = join_both(net)
        ips_before = sorted(b.status()["Self"]["TailscaleIPs"])
        net.restart_server()
        # b changes its Hostinfo; only the restarted server can tell a about it.
        b.cli("set", "--hostname=beta2")
        wait_until(lambda: a.peer_names() == ["beta2"], 45, "a learns b's change through the restarted server",
                   interval=0.2)
        assert sorted(b.status()["Self"]["TailscaleIPs"]) == ips_before
        out = a.cli("ping", "--c", "10", "--timeout", "5s", v4_of(b), timeout=60)
        assert "pong from beta" in out, out
    finally:
        dump(net)


def test_tailscaled_over_https_control(lab: Lab, tailscale_binaries: TailscaleBinaries, tmp_path: Path) -> None:
    """`serve --tls-cert/--tls-key`: tailscaled verifies /key over TLS (our CA via SSL_CERT_FILE), dials
    ts2021 on port 80 first, falls back to the TLS port, and uses the embedded DERP over TLS."""
    sys.path.insert(0, str(REPO / "tests" / "control"))
    from control_helpers import self_signed_cert

    ctl, n1, n2 = lab.namespace("ctl"), lab.namespace("n1"), lab.namespace("n2")
    l1, l2 = lab.link(ctl, n1), lab.link(ctl, n2)
    n2.add_route(str(l1.subnet), via=l2.a_addr)
    cert, key = self_signed_cert(tmp_path, str(l1.a_addr))
    state = tmp_path / "control"
    authkey = _tsnet("control", "authkey", "create", "--state-dir", str(state), "--reusable").strip()
    port = 8443
    server = ctl.popen([sys.executable, "-m", "tsnet", "control", "serve", "--listen", f"0.0.0.0:{port}",
                        "--advertise-host", str(l1.a_addr), "--state-dir", str(state), "--tls-cert", str(cert),
                        "--tls-key", str(key), "-v"], env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
    url = f"https://{l1.a_addr}:{port}"
    nodes: list[Node] = []
    try:
        wait_until(lambda: "publicKey" in n1.run(["curl", "-s", "-m", "2", "--cacert", str(cert), url + "/key?v=133"],
                                                 check=False) or server.poll() is not None, 30, "https control up")
        assert server.poll() is None, server.log()
        for ns, name in ((n1, "alpha"), (n2, "beta")):
            st = tmp_path / name
            st.mkdir()
            node = Node(ns, tailscale_binaries, st, url, name, tls_ca=cert)
            nodes.append(node)
            node.cli("up", f"--login-server={url}", f"--authkey={authkey}", f"--hostname={name}", "--timeout=60s",
                     timeout=90)
        a, b = nodes
        wait_until(lambda: a.peer_names() == ["beta"] and b.peer_names() == ["alpha"], 30, "peers over https")
        out = a.cli("ping", "--c", "5", "--timeout", "5s", v4_of(b), timeout=60, check=False)
        assert "pong from beta" in out and "via DERP(tsnet)" in out, out  # no forwarding: DERP over TLS
    finally:
        for node in nodes:
            if node.proc is not None:
                print(f"--- tailscaled {node.name} ---\n{node.proc.log()[-3000:]}")
        print(f"--- control server ---\n{server.log()[-5000:]}")


# -- data through tailscaled's SOCKS5 proxy (userspace networking) ----------------------------------------------------

BLOB_SIZE = 4 * 1024 * 1024


def make_blob(directory: Path, name: str = "blob.bin", size: int = BLOB_SIZE) -> str:
    """Write ``size`` random bytes to ``directory/name``; return their SHA-256 (hex)."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    (directory / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def serve_files(ns: Namespace, directory: Path, port: int) -> LabProcess:
    """A plain HTTP file server on 127.0.0.1:``port`` inside ``ns``.

    tailscaled in userspace-networking mode hands inbound tailnet TCP for its own
    address to 127.0.0.1:<port> of its namespace, so this is what peers reach.
    """
    proc = ns.popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                     "--directory", str(directory)])
    wait_until(lambda: ns.run(["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                               f"http://127.0.0.1:{port}/"], check=False) == "200" or proc.poll() is not None,
               15, f"http server on port {port}")
    assert proc.poll() is None, proc.log()
    return proc


def fetch_via_socks(node: Node, url: str, out: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``curl --socks5-hostname`` through ``node``'s tailscaled proxy, saving the body to ``out``."""
    assert node.socks5_port is not None, "start the tailnet with socks5=True"
    out.unlink(missing_ok=True)
    cmd = node.ns.exec_args(["curl", "-sS", "--fail", "-m", f"{timeout:g}", "--socks5-hostname",
                             f"127.0.0.1:{node.socks5_port}", "-o", str(out), url])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15)


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_ok(node: Node, url: str, out: Path, digest: str, timeout: float = 30.0) -> None:
    res = fetch_via_socks(node, url, out, timeout)
    assert res.returncode == 0, f"curl {url} -> {res.returncode}: {res.stderr}"
    assert out.stat().st_size == BLOB_SIZE and sha256_of(out) == digest


def derp_vars(net: Tailnet) -> dict:
    """The embedded DERP server's counters, from the control server's loopback-only /debug/vars."""
    out = net.ctl.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{CONTROL_PORT}/debug/vars"])
    return json.loads(out)["derp"]


HTTP_PORT = 8000


def test_http_through_socks5_to_peer_localhost(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                               tmp_path: Path) -> None:
    """alpha's --socks5-server carries an HTTP fetch to a server on beta's namespace localhost; bytes intact."""
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True, socks5=True)
    try:
        a, b = join_both(net)
        digest = make_blob(tmp_path / "www")
        serve_files(b.ns, tmp_path / "www", HTTP_PORT)
        out = tmp_path / "got.bin"
        fetch_ok(a, f"http://{v4_of(b)}:{HTTP_PORT}/blob.bin", out, digest)
        # The proxy resolves MagicDNS names too (curl hands it the hostname).
        fetch_ok(a, f"http://beta.tailnet.test:{HTTP_PORT}/blob.bin", out, digest)
        peer = next(iter(a.status()["Peer"].values()))
        assert peer["CurAddr"], f"expected a direct path with forwarding on: {peer}"
    finally:
        dump(net)


def test_http_through_socks5_over_embedded_derp_only(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                     tmp_path: Path) -> None:
    """TS_DEBUG_NEVER_DIRECT_UDP=1 on both nodes (the link would allow direct): the fetch goes through our
    embedded DERP, whose relay counters grow by at least the file size."""
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True, socks5=True,
                       node_env={"TS_DEBUG_NEVER_DIRECT_UDP": "1"})
    try:
        a, b = join_both(net)
        digest = make_blob(tmp_path / "www")
        serve_files(b.ns, tmp_path / "www", HTTP_PORT)
        out = a.cli("ping", "--c", "3", "--timeout", "5s", v4_of(b), timeout=60, check=False)
        assert "pong from beta" in out and "via DERP(tsnet)" in out, out
        before = derp_vars(net)
        fetch_ok(a, f"http://{v4_of(b)}:{HTTP_PORT}/blob.bin", tmp_path / "got.bin", digest, timeout=60)
        after = derp_vars(net)
        relayed_bytes = after["bytes_relayed"] - before["bytes_relayed"]
        relayed_packets = after["packets_relayed"] - before["packets_relayed"]
        print(f"DERP relayed {relayed_packets} packets, {relayed_bytes} bytes for a {BLOB_SIZE} B fetch")
        assert relayed_bytes >= BLOB_SIZE, (before, after)
        assert relayed_packets >= BLOB_SIZE // 1500, (before, after)
        assert after["clients"] >= 2, after  # both tailscaled hold a DERP connection
        peer = next(iter(a.status()["Peer"].values()))
        assert not peer["CurAddr"] and peer["Relay"] == "tsnet", peer
    finally:
        dump(net)


PORTS_POLICY = """{
  // everyone may reach port %s on everyone; nothing else
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:%s"]},
  ],
}
"""


def test_policy_port_allowed_blocked_then_live_edit(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                    tmp_path: Path) -> None:
    """Port A is allowed and port B is not; editing the policy file to allow B takes effect live."""
    port_a, port_b = 8001, 8002
    policy = tmp_path / "policy.hujson"
    policy.write_text(PORTS_POLICY % (port_a, port_a))
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True, socks5=True,
                       server_args=("--policy", str(policy)))
    try:
        a, b = join_both(net)
        digest = make_blob(tmp_path / "www")
        serve_files(b.ns, tmp_path / "www", port_a)
        serve_files(b.ns, tmp_path / "www", port_b)
        target = v4_of(b)
        out = tmp_path / "got.bin"
        fetch_ok(a, f"http://{target}:{port_a}/blob.bin", out, digest)
        blocked = fetch_via_socks(a, f"http://{target}:{port_b}/blob.bin", out, timeout=5)
        print(f"port {port_b} before the edit: curl exit {blocked.returncode}: {blocked.stderr.strip()}")
        assert blocked.returncode != 0 and not out.exists(), blocked
        server_pid = net.server.pid

        # Allow B too: write the new file atomically; the running server notices and pushes new filters.
        tmp = policy.with_suffix(".new")
        tmp.write_text(PORTS_POLICY % (port_b, f"{port_a},{port_b}"))
        os.replace(tmp, policy)

        def b_reachable() -> bool:
            return fetch_via_socks(a, f"http://{target}:{port_b}/blob.bin", out, timeout=5).returncode == 0

        wait_until(b_reachable, 30, "port B reachable after the policy edit", interval=0.2)
        assert sha256_of(out) == digest
        fetch_ok(a, f"http://{target}:{port_a}/blob.bin", out, digest)
        assert net.server.poll() is None and net.server.pid == server_pid  # nothing was restarted
        assert f"policy {policy} applied" in net.server.log()  # the live reload, not a restart
    finally:
        dump(net)


def test_ephemeral_tailscaled_leaves_on_logout(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                               tmp_path: Path) -> None:
    """An ephemeral node that logs out is deleted at once (not after the 5 min ephemeral timeout)."""
    net = make_tailnet(lab, tailscale_binaries, tmp_path, forward=True, mem_state=(False, True))
    try:
        eph = _tsnet("control", "authkey", "create", "--state-dir", str(net.state), "--ephemeral").strip()
        a, b = join_both(net, (net.authkey, eph))

        def listed() -> list[dict]:
            return json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(net.state)))

        beta = next(n for n in listed() if n["name"] == "beta")
        assert beta["ephemeral"] is True
        b.cli("logout", timeout=30)
        assert [n["name"] for n in listed()] == ["alpha"]
        wait_until(lambda: a.peer_names() == [], 15, "alpha drops the logged-out ephemeral peer")
        assert "beta logged out (ephemeral, deleted)" in net.server.log()
    finally:
        dump(net)
