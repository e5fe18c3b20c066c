"""Check a snapshotter root against its metadata store, and repair what is safe to repair.

`check` compares ROOT/metadata.db with ROOT/snapshots, ROOT/images/staging
and the mount table, and returns one `Finding` per problem. `repair` fixes
the findings whose fix loses no committed data:

- directories and files under ROOT/snapshots that no record owns, leftover
  `.new-*` and `.old-*` directories, and staging directories of dead image
  imports are removed (a directory a live operation holds locked is not a
  finding at all);
- the work directory of a Committed snapshot is removed, and a missing work
  directory of an Active overlay snapshot is created again, empty;
- a wrong or missing stored usage of a Committed snapshot is measured again;
- mounts below ROOT are unmounted (Lamina itself never mounts there);
- an Active or View record whose directory is gone is removed: what it held
  was never committed and is lost already, and such records have no
  children;
- an image record whose top snapshot is missing is removed, so that the
  image can be imported again.

Some findings are left for the operator, because every fix would lose or
invent committed data. These are a Committed record whose directory is gone
(restore the directory from a backup, or remove the snapshot and its
children and import again), a parent link to a missing or non-Committed
snapshot or in a cycle, and a database that fails SQLite's integrity checks.

Every check runs while other processes use the root. The directory scan runs
under the store's write lock, as `cleanup` does, so no snapshot is renamed
into place halfway through it; each repair checks its finding again before
it acts.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lamina import mount as mounting
from lamina.drivers import LayerSnapshotter, dirs
from lamina.errors import LaminaError
from lamina.metadata import images as image_records
from lamina.metadata.store import SnapshotRecord, Transaction
from lamina.snapshots.types import Kind, Usage

log = logging.getLogger(__name__)

# Image imports stage layers here (lamina.images.unpack.STAGING_DIR); the
# path is repeated so that checking a root needs none of the image code.
STAGING_DIR = ("images", "staging")


class FindingKind(enum.Enum):
    """The kind of problem; the value is its name in printed and JSON output."""

    ORPHAN_DIRECTORY = "orphan-directory"
    STRAY_FILE = "stray-file"
    TEMPORARY_DIRECTORY = "temporary-directory"
    STAGING_DIRECTORY = "staging-directory"
    COMMITTED_WORK_DIRECTORY = "committed-work-directory"
    MISSING_WORK_DIRECTORY = "missing-work-directory"
    MISSING_DIRECTORY = "missing-directory"
    BROKEN_PARENT = "broken-parent"
    WRONG_USAGE = "wrong-usage"
    IMAGE_MISSING_CHAIN = "image-missing-chain"
    LEFTOVER_MOUNT = "leftover-mount"
    DATABASE = "database"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    """One problem found in a root.

    `subject` is the path, snapshot key or image name concerned. `action`
    describes what `repair` does about it, and starts with "none" when it does
    nothing.
    """

    kind: FindingKind
    subject: str
    detail: str
    action: str
    repairable: bool
    snapshot_id: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "subject": self.subject,
            "detail": self.detail,
            "action": self.action,
            "repairable": self.repairable,
            "snapshot_id": self.snapshot_id,
        }


@dataclass(frozen=True)
class RepairOutcome:
    """The result of repairing one finding; `error` is None when the repair worked."""

    finding: Finding
    repaired: bool
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        result = self.finding.to_json()
        result["repaired"] = self.repaired
        result["error"] = self.error
        return result


@dataclass(frozen=True)
class FsckResult:
    """The findings of one check and, after `--repair`, what became of each."""

    findings: tuple[Finding, ...]
    outcomes: tuple[RepairOutcome, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def unresolved(self) -> tuple[Finding, ...]:
        """Findings that are still there: not repaired, or the repair failed."""
        if not self.outcomes:
            return self.findings
        return tuple(outcome.finding for outcome in self.outcomes if not outcome.repaired)

    def to_json(self) -> dict[str, object]:
        items = (
            [outcome.to_json() for outcome in self.outcomes]
            if self.outcomes
            else [finding.to_json() for finding in self.findings]
        )
        return {
            "clean": self.clean,
            "repaired": bool(self.outcomes),
            "findings": items,
            "unresolved": len(self.unresolved),
        }


def fsck(sn: LayerSnapshotter, *, repair: bool = False) -> FsckResult:
    """Check the root of SN and, with REPAIR, repair what is safe to repair."""
    findings = check(sn)
    for finding in findings:
        log.info(
            "fsck: %s %s: %s (repair: %s)",
            finding.kind,
            finding.subject,
            finding.detail,
            finding.action,
        )
    if not repair or not findings:
        if not findings:
            log.info("fsck: %s is clean", sn.root)
        return FsckResult(tuple(findings))
    return FsckResult(tuple(findings), tuple(repair_findings(sn, findings)))


# ---------------------------------------------------------------------------
# Checking


def check(sn: LayerSnapshotter) -> list[Finding]:
    """Return every problem found in the root of SN, without changing anything."""
    findings: list[Finding] = []
    findings += _check_database(sn)
    findings += _check_mounts(sn)
    with sn.store.write("fsck") as tx:
        # The write lock keeps every create, commit and remove out while the
        # directory list is compared with the records.
        records = _all_records(tx)
        findings += _check_directories(sn, records)
        findings += _check_records(sn, records)
        findings += _check_images(tx, records)
    findings += _check_staging(sn)
    findings += _check_usage(sn, records)
    return findings


def _all_records(tx: Transaction) -> dict[int, SnapshotRecord]:
    records: dict[int, SnapshotRecord] = {}
    after = 0
    while True:
        page = tx.page(after, 1000)
        if not page:
            return records
        for record, _ in page:
            records[record.snapshot_id] = record
        after = page[-1][0].snapshot_id


def _check_database(sn: LayerSnapshotter) -> list[Finding]:
    with sn.store.read("fsck") as tx:
        try:
            problems = [row[0] for row in tx.conn.execute("PRAGMA quick_check")]
            dangling = tx.conn.execute("PRAGMA foreign_key_check").fetchall()
        except sqlite3.DatabaseError as err:
            problems = [str(err)]
            dangling = []
    findings = []
    if problems != ["ok"]:
        findings.append(
            Finding(
                FindingKind.DATABASE,
                str(sn.store.path),
                "SQLite's integrity check failed: " + "; ".join(problems[:5]),
                "none: restore metadata.db from a backup",
                repairable=False,
            )
        )
    # Dangling parent links are reported per snapshot by _check_records;
    # this catches dangling rows in other tables (labels of a lost snapshot).
    others = sorted({row[0] for row in dangling if row[0] != "snapshots"})
    if others:
        findings.append(
            Finding(
                FindingKind.DATABASE,
                str(sn.store.path),
                "rows refer to missing rows in tables: " + ", ".join(others),
                "none: restore metadata.db from a backup",
                repairable=False,
            )
        )
    return findings


def _check_mounts(sn: LayerSnapshotter) -> list[Finding]:
    root = Path(os.path.realpath(sn.root))
    return [
        Finding(
            FindingKind.LEFTOVER_MOUNT,
            str(point),
            "a filesystem is mounted below the root",
            "unmount it",
            repairable=True,
        )
        for point in mounting.mounts_under(root)
        # The root itself may be a mount point of its own filesystem.
        if point != root
    ]


def _check_directories(sn: LayerSnapshotter, records: dict[int, SnapshotRecord]) -> list[Finding]:
    findings: list[Finding] = []
    for entry in sorted(os.scandir(sn.snapshots_dir), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name.isdigit() and int(entry.name) in records:
            findings += _check_owned_directory(sn, path, records[int(entry.name)])
            continue
        if not entry.is_dir(follow_symlinks=False):
            findings.append(
                Finding(
                    FindingKind.STRAY_FILE,
                    str(path),
                    "a file that is not a snapshot directory",
                    "remove it",
                    repairable=True,
                )
            )
            continue
        if not _unlocked(path):
            continue  # a live operation is building or removing it
        if entry.name.startswith((dirs.NEW_PREFIX, dirs.OLD_PREFIX)):
            findings.append(
                Finding(
                    FindingKind.TEMPORARY_DIRECTORY,
                    str(path),
                    "the temporary directory of an interrupted operation",
                    "remove it",
                    repairable=True,
                )
            )
        else:
            findings.append(
                Finding(
                    FindingKind.ORPHAN_DIRECTORY,
                    str(path),
                    "no snapshot record owns this directory",
                    "remove it",
                    repairable=True,
                    snapshot_id=int(entry.name) if entry.name.isdigit() else None,
                )
            )
    return findings


def _check_owned_directory(
    sn: LayerSnapshotter, path: Path, record: SnapshotRecord
) -> list[Finding]:
    work = path / "work"
    if record.kind is Kind.COMMITTED and work.is_dir():
        return [
            Finding(
                FindingKind.COMMITTED_WORK_DIRECTORY,
                str(work),
                f"committed snapshot {record.key!r} still has an overlay work directory",
                "remove the work directory",
                repairable=True,
                snapshot_id=record.snapshot_id,
            )
        ]
    if (
        record.kind is Kind.ACTIVE
        and sn.driver_name == "overlay"
        and (path / "fs").is_dir()
        and not work.is_dir()
    ):
        return [
            Finding(
                FindingKind.MISSING_WORK_DIRECTORY,
                str(work),
                f"active snapshot {record.key!r} has no overlay work directory, so it "
                "cannot be mounted",
                "create an empty work directory",
                repairable=True,
                snapshot_id=record.snapshot_id,
            )
        ]
    return []


def _check_records(sn: LayerSnapshotter, records: dict[int, SnapshotRecord]) -> list[Finding]:
    findings: list[Finding] = []
    for record in records.values():
        fs = sn.snapshots_dir / str(record.snapshot_id) / "fs"
        if not fs.is_dir():
            findings.append(_missing_directory(record, fs))
        findings += _check_parent(record, records)
    return findings


def _missing_directory(record: SnapshotRecord, fs: Path) -> Finding:
    if record.kind is Kind.COMMITTED:
        return Finding(
            FindingKind.MISSING_DIRECTORY,
            record.key,
            f"committed snapshot {record.key!r} has no directory {fs}; its content is lost",
            "none: restore the directory from a backup, or remove the snapshot and its "
            "children and import the image again",
            repairable=False,
            snapshot_id=record.snapshot_id,
        )
    return Finding(
        FindingKind.MISSING_DIRECTORY,
        record.key,
        f"{record.kind} snapshot {record.key!r} has no directory {fs}",
        "remove the record (the uncommitted content is lost already)",
        repairable=True,
        snapshot_id=record.snapshot_id,
    )


def _check_parent(record: SnapshotRecord, records: dict[int, SnapshotRecord]) -> list[Finding]:
    if record.parent_id is None:
        return []
    parent = records.get(record.parent_id)
    problem = ""
    if parent is None:
        problem = f"its parent id {record.parent_id} names no snapshot"
    elif parent.kind is not Kind.COMMITTED:
        problem = f"its parent {parent.key!r} is {parent.kind}, not Committed"
    elif _in_cycle(record, records):
        problem = "its chain of parents loops back on itself"
    if not problem:
        return []
    return [
        Finding(
            FindingKind.BROKEN_PARENT,
            record.key,
            f"snapshot {record.key!r}: {problem}",
            "none: remove the snapshot and import or build it again",
            repairable=False,
            snapshot_id=record.snapshot_id,
        )
    ]


def _in_cycle(record: SnapshotRecord, records: dict[int, SnapshotRecord]) -> bool:
    seen = {record.snapshot_id}
    current: SnapshotRecord | None = record
    while current is not None and current.parent_id is not None:
        if current.parent_id in seen:
            return True
        seen.add(current.parent_id)
        current = records.get(current.parent_id)
    return False


def _check_images(tx: Transaction, records: dict[int, SnapshotRecord]) -> list[Finding]:
    committed = {r.key for r in records.values() if r.kind is Kind.COMMITTED}
    findings = []
    for image in image_records.list_images(tx):
        if not image.chain_id or image.chain_id in committed:
            continue
        findings.append(
            Finding(
                FindingKind.IMAGE_MISSING_CHAIN,
                image.name,
                f"image {image.name!r} names snapshot {image.chain_id!r}, which is not a "
                "committed snapshot",
                "remove the image record; import the image again",
                repairable=True,
            )
        )
    return findings


def _check_staging(sn: LayerSnapshotter) -> list[Finding]:
    staging = sn.root.joinpath(*STAGING_DIR)
    if not staging.is_dir():
        return []
    return [
        Finding(
            FindingKind.STAGING_DIRECTORY,
            entry.path,
            "the staging directory of an image import that is no longer running",
            "remove it",
            repairable=True,
        )
        for entry in sorted(os.scandir(staging), key=lambda e: e.name)
        if _unlocked(Path(entry.path))
    ]


def _check_usage(sn: LayerSnapshotter, records: dict[int, SnapshotRecord]) -> list[Finding]:
    # Measuring runs outside any transaction: a large root takes a while.
    findings = []
    for record in records.values():
        if record.kind is not Kind.COMMITTED:
            continue
        fs = sn.snapshots_dir / str(record.snapshot_id) / "fs"
        if not fs.is_dir():
            continue  # reported as a missing directory
        measured = dirs.disk_usage(fs)
        if record.usage == measured:
            continue
        if not _still_committed(sn, record):
            continue  # removed while it was measured
        stored = (
            "none" if record.usage is None else f"{record.size} bytes, {record.inodes} inodes"
        )
        findings.append(
            Finding(
                FindingKind.WRONG_USAGE,
                record.key,
                f"stored usage {stored}, measured {measured.size} bytes, "
                f"{measured.inodes} inodes",
                "store the measured usage",
                repairable=True,
                snapshot_id=record.snapshot_id,
            )
        )
    return findings


def _still_committed(sn: LayerSnapshotter, record: SnapshotRecord) -> bool:
    with sn.store.read("fsck") as tx:
        current = tx.find(record.key)
    return current is not None and current.snapshot_id == record.snapshot_id


def _unlocked(path: Path) -> bool:
    """Return True when PATH exists and no live operation holds its lock."""
    holder = dirs.try_lock_dir(path)
    if holder is None:
        return False
    holder.release()
    return True


# ---------------------------------------------------------------------------
# Repairing


def repair_findings(sn: LayerSnapshotter, findings: list[Finding]) -> list[RepairOutcome]:
    """Repair each repairable finding; return what became of every finding.

    Mounts go first, since a directory with a mount inside cannot be removed.
    A finding that no longer holds when its turn comes counts as repaired.
    """
    ordered = sorted(findings, key=lambda f: f.kind is not FindingKind.LEFTOVER_MOUNT)
    outcomes: list[RepairOutcome] = []
    for finding in ordered:
        if not finding.repairable:
            outcomes.append(RepairOutcome(finding, repaired=False, error="needs an operator"))
            continue
        try:
            _REPAIRS[finding.kind](sn, finding)
        except (OSError, LaminaError) as err:
            log.error("fsck: could not repair %s %s: %s", finding.kind, finding.subject, err)
            outcomes.append(RepairOutcome(finding, repaired=False, error=str(err)))
            continue
        log.info("fsck: repaired %s %s: %s", finding.kind, finding.subject, finding.action)
        outcomes.append(RepairOutcome(finding, repaired=True))
    return outcomes


def _repair_mount(sn: LayerSnapshotter, finding: Finding) -> None:
    target = Path(finding.subject)
    if mounting.is_mountpoint(target):
        mounting.unmount(target)


@contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold PATH's directory lock; yield False when a live operation holds it or it is gone."""
    holder = dirs.try_lock_dir(path)
    try:
        yield holder is not None
    finally:
        if holder is not None:
            holder.release()


