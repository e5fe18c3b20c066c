"""The snapshot lifecycle shared by every driver, on the metadata store.

Each mutating operation runs in phases:

1. validate the request;
2. read the current state in a read transaction (cheap early errors);
3. build the new directory under a locked temporary name `.new-*`, outside
   any transaction, so slow work (a native copy) blocks no other process;
4. in one write transaction: check again, write the metadata, rename the
   directory to `snapshots/ID`; the rename is the last step before COMMIT;
5. after COMMIT, best-effort tidying (the work directory of a committed
   snapshot, the directory of a removed one).

A crash between 4's rename and COMMIT leaves `snapshots/ID` with no record;
a crash in 5 leaves a directory no record owns. `cleanup` removes both.
Drivers differ only in how they fill a new directory and which mounts they
return.
"""

from __future__ import annotations

import builtins
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from lamina.drivers import dirs
from lamina.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    LaminaError,
    NotFoundError,
)
from lamina.metadata.store import MetadataStore, SnapshotRecord, Transaction, ns_to_datetime
from lamina.mount import mounts_using
from lamina.snapshots.filters import Matcher, parse_filters
from lamina.snapshots.types import Info, Kind, Mount, Usage
from lamina.snapshots.validation import validate_key, validate_labels

log = logging.getLogger(__name__)

WALK_BATCH = 500
COMMIT_ATTEMPTS = 3

# Tests set LAMINA_CRASH_POINT to a phase name to kill the process right
# there with SIGKILL, which proves a crash at that point leaves the store
# consistent. Read once, so production calls cost a string comparison.
_CRASH_POINT = os.environ.get("LAMINA_CRASH_POINT", "")


def crash_point(name: str) -> None:
    if _CRASH_POINT and name == _CRASH_POINT:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class SnapshotDirs:
    """Host paths of one snapshot: its own directory and its parents', nearest first."""

    snapshot_id: int
    kind: Kind
    fs: Path
    work: Path | None
    parents: tuple[Path, ...]


