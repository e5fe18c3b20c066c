"""Latency of prepare + commit + remove as the store grows, and of a filtered walk.

For each count of existing snapshots (10, 1,000, 10,000 and 100,000 by
default) the script grows one store to that size. It then times ITERATIONS
rounds of prepare, commit and remove of a new snapshot on a committed
parent and reports the median and the 99th percentile. It then times a walk
with a label filter over the largest store. The target is a median at the
largest count within 1.2 times the median at the smallest.

Existing snapshots are written straight through the metadata store in
batched transactions, with their directories, because creating 100,000 of
them one call at a time would take most of the run. They form image-like
chains of committed layers with a few Active and View snapshots on top,
each labelled like containerd's snapshots are.

Run as root (it mounts nothing, but overlay roots are created as root
would create them):

    python benchmarks/core_latency.py
    python benchmarks/core_latency.py --counts 10,1000 --iterations 100 --driver native
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.snapshots import Kind, Usage

DEFAULT_COUNTS = (10, 1_000, 10_000, 100_000)
TARGET_RATIO = 1.2

# Shape of the seeded store: chains of this many committed layers, then one
# Active and one View snapshot on every tenth chain top.
CHAIN_LENGTH = 8
GROUPS = 100
GROUP_LABEL = "bench/group"


@dataclass(frozen=True)
class Timing:
    existing: int
    median_ms: float
    p99_ms: float


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Return the FRACTION quantile of SAMPLES by the nearest-rank method."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Seeder:
    """Adds snapshots to a store in batched transactions, with their directories."""

    def __init__(self, sn: LayerSnapshotter) -> None:
        self.sn = sn
        self.count = sum(1 for _ in sn.list())
        self.chain = 0
        self.tops: list[str] = []

    def grow_to(self, total: int, batch: int) -> None:
        while self.count < total:
            self._add_batch(min(batch, total - self.count))

    def _add_batch(self, size: int) -> None:
        new_dirs: list[tuple[int, Kind]] = []
        with self.sn.store.write("benchmark seed") as tx:
            added = 0
            while added < size:
                parent = ""
                for depth in range(min(CHAIN_LENGTH, size - added)):
                    name = f"seed/chain-{self.chain}/layer-{depth}"
                    labels = {
                        GROUP_LABEL: f"g{self.chain % GROUPS}",
                        "containerd.io/snapshot.ref": f"sha256:{self.chain:032x}{depth:032x}",
                    }
                    record = tx.create(name + "/extract", Kind.ACTIVE, parent, {}, "seed")
                    tx.commit_active(name + "/extract", name, labels, Usage(4096, 1), "seed")
                    new_dirs.append((record.snapshot_id, Kind.COMMITTED))
                    parent = name
                    added += 1
                if parent and self.chain % 10 == 0 and size - added >= 2:
                    for kind in (Kind.ACTIVE, Kind.VIEW):
                        key = f"seed/chain-{self.chain}/{kind.name.lower()}"
                        record = tx.create(key, kind, parent, {GROUP_LABEL: "top"}, "seed")
                        new_dirs.append((record.snapshot_id, kind))
                        added += 1
                if parent:
                    self.tops.append(parent)
                self.chain += 1
        for snapshot_id, kind in new_dirs:
            own = self.sn.snapshots_dir / str(snapshot_id)
            (own / "fs").mkdir(mode=0o755, parents=True)
            if kind is Kind.ACTIVE and self.sn.driver_name == "overlay":
                (own / "work").mkdir(mode=0o711)
        self.count += size


def time_round_trips(sn: LayerSnapshotter, parent: str, iterations: int) -> list[float]:
    """Time ITERATIONS rounds of prepare, commit and remove; return milliseconds."""
    samples = []
    for i in range(iterations):
        key = f"bench/active-{i}"
        name = f"bench/committed-{i}"
        started = time.perf_counter()
        sn.prepare(key, parent, labels={"containerd.io/snapshot.ref": name})
        sn.commit(name, key)
        sn.remove(name)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def time_call(call: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Return the median wall time of CALL in milliseconds and its last result."""
    durations = []
    result: object = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        durations.append((time.perf_counter() - started) * 1000)
    return statistics.median(durations), result


def run(args: argparse.Namespace) -> int:
    counts = sorted(int(c) for c in args.counts.split(","))
    parent_dir = Path(args.dir) if args.dir else None
    root = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=parent_dir))
    try:
        sn = open_snapshotter(root / "root", args.driver)
        seeder = Seeder(sn)
        timings = []
        for count in counts:
            started = time.perf_counter()
            seeder.grow_to(count, args.batch)
            seeded_s = time.perf_counter() - started
            # A parent in the middle of the store, at the top of a chain.
            parent = seeder.tops[len(seeder.tops) // 2] if seeder.tops else ""
            time_round_trips(sn, parent, min(20, args.iterations))  # warm caches
            samples = time_round_trips(sn, parent, args.iterations)
            timings.append(Timing(count, statistics.median(samples), percentile(samples, 0.99)))
            print(
                f"  {count:>7} existing: seeded in {seeded_s:.1f} s, "
                f"median {timings[-1].median_ms:.2f} ms",
                file=sys.stderr,
            )

        largest = counts[-1]
        label_filter = f'labels."{GROUP_LABEL}"==g7'
        walk_ms, matched = time_call(lambda: sum(1 for _ in sn.list(label_filter)), 5)
        scan_filter = "name~=chain-7/layer-0$"
        scan_ms, scanned = time_call(lambda: sum(1 for _ in sn.list(scan_filter)), 3)
        sn.close()
    finally:
        if not args.keep:
            shutil.rmtree(root)

    print(f"prepare+commit+remove, driver {args.driver}, {args.iterations} rounds per count")
    print(f"{'existing':>10}  {'median ms':>10}  {'p99 ms':>10}")
    for timing in timings:
        print(f"{timing.existing:>10}  {timing.median_ms:>10.2f}  {timing.p99_ms:>10.2f}")
    ratio = timings[-1].median_ms / timings[0].median_ms
    p99_ratio = timings[-1].p99_ms / timings[0].p99_ms
    verdict = "within" if ratio <= TARGET_RATIO else "above"
    print(
        f"median ratio {timings[-1].existing} / {timings[0].existing}: {ratio:.2f} "
        f"({verdict} the target of {TARGET_RATIO}); p99 ratio: {p99_ratio:.2f}"
    )
    print(
        f"walk {label_filter} over {largest}: {matched} matches in {walk_ms:.1f} ms (median of 5)"
    )
    print(f"walk {scan_filter} over {largest}: {scanned} matches in {scan_ms:.1f} ms (median of 3)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--counts",
        default=",".join(str(c) for c in DEFAULT_COUNTS),
        help="comma-separated numbers of existing snapshots (default: %(default)s)",
    )
    parser.add_argument(
        "--iterations", type=int, default=200, help="timed rounds per count (default: 200)"
    )
    parser.add_argument("--driver", default="overlay", choices=["overlay", "native"])
    parser.add_argument(
        "--batch", type=int, default=5000, help="snapshots seeded per transaction (default: 5000)"
    )
    parser.add_argument("--dir", help="directory for the temporary store (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the store after the run")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
