"""The native driver: each snapshot is a full copy of its parent's tree.

Slower and larger than overlay, but it needs nothing from the kernel beyond
bind mounts, and works on filesystems overlayfs cannot use as an upper layer.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lamina.drivers.base import LayerSnapshotter
from lamina.drivers.dirs import LockedDir
from lamina.errors import InternalError, NoSpaceError
from lamina.snapshots.types import Kind, Mount


class NativeSnapshotter(LayerSnapshotter):
    """Snapshots as full directory trees, mounted with bind mounts."""

    driver_name = "native"
    userxattr = False

    def _populate(self, new: LockedDir, kind: Kind, parents: Sequence[str]) -> None:
        fs = new.path / "fs"
        if not parents:
            fs.mkdir()
            os.chmod(fs, 0o755)
            return
        # cp inherits the lock, so that if this process is killed, cleanup
        # leaves the directory alone until cp has finished too.
        copy_tree(Path(parents[0]), fs, keep_fds=(new.fd,))

    def _mounts(self, kind: Kind, own: Path, parents: Sequence[str]) -> list[Mount]:
        access = "rw" if kind is Kind.ACTIVE else "ro"
        return [Mount("bind", str(own / "fs"), (access, "rbind"))]


def copy_tree(source: Path, target: Path, keep_fds: Sequence[int] = ()) -> None:
    """Copy SOURCE to the new directory TARGET keeping everything a root filesystem needs.

    GNU cp -a keeps modes, owners, times, hard links, symlinks, device nodes,
    FIFOs and every xattr (security.capability included); --reflink=auto
    shares data blocks where the filesystem can.
    """
    # setpriv --pdeathsig ends cp when this process dies, so a killed
    # prepare does not leave a copy running on.
    result = subprocess.run(
        [
            "setpriv",
            "--pdeathsig",
            "KILL",
            "cp",
            "-a",
            "--reflink=auto",
            "--",
            os.fspath(source),
            os.fspath(target),
        ],
        capture_output=True,
        text=True,
        check=False,
        pass_fds=keep_fds,
    )
    if result.returncode != 0:
        if "No space left" in result.stderr or "quota exceeded" in result.stderr.lower():
            raise NoSpaceError(
                f"copy {source} to {target}: no space left on device; free space and retry",
                subject=str(target),
            )
        raise InternalError(
            f"copy {source} to {target} failed: {result.stderr.strip()}; check free space "
            "and that the filesystem supports xattrs",
            subject=str(target),
        )
