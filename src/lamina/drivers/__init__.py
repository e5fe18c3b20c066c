"""Snapshot drivers: overlay (the default) and native (full copies)."""

from __future__ import annotations

import os
from pathlib import Path

from lamina.drivers.base import LayerSnapshotter, SnapshotDirs
from lamina.drivers.native import NativeSnapshotter
from lamina.drivers.overlay import OverlaySnapshotter
from lamina.errors import FailedPreconditionError, InvalidArgumentError

DRIVERS: dict[str, type[LayerSnapshotter]] = {
    "overlay": OverlaySnapshotter,
    "native": NativeSnapshotter,
}
DEFAULT_DRIVER = "overlay"


# The driver a root was created with, so that a later open with another
# driver fails instead of misreading the directories.
DRIVER_FILE = "driver"


def open_snapshotter(
    root: str | Path, driver: str | None = None, *, lock_timeout: float | None = None
) -> LayerSnapshotter:
    """Open the snapshotter at ROOT, creating it with DRIVER if it is new.

    With DRIVER None, an existing root opens with the driver it was created
    with and a new root gets the default driver. Opening a root with another
    driver than its own raises FailedPreconditionError.
    """
    if driver is not None and driver not in DRIVERS:
        raise InvalidArgumentError(
            f"unknown driver {driver!r}: choose one of {', '.join(sorted(DRIVERS))}",
            subject=driver,
        )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(
            f"open {root}: the root is not a directory; give --root a directory, new or "
            "created by Lamina",
            subject=str(root),
        )
    recorded = _recorded_driver(root)
    if recorded is not None and driver is not None and recorded != driver:
        raise FailedPreconditionError(
            f"open {root}: the root was created with the {recorded!r} driver, not {driver!r}; "
            f"use --driver {recorded} or another root",
            subject=str(root),
        )
    chosen = recorded or driver or DEFAULT_DRIVER
    snapshotter = DRIVERS[chosen](root, lock_timeout=lock_timeout)
    if recorded is None:
        _record_driver(root, chosen)
    return snapshotter


def _recorded_driver(root: Path) -> str | None:
    try:
        name = (root / DRIVER_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if name not in DRIVERS:
        raise FailedPreconditionError(
            f"open {root}: unknown driver {name!r} recorded in {root / DRIVER_FILE}; "
            "this Lamina knows " + ", ".join(sorted(DRIVERS)),
            subject=str(root),
        )
    return name


def _record_driver(root: Path, driver: str) -> None:
    temporary = root / f".{DRIVER_FILE}.{os.getpid()}"
    temporary.write_text(driver + "\n")
    try:
        # link(2) fails if another process recorded a driver first. That
        # process's choice then wins, and the check below compares it.
        os.link(temporary, root / DRIVER_FILE)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    recorded = _recorded_driver(root)
    if recorded != driver:
        raise FailedPreconditionError(
            f"open {root}: another process created the root with the {recorded!r} driver",
            subject=str(root),
        )


__all__ = [
    "DEFAULT_DRIVER",
    "DRIVERS",
    "LayerSnapshotter",
    "NativeSnapshotter",
    "OverlaySnapshotter",
    "SnapshotDirs",
    "open_snapshotter",
]
