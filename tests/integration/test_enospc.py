"""A full disk: operations fail with NoSpaceError, change nothing, and work once space is freed.

The root lives on a 16 MiB ext4 filesystem in a file, loop-mounted under
tmp_path (made with `-m 0`, so that root gets no reserved blocks and "full"
means full). A filler file takes the free space down to the last byte;
removing it frees the space again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import CODES, NoSpaceError, NotFoundError
from lamina.fsck import check
from lamina.images.manager import import_image
from lamina.metadata import images as image_records
from lamina.mount import is_mountpoint, mounts_under, unmount
from lamina.snapshots.types import Info, Kind

BUSYBOX_ARCHIVE = Path.home() / ".cache" / "lamina-images" / "busybox.oci.tar"
DRIVERS = ["overlay", "native"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A freshly made 16 MiB ext4 filesystem, mounted; unmounted afterwards."""
    image = tmp_path / "fs.img"
    with image.open("wb") as handle:
        handle.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        for point in mounts_under(mount_point):
            unmount(point)


@pytest.fixture(params=DRIVERS)
def sn(request: pytest.FixtureRequest, small_fs: Path) -> Iterator[LayerSnapshotter]:
    snapshotter = open_snapshotter(small_fs / "root", request.param)
    try:
        yield snapshotter
    finally:
        snapshotter.close()


