"""Diff writing: round trips through apply, overlay upper directories, reproducible output.

Round trip: the layer written for (lower, upper), applied to a copy of
lower, must give upper again (paths, types, modes, owners, sizes, contents,
link targets, device numbers, hard-link groups and xattrs). Trees come from
fixed cases and from hypothesis.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treecompare import assert_trees_equal, snapshot_tree

from lamina.archive import Compression, apply_layer, apply_layer_to_upper, write_diff

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


def _copy_tree(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


@contextmanager
def _overlay(lower: Path, base: Path) -> Iterator[tuple[Path, Path]]:
    """Mount an overlay of LOWER with a fresh upper; yield (mount point, upper)."""
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    options = (
        f"lowerdir={lower},upperdir={upper},workdir={work},index=off,redirect_dir=off,metacopy=off"
    )
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        yield merged, upper
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def _diff_bytes(**kwargs: object) -> bytes:
    out = io.BytesIO()
    write_diff(out, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


# ---------------------------------------------------------------- fixed trees


def _make_lower(root: Path) -> None:
    root.mkdir()
    (root / "etc").mkdir(mode=0o755)
    (root / "etc/passwd").write_text("root:x:0:0\n")
    (root / "etc/shadow").write_text("secret\n")
    os.chmod(root / "etc/shadow", 0o640)
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF tool")
    os.chmod(root / "bin/tool", 0o4755)
    os.link(root / "bin/tool", root / "bin/tool-alias")
    (root / "bin/sh").symlink_to("tool")
    (root / "var/cache/apt").mkdir(parents=True)
    (root / "var/cache/apt/pkgcache").write_bytes(b"c" * 10000)
    (root / "opt/app").mkdir(parents=True)
    (root / "opt/app/old").write_text("old")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def _mutate(root: Path) -> None:
    """Apply every kind of change a container makes, through ROOT."""
    (root / "etc/passwd").write_text("root:x:0:0\nuser:x:1000:1000\n")
    os.chmod(root / "etc/shadow", 0o600)
    os.chown(root / "etc/shadow", 0, 42)
    os.remove(root / "bin/sh")
    (root / "bin/sh").symlink_to("/bin/tool")
    os.link(root / "etc/passwd", root / "etc/passwd-")
    shutil.rmtree(root / "var/cache/apt")
    shutil.rmtree(root / "opt/app")
    (root / "opt/app").mkdir(mode=0o700)
    (root / "opt/app/new").write_text("new")
    (root / "new-dir/sub").mkdir(parents=True)
    (root / "new-dir/sub/file").write_bytes(b"\0" * 3 + b"data")
    os.setxattr(root / "new-dir/sub/file", "user.note", b"hello")
    (root / "bin/ping").write_bytes(b"ping")
    os.setxattr(root / "bin/ping", "security.capability", CAPABILITY)
    os.mkfifo(root / "new-dir/fifo", 0o600)
    os.mknod(root / "dev/loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.link(root / "bin/tool", root / "bin/tool-third")


def test_tree_diff_round_trip(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    _make_lower(lower)
    upper = tmp_path / "upper"
    _copy_tree(lower, upper)
    _mutate(upper)

    layer = _diff_bytes(upper=upper, lower=lower, compression=Compression.NONE)
    target = tmp_path / "target"
    _copy_tree(lower, target)
    apply_layer(io.BytesIO(layer), target)
    assert_trees_equal(upper, target)


def test_overlay_upper_diff_round_trip_both_apply_paths(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    _make_lower(lower)
    with _overlay(lower, tmp_path / "ov") as (merged, upper):
        _mutate(merged)
        expected = snapshot_tree(merged)

    layer = _diff_bytes(upper=upper, overlay_upper=True, compression=Compression.GZIP)
    generic = tmp_path / "generic"
    _copy_tree(lower, generic)
    apply_layer(io.BytesIO(layer), generic)
    assert_trees_equal(expected, generic)

    fast_upper = tmp_path / "fast-upper"
    fast_upper.mkdir()
    apply_layer_to_upper(io.BytesIO(layer), fast_upper, [lower])
    mountpoint = tmp_path / "view"
    mountpoint.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={fast_upper}:{lower}",
            str(mountpoint),
        ],
        check=True,
    )
    try:
        assert_trees_equal(expected, mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_overlay_upper_diff_writes_whiteouts_and_opaque(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    _make_lower(lower)
    with _overlay(lower, tmp_path / "ov") as (merged, upper):
        _mutate(merged)
    layer = _diff_bytes(upper=upper, overlay_upper=True, compression=Compression.NONE)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        names = tar.getnames()
        xattr_records = [k for m in tar.getmembers() for k in m.pax_headers if "overlay" in k]
    assert "var/cache/.wh.apt" in names
    assert "opt/app/.wh..wh..opq" in names
    assert xattr_records == []


def test_diff_is_reproducible_and_normalised(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    _make_lower(lower)
    upper = tmp_path / "upper"
    _copy_tree(lower, upper)
    _mutate(upper)
    for compression in Compression:
        first = _diff_bytes(upper=upper, lower=lower, compression=compression)
        second = _diff_bytes(upper=upper, lower=lower, compression=compression)
        assert first == second, compression

    layer = _diff_bytes(upper=upper, lower=lower, compression=Compression.NONE)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = tar.getmembers()
    names = [m.name.rstrip("/") for m in members]
    assert len(names) == len(set(names))
    for index, name in enumerate(names):
        parent = name.rpartition("/")[0]
        if parent in names:
            assert names.index(parent) < index, f"{name} written before its directory"
    siblings = [n for n in names if n.startswith("new-dir/") and n.count("/") == 1]
    assert siblings == sorted(siblings)
    assert all(m.uname == "" and m.gname == "" for m in members)
    cap = next(m for m in members if m.name == "bin/ping")
    assert (
        cap.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
        == CAPABILITY
    )
    kinds = {m.name: m.type for m in members}
    assert kinds["etc/passwd-"] == tarfile.LNKTYPE or kinds["etc/passwd"] == tarfile.LNKTYPE


def test_diff_result_digests(tmp_path: Path) -> None:
    import hashlib

    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(b"abc")
    out = io.BytesIO()
    result = write_diff(out, upper=upper, compression=Compression.GZIP)
    blob = out.getvalue()
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.compressed_size == len(blob)
    target = tmp_path / "target"
    target.mkdir()
    applied = apply_layer(io.BytesIO(blob), target)
    assert applied.diff_id == result.diff_id
    assert applied.size == result.size


def test_overlay_redirect_is_unsupported(tmp_path: Path) -> None:
    from lamina.errors import UnimplementedError

    upper = tmp_path / "upper"
    (upper / "moved").mkdir(parents=True)
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/old")
    with pytest.raises(UnimplementedError):
        write_diff(io.BytesIO(), upper=upper, overlay_upper=True)


# ---------------------------------------------------------------- generated trees

NAMES = st.sampled_from(["a", "b", "c", "d"])
LEAVES = st.one_of(
    st.tuples(
        st.just("file"),
        st.binary(max_size=40),
        st.sampled_from([0o644, 0o755, 0o4750, 0o600]),
        st.sampled_from([0, 1000]),
        st.sampled_from([None, b"", b"v1", b"\xff\x00"]),
    ),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", "/etc/x", "c/d"])),
    st.tuples(st.just("fifo")),
    st.tuples(st.just("char"), st.sampled_from([(1, 3), (4, 64)])),
    st.tuples(st.just("link"), st.integers(0, 1)),
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.dictionaries(NAMES, children, max_size=3).map(lambda d: ("dir", d)),
    max_leaves=10,
)
ROOTS = st.dictionaries(NAMES, TREES, min_size=1, max_size=4)


def _materialize(root: Path, spec: dict[str, object], groups: dict[int, Path]) -> None:
    for name, entry in spec.items():
        path = root / name
        kind = entry[0]  # type: ignore[index]
        if kind == "dir":
            path.mkdir()
            _materialize(path, entry[1], groups)  # type: ignore[index]
        elif kind == "file":
            _, data, mode, uid, xattr = entry  # type: ignore[misc]
            path.write_bytes(data)
            os.chown(path, uid, uid)
            os.chmod(path, mode)
            if xattr is not None:
                os.setxattr(path, "user.k", xattr)
        elif kind == "symlink":
            path.symlink_to(entry[1])  # type: ignore[index]
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "char":
            major, minor = entry[1]  # type: ignore[index,misc]
            os.mknod(path, 0o640 | stat.S_IFCHR, os.makedev(major, minor))
        else:
            group = entry[1]  # type: ignore[index]
            if group in groups:
                os.link(groups[group], path)
            else:
                path.write_bytes(b"group %d" % group)
                groups[group] = path


def _fresh(base: Path, name: str) -> Path:
    path = base / name
    if path.exists():
        shutil.rmtree(path)
    return path


def _change(root: Path, data: st.DataObject) -> None:
    """Delete, replace, modify or add entries under ROOT as hypothesis chooses."""
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    for rel in paths:
        path = root / rel
        if not os.path.lexists(path):
            continue
        action = data.draw(
            st.sampled_from(["keep", "keep", "delete", "chmod", "rewrite", "relink"])
        )
        if action == "delete":
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        elif action == "chmod" and not path.is_symlink():
            os.chmod(path, 0o700)
        elif action == "rewrite" and path.is_file() and not path.is_symlink():
            path.write_bytes(data.draw(st.binary(max_size=30)))
        elif action == "relink" and path.is_file() and not path.is_symlink():
            os.link(path, path.with_name(path.name + "-hl"))
    extra = data.draw(st.dictionaries(st.sampled_from(["e", "f"]), TREES, max_size=2))
    _materialize(root, extra, {})


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), spec=ROOTS)
def test_generated_tree_diff_round_trip(
    tmp_path: Path, data: st.DataObject, spec: dict[str, object]
) -> None:
    lower = _fresh(tmp_path, "lower")
    lower.mkdir()
    _materialize(lower, spec, {})
    upper = _fresh(tmp_path, "upper")
    _copy_tree(lower, upper)
    _change(upper, data)

    layer = _diff_bytes(upper=upper, lower=lower, compression=Compression.NONE)
    target = _fresh(tmp_path, "target")
    _copy_tree(lower, target)
    apply_layer(io.BytesIO(layer), target)
    assert_trees_equal(upper, target)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), spec=ROOTS)
def test_generated_overlay_diff_round_trip(
    tmp_path: Path, data: st.DataObject, spec: dict[str, object]
) -> None:
    lower = _fresh(tmp_path, "lower")
    lower.mkdir()
    _materialize(lower, spec, {})
    ov = _fresh(tmp_path, "ov")
    with _overlay(lower, ov) as (merged, upper):
        _change(merged, data)
        expected = snapshot_tree(merged)

    layer = _diff_bytes(upper=upper, overlay_upper=True, compression=Compression.NONE)
    target = _fresh(tmp_path, "target")
    _copy_tree(lower, target)
    apply_layer(io.BytesIO(layer), target)
    assert_trees_equal(expected, target)
