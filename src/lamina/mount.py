"""Mounting and unmounting lists of `Mount`, temporary mounts and mount table queries.

A `Mount` carries fstab-style options, as containerd returns them: options
that name a mount flag (ro, nosuid, rbind, ...) become MS_* flags, and the
rest form the filesystem's data string, as util-linux's mount(8) does.

mount(2) copies at most one page of data, which overlay stacks of a few
dozen layers outgrow. Overlays therefore go through the new mount API,
adding one "lowerdir+" parameter per layer (Linux 6.8), when the kernel has
it. On older kernels the layer paths are rewritten relative to their
common parent and mount(2) runs in a forked child whose working directory
is that parent, which is how containerd's mount package shortens them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import re
import shlex
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lamina import kernel
from lamina.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from lamina.snapshots.types import Mount

logger = logging.getLogger(__name__)

# Default EBUSY retries of unmount: 50 tries 50 ms apart, as containerd's
# mount package does, so a mount stays busy for at most about 2.5 s.
UNMOUNT_RETRIES = 50
UNMOUNT_RETRY_DELAY = 0.05

_MOUNTINFO = Path("/proc/self/mountinfo")


class NotMountedError(InvalidArgumentError):
    """The path given to unmount is not a mount point."""


class MountBusyError(UnavailableError):
    """The mount is still in use (EBUSY) after every unmount retry."""


class OverlayMethod(enum.Enum):
    """Technique that `mount_all` uses to build an overlay mount."""

    AUTO = "auto"
    """MOUNT_API when the kernel has fsopen and overlay's "lowerdir+", else MOUNT_SYSCALL."""

    MOUNT_API = "mount-api"
    """fsopen, one fsconfig per option and layer, fsmount and move_mount (Linux 6.8)."""

    MOUNT_SYSCALL = "mount-syscall"
    """mount(2); a data string longer than a page is shortened in a forked child."""


# ----------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class _FlagOption:
    flag: int
    clear: bool = False


# Options that mount(8) turns into mount flags (util-linux's mount(8) man
# page, "FILESYSTEM-INDEPENDENT MOUNT OPTIONS"). Every other option is data.
_FLAG_OPTIONS: dict[str, _FlagOption] = {
    "defaults": _FlagOption(0),
    "ro": _FlagOption(kernel.MS_RDONLY),
    "rw": _FlagOption(kernel.MS_RDONLY, clear=True),
    "nosuid": _FlagOption(kernel.MS_NOSUID),
    "suid": _FlagOption(kernel.MS_NOSUID, clear=True),
    "nodev": _FlagOption(kernel.MS_NODEV),
    "dev": _FlagOption(kernel.MS_NODEV, clear=True),
    "noexec": _FlagOption(kernel.MS_NOEXEC),
    "exec": _FlagOption(kernel.MS_NOEXEC, clear=True),
    "sync": _FlagOption(kernel.MS_SYNCHRONOUS),
    "async": _FlagOption(kernel.MS_SYNCHRONOUS, clear=True),
    "dirsync": _FlagOption(kernel.MS_DIRSYNC),
    "remount": _FlagOption(kernel.MS_REMOUNT),
    "mand": _FlagOption(kernel.MS_MANDLOCK),
    "nomand": _FlagOption(kernel.MS_MANDLOCK, clear=True),
    "noatime": _FlagOption(kernel.MS_NOATIME),
    "atime": _FlagOption(kernel.MS_NOATIME, clear=True),
    "nodiratime": _FlagOption(kernel.MS_NODIRATIME),
    "diratime": _FlagOption(kernel.MS_NODIRATIME, clear=True),
    "relatime": _FlagOption(kernel.MS_RELATIME),
    "norelatime": _FlagOption(kernel.MS_RELATIME, clear=True),
    "strictatime": _FlagOption(kernel.MS_STRICTATIME),
    "nostrictatime": _FlagOption(kernel.MS_STRICTATIME, clear=True),
    "lazytime": _FlagOption(kernel.MS_LAZYTIME),
    "nolazytime": _FlagOption(kernel.MS_LAZYTIME, clear=True),
    "nosymfollow": _FlagOption(kernel.MS_NOSYMFOLLOW),
    "symfollow": _FlagOption(kernel.MS_NOSYMFOLLOW, clear=True),
    "silent": _FlagOption(kernel.MS_SILENT),
    "loud": _FlagOption(kernel.MS_SILENT, clear=True),
    "bind": _FlagOption(kernel.MS_BIND),
    "rbind": _FlagOption(kernel.MS_BIND | kernel.MS_REC),
}