def fill(directory: Path) -> Path:
    """Write a file that takes every free byte of DIRECTORY's filesystem; return its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Big writes first, then smaller ones to fill the last partial blocks.
        for chunk in (1 << 20, 65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def assert_consistent(sn: LayerSnapshotter) -> None:
    """Cleanup leaves nothing behind and fsck finds nothing."""
    sn.cleanup()
    assert check(sn) == []
    leftovers = [p.name for p in sn.snapshots_dir.iterdir() if not p.name.isdigit()]
    assert leftovers == []


def committed_with(sn: LayerSnapshotter, name: str, size: int) -> None:
    sn.prepare(f"{name}-active")
    (sn.snapshot_dirs(f"{name}-active").fs / "data").write_bytes(os.urandom(size))
    sn.commit(name, f"{name}-active")


# ---------------------------------------------------------------- creating snapshots


def test_prepare_on_full_disk(sn: LayerSnapshotter, small_fs: Path) -> None:
    committed_with(sn, "base", 4096)
    filler = fill(small_fs)

    with pytest.raises(NoSpaceError):
        sn.prepare("new", "base")
    with pytest.raises(NoSpaceError):
        sn.view("look", "base")

    for key in ("new", "look"):
        with pytest.raises(NotFoundError):
            sn.stat(key)
    assert_consistent(sn)

    filler.unlink()
    sn.prepare("new", "base")
    sn.view("look", "base")
    assert sn.stat("new").kind is Kind.ACTIVE
    assert_consistent(sn)


def test_native_copy_runs_out_of_space(small_fs: Path) -> None:
    # A native snapshot copies its parent's tree: 5 MiB per child on a
    # 14 MiB filesystem, so the third child fails halfway through its copy.
    sn = open_snapshotter(small_fs / "root", "native")
    try:
        committed_with(sn, "base", 5 << 20)
        made: list[str] = []
        with pytest.raises(NoSpaceError):
            for n in range(10):
                sn.prepare(f"child-{n}", "base")
                made.append(f"child-{n}")

        assert 1 <= len(made) < 3
        failed = f"child-{len(made)}"
        with pytest.raises(NotFoundError):
            sn.stat(failed)
        assert_consistent(sn)

        sn.remove(made[-1])
        sn.cleanup()
        sn.prepare(failed, "base")
        assert (sn.snapshot_dirs(failed).fs / "data").stat().st_size == 5 << 20
        assert_consistent(sn)
    finally:
        sn.close()


# ---------------------------------------------------------------- commit and metadata


def test_commit_after_writes_fill_disk(sn: LayerSnapshotter, small_fs: Path) -> None:
    sn.prepare("work")
    fs = sn.snapshot_dirs("work").fs
    # The writes inside the snapshot hit ENOSPC themselves: that error is
    # the writer's, not Lamina's.
    with pytest.raises(OSError), (fs / "big").open("wb") as handle:
        while True:
            handle.write(b"\1" * 65536)
            handle.flush()
    filler = fill(small_fs)
    # Labels big enough that the commit must grow the database.
    labels = {f"containerd.io/snapshot/l{n}": "v" * 4000 for n in range(40)}

    with pytest.raises(NoSpaceError):
        sn.commit("done", "work", labels=labels)

    assert sn.stat("work").kind is Kind.ACTIVE
    with pytest.raises(NotFoundError):
        sn.stat("done")
    assert_consistent(sn)

    filler.unlink()
    os.truncate(fs / "big", (fs / "big").stat().st_size // 2)
    sn.commit("done", "work", labels=labels)

    assert sn.stat("done").kind is Kind.COMMITTED
    assert sn.stat("done").labels == labels
    assert sn.usage("done").size >= (fs / "big").stat().st_blocks * 512
    assert_consistent(sn)


def test_label_update_on_full_disk(sn: LayerSnapshotter, small_fs: Path) -> None:
    committed_with(sn, "base", 4096)
    before = sn.stat("base")
    filler = fill(small_fs)
    labels = {f"l{n}": "v" * 4000 for n in range(40)}
    request = Info(name="base", kind=Kind.COMMITTED, labels=labels)

    with pytest.raises(NoSpaceError):
        sn.update(request, "labels")

    assert sn.stat("base") == before
    assert_consistent(sn)

    filler.unlink()
    assert sn.update(request, "labels").labels == labels


def test_remove_on_full_disk(sn: LayerSnapshotter, small_fs: Path) -> None:
    # Removing a snapshot still writes to the database, whose write-ahead
    # log needs space to grow; on a full disk the removal fails cleanly.
    committed_with(sn, "base", 2 << 20)
    filler = fill(small_fs)

    with pytest.raises(NoSpaceError):
        sn.remove("base")

    assert sn.stat("base").kind is Kind.COMMITTED
    assert (sn.snapshot_dirs("base").fs / "data").stat().st_size == 2 << 20
    assert_consistent(sn)

    filler.unlink()
    free_before = os.statvfs(small_fs).f_bavail
    sn.remove("base")
    sn.cleanup()
    assert os.statvfs(small_fs).f_bavail > free_before
    assert_consistent(sn)


def test_cli_reports_full_disk(small_fs: Path) -> None:
    root = small_fs / "root"
    lamina = [sys.executable, "-m", "lamina", "--root", str(root)]
    subprocess.run([*lamina, "snapshots", "prepare", "first"], check=True, capture_output=True)
    filler = fill(small_fs)

    result = subprocess.run(
        [*lamina, "snapshots", "prepare", "second"], capture_output=True, text=True, check=False
    )

    exit_codes = {row.error_class: row.exit_code for row in CODES}
    assert result.returncode == exit_codes[NoSpaceError.__mro__[1]]
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr

    filler.unlink()
    subprocess.run([*lamina, "snapshots", "prepare", "second"], check=True, capture_output=True)


# ---------------------------------------------------------------- image import


def test_import_on_full_disk(small_fs: Path) -> None:
    sn = open_snapshotter(small_fs / "root", "overlay")
    try:
        filler = small_fs / "filler"
        # Leave about 1 MiB: enough for the metadata, not for busybox's 2 MiB.
        free = os.statvfs(small_fs)
        with filler.open("wb") as handle:
            handle.write(b"\0" * (free.f_bavail * free.f_frsize - (1 << 20)))

        with pytest.raises(NoSpaceError):
            import_image(sn, BUSYBOX_ARCHIVE, name="busybox")

        with sn.store.read() as tx:
            assert image_records.find_image(tx, "busybox") is None
        assert list(sn.list()) == []
        assert_consistent(sn)
        assert not is_mountpoint(small_fs / "root")

        filler.unlink()
        result = import_image(sn, BUSYBOX_ARCHIVE, name="busybox")
        assert sn.stat(result.image.chain_id).kind is Kind.COMMITTED
        assert_consistent(sn)
    finally:
        sn.close()
