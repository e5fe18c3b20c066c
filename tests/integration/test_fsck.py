"""`lamina fsck`: each kind of damage is found, repaired when that is safe, and left otherwise.

Every test damages a real root by hand, the way a crash, a bug or an
operator would: a directory removed, a row changed with foreign keys off, a
mount left below the root. It then checks what `check` reports, what
`repair` changes, and that committed content survives.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import lamina.cli
from lamina.cli import fsck as fsck_cli
from lamina.cli.common import add_global_options
from lamina.drivers import LayerSnapshotter, dirs, open_snapshotter
from lamina.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from lamina.fsck import Finding, FindingKind, check, fsck
from lamina.metadata import images as image_records
from lamina.mount import is_mountpoint, unmount
from lamina.snapshots.types import Kind, Usage

DRIVERS = ["overlay", "native"]


@pytest.fixture(params=DRIVERS)
def sn(request: pytest.FixtureRequest, lamina_root: Path) -> Iterator[LayerSnapshotter]:
    snapshotter = open_snapshotter(lamina_root, request.param)
    try:
        yield snapshotter
    finally:
        snapshotter.close()


def write_layer(sn: LayerSnapshotter, key: str, files: dict[str, bytes]) -> None:
    fs = sn.snapshot_dirs(key).fs
    for name, data in files.items():
        (fs / name).write_bytes(data)


def committed(sn: LayerSnapshotter, name: str, parent: str = "", size: int = 4096) -> Path:
    """Make the committed snapshot NAME holding one file; return its fs directory."""
    key = f"{name}-active"
    sn.prepare(key, parent)
    write_layer(sn, key, {f"{name}.bin": os.urandom(size)})
    sn.commit(name, key)
    return sn.snapshot_dirs(name).fs


def kinds(findings: Sequence[Finding]) -> list[FindingKind]:
    return sorted((f.kind for f in findings), key=lambda k: k.value)


def raw_db(sn: LayerSnapshotter) -> sqlite3.Connection:
    """A connection with foreign keys off, to damage the store as a bug could."""
    conn = sqlite3.connect(sn.store.path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Run `lamina ARGV` in this process; return the exit status and stdout."""
    parser = lamina.cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "fsck" not in action.choices:
            common = argparse.ArgumentParser(add_help=False)
            add_global_options(common, suppress=True)
            fsck_cli.register(action, common)
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status: int = args.handler(args)
    return status, out.getvalue()


# ---------------------------------------------------------------- a clean root


def test_clean_root_has_no_findings(sn: LayerSnapshotter) -> None:
    base = committed(sn, "base")
    committed(sn, "child", "base")
    sn.prepare("work", "child")
    sn.view("look", "base")
    sn.view("empty-view")

    result = fsck(sn, repair=True)

    assert result.clean
    assert result.findings == ()
    assert result.outcomes == ()
    assert (base / "base.bin").is_file()


def test_cli_exit_status_clean(sn: LayerSnapshotter) -> None:
    committed(sn, "base")

    status, out = run_cli(["--root", str(sn.root), "--json", "fsck"])

    assert status == 0
    assert json.loads(out) == {"clean": True, "repaired": False, "findings": [], "unresolved": 0}


# ---------------------------------------------------------------- directories no snapshot owns


def test_orphan_numbered_directory_removed(sn: LayerSnapshotter) -> None:
    committed(sn, "base")
    orphan = sn.snapshots_dir / "4242"
    (orphan / "fs").mkdir(parents=True)
    (orphan / "fs" / "data").write_bytes(b"x" * 100)

    findings = check(sn)

    assert kinds(findings) == [FindingKind.ORPHAN_DIRECTORY]
    assert findings[0].subject == str(orphan)
    assert findings[0].snapshot_id == 4242
    assert findings[0].repairable

    result = fsck(sn, repair=True)

    assert [o.repaired for o in result.outcomes] == [True]
    assert not orphan.exists()
    assert not [p for p in sn.snapshots_dir.iterdir() if p.name.startswith(dirs.OLD_PREFIX)]
    assert check(sn) == []
    assert sn.stat("base").kind is Kind.COMMITTED


