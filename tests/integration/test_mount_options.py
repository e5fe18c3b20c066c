"""Mounts carry the options containerd's overlayfs snapshotter gives, and setuid images work.

containerd mounts container root filesystems without nosuid or nodev, since
images ship setuid programs (su, passwd, ping) and device nodes. The first
test builds the same stack in containerd 1.6's overlayfs snapshotter
(through containerd's snapshots API) and in Lamina, and compares the mount
type and options of each kind of snapshot, paths aside. The others mount a Lamina snapshot
whose layer contains a setuid-root program and a device node, and use both as
an unprivileged user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_fixture import (  # noqa: F401 - the session fixture
    NAMESPACE,
    Containerd,
    containerd,
)
from hostile_layers import LayerBuilder

from lamina.cli.archive import apply_to_snapshot
from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.mount import temporary_mount
from lamina.service.client import RemoteSnapshotter
from lamina.snapshots.types import Mount

PATH_OPTIONS = ("lowerdir", "upperdir", "workdir")
NOBODY = 65534

# Each case: the snapshot's key, and the snapshotter method and parent that create it.
STACK = [
    ("active-root", ["prepare"]),
    ("view-one-parent", ["view", "PARENT1"]),
    ("active-one-parent", ["prepare", "PARENT1"]),
    ("view-two-parents", ["view", "PARENT2"]),
    ("active-two-parents", ["prepare", "PARENT2"]),
]


def _general(options: list[str] | tuple[str, ...]) -> list[str]:
    """OPTIONS with the value of each path option dropped, sorted."""
    return sorted(o.partition("=")[0] if o.startswith(PATH_OPTIONS) else o for o in options)


def test_mount_options_match_containerd(
    containerd: Containerd,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    # containerd's garbage collector removes snapshots that nothing refers to
    # (a View, or a layer between its commit and its first child) unless a
    # lease holds them, so containerd's side works inside one.
    lease = f"options-{tmp_path.name}"
    containerd.ctr("leases", "create", "--id", lease, "--expires", "0")
    theirs = RemoteSnapshotter(
        str(containerd.socket), snapshotter="overlayfs", namespace=NAMESPACE, lease=lease
    )
    ours = open_snapshotter(tmp_path / "root", "overlay")
    try:
        # Two committed layers in both snapshotters: PARENT1, and PARENT2 on it.
        for name, parent in (("PARENT1", ""), ("PARENT2", "PARENT1")):
            for sn in (theirs, ours):
                sn.prepare(name + "-active", parent)
                sn.commit(name, name + "-active")

        for key, (verb, *parents) in STACK:
            their_mounts = getattr(theirs, verb)(key, *parents)
            our_mounts = getattr(ours, verb)(key, *parents)
            assert len(their_mounts) == len(our_mounts) == 1, key
            assert our_mounts[0].type == their_mounts[0].type, key
            assert _general(our_mounts[0].options) == _general(their_mounts[0].options), key
            assert not {"nosuid", "nodev", "noexec"} & set(our_mounts[0].options), key
            assert our_mounts == ours.mounts(key), key
    finally:
        ours.close()
        theirs.close()
        # Without the lease, containerd's garbage collector removes what it held.
        containerd.run_ctr("leases", "rm", "--sync", lease)


# ---------------------------------------------------------------- setuid programs and devices

PROGRAM = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    return 0;
}
"""


@pytest.fixture(scope="module")
def setuid_program(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small program that prints its real and effective user ids."""
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is needed to build the setuid test program"
    folder = tmp_path_factory.mktemp("program")
    (folder / "ids.c").write_text(PROGRAM)
    subprocess.run([gcc, "-O", "-o", str(folder / "ids"), str(folder / "ids.c")], check=True)
    return (folder / "ids").read_bytes()


@pytest.fixture(params=["overlay", "native"])
def image(
    request: pytest.FixtureRequest, tmp_path: Path, setuid_program: bytes
) -> Iterator[LayerSnapshotter]:
    """A root whose committed snapshot `image` contains a setuid-root program and /dev/null."""
    layer = (
        LayerBuilder()
        .dir("bin")
        .file("bin/ids", setuid_program, mode=0o4755, uid=0, gid=0)
        .dir("dev")
        .device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
        .tar()
    )
    (tmp_path / "layer.tar").write_bytes(layer)
    sn = open_snapshotter(tmp_path / "root", request.param)
    try:
        sn.prepare("unpack", "")
        with open(tmp_path / "layer.tar", "rb") as blob:
            apply_to_snapshot(sn, "unpack", blob, "layer.tar")
        sn.commit("image", "unpack")
        yield sn
    finally:
        sn.close()


def _run_as_nobody(program: Path) -> str:
    """Run PROGRAM as the unprivileged user nobody (uid 65534); return its output.

    The test folder is private to root, so the program is run through a
    descriptor that root opened: /proc/self/fd/N needs no search permission
    on the folders above the file, and the kernel still applies the setuid
    bit and the flags of the mount the file is on.
    """
    fd = os.open(program, os.O_RDONLY | os.O_CLOEXEC)
    try:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        done = subprocess.run(
            [*command, f"/proc/self/fd/{fd}"],
            capture_output=True,
            text=True,
            check=True,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    return done.stdout.strip()


@pytest.mark.parametrize("kind", ["active", "view"])
def test_setuid_program_and_device_work(image: LayerSnapshotter, kind: str, tmp_path: Path) -> None:
    if kind == "active":
        image.prepare("container", "image")
    else:
        image.view("container", "image")
    mounts: list[Mount] = image.mounts("container")
    with temporary_mount(mounts, parent_dir=tmp_path) as rootfs:
        flags = os.statvfs(rootfs).f_flag
        assert not flags & (os.ST_NOSUID | os.ST_NODEV)
        # The kernel honours the setuid bit: the effective user is root.
        assert _run_as_nobody(rootfs / "bin/ids") == f"uid={NOBODY} euid=0"
        # The device node is usable as a device, not refused as on a nodev mount.
        with open(rootfs / "dev/null", "wb") as null:
            null.write(b"discarded")
        assert (rootfs / "dev/null").stat().st_size == 0
