"""Tests of the kernel feature probes and system call wrappers, against the running kernel."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lamina import kernel

CLONE_NEWUSER = 0x10000000


def test_max_overlay_lowers_is_kernel_limit() -> None:
    assert kernel.MAX_OVERLAY_LOWERS == 500


@pytest.mark.parametrize(
    ("uid_map", "expected"),
    [
        ("         0          0 4294967295\n", True),
        ("0 0 4294967295", True),
        ("         0       1000          1\n", False),
        ("0 0 1\n", False),
        ("0 0 65536\n65536 100000 65536\n", False),
        ("", False),
    ],
    ids=["initial", "compact", "single-user", "root-only", "two-ranges", "empty"],
)
def test_uid_map_is_identity(uid_map: str, expected: bool) -> None:
    assert kernel.uid_map_is_identity(uid_map) is expected


def test_needs_userxattr_matches_process() -> None:
    uid_map = Path("/proc/self/uid_map").read_text()
    expected = os.geteuid() != 0 or not kernel.uid_map_is_identity(uid_map)

    assert kernel.overlay_needs_userxattr() is expected


def test_needs_userxattr_in_user_namespace() -> None:
    # Root of a new user namespace (euid 0, uid_map "0 0 1") is not real root.
    # A fresh interpreter, not a fork of this one: forking a process that
    # runs other threads (gRPC, for one) may leave the child stuck on a lock.
    code = f"""
import ctypes, os
from pathlib import Path
from lamina import kernel
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare({CLONE_NEWUSER}) != 0:
    raise SystemExit("unshare failed: " + os.strerror(ctypes.get_errno()))
Path("/proc/self/uid_map").write_text("0 {os.geteuid()} 1\\n")
print(os.geteuid(), kernel.overlay_needs_userxattr())
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]


def test_index_param_matches_sysfs() -> None:
    expected = Path("/sys/module/overlay/parameters/index").exists()

    assert kernel.overlay_has_index_param() is expected


def test_overlay_supported() -> None:
    assert kernel.overlay_supported() is True
    assert "overlay" in Path("/proc/filesystems").read_text()


def test_kernel_version_matches_uname() -> None:
    major, minor = kernel.kernel_version()

    assert os.uname().release.startswith(f"{major}.{minor}")


def test_new_mount_api_follows_kernel_version() -> None:
    # fsopen and friends arrived in Linux 5.2, overlayfs's "lowerdir+" in 6.8.
    version = kernel.kernel_version()

    assert kernel.mount_api_available() is (version >= (5, 2))
    assert kernel.overlay_accepts_lowerdir_append() is (version >= (6, 8))
    assert kernel.supports_new_mount_api() is (version >= (6, 8))


def test_probes_are_cached() -> None:
    kernel.overlay_accepts_lowerdir_append.cache_clear()

    first = kernel.overlay_accepts_lowerdir_append()
    second = kernel.overlay_accepts_lowerdir_append()

    assert first == second
    info = kernel.overlay_accepts_lowerdir_append.cache_info()
    assert info.misses == 1
    assert info.hits == 1


def test_fsopen_unknown_type_raises_enodev() -> None:
    with pytest.raises(OSError) as caught:
        kernel.fsopen("lamina-no-such-fs")

    assert caught.value.errno == errno.ENODEV


def test_fsconfig_unknown_option_logs_reason() -> None:
    fs_fd = kernel.fsopen("overlay")
    try:
        with pytest.raises(OSError) as caught:
            kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_STRING, "lamina_no_such_option", "1")
        log = kernel.read_fs_context_log(fs_fd)
    finally:
        os.close(fs_fd)

    assert caught.value.errno == errno.EINVAL
    assert log != []
    assert all(message[:2] in ("e ", "w ", "i ") for message in log)


def test_sys_umount2_of_plain_directory_raises_einval(tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught:
        kernel.sys_umount2(tmp_path)

    assert caught.value.errno == errno.EINVAL


def test_sys_mount_missing_source_raises_enoent(tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught:
        kernel.sys_mount(tmp_path / "missing", tmp_path, None, kernel.MS_BIND, None)

    assert caught.value.errno == errno.ENOENT