class LayerSnapshotter:
    """A snapshotter on ROOT: a metadata store plus one directory per snapshot.

    Thread-safe: the store opens one SQLite connection per thread, and the
    directory work of concurrent calls never touches the same path.
    """

    driver_name = "base"

    def __init__(self, root: str | Path, *, lock_timeout: float | None = None) -> None:
        self.root = Path(root).absolute()
        self.snapshots_dir = self.root / "snapshots"
        self._snapshots_prefix = f"{self.snapshots_dir}/"
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise InternalError(
                f"cannot create snapshotter root {self.root}: {err.strerror}; check the path "
                "and its permissions",
                subject=str(self.root),
            ) from err
        kwargs = {} if lock_timeout is None else {"lock_timeout": lock_timeout}
        self.store = MetadataStore(self.root / "metadata.db", **kwargs)
        log.debug("opened snapshotter root=%s driver=%s", self.root, self.driver_name)

    # ------------------------------------------------------------ driver hooks

    def _populate(self, new: dirs.LockedDir, kind: Kind, parents: Sequence[str]) -> None:
        """Fill a new snapshot directory: at least `fs`, and `work` where needed."""
        raise NotImplementedError

    def _mounts(self, kind: Kind, own: Path, parents: Sequence[str]) -> builtins.list[Mount]:
        """Return the mounts of a snapshot whose directory is OWN."""
        raise NotImplementedError

    def _check_depth(self, key: str, operation: str, depth: int) -> None:
        """Reject a parent chain of DEPTH layers that this driver could not mount."""

    def _usage(self, own: Path) -> Usage:
        return dirs.disk_usage(own / "fs")

    # ------------------------------------------------------------ paths

    def _dir(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id)

    def _fs(self, snapshot_id: int) -> str:
        # Plain strings: a 500-layer chain makes 500 of these per request.
        return f"{self._snapshots_prefix}{snapshot_id}/fs"

    def _parent_dirs(self, tx: Transaction, record: SnapshotRecord) -> builtins.list[str]:
        return [self._fs(snapshot_id) for snapshot_id in tx.ancestor_ids(record)]

    def snapshot_dirs(self, key: str) -> SnapshotDirs:
        """Return the host directories of snapshot KEY (for appliers and diffs)."""
        validate_key(key, "snapshot dirs")
        with self.store.read("snapshot dirs") as tx:
            record = tx.get(key, "snapshot dirs")
            parents = self._parent_dirs(tx, record)
        own = self._dir(record.snapshot_id)
        work = own / "work" if record.kind is Kind.ACTIVE and (own / "work").is_dir() else None
        return SnapshotDirs(
            record.snapshot_id, record.kind, own / "fs", work, tuple(Path(p) for p in parents)
        )

    # ------------------------------------------------------------ reads

    def stat(self, key: str) -> Info:
        validate_key(key, "stat")
        with self.store.read("stat") as tx:
            return tx.info(tx.get(key, "stat"))

    def usage(self, key: str) -> Usage:
        validate_key(key, "usage")
        with self.store.read("usage") as tx:
            record = tx.get(key, "usage")
        stored = record.usage
        if record.kind is Kind.COMMITTED and stored is not None:
            return stored
        return self._usage(self._dir(record.snapshot_id))

    def mounts(self, key: str) -> builtins.list[Mount]:
        validate_key(key, "mounts")
        with self.store.read("mounts") as tx:
            record = tx.get(key, "mounts")
            if record.kind is Kind.COMMITTED:
                raise FailedPreconditionError(
                    f"mounts {key!r}: snapshot is Committed; prepare or view a child of it "
                    "to mount it",
                    subject=key,
                )
            parents = self._parent_dirs(tx, record)
        return self._mounts(record.kind, self._dir(record.snapshot_id), parents)

    def list(self, *filters: str) -> Iterator[Info]:
        matcher = parse_filters(filters)
        after = 0
        while True:
            batch = self._page(matcher, after)
            if not batch:
                return
            after = batch[-1][0]
            for _, info in batch:
                if matcher.match(info):
                    yield info

    def _page(self, matcher: Matcher, after: int) -> builtins.list[tuple[int, Info]]:
        required = matcher.required_label()
        with self.store.read("walk") as tx:
            if required is not None:
                rows = tx.page_with_label(required[0], required[1], after, WALK_BATCH)
            else:
                rows = tx.page(after, WALK_BATCH)
            return [
                (
                    record.snapshot_id,
                    Info(
                        name=record.key,
                        kind=record.kind,
                        parent=record.parent,
                        labels=labels,
                        created=ns_to_datetime(record.created),
                        updated=ns_to_datetime(record.updated),
                    ),
                )
                for record, labels in rows
            ]

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        # Pages are read in their own short transactions and FN runs outside
        # them, so FN may call stat or even write.
        for info in self.list(*filters):
            fn(info)

    # ------------------------------------------------------------ creation

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> builtins.list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels or {}, "prepare")

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> builtins.list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {}, "view")

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str], operation: str
    ) -> builtins.list[Mount]:
        started = time.monotonic()
        validate_key(key, operation)
        if parent:
            validate_key(parent, operation, "parent")
        validate_labels(labels, operation, key)

        with self.store.read(operation) as tx:
            # The same checks run again under the write lock; these fail early
            # before any directory work.
            if tx.find(key) is not None:
                raise AlreadyExistsError(
                    f"{operation} {key!r}: snapshot already exists", subject=key
                )
            parent_dirs: builtins.list[str] = []
            if parent:
                parent_record = tx.find(parent)
                if parent_record is None:
                    raise NotFoundError(
                        f"{operation} {key!r}: parent {parent!r} does not exist", subject=key
                    )
                if parent_record.kind is not Kind.COMMITTED:
                    raise FailedPreconditionError(
                        f"{operation} {key!r}: parent {parent!r} is {parent_record.kind}, "
                        "only a Committed snapshot can be a parent",
                        subject=key,
                    )
                parent_dirs = [self._fs(parent_record.snapshot_id)]
                parent_dirs += self._parent_dirs(tx, parent_record)
        self._check_depth(key, operation, len(parent_dirs))

        with dirs.os_errors(operation, key), ExitStack() as undo:
            new = dirs.make_locked_dir(self.snapshots_dir)
            undo.callback(new.release)
            undo.callback(_remove_quietly, new)
            try:
                self._populate(new, kind, parent_dirs)
            except (LaminaError, OSError):
                if parent:
                    self._check_parent_unchanged(key, parent, parent_dirs[0], operation)
                raise
            crash_point(f"{operation}:populated")

            with self.store.write(operation) as tx:
                record = tx.create(key, kind, parent, labels, operation)
                target = self._dir(record.snapshot_id)
                self._clear_stale(target)
                new.rename(target)
                crash_point(f"{operation}:renamed")
                dirs.fsync_dir(self.snapshots_dir)
            crash_point(f"{operation}:committed")
            undo.pop_all()
            new.release()

        log.debug(
            "%s key=%r parent=%r snapshot_id=%d in %.1f ms",
            operation,
            key,
            parent,
            record.snapshot_id,
            (time.monotonic() - started) * 1000,
        )
        return self._mounts(kind, target, parent_dirs)

    def _check_parent_unchanged(
        self, key: str, parent: str, parent_fs: str, operation: str
    ) -> None:
        # Filling the directory reads the parent's layers outside any
        # transaction. A concurrent remove of the parent is therefore a
        # NotFoundError for this request, not an internal failure.
        with self.store.read(operation) as tx:
            record = tx.find(parent)
            if record is None or self._fs(record.snapshot_id) != parent_fs:
                raise NotFoundError(
                    f"{operation} {key!r}: parent {parent!r} was removed while the snapshot "
                    "was being created",
                    subject=key,
                )
        if not os.path.isdir(parent_fs):
            raise FailedPreconditionError(
                f"{operation} {key!r}: the layer directory {parent_fs} of parent {parent!r} "
                "is missing; run 'lamina fsck' for what to do",
                subject=key,
            )

    def _clear_stale(self, target: Path) -> None:
        # Only reachable when a crash left a renamed directory whose
        # transaction rolled back, so SQLite handed the same id out again.
        # Holding the write lock, no live operation owns that directory.
        if os.path.lexists(target):
            log.warning("removing stale directory path=%s left by an interrupted operation", target)
            dirs.remove_tree(target)

    # ------------------------------------------------------------ commit and remove

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        labels = labels or {}
        validate_key(name, "commit", "name")
        validate_key(key, "commit")
        validate_labels(labels, "commit", key)

        # Measuring a large tree takes time, so it happens outside the write
        # lock. If another client removed KEY and prepared it again in the
        # meantime, the measurement belongs to the old directory, so measure
        # again. The last attempt measures under the write lock, so the commit
        # settles whatever other clients do.
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            with self.store.read("commit") as tx:
                record = tx.get(key, "commit")
            own = self._dir(record.snapshot_id)
            with dirs.os_errors("commit", key):
                usage = self._usage(own) if record.kind is Kind.ACTIVE else Usage()

            with self.store.write("commit") as tx:
                current = tx.get(key, "commit")
                if current.snapshot_id != record.snapshot_id:
                    if attempt < COMMIT_ATTEMPTS:
                        log.debug("commit key=%r: snapshot replaced while measured, retrying", key)
                        continue
                    own = self._dir(current.snapshot_id)
                    with dirs.os_errors("commit", key):
                        usage = self._usage(own) if current.kind is Kind.ACTIVE else Usage()
                # Raises the precise error when KEY is not Active or NAME exists.
                committed = tx.commit_active(key, name, labels, usage, "commit")
                crash_point("commit:updated")
            break
        crash_point("commit:committed")

        work = own / "work"
        try:
            # Empty unless the snapshot was mounted; rmdir never crosses a mount.
            os.rmdir(work)
        except FileNotFoundError:
            pass
        except OSError:
            try:
                dirs.remove_tree(work)
            except (OSError, LaminaError) as err:
                log.warning(
                    "commit name=%r snapshot_id=%d: could not remove work directory: %s",
                    name,
                    committed.snapshot_id,
                    err,
                )
        log.debug("commit key=%r name=%r snapshot_id=%d", key, name, committed.snapshot_id)

    def mounted_at(self, key: str) -> builtins.list[str]:
        """Return the mount points of mounts that use snapshot KEY's directory."""
        validate_key(key, "mounted at")
        with self.store.read("mounted at") as tx:
            record = tx.get(key, "mounted at")
        return self._mounted_at(record.snapshot_id)

    def _mounted_at(self, snapshot_id: int) -> builtins.list[str]:
        # Every mount of a snapshot names its directory in /proc/self/mountinfo
        # (an overlay's upperdir, a bind mount's root), so a plain search
        # rules most snapshots out before the table is parsed.
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            if f"/snapshots/{snapshot_id}/".encode() not in mountinfo.read():
                return []
        return mounts_using(self._dir(snapshot_id))

    def remove(self, key: str) -> None:
        validate_key(key, "remove")
        with self.store.write("remove") as tx:
            current = tx.get(key, "remove")
            if current.kind is not Kind.COMMITTED:
                mounted = self._mounted_at(current.snapshot_id)
                if mounted:
                    raise FailedPreconditionError(
                        f"remove {key!r}: snapshot is mounted at {mounted[0]}; unmount it "
                        "first",
                        subject=key,
                    )
            record = tx.remove(key, "remove")
            crash_point("remove:deleted")
        crash_point("remove:committed")
        try:
            dirs.retire_dir(self._dir(record.snapshot_id))
        except (OSError, LaminaError) as err:
            log.warning(
                "remove key=%r snapshot_id=%d: directory left for cleanup: %s",
                key,
                record.snapshot_id,
                err,
            )
        log.debug("remove key=%r snapshot_id=%d", key, record.snapshot_id)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        validate_key(info.name, "update")
        validate_labels(info.labels, "update", info.name)
        with self.store.write("update") as tx:
            record = tx.update_labels(info.name, info.labels, fieldpaths, "update")
            return tx.info(record)

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> builtins.list[str]:
        """Remove every directory under ROOT/snapshots that no snapshot owns.

        That is: `.new-*` directories of crashed operations, `.old-*` ones of
        interrupted removals, numbered directories without a record, and work
        directories of committed snapshots. Directories locked by a live
        operation are left alone.
        """
        removed: builtins.list[str] = []
        # (path reported, path to delete, lock held on it)
        doomed: builtins.list[tuple[Path, Path, dirs.LockedDir | None]] = []
        with self.store.write("cleanup") as tx:
            # The write lock keeps every rename into snapshots/ID away while
            # the directory list is read.
            owned = tx.snapshot_ids()
            committed = tx.committed_ids()
            for entry in os.scandir(self.snapshots_dir):
                path = Path(entry.path)
                if entry.name.isdigit() and int(entry.name) in owned:
                    if int(entry.name) in committed and (path / "work").is_dir():
                        doomed.append((path / "work", path / "work", None))
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    doomed.append((path, path, None))
                    continue
                holder = dirs.try_lock_dir(path)
                if holder is None:
                    log.debug("cleanup: path=%s is in use by a live operation, skipped", path)
                    continue
                if entry.name.isdigit():
                    # Move a numbered orphan aside under the lock: a crash may
                    # let SQLite hand its id out again once the lock is gone.
                    aside = f"{dirs.OLD_PREFIX}{entry.name}-{secrets.token_hex(4)}"
                    holder.rename(self.snapshots_dir / aside)
                doomed.append((path, holder.path, holder))

        for reported, path, holder in doomed:
            try:
                if path.is_dir() and not path.is_symlink():
                    dirs.remove_tree(path)
                else:
                    path.unlink()
                removed.append(str(reported))
            except (OSError, LaminaError) as err:
                log.error("cleanup: could not remove path=%s: %s", path, err)
            finally:
                if holder is not None:
                    holder.release()
        if removed:
            log.info("cleanup removed %d paths under %s", len(removed), self.snapshots_dir)
        return removed

    def close(self) -> None:
        self.store.close()


def _remove_quietly(new: dirs.LockedDir) -> None:
    try:
        dirs.remove_tree(new.path)
    except (OSError, LaminaError) as err:
        log.warning("could not remove unfinished directory path=%s: %s", new.path, err)
