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

NOTE: the lock files are never deleted. Deleting one while another process
waits on it would let a third process lock a new file of the same name, so
they stay (two empty files per chain id ever unpacked on this root).
"""

from __future__ import annotations

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
        self.chain_id = chain_id
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.mode: int | None = None

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
        self._flock(fcntl.LOCK_SH)
        self.mode = fcntl.LOCK_SH

    def exclusive(self) -> None:
        """Hold the lock exclusively, waiting for every other holder."""
        self._flock(fcntl.LOCK_EX)
        self.mode = fcntl.LOCK_EX

    def try_exclusive(self) -> bool:
        """Take the lock exclusively if no other process holds it; never wait.

        A shared lock this descriptor holds is converted. When the
        conversion fails, flock(2) has already dropped the shared lock, so
        call this only for a snapshot the caller no longer needs.
        """
        if self._flock(fcntl.LOCK_EX | fcntl.LOCK_NB):
            self.mode = fcntl.LOCK_EX
            return True
        self.mode = None
        return False

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