def _repair_unowned(sn: LayerSnapshotter, finding: Finding) -> None:
    path = Path(finding.subject)
    if finding.kind is FindingKind.STRAY_FILE:
        if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink()):
            path.unlink()
        return
    with _locked(path) as held:
        if not held:
            return  # gone, or a live operation took it over meanwhile
        if finding.snapshot_id is not None:
            # A numbered directory: check under the write lock that no
            # snapshot claimed the id since the check, then move it out of the
            # way, so that a new snapshot can take the number.
            with sn.store.write("fsck repair") as tx:
                if finding.snapshot_id in tx.snapshot_ids():
                    return
                retired = path.with_name(f"{dirs.OLD_PREFIX}{path.name}-{secrets.token_hex(4)}")
                os.rename(path, retired)
            path = retired
        dirs.remove_tree(path)


def _repair_work(sn: LayerSnapshotter, finding: Finding) -> None:
    work = Path(finding.subject)
    with sn.store.read("fsck repair") as tx:
        committed = finding.snapshot_id in tx.committed_ids()
    if committed and work.is_dir():
        dirs.remove_tree(work)


def _repair_missing_work(sn: LayerSnapshotter, finding: Finding) -> None:
    work = Path(finding.subject)
    # Under the write lock no commit can turn the snapshot Committed, nor a
    # removal take its directory, while the work directory is made.
    with sn.store.write("fsck repair") as tx:
        if finding.snapshot_id in tx.committed_ids() or finding.snapshot_id not in (
            tx.snapshot_ids()
        ):
            return
        if not work.is_dir() and work.parent.is_dir():
            work.mkdir(0o711)