def test_temporary_directories_removed(sn: LayerSnapshotter) -> None:
    new = sn.snapshots_dir / f"{dirs.NEW_PREFIX}0123456789abcdef"
    old = sn.snapshots_dir / f"{dirs.OLD_PREFIX}7-deadbeef"
    for path in (new, old):
        (path / "fs" / "sub").mkdir(parents=True)
        (path / "fs" / "sub" / "file").write_text("left by a crash")
    stray = sn.snapshots_dir / "notes.txt"
    stray.write_text("not a snapshot")

    findings = check(sn)

    assert kinds(findings) == [
        FindingKind.STRAY_FILE,
        FindingKind.TEMPORARY_DIRECTORY,
        FindingKind.TEMPORARY_DIRECTORY,
    ]

    fsck(sn, repair=True)

    assert sorted(os.listdir(sn.snapshots_dir)) == []
    assert check(sn) == []


def test_locked_new_directory_is_not_a_finding(sn: LayerSnapshotter) -> None:
    # A directory a live operation is building holds its lock; neither the
    # check nor the repair may touch it.
    live = dirs.make_locked_dir(sn.snapshots_dir)
    try:
        (live.path / "fs").mkdir()

        assert check(sn) == []
        assert fsck(sn, repair=True).clean
        assert (live.path / "fs").is_dir()
    finally:
        live.release()
        dirs.remove_tree(live.path)


def test_staging_directory_of_dead_import_removed(sn: LayerSnapshotter) -> None:
    staging = sn.root / "images" / "staging"
    staging.mkdir(parents=True)
    dead = staging / ".new-00ff00ff00ff00ff"
    (dead / "fs").mkdir(parents=True)
    live = dirs.make_locked_dir(staging)
    try:
        findings = check(sn)

        assert kinds(findings) == [FindingKind.STAGING_DIRECTORY]
        assert findings[0].subject == str(dead)

        fsck(sn, repair=True)

        assert not dead.exists()
        assert live.path.is_dir()
    finally:
        live.release()


def test_work_directory_of_committed_removed(sn: LayerSnapshotter) -> None:
    fs = committed(sn, "base")
    work = fs.parent / "work"
    (work / "work").mkdir(parents=True)

    findings = check(sn)

    assert kinds(findings) == [FindingKind.COMMITTED_WORK_DIRECTORY]
    assert findings[0].subject == str(work)

    fsck(sn, repair=True)

    assert not work.exists()
    assert (fs / "base.bin").is_file()
    assert check(sn) == []


def test_missing_work_directory_recreated(lamina_root: Path) -> None:
    sn = open_snapshotter(lamina_root, "overlay")
    try:
        committed(sn, "base")
        sn.prepare("child", "base")
        work = sn.snapshot_dirs("child").work
        assert work is not None
        dirs.remove_tree(work)

        findings = check(sn)

        assert kinds(findings) == [FindingKind.MISSING_WORK_DIRECTORY]

        fsck(sn, repair=True)

        assert work.is_dir()
        assert check(sn) == []
    finally:
        sn.close()


# ---------------------------------------------------------------- records without directories


@pytest.mark.parametrize("kind", ["active", "view"])
def test_uncommitted_record_without_directory_removed(sn: LayerSnapshotter, kind: str) -> None:
    committed(sn, "base")
    if kind == "active":
        sn.prepare("lost", "base")
    else:
        sn.view("lost", "base")
    own = sn.snapshot_dirs("lost").fs.parent
    dirs.remove_tree(own)

    findings = check(sn)

    assert kinds(findings) == [FindingKind.MISSING_DIRECTORY]
    assert findings[0].subject == "lost"
    assert findings[0].repairable

    result = fsck(sn, repair=True)

    assert result.unresolved == ()
    with pytest.raises(NotFoundError):
        sn.stat("lost")
    assert sn.stat("base").kind is Kind.COMMITTED
    assert check(sn) == []
    # The key is free again.
    sn.prepare("lost", "base")


def test_active_without_fs_subdirectory_removed(sn: LayerSnapshotter) -> None:
    sn.prepare("half")
    fs = sn.snapshot_dirs("half").fs
    dirs.remove_tree(fs)

    assert kinds(check(sn)) == [FindingKind.MISSING_DIRECTORY]

    fsck(sn, repair=True)

    with pytest.raises(NotFoundError):
        sn.stat("half")
    assert not fs.parent.exists()
    assert check(sn) == []


