"""The overlay driver: each snapshot keeps only its own changes.

A snapshot's `fs` directory is an overlayfs upper directory (Active) or a
layer (Committed); its parents' `fs` directories are the lower layers. The
mounts follow containerd's overlayfs snapshotter:

- no parent: a bind mount of `fs`, read-write for Active, read-only for View;
- a View of a single layer: a read-only bind mount of that layer;
- otherwise an overlay mount, lower layers nearest first, with `upperdir`
  and `workdir` for Active only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lamina import kernel
from lamina.drivers.base import LayerSnapshotter
from lamina.drivers.dirs import LockedDir
from lamina.errors import FailedPreconditionError
from lamina.mount import escape_overlay_dir
from lamina.snapshots.types import Kind, Mount


class OverlaySnapshotter(LayerSnapshotter):
    """Snapshots as overlayfs layers; the default driver."""

    driver_name = "overlay"

    @property
    def userxattr(self) -> bool:
        """Whether overlayfs keeps its whiteout and opaque marks in user.overlay.* xattrs."""
        return kernel.overlay_needs_userxattr()

    def _check_depth(self, key: str, operation: str, depth: int) -> None:
        if depth > kernel.MAX_OVERLAY_LOWERS:
            raise FailedPreconditionError(
                f"{operation} {key!r}: the parent chain has {depth} layers, more than the "
                f"{kernel.MAX_OVERLAY_LOWERS} lower layers overlayfs can mount; squash the "
                "image or commit a flattened copy",
                subject=key,
            )

    def _populate(self, new: LockedDir, kind: Kind, parents: Sequence[str]) -> None:
        fs = new.path / "fs"
        fs.mkdir()
        # chmod, not the mkdir mode, so that the umask cannot narrow the
        # root of a container's filesystem.
        os.chmod(fs, 0o755)
        if kind is Kind.ACTIVE:
            (new.path / "work").mkdir(0o711)
        if parents:
            # The merged root takes its owner and mode from the upper
            # directory, so start it as the nearest layer's root.
            parent_root = os.lstat(parents[0])
            os.lchown(fs, parent_root.st_uid, parent_root.st_gid)
            os.chmod(fs, parent_root.st_mode & 0o7777)

    def _mounts(self, kind: Kind, own: Path, parents: Sequence[str]) -> list[Mount]:
        fs = str(own / "fs")
        if not parents:
            access = "rw" if kind is Kind.ACTIVE else "ro"
            return [Mount("bind", fs, (access, "rbind"))]
        if kind is Kind.VIEW and len(parents) == 1:
            return [Mount("bind", parents[0], ("ro", "rbind"))]

        options: list[str] = []
        if kernel.overlay_has_index_param():
            # Without the inode index, overlayfs does not pin the lower layers
            # to this mount, so layers stay usable by other mounts.
            options.append("index=off")
        if kernel.overlay_needs_userxattr():
            options.append("userxattr")
        if kind is Kind.ACTIVE:
            options.append(f"workdir={own / 'work'}")
            options.append(f"upperdir={fs}")
        # A colon separates layers, so one inside a path is escaped.
        options.append("lowerdir=" + ":".join(escape_overlay_dir(p) for p in parents))
        return [Mount("overlay", "overlay", tuple(options))]
