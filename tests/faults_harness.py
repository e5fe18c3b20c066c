"""Fault injection: a worker process killed with SIGKILL at random points, and the checks after.

The worker is a real process on a real root. It runs a random sequence of
prepare (with writes through the returned mounts), view, commit, remove,
cleanup, image import and image removal. It also writes a journal, with a
"begin" line before each operation and a "done" line after it returns, each
fsync'd. The harness kills the worker, either after a random delay or at
a named phase of the snapshotter (LAMINA_CRASH_POINT), then checks the
root:

- every snapshot and image the journal records as existing is there, with its
  kind and parent; at most the one operation in flight at the kill may have
  taken effect or not, and nothing else is visible;
- the content of every committed snapshot (the tree of its own directory)
  matches what the worker wrote;
- after `cleanup` (and `prune` of dead imports) no directory or mount is
  left and fsck finds nothing.

It then records the outcome of the operation in flight in the journal and
starts the next worker, which rebuilds its state from the journal.

The test suite runs a few hundred kills; run many more by hand with
`python -m tests.faults_harness --kills 1000` from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSYBOX_ARCHIVE = Path.home() / ".cache" / "lamina-images" / "busybox.oci.tar"

# Every phase at which the snapshotter can kill itself (lamina.drivers.base).
CRASH_POINTS = (
    "prepare:populated",
    "prepare:renamed",
    "prepare:committed",
    "view:populated",
    "view:renamed",
    "view:committed",
    "commit:updated",
    "commit:committed",
    "remove:deleted",
    "remove:committed",
)

# Keys of an image import's Active snapshots (lamina.images.manager).
IMPORT_KEY = re.compile(r"import \d+-[0-9a-f]+ \S+")

MAX_SNAPSHOTS = 24
MAX_DEPTH = 5


# ---------------------------------------------------------------------------
# Trees


def tree_listing(top: Path) -> dict[str, str]:
    """Describe every entry below TOP: "d" a directory, "f:SHA256" a file, "w" a whiteout."""
    listing: dict[str, str] = {}
    for directory, subdirs, files in os.walk(top):
        for name in subdirs + files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, top)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                listing[relative] = "d"
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    listing[relative] = "f:" + hashlib.sha256(handle.read()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                listing[relative] = "l:" + os.readlink(path)
            elif stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                listing[relative] = "w"  # an overlayfs whiteout
            else:
                listing[relative] = f"x:{info.st_mode:o}:{info.st_rdev}"
    return listing


def listing_digest(listing: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(listing.items())).encode()).hexdigest()


# ---------------------------------------------------------------------------
# The journal and the state it implies


class Journal:
    """JSON lines appended with fsync, so a line that was written survives the kill."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            # A kill during the write may leave the last line cut short.
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records


@dataclass
class Snap:
    """The journal's record of one snapshot; `changes` is None when its content is unknown."""

    kind: str
    parent: str
    changes: dict[str, str] | None


@dataclass
class Model:
    """The state the journal implies, and the operation in flight when the worker died."""

    snapshots: dict[str, Snap] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    in_flight: dict[str, Any] | None = None

    def apply(self, record: dict[str, Any]) -> None:
        entry = record["t"]
        if entry == "begin":
            self.in_flight = record
            return
        if entry == "done" or record.get("applied"):
            self._effect(record, known=entry == "done")
        self.in_flight = None

    def _effect(self, record: dict[str, Any], known: bool) -> None:
        op = record["op"]
        if op == "prepare":
            changes = record["changes"] if known else None
            self.snapshots[record["key"]] = Snap("active", record["parent"], changes)
        elif op == "view":
            self.snapshots[record["key"]] = Snap("view", record["parent"], {})
        elif op == "commit":
            active = self.snapshots.pop(record["key"])
            self.snapshots[record["name"]] = Snap("committed", active.parent, active.changes)
        elif op == "remove":
            del self.snapshots[record["key"]]
        elif op == "import":
            self.images[record["name"]] = record["chain_id"]
        elif op == "remove_image":
            del self.images[record["name"]]

    def chain(self, name: str) -> list[str]:
        """Return NAME and its parents, nearest first."""
        chain = []
        while name:
            chain.append(name)
            name = self.snapshots[name].parent
        return chain

    def tree(self, name: str) -> dict[str, str]:
        """Return the merged tree of snapshot NAME and its parents."""
        tree: dict[str, str] = {}
        for layer in reversed(self.chain(name)):
            changes = self.snapshots[layer].changes
            assert changes is not None, f"content of {layer!r} is unknown"
            for path, value in sorted(changes.items()):
                if value == "w":
                    below = path + "/"
                    tree = {p: v for p, v in tree.items() if p != path and not p.startswith(below)}
                else:
                    tree[path] = value
        return tree

    def expected_layer(self, name: str, driver: str) -> dict[str, str]:
        """Return the listing of NAME's own directory: its changes (overlay) or its whole tree."""
        if driver == "overlay":
            changes = self.snapshots[name].changes
            assert changes is not None
            return dict(changes)
        return self.tree(name)

    def has_children(self, name: str) -> bool:
        return any(snap.parent == name for snap in self.snapshots.values())


