"""A container root filesystem on an imported image: a real process writes into it.

The command runs with chroot(8) inside the mounted Active snapshot of a
prepared root filesystem. Its write must land in that snapshot's own
(upper) directory and in no layer of the image.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import image_archive

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import AlreadyExistsError, NotFoundError
from lamina.images import import_image, mount_image, prepare_rootfs, unmount_image
from lamina.mount import is_mountpoint, unmount
from lamina.snapshots.types import Kind


@pytest.fixture
def store(lamina_root: Path) -> Iterator[LayerSnapshotter]:
    sn = open_snapshotter(lamina_root)
    yield sn
    sn.close()


@pytest.mark.parametrize("name", ["busybox", "debian"])
def test_chroot_write_lands_in_upper_only(
    store: LayerSnapshotter, tmp_path: Path, name: str
) -> None:
    result = import_image(store, image_archive(name, "oci"), name=name)
    rootfs = tmp_path / "rootfs"
    prepare_rootfs(store, name, "container-1", mount=rootfs)
    try:
        done = subprocess.run(
            ["chroot", str(rootfs), "/bin/sh", "-c", "echo hello > /written && cat /written"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        unmount(rootfs)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n"
    info = store.stat("container-1")
    assert info.kind is Kind.ACTIVE
    assert info.parent == result.chain_ids[-1]
    upper = store.snapshot_dirs("container-1").fs
    assert (upper / "written").read_text() == "hello\n"
    assert sorted(p.name for p in upper.iterdir()) == ["written"]
    for chain_id in result.chain_ids:
        assert not (store.snapshot_dirs(chain_id).fs / "written").exists()


def test_prepare_rootfs_errors(store: LayerSnapshotter) -> None:
    import_image(store, image_archive("busybox", "oci"), name="bb")
    prepare_rootfs(store, "bb", "c1")
    with pytest.raises(AlreadyExistsError):
        prepare_rootfs(store, "bb", "c1")
    with pytest.raises(NotFoundError):
        prepare_rootfs(store, "no-such-image", "c2")


def test_image_mount_is_read_only(store: LayerSnapshotter, tmp_path: Path) -> None:
    import_image(store, image_archive("busybox", "oci"), name="bb")
    target = tmp_path / "view"
    key = mount_image(store, "bb", target)
    try:
        assert is_mountpoint(target)
        assert store.stat(key).kind is Kind.VIEW
        assert (target / "bin" / "busybox").is_file()
        with pytest.raises(OSError):
            (target / "new-file").write_text("x")
    finally:
        unmount_image(store, target)
    assert not is_mountpoint(target)
    with pytest.raises(NotFoundError):
        store.stat(key)
    with pytest.raises(NotFoundError):
        unmount_image(store, target)
