"""Lamina: a container filesystem snapshotter.

import lamina
sn = lamina.open_snapshotter("/var/lib/lamina")
mounts = sn.prepare("container-1", parent="image-top")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from lamina.snapshots import Info, Kind, Mount, Snapshotter, Usage

if TYPE_CHECKING:
    from lamina.drivers import LayerSnapshotter

__version__ = "0.1.0"


def open_snapshotter(
    root: str | Path, driver: str | None = None, *, lock_timeout: float | None = None
) -> LayerSnapshotter:
    """Open the snapshotter at ROOT; see lamina.drivers.open_snapshotter."""
    # Imported here so that `import lamina.archive` and friends do not pay
    # for the drivers, the store and the mount code.
    from lamina.drivers import open_snapshotter as open_driver

    return open_driver(root, driver, lock_timeout=lock_timeout)

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "Info",
    "InternalError",
    "InvalidArgumentError",
    "Kind",
    "LaminaError",
    "Mount",
    "NotFoundError",
    "Snapshotter",
    "UnavailableError",
    "UnimplementedError",
    "Usage",
    "__version__",
    "open_snapshotter",
]
