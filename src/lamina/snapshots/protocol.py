"""The `Snapshotter` protocol: the operations and lifecycle of a snapshotter.

Lifecycle, as in containerd:

1. `prepare(key, parent)` creates an Active snapshot on a Committed parent
   (or on nothing) and returns the mounts of its writable root.
2. The caller mounts, writes, unmounts.
3. `commit(name, key)` turns the Active snapshot into a Committed one named
   `name`; the key `key` is gone afterwards.
4. A Committed snapshot can be the parent of further `prepare` or `view`
   calls; `view(key, parent)` gives read-only mounts of it.
5. `remove(key)` deletes a snapshot that has no children.

Keys of every kind share one key space. Keys are arbitrary non-empty strings
and never used as paths.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, runtime_checkable

from lamina.snapshots.types import Info, Mount, Usage


@runtime_checkable
class Snapshotter(Protocol):
    """The operations of containerd's snapshotter interface."""

    def stat(self, key: str) -> Info:
        """Return the info of the snapshot KEY; NotFoundError if there is none."""
        ...

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change the labels of `info.name` and return the new info.

        Field paths are "labels" (replace all labels) or "labels.NAME" (set one,
        or delete it when the new value is empty); with none, all labels are
        replaced. Any other path is an InvalidArgumentError.
        """
        ...

    def usage(self, key: str) -> Usage:
        """Return the disk use of KEY itself, parents excluded."""
        ...

    def mounts(self, key: str) -> builtins.list[Mount]:
        """Return the mounts of an Active or View snapshot."""
        ...

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> builtins.list[Mount]:
        """Create an Active snapshot KEY on PARENT and return its mounts."""
        ...

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> builtins.list[Mount]:
        """Create a read-only View snapshot KEY of PARENT and return its mounts."""
        ...

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Turn the Active snapshot KEY into the Committed snapshot NAME."""
        ...

    def remove(self, key: str) -> None:
        """Remove snapshot KEY; FailedPreconditionError while it has children."""
        ...

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        """Call FN with the info of every snapshot matching any of FILTERS.

        FN may call other methods of the snapshotter (stat, for example).
        """
        ...

    def list(self, *filters: str) -> Iterator[Info]:
        """Yield the info of every snapshot matching any of FILTERS, in batches."""
        ...

    def cleanup(self) -> builtins.list[str]:
        """Remove directories no snapshot owns; return the paths removed."""
        ...

    def close(self) -> None:
        """Release the store; calling it twice is harmless."""
        ...