def replay(records: Sequence[dict[str, Any]]) -> Model:
    model = Model()
    for record in records:
        model.apply(record)
    return model


# ---------------------------------------------------------------------------
# The worker (runs in the process that is killed)


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        from lamina.drivers import open_snapshotter

        self.rng = random.Random(args.seed)
        self.life = args.life
        self.driver = args.driver
        self.journal = Journal(Path(args.journal))
        self.target = Path(args.mounts) / "m"
        self.target.mkdir(exist_ok=True)
        self.archive = Path(args.archive) if args.archive else None
        self.model = replay(self.journal.records())
        assert self.model.in_flight is None, "the harness records the outcome of each kill"
        self.sn = open_snapshotter(args.root, args.driver)
        self.step = 0
        crash_point = os.environ.get("LAMINA_CRASH_POINT", "")
        self.bias = crash_point.split(":")[0] if crash_point else ""

    def run(self) -> None:
        print("ready", flush=True)
        while True:
            self.step += 1
            op = self.choose()
            getattr(self, "op_" + op)()

    def choose(self) -> str:
        snapshots = self.model.snapshots
        clean_actives = [
            k for k, s in snapshots.items() if s.kind == "active" and s.changes is not None
        ]
        removable = [k for k in snapshots if not self.model.has_children(k)]
        if len(snapshots) >= MAX_SNAPSHOTS:
            return "remove"
        weights = {
            "prepare": 30,
            "view": 8,
            "commit": 30 if clean_actives else 0,
            "remove": 20 if removable else 0,
            "cleanup": 3,
            "import": 4 if self.archive else 0,
            "remove_image": 3 if self.model.images else 0,
        }
        if weights.get(self.bias):
            weights[self.bias] *= 10
        if self.bias == "commit" and not clean_actives:
            weights["prepare"] *= 10
        ops = list(weights)
        return self.rng.choices(ops, [weights[o] for o in ops])[0]

    def record(self, entry: str, op: str, **fields: Any) -> None:
        self.journal.append({"t": entry, "op": op, "life": self.life, **fields})

    def parent(self) -> str:
        candidates = [
            k
            for k, s in self.model.snapshots.items()
            if s.kind == "committed" and len(self.model.chain(k)) < MAX_DEPTH
        ]
        return self.rng.choice([*candidates, ""])

    def op_prepare(self) -> None:
        from lamina.mount import mount_all, unmount

        key = f"active {self.life}-{self.step}"
        parent = self.parent()
        self.record("begin", "prepare", key=key, parent=parent)
        mounts = self.sn.prepare(key, parent, labels={"life": str(self.life)})
        changes: dict[str, str] = {}
        mount_all(mounts, self.target)
        try:
            for n in range(self.rng.randint(1, 4)):
                data = self.rng.randbytes(self.rng.randint(0, 32768))
                name = f"f{self.life}-{self.step}-{n}"
                (self.target / name).write_bytes(data)
                changes[name] = "f:" + hashlib.sha256(data).hexdigest()
            if self.rng.random() < 0.5:
                sub = f"d{self.life}-{self.step}"
                (self.target / sub).mkdir()
                (self.target / sub / "inner").write_bytes(b"inner " + sub.encode())
                changes[sub] = "d"
                inner = hashlib.sha256(b"inner " + sub.encode()).hexdigest()
                changes[sub + "/inner"] = "f:" + inner
            inherited = []
            if parent:
                tree = self.model.tree(parent)
                inherited = [p for p, v in tree.items() if "/" not in p and v != "d"]
            if inherited and self.rng.random() < 0.3:
                victim = self.rng.choice(sorted(inherited))
                (self.target / victim).unlink()
                changes[victim] = "w"
        finally:
            unmount(self.target)
        self.model.snapshots[key] = Snap("active", parent, changes)
        self.record("done", "prepare", key=key, parent=parent, changes=changes)

    def op_view(self) -> None:
        key = f"view {self.life}-{self.step}"
        parent = self.parent()
        self.record("begin", "view", key=key, parent=parent)
        self.sn.view(key, parent)
        self.model.snapshots[key] = Snap("view", parent, {})
        self.record("done", "view", key=key, parent=parent)

    def op_commit(self) -> None:
        snapshots = self.model.snapshots
        key = self.rng.choice(
            sorted(k for k, s in snapshots.items() if s.kind == "active" and s.changes is not None)
        )
        name = f"layer {self.life}-{self.step}"
        self.record("begin", "commit", key=key, name=name)
        self.sn.commit(name, key, labels={"life": str(self.life)})
        active = self.model.snapshots.pop(key)
        self.model.snapshots[name] = Snap("committed", active.parent, active.changes)
        self.record("done", "commit", key=key, name=name)

    def op_remove(self) -> None:
        leaves = [k for k in self.model.snapshots if not self.model.has_children(k)]
        key = self.rng.choice(sorted(leaves))
        self.record("begin", "remove", key=key)
        self.sn.remove(key)
        del self.model.snapshots[key]
        self.record("done", "remove", key=key)

    def op_cleanup(self) -> None:
        self.record("begin", "cleanup")
        self.sn.cleanup()
        self.record("done", "cleanup")

    def op_import(self) -> None:
        from lamina.images.manager import import_image

        assert self.archive is not None
        name = f"image-{self.life}-{self.step}"
        self.record("begin", "import", name=name)
        result = import_image(self.sn, self.archive, name=name)
        self.model.images[name] = result.image.chain_id
        self.record("done", "import", name=name, chain_id=result.image.chain_id)

    def op_remove_image(self) -> None:
        from lamina.images.manager import remove_image

        name = self.rng.choice(sorted(self.model.images))
        self.record("begin", "remove_image", name=name)
        remove_image(self.sn, name)
        del self.model.images[name]
        self.record("done", "remove_image", name=name)


