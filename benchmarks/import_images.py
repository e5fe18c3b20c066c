"""Time `lamina images import` against containerd 1.6 and against the GNU tar floor.

Usage (as root):

    python benchmarks/import_images.py [IMAGES_DIR] [--images debian deep big]
        [--formats oci docker] [--runs 3] [--jobs N] [--json FILE]

For each archive IMAGES_DIR/NAME.FORMAT.tar, and each of --runs runs, with
a fresh root every time:

- Lamina: `python -m lamina --root ROOT images import ARCHIVE --quiet` in a
  child process; wall time and the child's peak RSS (ru_maxrss of wait4,
  which covers all of its threads).
- containerd: a private containerd (own config, root, state and socket in
  a fresh folder, CRI plugin off) started for the run, then the wall time
  of `ctr images import --snapshotter overlayfs ARCHIVE`, which stores the
  blobs and unpacks them into the built-in overlayfs snapshotter.
- floor: GNU tar extracting the same layer blobs into one folder per
  layer, as overlayfs keeps layers, one tar process after the other
  (`tar -x --xattrs --xattrs-include='*' --numeric-owner`). tar detects
  gzip itself.

Medians are printed with the ratios Lamina/containerd and Lamina/floor.
Every folder is made under --tmp (default: IMAGES_DIR/bench-tmp, so on the
same file system for all three) and removed afterwards. Before each timed
step, an untimed sync(2) writes back what earlier steps left dirty, so that
no step pays for another's writeback (--no-sync turns it off). The page
cache is not dropped, so all three read the archive from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = Path(
    os.environ.get("LAMINA_IMAGES")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lamina-images"
)

CONTAINERD_CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs"]
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
class Result:
    """Median figures of one archive."""

    archive: str
    lamina_s: float
    containerd_s: float
    floor_s: float
    lamina_peak_rss_mib: float
    runs: int

    @property
    def vs_containerd(self) -> float:
        return self.lamina_s / self.containerd_s

    @property
    def vs_floor(self) -> float:
        return self.lamina_s / self.floor_s


def unmount_below(path: Path) -> None:
    """Unmount everything mounted at or below PATH, deepest first."""
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4] for line in table]
    inside = [p for p in points if p == str(path) or p.startswith(str(path) + "/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", point], check=False)


def remove(path: Path) -> None:
    unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- Lamina


def time_lamina(archive: Path, tmp: Path, jobs: int | None) -> tuple[float, float, float]:
    """Return wall seconds, CPU seconds and peak RSS in MiB of one import into a fresh root."""
    root = Path(tempfile.mkdtemp(prefix="lamina-root-", dir=tmp))
    command = [sys.executable, "-m", "lamina", "--root", str(root), "images", "import"]
    command += [str(archive), "--quiet"]
    if jobs is not None:
        command += ["--jobs", str(jobs)]
    try:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"lamina import of {archive} failed ({process.returncode})")
        return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    finally:
        remove(root)


# ---------------------------------------------------------------- containerd


def time_containerd(archive: Path, tmp: Path) -> float:
    """Return wall seconds of `ctr images import` into a fresh private containerd."""
    base = Path(tempfile.mkdtemp(prefix="lamina-ctrd-", dir=tmp))
    (base / "config.toml").write_text(CONTAINERD_CONFIG.format(base=base))
    socket = base / "containerd.sock"
    with open(base / "containerd.log", "wb") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(base / "config.toml")], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(
            ["ctr", "-a", str(socket), "version"], capture_output=True, check=False
        ).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"containerd did not start; see {base / 'containerd.log'}")
            time.sleep(0.1)
        command = ["ctr", "-a", str(socket), "-n", "bench", "images", "import"]
        command += ["--snapshotter", "overlayfs", str(archive)]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - started
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        remove(base)


# ---------------------------------------------------------------- floor


def layer_blobs(archive: Path, folder: Path) -> list[Path]:
    """Write the layer blobs of an oci-archive or docker-archive to FOLDER, bottom first."""
    with tarfile.open(archive) as outer:
        members = {m.name.removeprefix("./"): m for m in outer.getmembers()}

        def member(name: str) -> tarfile.TarInfo:
            for _ in range(8):
                found = members[name]
                if not found.issym():
                    return found
                name = posixpath.normpath(posixpath.join(posixpath.dirname(name), found.linkname))
            raise SystemExit(f"symlink loop in {archive}")

        def read_json(name: str) -> object:
            data = outer.extractfile(member(name))
            assert data is not None
            return json.load(data)

        if "manifest.json" in members:
            entries = read_json("manifest.json")
            assert isinstance(entries, list)
            names = list(entries[0]["Layers"])
        else:
            index = read_json("index.json")
            assert isinstance(index, dict)
            digest = index["manifests"][0]["digest"]
            manifest = read_json("blobs/sha256/" + digest.split(":")[1])
            assert isinstance(manifest, dict)
            names = ["blobs/sha256/" + d["digest"].split(":")[1] for d in manifest["layers"]]
        paths = []
        for i, name in enumerate(names):
            path = folder / f"{i:04d}.layer"
            data = outer.extractfile(member(name))
            assert data is not None
            with data, open(path, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
            paths.append(path)
    return paths


def time_floor(blobs: list[Path], tmp: Path) -> float:
    """Return wall seconds of GNU tar extracting each blob into its own folder."""
    target = Path(tempfile.mkdtemp(prefix="tar-floor-", dir=tmp))
    try:
        started = time.perf_counter()
        for i, blob in enumerate(blobs):
            layer = target / str(i)
            layer.mkdir()
            subprocess.run(
                [
                    "tar",
                    "-x",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--numeric-owner",
                    "-f",
                    str(blob),
                    "-C",
                    str(layer),
                ],
                check=True,
            )
        return time.perf_counter() - started
    finally:
        remove(target)


# ---------------------------------------------------------------- main


def settle(sync: bool) -> None:
    if sync:
        os.sync()


def measure(archive: Path, tmp: Path, runs: int, jobs: int | None, sync: bool) -> Result:
    blob_dir = Path(tempfile.mkdtemp(prefix="blobs-", dir=tmp))
    try:
        blobs = layer_blobs(archive, blob_dir)
        lamina, rss, ctrd, floor = [], [], [], []
        for run in range(runs):
            settle(sync)
            seconds, cpu, peak = time_lamina(archive, tmp, jobs)
            lamina.append(seconds)
            rss.append(peak)
            settle(sync)
            ctrd.append(time_containerd(archive, tmp))
            settle(sync)
            floor.append(time_floor(blobs, tmp))
            print(
                f"  {archive.name} run {run + 1}: lamina {seconds:.2f} s "
                f"(CPU {cpu:.2f} s, {peak:.0f} MiB), "
                f"containerd {ctrd[-1]:.2f} s, tar {floor[-1]:.2f} s",
                file=sys.stderr,
            )
    finally:
        remove(blob_dir)
    return Result(
        archive=archive.name,
        lamina_s=statistics.median(lamina),
        containerd_s=statistics.median(ctrd),
        floor_s=statistics.median(floor),
        lamina_peak_rss_mib=max(rss),
        runs=runs,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images_dir", nargs="?", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--images", nargs="+", default=["debian", "deep", "big"])
    parser.add_argument("--formats", nargs="+", default=["oci", "docker"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="lamina --jobs (default: its own)")
    parser.add_argument(
        "--no-sync", dest="sync", action="store_false", help="do not sync before timed steps"
    )
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the roots")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: imports mount nothing but create devices and owners")

    tmp = args.tmp or args.images_dir / "bench-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.images:
        for fmt in args.formats:
            archive = args.images_dir / f"{name}.{fmt}.tar"
            if not archive.is_file():
                print(f"skipping {archive}: not found", file=sys.stderr)
                continue
            results.append(measure(archive, tmp, args.runs, args.jobs, args.sync))

    header = f"{'archive':<20} {'lamina s':>9} {'ctrd s':>8} {'tar s':>7} "
    header += f"{'x ctrd':>7} {'x tar':>6} {'RSS MiB':>8}"
    print(header)
    for r in results:
        print(
            f"{r.archive:<20} {r.lamina_s:>9.2f} {r.containerd_s:>8.2f} {r.floor_s:>7.2f} "
            f"{r.vs_containerd:>7.2f} {r.vs_floor:>6.2f} {r.lamina_peak_rss_mib:>8.0f}"
        )
    if args.json:
        rows = [
            {**asdict(r), "vs_containerd": r.vs_containerd, "vs_floor": r.vs_floor} for r in results
        ]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