def test_committed_record_without_directory_kept(sn: LayerSnapshotter) -> None:
    # Removing the record would cut the children off their parent and hide
    # that a layer was lost; the operator decides.
    fs = committed(sn, "base")
    committed(sn, "child", "base")
    dirs.remove_tree(fs.parent)

    findings = check(sn)

    assert kinds(findings) == [FindingKind.MISSING_DIRECTORY]
    assert not findings[0].repairable

    result = fsck(sn, repair=True)

    assert [o.repaired for o in result.outcomes] == [False]
    assert len(result.unresolved) == 1
    assert sn.stat("base").kind is Kind.COMMITTED
    assert sn.stat("child").parent == "base"

    status, out = run_cli(["--root", str(sn.root), "--json", "fsck", "--repair"])

    assert status == fsck_cli.EXIT_FINDINGS
    report = json.loads(out)
    assert report["unresolved"] == 1
    assert report["findings"][0]["kind"] == "missing-directory"
    assert report["findings"][0]["repaired"] is False

    # The manual fix the finding names: remove the child, then the layer.
    sn.remove("child")
    sn.remove("base")
    assert check(sn) == []


# ---------------------------------------------------------------- parent links


def test_parent_pointing_nowhere_reported(sn: LayerSnapshotter) -> None:
    committed(sn, "base")
    committed(sn, "child", "base")
    child_id = sn.snapshot_dirs("child").snapshot_id
    with contextlib.closing(raw_db(sn)) as conn:
        conn.execute("UPDATE snapshots SET parent_id = 9999 WHERE id = ?", (child_id,))

    findings = check(sn)

    assert FindingKind.BROKEN_PARENT in kinds(findings)
    broken = [f for f in findings if f.kind is FindingKind.BROKEN_PARENT]
    assert broken[0].subject == "child"
    assert not broken[0].repairable

    fsck(sn, repair=True)

    assert sn.snapshot_dirs("child").fs.is_dir()
    assert FindingKind.BROKEN_PARENT in kinds(check(sn))


def test_parent_not_committed_reported(sn: LayerSnapshotter) -> None:
    committed(sn, "base")
    sn.prepare("child", "base")
    base_id = sn.snapshot_dirs("base").snapshot_id
    with contextlib.closing(raw_db(sn)) as conn:
        conn.execute("UPDATE snapshots SET kind = ? WHERE id = ?", (int(Kind.ACTIVE), base_id))

    findings = [f for f in check(sn) if f.kind is FindingKind.BROKEN_PARENT]

    assert [f.subject for f in findings] == ["child"]


def test_parent_cycle_reported(sn: LayerSnapshotter) -> None:
    committed(sn, "a")
    committed(sn, "b", "a")
    a_id = sn.snapshot_dirs("a").snapshot_id
    b_id = sn.snapshot_dirs("b").snapshot_id
    with contextlib.closing(raw_db(sn)) as conn:
        conn.execute("UPDATE snapshots SET parent_id = ? WHERE id = ?", (b_id, a_id))

    findings = [f for f in check(sn) if f.kind is FindingKind.BROKEN_PARENT]

    assert sorted(f.subject for f in findings) == ["a", "b"]


# ---------------------------------------------------------------- usage


def test_wrong_usage_measured_again(sn: LayerSnapshotter) -> None:
    committed(sn, "base", size=8192)
    base_id = sn.snapshot_dirs("base").snapshot_id
    measured = dirs.disk_usage(sn.snapshot_dirs("base").fs)
    with sn.store.write() as tx:
        tx.set_usage(base_id, Usage(1, 1))

    findings = check(sn)

    assert kinds(findings) == [FindingKind.WRONG_USAGE]
    assert findings[0].subject == "base"

    fsck(sn, repair=True)

    assert sn.usage("base") == measured
    assert check(sn) == []


def test_missing_usage_measured(sn: LayerSnapshotter) -> None:
    committed(sn, "base")
    with contextlib.closing(raw_db(sn)) as conn:
        conn.execute("UPDATE snapshots SET size = NULL, inodes = NULL")

    assert kinds(check(sn)) == [FindingKind.WRONG_USAGE]

    fsck(sn, repair=True)

    assert check(sn) == []
    assert sn.usage("base").inodes == 2


# ---------------------------------------------------------------- images


def put_image(sn: LayerSnapshotter, name: str, chain_id: str) -> None:
    record = image_records.ImageRecord(
        name=name,
        manifest_digest="sha256:" + "1" * 64,
        config_digest="sha256:" + "2" * 64,
        media_type="application/vnd.oci.image.manifest.v1+json",
        platform="linux/amd64",
        chain_id=chain_id,
        diff_ids=(chain_id,) if chain_id else (),
        size=1,
    )
    with sn.store.write() as tx:
        image_records.put_image(tx, record)


