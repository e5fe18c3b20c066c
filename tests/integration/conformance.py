"""Conformance suite for any implementation of `lamina.snapshots.Snapshotter`.

The cases follow those of containerd's snapshot conformance suite
(snapshots/testsuite in containerd 1.6.20) and add Lamina's own rules: deep
stacks, odd keys, labels, walk filters and usage. Every test writes real
files through the mounts a snapshot returns and reads them back through real
mounts. No test looks at the snapshotter's own directories, so the suite
runs unchanged against a remote snapshotter.

To run it, subclass `SnapshotterConformance` in a test module and define a
fixture `snapshotter_factory` returning a `Factory`: a callable that opens a
snapshotter on a fresh, empty root directory. A factory may also carry a
`max_lower_layers` attribute (see `chain_limit`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lamina.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from lamina.mount import mount_all, unmount
from lamina.snapshots import Info, Kind, Mount, Snapshotter

Factory = Callable[[Path], Snapshotter]

# containerd's suite gives every snapshot a garbage-collection root label;
# giving one here too checks that ordinary labels survive each operation.
GC_LABELS: Mapping[str, str] = {"containerd.io/gc.root": "conformance"}

# The kernel's overlayfs refuses more than 500 lower layers (OVL_MAX_STACK in
# fs/overlayfs/params.h), so a snapshot may sit on at most 500 committed ones.
MAX_LOWER_LAYERS = 500

# Time stamps may be stored with less than microsecond resolution.
TIME_SLACK = timedelta(milliseconds=1)


# ---------------------------------------------------------------------------
# Mounting


@contextmanager
def mounted(mounts: Sequence[Mount], target: Path) -> Iterator[Path]:
    """Mount MOUNTS on TARGET (created if missing) and unmount on exit."""
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)


# ---------------------------------------------------------------------------
# Changes to a tree, applied both to a mounted snapshot and to a flat copy

Change = Callable[[Path], None]


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def create_file(path: str, data: bytes, mode: int = 0o644) -> Change:
    def change(root: Path) -> None:
        target = _inside(root, path)
        target.write_bytes(data)
        os.chmod(target, mode)

    return change


def create_dir(path: str, mode: int = 0o755) -> Change:
    def change(root: Path) -> None:
        target = _inside(root, path)
        target.mkdir(exist_ok=True)
        os.chmod(target, mode)

    return change


def create_symlink(target_text: str, path: str) -> Change:
    def change(root: Path) -> None:
        os.symlink(target_text, _inside(root, path))

    return change


def remove_all(path: str) -> Change:
    def change(root: Path) -> None:
        target = _inside(root, path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    return change


def chown(path: str, uid: int, gid: int) -> Change:
    def change(root: Path) -> None:
        os.lchown(_inside(root, path), uid, gid)

    return change


def hard_link(existing: str, new: str) -> Change:
    def change(root: Path) -> None:
        os.link(_inside(root, existing), _inside(root, new))

    return change


def rename(old: str, new: str) -> Change:
    # Like mv(1): overlayfs without redirect_dir refuses to rename a directory
    # from a lower layer with EXDEV, and shutil.move then copies and deletes.
    def change(root: Path) -> None:
        shutil.move(_inside(root, old), _inside(root, new))

    return change


def changes(*steps: Change) -> Change:
    """Combine STEPS into one change applied in order."""

    def change(root: Path) -> None:
        for step in steps:
            step(root)

    return change


# ---------------------------------------------------------------------------
# Comparing trees


@dataclass(frozen=True)
class Entry:
    """What the comparison checks of one path: type, owner, mode and content."""

    type: str
    mode: int
    uid: int
    gid: int
    content: bytes | str | None
    xattrs: tuple[tuple[str, bytes], ...]


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def read_entry(path: Path) -> Entry:
    """Read the comparable state of PATH without following a final symlink."""
    st = os.lstat(path)
    kind = _file_type(st.st_mode)
    content: bytes | str | None = None
    if kind == "file":
        content = path.read_bytes()
    elif kind == "symlink":
        content = os.readlink(path)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if kind != "symlink":
        names = sorted(os.listxattr(path, follow_symlinks=False))
        xattrs = tuple((name, os.getxattr(path, name, follow_symlinks=False)) for name in names)
    return Entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, xattrs)


def read_tree(root: Path) -> dict[str, Entry]:
    """Map every path below ROOT (relative, root itself excluded) to its entry."""
    tree: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            tree[str(full.relative_to(root))] = read_entry(full)
    return tree


def assert_same_tree(expected_root: Path, actual_root: Path) -> None:
    """Fail on any path missing, unexpected or different in ACTUAL_ROOT."""
    expected = read_tree(expected_root)
    actual = read_tree(actual_root)
    assert sorted(set(expected) - set(actual)) == [], "paths missing from the snapshot"
    assert sorted(set(actual) - set(expected)) == [], "unexpected paths in the snapshot"
    for path, entry in expected.items():
        assert actual[path] == entry, f"{path} differs"


# ---------------------------------------------------------------------------
# Snapshot helpers


_counter = 0


def unique(prefix: str) -> str:
    """Return a key that no other call in this process returns."""
    global _counter
    _counter += 1
    return f"{prefix}-{os.getpid()}-{_counter}"


def write_layer(
    sn: Snapshotter, work: Path, parent: str, change: Change, name: str | None = None
) -> str:
    """Prepare on PARENT, apply CHANGE through the mounts, commit; return the name."""
    name = name or unique("layer")
    key = name + "-active"
    mounts = sn.prepare(key, parent, labels=GC_LABELS)
    with mounted(mounts, work / unique("apply")) as target:
        change(target)
    sn.commit(name, key, labels=GC_LABELS)
    return name


def assert_view_equals(sn: Snapshotter, work: Path, name: str, expected_root: Path) -> None:
    """View the committed snapshot NAME and compare it with EXPECTED_ROOT."""
    view_key = unique(name + "-view")
    mounts = sn.view(view_key, name, labels=GC_LABELS)
    try:
        with mounted(mounts, work / unique("check")) as target:
            assert_same_tree(expected_root, target)
    finally:
        sn.remove(view_key)


def check_layers(sn: Snapshotter, work: Path, *layers: Change) -> list[str]:
    """Commit LAYERS one on another; after each, compare a view with a flat copy."""
    flat = work / unique("flat")
    flat.mkdir()
    parent = ""
    names = []
    for layer in layers:
        parent = write_layer(sn, work, parent, layer)
        layer(flat)
        assert_view_equals(sn, work, parent, flat)
        names.append(parent)
    return names


def walk_names(sn: Snapshotter, *filters: str) -> set[str]:
    """Return the names of the snapshots that a walk with FILTERS visits."""
    seen: list[str] = []
    sn.walk(lambda info: seen.append(info.name), *filters)
    assert len(seen) == len(set(seen)), "walk visited a snapshot twice"
    return set(seen)


def as_utc(moment: datetime | None) -> datetime:
    """Return MOMENT as an aware UTC time; a naive time is taken as UTC."""
    assert moment is not None, "snapshot info has no time stamp"
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)


def quote(value: str) -> str:
    """Quote VALUE for a filter; JSON string syntax is a subset of Go's."""
    return json.dumps(value, ensure_ascii=False)


