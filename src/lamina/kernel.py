"""Kernel interfaces and feature probes for mounting.

This module wraps the mount system calls that Python's standard library
lacks (mount(2), umount2(2) and the file-descriptor based mount API of
Linux 5.2: fsopen, fsconfig, fsmount, move_mount) and probes, once per
process, which overlayfs features the running kernel offers. Every probe is
cached with `functools.cache`; call `cache_clear()` on a probe to run it
again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import platform
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Maximum number of lower layers of one overlay mount (OVL_MAX_STACK in the
# kernel's overlayfs sources).
MAX_OVERLAY_LOWERS = 500

# Maximum size of the data string of mount(2): the kernel copies one page.
MOUNT_DATA_MAX = os.sysconf("SC_PAGESIZE")

# Flags of mount(2), from <linux/mount.h>.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# Flags of umount2(2).
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Constants of the new mount API, from <linux/mount.h>.
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000
AT_FDCWD = -100

# fsconfig(2) rejects a string value of 256 bytes or more with EINVAL: the
# kernel copies it with strndup_user(value, 256) (fs/fsopen.c).
FSCONFIG_STRING_MAX = 256

# System call numbers of the new mount API. Since Linux 5.1 new system
# calls share one number on every architecture but alpha, so x86_64 and
# aarch64 agree (arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h).
_SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    machine: {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}
    for machine in ("x86_64", "aarch64", "arm64")
}

# The uid_map of the initial user namespace: all 2**32 - 1 ids map to themselves.
_IDENTITY_UID_MAP = ("0", "0", "4294967295")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def _fs_bytes(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _raise_errno(call: str, subject: object = None) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{call}: {os.strerror(code)}", None if subject is None else str(subject))


# ----------------------------------------------------------------------------
# mount(2) and umount2(2)


def sys_mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int,
    data: str | bytes | None,
) -> None:
    """Call mount(2); raise OSError with the errno on failure."""
    data_bytes = data.encode() if isinstance(data, str) else data
    result = _libc.mount(_fs_bytes(source), _fs_bytes(target), _fs_bytes(fstype), flags, data_bytes)
    if result != 0:
        _raise_errno("mount", target)


def sys_umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    """Call umount2(2); raise OSError with the errno on failure."""
    if _libc.umount2(_fs_bytes(target), flags) != 0:
        _raise_errno("umount2", target)


# ----------------------------------------------------------------------------
# The file-descriptor based mount API (Linux 5.2)


def _syscall_number(name: str) -> int:
    numbers = _SYSCALL_NUMBERS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"{name}: no system call number for {platform.machine()}")
    return numbers[name]


def fsopen(fstype: str) -> int:
    """Open a filesystem context for FSTYPE; return its file descriptor (close-on-exec)."""
    fd = _libc.syscall(
        ctypes.c_long(_syscall_number("fsopen")),
        ctypes.c_char_p(fstype.encode()),
        ctypes.c_uint(FSOPEN_CLOEXEC),
    )
    if fd < 0:
        _raise_errno("fsopen", fstype)
    return int(fd)


def fsconfig(
    fs_fd: int,
    command: int,
    key: str | None = None,
    value: str | None = None,
    aux: int = 0,
) -> None:
    """Set one parameter of a filesystem context, or run a command such as FSCONFIG_CMD_CREATE.

    VALUE is the string of FSCONFIG_SET_STRING; AUX is the file descriptor
    of FSCONFIG_SET_FD.
    """
    result = _libc.syscall(
        ctypes.c_long(_syscall_number("fsconfig")),
        ctypes.c_int(fs_fd),
        ctypes.c_uint(command),
        ctypes.c_char_p(None if key is None else key.encode()),
        ctypes.c_char_p(_fs_bytes(value)),
        ctypes.c_int(aux),
    )
    if result < 0:
        _raise_errno("fsconfig", key if key is not None else f"command {command}")


def fsmount(fs_fd: int, attr_flags: int) -> int:
    """Create a detached mount from a created filesystem context; return its descriptor."""
    fd = _libc.syscall(
        ctypes.c_long(_syscall_number("fsmount")),
        ctypes.c_int(fs_fd),
        ctypes.c_uint(FSMOUNT_CLOEXEC),
        ctypes.c_uint(attr_flags),
    )
    if fd < 0:
        _raise_errno("fsmount")
    return int(fd)


def move_mount(mount_fd: int, target: str | os.PathLike[str]) -> None:
    """Attach the detached mount MOUNT_FD at the path TARGET."""
    result = _libc.syscall(
        ctypes.c_long(_syscall_number("move_mount")),
        ctypes.c_int(mount_fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(_fs_bytes(target)),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    if result < 0:
        _raise_errno("move_mount", target)


def read_fs_context_log(fs_fd: int) -> list[str]:
    """Read the messages the kernel logged on a filesystem context, such as why create failed.

    Each message starts with "e " (error), "w " (warning) or "i " (information),
    as described in the kernel's Documentation/filesystems/mount_api.rst.
    """
    messages: list[str] = []
    while True:
        try:
            chunk = os.read(fs_fd, 4096)
        except OSError:
            # ENODATA marks an empty log.
            return messages
        if not chunk:
            return messages
        messages.append(chunk.decode(errors="replace").rstrip("\n"))


# ----------------------------------------------------------------------------
# Feature probes


def kernel_version() -> tuple[int, int]:
    """Return the running kernel's (major, minor) version, from uname(2)."""
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