# Propagation options need a mount(2) call of their own after the mount.
_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": kernel.MS_PRIVATE,
    "rprivate": kernel.MS_PRIVATE | kernel.MS_REC,
    "shared": kernel.MS_SHARED,
    "rshared": kernel.MS_SHARED | kernel.MS_REC,
    "slave": kernel.MS_SLAVE,
    "rslave": kernel.MS_SLAVE | kernel.MS_REC,
    "unbindable": kernel.MS_UNBINDABLE,
    "runbindable": kernel.MS_UNBINDABLE | kernel.MS_REC,
}

# Per-mount flags that a bind mount takes only through a second, remount call.
_BIND_REMOUNT_FLAGS = (
    kernel.MS_RDONLY
    | kernel.MS_NOSUID
    | kernel.MS_NODEV
    | kernel.MS_NOEXEC
    | kernel.MS_NOATIME
    | kernel.MS_NODIRATIME
    | kernel.MS_RELATIME
    | kernel.MS_STRICTATIME
    | kernel.MS_NOSYMFOLLOW
)

# Mount flags that belong to the superblock in the new mount API, by the
# fsconfig flag name that sets them.
_SUPERBLOCK_FLAGS: dict[int, str] = {
    kernel.MS_RDONLY: "ro",
    kernel.MS_SYNCHRONOUS: "sync",
    kernel.MS_DIRSYNC: "dirsync",
    kernel.MS_LAZYTIME: "lazytime",
    kernel.MS_MANDLOCK: "mand",
    kernel.MS_SILENT: "silent",
}

# Mount flags that belong to the mount in the new mount API, as MOUNT_ATTR_* bits.
_MOUNT_ATTRS: dict[int, int] = {
    kernel.MS_RDONLY: kernel.MOUNT_ATTR_RDONLY,
    kernel.MS_NOSUID: kernel.MOUNT_ATTR_NOSUID,
    kernel.MS_NODEV: kernel.MOUNT_ATTR_NODEV,
    kernel.MS_NOEXEC: kernel.MOUNT_ATTR_NOEXEC,
    kernel.MS_NOATIME: kernel.MOUNT_ATTR_NOATIME,
    kernel.MS_STRICTATIME: kernel.MOUNT_ATTR_STRICTATIME,
    kernel.MS_NODIRATIME: kernel.MOUNT_ATTR_NODIRATIME,
    kernel.MS_NOSYMFOLLOW: kernel.MOUNT_ATTR_NOSYMFOLLOW,
}


@dataclass(frozen=True)
class MountOptions:
    """Mount options split as mount(8) does: flags, propagation flags and data options."""

    flags: int = 0
    propagation: int = 0
    data: tuple[str, ...] = field(default=())

    @property
    def data_string(self) -> str:
        """The comma-joined data options, as mount(2) takes them."""
        return ",".join(self.data)


def parse_mount_options(options: Sequence[str]) -> MountOptions:
    """Split fstab-style options into MS_* flags, propagation flags and data options."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for option in options:
        flag_option = _FLAG_OPTIONS.get(option)
        if flag_option is not None:
            if flag_option.clear:
                flags &= ~flag_option.flag
            else:
                flags |= flag_option.flag
        elif option in _PROPAGATION_OPTIONS:
            propagation |= _PROPAGATION_OPTIONS[option]
        else:
            data.append(option)
    return MountOptions(flags, propagation, tuple(data))


def split_overlay_dirs(value: str) -> list[str]:
    """Split an overlay lowerdir value at unescaped colons and remove the escapes.

    overlayfs lets a backslash escape a colon or a backslash inside a layer
    path. An empty entry, from "::", separates the data-only layers (Linux 6.5).
    """
    if "\\" not in value:
        return value.split(":")
    dirs: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            dirs.append("".join(current))
            current = []
        else:
            current.append(char)
    dirs.append("".join(current))
    return dirs


def escape_overlay_dir(path: str) -> str:
    """Escape a layer path for a colon-separated overlay lowerdir value."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


