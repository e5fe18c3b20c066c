"""A mounted snapshot is never removed or mounted twice, and `lamina umount` touches only snapshots.

Removing the directory under a live overlay leaves a mount that shows a
deleted tree. Two overlays on one upper directory are undefined behaviour in
the kernel. Both requests raise FailedPreconditionError.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import FailedPreconditionError, InvalidArgumentError
from lamina.mount import is_mountpoint, mount_all, sources_of_mount, unmount


@pytest.fixture(params=["overlay", "native"])
def sn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerSnapshotter]:
    snapshotter = open_snapshotter(tmp_path / "root", request.param)
    yield snapshotter
    snapshotter.close()


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamina", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_remove_of_mounted_active_refused(sn: LayerSnapshotter, tmp_path: Path) -> None:
    sn.prepare("base")
    sn.commit("layer", "base")
    target = tmp_path / "mnt"
    target.mkdir()
    mount_all(sn.prepare("container", "layer"), target)
    try:
        with pytest.raises(FailedPreconditionError):
            sn.remove("container")
        assert sn.mounted_at("container") == [str(target)]
        assert sn.stat("container").name == "container"
    finally:
        unmount(target)
    assert sn.mounted_at("container") == []
    sn.remove("container")


def test_remove_of_mounted_view_refused(sn: LayerSnapshotter, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    mount_all(sn.view("empty-view"), target)
    try:
        with pytest.raises(FailedPreconditionError):
            sn.remove("empty-view")
    finally:
        unmount(target)
    sn.remove("empty-view")


def test_mounted_at_ignores_other_snapshots(sn: LayerSnapshotter, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    sn.prepare("one")
    mount_all(sn.prepare("two"), target)
    try:
        assert sn.mounted_at("one") == []
        sn.remove("one")
    finally:
        unmount(target)


def test_cli_mount_twice_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    assert lamina(root, "snapshots", "prepare", "c").returncode == 0
    assert lamina(root, "mount", "c", str(first)).returncode == 0
    try:
        again = lamina(root, "mount", "c", str(second))
        assert again.returncode == FailedPreconditionError.exit_code
        assert len(again.stderr.splitlines()) == 1
        assert not is_mountpoint(second)
    finally:
        unmount(first)


def test_cli_umount_refuses_foreign_mount(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert lamina(root, "snapshots", "ls").returncode == 0
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "lamina-test", str(target)], check=True)
    try:
        refused = lamina(root, "umount", str(target))
        assert refused.returncode == FailedPreconditionError.exit_code
        assert is_mountpoint(target)
    finally:
        unmount(target)
    assert lamina(root, "umount", str(target)).returncode == InvalidArgumentError.exit_code


def test_cli_umount_of_snapshot_mount(tmp_path: Path) -> None:
    root = tmp_path / "root"
    target = tmp_path / "mnt"
    target.mkdir()
    assert lamina(root, "snapshots", "prepare", "c").returncode == 0
    assert lamina(root, "mount", "c", str(target)).returncode == 0
    try:
        sources = sources_of_mount(target)
        assert sources == [str(root / "snapshots" / "1" / "fs")]
    finally:
        result = lamina(root, "umount", str(target))
    assert result.returncode == 0, result.stderr
    assert not is_mountpoint(target)


def test_sigterm_during_import_cleans_up(tmp_path: Path) -> None:
    from images import image_archive

    root = tmp_path / "root"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lamina",
            "--root",
            str(root),
            "images",
            "import",
            "--quiet",
            str(image_archive("debian", "oci")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    # Signal as soon as the first layer's snapshot directory appears, so the
    # import is surely half done.
    deadline = time.monotonic() + 30
    snapshots = root / "snapshots"
    while time.monotonic() < deadline and worker.poll() is None:
        if snapshots.is_dir() and any(snapshots.iterdir()):
            break
        time.sleep(0.005)
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=60)
    if worker.returncode == 0:
        pytest.fail("the import finished before SIGTERM; the test needs a slower image")
    assert worker.returncode == 143, stderr
    listed = lamina(root, "snapshots", "ls", "--filter", "kind==active")
    assert listed.stdout.splitlines()[1:] == []
    assert lamina(root, "fsck").returncode == 0
    assert not any(str(root) in line for line in Path("/proc/self/mounts").read_text().splitlines())
    assert os.path.isdir(root / "snapshots")
