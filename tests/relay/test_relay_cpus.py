"""How many SO_REUSEPORT sockets the relay server opens: the CPUs the process may really use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tsnet.relay.driver import open_udp_sockets, usable_cpu_count

AFFINITY = len(os.sched_getaffinity(0))


def _cgroup(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_no_cgroup_limit_means_the_affinity_mask(tmp_path: Path) -> None:
    assert usable_cpu_count(tmp_path) == AFFINITY  # no files at all
    assert usable_cpu_count(_cgroup(tmp_path, **{"cpu.max": "max 100000\n"})) == AFFINITY


@pytest.mark.parametrize(("quota", "expected"), [("50000 100000", 1), ("100000 100000", 1), ("150000 100000", 2)])
def test_cgroup_v2_quota_caps_the_count(tmp_path: Path, quota: str, expected: int) -> None:
    assert usable_cpu_count(_cgroup(tmp_path, **{"cpu.max": quota + "\n"})) == min(AFFINITY, expected)


def test_cgroup_v1_quota_caps_the_count(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, **{"cpu__cpu.cfs_quota_us": "50000\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert usable_cpu_count(root) == 1
    unlimited = _cgroup(tmp_path / "u", **{"cpu__cpu.cfs_quota_us": "-1\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert usable_cpu_count(unlimited) == AFFINITY


def test_garbage_in_the_cgroup_files_is_ignored(tmp_path: Path) -> None:
    assert usable_cpu_count(_cgroup(tmp_path, **{"cpu.max": "lots\n"})) == AFFINITY


def test_group_shares_one_port_and_defaults_to_usable_cpus() -> None:
    socks = open_udp_sockets("127.0.0.1", 0)
    try:
        assert len(socks) == usable_cpu_count()
        assert len({s.getsockname() for s in socks}) == 1
    finally:
        for s in socks:
            s.close()
    with pytest.raises(ValueError):
        open_udp_sockets("127.0.0.1", 0, count=0)
