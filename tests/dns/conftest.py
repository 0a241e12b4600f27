"""Fixtures for the MagicDNS tests."""

from __future__ import annotations

import pytest
from dnstest_helpers import make_config

from tsnet.dns.core import MagicDNS


@pytest.fixture
def magic() -> MagicDNS:
    return MagicDNS(make_config())
