"""Container root filesystems on an imported image, and read-only image mounts.

`prepare_rootfs` makes the writable root of a container: an Active
snapshot on the image's top snapshot, as containerd's CRI plugin does. A
container's writes land in that snapshot's own directory (the overlay
upper directory); the image's layers stay unchanged.

`mount_image` is `ctr images mount`: a View snapshot of the image, keyed
by the mount point, mounted read-only; `unmount_image` unmounts it and
removes the View.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lamina.drivers import LayerSnapshotter
from lamina.errors import FailedPreconditionError, NotFoundError
from lamina.images.manager import get_image
from lamina.mount import mount_all, unmount
from lamina.snapshots.types import Mount

log = logging.getLogger(__name__)

# Label recording, on a prepared root file system, the image it was made from.
IMAGE_LABEL = "lamina.io/image"
MOUNT_KEY_PREFIX = "images-mount "


def _image_top(sn: LayerSnapshotter, image: str, operation: str) -> str:
    record = get_image(sn, image, operation)
    if record.chain_id:
        try:
            sn.stat(record.chain_id)
        except NotFoundError:
            raise FailedPreconditionError(
                f"{operation} {image!r}: the image's top snapshot {record.chain_id} is missing; "
                "import the image again",
                subject=image,
            ) from None
    return record.chain_id


def prepare_rootfs(
    sn: LayerSnapshotter, image: str, key: str, *, mount: Path | None = None
) -> list[Mount]:
    """Create the Active snapshot KEY on IMAGE and return its mounts; mount them on MOUNT if given.

    If mounting fails, the snapshot is removed again.
    """
    parent = _image_top(sn, image, "rootfs prepare")
    mounts = sn.prepare(key, parent, {IMAGE_LABEL: image})
    if mount is not None:
        try:
            mount.mkdir(parents=True, exist_ok=True)
            mount_all(mounts, mount)
        except BaseException:
            sn.remove(key)
            raise
        log.info("prepared rootfs key=%r of image %s, mounted at path=%s", key, image, mount)
    return mounts


def mount_key(target: Path) -> str:
    """Return the key of the View snapshot behind a read-only image mount at TARGET."""
    return MOUNT_KEY_PREFIX + os.path.realpath(target)


def mount_image(sn: LayerSnapshotter, image: str, target: Path) -> str:
    """Mount IMAGE read-only on TARGET through a new View snapshot; return the View's key."""
    parent = _image_top(sn, image, "images mount")
    target.mkdir(parents=True, exist_ok=True)
    key = mount_key(target)
    mounts = sn.view(key, parent, {IMAGE_LABEL: image})
    try:
        # A View of one committed layer is a bind mount; read-only either way.
        mount_all([_read_only(m) for m in mounts], target)
    except BaseException:
        sn.remove(key)
        raise
    log.info("mounted image %s read-only at path=%s", image, target)
    return key


def _read_only(mount: Mount) -> Mount:
    if "ro" in mount.options:
        return mount
    options = (*(o for o in mount.options if o != "rw"), "ro")
    return Mount(mount.type, mount.source, options, mount.target)


def unmount_image(sn: LayerSnapshotter, target: Path) -> None:
    """Unmount the image mounted at TARGET and remove its View snapshot."""
    key = mount_key(target)
    try:
        sn.stat(key)
    except NotFoundError:
        raise NotFoundError(
            f"images unmount {str(target)!r}: no image is mounted there by lamina",
            subject=str(target),
        ) from None
    unmount(target)
    sn.remove(key)
    log.info("unmounted image at path=%s", target)
