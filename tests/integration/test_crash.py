"""Crash safety: a process killed with SIGKILL at any point leaves a consistent store.

A child process works on a real root: it prepares, writes through the
mounts, commits, views and removes. It is killed either at a named crash
point of the snapshotter, where the LAMINA_CRASH_POINT hook kills the
process, or after a random delay. After each kill the root is reopened and checked:
every snapshot has its directory and its parents, the SQLite file passes
its integrity check, `cleanup` removes exactly the directories no snapshot
owns and reports each, and a second `cleanup` finds nothing.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import NotFoundError
from lamina.mount import mount_all, unmount, unmount_all
from lamina.snapshots import Kind

DRIVERS = ["overlay", "native"]

# Kills at random delays per driver; each kill starts a fresh child.
RANDOM_KILLS = 20

# The child works until it is killed. It prints "ready" once its imports are
# done, so the parent's random delay falls inside snapshot operations.
WORKER = r"""
import os, random, sys
from pathlib import Path
from lamina.drivers import open_snapshotter
from lamina.errors import FailedPreconditionError, NotFoundError
from lamina.mount import mount_all, unmount

root, driver, work, seed = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
sn = open_snapshotter(root, driver)
print("ready", flush=True)
step = 0
while True:
    step += 1
    infos = list(sn.list())
    committed = [i.name for i in infos if i.kind.name == "COMMITTED"]
    choice = rng.random()
    if len(infos) > 24 or (choice < 0.25 and infos):
        victim = rng.choice(infos).name
        try:
            sn.remove(victim)
        except FailedPreconditionError:
            pass  # it has children
    elif choice < 0.4 and committed:
        key = f"view-{seed}-{step}"
        sn.view(key, rng.choice(committed))
    else:
        parent = rng.choice(committed + [""])
        key = f"active-{seed}-{step}"
        mounts = sn.prepare(key, parent, labels={"seed": str(seed)})
        target = work / f"m-{seed}-{step}"
        target.mkdir()
        mount_all(mounts, target)
        try:
            for n in range(rng.randint(1, 20)):
                (target / f"file-{seed}-{step}-{n}").write_bytes(os.urandom(rng.randint(0, 65536)))
            if parent and rng.random() < 0.5:
                for old in sorted(target.iterdir())[:2]:
                    if old.is_file():
                        old.unlink()
        finally:
            unmount(target)
        if rng.random() < 0.8:
            sn.commit(f"layer-{seed}-{step}", key, labels={"seed": str(seed)})
"""

# One operation on a prepared root, run with LAMINA_CRASH_POINT set.
ONE_OPERATION = r"""
import sys
from lamina.drivers import open_snapshotter
root, driver, operation = sys.argv[1], sys.argv[2], sys.argv[3]
sn = open_snapshotter(root, driver)
if operation == "prepare":
    sn.prepare("new-active", "base")
elif operation == "view":
    sn.view("new-view", "base")
elif operation == "commit":
    sn.commit("new-committed", "active")
elif operation == "remove":
    sn.remove("leaf")