# ----------------------------------------------------------------------------
# Errors


def _mount_error(
    action: str, target: Path, err: OSError, kernel_log: Sequence[str] = ()
) -> LaminaError:
    """Build the Lamina error for a failed mount call, with what to check next."""
    code = err.errno or errno.EIO
    reason = os.strerror(code)
    if kernel_log:
        reason += " (kernel: " + "; ".join(kernel_log) + ")"

    error_class: type[LaminaError]
    if code == errno.ENOENT:
        error_class = NotFoundError
        hint = "check that the source, every layer directory and the target exist"
    elif code == errno.EBUSY:
        error_class = UnavailableError
        hint = "check that no other overlay uses the same upperdir or workdir"
    elif code in (errno.EPERM, errno.EACCES):
        error_class = FailedPreconditionError
        hint = "mounting needs CAP_SYS_ADMIN; run as root"
    elif code == errno.ENODEV:
        error_class = UnimplementedError
        hint = "check that the kernel supports this filesystem type (/proc/filesystems)"
    elif code in (errno.EINVAL, errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.E2BIG):
        error_class = InvalidArgumentError
        hint = "check the mount options; the kernel log (dmesg) states what overlayfs rejected"
    else:
        error_class = InternalError
        hint = "check the kernel log (dmesg)"
    return error_class(f"{action} on '{target}' failed: {reason}; {hint}", subject=str(target))


# ----------------------------------------------------------------------------
# Mounting


def mount_all(
    mounts: Sequence[Mount],
    target: Path,
    *,
    overlay_method: OverlayMethod = OverlayMethod.AUTO,
) -> None:
    """Mount every Mount at TARGET, in order, stacking them when several share a target.

    A Mount with a non-empty `target` field is mounted at that path below
    TARGET. When one mount fails, the ones made before it are unmounted
    again before the error is raised.
    """
    target = Path(os.path.abspath(target))
    done: list[Path] = []
    try:
        for mount in mounts:
            mount_target = target / mount.target.lstrip("/") if mount.target else target
            mount_one(mount, mount_target, overlay_method=overlay_method)
            done.append(mount_target)
    except BaseException:
        for mount_target in reversed(done):
            try:
                unmount(mount_target)
            except LaminaError as err:
                logger.warning("undoing mount at %s failed: %s", mount_target, err)
        raise


def mount_one(
    mount: Mount,
    target: Path,
    *,
    overlay_method: OverlayMethod = OverlayMethod.AUTO,
) -> None:
    """Mount one Mount at TARGET; raise a LaminaError naming the type, target and cause."""
    options = parse_mount_options(mount.options)
    if "loop" in options.data:
        raise UnimplementedError(
            f"mount {mount.type} on '{target}': the 'loop' option is not supported; "
            "attach the image to a loop device first and mount the device",
            subject=str(target),
        )
    logger.debug(
        "mounting %s %s on %s with options %s", mount.type, mount.source, target, mount.options
    )

    if mount.type == "bind" or options.flags & kernel.MS_BIND:
        _mount_bind(mount, target, options)
    elif mount.type == "overlay":
        _mount_overlay(mount, target, options, overlay_method)
    else:
        try:
            kernel.sys_mount(mount.source, target, mount.type, options.flags, options.data_string)
        except OSError as err:
            raise _mount_error(f"mount {mount.type}", target, err) from err

    if options.propagation:
        try:
            kernel.sys_mount(None, target, None, options.propagation, None)
        except OSError as err:
            raise _mount_error(f"set propagation of {mount.type}", target, err) from err


