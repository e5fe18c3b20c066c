"""SQLite metadata store: the only source of truth for snapshot keys and names.

Invariants:

- One SQLite transaction per operation. Read transactions use BEGIN, which
  WAL mode lets run beside a writer. Write transactions use BEGIN IMMEDIATE,
  so two writers queue on SQLite's lock instead of failing halfway.
- Waiting for the lock is bounded by `lock_timeout`; past it the operation
  fails with UnavailableError and changes nothing.
- Each thread gets its own connection, so one store object serves a threaded
  gRPC server.
- Snapshot ids are never reused (AUTOINCREMENT), so a directory named by an
  id belongs to one snapshot for the life of the root.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lamina.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NoSpaceError,
    NotFoundError,
    UnavailableError,
)
from lamina.metadata.schema import MIGRATIONS, current_version
from lamina.snapshots.types import Info, Kind, Usage

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT = 30.0


def now_ns() -> int:
    return time.time_ns()


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


@dataclass(frozen=True)
class SnapshotRecord:
    """One row of the snapshots table, with the parent's key resolved."""

    snapshot_id: int
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    created: int
    updated: int
    size: int | None
    inodes: int | None

    @property
    def usage(self) -> Usage | None:
        if self.size is None or self.inodes is None:
            return None
        return Usage(self.size, self.inodes)


_RECORD_COLUMNS = (
    "s.id, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.created, s.updated, s.size, s.inodes"
)
_RECORD_FROM = "snapshots AS s LEFT JOIN snapshots AS p ON p.id = s.parent_id"


def _record(row: Sequence[object]) -> SnapshotRecord:
    snapshot_id, key, kind, parent_id, parent, created, updated, size, inodes = row
    assert isinstance(snapshot_id, int)
    assert isinstance(key, str)
    assert isinstance(kind, int)
    assert isinstance(parent, str)
    assert isinstance(created, int)
    assert isinstance(updated, int)
    return SnapshotRecord(
        snapshot_id=snapshot_id,
        key=key,
        kind=Kind(kind),
        parent_id=parent_id if isinstance(parent_id, int) else None,
        parent=parent,
        created=created,
        updated=updated,
        size=size if isinstance(size, int) else None,
        inodes=inodes if isinstance(inodes, int) else None,
    )


