"""Build the DERPMap JSON that points tailscaled at one of our servers (notes §6.1)."""

from __future__ import annotations

__all__ = ["single_region_derp_map"]


def single_region_derp_map(
    port: int,
    *,
    region_id: int = 900,
    host: str = "127.0.0.1",
    stun_port: int = -1,
    insecure_for_tests: bool = False,
    cert_name: str = "",
    region_code: str = "test",
) -> dict:
    """A one-region, one-node DERPMap (Go JSON field names) for a test server.

    Use ``insecure_for_tests`` with a throwaway certificate, or ``cert_name``
    (``sha256-raw:<hex>``, see :class:`tsnet.derp.tls.SelfSignedCert`) to pin it;
    plain HTTP needs ``TS_DEBUG_USE_DERP_HTTP=1`` on tailscaled. ``stun_port=-1``
    when no STUN responder runs. Send the identical map every time: a changed
    region definition makes tailscaled reconnect.
    """
    node: dict[str, object] = {
        "Name": f"{region_id}a",
        "RegionID": region_id,
        "HostName": host,
        "IPv4": host,
        "IPv6": "none",
        "DERPPort": port,
        "STUNPort": stun_port,
    }
    if stun_port != -1:
        node["STUNTestIP"] = host
    if insecure_for_tests:
        node["InsecureForTests"] = True
    if cert_name:
        node["CertName"] = cert_name
    return {
        "Regions": {
            str(region_id): {
                "RegionID": region_id,
                "RegionCode": region_code,
                "RegionName": region_code.title(),
                "Nodes": [node],
            }
        },
        "omitDefaultRegions": True,
    }
