"""Layer apply on real directories: entry types, metadata, whiteouts, streams and errors.

Whiteout cases run on both paths and the two results are compared: the
generic path applies every layer into one directory, the overlay fast path
writes one upper directory per layer and the test mounts them as overlayfs.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_layers import MTIME, LayerBuilder, apply_generic, apply_overlay_stack, merged_view
from treecompare import assert_trees_equal, snapshot_tree

from lamina.archive import (
    LayerDigestError,
    LayerError,
    apply_layer,
    apply_layer_to_upper,
)

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep


# ---------------------------------------------------------------- entry types


def _all_kinds_layer() -> LayerBuilder:
    layer = LayerBuilder()
    layer.dir("d", mode=0o750, uid=10, gid=20)
    layer.file("d/setuid", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0)
    layer.file("d/setgid", b"x", mode=0o2750, uid=3, gid=4)
    layer.dir("tmp", mode=0o1777)
    layer.file("d/caps", b"ping", mode=0o755, xattrs={"security.capability": CAPABILITY})
    layer.file("d/user-xattr", b"u", xattrs={"user.test": b"value", "user.empty": b""})
    layer.file("d/big-ids", b"b", uid=3_000_000, gid=4_000_000)
    layer.file("d/subsecond", b"s", mtime=MTIME + 0.123456789, pax={"mtime": f"{MTIME}.123456789"})
    layer.file(
        "d/foreign-pax",
        b"f",
        pax={"LIBARCHIVE.xattr.user.ignored": "dGVzdA==", "comment": "not an xattr"},
    )
    layer.symlink("d/link", "setuid")
    layer.hardlink("d/hard", "d/setuid")
    layer.hardlink("d/hard-dot", "./d/setgid")
    layer.hardlink("d/hard-abs", "/d/caps")
    layer.hardlink("d/hard-to-symlink", "d/link")
    layer.device("d/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
    layer.device("d/loop", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6)
    layer.fifo("d/fifo", mode=0o620)
    layer.file("long/" + "n" * 150 + "/" + "m" * 120, b"long name")
    layer.symlink("long/link", "t" * 300)
    return layer


def test_every_entry_kind_and_metadata(tmp_path: Path) -> None:
    target = tmp_path / "t"
    apply_generic(target, [_all_kinds_layer().tar()])
    d = target / "d"

    st = os.lstat(d)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 10, 20)
    assert stat.S_IMODE(os.lstat(d / "setuid").st_mode) == 0o4755
    st = os.lstat(d / "setgid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2750, 3, 4)
    assert stat.S_IMODE(os.lstat(target / "tmp").st_mode) == 0o1777
    assert os.getxattr(d / "caps", "security.capability") == CAPABILITY
    assert os.getxattr(d / "user-xattr", "user.test") == b"value"
    assert os.getxattr(d / "user-xattr", "user.empty") == b""
    assert os.listxattr(d / "foreign-pax") == []
    st = os.lstat(d / "big-ids")
    assert (st.st_uid, st.st_gid) == (3_000_000, 4_000_000)
    assert os.lstat(d / "subsecond").st_mtime_ns == MTIME * 10**9 + 123456789
    assert os.lstat(d / "setuid").st_mtime_ns == MTIME * 10**9
    assert os.readlink(d / "link") == "setuid"
    assert os.lstat(d / "hard").st_ino == os.lstat(d / "setuid").st_ino
    assert os.lstat(d / "hard-dot").st_ino == os.lstat(d / "setgid").st_ino
    assert os.lstat(d / "hard-abs").st_ino == os.lstat(d / "caps").st_ino
    assert os.lstat(d / "hard-to-symlink").st_ino == os.lstat(d / "link").st_ino
    assert stat.S_ISLNK(os.lstat(d / "hard-to-symlink").st_mode)
    st = os.lstat(d / "null")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(d / "loop")
    assert stat.S_ISBLK(st.st_mode)
    assert st.st_rdev == os.makedev(7, 0)
    assert st.st_gid == 6
    st = os.lstat(d / "fifo")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o620
    assert (target / "long" / ("n" * 150) / ("m" * 120)).read_bytes() == b"long name"
    assert os.readlink(target / "long/link") == "t" * 300


def test_every_entry_kind_same_on_overlay_path(tmp_path: Path) -> None:
    layer = _all_kinds_layer().tar()
    target = tmp_path / "t"
    apply_generic(target, [layer])
    (upper,) = apply_overlay_stack(tmp_path / "stack", [layer])
    assert_trees_equal(target, upper, mtimes="non-dirs")


def test_gnu_long_names(tmp_path: Path) -> None:
    layer = LayerBuilder(tarfile.GNU_FORMAT)
    layer.file("g/" + "x" * 200, b"gnu", uid=2_500_000)
    layer.symlink("g/link", "y" * 200)
    layer.hardlink("g/hard", "g/" + "x" * 200)
    apply_generic(tmp_path / "t", [layer.tar()])
    long_file = tmp_path / "t/g" / ("x" * 200)
    assert long_file.read_bytes() == b"gnu"
    assert os.lstat(long_file).st_uid == 2_500_000
    assert os.readlink(tmp_path / "t/g/link") == "y" * 200
    assert os.lstat(tmp_path / "t/g/hard").st_ino == os.lstat(long_file).st_ino


def test_directory_times_set_after_children(tmp_path: Path) -> None:
    layer = LayerBuilder().dir("a", mtime=MTIME - 500).dir("a/b", mtime=MTIME - 400)
    layer.file("a/b/f", b"x").file("a/g", b"y")
    apply_generic(tmp_path / "t", [layer.tar()])
    assert os.lstat(tmp_path / "t/a").st_mtime == MTIME - 500
    assert os.lstat(tmp_path / "t/a/b").st_mtime == MTIME - 400


@pytest.mark.parametrize(
    ("first", "second", "check"),
    [
        ("file", "file", lambda p: p.read_bytes() == b"second"),
        ("file", "dir", lambda p: p.is_dir() and not p.is_symlink()),
        ("dir", "file", lambda p: p.read_bytes() == b"second"),
        ("symlink", "file", lambda p: not p.is_symlink() and p.read_bytes() == b"second"),
        ("file", "symlink", lambda p: os.readlink(p) == "second"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_duplicate_path_last_wins(
    tmp_path: Path, first: str, second: str, check: Callable[[Path], bool]
) -> None:
    layer = LayerBuilder()
    for kind, content in ((first, "first"), (second, "second")):
        if kind == "file":
            layer.file("p", content.encode())
        elif kind == "dir":
            layer.dir("p").file("p/child", b"c")
        else:
            layer.symlink("p", content)
    apply_generic(tmp_path / "t", [layer.tar()])
    assert check(tmp_path / "t/p")


def test_duplicate_file_keeps_other_hard_link(tmp_path: Path) -> None:
    layer = LayerBuilder().file("a", b"old").hardlink("b", "a").file("a", b"new")
    apply_generic(tmp_path / "t", [layer.tar()])
    assert (tmp_path / "t/a").read_bytes() == b"new"
    assert (tmp_path / "t/b").read_bytes() == b"old"


def test_implicit_parent_directories(tmp_path: Path) -> None:
    apply_generic(tmp_path / "t", [LayerBuilder().file("x/y/z", b"1").tar()])
    st = os.lstat(tmp_path / "t/x/y")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o755


def test_root_entry_ignored(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir(mode=0o711)
    layer = LayerBuilder().dir("./", mode=0o700, uid=5).file("./a", b"1")
    apply_generic(target, [layer.tar()])
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o711
    assert (target / "a").read_bytes() == b"1"


# ---------------------------------------------------------------- sparse files


def _gnu_tar_sparse(tmp_path: Path, tar_format: str, version: str | None) -> bytes:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(3 << 20)
        f.write(b"tail")
        f.truncate(5 << 20)
    out = tmp_path / "sparse.tar"
    command = ["tar", "-c", "--sparse", f"--format={tar_format}", "-f", str(out), "-C", str(src)]
    if version is not None:
        command.insert(3, f"--sparse-version={version}")
    subprocess.run([*command, "sparse"], check=True)
    return out.read_bytes()


@pytest.mark.parametrize(
    ("tar_format", "version"),
    [("gnu", None), ("posix", "0.0"), ("posix", "0.1"), ("posix", "1.0")],
    ids=["gnu-old", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_sparse_file_formats(tmp_path: Path, tar_format: str, version: str | None) -> None:
    data = _gnu_tar_sparse(tmp_path, tar_format, version)
    apply_generic(tmp_path / "t", [data])
    applied = tmp_path / "t/sparse"
    expected = tmp_path / "src/sparse"
    assert applied.read_bytes() == expected.read_bytes()
    # The holes stay holes: far fewer blocks than the 5 MiB size.
    assert os.lstat(applied).st_blocks * 512 < (1 << 20)


# ---------------------------------------------------------------- streams


def test_result_digest_and_sizes(tmp_path: Path) -> None:
    layer = LayerBuilder().file("a", b"x" * 5000)
    tar = layer.tar()
    for blob, compression in ((tar, "none"), (layer.gzip(), "gzip"), (layer.zstd(), "zstd")):
        target = tmp_path / compression
        target.mkdir()
        result = apply_layer(io.BytesIO(blob), target)
        assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert result.size == len(tar)
        assert result.compressed_size == len(blob)
        assert result.compression == compression
        assert (target / "a").read_bytes() == b"x" * 5000


def test_stream_without_end_blocks(tmp_path: Path) -> None:
    tar = LayerBuilder().file("a", b"1").file("b", b"2").tar(end_blocks=False)
    result = apply_layer(io.BytesIO(tar), tmp_path)
    assert (tmp_path / "b").read_bytes() == b"2"
    assert result.size == len(tar)


def test_multi_member_gzip(tmp_path: Path) -> None:
    import gzip

    tar = LayerBuilder().file("a", b"1" * 3000).file("b", b"2").tar()
    blob = gzip.compress(tar[:2048], mtime=0) + gzip.compress(tar[2048:], mtime=0)
    result = apply_layer(io.BytesIO(blob), tmp_path)
    assert (tmp_path / "b").read_bytes() == b"2"
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_empty_stream_is_empty_layer(tmp_path: Path) -> None:
    result = apply_layer(io.BytesIO(b""), tmp_path)
    assert result.size == 0
    assert list(tmp_path.iterdir()) == []


def _corrupt(name: str) -> bytes:
    tar = LayerBuilder().file("a", b"x" * 2000).file("b", b"y" * 100).tar()
    if name == "truncated_in_data":
        return tar[:1024]
    if name == "truncated_in_header":
        return tar[: 512 + 2048 + 100]
    if name == "bad_checksum":
        broken = bytearray(tar)
        broken[2560 + 10] ^= 0xFF
        return bytes(broken)
    if name == "truncated_gzip":
        import gzip

        return gzip.compress(tar)[:-30]
    if name == "truncated_zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(tar)[:-20]
    if name == "garbage_after_zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(tar) + b"garbage!"
    if name == "garbage_after_gzip":
        import gzip

        return gzip.compress(tar) + b"garbage!"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "truncated_in_data",
        "truncated_in_header",
        "bad_checksum",
        "truncated_gzip",
        "truncated_zstd",
        "garbage_after_gzip",
        "garbage_after_zstd",
    ],
)
def test_corrupt_stream_raises_layer_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(LayerError) as caught:
        apply_layer(io.BytesIO(_corrupt(name)), tmp_path, layer="broken")
    assert caught.value.layer == "broken"


def test_digest_mismatch(tmp_path: Path) -> None:
    tar = LayerBuilder().file("a", b"1").tar()
    with pytest.raises(LayerDigestError) as caught:
        apply_layer(io.BytesIO(tar), tmp_path, layer="l", expected_diff_id="sha256:" + "0" * 64)
    assert caught.value.layer == "l"
    good = "sha256:" + hashlib.sha256(tar).hexdigest()
    assert apply_layer(io.BytesIO(tar), tmp_path, expected_diff_id=good).diff_id == good


def test_unsupported_entry_type(tmp_path: Path) -> None:
    layer = LayerBuilder()
    info = tarfile.TarInfo("volume")
    info.type = b"V"
    layer._tar.addfile(info)
    with pytest.raises(LayerError) as caught:
        apply_layer(io.BytesIO(layer.tar()), tmp_path, layer="l")
    assert caught.value.entry == "volume"


# ---------------------------------------------------------------- whiteouts


@dataclass(frozen=True)
class WhiteoutCase:
    name: str
    layers: tuple[Callable[[], LayerBuilder], ...]
    present: dict[str, bytes | None]  # path -> file content, None for a directory
    absent: tuple[str, ...]


def _base() -> LayerBuilder:
    return (
        LayerBuilder()
        .dir("d")
        .file("d/old", b"old")
        .dir("d/sub")
        .file("d/sub/deep", b"deep")
        .file("f", b"f")
        .dir("e")
        .file("e/keep", b"keep")
    )


WHITEOUT_CASES = (
    WhiteoutCase(
        "whiteout_removes_lower_file",
        (_base, lambda: LayerBuilder().whiteout("f")),
        {"d/old": b"old"},
        ("f",),
    ),
    WhiteoutCase(
        "whiteout_removes_lower_directory",
        (_base, lambda: LayerBuilder().whiteout("d")),
        {"e/keep": b"keep"},
        ("d",),
    ),
    WhiteoutCase(
        "whiteout_after_same_layer_entry_keeps_it",
        (_base, lambda: LayerBuilder().file("f", b"new").whiteout("f")),
        {"f": b"new"},
        (),
    ),
    WhiteoutCase(
        "whiteout_before_same_layer_entry_keeps_it",
        (_base, lambda: LayerBuilder().whiteout("f").file("f", b"new")),
        {"f": b"new"},
        (),
    ),
    # containerd 1.6 (archive/tar.go, applyNaive) removes d with RemoveAll
    # here, losing d/x that this very layer wrote before its whiteout.
    WhiteoutCase(
        "whiteout_after_same_layer_children_hides_lower_only",
        (_base, lambda: LayerBuilder().dir("d").file("d/x", b"x").whiteout("d")),
        {"d/x": b"x"},
        ("d/old", "d/sub"),
    ),
    WhiteoutCase(
        "whiteout_after_implicit_parent_hides_lower_only",
        (_base, lambda: LayerBuilder().file("d/sub/new", b"n").whiteout("d")),
        {"d/sub/new": b"n"},
        ("d/old", "d/sub/deep"),
    ),
    WhiteoutCase(
        "opaque_hides_lower_children",
        (_base, lambda: LayerBuilder().dir("d").opaque("d").file("d/new", b"n")),
        {"d/new": b"n", "e/keep": b"keep"},
        ("d/old", "d/sub"),
    ),
    WhiteoutCase(
        "opaque_after_children_keeps_them",
        (_base, lambda: LayerBuilder().file("d/new", b"n").dir("d/sub").opaque("d")),
        {"d/new": b"n", "d/sub": None},
        ("d/old", "d/sub/deep"),
    ),
    # containerd 1.6 also removes d/x here: its opaque walk keeps only the
    # paths the layer listed, not the implicit parent of d/x/y.
    WhiteoutCase(
        "opaque_after_implicit_parent_keeps_children",
        (_base, lambda: LayerBuilder().file("d/x/y", b"y").opaque("d")),
        {"d/x/y": b"y"},
        ("d/old", "d/sub"),
    ),
    WhiteoutCase(
        "opaque_hides_only_its_directory",
        (_base, lambda: LayerBuilder().opaque("d/sub")),
        {"d/old": b"old", "d/sub": None},
        ("d/sub/deep",),
    ),
    WhiteoutCase(
        "whiteout_then_recreated_directory",
        (_base, lambda: LayerBuilder().whiteout("d").dir("d").file("d/new", b"n")),
        {"d/new": b"n"},
        ("d/old", "d/sub"),
    ),
    WhiteoutCase(
        "file_replacing_lower_directory",
        (_base, lambda: LayerBuilder().file("d", b"now a file")),
        {"d": b"now a file"},
        (),
    ),
    WhiteoutCase(
        "directory_replacing_lower_file",
        (_base, lambda: LayerBuilder().dir("f").file("f/inner", b"i")),
        {"f/inner": b"i"},
        (),
    ),
    WhiteoutCase(
        "whiteout_of_missing_path",
        (_base, lambda: LayerBuilder().whiteout("nothing/here")),
        {"f": b"f"},
        ("nothing/here",),
    ),
    WhiteoutCase(
        "three_layers_whiteout_middle",
        (
            _base,
            lambda: LayerBuilder().file("d/mid", b"m"),
            lambda: LayerBuilder().whiteout("d/mid").whiteout("d/old"),
        ),
        {"d/sub/deep": b"deep"},
        ("d/mid", "d/old"),
    ),
    WhiteoutCase(
        "hardlink_to_lower_file",
        (_base, lambda: LayerBuilder().hardlink("e/link", "d/old")),
        {"e/link": b"old", "d/old": b"old"},
        (),
    ),
)


def _check_case(view: Path, case: WhiteoutCase) -> None:
    for rel, content in case.present.items():
        path = view / rel
        if content is None:
            assert path.is_dir(), rel
        else:
            assert path.read_bytes() == content, rel
    for rel in case.absent:
        assert not os.path.lexists(view / rel), rel


@pytest.mark.parametrize("case", WHITEOUT_CASES, ids=lambda c: c.name)
def test_whiteout_semantics_both_paths(tmp_path: Path, case: WhiteoutCase) -> None:
    layers = [build().tar() for build in case.layers]
    generic = tmp_path / "generic"
    apply_generic(generic, layers)
    _check_case(generic, case)

    uppers = apply_overlay_stack(tmp_path / "stack", layers)
    with merged_view(uppers, tmp_path / "merged") as view:
        _check_case(view, case)
        assert_trees_equal(generic, view, mtimes="non-dirs")


def test_overlay_whiteout_and_opaque_representation(tmp_path: Path) -> None:
    layers = [_base().tar(), LayerBuilder().whiteout("f").opaque("d").file("d/n", b"n").tar()]
    _, upper = apply_overlay_stack(tmp_path / "stack", layers)
    st = os.lstat(upper / "f")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert not os.path.lexists(upper / ".wh.f")
    assert not os.path.lexists(upper / "d/.wh..wh..opq")


def test_overlay_userxattr_opaque(tmp_path: Path) -> None:
    layers = [_base().tar(), LayerBuilder().opaque("d").tar()]
    _, upper = apply_overlay_stack(tmp_path / "stack", layers, userxattr=True)
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "d")


def test_overlay_implicit_parent_copies_lower_metadata(tmp_path: Path) -> None:
    lower_layer = LayerBuilder().dir(
        "srv", mode=0o710, uid=7, gid=8, mtime=MTIME - 99, xattrs={"user.tag": b"t"}
    )
    layers = [lower_layer.tar(), LayerBuilder().file("srv/new", b"n").tar()]
    _, upper = apply_overlay_stack(tmp_path / "stack", layers)
    st = os.lstat(upper / "srv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o710, 7, 8)
    assert st.st_mtime == MTIME - 99
    assert os.getxattr(upper / "srv", "user.tag") == b"t"


def test_overlay_hardlink_copies_lower_file_up(tmp_path: Path) -> None:
    layers = [
        LayerBuilder()
        .dir("bin")
        .file("bin/tool", b"tool", mode=0o4711, uid=5, xattrs={"security.capability": CAPABILITY})
        .tar(),
        LayerBuilder().hardlink("bin/alias", "bin/tool").tar(),
    ]
    lower, upper = apply_overlay_stack(tmp_path / "stack", layers)
    assert os.lstat(upper / "bin/alias").st_ino == os.lstat(upper / "bin/tool").st_ino
    st = os.lstat(upper / "bin/tool")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o4711, 5)
    assert os.getxattr(upper / "bin/tool", "security.capability") == CAPABILITY
    assert os.lstat(lower / "bin/tool").st_nlink == 1


def test_overlay_symlink_in_lower_layer_followed(tmp_path: Path) -> None:
    layers = [
        LayerBuilder().dir("usr").dir("usr/lib", mode=0o751).symlink("lib", "usr/lib").tar(),
        LayerBuilder().file("lib/libx.so", b"so").tar(),
    ]
    uppers = apply_overlay_stack(tmp_path / "stack", layers)
    assert (uppers[1] / "usr/lib/libx.so").read_bytes() == b"so"
    assert stat.S_IMODE(os.lstat(uppers[1] / "usr/lib").st_mode) == 0o751
    generic = tmp_path / "generic"
    apply_generic(generic, layers)
    with merged_view(uppers, tmp_path / "merged") as view:
        assert_trees_equal(generic, view, mtimes="non-dirs")


def test_overlay_applies_several_layers_into_one_upper(tmp_path: Path) -> None:
    """Later layers of one apply see the earlier ones as lower content."""
    upper = tmp_path / "upper"
    upper.mkdir()
    layers = [_base().tar(), LayerBuilder().whiteout("d/old").opaque("e").tar()]
    for data in layers:
        apply_layer_to_upper(io.BytesIO(data), upper, [])
    assert not (upper / "d/old").exists() or stat.S_ISCHR(os.lstat(upper / "d/old").st_mode)
    assert list((upper / "e").iterdir()) == []
    assert (upper / "d/sub/deep").read_bytes() == b"deep"
    assert snapshot_tree(upper)["f"].sha256 == hashlib.sha256(b"f").hexdigest()


def test_many_directories_beyond_descriptor_cache(tmp_path: Path) -> None:
    """More directories than the applier keeps open: every entry and time still lands."""
    count = 700
    first = LayerBuilder()
    for i in range(count):
        first.dir(f"d{i}", mtime=MTIME - i).file(f"d{i}/f", b"%d" % i)
    second = LayerBuilder()
    for i in range(0, count, 2):
        second.whiteout(f"d{i}/f").file(f"d{i}/g", b"new")
    generic = tmp_path / "generic"
    apply_generic(generic, [first.tar(), second.tar()])
    assert not (generic / "d0/f").exists()
    assert (generic / "d1/f").read_bytes() == b"1"
    assert (generic / f"d{count - 2}/g").read_bytes() == b"new"
    assert os.lstat(generic / f"d{count - 1}").st_mtime == MTIME - count + 1

    uppers = apply_overlay_stack(tmp_path / "stack", [first.tar(), second.tar()])
    with merged_view(uppers, tmp_path / "merged") as view:
        assert_trees_equal(generic, view, mtimes="non-dirs")


def test_hardlink_replacing_its_target_directory(tmp_path: Path) -> None:
    layer = LayerBuilder().dir("d").file("d/f", b"x").hardlink("d", "d/f")
    with pytest.raises(LayerError):
        apply_layer(io.BytesIO(layer.tar()), tmp_path)
    assert (tmp_path / "d/f").read_bytes() == b"x"


def test_name_component_too_long_is_layer_error(tmp_path: Path) -> None:
    layer = LayerBuilder().file("d/" + "n" * 300, b"x")
    with pytest.raises(LayerError) as caught:
        apply_layer(io.BytesIO(layer.tar()), tmp_path, layer="l")
    assert caught.value.entry == "d/" + "n" * 300


@pytest.mark.parametrize(
    "records",
    [{"uid": "-5"}, {"gid": str(2**40)}, {"mtime": "1e30"}, {"mtime": "-1e30"}, {"mtime": "inf"}],
    ids=["negative-uid", "gid-over-32-bits", "mtime-far-future", "mtime-far-past", "mtime-inf"],
)
@pytest.mark.parametrize("overlay", [False, True], ids=["generic", "overlay"])
def test_out_of_range_metadata_is_layer_error(
    tmp_path: Path, records: dict[str, str], overlay: bool
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    for layer in (
        LayerBuilder().file("f", b"x", pax=records).tar(),
        # Directory times are set after the last entry, not with the entry.
        LayerBuilder().dir("f", pax=records).tar(),
    ):
        with pytest.raises(LayerError) as caught:
            if overlay:
                apply_layer_to_upper(io.BytesIO(layer), target, [], layer="l")
            else:
                apply_layer(io.BytesIO(layer), target, layer="l")
        assert caught.value.entry == "f"
