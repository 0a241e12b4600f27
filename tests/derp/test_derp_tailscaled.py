"""Real tailscaled 1.96.4 relays through our standalone ``tsnet derper`` over TLS.

Topology (lab namespaces, no route out):  n1 --veth-- ctl --veth-- n2, no forwarding.
``ctl`` runs ``tsnet control serve --derp-map`` (no embedded DERP) and ``tsnet derper``
with TLS + STUN on the link-1 address; n2 reaches that address through ctl. The
nodes can only meet through our DERP. Two ways to trust our certificate, as the
notes describe: ``InsecureForTests`` (a throwaway self-signed cert) and a pinned
``CertName: sha256-raw:<hex>``. No TS_DEBUG_USE_DERP_HTTP: tailscaled speaks TLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import Lab, TailscaleBinaries, wait_until
from tests.lab.tailscaled import start_tailscaled
from tsnet.derp.derpmap import single_region_derp_map
from tsnet.derp.tls import generate_self_signed

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
CONTROL_PORT = 8080
DERP_PORT = 8443
STUN_PORT = 3478


def _tsnet(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tsnet", *args], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("trust", ["insecure_for_tests", "pinned_cert_name"])
def test_tailscaled_relays_through_our_tls_derper(lab: Lab, tailscale_binaries: TailscaleBinaries,
                                                   tmp_path: Path, trust: str) -> None:
    bins = tailscale_binaries
    ctl, n1, n2 = lab.namespace("ctl"), lab.namespace("n1"), lab.namespace("n2")
    l1, l2 = lab.link(ctl, n1), lab.link(ctl, n2)
    n2.add_route(str(l1.subnet), via=l2.a_addr)
    derp_host = str(l1.a_addr)

    cert = generate_self_signed(derp_host)
    (tmp_path / "cert.pem").write_bytes(cert.cert_pem)
    (tmp_path / "key.pem").write_bytes(cert.key_pem)
    if trust == "insecure_for_tests":
        derp_map = single_region_derp_map(DERP_PORT, host=derp_host, stun_port=STUN_PORT, insecure_for_tests=True)
    else:
        derp_map = single_region_derp_map(DERP_PORT, host=derp_host, stun_port=STUN_PORT, cert_name=cert.cert_name)
    (tmp_path / "derpmap.json").write_text(json.dumps(derp_map))

    derper = ctl.popen([sys.executable, "-m", "tsnet", "derper", "--listen", f"{derp_host}:{DERP_PORT}",
                        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
                        "--stun-port", str(STUN_PORT)], env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
    state = tmp_path / "control"
    authkey = _tsnet("control", "authkey", "create", "--state-dir", str(state), "--reusable").strip()
    control = ctl.popen([sys.executable, "-m", "tsnet", "control", "serve", "--listen", f"0.0.0.0:{CONTROL_PORT}",
                         "--advertise-host", derp_host, "--state-dir", str(state),
                         "--derp-map", str(tmp_path / "derpmap.json")], env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
    url1 = f"http://{l1.a_addr}:{CONTROL_PORT}"
    url2 = f"http://{l2.a_addr}:{CONTROL_PORT}"
    try:
        wait_until(lambda: "publicKey" in n1.run(["curl", "-s", "-m", "2", url1 + "/key?v=133"], check=False)
                   or control.poll() is not None, 30, "control server up")
        wait_until(lambda: "200" in n1.run(["curl", "-sk", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                                            f"https://{derp_host}:{DERP_PORT}/derp/probe"], check=False)
                   or derper.poll() is not None, 30, "derper up")
        assert control.poll() is None and derper.poll() is None, control.log() + derper.log()

        nodes = []
        for ns, url, name in ((n1, url1, "alpha"), (n2, url2, "beta")):
            env = {"TS_NO_LOGS_NO_SUPPORT": "true", "TS_DISABLE_PORTMAPPER": "1",
                   "TS_ASSUME_NETWORK_UP_FOR_TEST": "1", "HOME": str(tmp_path)}
            proc, sock = start_tailscaled(ns, bins, env=env, port=41641)
            wait_until(lambda: sock.exists() or proc.poll() is not None, 20, "tailscaled socket")
            assert proc.poll() is None, proc.log()[-3000:]
            nodes.append((ns, sock, proc, name))
        for ns, sock, proc, name in nodes:
            url = url1 if ns is n1 else url2
            ns.run([str(bins.tailscale), f"--socket={sock}", "up", f"--login-server={url}", f"--authkey={authkey}",
                    f"--hostname={name}", "--timeout=60s"], timeout=90)

        def status(i: int) -> dict:
            ns, sock, _, _ = nodes[i]
            return json.loads(ns.run([str(bins.tailscale), f"--socket={sock}", "status", "--json"]))

        wait_until(lambda: len(status(0).get("Peer") or {}) == 1 and len(status(1).get("Peer") or {}) == 1, 30,
                   "nodes see each other")
        b_ip = next(ip for ip in status(1)["Self"]["TailscaleIPs"] if ip.startswith("100."))
        ns, sock, _, _ = nodes[0]
        out = ns.run([str(bins.tailscale), f"--socket={sock}", "ping", "--c", "5", "--timeout", "5s", b_ip],
                     timeout=60, check=False)
        assert "pong from beta" in out and "via DERP(test)" in out, out
        # netcheck's STUN probe is answered by our responder (derper-exact bytes), so UDP counts as working.
        out = ns.run([str(bins.tailscale), f"--socket={sock}", "netcheck"], timeout=60, check=False)
        assert "UDP: true" in out and f"IPv4: yes, {l1.b_addr}:" in out, out
    finally:
        for _, _, proc, name in locals().get("nodes", []):
            print(f"--- tailscaled {name} ---\n{proc.log()[-3000:]}")
        print(f"--- derper ---\n{derper.log()[-3000:]}\n--- control ---\n{control.log()[-3000:]}")
