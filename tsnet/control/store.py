"""Persistent state of the coordination server: SQLite (stdlib ``sqlite3``, WAL).

One file ``control.db`` in the state directory, mode 0600 (directory 0700). It
holds the schema version, the server's Noise private key, users, pre-auth keys
and nodes. All calls are synchronous and short; the server calls them from its
trio tasks directly (a local SQLite write takes well under a millisecond).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..key import MachinePrivate

__all__ = ["SCHEMA_VERSION", "AuthKey", "NodeRecord", "PendingLogin", "Store", "StoreError", "UserRecord"]

SCHEMA_VERSION = 1
_DB_NAME = "control.db"

IPV4_RANGE = ipaddress.IPv4Network("100.64.0.0/10")
IPV6_PREFIX = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
_RESERVED_V4 = {ipaddress.IPv4Address("100.100.100.100")}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    login_name TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS authkeys (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    reusable INTEGER NOT NULL,
    ephemeral INTEGER NOT NULL,
    tags TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT,
    revoked INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reuse a NodeID: clients key peer state on it
    stable_id TEXT NOT NULL UNIQUE,
    machine_key TEXT NOT NULL,
    node_key TEXT NOT NULL UNIQUE,
    disco_key TEXT,
    name TEXT NOT NULL UNIQUE,
    user_id INTEGER NOT NULL,
    ipv4 TEXT NOT NULL UNIQUE,
    ipv6 TEXT NOT NULL UNIQUE,
    ephemeral INTEGER NOT NULL,
    tags TEXT NOT NULL,
    created TEXT NOT NULL,
    key_expiry TEXT,
    logged_out INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT,
    hostinfo TEXT,
    endpoints TEXT NOT NULL DEFAULT '[]',
    home_derp INTEGER NOT NULL DEFAULT 0,
    cap INTEGER NOT NULL DEFAULT 0,
    authkey_id INTEGER
);
CREATE INDEX IF NOT EXISTS nodes_machine ON nodes(machine_key);
CREATE TABLE IF NOT EXISTS pending_logins (
    token TEXT PRIMARY KEY,
    machine_key TEXT NOT NULL,
    node_key TEXT NOT NULL,
    hostname TEXT NOT NULL,
    created TEXT NOT NULL,
    approved INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """An interactive login waiting for an administrator (``tsnet control nodes approve TOKEN``)."""

    token: str
    machine_key: str
    node_key: str
    hostname: str
    created: _dt.datetime
    approved: bool


class StoreError(Exception):
    """The state directory or database is unusable (or a referenced row does not exist)."""


def _ts(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(_dt.timezone.utc).isoformat()


def _dt_or_none(text: str | None) -> _dt.datetime | None:
    return None if text is None else _dt.datetime.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    login_name: str
    display_name: str
    created: _dt.datetime


@dataclass(frozen=True, slots=True)
class AuthKey:
    id: int
    key: str
    reusable: bool
    ephemeral: bool
    tags: tuple[str, ...]
    created: _dt.datetime
    expires: _dt.datetime | None
    revoked: bool
    used: int

    def usable(self, now: _dt.datetime) -> str | None:
        """None if the key may register a node now, else the reason it may not."""
        if self.revoked:
            return "auth key revoked"
        if self.expires is not None and now >= self.expires:
            return "auth key expired"
        if not self.reusable and self.used > 0:
            return "auth key already used"
        return None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: int
    stable_id: str
    machine_key: str
    node_key: str
    disco_key: str | None
    name: str
    user_id: int
    ipv4: str
    ipv6: str
    ephemeral: bool
    tags: tuple[str, ...]
    created: _dt.datetime
    key_expiry: _dt.datetime | None
    logged_out: bool
    last_seen: _dt.datetime | None
    hostinfo: dict | None
    endpoints: tuple[str, ...]
    home_derp: int
    cap: int
    authkey_id: int | None

    def expired(self, now: _dt.datetime) -> bool:
        return self.logged_out or (self.key_expiry is not None and now >= self.key_expiry)


_NODE_COLS = (
    "id, stable_id, machine_key, node_key, disco_key, name, user_id, ipv4, ipv6, ephemeral, tags, created, "
    "key_expiry, logged_out, last_seen, hostinfo, endpoints, home_derp, cap, authkey_id"
)


def _node(row: tuple) -> NodeRecord:
    return NodeRecord(
        id=row[0],
        stable_id=row[1],
        machine_key=row[2],
        node_key=row[3],
        disco_key=row[4],
        name=row[5],
        user_id=row[6],
        ipv4=row[7],
        ipv6=row[8],
        ephemeral=bool(row[9]),
        tags=tuple(json.loads(row[10])),
        created=_dt.datetime.fromisoformat(row[11]),
        key_expiry=_dt_or_none(row[12]),
        logged_out=bool(row[13]),
        last_seen=_dt_or_none(row[14]),
        hostinfo=json.loads(row[15]) if row[15] else None,
        endpoints=tuple(json.loads(row[16])),
        home_derp=row[17],
        cap=row[18],
        authkey_id=row[19],
    )


def _authkey(row: tuple) -> AuthKey:
    return AuthKey(
        id=row[0],
        key=row[1],
        reusable=bool(row[2]),
        ephemeral=bool(row[3]),
        tags=tuple(json.loads(row[4])),
        created=_dt.datetime.fromisoformat(row[5]),
        expires=_dt_or_none(row[6]),
        revoked=bool(row[7]),
        used=row[8],
    )


class Store:
    """The server's database. Open with :meth:`open`; every method commits before returning."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> Store:
        directory = Path(state_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
            path = directory / _DB_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(path) + suffix)
                if p.exists():
                    os.chmod(p, 0o600)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open state in {directory}: {exc}") from None
        store = cls(db, path)
        store._migrate()
        return store

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta(name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"state has schema version {row[0]}, newer than this program's {SCHEMA_VERSION}")

    # -- meta ---------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever another connection (e.g. the admin CLI) commits a write."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0])

    def noise_key(self) -> MachinePrivate:
        """The server's persistent Noise private key (created on first use)."""
        row = self.db.execute("SELECT value FROM meta WHERE name='noise_private_key'").fetchone()
        if row is not None:
            return MachinePrivate.parse(row[0])
        key = MachinePrivate.generate()
        self.db.execute("INSERT INTO meta(name, value) VALUES ('noise_private_key', ?)", (str(key),))
        return key

    # -- users --------------------------------------------------------------------------------

    def ensure_user(self, login_name: str, display_name: str, now: _dt.datetime) -> UserRecord:
        row = self.db.execute("SELECT id, login_name, display_name, created FROM users WHERE login_name=?", (login_name,)).fetchone()
        if row is None:
            cur = self.db.execute(
                "INSERT INTO users(login_name, display_name, created) VALUES (?, ?, ?)", (login_name, display_name, _ts(now))
            )
            return UserRecord(cur.lastrowid, login_name, display_name, now)
        return UserRecord(row[0], row[1], row[2], _dt.datetime.fromisoformat(row[3]))

    def users(self) -> list[UserRecord]:
        rows = self.db.execute("SELECT id, login_name, display_name, created FROM users ORDER BY id").fetchall()
        return [UserRecord(r[0], r[1], r[2], _dt.datetime.fromisoformat(r[3])) for r in rows]

    # -- auth keys ----------------------------------------------------------------------------

    def create_authkey(
        self,
        now: _dt.datetime,
        *,
        reusable: bool = False,
        ephemeral: bool = False,
        tags: tuple[str, ...] = (),
        expires: _dt.datetime | None = None,
    ) -> AuthKey:
        # The text must avoid "--TL" (tailnet-lock wrapped keys) and "tskey-client-" (OAuth).
        key = "tskey-auth-" + secrets.token_hex(24)
        cur = self.db.execute(
            "INSERT INTO authkeys(key, reusable, ephemeral, tags, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
            (key, int(reusable), int(ephemeral), json.dumps(list(tags)), _ts(now), _ts(expires)),
        )
        return AuthKey(cur.lastrowid, key, reusable, ephemeral, tuple(tags), now, expires, False, 0)

    def authkey(self, key: str) -> AuthKey | None:
        row = self.db.execute(
            "SELECT id, key, reusable, ephemeral, tags, created, expires, revoked, used FROM authkeys WHERE key=?", (key,)
        ).fetchone()
        return None if row is None else _authkey(row)

    def authkeys(self) -> list[AuthKey]:
        rows = self.db.execute(
            "SELECT id, key, reusable, ephemeral, tags, created, expires, revoked, used FROM authkeys ORDER BY id"
        ).fetchall()
        return [_authkey(r) for r in rows]

    def revoke_authkey(self, key: str) -> bool:
        cur = self.db.execute("UPDATE authkeys SET revoked=1 WHERE key=?", (key,))
        return cur.rowcount > 0

    def mark_authkey_used(self, key_id: int) -> None:
        self.db.execute("UPDATE authkeys SET used=used+1 WHERE id=?", (key_id,))

    # -- interactive logins -------------------------------------------------------------------

    def create_pending(self, now: _dt.datetime, *, machine_key: str, node_key: str, hostname: str) -> PendingLogin:
        token = secrets.token_urlsafe(18)
        self.db.execute(
            "INSERT INTO pending_logins(token, machine_key, node_key, hostname, created) VALUES (?, ?, ?, ?, ?)",
            (token, machine_key, node_key, hostname, _ts(now)),
        )
        return PendingLogin(token, machine_key, node_key, hostname, now, False)

    def pending(self, token: str) -> PendingLogin | None:
        row = self.db.execute(
            "SELECT token, machine_key, node_key, hostname, created, approved FROM pending_logins WHERE token=?", (token,)
        ).fetchone()
        if row is None:
            return None
        return PendingLogin(row[0], row[1], row[2], row[3], _dt.datetime.fromisoformat(row[4]), bool(row[5]))

    def pending_logins(self) -> list[PendingLogin]:
        rows = self.db.execute("SELECT token FROM pending_logins ORDER BY created").fetchall()
        return [p for p in (self.pending(r[0]) for r in rows) if p is not None]

    def approve_pending(self, token: str) -> bool:
        return self.db.execute("UPDATE pending_logins SET approved=1 WHERE token=?", (token,)).rowcount > 0

    def delete_pending(self, token: str) -> None:
        self.db.execute("DELETE FROM pending_logins WHERE token=?", (token,))

    # -- nodes --------------------------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        return [_node(r) for r in self.db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY id").fetchall()]

    def node(self, node_id: int) -> NodeRecord | None:
        row = self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE id=?", (node_id,)).fetchone()
        return None if row is None else _node(row)

    def node_by_key(self, node_key: str) -> NodeRecord | None:
        row = self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE node_key=?", (node_key,)).fetchone()
        return None if row is None else _node(row)

    def node_by_name(self, name: str) -> NodeRecord | None:
        row = self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE name=?", (name,)).fetchone()
        return None if row is None else _node(row)

    def nodes_by_machine(self, machine_key: str) -> list[NodeRecord]:
        rows = self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE machine_key=? ORDER BY id", (machine_key,)).fetchall()
        return [_node(r) for r in rows]

    def _unique_name(self, base: str, exclude_id: int | None = None) -> str:
        name, n = base, 0
        while True:
            row = self.db.execute("SELECT id FROM nodes WHERE name=?", (name,)).fetchone()
            if row is None or row[0] == exclude_id:
                return name
            n += 1
            name = f"{base}-{n}"

    def _allocate_addresses(self) -> tuple[str, str, int]:
        used = {r[0] for r in self.db.execute("SELECT ipv4 FROM nodes").fetchall()}
        base = int(IPV4_RANGE.network_address)
        for offset in range(1, IPV4_RANGE.num_addresses - 1):
            addr = ipaddress.IPv4Address(base + offset)
            if addr in _RESERVED_V4 or str(addr) in used or (offset & 0xFF) in (0, 255):
                continue
            v6 = ipaddress.IPv6Address(int(IPV6_PREFIX.network_address) + offset)
            return str(addr), str(v6), offset
        raise StoreError("IPv4 address space exhausted")

    def create_node(
        self,
        now: _dt.datetime,
        *,
        machine_key: str,
        node_key: str,
        name: str,
        user_id: int,
        ephemeral: bool,
        tags: tuple[str, ...],
        key_expiry: _dt.datetime | None,
        hostinfo: dict | None,
        authkey_id: int | None,
    ) -> NodeRecord:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            ipv4, ipv6, _ = self._allocate_addresses()
            unique = self._unique_name(name)
            cur = self.db.execute(
                "INSERT INTO nodes(stable_id, machine_key, node_key, name, user_id, ipv4, ipv6, ephemeral, tags, created, "
                "key_expiry, hostinfo, authkey_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    "n" + secrets.token_hex(8),
                    machine_key,
                    node_key,
                    unique,
                    user_id,
                    ipv4,
                    ipv6,
                    int(ephemeral),
                    json.dumps(list(tags)),
                    _ts(now),
                    _ts(key_expiry),
                    json.dumps(hostinfo) if hostinfo is not None else None,
                    authkey_id,
                ),
            )
            node_id = cur.lastrowid
        node = self.node(node_id)
        assert node is not None
        return node

    _UPDATABLE = {
        "node_key", "disco_key", "user_id", "ephemeral", "tags", "key_expiry", "logged_out", "last_seen",
        "hostinfo", "endpoints", "home_derp", "cap", "authkey_id",
    }

    def update_node(self, node_id: int, **changes: object) -> NodeRecord:
        """Update columns of one node; values use the NodeRecord Python types."""
        if not changes:
            node = self.node(node_id)
            if node is None:
                raise StoreError(f"no node {node_id}")
            return node
        cols, values = [], []
        for col, value in changes.items():
            if col not in self._UPDATABLE:
                raise StoreError(f"column {col} is not updatable")
            if isinstance(value, _dt.datetime):
                value = _ts(value)
            elif col in ("tags", "endpoints"):
                value = json.dumps(list(value))  # type: ignore[arg-type]
            elif col == "hostinfo":
                value = None if value is None else json.dumps(value)
            elif isinstance(value, bool):
                value = int(value)
            cols.append(f"{col}=?")
            values.append(value)
        values.append(node_id)
        self.db.execute(f"UPDATE nodes SET {', '.join(cols)} WHERE id=?", values)
        node = self.node(node_id)
        if node is None:
            raise StoreError(f"no node {node_id}")
        return node

    def rename_node(self, node_id: int, base: str) -> NodeRecord:
        name = self._unique_name(base, exclude_id=node_id)
        self.db.execute("UPDATE nodes SET name=? WHERE id=?", (name, node_id))
        node = self.node(node_id)
        assert node is not None
        return node

    def delete_node(self, node_id: int) -> bool:
        return self.db.execute("DELETE FROM nodes WHERE id=?", (node_id,)).rowcount > 0
