"""The overlay fast path target: a new snapshot's upper directory over its lower layers.

Paths resolve through the merged view that overlayfs will show, without
mounting it. A component missing from the upper directory is looked up in
the lower directories, nearest first, with the rules of the kernel's
Documentation/filesystems/overlayfs.rst. A whiteout (character device 0/0)
or a non-directory hides everything below it, and an opaque directory
hides the same directory of the layers below. A directory that an entry
needs and that only a lower layer has is created in the upper directory
with that layer's owner, mode and extended attributes; its times are
restored at the end of the apply.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator, Sequence

from lamina.archive.tree import _DIR_FLAGS, Key, Tree, display

logger = logging.getLogger(__name__)

WHITEOUT_DEVICE = os.makedev(0, 0)
_MAX_MEMO = 4096


def is_whiteout(st: os.stat_result) -> bool:
    """Tell whether ST is an overlay whiteout, a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_DEVICE


def overlay_xattr_prefix(userxattr: bool) -> str:
    """Return the namespace of overlayfs's own attributes: user.overlay. with userxattr."""
    return "user.overlay." if userxattr else "trusted.overlay."


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class _Layers:
    """A list of layer indexes produced on demand by a generator, and kept."""

    def __init__(self, source: Iterator[int]) -> None:
        self.found: list[int] = []
        self._source: Iterator[int] | None = source

    def iterate(self) -> Iterator[int]:
        position = 0
        while True:
            if position < len(self.found):
                yield self.found[position]
                position += 1
                continue
            if self._source is None:
                return
            index = next(self._source, None)
            if index is None:
                self._source = None
                return
            self.found.append(index)