def build_named_snapshots(sn: Snapshotter, prefix: str = "") -> None:
    """Create c1 <- c2 (Committed), a1 on c2, a2, v1 on c2 and v2, all empty."""
    sn.prepare(prefix + "c1-a", "", labels=GC_LABELS)
    sn.commit(prefix + "c1", prefix + "c1-a", labels=GC_LABELS)
    sn.prepare(prefix + "c2-a", prefix + "c1", labels=GC_LABELS)
    sn.commit(prefix + "c2", prefix + "c2-a", labels=GC_LABELS)
    sn.prepare(prefix + "a1", prefix + "c2", labels=GC_LABELS)
    sn.prepare(prefix + "a2", "", labels=GC_LABELS)
    sn.view(prefix + "v1", prefix + "c2", labels=GC_LABELS)
    sn.view(prefix + "v2", "", labels=GC_LABELS)


NAMED_SNAPSHOTS: tuple[tuple[str, Kind, str], ...] = (
    ("c1", Kind.COMMITTED, ""),
    ("c2", Kind.COMMITTED, "c1"),
    ("a1", Kind.ACTIVE, "c2"),
    ("a2", Kind.ACTIVE, ""),
    ("v1", Kind.VIEW, "c2"),
    ("v2", Kind.VIEW, ""),
)

# Keys that must work as plain strings and never become paths.
ODD_KEYS: dict[str, str] = {
    "slashes": "a/b/c",
    "absolute": "/var/lib/lamina/snapshots/1",
    "spaces": "  key with  spaces ",
    "dotdot": "..",
    "dot": ".",
    "escape": "../../../../escape-attempt",
    "unicode": "ключ-鍵-🔑-é",
    "newline": "line\nbreak\ttab",
    "quotes": 'it\'s "quoted", ok',
    "4KiB": "k" * 4096,
}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def chain_limit(factory: Factory) -> int | None:
    """Return the depth of committed parents a snapshot may have, None for no limit.

    A factory states it in a `max_lower_layers` attribute; without one the
    overlayfs limit applies.
    """
    limit: int | None = getattr(factory, "max_lower_layers", MAX_LOWER_LAYERS)
    return limit


def usage_excludes_parents(factory: Factory) -> bool:
    """Return whether a child's usage leaves out the data it shares with its parent.

    A driver that copies the parent's tree into each snapshot (containerd's
    native driver does) counts the copy; its factory sets the attribute
    `usage_excludes_parents` to False.
    """
    return bool(getattr(factory, "usage_excludes_parents", True))


# ---------------------------------------------------------------------------
# The suite


