"""Lamina: a container filesystem snapshotter.

import lamina
sn = lamina.open_snapshotter("/var/lib/lamina")
mounts = sn.prepare("container-1", parent="image-top")
"""

from lamina.drivers import open_snapshotter
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

__version__ = "0.1.0"

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
