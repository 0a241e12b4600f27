"""Shared config for the MagicDNS tests (a uniquely named module: tests dirs are not packages)."""

from __future__ import annotations

from tsnet.dns.config import DNSConfig

BASE = "tailnet.test"


def make_config(**overrides: object) -> DNSConfig:
    args: dict = dict(
        base_domain=BASE,
        hosts={
            "alpha": ["100.64.0.1", "fd7a:115c:a1e0::1"],
            "beta.tailnet.test.": ["100.64.0.2/32"],  # IPv4 only
            "gamma": ["fd7a:115c:a1e0::3"],  # IPv6 only
        },
        extra_records=[("db.tailnet.test", "A", "100.64.0.9")],
        routes={"corp.example": ["127.0.0.1:5399"], "local.example": []},
        default_resolvers=["127.0.0.1:5398"],
    )
    args.update(overrides)
    return DNSConfig.build(**args)
