#!/usr/bin/env python3
"""Benchmark Lamina's layer applier against GNU tar, and the gzip/zstd decompressors.

Usage: apply_layers.py [IMAGES_DIR] [--images debian big] [--runs 3] [--on-disk]

For each image (IMAGES_DIR/NAME.oci.tar, default folder
~/.cache/lamina-images) the script extracts the layer blobs, decompresses
them once, and then times, in alternation and RUNS times each, into an
empty folder:

- tar-plain:   GNU tar -xpf of the uncompressed layers, in order (the baseline)
- tar-gzip:    GNU tar -xzpf of the gzip layers
- lamina-plain: lamina.archive.apply_layer of the uncompressed layers
- lamina-gzip:  the same on the gzip layers
- lamina-overlay: apply_layer_to_upper of the gzip layers, one upper
  directory per layer, as the overlay driver unpacks an image

"in-process s" is the time the child spent applying, without starting
Python and importing Lamina. "cpu s" is the user and system time of the
child processes of a run, every thread and the process start included.
Other work on the machine disturbs it least. When that work leaves no
core idle, Lamina's decompression thread no longer runs beside the
applier, and the wall time approaches the CPU time.

Every Lamina run is a child process that reports its peak RSS as VmHWM
of /proc/self/status, because Linux's ru_maxrss keeps the high-water mark
of the forked copy of this script across exec. The times are wall times
measured by this script, process start included, medians of the runs. Each run writes into a fresh
folder on a tmpfs mounted by the script (as root), so that the figures
measure the CPU cost rather than the disk's writeback; --on-disk uses a
folder under $TMPDIR instead.

Before that it measures the decompressors on the gzip layers: zlib, ISA-L
(isal) and rapidgzip when installed, and zstandard on the same layers
recompressed at level 3, in MB/s of uncompressed output.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

CHILD_FLAG = "--child"


# ---------------------------------------------------------------- child


def child(mode: str, target: str, layers: list[str]) -> None:
    """Apply LAYERS into TARGET the MODE way and print seconds and peak RSS as JSON."""
    import resource

    from lamina.archive import apply_layer, apply_layer_to_upper

    start = time.perf_counter()
    if mode == "overlay":
        uppers: list[str] = []
        for i, layer in enumerate(layers):
            upper = os.path.join(target, str(i))
            os.mkdir(upper)
            with open(layer, "rb") as blob:
                apply_layer_to_upper(blob, upper, list(reversed(uppers)))
            uppers.append(upper)
    else:
        for layer in layers:
            with open(layer, "rb") as blob:
                apply_layer(blob, target)
    seconds = time.perf_counter() - start
    # Linux carries ru_maxrss across exec (it keeps the high-water mark of
    # the forked copy of the parent), so VmHWM of the new image is the figure.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    print(json.dumps({"apply_s": seconds, "maxrss_kib": rss, "vmhwm_kib": hwm}))


# ---------------------------------------------------------------- preparation


def layer_blobs(archive: Path, folder: Path) -> list[Path]:
    """Write the layer blobs of an OCI archive into FOLDER, in order."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as outer:

        def blob(digest: str) -> tarfile.ExFileObject:
            member = outer.extractfile("blobs/sha256/" + digest.split(":")[1])
            assert member is not None
            return member  # type: ignore[return-value]

        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(blob(index["manifests"][0]["digest"]))
        if "manifests" in manifest:
            manifest = json.load(blob(manifest["manifests"][0]["digest"]))
        paths = []
        for i, layer in enumerate(manifest["layers"]):
            path = folder / f"{i:04d}.gz"
            with blob(layer["digest"]) as source, open(path, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            paths.append(path)
    return paths


def decompress_all(gz_layers: list[Path]) -> list[Path]:
    plain = []
    for path in gz_layers:
        out = path.with_suffix(".tar")
        with gzip.open(path, "rb") as source, open(out, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        plain.append(out)
    return plain


# ---------------------------------------------------------------- decompressors


def measure_decompressors(gz_layers: list[Path], plain_layers: list[Path]) -> dict[str, float]:
    """Return MB/s of uncompressed output for each available decompressor."""
    total = sum(p.stat().st_size for p in plain_layers)
    blobs = [p.read_bytes() for p in gz_layers]
    figures: dict[str, float] = {}
    load = os.getloadavg()[0]

    def inflate(module: object) -> None:
        for data in blobs:
            d = module.decompressobj(31)  # type: ignore[attr-defined]
            view = memoryview(data)
            for i in range(0, len(data), 1 << 20):
                d.decompress(view[i : i + (1 << 20)], 1 << 22)
                while d.unconsumed_tail:
                    d.decompress(d.unconsumed_tail, 1 << 22)

    candidates: list[tuple[str, object]] = [("zlib", lambda: inflate(zlib))]
    try:
        from isal import isal_zlib

        candidates.append(("isal", lambda: inflate(isal_zlib)))
    except ImportError:
        pass
    try:
        import rapidgzip

        def rapid() -> None:
            for path in gz_layers:
                with rapidgzip.open(str(path), parallelization=os.cpu_count() or 1) as f:
                    while f.read(1 << 22):
                        pass

        candidates.append(("rapidgzip", rapid))
    except ImportError:
        pass
    for name, run in candidates:
        start = time.perf_counter()
        run()  # type: ignore[operator]
        figures[f"gzip-{name}"] = total / (time.perf_counter() - start) / 1e6

    import zstandard

    frames = [zstandard.ZstdCompressor(level=3).compress(p.read_bytes()) for p in plain_layers]
    start = time.perf_counter()
    for frame in frames:
        reader = zstandard.ZstdDecompressor().stream_reader(frame)
        while reader.read(1 << 22):
            pass
    figures["zstd-zstandard"] = total / (time.perf_counter() - start) / 1e6
    blobs.clear()
    frames.clear()
    figures["load-average"] = load
    return figures


# ---------------------------------------------------------------- timed runs


def children_cpu() -> float:
    """Return the user and system seconds of the waited-for child processes so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tar(layers: list[Path], target: Path, gzip_layers: bool) -> float:
    flags = "-xzpf" if gzip_layers else "-xpf"
    start = time.perf_counter()
    for layer in layers:
        subprocess.run(
            [
                "tar",
                flags,
                str(layer),
                "-C",
                str(target),
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
            ],
            check=True,
        )
    return time.perf_counter() - start


def run_lamina(mode: str, layers: list[Path], target: Path) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, CHILD_FLAG, mode, str(target), *map(str, layers)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    return wall, json.loads(done.stdout)


def bench_image(name: str, archive: Path, work: Path, runs: int) -> dict[str, object]:
    layers_dir = work / f"layers-{name}"
    gz_layers = layer_blobs(archive, layers_dir)
    plain_layers = decompress_all(gz_layers)
    size = sum(p.stat().st_size for p in plain_layers)
    print(f"\n== {name}: {len(gz_layers)} layers, {size / 1e6:.1f} MB uncompressed", flush=True)

    decompressors = measure_decompressors(gz_layers, plain_layers)
    load = decompressors.pop("load-average")
    print(f"  load average {load:.1f} (1 min) before the runs")
    for key, value in decompressors.items():
        print(f"  {key:16s} {value:8.0f} MB/s")

    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    inside: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    variants = [
        ("tar-plain", None, plain_layers),
        ("lamina-plain", "generic", plain_layers),
        ("tar-gzip", None, gz_layers),
        ("lamina-gzip", "generic", gz_layers),
        ("lamina-overlay", "overlay", gz_layers),
    ]
    for _ in range(runs):
        for label, mode, layers in variants:
            target = work / "target"
            if target.exists():
                shutil.rmtree(target)
            target.mkdir()
            before = children_cpu()
            if mode is None:
                seconds = run_tar(layers, target, gzip_layers=label == "tar-gzip")
            else:
                seconds, report = run_lamina(mode, layers, target)
                rss.setdefault(label, []).append(int(report["vmhwm_kib"]))
                inside.setdefault(label, []).append(float(report["apply_s"]))
            cpu.setdefault(label, []).append(children_cpu() - before)
            times.setdefault(label, []).append(seconds)
    shutil.rmtree(work / "target", ignore_errors=True)
    shutil.rmtree(layers_dir, ignore_errors=True)

    baseline = statistics.median(times["tar-plain"])
    cpu_baseline = statistics.median(cpu["tar-plain"])
    print(
        f"  {'variant':16s} {'median s':>9s} {'x tar-plain':>12s} {'cpu s':>7s} {'x tar cpu':>10s}"
        f" {'peak RSS MiB':>13s} {'in-process s':>13s}"
    )
    rows = {}
    for label, values in times.items():
        median = statistics.median(values)
        cpu_s = statistics.median(cpu[label])
        peak = max(rss[label]) / 1024 if label in rss else None
        apply_s = statistics.median(inside[label]) if label in inside else None
        rows[label] = {
            "median_s": round(median, 3),
            "apply_s": round(apply_s, 3) if apply_s else None,
            "ratio": round(median / baseline, 2),
            "cpu_s": round(cpu_s, 3),
            "cpu_ratio": round(cpu_s / cpu_baseline, 2),
            "peak_rss_mib": round(peak, 1) if peak else None,
            "runs": [round(v, 3) for v in values],
        }
        shown = f"{peak:13.1f}" if peak else f"{'':13s}"
        shown += f" {apply_s:13.3f}" if apply_s else ""
        print(
            f"  {label:16s} {median:9.3f} {median / baseline:12.2f} {cpu_s:7.3f}"
            f" {cpu_s / cpu_baseline:10.2f} {shown}"
        )
    return {
        "image": name,
        "layers": len(gz_layers),
        "uncompressed_bytes": size,
        "decompress_mb_s": {k: round(v) for k, v in decompressors.items()},
        "variants": rows,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "images_dir", nargs="?", default=str(Path.home() / ".cache" / "lamina-images")
    )
    parser.add_argument("--images", nargs="+", default=["debian", "big"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--on-disk", action="store_true", help="work in a folder under $TMPDIR instead of a tmpfs"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lamina-bench-"))
    mounted = False
    try:
        if not args.on_disk:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=8g", "tmpfs", str(work)], check=True
            )
            mounted = True
        print(
            f"work folder: {work} ({'tmpfs' if mounted else 'disk'}), runs: {args.runs}, "
            f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}"
        )
        results = []
        for name in args.images:
            archive = Path(args.images_dir) / f"{name}.oci.tar"
            if not archive.exists():
                print(f"\n== {name}: {archive} not found, skipped")
                continue
            results.append(bench_image(name, archive, work, args.runs))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if mounted:
            subprocess.run(["umount", str(work)], check=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
