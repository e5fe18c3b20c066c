"""Read files out of an image archive: a layout folder or a tar, compressed or not.

An image archive is a set of named files: an OCI image layout (index.json,
blobs/ALG/ENCODED) or a docker-archive (manifest.json, config and layer
files, with symlinks that `docker save` uses for layers shared by two
images). `open_source` gives one read interface over the three containers
they come in:

- a folder: files are opened in place; a path may not leave the folder,
  symlinks included;
- an uncompressed tar: one scan of the headers records where each member's
  data starts, and readers use pread(2) on one shared descriptor, so
  several layers can be read at once without extracting anything;
- a compressed tar (gzip, zstd, bzip2, xz): decompressed once into a
  temporary uncompressed tar beside the caller's scratch space, then read
  as above.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lamina.errors import NotFoundError
from lamina.images import compression
from lamina.images.errors import InvalidImageError

log = logging.getLogger(__name__)

# Symlink chains inside an archive longer than this are treated as a loop.
MAX_LINK_DEPTH = 16
COPY_CHUNK = 1 << 20


class Source(Protocol):
    """Named files of an image archive."""

    description: str

    def exists(self, path: str) -> bool:
        """Return whether the regular file PATH exists (after resolving links)."""
        ...

    def size(self, path: str) -> int:
        """Return the size in bytes of file PATH; InvalidImageError if missing."""
        ...

    def open(self, path: str) -> BlobReader:
        """Return a fresh reader of file PATH from its start."""
        ...

    def resolve(self, path: str) -> str:
        """Return the archive path of the regular file that PATH names or links to."""
        ...

    def close(self) -> None:
        """Release descriptors and temporary files."""
        ...


def normalize(path: str) -> str:
    """Return PATH relative to the archive root, or raise InvalidImageError."""
    clean = posixpath.normpath(path.lstrip("/")) if path.strip("/") else ""
    if clean in ("", ".", "..") or clean.startswith("../"):
        raise InvalidImageError(
            f"invalid path {path!r} in image archive: empty, or it leaves the archive",
            subject=path,
        )
    return clean


class BlobReader(io.RawIOBase):
    """Read LENGTH bytes at OFFSET of a file descriptor with pread(2).

    The reader never moves the descriptor's file position, so many readers
    can share one descriptor across threads. It closes the descriptor on
    close only when it owns it.
    """

    def __init__(self, fd: int, offset: int, length: int, *, owns_fd: bool, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._start = offset
        self._position = 0
        self.length = length
        self._owns_fd = owns_fd
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        length = min(len(view), self.length - self._position)
        if length <= 0:
            return 0
        count = os.preadv(self._fd, [view[:length]], self._start + self._position)
        if count == 0:
            raise InvalidImageError(
                f"read {self.name!r}: file ends {self.length - self._position} bytes early; "
                "the archive is truncated",
                subject=self.name,
            )
        self._position += count
        return count

    def close(self) -> None:
        if not self.closed and self._owns_fd:
            os.close(self._fd)
        super().close()


# ---------------------------------------------------------------- folders


class DirectorySource:
    """An archive unpacked into a folder (an OCI image layout, typically)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = f"folder {root}"

    def _host_path(self, path: str) -> Path:
        host = (self.root / normalize(path)).resolve()
        if os.path.commonpath([self.root, host]) != str(self.root):
            raise InvalidImageError(
                f"{self.description}: {path!r} links outside the folder", subject=path
            )
        return host

    def resolve(self, path: str) -> str:
        return str(self._host_path(path).relative_to(self.root))

    def exists(self, path: str) -> bool:
        try:
            return self._host_path(path).is_file()
        except InvalidImageError:
            return False

    def size(self, path: str) -> int:
        host = self._host_path(path)
        try:
            info = host.stat()
        except FileNotFoundError:
            raise InvalidImageError(
                f"{self.description}: file {path!r} is missing", subject=path
            ) from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImageError(
                f"{self.description}: {path!r} is not a regular file", subject=path
            )
        return info.st_size

    def open(self, path: str) -> BlobReader:
        size = self.size(path)
        fd = os.open(self._host_path(path), os.O_RDONLY | os.O_CLOEXEC)
        return BlobReader(fd, 0, size, owns_fd=True, name=path)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- tar files


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int
    link: str | None  # target archive path of a symlink or hard link


