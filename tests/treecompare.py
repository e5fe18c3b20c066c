"""Record a file tree and compare two records, failing on any unexpected path.

`snapshot_tree(path)` returns one `EntryRecord` per path below PATH, the
root itself only on request. A record contains the type, permission bits,
owner, size and sha256 of regular files, link target, device numbers,
xattrs and the hard-link group (the other names of the same inode). Modification
times are recorded and compared only on request, because implicit parent
directories and directories that receive new children legitimately get
new times.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

# overlayfs keeps its own state in these namespaces; they are not content.
IGNORED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


@dataclass(frozen=True)
class EntryRecord:
    """What a tree comparison looks at for one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    device: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    links: tuple[str, ...] = ()
    mtime_ns: int = 0

    def describe(self) -> str:
        """Return a one-line summary for failure messages."""
        parts = [self.kind, oct(self.mode), f"{self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.target is not None:
            parts.append(f"-> {self.target!r}")
        if self.device is not None:
            parts.append(f"dev={self.device[0]},{self.device[1]}")
        if self.links:
            parts.append(f"links={list(self.links)}")
        return " ".join(parts)


_KINDS = (
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "unknown"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    return tuple(
        (name, os.getxattr(path, name, follow_symlinks=False))
        for name in sorted(names)
        if not name.startswith(IGNORED_XATTR_PREFIXES)
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_tree(
    path: str | os.PathLike[str], *, include_root: bool = False
) -> dict[str, EntryRecord]:
    """Return an EntryRecord for every path below PATH, keyed by its relative path."""
    root = os.fspath(path)
    found: dict[str, tuple[os.stat_result, str]] = {}
    if include_root:
        found["."] = (os.lstat(root), root)
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(current, name)
            rel = os.path.relpath(full, root)
            found[rel] = (os.lstat(full), full)

    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for rel, (st, _) in found.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups[(st.st_dev, st.st_ino)].append(rel)

    records: dict[str, EntryRecord] = {}
    for rel, (st, full) in sorted(found.items()):
        kind = _kind(st.st_mode)
        group = groups.get((st.st_dev, st.st_ino), []) if kind != "dir" else []
        records[rel] = EntryRecord(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else None,
            sha256=_sha256(full) if kind == "file" else None,
            target=os.readlink(full) if kind == "symlink" else None,
            device=(os.major(st.st_rdev), os.minor(st.st_rdev))
            if kind in ("char", "block")
            else None,
            xattrs=_xattrs(full),
            links=tuple(sorted(p for p in group if p != rel)),
            mtime_ns=st.st_mtime_ns,
        )
    return records


def diff_trees(
    expected: dict[str, EntryRecord],
    actual: dict[str, EntryRecord],
    *,
    mtimes: str = "none",
    ignore: Iterable[str] = (),
) -> list[str]:
    """Return one line per difference; MTIMES is "none", "non-dirs" or "all"."""
    skip = set(ignore)
    lines: list[str] = []
    for rel in sorted(set(expected) | set(actual)):
        if rel in skip:
            continue
        want = expected.get(rel)
        got = actual.get(rel)
        if want is None:
            assert got is not None
            lines.append(f"unexpected {rel}: {got.describe()}")
            continue
        if got is None:
            lines.append(f"missing    {rel}: {want.describe()}")
            continue
        for field in fields(EntryRecord):
            skip_mtime = mtimes == "none" or (mtimes == "non-dirs" and want.kind == "dir")
            if field.name == "mtime_ns" and skip_mtime:
                continue
            a = getattr(want, field.name)
            b = getattr(got, field.name)
            if a != b:
                shown_a = oct(a) if field.name == "mode" else a
                shown_b = oct(b) if field.name == "mode" else b
                lines.append(
                    f"differs    {rel}: {field.name} expected {shown_a!r}, got {shown_b!r}"
                )
    return lines


def assert_trees_equal(
    expected: dict[str, EntryRecord] | str | Path,
    actual: dict[str, EntryRecord] | str | Path,
    *,
    mtimes: str = "none",
    ignore: Iterable[str] = (),
    limit: int = 60,
) -> None:
    """Fail with a readable list of differences unless both trees are the same.

    Either side may be a record from `snapshot_tree` or a path to record.
    """
    if not isinstance(expected, dict):
        expected = snapshot_tree(expected)
    if not isinstance(actual, dict):
        actual = snapshot_tree(actual)
    lines = diff_trees(expected, actual, mtimes=mtimes, ignore=ignore)
    if lines:
        shown = "\n  ".join(lines[:limit])
        more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
        raise AssertionError(f"trees differ in {len(lines)} places:\n  {shown}{more}")
