"""Image records in the metadata store: one row per imported image.

Every function takes an open `Transaction`; the caller chooses whether a
read and a write belong to one transaction. An image names its top
snapshot by chain id (`chain_id`, "" for an image without layers); the
snapshots themselves stay in the snapshots table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from lamina.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from lamina.metadata.store import Transaction, now_ns, ns_to_datetime


@dataclass(frozen=True)
class ImageRecord:
    """Record of one image in the metadata store."""

    name: str
    manifest_digest: str
    config_digest: str
    media_type: str
    platform: str
    chain_id: str
    diff_ids: tuple[str, ...]
    size: int
    created: datetime | None = None
    updated: datetime | None = None

    def to_json(self) -> dict[str, object]:
        """Return the record as a JSON-ready mapping, times in ISO 8601."""
        return {
            "name": self.name,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "media_type": self.media_type,
            "platform": self.platform,
            "chain_id": self.chain_id,
            "diff_ids": list(self.diff_ids),
            "size": self.size,
            "created": self.created.isoformat() if self.created else None,
            "updated": self.updated.isoformat() if self.updated else None,
        }


_COLUMNS = (
    "name, manifest_digest, config_digest, media_type, platform, chain_id, diff_ids, size, "
    "created, updated"
)


def _record(row: Sequence[object]) -> ImageRecord:
    (name, manifest, config, media_type, platform, chain_id, diff_ids, size, created, updated) = row
    assert isinstance(name, str)
    assert isinstance(manifest, str)
    assert isinstance(config, str)
    assert isinstance(media_type, str)
    assert isinstance(platform, str)
    assert isinstance(chain_id, str)
    assert isinstance(diff_ids, str)
    assert isinstance(size, int)
    assert isinstance(created, int)
    assert isinstance(updated, int)
    return ImageRecord(
        name=name,
        manifest_digest=manifest,
        config_digest=config,
        media_type=media_type,
        platform=platform,
        chain_id=chain_id,
        diff_ids=tuple(json.loads(diff_ids)),
        size=size,
        created=ns_to_datetime(created),
        updated=ns_to_datetime(updated),
    )


def validate_name(name: str, operation: str) -> None:
    """Raise InvalidArgumentError unless NAME is a usable image name."""
    if not name or name.strip() != name or "\n" in name or "\0" in name:
        raise InvalidArgumentError(
            f"{operation} {name!r}: an image name must be non-empty, without surrounding "
            "spaces, newlines or NUL characters",
            subject=name,
        )


def find_image(tx: Transaction, name: str) -> ImageRecord | None:
    """Return the record of image NAME, or None."""
    row = tx.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE name = ?", (name,)).fetchone()
    return _record(row) if row is not None else None


def get_image(tx: Transaction, name: str, operation: str) -> ImageRecord:
    """Return the record of image NAME; NotFoundError if there is none."""
    record = find_image(tx, name)
    if record is None:
        raise NotFoundError(
            f"{operation} {name!r}: image does not exist; 'lamina images ls' lists the images",
            subject=name,
        )
    return record


def list_images(tx: Transaction) -> list[ImageRecord]:
    """Return every image record, sorted by name."""
    return [_record(row) for row in tx.conn.execute(f"SELECT {_COLUMNS} FROM images ORDER BY name")]


def images_on_chain(tx: Transaction, chain_id: str) -> list[str]:
    """Return the names of the images whose top snapshot is CHAIN_ID."""
    rows = tx.conn.execute("SELECT name FROM images WHERE chain_id = ? ORDER BY name", (chain_id,))
    return [row[0] for row in rows]


def put_image(tx: Transaction, record: ImageRecord, *, replace: bool = True) -> ImageRecord:
    """Insert RECORD, or replace the image of the same name when REPLACE is true.

    A replaced image keeps its created time. Returns the stored record.
    """
    validate_name(record.name, "put image")
    existing = find_image(tx, record.name)
    if existing is not None and not replace:
        raise AlreadyExistsError(
            f"put image {record.name!r}: image already exists", subject=record.name
        )
    stamp = now_ns()
    created = stamp
    if existing is not None and existing.created is not None:
        created = int(existing.created.timestamp() * 1e9)
    tx.conn.execute(
        f"INSERT OR REPLACE INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.name,
            record.manifest_digest,
            record.config_digest,
            record.media_type,
            record.platform,
            record.chain_id,
            json.dumps(list(record.diff_ids)),
            record.size,
            created,
            stamp,
        ),
    )
    return get_image(tx, record.name, "put image")


def delete_image(tx: Transaction, name: str, operation: str) -> ImageRecord:
    """Delete the record of image NAME and return it; NotFoundError if there is none."""
    record = get_image(tx, name, operation)
    tx.conn.execute("DELETE FROM images WHERE name = ?", (name,))
    return record
