"""A private containerd for tests, and the trees it unpacks from image archives.

The session fixture `containerd` starts containerd 1.6 (Debian's package)
under a temporary folder: its own config.toml with root, state, gRPC and
ttrpc sockets under that folder, the CRI plugin and the snapshotters that
need other file systems disabled. It is stopped by its pid at the end of
the session, after everything mounted below the folder was unmounted.

`Containerd.image_tree(archive)` imports an image archive with
`ctr images import --snapshotter overlayfs`, mounts the image with
`ctr images mount`, records the tree with treecompare.snapshot_tree and
unmounts it. Results are cached for the session. `image_layers(archive,
folder)` writes the layer blobs of an OCI or docker archive to files, in
order, for the applier under test.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from images import images_dir
from treecompare import EntryRecord, snapshot_tree

IMAGES_DIR = images_dir()
NAMESPACE = "test"
START_TIMEOUT = 30.0
CTR_TIMEOUT = 300.0

_CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
"""


@dataclass
class Containerd:
    """A running private containerd and the ctr client aimed at it."""

    base: Path
    process: subprocess.Popen[bytes]
    _trees: dict[tuple[Path, str], dict[str, EntryRecord]] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    def run_ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ctr in the test namespace and return the finished process."""
        command = ["ctr", "-a", str(self.socket), "-n", NAMESPACE, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=CTR_TIMEOUT)

    def ctr(self, *args: str) -> str:
        """Run ctr in the test namespace; return its stdout, fail the test on an error."""
        done = self.run_ctr(*args)
        if done.returncode != 0:
            command = " ".join(["ctr", *args])
            pytest.fail(f"{command} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def import_image(self, archive: Path, snapshotter: str = "overlayfs") -> str:
        """Import ARCHIVE, unpacked with SNAPSHOTTER; return the image name."""
        before = set(self.ctr("images", "ls", "-q").split())
        self.ctr("images", "import", "--snapshotter", snapshotter, str(archive))
        names = set(self.ctr("images", "ls", "-q").split()) - before
        if not names:
            # The image was imported before under the same name.
            names = {_archive_ref(archive)}
        return sorted(names)[0]

    def image_tree(self, archive: Path, snapshotter: str = "overlayfs") -> dict[str, EntryRecord]:
        """Return the tree containerd unpacks from ARCHIVE with SNAPSHOTTER (cached)."""
        cached = self._trees.get((archive, snapshotter))
        if cached is not None:
            return cached
        name = self.import_image(archive, snapshotter)
        target = Path(tempfile.mkdtemp(prefix="mount-", dir=self.base))
        if snapshotter == "overlayfs":
            self.ctr("images", "mount", "--snapshotter", snapshotter, name, str(target))
            try:
                tree = snapshot_tree(target)
            finally:
                self.ctr("images", "unmount", "--rm", str(target))
                target.rmdir()
        else:
            # ctr 1.6's `images mount` reads --snapshotter from the global
            # options only, so it would unpack again with overlayfs.
            tree = self._view_tree(chain_id(archive), snapshotter, target)
        self._trees[(archive, snapshotter)] = tree
        return tree

    def _view_tree(self, top: str, snapshotter: str, target: Path) -> dict[str, EntryRecord]:
        # `prepare` labels the snapshot as a GC root, `view` does not (ctr 1.6),
        # and an unlabelled view may be collected before it is mounted.
        key = f"tree-{target.name}"
        command = self.ctr(
            "snapshots", "--snapshotter", snapshotter, "prepare", "--target", str(target), key, top
        )
        subprocess.run(shlex.split(command), check=True)
        try:
            return snapshot_tree(target)
        finally:
            subprocess.run(["umount", str(target)], check=True)
            target.rmdir()
            self.ctr("snapshots", "--snapshotter", snapshotter, "rm", key)


def _archive_ref(archive: Path) -> str:
    """Return the image name recorded in an OCI (index.json) or docker (manifest.json) archive."""
    with tarfile.open(archive) as outer:
        names = outer.getnames()
        if "index.json" in names:
            member = outer.extractfile("index.json")
            assert member is not None
            annotations = json.load(member)["manifests"][0].get("annotations", {})
            return str(
                annotations.get("io.containerd.image.name")
                or annotations["org.opencontainers.image.ref.name"]
            )
        member = outer.extractfile("manifest.json")
        assert member is not None
        return str(json.load(member)[0]["RepoTags"][0])


def chain_id(archive: Path) -> str:
    """Return the chain id of the top layer of the OCI or docker ARCHIVE's image."""
    with tarfile.open(archive) as outer:
        members = {m.name: m for m in outer.getmembers()}

        def read_json(name: str) -> Any:
            member = outer.extractfile(_follow(members, name))
            assert member is not None
            return json.load(member)

        if "manifest.json" in members:
            config = read_json(read_json("manifest.json")[0]["Config"])
        else:
            manifest = read_json("blobs/sha256/" + _first_manifest(read_json))
            config = read_json("blobs/sha256/" + manifest["config"]["digest"].split(":")[1])
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        if not chain:
            chain = diff_id
        else:
            chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def _first_manifest(read_json: Callable[[str], Any]) -> str:
    digest: str = read_json("index.json")["manifests"][0]["digest"]
    document = read_json("blobs/sha256/" + digest.split(":")[1])
    if "manifests" in document:  # an image index: take its first manifest
        digest = document["manifests"][0]["digest"]
    return digest.split(":")[1]