# ---------------------------------------------------------------------------
# The harness (runs in the test process)


@dataclass
class Summary:
    kills: int = 0
    crash_point_kills: int = 0
    delay_kills: int = 0
    operations_done: int = 0
    in_flight_applied: int = 0
    in_flight_not_applied: int = 0
    cleaned_paths: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    by_crash_point: dict[str, int] = field(default_factory=dict)
    leaked_mounts: list[str] = field(default_factory=list)

    def text(self) -> str:
        ops = ", ".join(f"{op} {count}" for op, count in sorted(self.by_op.items()))
        points = ", ".join(f"{p} {n}" for p, n in sorted(self.by_crash_point.items()))
        return (
            f"{self.kills} kills ({self.crash_point_kills} at crash points, "
            f"{self.delay_kills} after random delays), {self.operations_done} operations "
            f"completed ({ops}); operation in flight at the kill: {self.in_flight_applied} "
            f"took effect, {self.in_flight_not_applied} did not; cleanup removed "
            f"{self.cleaned_paths} paths; kills per crash point: {points}; "
            f"mounts left behind by a killed worker: {len(self.leaked_mounts)}"
        )


class FaultCheckError(AssertionError):
    """The root broke an invariant after a kill."""


class FaultRun:
    """One root, one journal, and a series of worker lives each ended by a kill."""

    def __init__(
        self,
        base: Path,
        driver: str,
        *,
        seed: int,
        archive: Path | None = None,
        max_delay: float = 0.3,
        cli_every: int = 20,
    ) -> None:
        self.base = base
        self.root = base / "root"
        self.mounts = base / "mounts"
        self.mounts.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(base / "journal")
        self.driver = driver
        self.rng = random.Random(seed)
        self.archive = archive
        self.max_delay = max_delay
        self.cli_every = cli_every
        self.summary = Summary()
        self.reference: dict[str, str] | None = None
        if archive is not None:
            self.reference = reference_image_listing(base / "reference", driver, archive)

    def run(self, kills: int) -> Summary:
        for _ in range(kills):
            self.life()
        return self.summary

    def life(self) -> None:
        life = self.summary.kills
        crash_point = ""
        # The first lives go through every crash point once; then half of
        # the lives end at a random crash point, half after a random delay.
        if life < len(CRASH_POINTS):
            crash_point = CRASH_POINTS[life]
        elif self.rng.random() < 0.5:
            crash_point = self.rng.choice(CRASH_POINTS)
        env = dict(os.environ)
        env.pop("LAMINA_CRASH_POINT", None)
        if crash_point:
            env["LAMINA_CRASH_POINT"] = crash_point
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "worker",
            "--root", str(self.root),
            "--driver", self.driver,
            "--journal", str(self.journal.path),
            "--mounts", str(self.mounts),
            "--seed", str(self.rng.randrange(2**32)),
            "--life", str(life),
        ]  # fmt: skip
        if self.archive is not None:
            command += ["--archive", str(self.archive)]
        # Its own session, so that the harness can wait below for the
        # worker's children (cp of the native driver) to end as well.
        with subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        ) as worker:
            assert worker.stdout is not None and worker.stderr is not None
            ready = worker.stdout.readline()
            if ready.strip() != b"ready":
                worker.wait()
                raise FaultCheckError(
                    f"life {life}: worker failed to start: {worker.stderr.read().decode()}"
                )
            # A crash point may never be reached by the operations the
            # worker picks; a kill after a longer delay ends that life.
            delay = 3.0 if crash_point else self.rng.uniform(0, self.max_delay)
            try:
                status = worker.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                worker.send_signal(signal.SIGKILL)
                status = worker.wait()
                crash_point = ""
            errors = worker.stderr.read().decode()
        if status != -signal.SIGKILL:
            raise FaultCheckError(f"life {life}: worker exited with {status}:\n{errors}")
        wait_for_group(worker.pid, life)
        self.summary.kills += 1
        if crash_point:
            self.summary.crash_point_kills += 1
            count = self.summary.by_crash_point.get(crash_point, 0)
            self.summary.by_crash_point[crash_point] = count + 1
        else:
            self.summary.delay_kills += 1
        self.after_kill(life)

    def after_kill(self, life: int) -> None:
        from lamina.drivers import open_snapshotter
        from lamina.fsck import check
        from lamina.mount import mounts_under, unmount

        # The worker's own mount of its Active snapshot outlives it; a
        # container runtime would unmount it the same way.
        for point in mounts_under(self.mounts):
            unmount(point)
        # Any other mount of the root's directories is one Lamina made and
        # left behind, wherever it is. It is recorded, and unmounted so that
        # the run goes on checking everything else.
        for point in mounts_using(self.root):
            self.summary.leaked_mounts.append(f"life {life}: {point}")
            unmount(point)
            with contextlib.suppress(OSError):
                point.rmdir()

        records = self.journal.records()
        model = replay(records)
        for record in records:
            if record["t"] == "done" and record["life"] == life:
                self.summary.operations_done += 1
                self.summary.by_op[record["op"]] = self.summary.by_op.get(record["op"], 0) + 1

        sn = open_snapshotter(self.root, self.driver)
        try:
            resolution = self.resolve(sn, model, life)
            if resolution is not None:
                model.apply(resolution)
            self.check_state(sn, model, life)

            if life % self.cli_every == 0:
                cleanup = ["--root", str(self.root), "snapshots", "cleanup"]
                removed = run_cli_json(cleanup)["removed"]
            else:
                removed = sn.cleanup()
            if self.archive is not None:
                from lamina.images.manager import prune_images

                removed += [p for p in prune_images(sn) if p.startswith("import ")]
            self.summary.cleaned_paths += len(removed)

            self.check_state(sn, model, life, pruned=self.archive is not None)
            self.check_content(sn, model, life)
            if life % self.cli_every == 0:
                report = run_cli_json(["--root", str(self.root), "fsck"])
                if not report["clean"]:
                    raise FaultCheckError(f"life {life}: lamina fsck found {report['findings']}")
            else:
                findings = check(sn)
                if findings:
                    raise FaultCheckError(f"life {life}: fsck found {findings}")
            leftovers = mounts_under(self.root) + mounts_under(self.mounts)
            if leftovers:
                raise FaultCheckError(f"life {life}: mounts left: {leftovers}")
        finally:
            sn.close()
        if resolution is not None:
            self.journal.append(resolution)

    def resolve(self, sn: Any, model: Model, life: int) -> dict[str, Any] | None:
        """Find out whether the operation in flight took effect; return the journal line."""
        from lamina.errors import NotFoundError
        from lamina.metadata import images as image_records

        begin = model.in_flight
        if begin is None:
            return None

        def exists(key: str) -> bool:
            try:
                sn.stat(key)
            except NotFoundError:
                return False
            return True

        def image_exists(name: str) -> bool:
            with sn.store.read() as tx:
                return image_records.find_image(tx, name) is not None

        op = begin["op"]
        resolution = {**begin, "t": "resolved", "resolved_after": life}
        if op in ("prepare", "view"):
            applied = exists(begin["key"])
        elif op == "commit":
            applied = exists(begin["name"])
            if applied == exists(begin["key"]):
                raise FaultCheckError(
                    f"life {life}: commit of {begin['key']!r} to {begin['name']!r} half done: "
                    f"both or neither exist"
                )
        elif op == "remove":
            applied = not exists(begin["key"])
        elif op == "import":
            applied = image_exists(begin["name"])
            if applied:
                with sn.store.read() as tx:
                    image = image_records.get_image(tx, begin["name"], "check")
                resolution["chain_id"] = image.chain_id
        elif op == "remove_image":
            applied = not image_exists(begin["name"])
        else:
            applied = True
        resolution["applied"] = applied
        if applied:
            self.summary.in_flight_applied += 1
        else:
            self.summary.in_flight_not_applied += 1
        return resolution

    def check_state(self, sn: Any, model: Model, life: int, pruned: bool = False) -> None:
        from lamina.metadata import images as image_records

        actual = {info.name: info for info in sn.list()}
        for key, snap in model.snapshots.items():
            info = actual.get(key)
            if info is None:
                raise FaultCheckError(f"life {life}: snapshot {key!r} is missing")
            if str(info.kind).lower() != snap.kind or info.parent != snap.parent:
                raise FaultCheckError(
                    f"life {life}: snapshot {key!r} is {info.kind} on {info.parent!r}, "
                    f"expected {snap.kind} on {snap.parent!r}"
                )
        chains = set(model.images.values())
        for key, info in actual.items():
            if key in model.snapshots:
                continue
            # Layers of images stay as a cache until pruned; an import that
            # was killed leaves its Active snapshot until prune removes it.
            image_layer = key.startswith("sha256:") and str(info.kind) == "Committed"
            if image_layer or (IMPORT_KEY.fullmatch(key) and not pruned):
                continue
            raise FaultCheckError(f"life {life}: unexpected snapshot {key!r} ({info.kind})")
        for chain in chains:
            if chain not in actual:
                raise FaultCheckError(f"life {life}: image layer {chain!r} is missing")
        with sn.store.read() as tx:
            images = {image.name: image.chain_id for image in image_records.list_images(tx)}
        if images != model.images:
            raise FaultCheckError(f"life {life}: images {images}, expected {model.images}")

    def check_content(self, sn: Any, model: Model, life: int) -> None:
        for key, snap in model.snapshots.items():
            if snap.kind != "committed":
                continue
            expected = model.expected_layer(key, self.driver)
            found = tree_listing(sn.snapshot_dirs(key).fs)
            if found != expected:
                missing = sorted(set(expected.items()) - set(found.items()))[:5]
                extra = sorted(set(found.items()) - set(expected.items()))[:5]
                raise FaultCheckError(
                    f"life {life}: content of {key!r} differs: missing {missing}, extra {extra}"
                )
        for chain in set(model.images.values()):
            if tree_listing(sn.snapshot_dirs(chain).fs) != self.reference:
                raise FaultCheckError(
                    f"life {life}: image layer {chain!r} differs from a clean import"
                )


