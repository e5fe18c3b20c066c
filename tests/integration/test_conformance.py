"""The conformance suite for the overlay and native drivers, plus checks of the local layout.

The local checks look at the snapshotter's own directories through
`snapshot_dirs`, which a remote snapshotter does not offer, so they stay out
of the shared suite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The suite lives outside a test module; rewrite its asserts for readable failures.
pytest.register_assert_rewrite("conformance")

from conformance import (  # noqa: E402
    MAX_LOWER_LAYERS,
    Factory,
    SnapshotterConformance,
    create_file,
    mounted,
    write_layer,
)

from lamina.drivers import LayerSnapshotter, open_snapshotter  # noqa: E402
from lamina.snapshots import Kind, Snapshotter  # noqa: E402


@dataclass(frozen=True)
class DriverFactory:
    """Opens a local snapshotter with one driver; the attributes describe the driver."""

    driver: str
    max_lower_layers: int | None
    usage_excludes_parents: bool

    def __call__(self, root: Path) -> Snapshotter:
        return open_snapshotter(root, driver=self.driver)


FACTORIES = {
    "overlay": DriverFactory("overlay", MAX_LOWER_LAYERS, usage_excludes_parents=True),
    # A native snapshot is a full copy of its parent: nothing limits the
    # depth, and its usage counts the copied files.
    "native": DriverFactory("native", None, usage_excludes_parents=False),
}


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def snapshotter_factory(request: pytest.FixtureRequest) -> Factory:
    return FACTORIES[request.param]


class TestConformance(SnapshotterConformance):
    """containerd's snapshot conformance cases and Lamina's own, for each driver."""


@pytest.fixture
def local(snapshotter_factory: Factory, tmp_path: Path) -> Iterator[LayerSnapshotter]:
    root = tmp_path / "root"
    root.mkdir()
    sn = snapshotter_factory(root)
    assert isinstance(sn, LayerSnapshotter)
    try:
        yield sn
    finally:
        sn.close()


def test_committed_usage_stored(local: LayerSnapshotter, tmp_path: Path) -> None:
    write_layer(local, tmp_path, "", create_file("/data", b"d" * 100_000), name="base")
    stored = local.usage("base")
    # Growing the layer behind the store's back must not change the
    # usage recorded at commit.
    (local.snapshot_dirs("base").fs / "extra").write_bytes(os.urandom(200_000))
    assert local.usage("base") == stored


def test_active_usage_is_live(local: LayerSnapshotter) -> None:
    local.prepare("active")
    before = local.usage("active")
    (local.snapshot_dirs("active").fs / "extra").write_bytes(os.urandom(200_000))
    after = local.usage("active")
    assert after.inodes == before.inodes + 1
    assert after.size >= before.size + 200_000


def test_layout_uses_ids_not_keys(local: LayerSnapshotter, tmp_path: Path) -> None:
    keys = ["../../outside", "a/b", "spaces in key", "ключ"]
    for key in keys:
        local.prepare(key)
    local.commit("named/../c", "a/b")
    local.view("v", "named/../c")

    top_dirs = sorted(p.name for p in local.root.iterdir() if p.is_dir())
    assert top_dirs == ["snapshots"]
    ids = sorted(p.name for p in (local.root / "snapshots").iterdir())
    assert all(name.isdigit() for name in ids), ids
    assert len(ids) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]

    for key in [*keys[:1], *keys[2:], "named/../c", "v"]:
        dirs = local.snapshot_dirs(key)
        assert dirs.fs.parent.parent == local.root / "snapshots"
        assert dirs.fs.parent.name == str(dirs.snapshot_id)
    assert local.snapshot_dirs("v").kind == Kind.VIEW


def test_cleanup_removes_orphans(local: LayerSnapshotter, tmp_path: Path) -> None:
    base = write_layer(local, tmp_path / "work", "", create_file("/a", b"a"), name="base")
    local.prepare("active", base)
    snapshots = local.root / "snapshots"
    orphans = [snapshots / "999999", snapshots / ".new-deadbeef", snapshots / ".old-7-abcd"]
    for orphan in orphans:
        (orphan / "fs").mkdir(parents=True)
        (orphan / "fs" / "file").write_bytes(b"junk")

    removed = local.cleanup()
    assert sorted(removed) == sorted(str(p) for p in orphans)
    assert local.cleanup() == []
    assert local.stat("active").parent == base
    mounts = local.mounts("active")
    with mounted(mounts, tmp_path / "m") as target:
        assert (target / "a").read_bytes() == b"a"


def test_reopen_keeps_state(snapshotter_factory: Factory, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = snapshotter_factory(root)
    write_layer(first, tmp_path / "work", "", create_file("/a", b"a"), name="base")
    first.prepare("active", "base", labels={"x": "1"})
    infos = {info.name: info for info in first.list()}
    first.close()

    second = snapshotter_factory(root)
    try:
        assert {info.name: info for info in second.list()} == infos
        assert second.cleanup() == []
    finally:
        second.close()