def _mount_bind(mount: Mount, target: Path, options: MountOptions) -> None:
    # A bind mount ignores every flag but MS_BIND and MS_REC, so read-only and
    # the other per-mount flags need a remount of the new mount (mount(2),
    # "Creating a bind mount").
    # NOTE: the remount changes only the top mount, so with "rbind" and "ro"
    # the submounts of the source stay writable.
    bind_flags = kernel.MS_BIND | (options.flags & kernel.MS_REC)
    try:
        kernel.sys_mount(mount.source, target, None, bind_flags, None)
    except OSError as err:
        raise _mount_error(f"bind mount of '{mount.source}'", target, err) from err

    remount_flags = options.flags & _BIND_REMOUNT_FLAGS
    if not remount_flags:
        return
    try:
        kernel.sys_mount(
            None, target, None, kernel.MS_REMOUNT | kernel.MS_BIND | remount_flags, None
        )
    except OSError as err:
        with contextlib.suppress(OSError):
            kernel.sys_umount2(target)
        raise _mount_error(f"remount of bind mount of '{mount.source}'", target, err) from err


def _mount_overlay(
    mount: Mount, target: Path, options: MountOptions, method: OverlayMethod
) -> None:
    lowers = [
        d
        for option in options.data
        if option.startswith("lowerdir=")
        for d in split_overlay_dirs(option.removeprefix("lowerdir="))
        if d
    ]
    if len(lowers) > kernel.MAX_OVERLAY_LOWERS:
        raise InvalidArgumentError(
            f"mount overlay on '{target}': {len(lowers)} lower layers exceed the kernel's "
            f"maximum of {kernel.MAX_OVERLAY_LOWERS}",
            subject=str(target),
        )

    if method is OverlayMethod.AUTO:
        use_api = kernel.supports_new_mount_api()
        method = OverlayMethod.MOUNT_API if use_api else OverlayMethod.MOUNT_SYSCALL
    if method is OverlayMethod.MOUNT_API:
        _mount_overlay_with_api(mount, target, options)
    else:
        _mount_overlay_with_syscall(mount, target, options)


def _mount_overlay_with_api(mount: Mount, target: Path, options: MountOptions) -> None:
    """Mount an overlay through fsopen and fsconfig, one "lowerdir+" per layer."""
    try:
        fs_fd = kernel.fsopen("overlay")
    except OSError as err:
        raise _mount_error("mount overlay", target, err) from err
    try:
        _configure_overlay(fs_fd, mount, options)
        kernel.fsconfig(fs_fd, kernel.FSCONFIG_CMD_CREATE)
        mount_fd = kernel.fsmount(fs_fd, _mount_attrs(options.flags))
        try:
            kernel.move_mount(mount_fd, target)
        finally:
            os.close(mount_fd)
    except OSError as err:
        kernel_log = kernel.read_fs_context_log(fs_fd)
        raise _mount_error("mount overlay", target, err, kernel_log) from err
    finally:
        os.close(fs_fd)


def _configure_overlay(fs_fd: int, mount: Mount, options: MountOptions) -> None:
    kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_STRING, "source", mount.source or "overlay")
    for flag, name in _SUPERBLOCK_FLAGS.items():
        if options.flags & flag:
            kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_FLAG, name)

    for option in options.data:
        key, has_value, value = option.partition("=")
        if key == "lowerdir":
            # Layers after an empty entry ("::") are data-only layers.
            layer_key = "lowerdir+"
            for layer in split_overlay_dirs(value):
                if not layer:
                    layer_key = "datadir+"
                    continue
                set_overlay_dir(fs_fd, layer_key, layer)
        elif key in ("upperdir", "workdir"):
            set_overlay_dir(fs_fd, key, value)
        elif has_value:
            kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_STRING, key, value)
        else:
            kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_FLAG, key)


def set_overlay_dir(fs_fd: int, key: str, path: str, *, use_fd: bool | None = None) -> None:
    """Set an overlay directory parameter (lowerdir+, datadir+, upperdir, workdir) by fsconfig.

    A path of FSCONFIG_STRING_MAX bytes or more does not fit in an fsconfig
    string. Such a path is passed as an O_PATH descriptor (Linux 6.13) by
    default. When USE_FD is False, or the kernel lacks descriptor support,
    it is passed as the short /proc/self/fd/N link to the same directory.
    """
    if len(os.fsencode(path)) < kernel.FSCONFIG_STRING_MAX:
        kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_STRING, key, path)
        return

    if use_fd is None:
        use_fd = kernel.overlay_accepts_layer_fds()
    dir_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if use_fd:
            kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_FD, key, aux=dir_fd)
        else:
            # overlayfs resolves the path while fsconfig runs, so the
            # descriptor may be closed right after.
            kernel.fsconfig(fs_fd, kernel.FSCONFIG_SET_STRING, key, f"/proc/self/fd/{dir_fd}")
    finally:
        os.close(dir_fd)


