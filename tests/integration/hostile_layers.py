"""Builders of OCI layers for tests, the named corpus of hostile layers, and apply helpers.

`LayerBuilder` writes a tar in memory with tarfile, one method per entry
kind. `HOSTILE` lists layers that try to reach outside the target, each
case named after its hazard. The tests apply each one into a target next
to an `outside` folder with a sentinel file, then check that the layer
was confined or rejected and that `outside` is untouched.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from lamina.archive import ApplyResult, apply_layer, apply_layer_to_upper

MTIME = 1_700_000_000


class LayerBuilder:
    """An in-memory tar layer, built entry by entry."""

    def __init__(self, tar_format: int = tarfile.PAX_FORMAT) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.TarFile(fileobj=self._buffer, mode="w", format=tar_format)
        self._closed = False

    def _info(
        self,
        name: str,
        kind: bytes,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime: float,
        xattrs: dict[str, bytes] | None,
        pax: dict[str, str] | None,
    ) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid = uid
        info.gid = gid
        info.mtime = mtime
        records = dict(pax or {})
        for key, value in (xattrs or {}).items():
            records["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = records
        return info

    def file(
        self,
        name: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = MTIME,
        xattrs: dict[str, bytes] | None = None,
        pax: dict[str, str] | None = None,
    ) -> LayerBuilder:
        info = self._info(
            name, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs, pax=pax
        )
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))
        return self

    def dir(
        self,
        name: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: float = MTIME,
        xattrs: dict[str, bytes] | None = None,
        pax: dict[str, str] | None = None,
    ) -> LayerBuilder:
        info = self._info(
            name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime, xattrs=xattrs, pax=pax
        )
        self._tar.addfile(info)
        return self

    def symlink(
        self, name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: float = MTIME
    ) -> LayerBuilder:
        info = self._info(
            name, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime, xattrs=None, pax=None
        )
        info.linkname = target
        self._tar.addfile(info)
        return self

    def hardlink(self, name: str, target: str) -> LayerBuilder:
        info = self._info(
            name, tarfile.LNKTYPE, mode=0o644, uid=0, gid=0, mtime=MTIME, xattrs=None, pax=None
        )
        info.linkname = target
        self._tar.addfile(info)
        return self

    def device(
        self,
        name: str,
        kind: bytes,
        major: int = 0,
        minor: int = 0,
        *,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
    ) -> LayerBuilder:
        info = self._info(
            name, kind, mode=mode, uid=uid, gid=gid, mtime=MTIME, xattrs=None, pax=None
        )
        info.devmajor = major
        info.devminor = minor
        self._tar.addfile(info)
        return self

    def fifo(self, name: str, *, mode: int = 0o644) -> LayerBuilder:
        return self.device(name, tarfile.FIFOTYPE, mode=mode)

    def whiteout(self, path: str) -> LayerBuilder:
        head, _, base = path.rstrip("/").rpartition("/")
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}")

    def opaque(self, directory: str) -> LayerBuilder:
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq")

    def tar(self, *, end_blocks: bool = True) -> bytes:
        """Return the tar; without END_BLOCKS it stops after the last entry's data."""
        if not end_blocks:
            # tarfile writes each entry with its padding; close() adds the end blocks.
            return self._buffer.getvalue()
        if not self._closed:
            self._tar.close()
            self._closed = True
        return self._buffer.getvalue()

    def gzip(self) -> bytes:
        return gzip.compress(self.tar(), mtime=0)

    def zstd(self) -> bytes:
        return zstandard.ZstdCompressor().compress(self.tar())


@dataclass(frozen=True)
class HostileCase:
    """One hazard: the layers to apply in order, and whether the last one must be rejected.

    Layer builders receive the absolute path of the `outside` folder, so
    that a case can aim absolute links at it.
    """

    name: str
    layers: tuple[Callable[[str], LayerBuilder], ...]
    rejected: bool = False
    # Paths (relative to the target) that must exist afterwards: where the
    # confined entry landed. "OUT" stands for the outside folder's absolute
    # path without its leading slash.
    confined_to: tuple[str, ...] = ()
    notes: str = field(default="", compare=False)


def _one(build: Callable[[str], LayerBuilder]) -> tuple[Callable[[str], LayerBuilder], ...]:
    return (build,)


