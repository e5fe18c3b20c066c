"""Snapshot directories on disk: building, locking, removing, measuring.

A directory being built or removed is locked with an exclusive flock(2) on
the directory itself. `cleanup` in another process leaves a locked directory
alone, because a live operation owns it, and removes an unlocked one, which
a crash left behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from lamina.errors import InternalError, NoSpaceError
from lamina.snapshots.types import Usage

log = logging.getLogger(__name__)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]

NEW_PREFIX = ".new-"
OLD_PREFIX = ".old-"


class LockedDir:
    """A directory held under an exclusive flock until `release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def rename(self, target: Path) -> None:
        os.rename(self.path, target)
        self.path = target

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def os_errors(operation: str, key: str) -> Iterator[None]:
    """Turn an OSError of directory work into the Lamina error a caller can act on."""
    try:
        yield
    except OSError as err:
        where = f" at {err.filename}" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(
                f"{operation} {key!r}: no space left on device{where}; free space and retry",
                subject=key,
            ) from err
        raise InternalError(
            f"{operation} {key!r}: {err.strerror or err}{where}", subject=key
        ) from err


def make_locked_dir(parent: Path) -> LockedDir:
    """Create and lock a fresh `.new-*` directory under PARENT."""
    while True:
        path = parent / f"{NEW_PREFIX}{secrets.token_hex(8)}"
        os.mkdir(path, 0o700)
        # A concurrent cleanup may remove the directory before it is locked:
        # before the open (the open fails) or before the flock (a removed
        # directory has no links left). Either way, make another one.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return LockedDir(path, fd)
        os.close(fd)


def try_lock_dir(path: Path) -> LockedDir | None:
    """Lock PATH without waiting; None if another process holds it or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:
        os.close(fd)
        return None
    return LockedDir(path, fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove PATH and everything below it, never crossing into a mount.

    A directory with a mount inside is left in place and reported, because
    removing through the mount would delete data that is not the snapshot's.
    """
    mounted = first_mount_under(path)
    if mounted is not None:
        raise InternalError(
            f"cannot remove {path}: {mounted} is mounted inside it; unmount it and "
            "run 'lamina snapshots cleanup'",
            subject=str(path),
        )

    def make_writable_and_retry(function: object, failed: str, excinfo: ExcInfo) -> None:
        # A directory without write permission (kept from an image) blocks
        # unlinking its entries unless the process has CAP_DAC_OVERRIDE.
        exc = excinfo[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed)
            else:
                os.unlink(failed)
            return
        raise exc

    if _remove_empty_layout(path):
        return
    # NOTE: Python 3.11's rmtree takes `onerror`; `onexc` arrived in 3.12.
    shutil.rmtree(path, onerror=make_writable_and_retry)


def _remove_empty_layout(path: Path) -> bool:
    """Remove PATH if it holds only empty directories one level down; False otherwise.

    Many removed snapshots are empty layers and empty work directories, and
    rmdir(2) on each is much cheaper than shutil.rmtree's descriptor walk.
    """
    try:
        with os.scandir(path) as entries:
            children = [entry.path for entry in entries]
        for child in children:
            os.rmdir(child)
        os.rmdir(path)
    except OSError:
        return False
    return True


def first_mount_under(path: Path) -> str | None:
    """Return a mount point at or below PATH, or None; cheap enough for every removal.

    lamina.mount.mounts_under gives the full sorted list; this scans
    /proc/self/mountinfo once and stops at the first hit.
    """
    top = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        data = mountinfo.read()
    if top not in data and b"\\" not in data:
        return None
    for line in data.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) < 5:
            continue
        point = fields[4]
        if b"\\" in point:
            # mountinfo writes space, tab, newline and backslash as \ooo.
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), point)
        if point == top or point.startswith(top + b"/"):
            return os.fsdecode(point)
    return None


def retire_dir(path: Path) -> None:
    """Rename a removed snapshot's directory out of the way and delete it."""
    locked = try_lock_dir(path)
    if locked is None:
        # Gone already (a concurrent cleanup removed it) or being removed.
        return
    try:
        old = path.parent / f"{OLD_PREFIX}{path.name}-{secrets.token_hex(4)}"
        locked.rename(old)
        remove_tree(old)
    finally:
        locked.release()


def disk_usage(path: Path) -> Usage:
    """Count allocated bytes and inodes below PATH (itself included), each inode once.

    Bytes are st_blocks * 512, as du(1) and containerd count them.
    """
    seen: set[int] = set()
    size = 0
    inodes = 0
    try:
        root = os.lstat(path)
    except FileNotFoundError:
        return Usage()
    seen.add(root.st_ino)
    size += root.st_blocks * 512
    inodes += 1
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno == errno.ENOTDIR:
                continue
            raise
        with entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if info.st_nlink > 1:
                    if info.st_ino in seen:
                        continue
                    seen.add(info.st_ino)
                size += info.st_blocks * 512
                inodes += 1
                if stat.S_ISDIR(info.st_mode):
                    stack.append(entry.path)
    return Usage(size, inodes)
