"""Write the changes of a snapshot as an OCI layer.

The changes come from one of two sources. An overlay upper directory is
read directly: every entry in it is a change, a whiteout device becomes
`.wh.NAME` and an opaque directory gets a `.wh..wh..opq` marker. Or two
complete trees are compared (lower and upper, for instance two mounted
views), and a path of the lower tree missing from the upper one becomes a
whiteout.

The output is reproducible: entries in byte order of their names, parents
before children, PAX headers with empty user and group names, the
modification time kept to the nanosecond (PAX "mtime" when it has a
fraction), xattrs in name order, whiteouts with mode 0644, owner 0 and
time 0, and compression without timestamps. A file with several names is
written once and the other names are hard links to the first one written.
Every xattr except overlayfs's own (trusted.overlay.*, user.overlay.*) is
kept; containerd 1.6 keeps only security.capability.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from lamina.archive.compression import CompressingWriter, Compression
from lamina.archive.errors import LayerWriteError
from lamina.archive.overlay import is_whiteout
from lamina.errors import UnimplementedError

logger = logging.getLogger(__name__)

OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_READ_SIZE = 1 << 20


@dataclass(frozen=True)
class DiffResult:
    """The layer written: its diff id, its blob digest and its sizes in bytes."""

    diff_id: str
    digest: str
    size: int
    compressed_size: int
    compression: str


def write_diff(
    out: BinaryIO,
    *,
    upper: str | os.PathLike[str],
    lower: str | os.PathLike[str] | None = None,
    overlay_upper: bool = False,
    userxattr: bool = False,
    compression: Compression = Compression.GZIP,
) -> DiffResult:
    """Write to OUT the layer that turns LOWER into UPPER.

    With OVERLAY_UPPER, UPPER is an overlay upper directory and LOWER must
    be None: its whiteouts and opaque directories (in the user.overlay.*
    namespace with USERXATTR) are the deletions. Otherwise UPPER and LOWER
    are complete trees, LOWER None standing for the empty tree. OUT is left
    open. Raises UnimplementedError for an upper directory written by
    overlayfs with redirect_dir or metacopy, whose changes are not all in
    the upper directory.
    """
    if overlay_upper and lower is not None:
        raise ValueError("write_diff: an overlay upper directory has no lower tree")
    writer = CompressingWriter(out, compression)
    tar = tarfile.TarFile(
        fileobj=writer,  # type: ignore[arg-type]
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    )
    source = os.fspath(upper)
    emitter = _Emitter(tar, source)
    if overlay_upper:
        opaque = ("user.overlay." if userxattr else "trusted.overlay.") + "opaque"
        emitter.walk_upper(source, (), opaque)
    else:
        emitter.walk_trees(os.fspath(lower) if lower is not None else None, source, ())
    tar.close()
    writer.finish()
    return DiffResult(
        diff_id="sha256:" + writer.plain_hash.hexdigest(),
        digest="sha256:" + writer.compressed_hash.hexdigest(),
        size=writer.size,
        compressed_size=writer.compressed_size,
        compression=compression.value,
    )


def _sorted_names(path: str) -> list[str]:
    return sorted(os.listdir(path), key=os.fsencode)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def read_xattrs(path: str) -> dict[str, bytes]:
    """Return the xattrs of PATH (not following a link) except overlayfs's own."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    found: dict[str, bytes] = {}
    for name in sorted(names):
        if name.startswith(OVERLAY_XATTR_PREFIXES):
            continue
        found[name] = os.getxattr(path, name, follow_symlinks=False)
    return found


