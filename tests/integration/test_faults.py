"""A worker process killed with SIGKILL hundreds of times loses nothing it reported done.

Each kill is followed by the checks of tests/faults_harness.py: the journal's
snapshots and images are all there with their content, the operation in
flight either took effect or left no trace, and after cleanup fsck finds
nothing. Set LAMINA_FAULT_SEED to replay a failing run; the seed is in the
failure message.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_harness import (
    BUSYBOX_ARCHIVE,
    CRASH_POINTS,
    FaultCheckError,
    FaultRun,
    replay,
)

from lamina.drivers import open_snapshotter
from lamina.mount import is_mountpoint, unmount

# Kills per driver in the regular suite: 200 in all.
KILLS = {"overlay": 110, "native": 90}


def run_seed() -> int:
    value = os.environ.get("LAMINA_FAULT_SEED")
    return int(value) if value else random.randrange(2**32)


@pytest.mark.slow
@pytest.mark.parametrize("driver", sorted(KILLS))
def test_kills_lose_nothing(driver: str, tmp_path: Path) -> None:
    seed = run_seed()
    run = FaultRun(tmp_path, driver, seed=seed, archive=BUSYBOX_ARCHIVE)

    try:
        summary = run.run(KILLS[driver])
    except FaultCheckError as err:
        pytest.fail(f"seed {seed}: {err}")

    print(f"seed {seed}, driver {driver}: {summary.text()}")
    assert summary.kills == KILLS[driver]
    # Every crash point was reached at least once, at its own life.
    assert sorted(summary.by_crash_point) == sorted(CRASH_POINTS)
    assert summary.operations_done > summary.kills
    assert summary.by_op.get("commit", 0) > 0
    assert summary.by_op.get("import", 0) > 0
    # Kills landed both before and after an operation took effect.
    assert summary.in_flight_applied > 0
    assert summary.in_flight_not_applied > 0
    # A kill must not leave a mount of the root's directories anywhere,
    # also outside the root, where neither cleanup nor fsck looks.
    assert summary.leaked_mounts == []


# ---------------------------------------------------------------- the checks themselves


@pytest.fixture
def run_with_layer(tmp_path: Path) -> Iterator[FaultRun]:
    """A run whose journal has at least one committed snapshot, without image import."""
    run = FaultRun(tmp_path, "overlay", seed=7)
    for _ in range(30):
        run.life()
        model = replay(run.journal.records())
        if any(snap.kind == "committed" for snap in model.snapshots.values()):
            break
    yield run


def committed_layer(run: FaultRun) -> str:
    model = replay(run.journal.records())
    return sorted(k for k, s in model.snapshots.items() if s.kind == "committed")[0]


def test_checks_catch_changed_content(run_with_layer: FaultRun) -> None:
    run = run_with_layer
    sn = open_snapshotter(run.root)
    try:
        fs = sn.snapshot_dirs(committed_layer(run)).fs
    finally:
        sn.close()
    victim = sorted(p for p in fs.rglob("*") if p.is_file())[0]
    victim.write_bytes(b"changed behind the snapshotter's back")

    with pytest.raises(FaultCheckError, match="content"):
        run.after_kill(run.summary.kills - 1)


def test_checks_catch_unexpected_snapshot(run_with_layer: FaultRun) -> None:
    run = run_with_layer
    sn = open_snapshotter(run.root)
    try:
        sn.prepare("half-made", committed_layer(run))
    finally:
        sn.close()

    with pytest.raises(FaultCheckError, match="unexpected snapshot"):
        run.after_kill(run.summary.kills - 1)


def test_checks_catch_lost_snapshot(run_with_layer: FaultRun) -> None:
    run = run_with_layer
    model = replay(run.journal.records())
    leaf = sorted(k for k in model.snapshots if not model.has_children(k))[0]
    sn = open_snapshotter(run.root)
    try:
        sn.remove(leaf)
    finally:
        sn.close()

    with pytest.raises(FaultCheckError, match="missing"):
        run.after_kill(run.summary.kills - 1)


def test_checks_catch_mount_left_in_root(run_with_layer: FaultRun) -> None:
    run = run_with_layer
    target = run.root / "left"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        with pytest.raises(FaultCheckError, match="fsck"):
            run.after_kill(run.summary.kills - 1)
    finally:
        if is_mountpoint(target):
            unmount(target)