HOSTILE: tuple[HostileCase, ...] = (
    HostileCase(
        "dotdot_in_name",
        _one(lambda out: LayerBuilder().file("../../outside/sentinel", b"pwned")),
        confined_to=("outside/sentinel",),
    ),
    HostileCase(
        "dotdot_in_middle_of_name",
        _one(lambda out: LayerBuilder().file("a/../../../outside/new", b"pwned")),
        confined_to=("outside/new",),
    ),
    HostileCase(
        "absolute_name",
        _one(lambda out: LayerBuilder().file(out + "/sentinel", b"pwned")),
        confined_to=("OUT/sentinel",),
    ),
    HostileCase(
        "absolute_symlink_parent_same_layer",
        _one(lambda out: LayerBuilder().symlink("evil", out).file("evil/new", b"pwned")),
        confined_to=("OUT/new",),
    ),
    HostileCase(
        "relative_symlink_parent_climbing_out",
        _one(
            lambda out: (
                LayerBuilder()
                .symlink("evil", "../../../../../../../../outside")
                .file("evil/new", b"pwned")
            )
        ),
        confined_to=("outside/new",),
    ),
    HostileCase(
        "symlink_parent_from_lower_layer",
        (
            lambda out: LayerBuilder().symlink("evil", out),
            lambda out: LayerBuilder().file("evil/new", b"pwned"),
        ),
        confined_to=("OUT/new",),
    ),
    HostileCase(
        "symlink_chain_out",
        _one(
            lambda out: (
                LayerBuilder()
                .symlink("a", "b")
                .symlink("b", "../" + "../" * 10 + out.lstrip("/"))
                .file("a/new", b"pwned")
            )
        ),
        confined_to=("OUT/new",),
    ),
    HostileCase(
        "symlink_loop",
        _one(lambda out: LayerBuilder().symlink("a", "b").symlink("b", "a").file("a/new")),
        rejected=True,
    ),
    HostileCase(
        "hardlink_dotdot_out",
        _one(lambda out: LayerBuilder().hardlink("link", "../outside/sentinel")),
        rejected=True,
    ),
    HostileCase(
        "hardlink_absolute_out",
        _one(lambda out: LayerBuilder().hardlink("link", out + "/sentinel")),
        rejected=True,
    ),
    HostileCase(
        "hardlink_through_symlink_out",
        _one(lambda out: LayerBuilder().symlink("evil", out).hardlink("link", "evil/sentinel")),
        rejected=True,
    ),
    HostileCase(
        "hardlink_to_directory",
        _one(lambda out: LayerBuilder().dir("d").hardlink("link", "d")),
        rejected=True,
    ),
    HostileCase(
        "file_over_symlink_pointing_out",
        (
            lambda out: LayerBuilder().symlink("f", out + "/sentinel"),
            lambda out: LayerBuilder().file("f", b"pwned"),
        ),
        confined_to=("f",),
    ),
    HostileCase(
        "directory_over_symlink_pointing_out",
        (
            lambda out: LayerBuilder().symlink("d", out),
            lambda out: LayerBuilder().dir("d", mode=0o700),
        ),
        confined_to=("d",),
    ),
    HostileCase(
        "whiteout_through_symlink",
        _one(lambda out: LayerBuilder().symlink("evil", out).whiteout("evil/sentinel")),
    ),
    HostileCase(
        "whiteout_dotdot_name",
        _one(lambda out: LayerBuilder().dir("a").file("a/.wh..")),
        rejected=True,
    ),
    HostileCase(
        "whiteout_with_dotdot_parent",
        _one(lambda out: LayerBuilder().whiteout("../outside/sentinel")),
    ),
    HostileCase(
        "opaque_through_symlink",
        _one(lambda out: LayerBuilder().symlink("evil", out).opaque("evil")),
    ),
    HostileCase(
        "chmod_through_symlink_dir_entry",
        _one(lambda out: LayerBuilder().symlink("evil", out).dir("evil", mode=0o777)),
        confined_to=("evil",),
    ),
    HostileCase(
        # A PAX path record may hold a NUL; a ustar name would end there.
        "nul_in_pax_path",
        _one(lambda out: LayerBuilder().file("f", b"x", pax={"path": "f\0/../../outside/new"})),
        rejected=True,
    ),
    HostileCase(
        "nul_in_pax_link_target",
        _one(lambda out: LayerBuilder().file("f", b"x", pax={"linkpath": out + "/sentinel\0"})),
        rejected=True,
    ),
    HostileCase(
        "nul_in_xattr_name",
        _one(lambda out: LayerBuilder().file("f", b"x", xattrs={"user.a\0b": b"v"})),
        rejected=True,
    ),
    HostileCase(
        "parent_is_a_file",
        _one(lambda out: LayerBuilder().file("f", b"x").file("f/child", b"y")),
        rejected=True,
    ),
)


# ---------------------------------------------------------------- apply helpers


def apply_generic(root: Path, layers: Sequence[bytes]) -> list[ApplyResult]:
    """Apply LAYERS in order into the directory ROOT."""
    root.mkdir(parents=True, exist_ok=True)
    return [apply_layer(io.BytesIO(data), root, layer=f"layer{i}") for i, data in enumerate(layers)]


def apply_overlay_stack(
    base: Path, layers: Sequence[bytes], *, userxattr: bool = False
) -> list[Path]:
    """Apply each of LAYERS into its own upper directory over the previous ones.

    Returns the upper directories, oldest first.
    """
    uppers: list[Path] = []
    for i, data in enumerate(layers):
        upper = base / f"upper{i}"
        upper.mkdir(parents=True)
        apply_layer_to_upper(
            io.BytesIO(data), upper, list(reversed(uppers)), userxattr=userxattr, layer=f"layer{i}"
        )
        uppers.append(upper)
    return uppers


@contextlib.contextmanager
def merged_view(
    uppers: Sequence[Path], mountpoint: Path, *, userxattr: bool = False
) -> Iterator[Path]:
    """Mount UPPERS (oldest first) as a read-only overlay and yield the mount point.

    A single layer needs no overlay: its directory is the view.
    """
    if len(uppers) == 1:
        yield uppers[0]
        return
    mountpoint.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in reversed(uppers))
    options = f"lowerdir={lowerdir}" + (",userxattr" if userxattr else "")
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