class SnapshotterConformance:
    """Tests every implementation of the Snapshotter protocol must pass."""

    @pytest.fixture
    def snapshotter(self, snapshotter_factory: Factory, tmp_path: Path) -> Iterator[Snapshotter]:
        root = tmp_path / "root"
        root.mkdir()
        sn = snapshotter_factory(root)
        try:
            yield sn
        finally:
            sn.close()

    @pytest.fixture
    def work(self, tmp_path: Path) -> Path:
        path = tmp_path / "work"
        path.mkdir()
        return path

    # -- lifecycle ----------------------------------------------------------

    def test_basic_lifecycle(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        initial = changes(
            create_file("/foo", b"foo\n", 0o777),
            create_dir("/a"),
            create_dir("/a/b"),
            create_dir("/a/b/c"),
        )
        diff = changes(
            create_file("/bar", b"bar\n", 0o777),
            create_file("/foo", b"bar\n", 0o777),
            remove_all("/a/b"),
        )
        expected = work / "expected"
        expected.mkdir()

        # Keys that look like paths, as containerd's suite uses them.
        preparing = str(work / "preparing")
        mounts = sn.prepare(preparing, "", labels=GC_LABELS)
        assert len(mounts) >= 1
        with mounted(mounts, work / "m-preparing") as target:
            initial(target)
        committed = str(work / "committed")
        sn.commit(committed, preparing, labels=GC_LABELS)
        initial(expected)

        first = sn.stat(committed)
        assert first.name == committed
        assert first.parent == ""
        assert first.kind == Kind.COMMITTED
        with pytest.raises(NotFoundError):
            sn.stat(preparing)

        following = str(work / "nextlayer")
        mounts = sn.prepare(following, committed, labels=GC_LABELS)
        with mounted(mounts, work / "m-next") as target:
            assert_same_tree(expected, target)
            diff(target)
        diff(expected)
        active = sn.stat(following)
        assert active.parent == committed
        assert active.kind == Kind.ACTIVE

        second_name = str(work / "committed-next")
        sn.commit(second_name, following, labels=GC_LABELS)
        second = sn.stat(second_name)
        assert second.parent == committed
        assert second.kind == Kind.COMMITTED
        with pytest.raises(NotFoundError):
            sn.stat(following)

        walked: dict[str, Info] = {}
        sn.walk(lambda info: walked.__setitem__(info.name, info))
        assert walked[committed] == first
        assert walked[second_name] == second

        view = str(work / "nextnextlayer")
        mounts = sn.view(view, second_name, labels=GC_LABELS)
        with mounted(mounts, work / "m-view") as target:
            assert_same_tree(expected, target)

        sn.remove(view)
        with pytest.raises(FailedPreconditionError):
            sn.remove(committed)
        sn.remove(second_name)
        sn.remove(committed)
        assert walk_names(sn) == set()

    def test_stat_active(self, snapshotter: Snapshotter, work: Path) -> None:
        mounts = snapshotter.prepare("preparing", "", labels=GC_LABELS)
        assert len(mounts) >= 1
        with mounted(mounts, work / "m") as target:
            (target / "foo").write_bytes(b"foo\n")
            info = snapshotter.stat("preparing")
        assert info.name == "preparing"
        assert info.kind == Kind.ACTIVE
        assert info.parent == ""

    def test_stat_committed(self, snapshotter: Snapshotter, work: Path) -> None:
        mounts = snapshotter.prepare("preparing", "", labels=GC_LABELS)
        with mounted(mounts, work / "m") as target:
            (target / "foo").write_bytes(b"foo\n")
        snapshotter.commit("committed", "preparing", labels=GC_LABELS)
        info = snapshotter.stat("committed")
        assert info.name == "committed"
        assert info.kind == Kind.COMMITTED
        assert info.parent == ""

    def test_stat_missing(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(NotFoundError):
            snapshotter.stat("never-created")

    def test_transitivity(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        snap_a = write_layer(sn, work, "", create_file("/foo", b"foo\n"), name="snapA")
        snap_b = write_layer(sn, work, snap_a, create_file("/foo", b"foo bar\n"), name="snapB")
        info_a = sn.stat(snap_a)
        info_b = sn.stat(snap_b)
        parent_of_b = sn.stat(info_b.parent)
        assert info_a.parent == ""
        assert info_b.parent == snap_a
        assert parent_of_b.parent == ""

    def test_prepare_and_view_reuse_key(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("preparing", "", labels=GC_LABELS)
        sn.commit("snapA", "preparing", labels=GC_LABELS)

        sn.prepare("newlayer", "snapA", labels=GC_LABELS)
        with pytest.raises(AlreadyExistsError):
            sn.view("newlayer", "snapA", labels=GC_LABELS)

        sn.prepare("prepLayer", "snapA", labels=GC_LABELS)
        with pytest.raises(AlreadyExistsError):
            sn.prepare("prepLayer", "snapA", labels=GC_LABELS)

        sn.view("viewLayer", "snapA", labels=GC_LABELS)
        with pytest.raises(AlreadyExistsError):
            sn.view("viewLayer", "snapA", labels=GC_LABELS)
        with pytest.raises(AlreadyExistsError):
            sn.prepare("viewLayer", "", labels=GC_LABELS)

        # Committed names share the key space with active and view keys.
        with pytest.raises(AlreadyExistsError):
            sn.prepare("snapA", "", labels=GC_LABELS)
        with pytest.raises(AlreadyExistsError):
            sn.commit("viewLayer", "prepLayer")
        with pytest.raises(AlreadyExistsError):
            sn.commit("snapA", "prepLayer")
        # A failed commit leaves the active snapshot as it was.
        assert sn.stat("prepLayer").kind == Kind.ACTIVE
        assert sn.stat("viewLayer").kind == Kind.VIEW
        assert sn.stat("newlayer").kind == Kind.ACTIVE

    def test_parent_must_exist_and_be_committed(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("active", "", labels=GC_LABELS)
        sn.view("view", "", labels=GC_LABELS)

        with pytest.raises(NotFoundError):
            sn.prepare("child", "missing-parent")
        with pytest.raises(NotFoundError):
            sn.view("child", "missing-parent")
        for parent in ("active", "view"):
            with pytest.raises((FailedPreconditionError, InvalidArgumentError)):
                sn.prepare("child", parent)
            with pytest.raises((FailedPreconditionError, InvalidArgumentError)):
                sn.view("child", parent)
        with pytest.raises(NotFoundError):
            sn.stat("child")

    def test_commit_requires_active(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.view("view", "", labels=GC_LABELS)
        sn.prepare("active", "", labels=GC_LABELS)
        sn.commit("committed", "active")

        with pytest.raises(FailedPreconditionError):
            sn.commit("from-view", "view")
        with pytest.raises(FailedPreconditionError):
            sn.commit("from-committed", "committed")
        with pytest.raises(NotFoundError):
            sn.commit("from-missing", "missing")
        assert walk_names(sn) == {"view", "committed"}

    def test_mounts_of_each_kind(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        prepared = sn.prepare("active", "", labels=GC_LABELS)
        assert sn.mounts("active") == prepared
        viewed = sn.view("view", "", labels=GC_LABELS)
        assert sn.mounts("view") == viewed
        sn.commit("committed", "active")
        with pytest.raises(FailedPreconditionError):
            sn.mounts("committed")
        with pytest.raises(NotFoundError):
            sn.mounts("missing")

    def test_empty_key_invalid(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        with pytest.raises(InvalidArgumentError):
            sn.prepare("")
        with pytest.raises(InvalidArgumentError):
            sn.view("")
        sn.prepare("active")
        with pytest.raises(InvalidArgumentError):
            sn.commit("", "active")
        assert walk_names(sn) == {"active"}

    # -- update -------------------------------------------------------------

    def test_update(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        before = now()
        build_named_snapshots(sn)
        after = now()

        for name, kind, parent in NAMED_SNAPSHOTS:
            info = sn.stat(name)
            created = as_utc(info.created)
            assert before - TIME_SLACK <= created <= after + TIME_SLACK, name
            assert info.updated == info.created, name
            assert info.kind == kind, name
            assert info.parent == parent, name
            assert info.name == name, name

            expected = {"l1": "v1", "l2": "v2", "l3": "v3", **GC_LABELS}
            change = Info(
                name=name,
                kind=Kind.VIEW if kind != Kind.VIEW else Kind.ACTIVE,
                parent="doesnotexist",
                labels=expected,
                created=datetime(2001, 1, 1, tzinfo=UTC),
            )
            call_start = now()
            updated = sn.update(change)
            call_end = now()
            assert updated.created == info.created, name
            assert call_start - TIME_SLACK <= as_utc(updated.updated) <= call_end + TIME_SLACK, name
            assert updated.kind == kind, name
            assert updated.parent == parent, name
            assert updated.name == name, name
            assert dict(updated.labels) == expected, name
            assert sn.stat(name) == updated, name

            change = Info(name=name, kind=kind, labels={"l1": "updated", "l4": "v4"})
            updated = sn.update(change, "labels.l1", "labels.l2")
            assert dict(updated.labels) == {"l1": "updated", "l3": "v3", **GC_LABELS}, name

            replacement = {"l4": "v4", **GC_LABELS}
            updated = sn.update(Info(name=name, kind=kind, labels=replacement), "labels")
            assert dict(updated.labels) == replacement, name
            assert dict(sn.stat(name).labels) == replacement, name

            for path in ("parent", "name", "kind", "created", "updated", "label.l4", "labelsx"):
                with pytest.raises(InvalidArgumentError):
                    sn.update(Info(name=name, kind=kind, parent="doesnotexist"), path)
            assert sn.stat(name).parent == parent, name
            assert dict(sn.stat(name).labels) == replacement, name

    def test_update_missing(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(NotFoundError):
            snapshotter.update(Info(name="missing", kind=Kind.ACTIVE, labels={"a": "b"}))

    def test_update_time_moves(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("active", "", labels={"a": "1"})
        first = sn.stat("active")
        time.sleep(0.01)
        second = sn.update(Info(name="active", kind=Kind.ACTIVE, labels={"a": "2"}))
        time.sleep(0.01)
        third = sn.update(Info(name="active", kind=Kind.ACTIVE, labels={"a": "3"}), "labels.a")
        assert as_utc(first.updated) < as_utc(second.updated) < as_utc(third.updated)
        assert third.created == first.created
        assert sn.stat("active") == third

    def test_update_empty_value_deletes(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("active", "", labels={"keep": "1", "drop": "2"})
        updated = sn.update(
            Info(name="active", kind=Kind.ACTIVE, labels={"drop": ""}), "labels.drop"
        )
        assert dict(updated.labels) == {"keep": "1"}
        updated = sn.update(Info(name="active", kind=Kind.ACTIVE, labels={}), "labels.absent")
        assert dict(updated.labels) == {"keep": "1"}
        updated = sn.update(
            Info(name="active", kind=Kind.ACTIVE, labels={"keep": "", "new": "3"}), "labels"
        )
        assert dict(updated.labels) == {"new": "3"}
        updated = sn.update(
            Info(name="active", kind=Kind.ACTIVE, labels={"x.y/z": "4"}), "labels.x.y/z"
        )
        assert dict(updated.labels) == {"new": "3", "x.y/z": "4"}
        assert dict(sn.stat("active").labels) == {"new": "3", "x.y/z": "4"}

    # -- labels -------------------------------------------------------------

    def test_labels_kept_on_create(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        labels = {
            "containerd.io/snapshot/remote": "yes",
            "containerd.io/snapshot.ref": "sha256:0",
            "plain": "value",
        }
        sn.prepare("active", "", labels=labels)
        assert dict(sn.stat("active").labels) == labels
        sn.view("view", "", labels=labels)
        assert dict(sn.stat("view").labels) == labels
        sn.commit("committed", "active", labels={"containerd.io/snapshot/layer": "l1"})
        assert dict(sn.stat("committed").labels) == {"containerd.io/snapshot/layer": "l1"}

    def test_label_size_limit(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        fits = {"k" * 96: "v" * 4000}
        too_big = {"k" * 96: "v" * 4001}
        too_big_unicode = {"ключ": "é" * 2045}  # 8 + 4090 bytes in UTF-8

        sn.prepare("fits", "", labels=fits)
        assert dict(sn.stat("fits").labels) == fits
        for labels in (too_big, too_big_unicode):
            with pytest.raises(InvalidArgumentError):
                sn.prepare("too-big", "", labels=labels)
            with pytest.raises(InvalidArgumentError):
                sn.view("too-big", "", labels=labels)
            with pytest.raises(InvalidArgumentError):
                sn.commit("too-big", "fits", labels=labels)
            with pytest.raises(InvalidArgumentError):
                sn.update(Info(name="fits", kind=Kind.ACTIVE, labels=labels))
        with pytest.raises(NotFoundError):
            sn.stat("too-big")
        assert sn.stat("fits").kind == Kind.ACTIVE
        assert dict(sn.stat("fits").labels) == fits
        sn.commit("committed", "fits", labels=fits)
        assert dict(sn.stat("committed").labels) == fits

    # -- remove -------------------------------------------------------------

    def test_remove_and_reuse(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("committed-a", "", labels=GC_LABELS)
        sn.commit("committed-1", "committed-a", labels=GC_LABELS)
        sn.prepare("reuse-1", "committed-1", labels=GC_LABELS)
        sn.remove("reuse-1")
        sn.view("reuse-1", "committed-1", labels=GC_LABELS)
        sn.remove("reuse-1")
        sn.prepare("reuse-1", "", labels=GC_LABELS)
        sn.remove("committed-1")
        sn.commit("committed-1", "reuse-1", labels=GC_LABELS)
        assert walk_names(sn) == {"committed-1"}

    def test_remove_missing(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(NotFoundError):
            snapshotter.remove("missing")

    def test_remove_intermediate(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        base = write_layer(sn, work, "", create_file("/base", b"base"), name="committed-base")
        sn.prepare("intermediate", base, labels=GC_LABELS)
        sn.commit("committed-inter", "intermediate", labels=GC_LABELS)
        sn.prepare("toplayer", "committed-inter", labels=GC_LABELS)

        with pytest.raises(FailedPreconditionError):
            sn.remove("committed-inter")
        with pytest.raises(FailedPreconditionError):
            sn.remove(base)
        assert walk_names(sn) == {base, "committed-inter", "toplayer"}

        sn.remove("toplayer")
        sn.remove("committed-inter")
        sn.remove(base)
        assert walk_names(sn) == set()

    def test_remove_parent_of_view(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("a", "")
        sn.commit("c", "a")
        sn.view("v", "c")
        with pytest.raises(FailedPreconditionError):
            sn.remove("c")
        sn.remove("v")
        sn.remove("c")

    # -- walk ---------------------------------------------------------------

    def test_walk_filters(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        root = {"containerd.io/gc.root": "check-walk"}
        sn.prepare("a-np", "", labels=root)
        sn.prepare("p-tmp", "", labels=root)
        sn.commit("p", "p-tmp", labels=root)
        sn.prepare("a", "p", labels=root)
        sn.view("v", "p", labels=root)
        sn.prepare("p-wl-tmp", "", labels=root)
        sn.commit("p-wl", "p-wl-tmp", labels={"l": "1", **root})
        sn.prepare("a-wl", "p-wl", labels={"l": "2", **root})
        sn.view("v-wl", "p-wl", labels={"l": "3", **root})
        sn.prepare("a-np-wl", "", labels={"l": "2", **root})
        everything = {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"}

        cases: list[tuple[tuple[str, ...], set[str]]] = [
            ((), everything),
            (('labels."containerd.io/gc.root"==check-walk',), everything),
            (
                ('kind==active,labels."containerd.io/gc.root"==check-walk',),
                {"a-np", "a", "a-wl", "a-np-wl"},
            ),
            (('kind==view,labels."containerd.io/gc.root"==check-walk',), {"v", "v-wl"}),
            (('kind==committed,labels."containerd.io/gc.root"==check-walk',), {"p", "p-wl"}),
            (("name==p", "name==a-np-wl"), {"p", "a-np-wl"}),
            (("name==a-wl,labels.l",), {"a-wl"}),
            (("parent==p",), {"a", "v"}),
            (
                ('parent!="",labels."containerd.io/gc.root"==check-walk',),
                {"a", "v", "a-wl", "v-wl"},
            ),
            (("labels.l",), {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
            (("labels.l==2",), {"a-wl", "a-np-wl"}),
            (("labels.l!=2",), everything - {"a-wl", "a-np-wl"}),
            (("name~=^a-",), {"a-np", "a-wl", "a-np-wl"}),
            (("name~=wl$,kind!=active",), {"p-wl", "v-wl"}),
            (('name~="^(p|v)$"',), {"p", "v"}),
            (("labels.l~=[13]",), {"p-wl", "v-wl"}),
            (("kind==view", "kind==committed"), {"v", "v-wl", "p", "p-wl"}),
            (("name==nothing",), set()),
            (("labels.missing",), set()),
        ]
        for filters, expected in cases:
            assert walk_names(sn, *filters) == expected, filters
            assert {info.name for info in sn.list(*filters)} == expected, filters

    def test_walk_malformed_filter(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("a", "")
        for bad in ("name==", "name==a,", "labels.", "==a", 'labels."open==a', "name~=("):
            with pytest.raises(InvalidArgumentError):
                sn.walk(lambda info: None, bad)
            with pytest.raises(InvalidArgumentError):
                list(sn.list(bad))
        with pytest.raises(InvalidArgumentError):
            sn.walk(lambda info: None, "name==a", "name==")

    def test_walk_returns_full_info(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        build_named_snapshots(sn)
        walked: dict[str, Info] = {}
        sn.walk(lambda info: walked.__setitem__(info.name, info))
        assert set(walked) == {name for name, _, _ in NAMED_SNAPSHOTS}
        for name, kind, parent in NAMED_SNAPSHOTS:
            assert walked[name].kind == kind
            assert walked[name].parent == parent
            assert dict(walked[name].labels) == dict(GC_LABELS)
            assert walked[name] == sn.stat(name)

    def test_stat_in_walk(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        prefix = "stats-in-walk-"
        build_named_snapshots(sn, prefix)
        checked: list[str] = []

        def check(info: Info) -> None:
            if info.name.startswith(prefix):
                assert sn.stat(info.name) == info
                checked.append(info.name)

        sn.walk(check)
        assert len(checked) == len(NAMED_SNAPSHOTS)

    def test_list_many(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        keys = {f"many-{i:04d}" for i in range(1200)}
        for key in keys:
            sn.view(key, "", labels={"even": str(int(key[-1]) % 2 == 0)})
        assert {info.name for info in sn.list()} == keys
        assert len(walk_names(sn, "labels.even==True")) == 600

    # -- file system semantics across layers -------------------------------

    def test_layer_file_update(self, snapshotter: Snapshotter, work: Path) -> None:
        first = changes(
            create_dir("/etc", 0o700),
            create_file("/etc/hosts", b"mydomain 10.0.0.1"),
            create_file("/etc/profile", b"PATH=/usr/bin"),
        )
        second = changes(
            create_file("/etc/hosts", b"mydomain 10.0.0.2"),
            create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
            create_dir("/root", 0o700),
            create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin"),
        )
        # containerd repeats this across second boundaries to catch changes
        # a driver might miss when sizes and times to the second are equal.
        for _ in range(3):
            check_layers(snapshotter, work, first, second)
            time.sleep(1.0 - time.time() % 1.0)

    def test_remove_directory_in_lower_layer(self, snapshotter: Snapshotter, work: Path) -> None:
        check_layers(
            snapshotter,
            work,
            changes(create_dir("/lib", 0o700), create_file("/lib/hidden", b"")),
            changes(
                remove_all("/lib"),
                create_dir("/lib", 0o700),
                create_file("/lib/not-hidden", b""),
            ),
            create_file("/lib/newfile", b""),
        )

    def test_chown(self, snapshotter: Snapshotter, work: Path) -> None:
        check_layers(
            snapshotter,
            work,
            changes(
                create_dir("/opt", 0o700),
                create_dir("/opt/a", 0o700),
                create_dir("/opt/a/b", 0o700),
                create_file("/opt/a/b/file.txt", b"hello"),
            ),
            changes(
                chown("/opt", 1, 1),
                chown("/opt/a", 1, 1),
                chown("/opt/a/b", 1, 1),
                chown("/opt/a/b/file.txt", 1, 1),
            ),
        )

    def test_directory_permission_on_commit(self, snapshotter: Snapshotter, work: Path) -> None:
        check_layers(
            snapshotter,
            work,
            changes(
                create_dir("/dir1", 0o700),
                create_dir("/dir2", 0o700),
                create_dir("/dir3", 0o700),
                create_dir("/dir4", 0o700),
                create_file("/dir4/f1", b"..."),
                create_dir("/dir5", 0o700),
                create_file("/dir5/f1", b"..."),
                chown("/dir1", 1, 1),
                chown("/dir2", 1, 1),
                chown("/dir3", 1, 1),
                chown("/dir5", 1, 1),
                chown("/dir5/f1", 1, 1),
            ),
            changes(
                chown("/dir2", 0, 0),
                remove_all("/dir3"),
                chown("/dir4", 1, 1),
                chown("/dir4/f1", 1, 1),
            ),
            changes(
                create_dir("/dir3", 0o700),
                chown("/dir3", 1, 1),
                remove_all("/dir5"),
                create_dir("/dir5", 0o700),
                chown("/dir5", 1, 1),
            ),
        )

    def test_deleted_files_in_child(self, snapshotter: Snapshotter, work: Path) -> None:
        check_layers(
            snapshotter,
            work,
            changes(
                create_file("/foo", b"foo\n", 0o777),
                create_file("/foobar", b"foobar\n", 0o777),
            ),
            remove_all("/foobar"),
            changes(),
        )

    def test_move_file_from_lower_layer(self, snapshotter: Snapshotter, work: Path) -> None:
        check_layers(
            snapshotter,
            work,
            changes(
                create_dir("/dir1", 0o700),
                create_file("/dir1/f1", b"Hello"),
                create_dir("/dir2", 0o700),
                create_file("/dir2/f2", b"..."),
            ),
            changes(
                create_dir("/dir3", 0o700),
                create_file("/dir3/f1", b"Hello"),
                remove_all("/dir1"),
                hard_link("/dir2/f2", "/dir3/f2"),
                remove_all("/dir2/f2"),
            ),
        )

    def test_rename_across_layers(self, snapshotter: Snapshotter, work: Path) -> None:
        # containerd's suite skips this case for overlay on some kernels.
        # Here a directory rename falls back to copy and delete, as mv(1)
        # does, and the merged tree must still match.
        check_layers(
            snapshotter,
            work,
            changes(
                create_dir("/dir1", 0o700),
                create_file("/dir1/inside", b"moved along"),
                create_dir("/somefiles", 0o700),
                create_file("/somefiles/f1", b"was here first!"),
                create_file("/somefiles/f2", b"nothing interesting"),
            ),
            changes(
                rename("/dir1", "/dir2"),
                create_file("/somefiles/f1-overwrite", b"new content 1"),
                rename("/somefiles/f1-overwrite", "/somefiles/f1"),
                rename("/somefiles/f2", "/somefiles/f3"),
            ),
        )

    def test_special_files_across_layers(self, snapshotter: Snapshotter, work: Path) -> None:
        def make_fifo(root: Path) -> None:
            os.mkfifo(root / "fifo", 0o640)

        def make_device(root: Path) -> None:
            os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))

        def set_xattr(root: Path) -> None:
            os.setxattr(root / "file", "user.note", b"kept")

        check_layers(
            snapshotter,
            work,
            changes(
                create_file("/file", b"data", 0o4755),
                set_xattr,
                create_symlink("file", "/link"),
                create_symlink("/absolute/nowhere", "/dangling"),
                make_fifo,
                make_device,
            ),
            changes(remove_all("/link"), create_symlink("fifo", "/link"), chown("/null", 3, 4)),
        )

    def test_view_readonly(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        sn.prepare("preparing", "", labels=GC_LABELS)
        sn.commit("committed", "preparing", labels=GC_LABELS)
        mounts = sn.view("view", "committed", labels=GC_LABELS)
        with mounted(mounts, work / "view-mount") as target, pytest.raises(OSError):
            (target / "testfile").write_bytes(b"testcontent")
        sn.remove("view")
        sn.remove("committed")

    def test_view_of_stack_readonly(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        lower = write_layer(sn, work, "", create_file("/a", b"a"))
        upper = write_layer(sn, work, lower, create_file("/b", b"b"))
        for parent in ("", lower, upper):
            key = unique("view")
            mounts = sn.view(key, parent)
            with mounted(mounts, work / unique("m")) as target:
                with pytest.raises(OSError):
                    (target / "new").write_bytes(b"x")
                if parent:
                    with pytest.raises(OSError):
                        (target / "a").write_bytes(b"changed")
            sn.remove(key)

    def test_close_twice(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        sn.prepare("close-prepare", "", labels=GC_LABELS)
        sn.commit("close", "close-prepare", labels=GC_LABELS)
        sn.remove("close")
        sn.close()
        sn.close()

    @pytest.mark.parametrize(
        "mask", [0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"]
    )
    def test_root_permission(self, snapshotter: Snapshotter, work: Path, mask: int) -> None:
        with umask(mask):
            mounts = snapshotter.prepare("preparing", "", labels=GC_LABELS)
        with mounted(mounts, work / "preparing") as target:
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o755

    def test_layers_128_mount(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        layers = [
            changes(
                create_file("/bottom", b"way at the bottom\n", 0o777),
                create_file("/overwriteme", b"FIRST!\n", 0o777),
                create_dir("/ADDHERE"),
                create_dir("/ONLYME"),
                create_file("/ONLYME/bottom", b"bye!\n", 0o777),
            )
        ]
        for i in range(1, 128):
            layers.append(
                changes(
                    create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                    create_file(f"/ADDHERE/file-{i}", b"same\n", 0o755),
                    remove_all("/ONLYME"),
                    create_dir("/ONLYME"),
                    create_file(f"/ONLYME/file-{i}", b"only me!\n", 0o777),
                )
            )

        flat = work / "flat"
        flat.mkdir()
        parent = ""
        for i, layer in enumerate(layers):
            key = f"prepare-layer-{i}"
            mounts = sn.prepare(key, parent, labels=GC_LABELS)
            with mounted(mounts, work / key) as target:
                assert_same_tree(flat, target)
                layer(flat)
                layer(target)
                assert_same_tree(flat, target)
            parent = f"committed-{i}"
            sn.commit(parent, key, labels=GC_LABELS)

        mounts = sn.view("fullview", parent, labels=GC_LABELS)
        with mounted(mounts, work / "fullview") as target:
            assert_same_tree(flat, target)

    def test_layers_500_deep(
        self, snapshotter: Snapshotter, snapshotter_factory: Factory, work: Path
    ) -> None:
        sn = snapshotter
        limit = chain_limit(snapshotter_factory)
        depth_to_build = MAX_LOWER_LAYERS if limit is None else limit
        flat = work / "flat"
        flat.mkdir()
        parent = ""
        # Writing through a mount on every layer would take minutes; every
        # 50th layer adds a file and the others are empty but still stacked.
        for depth in range(1, depth_to_build + 1):
            name = f"layer-{depth}"
            if depth % 50 == 1 or depth == depth_to_build:
                layer = create_file(f"/from-{depth}", str(depth).encode())
                write_layer(sn, work, parent, layer, name=name)
                layer(flat)
            else:
                sn.prepare(name + "-active", parent)
                sn.commit(name, name + "-active")
            parent = name

        # A view and an active snapshot on the deepest allowed chain mount.
        mounts = sn.view("deep-view", parent)
        with mounted(mounts, work / "deep-view") as target:
            assert_same_tree(flat, target)
        mounts = sn.prepare("deep-active", parent)
        with mounted(mounts, work / "deep-active") as target:
            assert_same_tree(flat, target)
            (target / "top").write_bytes(b"top")
        (flat / "top").write_bytes(b"top")
        sn.commit("deeper", "deep-active")

        if limit is not None:
            # One more committed layer would exceed the limit: rejected at
            # once, not later when the mount fails.
            for create in (sn.prepare, sn.view):
                with pytest.raises((FailedPreconditionError, InvalidArgumentError)):
                    create("beyond-limit", "deeper")
                with pytest.raises(NotFoundError):
                    sn.stat("beyond-limit")
        else:
            mounts = sn.view("beyond-limit", "deeper")
            with mounted(mounts, work / "beyond-limit") as target:
                assert_same_tree(flat, target)

    # -- keys ---------------------------------------------------------------

    @pytest.mark.parametrize("key", list(ODD_KEYS.values()), ids=list(ODD_KEYS))
    def test_odd_key(self, snapshotter: Snapshotter, work: Path, tmp_path: Path, key: str) -> None:
        sn = snapshotter
        outside_before = sorted(p.name for p in tmp_path.iterdir())

        mounts = sn.prepare(key, "", labels={"role": "odd"})
        with mounted(mounts, work / "m") as target:
            (target / "file").write_bytes(b"written")
        assert sn.stat(key).name == key
        assert sn.stat(key).kind == Kind.ACTIVE
        assert walk_names(sn, f"name=={quote(key)}") == {key}

        committed = key + "/committed"
        sn.commit(committed, key)
        with pytest.raises(NotFoundError):
            sn.stat(key)
        info = sn.stat(committed)
        assert info.name == committed
        assert info.kind == Kind.COMMITTED

        # The key is free again and may name a view of the committed snapshot.
        mounts = sn.view(key, committed)
        with mounted(mounts, work / "v") as target:
            assert (target / "file").read_bytes() == b"written"
        assert sn.stat(key).parent == committed
        assert walk_names(sn, f"parent=={quote(committed)}") == {key}
        assert walk_names(sn, "labels.role==odd") == set()

        sn.remove(key)
        sn.remove(committed)
        assert walk_names(sn) == set()
        assert sorted(p.name for p in tmp_path.iterdir()) == outside_before

    def test_long_key_limit(self, snapshotter: Snapshotter) -> None:
        sn = snapshotter
        with pytest.raises(InvalidArgumentError):
            sn.prepare("x" * (1024 * 1024))
        with pytest.raises(InvalidArgumentError):
            sn.prepare("nul\x00inside")
        assert walk_names(sn) == set()

    # -- usage --------------------------------------------------------------

    def test_usage_counts_own_bytes_and_inodes(
        self, snapshotter: Snapshotter, snapshotter_factory: Factory, work: Path
    ) -> None:
        sn = snapshotter
        mib = 1024 * 1024
        mounts = sn.prepare("active", "")
        empty = sn.usage("active")
        with mounted(mounts, work / "m") as target:
            (target / "dir").mkdir()
            (target / "dir" / "big").write_bytes(os.urandom(mib))
            os.link(target / "dir" / "big", target / "dir" / "link1")
            os.link(target / "dir" / "big", target / "link2")
        written = sn.usage("active")
        # One directory and one file: the two extra links share the inode.
        assert written.inodes - empty.inodes == 2
        assert mib <= written.size - empty.size <= mib + 64 * 1024

        sn.commit("base", "active")
        assert sn.usage("base") == written

        mounts = sn.prepare("child", "base")
        child_empty = sn.usage("child")
        with mounted(mounts, work / "c") as target:
            (target / "small").write_bytes(b"x" * 10)
        child = sn.usage("child")
        assert child.inodes - child_empty.inodes == 1
        if usage_excludes_parents(snapshotter_factory):
            # The parent's megabyte is not the child's.
            assert child.size < mib // 2
        else:
            assert child.size >= mib

    def test_usage_missing(self, snapshotter: Snapshotter) -> None:
        with pytest.raises(NotFoundError):
            snapshotter.usage("missing")

    def test_cleanup_after_normal_use(self, snapshotter: Snapshotter, work: Path) -> None:
        sn = snapshotter
        base = write_layer(sn, work, "", create_file("/a", b"a"))
        sn.prepare("active", base)
        sn.view("view", base)
        with pytest.raises(AlreadyExistsError):
            sn.prepare("active", base)
        sn.remove("view")
        assert sn.cleanup() == []
        assert walk_names(sn) == {base, "active"}