@functools.cache
def overlay_supported() -> bool:
    """Return True when the kernel offers overlayfs, loading its module if needed.

    The kernel loads a filesystem's module on the first request for that
    filesystem type, so an fsopen("overlay") loads it without modprobe.
    """
    if _overlay_registered():
        return True
    try:
        os.close(fsopen("overlay"))
    except OSError as err:
        logger.debug("fsopen('overlay') failed while loading overlayfs: %s", err)
    return _overlay_registered()


def _overlay_registered() -> bool:
    if Path("/sys/module/overlay").exists():
        return True
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["overlay"] for line in text.splitlines())


@functools.cache
def overlay_has_index_param() -> bool:
    """Return True when overlayfs has the inodes index feature, so "index=off" is accepted.

    The index feature and its module parameter
    /sys/module/overlay/parameters/index arrived in Linux 4.13. The parameter
    shows in sysfs for a loadable module and a built-in one alike.
    """
    if not overlay_supported():
        return False
    return Path("/sys/module/overlay/parameters/index").exists()


def uid_map_is_identity(uid_map_text: str) -> bool:
    """Return True when the text of /proc/PID/uid_map is that of the initial user namespace."""
    lines = [line.split() for line in uid_map_text.splitlines() if line.strip()]
    return lines == [list(_IDENTITY_UID_MAP)]


@functools.cache
def overlay_needs_userxattr() -> bool:
    """Return True when overlayfs must keep its metadata in user.overlay.* xattrs.

    Writing trusted.* xattrs needs CAP_SYS_ADMIN in the initial user
    namespace. A process that is not root, or is root inside another user
    namespace, mounts overlayfs with "userxattr" (Linux 5.11) instead.
    """
    if os.geteuid() != 0:
        return True
    try:
        uid_map = Path("/proc/self/uid_map").read_text()
    except OSError:
        # Without /proc/self/uid_map the kernel has no user namespaces at all.
        return False
    return not uid_map_is_identity(uid_map)


@functools.cache
def mount_api_available() -> bool:
    """Return True when fsopen, fsconfig, fsmount and move_mount exist (Linux 5.2)."""
    try:
        os.close(fsopen("overlay"))
    except OSError as err:
        logger.debug("new mount API not available: %s", err)
        return False
    return True


@functools.cache
def overlay_accepts_lowerdir_append() -> bool:
    """Return True when overlayfs takes one lower layer per "lowerdir+" parameter (Linux 6.8).

    The probe creates a real overlay superblock of two empty lower
    directories and never attaches it anywhere. Probing beats comparing
    kernel versions because distributions backport features and
    unprivileged callers may lack the right to use them.
    """
    if not mount_api_available():
        return False
    with tempfile.TemporaryDirectory(prefix="lamina-probe-") as tmp:
        lowers = [Path(tmp, "lower1"), Path(tmp, "lower2")]
        for lower in lowers:
            lower.mkdir()

        fs_fd = fsopen("overlay")
        try:
            for lower in lowers:
                fsconfig(fs_fd, FSCONFIG_SET_STRING, "lowerdir+", str(lower))
            if overlay_needs_userxattr():
                fsconfig(fs_fd, FSCONFIG_SET_FLAG, "userxattr")
            fsconfig(fs_fd, FSCONFIG_CMD_CREATE)
        except OSError as err:
            logger.debug("overlayfs rejected 'lowerdir+': %s %s", err, read_fs_context_log(fs_fd))
            return False
        finally:
            os.close(fs_fd)
    return True


@functools.cache
def overlay_accepts_layer_fds() -> bool:
    """Return True when overlayfs takes layer directories as file descriptors (Linux 6.13).

    With FSCONFIG_SET_FD a layer path is not bound by the 256-byte limit
    of fsconfig strings. The probe creates an overlay superblock of two
    empty lower directories passed as O_PATH descriptors.
    """
    if not overlay_accepts_lowerdir_append():
        return False
    with tempfile.TemporaryDirectory(prefix="lamina-probe-") as tmp:
        fs_fd = fsopen("overlay")
        try:
            for name in ("lower1", "lower2"):
                lower = Path(tmp, name)
                lower.mkdir()
                dir_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    fsconfig(fs_fd, FSCONFIG_SET_FD, "lowerdir+", aux=dir_fd)
                finally:
                    os.close(dir_fd)
            if overlay_needs_userxattr():
                fsconfig(fs_fd, FSCONFIG_SET_FLAG, "userxattr")
            fsconfig(fs_fd, FSCONFIG_CMD_CREATE)
        except OSError as err:
            logger.debug("overlayfs rejected layer descriptors: %s", err)
            return False
        finally:
            os.close(fs_fd)
    return True


@functools.cache
def supports_new_mount_api() -> bool:
    """Return True when overlays can be built with fsopen/fsconfig and one "lowerdir+" per layer."""
    return mount_api_available() and overlay_accepts_lowerdir_append()
