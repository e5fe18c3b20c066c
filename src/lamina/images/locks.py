"""Per-chain-id locks that let image imports, removals and prunes run in parallel processes.

Two flock(2) files per chain id live in ROOT/images/locks:

- HEX.use is held shared by every import that builds on the snapshot (as a
  parent, or as the image's top), from before it looks the snapshot up to
  the end of the import. A removal takes it exclusively without waiting:
  when that fails, an import in flight still needs the snapshot and the
  removal leaves it alone.
- HEX.create is held exclusively by the one import that unpacks the layer.
  A second import that needs the same layer waits on it, then finds the
  snapshot committed and reuses it: the shared work is done once.

Imports take the locks of a stack bottom layer first; a chain id fixes its
depth in the stack, so two imports never wait on each other in a cycle.
flock locks end with the process, so a crashed import holds nothing.

The process that removes the snapshot of a chain id deletes its two files
while it holds both exclusively. A process that was waiting on a deleted
file then gets its lock on an inode that no other process will open again.
So every lock call checks, once it holds the lock, that the file is still
linked under its name. If not, it opens the name anew and locks again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from lamina.errors import InternalError
from lamina.images.digest import parse_digest

LOCKS_DIR = ("images", "locks")


def locks_dir(root: Path) -> Path:
    """Return ROOT/images/locks, creating it if needed."""
    path = root.joinpath(*LOCKS_DIR)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class ChainLock:
    """One flock file of a chain id, opened once and locked or unlocked as needed."""

    def __init__(self, root: Path, chain_id: str, purpose: str) -> None:
        algorithm, encoded = parse_digest(chain_id, what="chain id")
        self.path = locks_dir(root) / f"{algorithm}-{encoded}.{purpose}"
        self.root = root
        self.chain_id = chain_id
        self._fd = self._open()
        self.mode: int | None = None

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _linked(self) -> bool:
        """Return True if the open file is still the one named self.path."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def _lock(self, operation: int) -> bool:
        """flock the file named self.path, opening it again if it was deleted meanwhile."""
        while True:
            if not self._flock(operation):
                return False
            if self._linked():
                return True
            os.close(self._fd)
            self._fd = self._open()

    def _flock(self, operation: int) -> bool:
        try:
            fcntl.flock(self._fd, operation)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno == errno.EINTR:
                return self._flock(operation)
            raise InternalError(
                f"lock {self.path}: {err.strerror}", subject=str(self.path)
            ) from err
        return True

    def shared(self) -> None:
        """Hold the lock shared, waiting for an exclusive holder to finish."""
        self._lock(fcntl.LOCK_SH)
        self.mode = fcntl.LOCK_SH

    def exclusive(self) -> None:
        """Hold the lock exclusively, waiting for every other holder."""
        self._lock(fcntl.LOCK_EX)
        self.mode = fcntl.LOCK_EX

    def try_exclusive(self) -> bool:
        """Take the lock exclusively if no other process holds it; never wait.

        A shared lock this descriptor holds is converted. When the
        conversion fails, flock(2) has already dropped the shared lock, so
        call this only for a snapshot the caller no longer needs.
        """
        if self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB):
            self.mode = fcntl.LOCK_EX
            return True
        self.mode = None
        return False

    def delete(self) -> None:
        """Delete the lock file; the caller holds it exclusively and closes it next."""
        assert self.mode == fcntl.LOCK_EX, "delete a lock file only while holding it exclusively"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        """Drop the lock; the file stays open for a later lock call."""
        if self.mode is not None:
            self._flock(fcntl.LOCK_UN)
            self.mode = None

    def close(self) -> None:
        """Drop the lock and close the file; calling it twice is harmless."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.mode = None


def delete_lock_files(use: ChainLock) -> None:
    """Delete both lock files of USE's chain id, once its snapshot is removed.

    USE is the chain id's `use` lock, held exclusively, so no import builds
    on the snapshot and none is unpacking it. If the `create` lock is held
    all the same, its file stays for its holder.
    """
    create = ChainLock(use.root, use.chain_id, "create")
    try:
        if create.try_exclusive():
            create.delete()
    finally:
        create.close()
    use.delete()