class UpperTree(Tree):
    """Apply target writing overlay whiteouts and opaque directories into an upper directory."""

    def __init__(
        self,
        upper: str | os.PathLike[str],
        lowers: Sequence[str | os.PathLike[str]],
        *,
        userxattr: bool,
        layer: str | None,
    ) -> None:
        super().__init__(upper, layer=layer)
        self.lowers = [os.fspath(p) for p in lowers]
        self.xattr_prefix = overlay_xattr_prefix(userxattr)
        self.opaque_xattr = self.xattr_prefix + "opaque"
        # Times of directories copied from a lower layer, restored by the applier.
        self.copied_dir_times: dict[Key, tuple[int, int]] = {}
        self._layers_memo: dict[Key, _Layers] = {}

    # ------------------------------------------------------------ merged view

    def _lower_path(self, index: int, key: Key) -> str:
        # KEY is a directory chain verified in this lower (see lower_layers),
        # so only its last component can be a link, and lstat does not follow it.
        return os.path.join(self.lowers[index], *key)

    def _upper_opaque_or_hidden(self, key: Key) -> bool:
        path = f"/proc/self/fd/{self.root_fd}/" + "/".join(key)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISDIR(st.st_mode):
            return True
        try:
            return os.getxattr(path, self.opaque_xattr, follow_symlinks=False) == b"y"
        except OSError as err:
            if err.errno in (errno.ENODATA, errno.ENOTSUP):
                return False
            raise

    def lower_layers(self, key: Key) -> Iterator[int]:
        """Yield the lower layers, nearest first, whose directory KEY shows in the merged view.

        The layers are found lazily and remembered, so that a caller who
        stops at the nearest match never looks at the deeper layers.
        """
        found = self._layers_memo.get(key)
        if found is None:
            if len(self._layers_memo) > _MAX_MEMO:
                self._layers_memo.clear()
            found = self._layers_memo[key] = _Layers(self._find_layers(key))
        return found.iterate()

    def _find_layers(self, key: Key) -> Iterator[int]:
        if not key:
            yield from range(len(self.lowers))
            return
        if self._upper_opaque_or_hidden(key):
            return
        for index in self.lower_layers(key[:-1]):
            path = self._lower_path(index, key)
            st = _lstat(path)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                return
            yield index
            if self._is_opaque_lower(path):
                return

    def _is_opaque_lower(self, path: str) -> bool:
        try:
            return os.getxattr(path, self.opaque_xattr, follow_symlinks=False) == b"y"
        except OSError as err:
            if err.errno in (errno.ENODATA, errno.ENOTSUP):
                return False
            raise

    def lower_entry(self, key: Key) -> tuple[str, os.stat_result] | None:
        """Return the path and lstat of KEY in the nearest lower layer that shows it."""
        for index in self.lower_layers(key[:-1]):
            path = self._lower_path(index, key)
            st = _lstat(path)
            if st is None:
                continue
            if is_whiteout(st):
                return None
            return path, st
        return None

    def forget(self, key: Key) -> None:
        super().forget(key)
        depth = len(key)
        for k in [k for k in self._layers_memo if k[:depth] == key]:
            del self._layers_memo[k]

    # ------------------------------------------------------------ resolution hooks

    def missing_dir(
        self, parent_fd: int, key: Key, *, create: bool, entry: str | None
    ) -> int | str:
        found = self.lower_entry(key)
        if found is None:
            return super().missing_dir(parent_fd, key, create=create, entry=entry)
        path, st = found
        if stat.S_ISLNK(st.st_mode):
            return os.readlink(path)
        if not stat.S_ISDIR(st.st_mode):
            raise self.error(entry, f"{display(key)!r} is not a directory in a lower layer")
        return self.copy_up_dir(parent_fd, key, path, st, entry=entry)

    def non_dir_parent(
        self, parent_fd: int, key: Key, st: os.stat_result, *, entry: str | None
    ) -> int:
        if not is_whiteout(st):
            return super().non_dir_parent(parent_fd, key, st, entry=entry)
        # The whiteout hides the lower layers' KEY, so the new directory is opaque.
        try:
            os.unlink(key[-1], dir_fd=parent_fd)
            os.mkdir(key[-1], 0o755, dir_fd=parent_fd)
            fd = os.open(key[-1], _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as err:
            raise self.write_error(entry, f"replacing whiteout {display(key)!r}", err) from err
        self.set_opaque(fd, key, entry=entry)
        return fd

    def copy_up_dir(
        self, parent_fd: int, key: Key, source: str, st: os.stat_result, *, entry: str | None
    ) -> int:
        """Create directory KEY in the upper directory with the owner, mode and xattrs of SOURCE."""
        try:
            os.mkdir(key[-1], 0o700, dir_fd=parent_fd)
            fd = os.open(key[-1], _DIR_FLAGS, dir_fd=parent_fd)
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            self.copy_xattrs(source, fd)
        except OSError as err:
            raise self.write_error(entry, f"copying directory {display(key)!r} up", err) from err
        self.copied_dir_times[key] = (st.st_atime_ns, st.st_mtime_ns)
        return fd

    def copy_xattrs(self, source: str, target: int | str) -> None:
        """Copy the xattrs of SOURCE except overlayfs's own to TARGET (a descriptor or a path)."""
        for name in os.listxattr(source, follow_symlinks=False):
            if name.startswith(self.xattr_prefix):
                continue
            value = os.getxattr(source, name, follow_symlinks=False)
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)

    def set_opaque(self, fd: int, key: Key, *, entry: str | None) -> None:
        """Mark directory KEY opaque, hiding the same directory of every lower layer."""
        try:
            os.setxattr(fd, self.opaque_xattr, b"y")
        except OSError as err:
            raise self.write_error(entry, f"marking {display(key)!r} opaque", err) from err
        depth = len(key)
        for k in [k for k in self._layers_memo if k[:depth] == key]:
            del self._layers_memo[k]

    def make_whiteout(
        self, parent_fd: int, key: Key, uid: int, gid: int, *, entry: str | None
    ) -> None:
        """Create the overlay whiteout for KEY, owned as the OCI whiteout entry was."""
        try:
            os.mknod(key[-1], stat.S_IFCHR, WHITEOUT_DEVICE, dir_fd=parent_fd)
            os.chown(key[-1], uid, gid, dir_fd=parent_fd, follow_symlinks=False)
        except OSError as err:
            raise self.write_error(entry, f"creating whiteout {display(key)!r}", err) from err
        self.forget(key)

    # ------------------------------------------------------------ copy-up of a hard link target

    def copy_up(self, parent_fd: int, key: Key, *, entry: str | None) -> bool:
        """Copy non-directory KEY up from the nearest lower layer showing it; False if none does."""
        found = self.lower_entry(key)
        if found is None:
            return False
        source, st = found
        name = key[-1]
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise self.error(entry, f"hard link target {display(key)!r} is a directory")
        try:
            if stat.S_ISREG(mode):
                self._copy_file(source, parent_fd, name, st)
                return True
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(source), name, dir_fd=parent_fd)
            else:
                os.mknod(name, mode, st.st_rdev, dir_fd=parent_fd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISLNK(mode):
                os.chmod(name, stat.S_IMODE(mode), dir_fd=parent_fd)
            self.copy_xattrs(source, f"/proc/self/fd/{parent_fd}/{name}")
            os.utime(
                name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent_fd, follow_symlinks=False
            )
        except OSError as err:
            raise self.write_error(entry, f"copying {display(key)!r} up", err) from err
        return True

    def _copy_file(self, source: str, parent_fd: int, name: str, st: os.stat_result) -> None:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            dst = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent_fd,
            )
            try:
                remaining = st.st_size
                while remaining > 0:
                    copied = os.copy_file_range(src, dst, remaining)
                    if copied == 0:
                        break
                    remaining -= copied
                os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                self.copy_xattrs(source, dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
