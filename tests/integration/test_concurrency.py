"""Several processes on one root: no corruption, only the documented errors.

Each worker process runs a random mix of operations on a small shared set of
keys and names, so that the workers collide all the time. Two prepare one
key, one commits into a name another just took, or one removes a parent
while another prepares a child of it. A collision may fail only with
AlreadyExistsError, NotFoundError or FailedPreconditionError. Every layer a
worker commits holds a file naming its writer and content whose digest is
stored beside it, so a final pass can verify every committed layer.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash import check_store

from lamina.drivers import open_snapshotter
from lamina.mount import mount_all, unmount
from lamina.snapshots import Kind

WORKERS = 4
OPERATIONS = 120

WORKER = r"""
import hashlib, json, os, random, sys
from pathlib import Path
from lamina.drivers import open_snapshotter
from lamina.errors import (
    AlreadyExistsError, FailedPreconditionError, LaminaError, NotFoundError,
)
from lamina.mount import mount_all, unmount

root, driver, work, worker, count = (
    sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
)
rng = random.Random(worker)
sn = open_snapshotter(root, driver)
shared_keys = [f"shared-{i}" for i in range(4)]
shared_names = [f"layer-{i}" for i in range(6)]
counts = {}

def note(result):
    counts[result] = counts.get(result, 0) + 1

for step in range(count):
    op = rng.choice(["prepare-write-commit", "prepare-shared", "commit-shared",
                     "view-shared", "remove-shared", "remove-name", "walk"])
    try:
        if op == "prepare-write-commit":
            key = f"own-{worker}-{step}"
            mounts = sn.prepare(key, rng.choice(shared_names + [""]))
            target = work / f"m-{worker}"
            target.mkdir(exist_ok=True)
            mount_all(mounts, target)
            try:
                data = os.urandom(rng.randint(1, 200_000))
                (target / f"data-{worker}-{step}").write_bytes(data)
                (target / f"sha-{worker}-{step}").write_text(hashlib.sha256(data).hexdigest())
            finally:
                unmount(target)
            try:
                sn.commit(rng.choice(shared_names), key, labels={"writer": str(worker)})
            finally:
                try:
                    sn.remove(key)
                except NotFoundError:
                    pass  # committed: the key is gone
        elif op == "prepare-shared":
            sn.prepare(rng.choice(shared_keys), rng.choice(shared_names + [""]))
        elif op == "commit-shared":
            sn.commit(rng.choice(shared_names), rng.choice(shared_keys))
        elif op == "view-shared":
            sn.view(rng.choice(shared_keys), rng.choice(shared_names))
        elif op == "remove-shared":
            sn.remove(rng.choice(shared_keys))
        elif op == "remove-name":
            sn.remove(rng.choice(shared_names))
        else:
            for info in sn.list("labels.writer"):
                sn.stat(info.name)
        note(op + ":ok")
    except (AlreadyExistsError, NotFoundError, FailedPreconditionError) as err:
        note(type(err).__name__)
print(json.dumps(counts))
"""


@pytest.mark.parametrize("driver", ["overlay", "native"])
def test_workers_on_one_root(driver: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = tmp_path / "work"
    work.mkdir()
    open_snapshotter(root, driver).close()

    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), driver, str(work), str(n), str(OPERATIONS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(WORKERS)
    ]
    results = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=180)
        assert worker.returncode == 0, f"worker failed with an undocumented error:\n{stderr}"
        results.append(json.loads(stdout))

    totals: dict[str, int] = {}
    for counts in results:
        for result, n in counts.items():
            totals[result] = totals.get(result, 0) + n
    # The workers did collide, and still got most of their work done.
    assert totals.get("AlreadyExistsError", 0) > 0, totals
    assert totals.get("prepare-write-commit:ok", 0) > 0, totals

    check_store(root, driver, work)
    with sqlite3.connect(root / "metadata.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    verify_layers(root, driver, work)


def verify_layers(root: Path, driver: str, work: Path) -> None:
    """View every committed layer and check each data file against its digest."""
    import hashlib

    sn = open_snapshotter(root, driver)
    try:
        for info in list(sn.list()):
            if info.kind is not Kind.COMMITTED:
                continue
            key = f"verify-{info.name}"
            target = work / "verify"
            target.mkdir(exist_ok=True)
            mount_all(sn.view(key, info.name), target)
            try:
                for digest_file in target.glob("sha-*"):
                    data_file = target / digest_file.name.replace("sha-", "data-", 1)
                    digest = hashlib.sha256(data_file.read_bytes()).hexdigest()
                    assert digest == digest_file.read_text(), data_file.name
                # A layer contains its own files and those of the layers
                # below it, each with its digest file.
                names = os.listdir(target)
                assert len([n for n in names if n.startswith("data-")]) == len(
                    [n for n in names if n.startswith("sha-")]
                )
            finally:
                unmount(target)
            sn.remove(key)
    finally:
        sn.close()