class _Emitter:
    """Writes tar members for changed paths, tracking hard-link groups."""

    def __init__(self, tar: tarfile.TarFile, root: str) -> None:
        self.tar = tar
        self.root = root
        self.links: dict[tuple[int, int], str] = {}

    # ------------------------------------------------------------ members

    def _header(self, name: str, st: os.stat_result, path: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid = st.st_uid
        info.gid = st.st_gid
        info.uname = ""
        info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        records: dict[str, str] = {}
        fraction = st.st_mtime_ns % 1_000_000_000
        if fraction:
            records["mtime"] = f"{info.mtime}.{fraction:09d}".rstrip("0")
        for key, value in read_xattrs(path).items():
            records["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = dict(sorted(records.items()))
        return info

    def emit(self, rel: tuple[str, ...], path: str, st: os.stat_result) -> None:
        """Write the member for PATH, whose name in the layer is REL."""
        name = "/".join(rel)
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            logger.debug("socket %r left out of the layer", name)
            return
        info = self._header(name, st, path)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                info.type = tarfile.LNKTYPE
                info.linkname = first
                self.tar.addfile(info)
                return
            self.links[(st.st_dev, st.st_ino)] = name
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
            self.tar.addfile(info)
        elif stat.S_ISREG(mode):
            info.type = tarfile.REGTYPE
            info.size = st.st_size
            with open(path, "rb") as data:
                self.tar.addfile(info, _Exact(data, st.st_size, path))
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            self.tar.addfile(info)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
            self.tar.addfile(info)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
            self.tar.addfile(info)

    def note_unchanged(self, st: os.stat_result, rel: tuple[str, ...]) -> None:
        """Remember an unchanged multiply-linked file, so that new names link to it."""
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            self.links.setdefault((st.st_dev, st.st_ino), "/".join(rel))

    def marker(self, rel: tuple[str, ...]) -> None:
        """Write an empty marker file (a whiteout or an opaque marker) named REL."""
        info = tarfile.TarInfo("/".join(rel))
        info.type = tarfile.REGTYPE
        info.mode = 0o644
        info.mtime = 0
        info.uname = ""
        info.gname = ""
        self.tar.addfile(info)

    # ------------------------------------------------------------ overlay upper

    def walk_upper(self, path: str, rel: tuple[str, ...], opaque: str) -> None:
        """Write every entry below the upper directory PATH."""
        for name in _sorted_names(path):
            child = os.path.join(path, name)
            child_rel = (*rel, name)
            st = os.lstat(child)
            if is_whiteout(st):
                self.marker((*rel, WHITEOUT_PREFIX + name))
                continue
            self._check_overlay_feature(child, child_rel, opaque)
            self.emit(child_rel, child, st)
            if stat.S_ISDIR(st.st_mode):
                if _has_xattr(child, opaque):
                    self.marker((*child_rel, OPAQUE_MARKER))
                self.walk_upper(child, child_rel, opaque)

    @staticmethod
    def _check_overlay_feature(path: str, rel: tuple[str, ...], opaque: str) -> None:
        prefix = opaque[: -len("opaque")]
        for feature in ("redirect", "metacopy"):
            if _has_xattr(path, prefix + feature, any_value=True):
                raise UnimplementedError(
                    f"diff of overlay upper {'/'.join(rel)!r}: overlayfs {feature} "
                    "entries are not supported; mount overlays with redirect_dir=off and "
                    "metacopy=off, or diff the two mounted trees",
                    subject="/".join(rel),
                )

    # ------------------------------------------------------------ two trees

    def walk_trees(self, lower: str | None, upper: str, rel: tuple[str, ...]) -> None:
        """Write the changes that turn directory LOWER (None: absent) into UPPER."""
        upper_names = _sorted_names(upper)
        lower_names = _sorted_names(lower) if lower is not None else []
        names = sorted(set(upper_names) | set(lower_names), key=os.fsencode)
        upper_set = set(upper_names)
        for name in names:
            child_rel = (*rel, name)
            upper_child = os.path.join(upper, name)
            if name not in upper_set:
                self.marker((*rel, WHITEOUT_PREFIX + name))
                continue
            ust = os.lstat(upper_child)
            lower_child = os.path.join(lower, name) if lower is not None else None
            lst = _lstat(lower_child) if lower_child is not None else None
            if stat.S_ISDIR(ust.st_mode):
                lower_dir = lower_child if lst is not None and stat.S_ISDIR(lst.st_mode) else None
                if lower_dir is None or _changed(lst, ust, lower_dir, upper_child):
                    self.emit(child_rel, upper_child, ust)
                self.walk_trees(lower_dir, upper_child, child_rel)
            elif lst is None or _changed(lst, ust, lower_child, upper_child):
                self.emit(child_rel, upper_child, ust)
            else:
                self.note_unchanged(ust, child_rel)


def _has_xattr(path: str, name: str, *, any_value: bool = False) -> bool:
    try:
        value = os.getxattr(path, name, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return any_value or value == b"y"


def _changed(
    lst: os.stat_result | None, ust: os.stat_result, lower: str | None, upper: str
) -> bool:
    """Tell whether UPPER differs from LOWER in type, metadata, xattrs or content.

    As containerd's continuity does, file contents are compared only when
    size and mtime agree and the mtime has no fraction of a second (such a
    time was likely truncated by a copy, so it proves nothing).
    """
    if lst is None or lower is None:
        return True
    if stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
        return True
    if (lst.st_mode, lst.st_uid, lst.st_gid) != (ust.st_mode, ust.st_uid, ust.st_gid):
        return True
    if stat.S_ISDIR(ust.st_mode):
        return lst.st_mtime_ns != ust.st_mtime_ns or read_xattrs(lower) != read_xattrs(upper)
    if lst.st_mtime_ns != ust.st_mtime_ns or lst.st_size != ust.st_size:
        return True
    if (stat.S_ISCHR(ust.st_mode) or stat.S_ISBLK(ust.st_mode)) and lst.st_rdev != ust.st_rdev:
        return True
    if stat.S_ISLNK(ust.st_mode) and os.readlink(lower) != os.readlink(upper):
        return True
    if read_xattrs(lower) != read_xattrs(upper):
        return True
    if stat.S_ISREG(ust.st_mode) and ust.st_mtime_ns % 1_000_000_000 == 0:
        return not _same_content(lower, upper)
    return False


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            da = fa.read(_READ_SIZE)
            db = fb.read(_READ_SIZE)
            if da != db:
                return False
            if not da:
                return True


class _Exact:
    """A file reader that fails when the file shrank while being written to the layer."""

    def __init__(self, data: BinaryIO, size: int, path: str) -> None:
        self._data = data
        self._left = size
        self._path = path

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left
        chunk = self._data.read(size)
        if len(chunk) < size:
            raise LayerWriteError(
                f"{self._path!r} shrank while being read; "
                "was the snapshot changed during the diff?",
                layer=None,
                entry=self._path,
                operation="diff",
            )
        self._left -= len(chunk)
        return chunk
