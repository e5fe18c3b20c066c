"""Apply an OCI image layer to a directory tree, streaming.

Two targets share one applier. `apply_layer` writes into any directory
(for instance a mounted merged view), where a whiteout deletes and an
opaque marker empties. `apply_layer_to_upper` writes a new overlay
snapshot's upper directory, where a whiteout becomes a character device 0/0
and an opaque marker becomes the overlay "opaque" xattr.

Whiteouts follow the OCI image spec (image-spec layer.md, "Whiteouts"): a
whiteout hides what the lower layers contain, never an entry of its own
layer, whatever the order of the tar; an opaque marker hides the lower
layers' children of its directory only. The applier therefore remembers
the paths its layer wrote (and their parent directories) until the layer
ends.

Metadata follow each entry in the order a real root file system needs:
owner, then mode (a chown clears setuid and setgid), then xattrs (file
capabilities after the chown, which clears them), then times. Directory
times are set last, deepest first, so that creating children does not
disturb them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from lamina.archive import tarstream
from lamina.archive.compression import LayerStream
from lamina.archive.errors import LayerDigestError
from lamina.archive.overlay import UpperTree, is_whiteout
from lamina.archive.tree import Key, Tree, display, split_name

logger = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"

# Failures that the entry causes on any file system: a name component over
# NAME_MAX bytes, or more hard links to one file than the file system allows.
_LAYER_ERRNOS = (errno.ENAMETOOLONG, errno.EMLINK)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# The range of a 64-bit time_t, in seconds.
_TIME_T_MIN, _TIME_T_MAX = -(2**63), 2**63 - 1

# The types TarInfo.isreg accepts, old GNU sparse files included.
_REGULAR_TYPES = frozenset(tarfile.REGULAR_TYPES)
_SPECIAL_TYPES = frozenset((tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE))


@dataclass(frozen=True)
class ApplyResult:
    """Outcome of applying one layer: its diff id, sizes in bytes and compression."""

    diff_id: str
    size: int
    compressed_size: int
    compression: str = "none"


def apply_layer(
    stream: BinaryIO,
    root: str | os.PathLike[str],
    *,
    layer: str | None = None,
    expected_diff_id: str | None = None,
) -> ApplyResult:
    """Apply the layer in STREAM (tar, gzip or zstd) to the directory ROOT.

    LAYER names the layer in errors (a digest or a file name). When
    EXPECTED_DIFF_ID is given and the uncompressed stream hashes to another
    value, LayerDigestError is raised after the entries were written: the
    caller discards the target. Raises LayerError for a corrupt stream or
    an unsafe entry and LayerWriteError when the file system fails.
    """
    return _apply(stream, Tree(root, layer=layer), layer, expected_diff_id)


def apply_layer_to_upper(
    stream: BinaryIO,
    upper: str | os.PathLike[str],
    lowers: Sequence[str | os.PathLike[str]],
    *,
    userxattr: bool = False,
    layer: str | None = None,
    expected_diff_id: str | None = None,
) -> ApplyResult:
    """Apply the layer in STREAM to an overlay upper directory whose lower layers are LOWERS.

    LOWERS are the lower directories nearest first, as in overlayfs's
    lowerdir option; they are only read. USERXATTR selects the
    user.overlay.* attributes of an overlay mounted with "userxattr".
    Errors are those of `apply_layer`.
    """
    tree = UpperTree(upper, lowers, userxattr=userxattr, layer=layer)
    return _apply(stream, tree, layer, expected_diff_id)


def apply_to_tree(
    stream: BinaryIO, tree: Tree, *, layer: str | None = None, expected_diff_id: str | None = None
) -> ApplyResult:
    """Apply the layer in STREAM to a prepared TREE (a Tree or UpperTree, or a subclass).

    The tree is closed afterwards. Errors are those of `apply_layer`.
    """
    return _apply(stream, tree, layer, expected_diff_id)


def _apply(
    stream: BinaryIO, tree: Tree, layer: str | None, expected_diff_id: str | None
) -> ApplyResult:
    source = LayerStream(stream, layer=layer)
    try:
        source.start()
        _Applier(tree, source).run()
    finally:
        source.close()
        tree.close()

    result = ApplyResult(
        diff_id=source.diff_id,
        size=source.tell(),
        compressed_size=source.compressed_size,
        compression=source.compression.value,
    )
    if expected_diff_id is not None and expected_diff_id != result.diff_id:
        raise LayerDigestError(layer=layer, expected=expected_diff_id, actual=result.diff_id)
    logger.debug(
        "applied layer %s: diff id %s, %d bytes",
        layer,
        result.diff_id,
        result.size,
        extra={"layer": layer},
    )
    return result


class _Applier:
    """Applies the members of one layer stream to one target tree."""

    def __init__(self, tree: Tree, stream: LayerStream) -> None:
        self.tree = tree
        self.upper = tree if isinstance(tree, UpperTree) else None
        self.stream = stream
        # Paths written by this layer and every directory above them.
        self.own: set[str] = set()
        self.dir_times: dict[Key, tuple[int, int]] = {}
        # Who usually owns the files this process creates. Only a hint:
        # Tree.creator_owns checks what a directory really does.
        self.creator = (os.geteuid(), os.getegid())

    def run(self) -> None:
        """Apply every member, then set the directory times."""
        tree = self.tree
        apply_member = self._apply_member
        for member in tarstream.iter_members(self.stream):
            tree.trim()
            try:
                apply_member(member)
            except OSError as err:
                if err.errno in _LAYER_ERRNOS:
                    reason = f"invalid entry: {err.strerror}"
                    raise self.tree.error(member.name, reason) from err
                raise self.tree.write_error(member.name, "applying entry", err) from err
            except (OverflowError, ValueError) as err:
                # What Python raises for a value no system call takes, such as
                # a time past the range of time_t.
                raise self.tree.error(member.name, f"invalid entry: {err}") from err
        if self.upper is not None:
            for key, times in self.upper.copied_dir_times.items():
                self.dir_times.setdefault(key, times)
        self._set_dir_times()

    def _own(self, key: Key) -> None:
        own = self.own
        path = "/".join(key)
        if path in own:
            return
        own.add(path)
        parent = key[:-1]
        while parent:
            path = "/".join(parent)
            if path in own:
                break
            own.add(path)
            parent = parent[:-1]

    # ------------------------------------------------------------ dispatch

    def _apply_member(self, member: tarfile.TarInfo) -> None:
        entry = member.name
        parts = split_name(entry)
        if not parts:
            logger.debug("entry %r resolves to the root and is ignored", entry)
            return
        parent_fd, parent_key = self.tree.resolve_dir(parts[:-1], create=True, entry=entry)
        name = parts[-1]
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent_fd, parent_key, name, member)
            return
        key = (*parent_key, name)

        kind = member.type
        if kind in _REGULAR_TYPES:
            self._regular(parent_fd, key, member)
        elif kind == tarfile.DIRTYPE:
            self._directory(parent_fd, key, member)
        elif kind == tarfile.SYMTYPE:
            self._symlink(parent_fd, key, member)
        elif kind == tarfile.LNKTYPE:
            self._hardlink(parent_fd, key, member)
        elif kind in _SPECIAL_TYPES:
            self._special(parent_fd, key, member)
        else:
            raise self.tree.error(entry, f"unsupported tar entry type {member.type!r}")
        self._own(key)

    # ------------------------------------------------------------ whiteouts

    def _whiteout(
        self, parent_fd: int, parent_key: Key, name: str, member: tarfile.TarInfo
    ) -> None:
        entry = member.name
        if name == OPAQUE_MARKER:
            self._hide_lower_children(parent_fd, parent_key, entry)
            return
        if name.startswith(WHITEOUT_META_PREFIX):
            # Other .wh..wh. names are reserved by the OCI spec (AUFS metadata).
            logger.debug("reserved whiteout name %r ignored", entry)
            return
        target = name[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise self.tree.error(entry, f"invalid whiteout name {name!r}")
        key = (*parent_key, target)
        st = self.tree.lstat(parent_fd, target)

        if "/".join(key) in self.own:
            # containerd 1.6 removes the path even when this layer wrote it before
            # the whiteout (overlayfs: fails with EEXIST); OCI hides only lower content.
            if st is not None and stat.S_ISDIR(st.st_mode):
                fd, _ = self.tree.resolve_dir(key, create=False, entry=entry)
                self._hide_lower_children(fd, key, entry)
            return

        if self.upper is None:
            self.tree.remove(parent_fd, key, st, entry=entry)
            return
        if st is not None and is_whiteout(st):
            return
        self.tree.remove(parent_fd, key, st, entry=entry)
        # A whiteout over nothing would show in the listing of a directory
        # that only one layer has (overlayfs filters whiteouts only when merging).
        if self.upper.lower_entry(key) is not None:
            self.upper.make_whiteout(parent_fd, key, member.uid, member.gid, entry=entry)

    def _hide_lower_children(self, fd: int, key: Key, entry: str) -> None:
        """Remove what older layers put below directory KEY; on overlay, mark it opaque."""
        self.tree.remove_children_except(fd, key, self.own, entry=entry)
        if self.upper is not None:
            self.upper.set_opaque(fd, key, entry=entry)

    # ------------------------------------------------------------ entry types

    def _replace(self, parent_fd: int, key: Key, entry: str) -> bool:
        """Remove whatever KEY is now; return True when something was there."""
        st = self.tree.lstat(parent_fd, key[-1])
        if st is None:
            return False
        self.tree.remove(parent_fd, key, st, entry=entry)
        return True

    def _directory(self, parent_fd: int, key: Key, member: tarfile.TarInfo) -> None:
        entry = member.name
        name = key[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            replaced = False
        except FileExistsError:
            st = self.tree.lstat(parent_fd, name)
            replaced = st is not None and not stat.S_ISDIR(st.st_mode)
            if replaced:
                self.tree.remove(parent_fd, key, st, entry=entry)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        if replaced or self.tree.cached(key) is None:
            self.tree.remember(key, os.open(name, _DIR_FLAGS, dir_fd=parent_fd))
        fd = self.tree.cached(key)
        assert fd is not None
        if replaced and self.upper is not None:
            # The upper non-directory hid the lower layers' KEY; keep it hidden.
            self.upper.set_opaque(fd, key, entry=entry)
        self._set_fd_metadata(fd, member, times=False)
        self.tree.mode_changed(key)
        mtime = tarstream.mtime_ns(member)
        if not _TIME_T_MIN <= mtime // 1_000_000_000 <= _TIME_T_MAX:
            # Checked now, because directory times are set after the last entry.
            raise ValueError(f"mtime {mtime} ns is out of range of time_t")
        self.dir_times[key] = (mtime, mtime)

    def _regular(self, parent_fd: int, key: Key, member: tarfile.TarInfo) -> None:
        # The metadata calls of _set_fd_metadata are written out here: this
        # runs for most entries, and each Python call costs.
        stream = self.stream
        stream.seek(member.offset_data)
        try:
            fd = os.open(key[-1], _CREATE_FLAGS, 0o600, dir_fd=parent_fd)
        except FileExistsError:
            self._replace(parent_fd, key, member.name)
            fd = os.open(key[-1], _CREATE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            if member.sparse is not None:
                self._write_sparse(fd, member)
            else:
                stream.copy_to(fd, member.size)
            uid = member.uid
            gid = member.gid
            # The chown is left out when the new file already has the owner
            # asked for, as the first file created in the directory showed.
            if (uid, gid) != self.creator or not self.tree.creator_owns(key[:-1], fd, uid, gid):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, member.mode & 0o7777)
            if member.pax_headers:
                for name, value in tarstream.xattrs(member).items():
                    self._set_xattr(fd, name, value, member, regular=True)
                mtime = tarstream.mtime_ns(member)
            else:
                mtime = int(member.mtime) * 1_000_000_000
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _write_sparse(self, fd: int, member: tarfile.TarInfo) -> None:
        sparse: list[tuple[int, int]] = member.sparse  # type: ignore[assignment]
        for offset, length in sparse:
            position = offset
            for view in self.stream.chunks(length):
                while view:
                    written = os.pwrite(fd, view, position)
                    view = view[written:]
                    position += written
        os.ftruncate(fd, member.size)

    def _symlink(self, parent_fd: int, key: Key, member: tarfile.TarInfo) -> None:
        try:
            os.symlink(member.linkname, key[-1], dir_fd=parent_fd)
        except FileExistsError:
            self._replace(parent_fd, key, member.name)
            os.symlink(member.linkname, key[-1], dir_fd=parent_fd)
        self._set_name_metadata(parent_fd, key[-1], member, symlink=True)

    def _special(self, parent_fd: int, key: Key, member: tarfile.TarInfo) -> None:
        self._replace(parent_fd, key, member.name)
        if member.isfifo():
            os.mkfifo(key[-1], 0o600, dir_fd=parent_fd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(key[-1], kind | 0o600, device, dir_fd=parent_fd)
        self._set_name_metadata(parent_fd, key[-1], member, symlink=False)

    def _hardlink(self, parent_fd: int, key: Key, member: tarfile.TarInfo) -> None:
        entry = member.name
        # A link name is a path from the root of the layer, written "a/b",
        # "./a/b" or "/a/b". It resolves inside the target like any name.
        target_parts = split_name(member.linkname)
        if not target_parts:
            raise self.tree.error(entry, "hard link to the root directory")
        target_fd, target_parent = self.tree.resolve_dir(
            target_parts[:-1], create=self.upper is not None, entry=entry
        )
        target_key = (*target_parent, target_parts[-1])
        if target_key == key:
            logger.debug("hard link %r to itself ignored", entry)
            return

        if target_key[: len(key)] == key:
            raise self.tree.error(entry, "hard link would replace the directory holding its target")

        target_st = self.tree.lstat(target_fd, target_key[-1])
        if target_st is not None and stat.S_ISDIR(target_st.st_mode):
            raise self.tree.error(entry, f"hard link target {display(target_key)!r} is a directory")
        missing = target_st is None or (self.upper is not None and is_whiteout(target_st))
        if missing:
            # Only the overlay target reads lower layers. A merged target contains them already.
            if self.upper is None or target_st is not None:
                raise self.tree.error(entry, f"hard link target {display(target_key)!r} not found")
            if not self.upper.copy_up(target_fd, target_key, entry=entry):
                raise self.tree.error(entry, f"hard link target {display(target_key)!r} not found")

        self._replace(parent_fd, key, entry)
        os.link(
            target_key[-1],
            key[-1],
            src_dir_fd=target_fd,
            dst_dir_fd=parent_fd,
            follow_symlinks=False,
        )

    # ------------------------------------------------------------ metadata

    def _set_fd_metadata(self, fd: int, member: tarfile.TarInfo, *, times: bool) -> None:
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        if member.pax_headers:
            for name, value in tarstream.xattrs(member).items():
                self._set_xattr(fd, name, value, member, regular=True)
        if times:
            mtime = tarstream.mtime_ns(member)
            os.utime(fd, ns=(mtime, mtime))

    def _set_name_metadata(
        self, parent_fd: int, name: str, member: tarfile.TarInfo, *, symlink: bool
    ) -> None:
        os.chown(name, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        if not symlink:
            # NAME was just created by this applier as a device or FIFO, never a link.
            os.chmod(name, member.mode & 0o7777, dir_fd=parent_fd)
        attributes = tarstream.xattrs(member)
        if attributes:
            path = f"/proc/self/fd/{parent_fd}/{name}"
            for key, value in attributes.items():
                self._set_xattr(path, key, value, member, regular=False)
        mtime = tarstream.mtime_ns(member)
        os.utime(name, ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)

    def _set_xattr(
        self, target: int | str, name: str, value: bytes, member: tarfile.TarInfo, *, regular: bool
    ) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as err:
            # As containerd does: a file system without xattrs, or a user.*
            # attribute on a link or device (xattr(7) allows user.* only on
            # regular files and directories), costs the attribute, not the layer.
            unsupported = err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
            user_on_special = err.errno == errno.EPERM and not regular and name.startswith("user.")
            if not (unsupported or user_on_special):
                raise
            logger.warning(
                "xattr %s of %r not set: %s",
                name,
                member.name,
                err.strerror,
                extra={"layer": self.tree.layer, "path": member.name},
            )

    def _set_dir_times(self) -> None:
        for key in sorted(self.dir_times, key=len, reverse=True):
            self.tree.trim()
            atime, mtime = self.dir_times[key]
            parent_fd = self._open_existing(key[:-1])
            if parent_fd is None:
                continue
            try:
                os.utime(key[-1], ns=(atime, mtime), dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue

    def _open_existing(self, key: Key) -> int | None:
        """Return a descriptor of directory KEY if it still exists, never creating or following."""
        fd = self.tree.cached(key) if key else self.tree.root_fd
        if fd is not None:
            return fd
        parent = self._open_existing(key[:-1])
        if parent is None:
            return None
        try:
            fd = os.open(key[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError:
            return None
        self.tree.remember(key, fd)
        return fd
