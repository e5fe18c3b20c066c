"""The snapshot model: types, the Snapshotter protocol, and walk filters."""

from lamina.snapshots.protocol import Snapshotter
from lamina.snapshots.types import Info, Kind, Mount, Usage

__all__ = ["Info", "Kind", "Mount", "Snapshotter", "Usage"]