def _out_of_space(err: sqlite3.Error, path: Path) -> bool:
    name = getattr(err, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return True
    # Creating or growing the -shm and -wal files on a full disk fails as an
    # I/O error, not SQLITE_FULL, so the free space decides which it is.
    if name.startswith("SQLITE_IOERR"):
        try:
            return os.statvfs(path.parent).f_bavail == 0
        except OSError:
            return False
    return False


class Transaction:
    """One open SQLite transaction; every method runs inside it."""

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self.conn = conn
        self.writable = writable

    # ------------------------------------------------------------ reads

    def find(self, key: str) -> SnapshotRecord | None:
        row = self.conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM {_RECORD_FROM} WHERE s.key = ?", (key,)
        ).fetchone()
        return _record(row) if row is not None else None

    def get(self, key: str, operation: str) -> SnapshotRecord:
        record = self.find(key)
        if record is None:
            raise NotFoundError(f"{operation} {key!r}: snapshot does not exist", subject=key)
        return record

    def labels(self, snapshot_id: int) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT name, value FROM labels WHERE snapshot_id = ?", (snapshot_id,)
        )
        return {name: value for name, value in rows}

    def info(self, record: SnapshotRecord) -> Info:
        return Info(
            name=record.key,
            kind=record.kind,
            parent=record.parent,
            labels=self.labels(record.snapshot_id),
            created=ns_to_datetime(record.created),
            updated=ns_to_datetime(record.updated),
        )

    def ancestor_ids(self, record: SnapshotRecord) -> list[int]:
        """Return the ids of RECORD's parent chain, nearest parent first."""
        if record.parent_id is None:
            return []
        rows = self.conn.execute(
            """
            WITH RECURSIVE chain(id, depth) AS (
                SELECT ?, 0
                UNION ALL
                SELECT s.parent_id, chain.depth + 1 FROM snapshots AS s
                JOIN chain ON s.id = chain.id WHERE s.parent_id IS NOT NULL
            )
            SELECT id FROM chain ORDER BY depth
            """,
            (record.parent_id,),
        ).fetchall()
        return [row[0] for row in rows]

    def has_children(self, snapshot_id: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)
        ).fetchone()
        return row is not None

    def page(self, after_id: int, limit: int) -> list[tuple[SnapshotRecord, dict[str, str]]]:
        """Return up to LIMIT records with ids above AFTER_ID, in id order, with labels."""
        records = [
            _record(row)
            for row in self.conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM {_RECORD_FROM} WHERE s.id > ? "
                "ORDER BY s.id LIMIT ?",
                (after_id, limit),
            )
        ]
        if not records:
            return []
        labels: dict[int, dict[str, str]] = {r.snapshot_id: {} for r in records}
        for snapshot_id, name, value in self.conn.execute(
            "SELECT snapshot_id, name, value FROM labels WHERE snapshot_id BETWEEN ? AND ?",
            (records[0].snapshot_id, records[-1].snapshot_id),
        ):
            if snapshot_id in labels:
                labels[snapshot_id][name] = value
        return [(r, labels[r.snapshot_id]) for r in records]

    def page_with_label(
        self, name: str, value: str, after_id: int, limit: int
    ) -> list[tuple[SnapshotRecord, dict[str, str]]]:
        """Like `page`, but only snapshots whose label NAME equals VALUE (uses the index)."""
        records = [
            _record(row)
            for row in self.conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM labels AS l JOIN snapshots AS s "
                "ON s.id = l.snapshot_id LEFT JOIN snapshots AS p ON p.id = s.parent_id "
                "WHERE l.name = ? AND l.value = ? AND l.snapshot_id > ? "
                "ORDER BY l.snapshot_id LIMIT ?",
                (name, value, after_id, limit),
            )
        ]
        return [(r, self.labels(r.snapshot_id)) for r in records]

    def snapshot_ids(self) -> set[int]:
        return {row[0] for row in self.conn.execute("SELECT id FROM snapshots")}

    def committed_ids(self) -> set[int]:
        return {
            row[0]
            for row in self.conn.execute(
                "SELECT id FROM snapshots WHERE kind = ?", (int(Kind.COMMITTED),)
            )
        }

    # ------------------------------------------------------------ writes

    def _require_writable(self) -> None:
        if not self.writable:
            raise InternalError("write attempted in a read-only transaction")

    def create(
        self, key: str, kind: Kind, parent: str, labels: Mapping[str, str], operation: str
    ) -> SnapshotRecord:
        """Insert a new Active or View snapshot; check the key and the parent."""
        self._require_writable()
        if self.find(key) is not None:
            raise AlreadyExistsError(f"{operation} {key!r}: snapshot already exists", subject=key)
        parent_id: int | None = None
        if parent:
            parent_record = self.find(parent)
            if parent_record is None:
                raise NotFoundError(
                    f"{operation} {key!r}: parent {parent!r} does not exist", subject=key
                )
            if parent_record.kind is not Kind.COMMITTED:
                raise FailedPreconditionError(
                    f"{operation} {key!r}: parent {parent!r} is {parent_record.kind}, "
                    "only a Committed snapshot can be a parent",
                    subject=key,
                )
            parent_id = parent_record.snapshot_id
        stamp = now_ns()
        cursor = self.conn.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created, updated) VALUES (?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, stamp, stamp),
        )
        snapshot_id = cursor.lastrowid
        assert snapshot_id is not None
        self._insert_labels(snapshot_id, labels)
        return self.get(key, operation)

    def _insert_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
            [(snapshot_id, name, value) for name, value in labels.items()],
        )

    def commit_active(
        self, key: str, name: str, labels: Mapping[str, str], usage: Usage, operation: str
    ) -> SnapshotRecord:
        """Turn the Active snapshot KEY into the Committed snapshot NAME, same id."""
        self._require_writable()
        record = self.get(key, operation)
        if record.kind is not Kind.ACTIVE:
            raise FailedPreconditionError(
                f"{operation} {key!r}: snapshot is {record.kind}, only an Active snapshot "
                "can be committed",
                subject=key,
            )
        if self.find(name) is not None:
            raise AlreadyExistsError(
                f"{operation} {key!r}: a snapshot named {name!r} already exists", subject=name
            )
        stamp = now_ns()
        self.conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, size = ?, "
            "inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), stamp, stamp, usage.size, usage.inodes, record.snapshot_id),
        )
        # A commit starts the committed snapshot with the labels it is given,
        # as containerd's metadata store does.
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (record.snapshot_id,))
        self._insert_labels(record.snapshot_id, labels)
        return self.get(name, operation)

    def remove(self, key: str, operation: str) -> SnapshotRecord:
        """Delete snapshot KEY; FailedPreconditionError while it has children."""
        self._require_writable()
        record = self.get(key, operation)
        if self.has_children(record.snapshot_id):
            raise FailedPreconditionError(
                f"{operation} {key!r}: snapshot has children; remove them first", subject=key
            )
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (record.snapshot_id,))
        self.conn.execute("DELETE FROM snapshots WHERE id = ?", (record.snapshot_id,))
        return record

    def update_labels(
        self, key: str, labels: Mapping[str, str], fieldpaths: Sequence[str], operation: str
    ) -> SnapshotRecord:
        """Apply an update of labels by field paths, as containerd's Update does."""
        self._require_writable()
        record = self.get(key, operation)
        current = self.labels(record.snapshot_id)
        # An empty value never becomes a label; it deletes one.
        replacement = {name: value for name, value in labels.items() if value}
        if not fieldpaths:
            current = replacement
        for path in fieldpaths:
            if path == "labels":
                current = dict(replacement)
            elif path.startswith("labels.") and len(path) > len("labels."):
                label = path[len("labels.") :]
                value = labels.get(label, "")
                if value:
                    current[label] = value
                else:
                    current.pop(label, None)
            else:
                raise InvalidArgumentError(
                    f"{operation} {key!r}: cannot update field path {path!r}; only "
                    "'labels' and 'labels.NAME' can change",
                    subject=key,
                )
        self.conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (record.snapshot_id,))
        self._insert_labels(record.snapshot_id, current)
        self.conn.execute(
            "UPDATE snapshots SET updated = ? WHERE id = ?",
            (max(now_ns(), record.updated + 1), record.snapshot_id),
        )
        return self.get(key, operation)

    def set_usage(self, snapshot_id: int, usage: Usage) -> None:
        self._require_writable()
        self.conn.execute(
            "UPDATE snapshots SET size = ?, inodes = ? WHERE id = ?",
            (usage.size, usage.inodes, snapshot_id),
        )