def _unmount_below(base: Path) -> None:
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4] for line in table]
    inside = [p for p in points if p == str(base) or p.startswith(str(base) + "/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", point], check=False)


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A private containerd for the session, stopped by its pid afterwards."""
    base = Path(tempfile.mkdtemp(prefix="lamina-ctrd-"))
    (base / "config.toml").write_text(_CONFIG.format(base=base))
    log = open(base / "containerd.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        ["containerd", "--config", str(base / "config.toml")], stdout=log, stderr=log
    )
    daemon = Containerd(base, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"containerd exited: {(base / 'containerd.log').read_text()[-2000:]}")
            ready = subprocess.run(
                ["ctr", "-a", str(daemon.socket), "version"], capture_output=True, check=False
            )
            if daemon.socket.exists() and ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail("containerd did not answer within 30 s")
            time.sleep(0.1)
        yield daemon
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


def image_layers(archive: Path, folder: Path) -> list[Path]:
    """Write the layer blobs of the OCI or docker ARCHIVE into FOLDER, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as outer:
        members = {m.name: m for m in outer.getmembers()}

        def read_json(name: str) -> dict[str, object] | list[object]:
            member = outer.extractfile(_follow(members, name))
            assert member is not None
            value: dict[str, object] | list[object] = json.load(member)
            return value

        if "manifest.json" in members:
            manifest = read_json("manifest.json")
            assert isinstance(manifest, list)
            names = list(manifest[0]["Layers"])  # type: ignore[index]
        else:
            index = read_json("index.json")
            digest = index["manifests"][0]["digest"]  # type: ignore[call-overload,index]
            manifest_doc = read_json("blobs/sha256/" + digest.split(":")[1])
            if "manifests" in manifest_doc:  # an image index: take its first manifest
                digest = manifest_doc["manifests"][0]["digest"]  # type: ignore[call-overload,index]
                manifest_doc = read_json("blobs/sha256/" + digest.split(":")[1])
            names = [
                "blobs/sha256/" + layer["digest"].split(":")[1]
                for layer in manifest_doc["layers"]  # type: ignore[call-overload,index]
            ]
        paths = []
        for i, name in enumerate(names):
            path = folder / f"{i:04d}.layer"
            source = outer.extractfile(_follow(members, name))
            assert source is not None
            with source, open(path, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            paths.append(path)
    return paths


def _follow(members: dict[str, tarfile.TarInfo], name: str) -> tarfile.TarInfo:
    for _ in range(10):
        member = members[name]
        if not member.issym():
            return member
        name = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
    raise AssertionError(f"symlink loop at {name}")