def _repair_missing_directory(sn: LayerSnapshotter, finding: Finding) -> None:
    with sn.store.write("fsck repair") as tx:
        record = tx.find(finding.subject)
        if record is None or record.snapshot_id != finding.snapshot_id:
            return
        own = sn.snapshots_dir / str(record.snapshot_id)
        if record.kind is Kind.COMMITTED or (own / "fs").is_dir():
            return
        tx.remove(record.key, "fsck repair")
    # What is left of the directory (a work directory without `fs`) is no
    # snapshot's now.
    if own.exists():
        dirs.retire_dir(own)


def _repair_usage(sn: LayerSnapshotter, finding: Finding) -> None:
    assert finding.snapshot_id is not None
    measured: Usage = dirs.disk_usage(sn.snapshots_dir / str(finding.snapshot_id) / "fs")
    with sn.store.write("fsck repair") as tx:
        record = tx.find(finding.subject)
        if record is None or record.snapshot_id != finding.snapshot_id:
            return
        tx.set_usage(record.snapshot_id, measured)


def _repair_image(sn: LayerSnapshotter, finding: Finding) -> None:
    with sn.store.write("fsck repair") as tx:
        image = image_records.find_image(tx, finding.subject)
        if image is None or not image.chain_id:
            return
        top = tx.find(image.chain_id)
        if top is not None and top.kind is Kind.COMMITTED:
            return
        image_records.delete_image(tx, image.name, "fsck repair")


_REPAIRS = {
    FindingKind.LEFTOVER_MOUNT: _repair_mount,
    FindingKind.ORPHAN_DIRECTORY: _repair_unowned,
    FindingKind.STRAY_FILE: _repair_unowned,
    FindingKind.TEMPORARY_DIRECTORY: _repair_unowned,
    FindingKind.STAGING_DIRECTORY: _repair_unowned,
    FindingKind.COMMITTED_WORK_DIRECTORY: _repair_work,
    FindingKind.MISSING_WORK_DIRECTORY: _repair_missing_work,
    FindingKind.MISSING_DIRECTORY: _repair_missing_directory,
    FindingKind.WRONG_USAGE: _repair_usage,
    FindingKind.IMAGE_MISSING_CHAIN: _repair_image,
}
