"""The big proof: two real tailscaled 1.96.4 join OUR control server and reach each other.

Topology (all lab namespaces, no route out):

    n1 --veth-- ctl --veth-- n2

``ctl`` runs ``tsnet control serve`` (HTTP control + embedded DERP + STUN) and
forwards between the two links; each tailscaled knows only the control URL on its
own link. DERP is plain HTTP (``TS_DEBUG_USE_DERP_HTTP=1``) on the control port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import Lab, Namespace, TailscaleBinaries, wait_until

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
CONTROL_PORT = 8080
STUN_PORT = 3478


def _tsnet(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "tsnet", *args], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    if out.returncode != 0:
        raise AssertionError(f"tsnet {' '.join(args)} failed: {out.stderr}")
    return out.stdout


class Node:
    def __init__(self, lab: Lab, ns: Namespace, bins: TailscaleBinaries, state: Path, control_url: str, name: str):
        self.ns, self.bins, self.state, self.name = ns, bins, state, name
        self.sock = state / "tailscaled.sock"
        env = {
            "TS_DEBUG_USE_DERP_HTTP": "1",
            "TS_NO_LOGS_NO_SUPPORT": "true",
            "TS_DISABLE_PORTMAPPER": "1",
            "TS_ASSUME_NETWORK_UP_FOR_TEST": "1",
            "TS_NETCHECK_GENERATE_204_URL": control_url + "/generate_204",
            "HOME": str(state),
        }
        self.proc = ns.popen([str(bins.tailscaled), "--tun=userspace-networking", "--no-logs-no-support",
                              f"--statedir={state}", f"--socket={self.sock}", "--port=41641"], env=env)
        wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 20, "tailscaled socket")
        assert self.proc.poll() is None, self.proc.log()[-3000:]

    def cli(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        cmd = self.ns.exec_args([str(self.bins.tailscale), f"--socket={self.sock}", *args])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"tailscale {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}\n"
                                 f"--- tailscaled log ---\n{self.proc.log()[-4000:]}")
        return out.stdout

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json"))


def test_two_tailscaled_join_our_control(lab: Lab, tailscale_binaries: TailscaleBinaries, tmp_path: Path) -> None:
    ctl, n1, n2 = lab.namespace("ctl"), lab.namespace("n1"), lab.namespace("n2")
    l1, l2 = lab.link(ctl, n1), lab.link(ctl, n2)
    ctl.enable_forwarding()
    n1.add_route(str(l2.subnet), via=l1.a_addr)
    n2.add_route(str(l1.subnet), via=l2.a_addr)
    state = tmp_path / "control"
    authkey = _tsnet("control", "authkey", "create", "--state-dir", str(state), "--reusable").strip()
    assert authkey.startswith("tskey-auth-") and "\n" not in authkey

    server = ctl.popen([sys.executable, "-m", "tsnet", "control", "serve", "--listen", f"0.0.0.0:{CONTROL_PORT}",
                       "--advertise-host", str(l1.a_addr), "--state-dir", str(state),
                       "--stun-port", str(STUN_PORT), "-v"],
                      env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
    url1 = f"http://{l1.a_addr}:{CONTROL_PORT}"
    url2 = f"http://{l2.a_addr}:{CONTROL_PORT}"
    wait_until(lambda: "publicKey" in n1.run(["curl", "-s", "-m", "2", url1 + "/key?v=133"], check=False)
               or server.poll() is not None, 30, "control server up")
    assert server.poll() is None, server.log()

    nodes = []
    try:
        for ns, url, name in ((n1, url1, "alpha"), (n2, url2, "beta")):
            st = tmp_path / name
            st.mkdir()
            node = Node(lab, ns, tailscale_binaries, st, url, name)
            nodes.append(node)
            node.cli("up", f"--login-server={url}", f"--authkey={authkey}", f"--hostname={name}", "--timeout=60s",
                     timeout=90)
        a, b = nodes

        def peers_visible() -> bool:
            for me, other in ((a, b), (b, a)):
                st = me.status()
                names = [p.get("HostName") for p in (st.get("Peer") or {}).values()]
                if other.name not in names:
                    return False
            return True

        wait_until(peers_visible, 30, "both nodes list each other")
        sa, sb = a.status(), b.status()
        assert sa["BackendState"] == "Running" and sb["BackendState"] == "Running"
        a_ips = sa["Self"]["TailscaleIPs"]
        b_ips = sb["Self"]["TailscaleIPs"]
        assert any(ip.startswith("100.") for ip in a_ips) and any(ip.startswith("fd7a:115c:a1e0:") for ip in a_ips)
        (peer_b,) = sa["Peer"].values()
        assert sorted(peer_b["TailscaleIPs"]) == sorted(b_ips)
        assert peer_b["DNSName"] == "beta.tailnet.test."
        assert sa["MagicDNSSuffix"] == "tailnet.test"
        listed = json.loads(_tsnet("control", "nodes", "list", "--json", "--state-dir", str(state)))
        assert sorted(n["name"] for n in listed) == ["alpha", "beta"]
        assert sorted(listed[1]["addresses"]) == sorted(b_ips)

        b_v4 = next(ip for ip in b_ips if ip.startswith("100."))
        out = a.cli("ping", "--c", "10", "--timeout", "5s", b_v4, timeout=60)
        print(out)
        assert "pong from beta" in out, out
    finally:
        for node in nodes:
            print(f"--- tailscaled {node.name} ---\n{node.proc.log()[-3000:]}")
        print(f"--- control server ---\n{server.log()[-5000:]}")