class MetadataStore:
    """The SQLite database at ROOT/metadata.db, opened per thread."""

    def __init__(self, path: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._migrate()

    # ------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self._enable_wal(conn)
            # NORMAL in WAL mode keeps the database consistent across a crash
            # of the process; a power loss may drop the last transactions.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.OperationalError as err:
            raise self._translate(err, "open") from err
        except sqlite3.DatabaseError as err:
            if _out_of_space(err, self.path):
                raise self._translate(err, "open") from err
            raise InternalError(
                f"open metadata store {self.path}: {err}; run 'lamina fsck' or restore a backup",
                subject=str(self.path),
            ) from err
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a new database to WAL needs an exclusive lock, and SQLite
        # reports "locked" at once instead of calling the busy handler, so
        # two processes opening a fresh root wait here, within the bound.
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() >= deadline:
                    raise
                log.debug("metadata store %s: waiting to switch to WAL mode", self.path)
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise FailedPreconditionError(
                f"metadata store {self.path} is closed", subject=str(self.path)
            )
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _translate(self, err: sqlite3.Error, operation: str) -> Exception:
        text = str(err)
        if _out_of_space(err, self.path):
            return NoSpaceError(
                f"{operation}: no space left for metadata store {self.path}; free space "
                "and retry",
                subject=str(self.path),
            )
        if "locked" in text or "busy" in text:
            return UnavailableError(
                f"{operation}: metadata store {self.path} stayed locked by another process "
                f"for {self.lock_timeout:g} s; retry, or find the process holding it",
                subject=str(self.path),
            )
        return InternalError(f"{operation}: metadata store {self.path}: {err}")

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, writable: bool, operation: str) -> Iterator[Transaction]:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE" if writable else "BEGIN")
        except sqlite3.OperationalError as err:
            raise self._translate(err, operation) from err
        try:
            yield Transaction(conn, writable)
        except sqlite3.OperationalError as err:
            self._rollback(conn)
            raise self._translate(err, operation) from err
        except BaseException:
            self._rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            self._rollback(conn)
            raise self._translate(err, operation) from err

    def _rollback(self, conn: sqlite3.Connection) -> None:
        # SQLite may have rolled back already (after a full disk, for one).
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def read(self, operation: str = "read") -> AbstractContextManager[Transaction]:
        """Open a read transaction; it sees one consistent state of the store."""
        return self._transaction(False, operation)

    def write(self, operation: str = "write") -> AbstractContextManager[Transaction]:
        """Open a write transaction: committed on normal exit, rolled back on an exception."""
        return self._transaction(True, operation)

    # ------------------------------------------------------------ schema

    def _migrate(self) -> None:
        conn = self._connection()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > current_version():
            raise FailedPreconditionError(
                f"metadata store {self.path} has schema version {version}, newer than "
                f"{current_version()} of this Lamina; upgrade Lamina",
                subject=str(self.path),
            )
        if version == current_version():
            return
        with self.write("migrate") as tx:
            # Read again under the write lock: another process may have migrated.
            version = tx.conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, current_version()):
                if version == 0:
                    log.debug("creating schema version %d of %s", step + 1, self.path)
                else:
                    log.info("migrating metadata store %s to version %d", self.path, step + 1)
                MIGRATIONS[step](tx.conn)
                tx.conn.execute(f"PRAGMA user_version = {step + 1}")

    def schema_version(self) -> int:
        with self.read("schema version") as tx:
            version: int = tx.conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    def close(self) -> None:
        """Close every connection of every thread; later calls raise."""
        if self._closed:
            return
        self._closed = True
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