class TarSource:
    """An uncompressed tar read in place by member offsets."""

    def __init__(self, path: Path, *, description: str | None = None) -> None:
        self.path = path
        self.description = description or f"archive {path}"
        self._members: dict[str, _Member] = {}
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._scan()
        except BaseException:
            os.close(self._fd)
            raise

    def _scan(self) -> None:
        try:
            with tarfile.open(self.path, "r:") as archive:
                for info in archive:
                    self._add(info)
        except tarfile.TarError as err:
            raise InvalidImageError(
                f"read {self.description}: not a valid tar archive: {err}",
                subject=str(self.path),
            ) from err

    def _add(self, info: tarfile.TarInfo) -> None:
        if info.isdir():
            return
        name = normalize(info.name)
        if info.isreg():
            self._members[name] = _Member(info.offset_data, info.size, None)
        elif info.issym():
            target = posixpath.join(posixpath.dirname(name), info.linkname)
            self._members[name] = _Member(0, 0, normalize(target))
        elif info.islnk():
            self._members[name] = _Member(0, 0, normalize(info.linkname))

    def resolve(self, path: str) -> str:
        name = normalize(path)
        for _ in range(MAX_LINK_DEPTH):
            member = self._members.get(name)
            if member is None:
                raise InvalidImageError(
                    f"{self.description}: file {path!r} is missing", subject=path
                )
            if member.link is None:
                return name
            name = member.link
        raise InvalidImageError(
            f"{self.description}: {path!r} is a symlink loop or a chain of more than "
            f"{MAX_LINK_DEPTH} links",
            subject=path,
        )

    def exists(self, path: str) -> bool:
        try:
            self.resolve(path)
        except InvalidImageError:
            return False
        return True

    def size(self, path: str) -> int:
        return self._members[self.resolve(path)].size

    def open(self, path: str) -> BlobReader:
        member = self._members[self.resolve(path)]
        return BlobReader(self._fd, member.offset, member.size, owns_fd=False, name=path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---------------------------------------------------------------- opening


def _decompress_to(path: Path, kind: str, scratch: Path) -> Path:
    """Write the decompressed content of PATH to a temporary file in SCRATCH."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".archive-", suffix=".tar", dir=scratch)
    target = Path(name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            open(path, "rb") as raw,
            compression.open_decompressed(raw, kind) as data,
        ):
            while chunk := data.read(COPY_CHUNK):
                out.write(chunk)
    except compression.ERRORS as err:
        target.unlink(missing_ok=True)
        raise InvalidImageError(
            f"decompress archive {path}: {err}; the {kind} stream is corrupt or truncated",
            subject=str(path),
        ) from err
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


@contextmanager
def open_source(path: Path, scratch: Path) -> Iterator[Source]:
    """Open the image archive at PATH, decompressing it into SCRATCH if needed."""
    if path.is_dir():
        yield DirectorySource(path)
        return
    try:
        with open(path, "rb") as file:
            head = file.read(compression.MAGIC_LENGTH)
    except FileNotFoundError:
        raise NotFoundError(
            f"import {path}: archive not found; give the path of an OCI layout folder, "
            "an oci-archive or a docker-archive",
            subject=str(path),
        ) from None
    except OSError as err:
        raise InvalidImageError(f"import {path}: {err.strerror}", subject=str(path)) from err

    kind = compression.detect(head)
    if kind is None:
        source = TarSource(path)
        try:
            yield source
        finally:
            source.close()
        return

    log.info("decompressing %s archive %s into %s", kind, path, scratch)
    plain = _decompress_to(path, kind, scratch)
    try:
        source = TarSource(plain, description=f"archive {path}")
        try:
            yield source
        finally:
            source.close()
    finally:
        plain.unlink(missing_ok=True)
