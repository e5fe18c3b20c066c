"""Conversions between Lamina's snapshot types and the messages of containerd's API."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from lamina.service._generated import mount_pb2, snapshots_pb2
from lamina.snapshots.types import Info, Kind, Mount


def mount_to_proto(mount: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(
        type=mount.type, source=mount.source, target=mount.target, options=mount.options
    )


def mounts_to_proto(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_to_proto(m) for m in mounts]


def mount_from_proto(message: mount_pb2.Mount) -> Mount:
    return Mount(
        type=message.type,
        source=message.source,
        options=tuple(message.options),
        target=message.target,
    )


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    timestamp = Timestamp()
    # Timestamp.FromDatetime reads a naive datetime as UTC; the store's
    # aware datetimes are converted first so that no local offset leaks in.
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    timestamp.FromDatetime(value)
    return timestamp


def _datetime(message: snapshots_pb2.Info, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    timestamp: Timestamp = getattr(message, field)
    return timestamp.ToDatetime(tzinfo=UTC)


def info_to_proto(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.name,
        created_at=_timestamp(info.created),
        updated_at=_timestamp(info.updated),
        labels=dict(info.labels),
    )


def kind_from_proto(value: int, default: Kind) -> Kind:
    """Return the Kind of an enum value; DEFAULT for UNKNOWN (0) or a value not known here."""
    try:
        return Kind(value)
    except ValueError:
        return default


def info_from_proto(message: snapshots_pb2.Info, default_kind: Kind = Kind.ACTIVE) -> Info:
    """Build an Info from a message, with DEFAULT_KIND in place of an unset kind."""
    return Info(
        name=message.name,
        kind=kind_from_proto(message.kind, default_kind),
        parent=message.parent,
        labels=dict(message.labels),
        created=_datetime(message, "created_at"),
        updated=_datetime(message, "updated_at"),
    )