def _mount_attrs(flags: int) -> int:
    attrs = 0
    for flag, attr in _MOUNT_ATTRS.items():
        if flags & flag:
            attrs |= attr
    return attrs


def _mount_overlay_with_syscall(mount: Mount, target: Path, options: MountOptions) -> None:
    """Mount an overlay with mount(2), shortening a data string longer than one page."""
    data = options.data_string
    flags = options.flags
    if len(os.fsencode(data)) < kernel.MOUNT_DATA_MAX:
        try:
            kernel.sys_mount(mount.source, target, "overlay", flags, data)
        except OSError as err:
            raise _mount_error("mount overlay", target, err) from err
        return

    workdir, short_data = shorten_overlay_data(options.data)
    if len(os.fsencode(short_data)) >= kernel.MOUNT_DATA_MAX:
        raise InvalidArgumentError(
            f"mount overlay on '{target}': the options take {len(short_data)} bytes even with "
            f"paths relative to '{workdir}', more than mount(2) accepts "
            f"({kernel.MOUNT_DATA_MAX - 1}); use Linux 6.8 or later, or a shorter root directory",
            subject=str(target),
        )
    logger.debug("mounting overlay on %s from a child process in %s", target, workdir)
    try:
        _mount_in_child(workdir, mount.source, target, "overlay", flags, short_data)
    except OSError as err:
        raise _mount_error("mount overlay", target, err) from err


def shorten_overlay_data(data: Sequence[str]) -> tuple[str, str]:
    """Rewrite the layer paths of overlay data options relative to their common parent.

    Returns the common parent and the new data string. The lowerdir,
    upperdir and workdir values are rewritten; other options are kept as given.
    """
    dir_keys = ("lowerdir", "upperdir", "workdir")
    paths: list[str] = []
    for option in data:
        key, _, value = option.partition("=")
        if key in dir_keys:
            paths.extend(os.path.abspath(d) for d in split_overlay_dirs(value) if d)
    if not paths:
        return "/", ",".join(data)
    common = os.path.commonpath(paths)

    rewritten: list[str] = []
    for option in data:
        key, _, value = option.partition("=")
        if key in dir_keys:
            dirs = [
                escape_overlay_dir(os.path.relpath(os.path.abspath(d), common)) if d else ""
                for d in split_overlay_dirs(value)
            ]
            rewritten.append(f"{key}={':'.join(dirs)}")
        else:
            rewritten.append(option)
    return common, ",".join(rewritten)


def _mount_in_child(
    workdir: str, source: str | None, target: Path, fstype: str, flags: int, data: str
) -> None:
    """Run mount(2) in a forked child whose working directory is WORKDIR.

    The working directory belongs to the whole process, so the parent never
    changes its own. The child sends the errno (0 for success) back over a pipe.
    """
    target = Path(os.path.abspath(target))
    read_fd, write_fd = os.pipe()

    pid = os.fork()
    if pid == 0:
        # NOTE: the child inherits the locks of the parent's other threads, so
        # it does only chdir, mount and write, and it must end in os._exit.
        result = errno.EIO
        try:
            os.close(read_fd)
            os.chdir(workdir)
            kernel.sys_mount(source, target, fstype, flags, data)
            result = 0
        except OSError as err:
            result = err.errno or errno.EIO
        finally:
            try:
                os.write(write_fd, result.to_bytes(4, "little"))
            finally:
                os._exit(0)

    os.close(write_fd)
    try:
        reply = b""
        while len(reply) < 4:
            chunk = os.read(read_fd, 4 - len(reply))
            if not chunk:
                break
            reply += chunk
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    if len(reply) != 4:
        raise OSError(errno.EIO, "mount child process exited without a result")
    code = int.from_bytes(reply, "little")
    if code:
        raise OSError(code, os.strerror(code), str(target))