def mounts_using(root: Path) -> list[Path]:
    """Return the mount points of mounts of directories below ROOT, or overlays on them.

    A bind mount shows its source in the fourth field of mountinfo (the path
    inside its filesystem, which for a root on the / filesystem is the
    absolute path); an overlay shows its layers in the super options
    (proc(5)).
    """
    needle = str(root) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        source_path, mount_point = fields[3], fields[4]
        super_options = line.split(" - ", 1)[1] if " - " in line else ""
        if source_path.startswith(needle) or needle in super_options:
            points.append(Path(mount_point.replace("\\040", " ")))
    return points


def wait_for_group(group: int, life: int, timeout: float = 10.0) -> None:
    """Wait until every process of the process group GROUP has exited.

    Only the worker is killed. A child it started must end on its own soon
    after (the native driver's cp dies with its parent), and holds the new
    directory's lock until then. Zombies count as ended: they hold no files
    and locks, and their reaping is up to init.
    """
    deadline = time.monotonic() + timeout
    while live_members(group):
        if time.monotonic() > deadline:
            raise FaultCheckError(
                f"life {life}: processes of the killed worker still run after {timeout:g} s"
            )
        time.sleep(0.005)


def live_members(group: int) -> list[int]:
    """Return the processes of process group GROUP that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name in brackets may hold spaces; the fields after
        # it are: state, ppid, pgrp (proc(5)).
        state, _, pgrp = text.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            members.append(int(entry))
    return members


def reference_image_listing(root: Path, driver: str, archive: Path) -> dict[str, str]:
    """Import ARCHIVE into a fresh ROOT without faults; return the listing of its top layer."""
    from lamina.drivers import open_snapshotter
    from lamina.images.manager import import_image

    sn = open_snapshotter(root, driver)
    try:
        result = import_image(sn, archive, name="reference")
        return tree_listing(sn.snapshot_dirs(result.image.chain_id).fs)
    finally:
        sn.close()


def run_cli_json(argv: list[str]) -> dict[str, Any]:
    """Run `lamina --json ARGV` in a new process; return its JSON output.

    `lamina fsck` runs through this file, which adds the command to the
    parser when the installed `lamina` lacks it.
    """
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "cli", "--json", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode not in (0, 10, 11):
        raise FaultCheckError(
            f"lamina {' '.join(argv)} failed with status {result.returncode}: {result.stderr}"
        )
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def run_cli(argv: Sequence[str]) -> int:
    import lamina.cli
    from lamina.cli import fsck as fsck_cli
    from lamina.cli.common import add_global_options

    build_parser = lamina.cli.build_parser

    def build_with_fsck() -> argparse.ArgumentParser:
        parser = build_parser()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and "fsck" not in action.choices:
                common = argparse.ArgumentParser(add_help=False)
                add_global_options(common, suppress=True)
                fsck_cli.register(action, common)
        return parser

    lamina.cli.build_parser = build_with_fsck
    return lamina.cli.main(list(argv))


# ---------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        parser = argparse.ArgumentParser(prog="faults_harness worker")
        for option in ("--root", "--driver", "--journal", "--mounts", "--archive"):
            parser.add_argument(option)
        parser.add_argument("--seed", type=int, required=True)
        parser.add_argument("--life", type=int, required=True)
        Worker(parser.parse_args(argv[1:])).run()
        return 0
    if argv and argv[0] == "cli":
        return run_cli(argv[1:])

    parser = argparse.ArgumentParser(
        prog="python -m tests.faults_harness",
        description="Kill a Lamina worker process many times and check the root after each kill.",
    )
    parser.add_argument("--kills", type=int, default=1000, help="number of kills (default: 1000)")
    parser.add_argument("--driver", choices=["overlay", "native"], default="overlay")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--no-import", action="store_true", help="leave image import out of the operations"
    )
    parser.add_argument("--max-delay", type=float, default=0.3, help="longest random delay, s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    archive = None if args.no_import or not BUSYBOX_ARCHIVE.exists() else BUSYBOX_ARCHIVE
    base = Path(tempfile.mkdtemp(prefix="lamina-faults-"))
    started = time.monotonic()
    run = FaultRun(base, args.driver, seed=seed, archive=archive, max_delay=args.max_delay)
    try:
        run.run(args.kills)
    except FaultCheckError as err:
        print(f"seed {seed}: FAILED after {run.summary.kills} kills: {err}", file=sys.stderr)
        print(f"work directory kept: {base}", file=sys.stderr)
        return 1
    print(f"seed {seed}, driver {args.driver}: {run.summary.text()}")
    for leak in run.summary.leaked_mounts:
        print(f"mount left behind: {leak}")
    print(f"{time.monotonic() - started:.1f} s")
    if not args.keep:
        from lamina.mount import mounts_under, unmount

        for point in mounts_under(base):
            unmount(point)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
