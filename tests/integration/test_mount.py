"""Tests of lamina.mount on real bind and overlay mounts under tmp_path."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina import kernel
from lamina.errors import (
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
    UnavailableError,
)
from lamina.mount import (
    MountBusyError,
    NotMountedError,
    OverlayMethod,
    format_mount_command,
    is_mountpoint,
    mount_all,
    mounts_under,
    parse_mount_options,
    set_overlay_dir,
    shorten_overlay_data,
    split_overlay_dirs,
    temporary_mount,
    unmount,
    unmount_all,
)
from lamina.snapshots.types import Mount

OVERLAY_METHODS = [OverlayMethod.MOUNT_API, OverlayMethod.MOUNT_SYSCALL]
OVERLAY_METHOD_IDS = ["mount-api", "mount-syscall"]


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """Detach whatever a test left mounted under tmp_path, then fail the test for it."""
    yield
    leftovers = mounts_under(tmp_path)
    for point in leftovers:
        kernel.sys_umount2(point, kernel.MNT_DETACH)
    assert leftovers == []


def make_dir(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        (path / name).write_text(content)
    return path


def overlay(lowers: list[Path], upper: Path | None = None, work: Path | None = None) -> Mount:
    options = ["lowerdir=" + ":".join(str(lower) for lower in lowers)]
    if upper is not None and work is not None:
        options += [f"upperdir={upper}", f"workdir={work}"]
    if kernel.overlay_has_index_param():
        options.append("index=off")
    return Mount("overlay", "overlay", tuple(options))


def is_whiteout(path: Path) -> bool:
    info = os.lstat(path)
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


# ----------------------------------------------------------------------------
# Option handling


@pytest.mark.parametrize(
    ("options", "flags", "data"),
    [
        (("rbind", "ro"), kernel.MS_BIND | kernel.MS_REC | kernel.MS_RDONLY, ()),
        (("bind", "rw"), kernel.MS_BIND, ()),
        (("ro", "rw"), 0, ()),
        (("nosuid", "nodev", "noexec"), kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC, ()),
        (("noatime", "lowerdir=/a:/b"), kernel.MS_NOATIME, ("lowerdir=/a:/b",)),
        (("index=off", "userxattr", "sync"), kernel.MS_SYNCHRONOUS, ("index=off", "userxattr")),
    ],
    ids=["rbind-ro", "bind-rw", "rw-clears-ro", "security", "atime-and-data", "overlay-data"],
)
def test_parse_mount_options(options: tuple[str, ...], flags: int, data: tuple[str, ...]) -> None:
    parsed = parse_mount_options(options)

    assert parsed.flags == flags
    assert parsed.data == data


def test_parse_propagation_options() -> None:
    parsed = parse_mount_options(("rbind", "rprivate"))

    assert parsed.propagation == kernel.MS_PRIVATE | kernel.MS_REC
    assert parsed.data == ()


def test_split_overlay_dirs_escapes() -> None:
    assert split_overlay_dirs("/a:/b\\:c:/d\\\\e") == ["/a", "/b:c", "/d\\e"]
    assert split_overlay_dirs("/l1:/l2::/data") == ["/l1", "/l2", "", "/data"]


def test_shorten_overlay_data_common_parent() -> None:
    data = (
        "lowerdir=/root/snapshots/2/fs:/root/snapshots/1/fs",
        "upperdir=/root/snapshots/3/fs",
        "workdir=/root/snapshots/3/work",
        "index=off",
    )

    common, short = shorten_overlay_data(data)

    assert common == "/root/snapshots"
    assert short == "lowerdir=2/fs:1/fs,upperdir=3/fs,workdir=3/work,index=off"


def test_format_mount_command() -> None:
    mounts = [
        Mount(
            "overlay", "overlay", ("lowerdir=/s/2/fs:/s/1/fs", "upperdir=/s/3/fs", "workdir=/s/3/w")
        ),
        Mount("bind", "/s/1/fs", ("rbind", "ro")),
        Mount("bind", "/s/4 fs", ("rbind", "rw")),
    ]

    commands = format_mount_command(mounts, Path("/mnt/t"))

    assert commands == [
        "mount -t overlay -o lowerdir=/s/2/fs:/s/1/fs,upperdir=/s/3/fs,workdir=/s/3/w "
        "overlay /mnt/t",
        "mount --rbind -o ro /s/1/fs /mnt/t",
        "mount --rbind '/s/4 fs' /mnt/t",
    ]


# ----------------------------------------------------------------------------
# Bind mounts


def test_bind_rw(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source", {"a": "A"})
    target = make_dir(tmp_path / "target")

    mount_all([Mount("bind", str(source), ("rbind", "rw"))], target)
    try:
        assert is_mountpoint(target)
        assert (target / "a").read_text() == "A"
        (target / "b").write_text("B")
    finally:
        unmount(target)

    assert not is_mountpoint(target)
    assert (source / "b").read_text() == "B"
    assert not (target / "a").exists()


def test_bind_ro_rejects_writes(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source", {"a": "A"})
    target = make_dir(tmp_path / "target")

    mount_all([Mount("bind", str(source), ("rbind", "ro"))], target)
    try:
        assert (target / "a").read_text() == "A"
        with pytest.raises(OSError) as caught:
            (target / "b").write_text("B")
        assert caught.value.errno == errno.EROFS
    finally:
        unmount(target)

    assert not (source / "b").exists()


def test_bind_missing_source_raises_not_found(tmp_path: Path) -> None:
    target = make_dir(tmp_path / "target")

    with pytest.raises(NotFoundError):
        mount_all([Mount("bind", str(tmp_path / "missing"), ("rbind", "ro"))], target)

    assert not is_mountpoint(target)


def test_mount_all_undoes_on_failure(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source")
    target = make_dir(tmp_path / "target")
    mounts = [
        Mount("bind", str(source), ("rbind", "rw")),
        Mount("bind", str(tmp_path / "missing"), ("rbind", "rw")),
    ]

    with pytest.raises(NotFoundError):
        mount_all(mounts, target)

    assert mounts_under(target) == []


def test_stacked_mounts_unmount_all(tmp_path: Path) -> None:
    first = make_dir(tmp_path / "first", {"f": "1"})
    second = make_dir(tmp_path / "second", {"f": "2"})
    target = make_dir(tmp_path / "target")

    mount_all(
        [Mount("bind", str(first), ("rbind", "rw")), Mount("bind", str(second), ("rbind", "ro"))],
        target,
    )
    try:
        assert (target / "f").read_text() == "2"
        assert mounts_under(target) == [target, target]
    finally:
        unmount_all(target)

    assert mounts_under(target) == []


# ----------------------------------------------------------------------------
# Overlay mounts


@pytest.mark.parametrize("method", OVERLAY_METHODS, ids=OVERLAY_METHOD_IDS)
def test_overlay_one_lower_writes_to_upper(tmp_path: Path, method: OverlayMethod) -> None:
    lower = make_dir(tmp_path / "lower", {"kept": "lower", "deleted": "lower"})
    upper = make_dir(tmp_path / "upper")
    work = make_dir(tmp_path / "work")
    target = make_dir(tmp_path / "target")

    mount_all([overlay([lower], upper, work)], target, overlay_method=method)
    try:
        (target / "new").write_text("new")
        (target / "kept").write_text("changed")
        (target / "deleted").unlink()
        assert sorted(os.listdir(target)) == ["kept", "new"]
    finally:
        unmount(target)

    assert (upper / "new").read_text() == "new"
    assert (upper / "kept").read_text() == "changed"
    assert is_whiteout(upper / "deleted")
    assert (lower / "kept").read_text() == "lower"
    assert (lower / "deleted").read_text() == "lower"
    assert not (lower / "new").exists()


@pytest.mark.parametrize("method", OVERLAY_METHODS, ids=OVERLAY_METHOD_IDS)
def test_overlay_two_lowers_nearest_wins(tmp_path: Path, method: OverlayMethod) -> None:
    near = make_dir(tmp_path / "near", {"both": "near", "near-only": "n"})
    far = make_dir(tmp_path / "far", {"both": "far", "far-only": "f"})
    upper = make_dir(tmp_path / "upper")
    work = make_dir(tmp_path / "work")
    target = make_dir(tmp_path / "target")

    mount_all([overlay([near, far], upper, work)], target, overlay_method=method)
    try:
        assert (target / "both").read_text() == "near"
        assert (target / "near-only").read_text() == "n"
        assert (target / "far-only").read_text() == "f"
        (target / "far-only").unlink()
    finally:
        unmount(target)

    assert is_whiteout(upper / "far-only")
    assert (far / "far-only").exists()


@pytest.mark.parametrize("method", OVERLAY_METHODS, ids=OVERLAY_METHOD_IDS)
def test_overlay_lowers_only_is_read_only(tmp_path: Path, method: OverlayMethod) -> None:
    near = make_dir(tmp_path / "near", {"a": "near"})
    far = make_dir(tmp_path / "far", {"a": "far", "b": "far"})
    target = make_dir(tmp_path / "target")

    mount_all([overlay([near, far])], target, overlay_method=method)
    try:
        assert (target / "a").read_text() == "near"
        assert (target / "b").read_text() == "far"
        with pytest.raises(OSError) as caught:
            (target / "c").write_text("c")
        assert caught.value.errno == errno.EROFS
    finally:
        unmount(target)


@pytest.mark.parametrize("method", OVERLAY_METHODS, ids=OVERLAY_METHOD_IDS)
def test_overlay_missing_lower_raises_not_found(tmp_path: Path, method: OverlayMethod) -> None:
    lower = make_dir(tmp_path / "lower")
    target = make_dir(tmp_path / "target")
    mount = overlay([lower, tmp_path / "missing"])

    with pytest.raises(NotFoundError):
        mount_all([mount], target, overlay_method=method)

    assert not is_mountpoint(target)


def test_overlay_too_many_lowers_raises_invalid(tmp_path: Path) -> None:
    lowers = [tmp_path / str(i) for i in range(kernel.MAX_OVERLAY_LOWERS + 1)]
    target = make_dir(tmp_path / "target")

    with pytest.raises(InvalidArgumentError):
        mount_all([overlay(lowers)], target)


@pytest.mark.parametrize(
    "method",
    [OverlayMethod.AUTO, *OVERLAY_METHODS],
    ids=["auto", *OVERLAY_METHOD_IDS],
)
def test_overlay_500_lowers_longer_than_page(tmp_path: Path, method: OverlayMethod) -> None:
    # Long absolute paths push the lowerdir option far past one page of
    # mount(2) data; only "lowerdir+" or relative paths make it fit.
    layers_dir = tmp_path / ("long-directory-name-" * 10) / ("nested-" * 20) / "snapshots"
    count = kernel.MAX_OVERLAY_LOWERS
    lowers = []
    for i in range(count):
        files = {f"file{i}": str(i), "everywhere": str(i)}
        if i >= count // 2:
            files["far-half"] = str(i)
        lowers.append(make_dir(layers_dir / str(i) / "fs", files))
    upper = make_dir(layers_dir / "upper" / "fs")
    work = make_dir(layers_dir / "upper" / "work")
    target = make_dir(tmp_path / "target")
    mount = overlay(lowers, upper, work)
    assert len(",".join(mount.options)) > 50 * kernel.MOUNT_DATA_MAX
    assert len(str(lowers[0])) >= kernel.FSCONFIG_STRING_MAX

    cwd = os.getcwd()

    mount_all([mount], target, overlay_method=method)
    try:
        assert os.getcwd() == cwd
        names = set(os.listdir(target))
        assert {f"file{i}" for i in range(count)} <= names
        assert (target / f"file{count - 1}").read_text() == str(count - 1)
        assert (target / "everywhere").read_text() == "0"
        assert (target / "far-half").read_text() == str(count // 2)
        (target / "written").write_text("w")
    finally:
        unmount(target)

    assert (upper / "written").read_text() == "w"


def test_overlay_fallback_child_reports_error(tmp_path: Path) -> None:
    # The forked child's errno must come back as the usual error class.
    layers_dir = tmp_path / ("long-directory-name-" * 10) / ("nested-" * 20)
    lowers = [make_dir(layers_dir / str(i)) for i in range(20)]
    lowers.append(layers_dir / "missing")
    target = make_dir(tmp_path / "target")
    mount = overlay(lowers)
    assert len(",".join(mount.options)) > kernel.MOUNT_DATA_MAX
    cwd = os.getcwd()

    with pytest.raises(NotFoundError):
        mount_all([mount], target, overlay_method=OverlayMethod.MOUNT_SYSCALL)

    assert os.getcwd() == cwd
    assert not is_mountpoint(target)


@pytest.mark.parametrize("use_fd", [True, False], ids=["layer-fds", "proc-fd-links"])
def test_overlay_dirs_longer_than_fsconfig_string(tmp_path: Path, use_fd: bool) -> None:
    # fsconfig strings stop at 256 bytes; longer layer paths go by descriptor
    # or by a /proc/self/fd link.
    base = tmp_path / ("long-directory-name-" * 10) / ("nested-" * 20)
    near = make_dir(base / "near", {"a": "near"})
    far = make_dir(base / "far", {"a": "far", "b": "far"})
    upper = make_dir(base / "upper")
    work = make_dir(base / "work")
    target = make_dir(tmp_path / "target")
    assert len(str(near)) >= kernel.FSCONFIG_STRING_MAX

    fs_fd = kernel.fsopen("overlay")
    try:
        set_overlay_dir(fs_fd, "lowerdir+", str(near), use_fd=use_fd)
        set_overlay_dir(fs_fd, "lowerdir+", str(far), use_fd=use_fd)
        set_overlay_dir(fs_fd, "upperdir", str(upper), use_fd=use_fd)
        set_overlay_dir(fs_fd, "workdir", str(work), use_fd=use_fd)
        kernel.fsconfig(fs_fd, kernel.FSCONFIG_CMD_CREATE)
        mount_fd = kernel.fsmount(fs_fd, 0)
        try:
            kernel.move_mount(mount_fd, target)
        finally:
            os.close(mount_fd)
    finally:
        os.close(fs_fd)

    try:
        assert (target / "a").read_text() == "near"
        assert (target / "b").read_text() == "far"
        (target / "c").write_text("c")
    finally:
        unmount(target)

    assert (upper / "c").read_text() == "c"


# ----------------------------------------------------------------------------
# Unmounting


def test_unmount_busy_retries_then_raises(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source")
    target = make_dir(tmp_path / "target")
    mount_all([Mount("bind", str(source), ("rbind", "rw"))], target)
    process = subprocess.Popen(["sleep", "60"], cwd=target)
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            unmount(target, retries=4, delay=0.05)
        elapsed = time.monotonic() - started

        assert isinstance(caught.value, MountBusyError)
        assert caught.value.subject == str(target)
        assert elapsed >= 4 * 0.05
        assert is_mountpoint(target)
    finally:
        process.kill()
        process.wait()
        unmount(target)


def test_unmount_succeeds_once_no_longer_busy(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source")
    target = make_dir(tmp_path / "target")
    mount_all([Mount("bind", str(source), ("rbind", "rw"))], target)
    process = subprocess.Popen(["sleep", "60"], cwd=target)

    def end_process() -> None:
        process.kill()
        process.wait()

    timer = threading.Timer(0.2, end_process)
    timer.start()
    try:
        unmount(target, retries=100, delay=0.02)
        assert not is_mountpoint(target)
    finally:
        timer.join()
        if is_mountpoint(target):
            unmount(target)


def test_unmount_not_mounted_raises_not_mounted(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        unmount(tmp_path)

    assert isinstance(caught.value, NotMountedError)


def test_unmount_missing_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        unmount(tmp_path / "missing")


def test_unmount_all_missing_path_is_no_error(tmp_path: Path) -> None:
    unmount_all(tmp_path / "missing")


# ----------------------------------------------------------------------------
# Temporary mounts and the mount table


def test_temporary_mount_cleans_up(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source", {"a": "A"})
    parent = make_dir(tmp_path / "parent")

    with temporary_mount([Mount("bind", str(source), ("rbind", "ro"))], parent_dir=parent) as path:
        assert path.parent == parent
        assert is_mountpoint(path)
        assert (path / "a").read_text() == "A"

    assert not path.exists()
    assert list(parent.iterdir()) == []
    assert mounts_under(parent) == []


def test_temporary_mount_cleans_up_after_error(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source")
    parent = make_dir(tmp_path / "parent")
    mounted: list[Path] = []

    with (
        pytest.raises(RuntimeError),
        temporary_mount([Mount("bind", str(source), ("rbind", "ro"))], parent_dir=parent) as path,
    ):
        mounted.append(path)
        raise RuntimeError("body failed")

    assert len(mounted) == 1
    assert not mounted[0].exists()
    assert list(parent.iterdir()) == []


def test_temporary_mount_failed_mount_removes_dir(tmp_path: Path) -> None:
    parent = make_dir(tmp_path / "parent")

    with (
        pytest.raises(LaminaError),
        temporary_mount([Mount("bind", str(tmp_path / "missing"), ("rbind",))], parent_dir=parent),
    ):
        pass

    assert list(parent.iterdir()) == []


def test_mounts_under_names_with_spaces(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "source")
    outer = make_dir(tmp_path / "a dir")
    inner = make_dir(outer / "sub dir\twith tab")
    other = make_dir(tmp_path / "a dir2")

    mount_all([Mount("bind", str(source), ("rbind",))], outer)
    try:
        make_dir(inner)
        mount_all([Mount("bind", str(source), ("rbind",))], inner)
        try:
            mount_all([Mount("bind", str(source), ("rbind",))], other)
            try:
                assert mounts_under(outer) == [inner, outer]
                assert mounts_under(tmp_path) == [inner, other, outer]
                assert is_mountpoint(outer)
                assert is_mountpoint(inner)
                assert not is_mountpoint(tmp_path)
            finally:
                unmount(other)
        finally:
            unmount(inner)
    finally:
        unmount(outer)

    assert mounts_under(tmp_path) == []
