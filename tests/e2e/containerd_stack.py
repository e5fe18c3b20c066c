"""A private containerd that loads `lamina serve` as its proxy snapshotter.

The session fixture `stack` (made available by conftest.py) starts, under one temporary folder:

- `lamina serve` as a subprocess (its own root and socket),
- containerd with its own root, state, socket and opt folder, the CRI
  plugin disabled, and `[proxy_plugins.lamina]` pointing at that socket.

containerd, ctr and runc come from Debian's packages, which the test
command installs. Reference image archives are read from
$LAMINA_IMAGES (default ~/.cache/lamina-images).

Teardown stops both processes by pid and unmounts whatever is still
mounted under the folder (container root filesystems, deepest first).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from images import images_dir

from lamina.mount import mounts_under, unmount
from lamina.service.client import RemoteSnapshotter

SNAPSHOTTER = "lamina"
IMAGES_DIR = images_dir()
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
CTR_TIMEOUT = 300.0

CONTAINERD_CONFIG = """\
version = 2
root = "{dir}/containerd/root"
state = "{dir}/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/containerd/opt"

[proxy_plugins.{name}]
  type = "snapshot"
  address = "{lamina_socket}"
"""


def image_archive(name: str) -> Path:
    """Return the OCI archive of reference image NAME ("busybox", "debian", ...)."""
    return IMAGES_DIR / f"{name}.oci.tar"


def image_ref(name: str) -> str:
    """Return the reference an archive of the reference set is imported under."""
    stats = IMAGES_DIR / f"{name}.stats.json"
    if stats.exists():
        for archive in json.loads(stats.read_text())["archives"]:
            if archive["file"] == f"{name}.oci.tar":
                return str(archive["ref"])
    return f"localhost/lamina/{name}:latest"


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.is_socket():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {START_TIMEOUT} s:\n{tail(log)}")
        time.sleep(0.05)


def tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {log})"


def stop_process(process: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> int:
    """Send SIGNUM to PROCESS by its pid and wait; SIGKILL it if it outlives the timeout."""
    if process.poll() is None:
        os.kill(process.pid, signum)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
    return process.returncode


@dataclass
class LaminaServe:
    """One `lamina serve` subprocess on ROOT, listening on SOCKET."""

    root: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        command = [
            sys.executable,
            "-m",
            "lamina",
            "serve",
            "--root",
            str(self.root),
            "--address",
            str(self.socket),
            "--log-level",
            "debug",
        ]
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts}: {command}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _wait_for_socket(self.socket, self.process, self.log)

    def stop(self) -> int:
        assert self.process is not None
        return stop_process(self.process)

    def client(self) -> RemoteSnapshotter:
        """Return a client of this server, bypassing containerd."""
        return RemoteSnapshotter(str(self.socket), timeout=30)


@dataclass
class Containerd:
    """A private containerd; `ctr` runs ctr against its socket."""

    dir: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    ctr_log: list[str] = field(default_factory=list)

    def start(self, lamina_socket: Path) -> None:
        config = self.dir / "containerd.toml"
        config.write_text(
            CONTAINERD_CONFIG.format(dir=self.dir, name=SNAPSHOTTER, lamina_socket=lamina_socket)
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _wait_for_socket(self.socket, self.process, self.log)
        # The socket appears before every service is registered, so wait
        # until ctr version gets a reply.
        deadline = time.monotonic() + START_TIMEOUT
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer:\n{tail(self.log)}")
            time.sleep(0.1)

    def stop(self) -> int:
        assert self.process is not None
        return stop_process(self.process)

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        check: bool = True,
        timeout: float = CTR_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr ARGS against this containerd and return the completed process."""
        command = ["ctr", "--address", str(self.socket), "--namespace", namespace, *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        self.ctr_log.append(f"$ {' '.join(command)}\n-> {result.returncode}\n{result.stderr}")
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed with {result.returncode}:\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"containerd log:\n{tail(self.log)}"
            )
        return result

    def snapshots(self, *args: str, namespace: str = "default", check: bool = True) -> str:
        """Run `ctr snapshots --snapshotter lamina ARGS` and return its output."""
        return self.ctr(
            "snapshots", "--snapshotter", SNAPSHOTTER, *args, namespace=namespace, check=check
        ).stdout


@dataclass
class Stack:
    dir: Path
    lamina: LaminaServe
    containerd: Containerd

    def import_image(self, name: str, namespace: str) -> str:
        """Import reference image NAME into NAMESPACE on Lamina; return its reference."""
        archive = image_archive(name)
        assert archive.exists(), f"reference image archive {archive} is missing"
        self.containerd.ctr(
            "images", "import", "--snapshotter", SNAPSHOTTER, str(archive), namespace=namespace
        )
        return image_ref(name)

    def lamina_keys(self) -> set[str]:
        """Return the keys of every snapshot in Lamina's store, asked of lamina serve itself."""
        with self.lamina.client() as client:
            return {info.name for info in client.list()}


def unmount_all_under(path: Path) -> None:
    for mount_point in mounts_under(path):
        with contextlib.suppress(OSError):
            unmount(mount_point)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A short folder name keeps socket paths under the 108-byte limit of
    # sun_path.
    base = tmp_path_factory.mktemp("e2e")
    lamina = LaminaServe(root=base / "lamina", socket=base / "lamina.sock", log=base / "lamina.log")
    containerd = Containerd(dir=base, socket=base / "containerd.sock", log=base / "containerd.log")
    try:
        lamina.start()
        containerd.start(lamina.socket)
        yield Stack(base, lamina, containerd)
    finally:
        if containerd.process is not None:
            containerd.stop()
        if lamina.process is not None:
            lamina.stop()
        unmount_all_under(base)
    # Every failure lamina serve handled but did not expect is logged with
    # its traceback; none may have happened during the session.
    assert "Traceback" not in lamina.log.read_text(errors="replace"), tail(lamina.log, 80)


def wait_until(check: object, timeout: float = 20.0, interval: float = 0.2) -> None:
    """Call CHECK until it returns without raising AssertionError, up to TIMEOUT seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def keys_in_namespace(keys: Sequence[str] | set[str], namespace: str) -> set[str]:
    """Return the Lamina keys that containerd made for NAMESPACE ("NAMESPACE/N/key")."""
    return {key for key in keys if key.startswith(f"{namespace}/")}
