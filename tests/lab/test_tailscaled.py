"""The tailscaled fixture yields working 1.96.4 binaries (runs ``--version`` only)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.lab import TAILSCALE_VERSION, TailscaleBinaries

pytestmark = pytest.mark.interop


def test_tailscale_binaries_are_1_96_4(tailscale_binaries: TailscaleBinaries) -> None:
    assert tailscale_binaries.version == TAILSCALE_VERSION == "1.96.4"
    for binary in (tailscale_binaries.tailscaled, tailscale_binaries.tailscale):
        assert binary.is_file() and os.access(binary, os.X_OK)
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.splitlines()[0] == "1.96.4"
        assert "long version: 1.96.4-" in out
