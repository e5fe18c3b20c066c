"""Benchmark `lamina serve` against containerd's built-in overlayfs snapshotter.

One run starts, under a fresh temporary folder, `lamina serve` and a private
containerd that loads it as the proxy snapshotter "lamina", then measures:

1. snapshot cycles: a Python gRPC client (lamina.service.client) runs N
   cycles of prepare (on a committed parent), commit and remove
   - against containerd's own snapshots service with its built-in
     overlayfs snapshotter,
   - against `lamina serve` directly,
   - and, for reference, against containerd's service with the "lamina"
     proxy (containerd's bookkeeping plus Lamina);
2. image import: `ctr images import` of the debian, deep and big reference
   images (those present in --images) with `--snapshotter lamina` and with
   `--snapshotter overlayfs`. Each import is followed by `ctr images rm
   --sync`, which removes the image's content and snapshots again, so every
   import starts from an empty store. The order alternates between rounds,
   and the median of the rounds is reported.

It prints the figures and the ratios against the targets: Lamina's cycles
per second at least 1.5x containerd's, and import through the proxy at most
1.05x the time of overlayfs. Needs root, containerd, ctr and runc.

    python benchmarks/service_cycles.py [--cycles N] [--rounds R] [--images DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lamina.mount import mounts_under, unmount
from lamina.service.client import RemoteSnapshotter

IMAGES = ("debian", "deep", "big")
CYCLES_TARGET = 1.5
IMPORT_TARGET = 1.05
START_TIMEOUT = 30.0

CONTAINERD_CONFIG = """\
version = 2
root = "{dir}/containerd/root"
state = "{dir}/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/containerd/opt"

[proxy_plugins.lamina]
  type = "snapshot"
  address = "{dir}/lamina.sock"
"""


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.is_socket():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{process.args!r} did not start listening on {path}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)


@dataclass
class Stack:
    dir: Path

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def lamina_socket(self) -> Path:
        return self.dir / "lamina.sock"

    def ctr(self, *args: str, namespace: str) -> float:
        """Run ctr ARGS; return its wall-clock time in seconds."""
        command = ["ctr", "--address", str(self.containerd_socket), "--namespace", namespace]
        start = time.perf_counter()
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"ctr {' '.join(args)} failed:\n{result.stderr}")
        return elapsed


@contextmanager
def running_stack() -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="lamina-service-bench-"))
    stack = Stack(base)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with (base / "lamina.log").open("wb") as log:
            lamina = subprocess.Popen(
                [sys.executable, "-m", "lamina", "serve", "--root", str(base / "lamina"),
                 "--address", str(stack.lamina_socket), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        processes.append(lamina)
        _wait_for_socket(stack.lamina_socket, lamina)

        config = base / "containerd.toml"
        config.write_text(CONTAINERD_CONFIG.format(dir=base))
        with (base / "containerd.log").open("wb") as log:
            containerd = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        processes.append(containerd)
        _wait_for_socket(stack.containerd_socket, containerd)
        yield stack
    finally:
        for process in reversed(processes):
            _stop(process)
        for mount_point in mounts_under(base):
            unmount(mount_point)
        shutil.rmtree(base, ignore_errors=True)


def cycles_per_second(client: RemoteSnapshotter, prefix: str, cycles: int) -> float:
    """Run CYCLES prepare+commit+remove cycles on one committed parent; return cycles/s."""
    client.prepare(f"{prefix}base-active", "")
    client.commit(f"{prefix}base", f"{prefix}base-active")
    # A few untimed cycles warm up connections and caches.
    for i in range(5):
        client.prepare(f"{prefix}warm-{i}", f"{prefix}base")
        client.commit(f"{prefix}warm-layer-{i}", f"{prefix}warm-{i}")
        client.remove(f"{prefix}warm-layer-{i}")

    start = time.perf_counter()
    for i in range(cycles):
        client.prepare(f"{prefix}active-{i}", f"{prefix}base")
        client.commit(f"{prefix}layer-{i}", f"{prefix}active-{i}")
        client.remove(f"{prefix}layer-{i}")
    elapsed = time.perf_counter() - start
    client.remove(f"{prefix}base")
    return cycles / elapsed


def measure_cycles(stack: Stack, cycles: int) -> dict[str, float]:
    containerd = str(stack.containerd_socket)
    # containerd collects snapshots outside a lease at any time, even between
    # a prepare and its commit, so its clients work inside one.
    stack.ctr("leases", "create", "--id", "bench", "--expires", "0", namespace="bench")
    results = {}
    with RemoteSnapshotter(
        containerd, snapshotter="overlayfs", namespace="bench", lease="bench"
    ) as client:
        results["containerd overlayfs"] = cycles_per_second(client, "overlay-", cycles)
    with RemoteSnapshotter(str(stack.lamina_socket)) as client:
        results["lamina serve"] = cycles_per_second(client, "bench/1/", cycles)
    with RemoteSnapshotter(
        containerd, snapshotter="lamina", namespace="bench", lease="bench"
    ) as client:
        results["containerd -> lamina proxy"] = cycles_per_second(client, "proxy-", cycles)
    return results


def measure_imports(stack: Stack, images: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Return the median import seconds of each image present, by snapshotter."""
    results: dict[str, dict[str, float]] = {}
    for name in IMAGES:
        archive = images / f"{name}.oci.tar"
        if not archive.exists():
            print(f"skipping {name}: {archive} not found", file=sys.stderr)
            continue
        times: dict[str, list[float]] = {"lamina": [], "overlayfs": []}
        for round_number in range(rounds):
            order = ["lamina", "overlayfs"]
            if round_number % 2:
                order.reverse()
            for snapshotter in order:
                namespace = f"import-{snapshotter}"
                seconds = stack.ctr(
                    "images", "import", "--snapshotter", snapshotter, str(archive),
                    namespace=namespace,
                )  # fmt: skip
                times[snapshotter].append(seconds)
                # Removing the image with --sync runs containerd's garbage
                # collection, so the next import writes content and layers anew.
                stack.ctr("images", "rm", "--sync", _image_ref(images, name), namespace=namespace)
        results[name] = {key: statistics.median(values) for key, values in times.items()}
    return results


