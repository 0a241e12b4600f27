"""Shared pytest setup: makes ``tests.lab`` importable and provides the lab fixtures."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.lab import Lab, TailscaleBinaries, ensure_tailscale_binaries  # noqa: E402


def require_root() -> None:
    """Lab tests need root for namespaces; fail (never skip) without it."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, veth, iptables)", pytrace=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh :class:`tests.lab.Lab`; everything it made is removed after the test, pass or fail."""
    require_root()
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="session")
def tailscale_binaries() -> TailscaleBinaries:
    """Real tailscaled/tailscale 1.96.4 (downloaded once into the cache). Fails loudly if unavailable."""
    return ensure_tailscale_binaries()


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """Sockets a test makes (append them); all closed at teardown."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()