sys.exit(0)
"""


def owned_dirs(sn: LayerSnapshotter) -> dict[str, Kind]:
    """Map the directory name of every snapshot to its kind."""
    owned = {}
    for info in sn.list():
        dirs = sn.snapshot_dirs(info.name)
        owned[str(dirs.snapshot_id)] = info.kind
    return owned


def expected_orphans(sn: LayerSnapshotter) -> set[str]:
    """Return the paths under ROOT/snapshots that no snapshot owns."""
    owned = owned_dirs(sn)
    snapshots = sn.root / "snapshots"
    orphans = set()
    for entry in snapshots.iterdir():
        kind = owned.get(entry.name)
        if kind is None:
            orphans.add(str(entry))
        elif kind is Kind.COMMITTED and (entry / "work").exists():
            orphans.add(str(entry / "work"))
    return orphans


def check_store(root: Path, driver: str, work: Path) -> list[str]:
    """Check ROOT after a crash (see the module docstring); return what cleanup removed."""
    unmount_all(work)
    with sqlite3.connect(root / "metadata.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []

    sn = open_snapshotter(root, driver)
    try:
        infos = {info.name: info for info in sn.list()}
        walked: list[str] = []
        sn.walk(lambda info: walked.append(info.name))
        assert sorted(walked) == sorted(infos)
        for name, info in infos.items():
            assert sn.stat(name) == info
            if info.parent:
                assert infos[info.parent].kind is Kind.COMMITTED, name
            dirs = sn.snapshot_dirs(name)
            assert dirs.fs.is_dir(), f"{name}: {dirs.fs} is missing"
            assert all(parent.is_dir() for parent in dirs.parents), name
            if info.kind is not Kind.COMMITTED:
                assert sn.mounts(name)
            sn.usage(name)

        orphans = expected_orphans(sn)
        removed = sn.cleanup()
        # A native copy killed with its parent holds its directory's lock
        # until the kernel has delivered its own SIGKILL; cleanup skips a
        # locked directory, so ask again for a moment.
        deadline = time.monotonic() + 10
        while sorted(removed) != sorted(orphans) and time.monotonic() < deadline:
            time.sleep(0.05)
            removed += sn.cleanup()
        assert sorted(removed) == sorted(orphans)
        assert sn.cleanup() == []
        assert expected_orphans(sn) == set()
        assert {info.name: info for info in sn.list()} == infos
        return removed
    finally:
        sn.close()


def mount_check(root: Path, driver: str, work: Path) -> None:
    """Mount a fresh child of every committed snapshot and read it, then remove the child."""
    sn = open_snapshotter(root, driver)
    try:
        for info in list(sn.list("kind==committed")):
            key = f"check-{info.name}"
            mounts = sn.view(key, info.name)
            target = work / "check"
            target.mkdir(exist_ok=True)
            mount_all(mounts, target)
            try:
                for path in target.rglob("*"):
                    if path.is_file():
                        path.read_bytes()
            finally:
                unmount(target)
            sn.remove(key)
    finally:
        sn.close()


def run_child(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("driver", DRIVERS)
def test_kill_at_random_points(driver: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = tmp_path / "work"
    work.mkdir()
    rng = random.Random(f"crash-{driver}")
    removed_total = 0
    for kill in range(RANDOM_KILLS):
        child = run_child([WORKER, str(root), driver, str(work), str(kill)])
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n", child.stderr.read() if child.stderr else ""
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            _, stderr = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, f"worker failed before the kill:\n{stderr}"
        removed_total += len(check_store(root, driver, work))
        for leftover in work.iterdir():
            leftover.rmdir()
    mount_check(root, driver, work)
    # Not every kill lands between a rename and a commit, but over twenty
    # kills some must; zero would mean the kills never hit an operation.
    assert removed_total > 0


CRASH_POINTS = [
    # (operation, crash point, whether the operation took effect)
    ("prepare", "prepare:populated", False),
    ("prepare", "prepare:renamed", False),
    ("prepare", "prepare:committed", True),
    ("view", "view:populated", False),
    ("view", "view:renamed", False),
    ("view", "view:committed", True),
    ("commit", "commit:updated", False),
    ("commit", "commit:committed", True),
    ("remove", "remove:deleted", False),
    ("remove", "remove:committed", True),
]


def prepare_root(root: Path, driver: str, work: Path) -> None:
    """Create base (Committed, with files), active on base and leaf (View)."""
    sn = open_snapshotter(root, driver)
    try:
        mounts = sn.prepare("base-active", "")
        target = work / "setup"
        target.mkdir()
        mount_all(mounts, target)
        try:
            (target / "file").write_bytes(b"base content")
            (target / "dir").mkdir()
        finally:
            unmount(target)
        sn.commit("base", "base-active")
        mounts = sn.prepare("active", "base")
        mount_all(mounts, target)
        try:
            (target / "added").write_bytes(b"active content")
        finally:
            unmount(target)
        sn.view("leaf", "base")
    finally:
        sn.close()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("operation", "point", "took_effect"),
    CRASH_POINTS,
    ids=[point for _, point, _ in CRASH_POINTS],
)
def test_kill_at_crash_point(
    driver: str, operation: str, point: str, took_effect: bool, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    work = tmp_path / "work"
    work.mkdir()
    prepare_root(root, driver, work)

    child = run_child(
        [ONE_OPERATION, str(root), driver, operation], env={"LAMINA_CRASH_POINT": point}
    )
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"crash point {point} was not reached:\n{stderr}"

    removed = check_store(root, driver, work)
    sn = open_snapshotter(root, driver)
    try:
        names = {info.name for info in sn.list()}
        if operation == "prepare":
            assert ("new-active" in names) is took_effect
        elif operation == "view":
            assert ("new-view" in names) is took_effect
        elif operation == "commit":
            assert ("new-committed" in names) is took_effect
            assert ("active" in names) is not took_effect
        else:
            assert ("leaf" in names) is not took_effect
        # A crash after the rename of a new directory, or after a removal
        # was recorded, leaves a directory that only cleanup removes.
        if point in (
            "prepare:populated",
            "prepare:renamed",
            "view:populated",
            "view:renamed",
            "remove:committed",
        ):
            assert len(removed) == 1, removed
        assert {"base"} <= names

        # The store works on: the interrupted operation can be repeated.
        if operation == "prepare":
            if not took_effect:
                sn.prepare("new-active", "base")
            sn.remove("new-active")
        elif operation == "view":
            if not took_effect:
                sn.view("new-view", "base")
            sn.remove("new-view")
        elif operation == "commit" and not took_effect:
            sn.commit("new-committed", "active")
        elif operation == "remove" and not took_effect:
            sn.remove("leaf")
        with pytest.raises(NotFoundError):
            sn.stat("leaf" if operation == "remove" else "never-created")
        assert sn.cleanup() == []
    finally:
        sn.close()
    mount_check(root, driver, work)