# ----------------------------------------------------------------------------
# Unmounting


def unmount(
    target: Path,
    *,
    retries: int = UNMOUNT_RETRIES,
    delay: float = UNMOUNT_RETRY_DELAY,
) -> None:
    """Unmount the top mount at TARGET, retrying up to RETRIES times while it is busy.

    Raises MountBusyError when the mount is still busy after the last retry,
    NotMountedError when TARGET is not a mount point and NotFoundError when
    it does not exist.
    """
    for attempt in range(retries + 1):
        try:
            kernel.sys_umount2(target)
        except OSError as err:
            if err.errno == errno.EBUSY and attempt < retries:
                time.sleep(delay)
                continue
            raise _unmount_error(target, err, attempt + 1) from err
        logger.debug("unmounted %s", target)
        return


def _unmount_error(target: Path, err: OSError, attempts: int) -> LaminaError:
    if err.errno == errno.EBUSY:
        return MountBusyError(
            f"unmount '{target}': still busy after {attempts} attempts; "
            "check for processes with open files or a working directory inside it (fuser -m)",
            subject=str(target),
        )
    if err.errno == errno.EINVAL:
        return NotMountedError(f"unmount '{target}': not a mount point", subject=str(target))
    if err.errno == errno.ENOENT:
        return NotFoundError(f"unmount '{target}': no such file or directory", subject=str(target))
    if err.errno == errno.EPERM:
        return FailedPreconditionError(
            f"unmount '{target}': operation not permitted; unmounting needs CAP_SYS_ADMIN",
            subject=str(target),
        )
    return InternalError(
        f"unmount '{target}' failed: {os.strerror(err.errno or errno.EIO)}", subject=str(target)
    )


def unmount_all(
    target: Path,
    *,
    retries: int = UNMOUNT_RETRIES,
    delay: float = UNMOUNT_RETRY_DELAY,
) -> None:
    """Unmount every mount at or below TARGET, deepest first; a missing TARGET is no error."""
    for mount_point in mounts_under(target):
        unmount(mount_point, retries=retries, delay=delay)


@contextlib.contextmanager
def temporary_mount(
    mounts: Sequence[Mount],
    *,
    parent_dir: Path | None = None,
    overlay_method: OverlayMethod = OverlayMethod.AUTO,
) -> Iterator[Path]:
    """Mount MOUNTS on a new temporary directory and yield its path.

    On exit, also after an exception, everything mounted below the directory
    is unmounted and the directory removed. When unmounting fails the
    directory stays and the unmount error is raised.
    """
    path = Path(tempfile.mkdtemp(prefix="lamina-mount-", dir=parent_dir))
    try:
        mount_all(mounts, path, overlay_method=overlay_method)
        yield path
    finally:
        unmount_all(path)
        path.rmdir()


# ----------------------------------------------------------------------------
# The mount table

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _decode_mountinfo_path(field_bytes: bytes) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo octal
    # (show_mountinfo and mangle() in fs/proc_namespace.c).
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field_bytes)
    return os.fsdecode(raw)


def read_mount_points() -> list[Path]:
    """Return the mount point of every mount in this mount namespace, in mount table order."""
    points: list[Path] = []
    for line in _MOUNTINFO.read_bytes().splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            points.append(Path(_decode_mountinfo_path(fields[4])))
    return points


def mounts_under(path: Path) -> list[Path]:
    """Return the mount points at or below PATH, deepest first.

    A path on which several mounts are stacked appears once per mount, the
    topmost first, so unmounting the list in order removes everything.
    """
    root = Path(os.path.realpath(path))
    found = [
        (index, point)
        for index, point in enumerate(read_mount_points())
        if point.is_relative_to(root)
    ]
    found.sort(key=lambda item: (len(item[1].parts), item[0]), reverse=True)
    return [point for _, point in found]


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_point: str
    device: str
    root: str
    fstype: str
    super_options: tuple[str, ...]

    def overlay_dirs(self) -> list[str]:
        """Return the upper, work and lower directories of an overlay mount."""
        if self.fstype != "overlay":
            return []
        found: list[str] = []
        for option in self.super_options:
            name, _, value = option.partition("=")
            if name in ("upperdir", "workdir"):
                found.append(value)
            elif name in ("lowerdir", "lowerdir+", "datadir+"):
                found.extend(split_overlay_dirs(value))
        return found


