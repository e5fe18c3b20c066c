"""Chain-id lock files: a lock taken on a file that was deleted meanwhile moves to the new file."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from lamina.images.locks import ChainLock, delete_lock_files

CHAIN = "sha256:" + "ab" * 32


def test_waiter_on_deleted_file_locks_the_new_one(tmp_path: Path) -> None:
    remover = ChainLock(tmp_path, CHAIN, "use")
    assert remover.try_exclusive()
    waiter = ChainLock(tmp_path, CHAIN, "use")  # opened before the deletion
    acquired = threading.Event()

    def wait() -> None:
        waiter.shared()
        acquired.set()

    thread = threading.Thread(target=wait)
    thread.start()
    assert not acquired.wait(0.2), "the shared lock was granted during the exclusive one"

    delete_lock_files(remover)
    remover.close()
    thread.join(10)
    assert acquired.is_set()
    # The waiter holds the file now named by the path, so a third process
    # that opens the path finds it locked.
    third = ChainLock(tmp_path, CHAIN, "use")
    assert not third.try_exclusive()
    assert os.path.exists(waiter.path)
    waiter.close()
    assert third.try_exclusive()
    third.close()


def test_delete_keeps_a_create_file_someone_holds(tmp_path: Path) -> None:
    use = ChainLock(tmp_path, CHAIN, "use")
    create = ChainLock(tmp_path, CHAIN, "create")
    # flock locks of two descriptors conflict even within one process.
    holder = os.open(create.path, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert use.try_exclusive()
        delete_lock_files(use)
        assert not use.path.exists()
        assert create.path.exists()
    finally:
        os.close(holder)
        use.close()
        create.close()
