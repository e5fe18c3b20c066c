"""Schema of the metadata store and its migrations.

`MIGRATIONS[i]` takes a database at schema version i to version i + 1. A new
version appends one entry; entries already released never change, because
existing stores replay them in order. The version lives in SQLite's
`user_version` pragma and is bumped in the same transaction as the DDL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]


def _create_snapshots(conn: sqlite3.Connection) -> None:
    # AUTOINCREMENT: a snapshot id, and so a directory name, is never handed
    # out twice, even after the snapshot holding it was removed.
    conn.execute(
        """
        CREATE TABLE snapshots (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            key       TEXT    NOT NULL UNIQUE,
            kind      INTEGER NOT NULL,
            parent_id INTEGER REFERENCES snapshots(id),
            created   INTEGER NOT NULL,
            updated   INTEGER NOT NULL,
            size      INTEGER,
            inodes    INTEGER
        )
        """
    )
    conn.execute("CREATE INDEX snapshots_parent ON snapshots(parent_id)")
    conn.execute(
        """
        CREATE TABLE labels (
            snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
            name        TEXT    NOT NULL,
            value       TEXT    NOT NULL,
            PRIMARY KEY (snapshot_id, name)
        ) WITHOUT ROWID
        """
    )
    conn.execute("CREATE INDEX labels_name_value ON labels(name, value)")


def _create_images(conn: sqlite3.Connection) -> None:
    # One row per imported image. Snapshots are not referenced by foreign key:
    # an image names its top snapshot by chain id, and removing an image
    # decides which of its snapshots to remove (see lamina.images).
    conn.execute(
        """
        CREATE TABLE images (
            name            TEXT    PRIMARY KEY,
            manifest_digest TEXT    NOT NULL,
            config_digest   TEXT    NOT NULL,
            media_type      TEXT    NOT NULL,
            platform        TEXT    NOT NULL,
            chain_id        TEXT    NOT NULL,
            diff_ids        TEXT    NOT NULL,
            size            INTEGER NOT NULL,
            created         INTEGER NOT NULL,
            updated         INTEGER NOT NULL
        ) WITHOUT ROWID
        """
    )
    conn.execute("CREATE INDEX images_chain_id ON images(chain_id)")


MIGRATIONS: list[Migration] = [
    _create_snapshots,
    _create_images,
]


def current_version() -> int:
    """Return the schema version this code writes."""
    return len(MIGRATIONS)
