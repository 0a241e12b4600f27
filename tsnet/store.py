"""State stores: where a node keeps its machine and node keys between runs.

A store is a small key/value map of bytes. Three kinds ship with tsnet:

* :class:`FileStore` (a directory; the default): ``tsnet-state.json`` written atomically, and a
  ``tsnet.lock`` file locked with ``fcntl.flock`` while a Server uses the directory, so a second
  Server (in this or another process) fails fast with :class:`~tsnet.errors.StateDirInUseError`.
* :class:`MemoryStore` (``mem:``): nothing survives the process. Only valid for ephemeral nodes,
  as in Go tsnet, since a persistent node would leave a fresh node behind on every start.
* :class:`EnvStore` (``env:VARNAME``): state read from an environment variable (serverless
  platforms inject settings this way); writes update the variable in this process only, so a warm
  container reuses the identity. :meth:`Store.export` produces the value to put there.

:func:`store_from_spec` turns a ``TS_STATE``-style string into a store: ``mem:``, ``env:NAME``, or
a directory path (``file:`` prefix optional).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import tempfile
from pathlib import Path

from .errors import ConfigError, StateDirInUseError

__all__ = ["EnvStore", "FileStore", "MemoryStore", "Store", "store_from_spec"]


class Store:
    """Base class: a map of ``str`` keys to ``bytes`` values, plus an exclusive lock while in use."""

    #: True for stores that forget everything when the process ends.
    volatile: bool = False

    def read(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None."""
        raise NotImplementedError

    def write(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (durably, for persistent stores)."""
        raise NotImplementedError

    def lock(self) -> None:
        """Take exclusive use of the store; raises :class:`StateDirInUseError` if someone else has it."""

    def unlock(self) -> None:
        """Release :meth:`lock` (idempotent)."""

    def keys(self) -> list[str]:
        """Every key present."""
        raise NotImplementedError

    def export(self) -> str:
        """All entries as one JSON string (values base64), e.g. for an :class:`EnvStore` variable."""
        return json.dumps({k: base64.b64encode(self.read(k) or b"").decode() for k in sorted(self.keys())})


def _decode_export(text: str, where: str) -> dict[str, bytes]:
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return {str(k): base64.b64decode(str(v), validate=True) for k, v in obj.items()}
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"{where}: not a tsnet state export ({exc})") from None


class MemoryStore(Store):
    """State kept in memory only (``mem:``)."""

    volatile = True

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def read(self, key: str) -> bytes | None:
        return self._data.get(key)

    def write(self, key: str, value: bytes) -> None:
        self._data[key] = bytes(value)

    def keys(self) -> list[str]:
        return list(self._data)


class EnvStore(Store):
    """State in an environment variable holding :meth:`Store.export` output (``env:NAME``).

    A missing or empty variable is an empty store. Writes update ``os.environ[name]`` in this process.
    """

    def __init__(self, name: str) -> None:
        if not name:
            raise ConfigError("env: store needs a variable name, e.g. env:TS_STATE_DATA")
        self.name = name
        raw = os.environ.get(name, "")
        self._data = _decode_export(raw, f"environment variable {name}") if raw.strip() else {}

    def read(self, key: str) -> bytes | None:
        return self._data.get(key)

    def write(self, key: str, value: bytes) -> None:
        self._data[key] = bytes(value)
        os.environ[self.name] = self.export()

    def keys(self) -> list[str]:
        return list(self._data)


class FileStore(Store):
    """State in a directory: ``tsnet-state.json`` plus the ``tsnet.lock`` lock file."""

    FILE = "tsnet-state.json"
    LOCK = "tsnet.lock"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock_fd: int | None = None
        self._data: dict[str, bytes] | None = None

    def _load(self) -> dict[str, bytes]:
        if self._data is None:
            path = self.directory / self.FILE
            try:
                text = path.read_text()
            except FileNotFoundError:
                text = ""
            self._data = _decode_export(text, str(path)) if text.strip() else {}
        return self._data

    def read(self, key: str) -> bytes | None:
        return self._load().get(key)

    def write(self, key: str, value: bytes) -> None:
        data = self._load()
        data[key] = bytes(value)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Write a temporary file and rename it over the old one: a crash never leaves half a state.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tsnet-state.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.export())
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.directory / self.FILE)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def keys(self) -> list[str]:
        return list(self._load())

    def lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create state directory {self.directory}: {exc}") from None
        fd = os.open(self.directory / self.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # flock locks belong to the open file description, so a second Server in the same
            # process (which opens the file again) is refused just like another process.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUseError(
                f"state directory {self.directory} is in use by another tsnet Server "
                f"(in this or another process); give each Server its own state_dir"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._data = None  # re-read: the previous holder may have written

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def store_from_spec(spec: str) -> Store:
    """A store from a ``TS_STATE``-style string: ``mem:``, ``env:NAME``, ``file:DIR`` or a directory path."""
    text = spec.strip()
    if not text:
        raise ConfigError("empty state store spec; use mem:, env:NAME or a directory")
    if text == "mem:" or text == "mem":
        return MemoryStore()
    if text.startswith("env:"):
        return EnvStore(text[4:])
    if text.startswith("file:"):
        text = text[5:]
    elif ":" in text.split("/", 1)[0] and not text.startswith("/"):
        raise ConfigError(f"unsupported state store {spec!r}; use mem:, env:NAME or a directory")
    return FileStore(os.path.expanduser(text))
