"""Confined path resolution and changes inside the target tree of a layer apply.

Every path of an entry is resolved one component at a time from a
descriptor of the target root, with O_NOFOLLOW and dir_fd. A component
that is a symbolic link is read, and its target is resolved again from the
root (absolute target) or from the directory containing it (relative
target). `..` never climbs above the root. This is the confinement
containerd applies (continuity's fs.RootPath), so a hostile name or link
can redirect an entry to another place inside the target, never outside
it. Only the final component of an entry is created, always with dir_fd
and never followed.

`Tree` is the generic target, any directory such as a mounted merged view.
`lamina.archive.overlay.UpperTree` adds the overlay view of lower layers.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Sequence

from lamina.archive.errors import LayerError, LayerNoSpaceError, LayerWriteError

logger = logging.getLogger(__name__)

# Linux's limit on symbolic links followed in one lookup (MAXSYMLINKS, path_resolution(7)).
MAX_SYMLINKS = 40
# Directory descriptors kept open between entries; most layers touch a few
# hundred directories, and a descriptor costs one kernel file object.
MAX_CACHED_DIRS = 512

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Key = tuple[str, ...]


def split_name(name: str) -> list[str]:
    """Split a tar member name into components, resolving `.` and `..` lexically.

    `..` stops at the root and a leading `/` is dropped, as Go's
    filepath.Clean followed by a join to the root does in containerd: a
    name can never point above the target.
    """
    parts = name.split("/")
    if parts[0] == "." and len(parts) > 1:
        # Most image layers spell their names "./usr/bin/...".
        del parts[0]
    if "" not in parts and "." not in parts and ".." not in parts:
        return parts
    return _clean(parts)


def _clean(components: list[str]) -> list[str]:
    parts: list[str] = []
    for part in components:
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return parts


def display(key: Sequence[str]) -> str:
    """Return KEY as a relative path for messages."""
    return "/".join(key) or "."


class Tree:
    """The generic apply target: a directory where whiteouts delete and entries overwrite."""

    def __init__(self, root: str | os.PathLike[str], *, layer: str | None) -> None:
        self.layer = layer
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._dirs: dict[Key, int] = {}
        # Whether new files in a directory belong to their creator, by key,
        # for the directories whose descriptors are cached (see `creator_owns`).
        self._creator_owns: dict[Key, bool] = {}

    def close(self) -> None:
        """Close every descriptor held."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        os.close(self.root_fd)

    # ------------------------------------------------------------ errors

    def error(self, entry: str | None, reason: str) -> LayerError:
        """Return a LayerError naming this layer and ENTRY."""
        return LayerError(reason, layer=self.layer, entry=entry)

    def write_error(
        self, entry: str | None, action: str, err: OSError
    ) -> LayerWriteError | LayerNoSpaceError:
        """Return the error for a failed system call, keeping the OSError as cause.

        A full disk is LayerNoSpaceError, so that callers can tell the user
        to free space and retry; every other failure is LayerWriteError.
        """
        error: LayerWriteError | LayerNoSpaceError
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            error = LayerNoSpaceError(
                f"{action}: no space left on device; free space and retry",
                layer=self.layer,
                entry=entry,
            )
        else:
            error = LayerWriteError(
                f"{action}: {err.strerror or err}", layer=self.layer, entry=entry
            )
        error.__cause__ = err
        return error

    # ------------------------------------------------------------ descriptor cache

    def cached(self, key: Key) -> int | None:
        """Return the open descriptor of directory KEY when one is cached."""
        return self._dirs.get(key)

    def remember(self, key: Key, fd: int) -> None:
        """Keep FD as the descriptor of directory KEY; the cache owns it from now on."""
        old = self._dirs.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self._dirs[key] = fd
        self._creator_owns.pop(key, None)

    def forget(self, key: Key) -> None:
        """Drop cached descriptors of KEY and everything below it, before KEY is removed."""
        depth = len(key)
        stale = [k for k in self._dirs if k[:depth] == key]
        for k in stale:
            os.close(self._dirs.pop(k))
        for k in [k for k in self._creator_owns if k[:depth] == key]:
            del self._creator_owns[k]

    def trim(self) -> None:
        """Close every cached descriptor when the cache outgrew MAX_CACHED_DIRS.

        NOTE: call it only between entries, while no caller keeps a
        descriptor from the cache, because a closed number is soon reused.
        """
        if len(self._dirs) > MAX_CACHED_DIRS:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()
            self._creator_owns.clear()

    # ------------------------------------------------------------ owner of new files

    def creator_owns(self, key: Key, new_fd: int, uid: int, gid: int) -> bool:
        """Tell whether files created in directory KEY get UID and GID as their owner.

        NEW_FD is a file just created there, and its owner decides for the
        whole directory. The result is kept until the directory's mode or
        owner is set again (`mode_changed`) or its descriptor leaves the
        cache. A set-group-ID directory gives new files its own group
        (open(2), "O_CREAT"), and some file systems (NFS with root
        squashing, FUSE) choose their own owners. The fstat shows either.
        """
        owned = self._creator_owns.get(key)
        if owned is None:
            st = os.fstat(new_fd)
            owned = st.st_uid == uid and st.st_gid == gid
            self._creator_owns[key] = owned
        return owned

    def mode_changed(self, key: Key) -> None:
        """Drop the `creator_owns` result of directory KEY, whose mode or owner was just set."""
        self._creator_owns.pop(key, None)

    # ------------------------------------------------------------ resolution

    def resolve_dir(
        self, parts: Sequence[str], *, create: bool, entry: str | None
    ) -> tuple[int, Key]:
        """Return a descriptor and the symlink-free key of directory PARTS inside the root.

        Missing directories are created when CREATE is true (see
        `missing_dir`), otherwise they raise LayerError. A component that is
        neither a directory nor a link raises LayerError too.
        """
        key = tuple(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            return fd, key

        names: list[str] = []
        fds: list[int] = []
        todo = list(reversed(parts))
        hops = 0
        fd = self.root_fd
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if names:
                    names.pop()
                    fds.pop()
                fd = fds[-1] if fds else self.root_fd
                continue
            child_key = (*names, name)
            child = self._dirs.get(child_key)
            if child is None:
                found = self.open_child(fd, child_key, create=create, entry=entry)
                if isinstance(found, str):
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise self.error(entry, f"too many symbolic links in {display(parts)!r}")
                    if found.startswith("/"):
                        names.clear()
                        fds.clear()
                        fd = self.root_fd
                    todo.extend(reversed(found.split("/")))
                    continue
                self.remember(child_key, found)
                child = found
            names.append(name)
            fds.append(child)
            fd = child
        return fd, tuple(names)

    def open_child(self, parent_fd: int, key: Key, *, create: bool, entry: str | None) -> int | str:
        """Open directory KEY in its parent; return a descriptor, or the target of a symlink."""
        name = key[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return self.missing_dir(parent_fd, key, create=create, entry=entry)
        except OSError as err:
            if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise self.write_error(entry, f"opening directory {display(key)!r}", err) from err
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return os.readlink(name, dir_fd=parent_fd)
        return self.non_dir_parent(parent_fd, key, st, entry=entry)

    def missing_dir(
        self, parent_fd: int, key: Key, *, create: bool, entry: str | None
    ) -> int | str:
        """Create a directory that an entry needs but the layer did not list (mode 0755, root)."""
        if not create:
            raise self.error(entry, f"{display(key)!r} does not exist")
        try:
            os.mkdir(key[-1], 0o755, dir_fd=parent_fd)
            return os.open(key[-1], _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as err:
            raise self.write_error(entry, f"creating directory {display(key)!r}", err) from err

    def non_dir_parent(
        self, parent_fd: int, key: Key, st: os.stat_result, *, entry: str | None
    ) -> int:
        """Handle a parent component that exists but is neither a directory nor a link."""
        raise self.error(entry, f"{display(key)!r} is not a directory")

    # ------------------------------------------------------------ changes

    def lstat(self, parent_fd: int, name: str) -> os.stat_result | None:
        """Return the lstat of NAME in the directory, or None when it does not exist."""
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def remove(
        self, parent_fd: int, key: Key, st: os.stat_result | None, *, entry: str | None
    ) -> None:
        """Remove KEY (a whole tree when it is a directory); a missing KEY is fine."""
        name = key[-1]
        if st is None:
            st = self.lstat(parent_fd, name)
            if st is None:
                return
        try:
            if stat.S_ISDIR(st.st_mode):
                self.forget(key)
                self._remove_tree(parent_fd, name)
            else:
                os.unlink(name, dir_fd=parent_fd)
        except OSError as err:
            raise self.write_error(entry, f"removing {display(key)!r}", err) from err

    def _remove_tree(self, parent_fd: int, name: str) -> None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            self._empty_dir(fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)

    def _empty_dir(self, fd: int) -> None:
        for child in list(os.scandir(fd)):
            if child.is_dir(follow_symlinks=False):
                self._remove_tree(fd, child.name)
            else:
                os.unlink(child.name, dir_fd=fd)

    def remove_children_except(
        self, fd: int, key: Key, keep: set[str], *, entry: str | None
    ) -> None:
        """Remove the children of directory KEY whose paths are not in KEEP, recursively.

        A kept directory is visited too: it may be a directory of this
        layer merged over an older one, whose older children must go.
        """
        for child in sorted(os.scandir(fd), key=lambda e: e.name):
            child_key = (*key, child.name)
            is_dir = child.is_dir(follow_symlinks=False)
            if "/".join(child_key) not in keep:
                self.remove(fd, child_key, None, entry=entry)
            elif is_dir:
                child_fd, _ = self.resolve_dir(child_key, create=False, entry=entry)
                self.remove_children_except(child_fd, child_key, keep, entry=entry)

    def iter_cached(self) -> Iterable[Key]:
        """Return the keys of the cached directories."""
        return list(self._dirs)
