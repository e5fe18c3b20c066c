"""The metadata store: snapshots, labels and parent links in SQLite."""

from lamina.metadata.store import MetadataStore, SnapshotRecord, Transaction

__all__ = ["MetadataStore", "SnapshotRecord", "Transaction"]