def _image_ref(images: Path, name: str) -> str:
    stats = images / f"{name}.stats.json"
    if stats.exists():
        for archive in json.loads(stats.read_text())["archives"]:
            if archive["file"] == f"{name}.oci.tar":
                return str(archive["ref"])
    return f"localhost/lamina/{name}:latest"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=300, help="cycles per target (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="imports per image and snapshotter")
    parser.add_argument(
        "--images",
        type=Path,
        default=Path.home() / ".cache" / "lamina-images",
        help="folder of the reference image archives (NAME.oci.tar)",
    )
    parser.add_argument("--skip-import", action="store_true", help="measure only the cycles")
    args = parser.parse_args()

    with running_stack() as stack:
        cycles = measure_cycles(stack, args.cycles)
        imports = {} if args.skip_import else measure_imports(stack, args.images, args.rounds)

    print(f"snapshot cycles (prepare on a parent + commit + remove), {args.cycles} each:")
    for target, rate in cycles.items():
        print(f"  {target:28s} {rate:8.1f} cycles/s")
    ratio = cycles["lamina serve"] / cycles["containerd overlayfs"]
    verdict = "meets" if ratio >= CYCLES_TARGET else "misses"
    print(f"  lamina / containerd: {ratio:.2f}x ({verdict} the target of {CYCLES_TARGET}x)")

    if imports:
        print(f"ctr images import, median of {args.rounds} rounds:")
        for name, seconds in imports.items():
            ratio = seconds["lamina"] / seconds["overlayfs"]
            verdict = "meets" if ratio <= IMPORT_TARGET else "misses"
            print(
                f"  {name:8s} lamina {seconds['lamina']:7.2f} s  overlayfs "
                f"{seconds['overlayfs']:7.2f} s  ratio {ratio:.3f}x "
                f"({verdict} the target of {IMPORT_TARGET}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
