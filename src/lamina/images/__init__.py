"""Container images: read OCI and docker archives, unpack them into snapshots.

`import_image` verifies an archive and unpacks its layers into committed
snapshots named by chain id; `prepare_rootfs` gives a container a writable
root on an imported image.
"""

from lamina.images.manager import (
    ImportResult,
    get_image,
    import_image,
    inspect_image,
    list_images,
    prune_images,
    remove_image,
)
from lamina.images.oci import Platform
from lamina.images.rootfs import mount_image, prepare_rootfs, unmount_image

__all__ = [
    "ImportResult",
    "Platform",
    "get_image",
    "import_image",
    "inspect_image",
    "list_images",
    "mount_image",
    "prepare_rootfs",
    "prune_images",
    "remove_image",
    "unmount_image",
]