def read_mount_table() -> list[MountEntry]:
    """Return every mount of this mount namespace, in mount table order."""
    entries: list[MountEntry] = []
    for line in _MOUNTINFO.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 4:
            continue
        entries.append(
            MountEntry(
                mount_point=_decode_mountinfo_path(fields[4]),
                device=os.fsdecode(fields[2]),
                root=_decode_mountinfo_path(fields[3]),
                fstype=os.fsdecode(fields[separator + 1]),
                super_options=tuple(
                    _decode_mountinfo_path(option)
                    for option in fields[separator + 3].split(b",")
                ),
            )
        )
    return entries


def _inside(path: str, directory: str) -> bool:
    return path == directory or os.path.commonpath([path, directory]) == directory


def _filesystem_path(table: Sequence[MountEntry], path: str) -> tuple[str, str] | None:
    """Return (device, path inside that filesystem) of the absolute PATH."""
    best: MountEntry | None = None
    for entry in table:
        if _inside(path, entry.mount_point) and (
            best is None or len(entry.mount_point) >= len(best.mount_point)
        ):
            best = entry
    if best is None:
        return None
    rest = os.path.relpath(path, best.mount_point)
    inner = best.root if rest == "." else os.path.join(best.root, rest)
    return best.device, os.path.normpath(inner)


def mounts_using(directory: Path) -> list[str]:
    """Return the mount points of mounts that use DIRECTORY or anything below it.

    That is an overlay with a layer, upper or work directory inside it, or a
    bind mount of it or of a directory inside it.
    """
    top = os.path.realpath(directory)
    table = read_mount_table()
    located = _filesystem_path(table, top)
    found: list[str] = []
    for entry in table:
        if any(_inside(layer, top) for layer in entry.overlay_dirs()) or (
            located is not None
            and entry.device == located[0]
            and entry.fstype != "overlay"
            and _inside(entry.root, located[1])
            and not _inside(top, entry.mount_point)
        ):
            found.append(entry.mount_point)
    return found


def sources_of_mount(target: Path) -> list[str]:
    """Return the host directories the topmost mount at TARGET shows.

    For an overlay: its layer, upper and work directories; for any other
    mount: the directory it shows, found through another mount of the same
    filesystem. Empty when nothing is mounted at TARGET.
    """
    point = os.path.realpath(target)
    table = read_mount_table()
    mounted = [entry for entry in table if entry.mount_point == point]
    if not mounted:
        return []
    top = mounted[-1]
    if top.fstype == "overlay":
        return top.overlay_dirs()
    for entry in table:
        if (
            entry.device == top.device
            and entry is not top
            and _inside(top.root, entry.root)
            and entry.mount_point != point
        ):
            rest = os.path.relpath(top.root, entry.root)
            return [os.path.normpath(os.path.join(entry.mount_point, rest))]
    return []


def is_mountpoint(path: Path) -> bool:
    """Return True when a mount is attached at PATH (a bind mount of a directory counts)."""
    return Path(os.path.realpath(path)) in set(read_mount_points())


# ----------------------------------------------------------------------------
# Shell commands


def format_mount_command(mounts: Sequence[Mount], target: Path | str) -> list[str]:
    """Return the mount(8) command line, shell-quoted, that makes each Mount at TARGET."""
    commands: list[str] = []
    for mount in mounts:
        mount_target = str(target)
        if mount.target:
            mount_target = os.path.join(mount_target, mount.target.lstrip("/"))
        options = parse_mount_options(mount.options)
        words = ["mount"]

        if mount.type == "bind" or options.flags & kernel.MS_BIND:
            words.append("--rbind" if options.flags & kernel.MS_REC else "--bind")
            rest = [o for o in mount.options if o not in ("bind", "rbind", "rw")]
        else:
            words += ["-t", mount.type]
            rest = list(mount.options)
        if rest:
            words += ["-o", ",".join(rest)]

        words += [mount.source or "none", mount_target]
        commands.append(shlex.join(words))
    return commands