def test_image_missing_chain_record_removed(sn: LayerSnapshotter) -> None:
    present = "sha256:" + "a" * 64
    missing = "sha256:" + "b" * 64
    committed(sn, present)
    put_image(sn, "good:1", present)
    put_image(sn, "empty:1", "")
    put_image(sn, "lost:1", missing)

    findings = check(sn)

    assert kinds(findings) == [FindingKind.IMAGE_MISSING_CHAIN]
    assert findings[0].subject == "lost:1"

    fsck(sn, repair=True)

    with sn.store.read() as tx:
        names = [image.name for image in image_records.list_images(tx)]
    assert names == ["empty:1", "good:1"]
    assert check(sn) == []


def test_image_on_active_snapshot_reported(sn: LayerSnapshotter) -> None:
    chain = "sha256:" + "c" * 64
    sn.prepare(chain)
    put_image(sn, "half:1", chain)

    assert kinds(check(sn)) == [FindingKind.IMAGE_MISSING_CHAIN]


# ---------------------------------------------------------------- mounts


def test_leftover_mount_unmounted(sn: LayerSnapshotter) -> None:
    fs = committed(sn, "base")
    target = sn.root / "mnt"
    target.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(fs), str(target)], check=True)
    try:
        findings = check(sn)

        assert kinds(findings) == [FindingKind.LEFTOVER_MOUNT]
        assert findings[0].subject == str(target)

        status, out = run_cli(["--root", str(sn.root), "fsck", "--repair"])

        assert status == fsck_cli.EXIT_REPAIRED
        assert "leftover-mount" in out
        assert not is_mountpoint(target)
        assert (fs / "base.bin").is_file()
    finally:
        if is_mountpoint(target):
            unmount(target)


def test_mount_inside_orphan_unmounted_first(sn: LayerSnapshotter, tmp_path: Path) -> None:
    source = tmp_path / "outside"
    source.mkdir()
    (source / "keep").write_text("not the snapshotter's")
    orphan = sn.snapshots_dir / "777"
    (orphan / "fs").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(source), str(orphan / "fs")], check=True)
    try:
        assert kinds(check(sn)) == [FindingKind.LEFTOVER_MOUNT, FindingKind.ORPHAN_DIRECTORY]

        result = fsck(sn, repair=True)

        assert result.unresolved == ()
        assert not orphan.exists()
        # Unmounting first kept the removal from reaching through the mount.
        assert (source / "keep").read_text() == "not the snapshotter's"
    finally:
        if is_mountpoint(orphan / "fs"):
            unmount(orphan / "fs")


# ---------------------------------------------------------------- the command


def test_cli_reports_then_repairs(sn: LayerSnapshotter) -> None:
    committed(sn, "base")
    (sn.snapshots_dir / "31337" / "fs").mkdir(parents=True)

    status, out = run_cli(["--root", str(sn.root), "fsck"])

    assert status == fsck_cli.EXIT_FINDINGS
    assert "orphan-directory" in out
    assert (sn.snapshots_dir / "31337").exists()

    status, out = run_cli(["--root", str(sn.root), "--json", "fsck", "--repair"])

    assert status == fsck_cli.EXIT_REPAIRED
    report = json.loads(out)
    assert report["findings"][0]["kind"] == "orphan-directory"
    assert report["findings"][0]["repaired"] is True
    assert report["unresolved"] == 0

    status, _ = run_cli(["--root", str(sn.root), "fsck"])

    assert status == 0


# ---------------------------------------------------------------- alongside live operations


def test_repair_beside_live_operations_keeps_snapshots(sn: LayerSnapshotter) -> None:
    # Every finding a repair acts on is checked again under the lock, so a
    # snapshot being created, committed or removed meanwhile never loses its
    # directory, whatever the check saw a moment before.
    stop = threading.Event()
    errors: list[BaseException] = []
    alive: set[str] = set()

    def churn() -> None:
        step = 0
        try:
            while not stop.is_set():
                step += 1
                key = f"k{step}"
                sn.prepare(key)
                write_layer(sn, key, {"f": b"data"})
                sn.commit(f"c{step}", key)
                alive.add(f"c{step}")
                if step % 2 == 0:
                    sn.remove(f"c{step - 1}")
                    alive.discard(f"c{step - 1}")
        except (AlreadyExistsError, FailedPreconditionError, NotFoundError, OSError) as err:
            errors.append(err)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(40):
            fsck(sn, repair=True)
    finally:
        stop.set()
        worker.join(timeout=60)

    assert not worker.is_alive()
    assert errors == []
    for name in alive:
        assert (sn.snapshot_dirs(name).fs / "f").read_bytes() == b"data"
    sn.cleanup()
    assert check(sn) == []
