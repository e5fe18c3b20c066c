"""Value types of the snapshot model: kinds, snapshot info, usage and mounts.

The meaning follows containerd's snapshots package. A snapshot is Active
(writable, made by prepare), View (read-only, made by view) or Committed
(immutable, made by commit). Every snapshot has a parent, and the empty
string is the empty parent.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType


class Kind(enum.IntEnum):
    """Snapshot kind; the numbers are those of containerd's snapshots API."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:
        return self.name.capitalize()

    @classmethod
    def parse(cls, text: str) -> Kind:
        """Parse a kind name such as "active" or "Committed", case-insensitively."""
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(str(k).lower() for k in cls)
            from lamina.errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"invalid snapshot kind {text!r}: expected one of {names}", subject=text
            ) from None


def _frozen_labels(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(labels or {}))


@dataclass(frozen=True)
class Info:
    """The record of one snapshot in the store.

    `name` is the key of an Active or View snapshot, or the name of a
    Committed one. `parent` is the name of the parent, or "".
    """

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    created: datetime | None = None
    updated: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.labels, MappingProxyType):
            object.__setattr__(self, "labels", _frozen_labels(self.labels))


@dataclass(frozen=True)
class Usage:
    """Disk use of one snapshot, parents excluded: bytes of allocated blocks and inodes."""

    size: int = 0
    inodes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.size + other.size, self.inodes + other.inodes)


@dataclass(frozen=True)
class Mount:
    """One mount(2) call: filesystem type, source and options, as containerd returns them."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

    def option_value(self, name: str) -> str | None:
        """Return the value of option NAME=VALUE, or None when the option is absent."""
        prefix = name + "="
        for option in self.options:
            if option.startswith(prefix):
                return option[len(prefix) :]
        return None
